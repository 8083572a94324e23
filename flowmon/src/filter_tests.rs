use serde_json::json;

use super::*;

fn parse(s: &str) -> Expr {
    Expr::parse(s, CONN_FIELDS).unwrap_or_else(|e| panic!("{}", e.render(s)))
}

fn err(s: &str) -> (usize, String) {
    let e = Expr::parse(s, CONN_FIELDS).expect_err(s);
    (e.pos, e.message)
}

fn conn(rst: u64, fin: u64, ct: u64) -> Value {
    json!({"rst.count": rst, "fin.count": fin, "ct.count": ct, "client.ip": "10.1.2.3", "server.ip": "2001:db8::1",
           "server.port": 443, "close": "refused", "direction_guessed": false, "duration": 1.5})
}

#[test]
fn the_two_examples_select_what_they_describe() {
    let rst_no_fin = parse("rst.count > 0 and fin.count = 0");
    assert!(rst_no_fin.matches(&conn(1, 0, 1)));
    assert!(!rst_no_fin.matches(&conn(1, 1, 1)));
    assert!(!rst_no_fin.matches(&conn(0, 0, 1)));
    let rst_no_conn = parse("rst.count > 0 and ct.count = 0");
    assert!(rst_no_conn.matches(&conn(2, 0, 0)));
    assert!(!rst_no_conn.matches(&conn(2, 0, 1)));
}

#[test]
fn every_comparison_operator() {
    let c = conn(3, 0, 1);
    for (f, want) in [
        ("rst.count = 3", true),
        ("rst.count == 3", true),
        ("rst.count != 3", false),
        ("rst.count < 3", false),
        ("rst.count <= 3", true),
        ("rst.count > 2", true),
        ("rst.count >= 4", false),
        ("duration > 1.25", true),
        ("close = \"refused\"", true),
        ("close = 'refused'", true),
        ("close = refused", true),
        ("close != fin", true),
        ("direction_guessed = false", true),
        ("client.ip = 10.1.2.3", true),
        ("client.ip != 10.1.2.4", true),
        ("server.ip = 2001:db8::1", true),
    ] {
        assert_eq!(parse(f).matches(&c), want, "{f}");
    }
}

#[test]
fn precedence_not_then_and_then_or() {
    // a or b and c  ==  a or (b and c)
    let e = parse("rst.count = 9 or fin.count = 0 and ct.count = 1");
    assert!(e.matches(&conn(0, 0, 1)));
    assert!(!e.matches(&conn(0, 0, 0)));
    assert!(e.matches(&conn(9, 5, 5)));
    // not binds tighter than and
    let e = parse("not rst.count = 0 and fin.count = 0");
    assert_eq!(
        e,
        Expr::And(
            Box::new(Expr::Not(Box::new(Expr::Cmp(
                "rst.count".into(),
                Cmp::Eq,
                Lit::Number(0.0)
            )))),
            Box::new(Expr::Cmp("fin.count".into(), Cmp::Eq, Lit::Number(0.0)))
        )
    );
    // parentheses override
    let e = parse("(rst.count = 9 or fin.count = 0) and ct.count = 1");
    assert!(!e.matches(&conn(9, 5, 0)));
    assert!(parse("not (rst.count > 0 and ct.count = 0)").matches(&conn(1, 0, 1)));
    assert!(
        parse("NOT rst.count > 5 AND ct.count = 1").matches(&conn(1, 0, 1)),
        "keywords ignore case"
    );
}

