//! The query commands, as a user runs them: on capture files (no root) and
//! against a live agent in a network namespace (root), with exact rows,
//! including the two filters every operator asks first:
//! `rst.count > 0 and fin.count = 0` and `rst.count > 0 and ct.count = 0`.

mod common;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use common::{Agent, Mix, Pair, flowmon, mixed_traffic, rows};
use serde_json::{Value, json};

fn trace(path: &str) -> PathBuf {
    let dir = match std::env::var_os("FLOWMON_TESTDATA") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/zeek"),
    };
    dir.join("traces").join(path)
}

/// The `keys` of each row, as a JSON array of arrays.
fn pick(rows: &[Value], keys: &[&str]) -> Value {
    rows.iter()
        .map(|r| keys.iter().map(|k| r[*k].clone()).collect::<Value>())
        .collect()
}

#[test]
fn example_filters_on_captures() {
    // RST and no FIN: ldap's client abort; http-to-ssh has FIN and RST, so not.
    let ldap = trace("ldap/simpleauth.pcap");
    let r = rows(&flowmon(&[
        "flows",
        "--pcap",
        ldap.to_str().unwrap(),
        "--json",
        "--filter",
        "rst.count > 0 and fin.count = 0",
    ]));
    assert_eq!(
        pick(&r, &["client.port", "close", "closed_by", "conn_state"]),
        json!([[25936, "rst", "client", "RSTO"]])
    );
    let h2s = trace("http/http-to-ssh.pcap");
    assert!(
        rows(&flowmon(&[
            "flows",
            "--pcap",
            h2s.to_str().unwrap(),
            "--json",
            "--filter",
            "rst.count > 0 and fin.count = 0"
        ]))
        .is_empty()
    );
    // RST without any connection: the six refused attempts in pop3.pcap...
    let pop3 = trace("pop3/pop3.pcap");
    let r = rows(&flowmon(&[
        "flows",
        "--pcap",
        pop3.to_str().unwrap(),
        "--json",
        "--filter",
        "rst.count > 0 and ct.count = 0",
        "--sort",
        "first_seen:asc",
    ]));
    let got: Vec<(u64, &str)> = r
        .iter()
        .map(|r| {
            (
                r["client.port"].as_u64().unwrap(),
                r["close"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (26242, "refused"),
            (26242, "refused"),
            (26242, "refused"),
            (26245, "refused"),
            (26245, "refused"),
            (26245, "refused")
        ]
    );
    // ...and the lone midstream RST of single-rst.pcap.
    let single = trace("tcp/single-rst.pcap");
    let r = rows(&flowmon(&[
        "flows",
        "--pcap",
        single.to_str().unwrap(),
        "--json",
        "--filter",
        "rst.count > 0 and ct.count = 0",
    ]));
    assert_eq!(
        pick(&r, &["close", "closed_by", "direction_guessed", "ct.count"]),
        json!([["orphan-rst", "client", true, 0]])
    );
}

#[test]
fn top_conversations_and_diagnose_on_a_capture() {
    let pop3 = trace("pop3/pop3.pcap");
    let p = pop3.to_str().unwrap();
    let r = rows(&flowmon(&["top", "servers", "--pcap", p, "--json"]));
    assert_eq!(
        pick(
            &r,
            &[
                "server.ip",
                "conns",
                "ct.count",
                "syn.count",
                "rst.count.srv",
                "rst.per_conn",
                "close.refused",
                "close.fin"
            ]
        ),
        json!([
            ["212.227.15.171", 3, 0, 3, 3, 1.0, 3, 0],
            ["212.227.15.188", 3, 0, 3, 3, 1.0, 3, 0],
            ["212.227.15.166", 5, 5, 6, 0, 0.0, 0, 5],
        ]),
        "servers sorted by server RST"
    );
    // A row filter (a view field) and a connection filter.
    let r = rows(&flowmon(&[
        "top",
        "servers",
        "--pcap",
        p,
        "--json",
        "--filter",
        "rst.per_conn >= 1 and server.ip in 212.227.15.171/32",
    ]));
    assert_eq!(r.len(), 1);
    let r = rows(&flowmon(&[
        "top",
        "clients",
        "--pcap",
        p,
        "--json",
        "--filter",
        "close = fin",
    ]));
    assert_eq!(
        pick(&r, &["client.ip", "conns", "fin.count.clt", "syn.per_conn"]),
        json!([["192.168.0.4", 5, 5, 1.2]])
    );
    let r = rows(&flowmon(&[
        "conversations",
        "--pcap",
        p,
        "--json",
        "--server",
        "212.227.15.166",
    ]));
    assert_eq!(
        pick(
            &r,
            &["client.ip", "server.ip", "server.port", "app", "conns"]
        ),
        json!([["192.168.0.4", "212.227.15.166", 110, "pop3", 5]])
    );
    let r = rows(&flowmon(&["diagnose", "--pcap", p, "--json"]));
    assert_eq!(
        pick(
            &r,
            &["severity", "kind", "server.ip", "server.port", "conns"]
        ),
        json!([
            ["warning", "refused", "212.227.15.171", 110, 3],
            ["warning", "refused", "212.227.15.188", 110, 3],
        ])
    );
    assert_eq!(
        r[0]["summary"],
        "212.227.15.171:110 (pop3) refused 3 of 3 connection attempts from 192.168.0.4"
    );
    let single = trace("tcp/single-rst.pcap");
    let r = rows(&flowmon(&[
        "diagnose",
        "--pcap",
        single.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(
        pick(&r, &["kind", "server.ip", "server.port"]),
        json!([["orphan-rst", "10.0.0.80", 80]])
    );
}

#[test]
fn bad_filters_and_sorts_are_usage_errors_with_a_caret() {
    let pop3 = trace("pop3/pop3.pcap");
    let out = flowmon(&[
        "flows",
        "--pcap",
        pop3.to_str().unwrap(),
        "--filter",
        "rst.count > 0 and fin.cnt = 0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "flowmon: invalid filter: unknown field `fin.cnt`: did you mean fin.count? at position 19\n  rst.count > 0 and fin.cnt = 0\n                    ^\n"
    );
    let out = flowmon(&[
        "top",
        "servers",
        "--pcap",
        pop3.to_str().unwrap(),
        "--filter",
        "conns > 1 and close = fin",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "the filter mixes connection fields (close) with fields of this view (conns)"
        )
    );
    let out = flowmon(&["flows", "--pcap", pop3.to_str().unwrap(), "--sort", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot sort by `nope`"));
}

#[test]
fn no_agent_says_how_to_start_one() {
    let out = flowmon(&[
        "top",
        "servers",
        "--socket",
        "/tmp/flowmon-test-nobody-here.sock",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "flowmon: no flowmon agent is listening on /tmp/flowmon-test-nobody-here.sock: start one with `flowmon run` (as root), or query a capture with --pcap FILE\n"
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn live_views_from_the_agent() {
    let pair = Pair::new();
    let sock = format!("/tmp/{}-api.sock", pair.clt_ns);
    let agent = Agent::quick(&pair, &sock, &["--no-history"]);
    let srv = pair.srv_v4;
    let Mix {
        graceful,
        abort,
        refused,
    } = mixed_traffic(&pair, 8080);
    let query = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--socket", &sock, "--json"]);
        rows(&flowmon(&a))
    };
    // Wait until every connection has been finalised (linger 200 ms).
    let mut all = Vec::new();
    for _ in 0..50 {
        all = query(&["flows"]);
        if all.len() == 5
            && all
                .iter()
                .all(|r| r["close"] != "open" && r["close"] != "connecting")
        {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(all.len(), 5, "{all:?}");
    let ports = |rows: &[Value]| {
        let mut p: Vec<u64> = rows
            .iter()
            .map(|r| r["client.port"].as_u64().unwrap())
            .collect();
        p.sort();
        p
    };
    let sorted = |mut v: Vec<u16>| {
        v.sort();
        v.into_iter().map(u64::from).collect::<Vec<_>>()
    };
    let rst_no_fin = query(&["flows", "--filter", "rst.count > 0 and fin.count = 0"]);
    assert_eq!(
        ports(&rst_no_fin),
        sorted(vec![abort, refused[0], refused[1]])
    );
    let rst_no_conn = query(&["flows", "--filter", "rst.count > 0 and ct.count = 0"]);
    assert_eq!(ports(&rst_no_conn), sorted(refused.clone()));
    assert!(
        rst_no_conn
            .iter()
            .all(|r| r["close"] == "refused" && r["closed_by"] == "server")
    );
    let fin = query(&["flows", "--filter", "close = fin"]);
    assert_eq!(ports(&fin), sorted(graceful.clone()));
    let top = query(&["top", "servers"]);
    assert_eq!(
        pick(
            &top,
            &[
                "server.ip",
                "conns",
                "ct.count",
                "syn.count",
                "fin.count.clt",
                "fin.count.srv",
                "rst.count.clt",
                "rst.count.srv",
                "close.fin",
                "close.rst",
                "close.refused"
            ]
        ),
        json!([[srv.to_string(), 5, 3, 5, 2, 2, 1, 2, 2, 1, 2]])
    );
    let clt: IpAddr = pair.clt_v4;
    let conv = query(&[
        "conversations",
        "--client",
        &clt.to_string(),
        "--sort",
        "server.port:asc",
    ]);
    assert_eq!(
        pick(&conv, &["server.port", "app", "conns", "rst.per_conn"]),
        json!([[9, "discard", 2, 1.0], [8080, "http-alt", 3, 1.0 / 3.0]])
    );
    let diag = query(&["diagnose"]);
    assert_eq!(
        pick(&diag, &["severity", "kind", "server.port", "conns"]),
        json!([["warning", "refused", 9, 2]])
    );
    // A bad filter through the API: the same message and exit code as locally.
    let out = flowmon(&["flows", "--socket", &sock, "--filter", "rst.count >"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "expected a number after the operator at position 12\n  rst.count >\n             ^"
    ));
    // The socket is root-only.
    let mode = std::fs::metadata(&sock)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600);
    agent.stop();
    assert!(!Path::new(&sock).exists(), "the agent removes its socket");
}