#[test]
fn cidr_and_sets() {
    let c = conn(0, 0, 0);
    assert!(parse("client.ip in 10.0.0.0/8").matches(&c));
    assert!(!parse("client.ip in 192.168.0.0/16").matches(&c));
    assert!(parse("client.ip in (192.168.0.0/16, 10.1.2.0/24)").matches(&c));
    assert!(parse("client.ip = 10.1.0.0/16").matches(&c));
    assert!(parse("server.ip in 2001:db8::/32").matches(&c));
    assert!(
        !parse("server.ip in 10.0.0.0/8").matches(&c),
        "families never match"
    );
    assert!(parse("server.port in (80, 443)").matches(&c));
    assert!(!parse("server.port in (80, 8080)").matches(&c));
    assert!(parse("server.port not in (80, 8080)").matches(&c));
    assert!(parse("close in (refused, unanswered)").matches(&c));
    assert!(parse("client.ip in 0.0.0.0/0").matches(&c));
    assert!(in_cidr(
        "::ffff:10.1.2.3".parse().unwrap(),
        "10.0.0.0".parse::<IpAddr>().unwrap(),
        8
    ));
}

#[test]
fn errors_point_at_the_mistake() {
    assert_eq!(
        err("rst.count >"),
        (11, "expected a number after the operator".into())
    );
    assert_eq!(
        err("rst.count 0"),
        (
            10,
            "expected an operator (= != < <= > >= in) after `rst.count`".into()
        )
    );
    assert_eq!(err("rst.cnt > 0").0, 0);
    assert_eq!(
        err("rst.cnt > 0").1,
        "unknown field `rst.cnt`: did you mean rst.count?"
    );
    assert!(err("count.rst > 0").1.contains("did you mean rst.count"));
    assert!(
        err("bogus > 0")
            .1
            .contains("known fields: client.ip, client.port")
    );
    assert_eq!(
        err("rst.count > 0 and"),
        (
            17,
            "the filter ends too early: expected a comparison such as `rst.count > 0`".into()
        )
    );
    assert_eq!(
        err("(rst.count > 0"),
        (14, "expected `)` to close the parenthesis".into())
    );
    assert_eq!(err("rst.count > 0)"), (13, "unmatched `)`".into()));
    assert_eq!(
        err("rst.count > 0 fin.count = 0"),
        (14, "expected `and`, `or` or the end of the filter".into())
    );
    assert_eq!(
        err("rst.count > abc"),
        (12, "`rst.count` is a number, but `abc` is not".into())
    );
    assert_eq!(
        err("client.ip = 10.0.0.999"),
        (
            12,
            "`client.ip` is an IP address, but `10.0.0.999` is not".into()
        )
    );
    assert_eq!(
        err("client.ip in 10.0.0.0/33"),
        (13, "prefix length must be 0 to 32".into())
    );
    assert_eq!(
        err("close > fin"),
        (6, "`close` is a string: only = and != compare it".into())
    );
    assert_eq!(
        err("client.ip < 10.0.0.0/8"),
        (12, "a CIDR block takes `in`, = or !=".into())
    );
    assert_eq!(
        err("server.port in (80 443)"),
        (19, "expected `,` or `)` in the set".into())
    );
    assert_eq!(
        err("close = \"refused"),
        (8, "unterminated string: add the closing quote".into())
    );
    assert_eq!(
        err("rst.count ! 0"),
        (
            10,
            "expected != (a lone ! is not an operator; use `not`)".into()
        )
    );
    assert_eq!(
        err("rst.count > 0 & fin.count = 0"),
        (14, "unexpected character '&'".into())
    );
    assert_eq!(
        err(""),
        (
            0,
            "empty filter: expected a comparison such as `rst.count > 0`".into()
        )
    );
    assert_eq!(
        err("and rst.count > 0"),
        (
            0,
            "expected a field name such as `rst.count`, `not` or `(`".into()
        )
    );
}

#[test]
fn rendered_error_has_a_caret_under_the_mistake() {
    let text = "rst.count > 0 and fin.count >> 0";
    let e = Expr::parse(text, CONN_FIELDS).unwrap_err();
    assert_eq!(
        e.render(text),
        "invalid filter: expected a number, found `>` at position 30\n  rst.count > 0 and fin.count >> 0\n                               ^"
    );
}

#[test]
fn fields_are_listed() {
    assert_eq!(
        parse("rst.count > 0 or (client.ip in 10.0.0.0/8 and not close = fin)").fields(),
        ["rst.count", "client.ip", "close"]
    );
}
