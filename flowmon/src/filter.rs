//! The filter language shared by every query command:
//! `rst.count > 0 and fin.count = 0`, `client.ip in 10.0.0.0/8`,
//! `server.port in (80, 443)`, `close = "refused"`, `not (ct.count > 0)`.
//!
//! Comparisons `= != < <= > >=` (`==` too), `in` with CIDR blocks and sets,
//! `and`, `or`, `not`, parentheses; `not` binds tightest, then `and`, then
//! `or`. Fields are checked at parse time against the fields of the view being
//! filtered, with their types, so a mistake is reported with its position
//! before anything runs. A filter evaluates over a flat JSON object whose keys
//! are the field names: connection records and view rows alike.

use std::{fmt, net::IpAddr};

use serde_json::Value;

/// The type of a field's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Number,
    Ip,
    Text,
    Bool,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Number => "a number",
            Type::Ip => "an IP address",
            Type::Text => "a string",
            Type::Bool => "true or false",
        }
    }
}

/// A filter that failed to parse: where, and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} at position {}", .pos + 1)]
pub struct FilterError {
    /// Byte offset of the mistake in the filter text.
    pub pos: usize,
    pub message: String,
}

impl FilterError {
    /// The filter text with a caret under the mistake, then the message.
    pub fn render(&self, text: &str) -> String {
        let col = text[..self.pos.min(text.len())].chars().count();
        format!("invalid filter: {}\n  {text}\n  {}^", self, " ".repeat(col))
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
    End,
}

fn lex(text: &str) -> Result<Vec<(usize, Tok)>, FilterError> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let tok = match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'(' => {
                i += 1;
                Tok::LParen
            }
            b')' => {
                i += 1;
                Tok::RParen
            }
            b',' => {
                i += 1;
                Tok::Comma
            }
            b'"' | b'\'' => {
                let end = text[i + 1..].find(c as char).ok_or(FilterError {
                    pos: i,
                    message: "unterminated string: add the closing quote".into(),
                })?;
                let s = text[i + 1..i + 1 + end].to_string();
                i += end + 2;
                Tok::Str(s)
            }
            b'=' | b'!' | b'<' | b'>' => {
                let two = text.get(i..i + 2).unwrap_or("");
                let op = match two {
                    "==" => "=",
                    "!=" => "!=",
                    "<=" => "<=",
                    ">=" => ">=",
                    _ => match c {
                        b'=' => "=",
                        b'<' => "<",
                        b'>' => ">",
                        _ => {
                            return Err(FilterError {
                                pos: i,
                                message: "expected != (a lone ! is not an operator; use `not`)"
                                    .into(),
                            });
                        }
                    },
                };
                i += if matches!(two, "==" | "!=" | "<=" | ">=") {
                    2
                } else {
                    1
                };
                Tok::Op(op)
            }
            c if c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'/' | b'-') => {
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || matches!(b[i], b'.' | b'_' | b':' | b'/' | b'-'))
                {
                    i += 1;
                }
                Tok::Word(text[start..i].to_string())
            }
            _ => {
                return Err(FilterError {
                    pos: i,
                    message: format!(
                        "unexpected character {:?}",
                        text[i..].chars().next().unwrap_or(' ')
                    ),
                });
            }
        };
        out.push((start, tok));
    }
    out.push((text.len(), Tok::End));
    Ok(out)
}

/// A literal value in a filter.
#[derive(Clone, Debug, PartialEq)]
pub enum Lit {
    Number(f64),
    Ip(IpAddr),
    Cidr(IpAddr, u8),
    Text(String),
    Bool(bool),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A parsed filter.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Cmp(String, Cmp, Lit),
    In(String, Vec<Lit>),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// The fields a view offers, with their types.
pub type Fields<'a> = &'a [(&'a str, Type)];

/// Every field of a connection record.
pub const CONN_FIELDS: &[(&str, Type)] = &[
    ("client.ip", Type::Ip),
    ("client.port", Type::Number),
    ("server.ip", Type::Ip),
    ("server.port", Type::Number),
    ("iface", Type::Text),
    ("vlan", Type::Number),
    ("first_seen", Type::Number),
    ("last_seen", Type::Number),
    ("duration", Type::Number),
    ("pkts.clt", Type::Number),
    ("pkts.srv", Type::Number),
    ("bytes.clt", Type::Number),
    ("bytes.srv", Type::Number),
    ("syn.count", Type::Number),
    ("syn.count.clt", Type::Number),
    ("syn.count.srv", Type::Number),
    ("synack.count", Type::Number),
    ("synack.count.clt", Type::Number),
    ("synack.count.srv", Type::Number),
    ("fin.count", Type::Number),
    ("fin.count.clt", Type::Number),
    ("fin.count.srv", Type::Number),
    ("rst.count", Type::Number),
    ("rst.count.clt", Type::Number),
    ("rst.count.srv", Type::Number),
    ("data_pkts.clt", Type::Number),
    ("data_pkts.srv", Type::Number),
    ("ct.count", Type::Number),
    ("close", Type::Text),
    ("closed_by", Type::Text),
    ("direction_guessed", Type::Bool),
    ("conn_state", Type::Text),
    ("history", Type::Text),
];

struct Parser<'a> {
    toks: Vec<(usize, Tok)>,
    i: usize,
    fields: Fields<'a>,
}

impl Expr {
    /// Parses `text`, checking every field against `fields`.
    pub fn parse(text: &str, fields: Fields<'_>) -> Result<Expr, FilterError> {
        let mut p = Parser {
            toks: lex(text)?,
            i: 0,
            fields,
        };
        if matches!(p.peek(), Tok::End) {
            return Err(FilterError {
                pos: 0,
                message: "empty filter: expected a comparison such as `rst.count > 0`".into(),
            });
        }
        let e = p.or()?;
        match p.peek() {
            Tok::End => Ok(e),
            Tok::RParen => Err(p.err("unmatched `)`")),
            _ => Err(p.err("expected `and`, `or` or the end of the filter")),
        }
    }

    /// The field names this filter uses.
    pub fn fields(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Expr::Cmp(f, ..) | Expr::In(f, _) => out.push(f),
            Expr::Not(e) => e.collect(out),
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.collect(out);
                b.collect(out);
            }
        }
    }

    /// Whether `obj` (a flat JSON object keyed by field name) matches.
    pub fn matches(&self, obj: &Value) -> bool {
        match self {
            Expr::And(a, b) => a.matches(obj) && b.matches(obj),
            Expr::Or(a, b) => a.matches(obj) || b.matches(obj),
            Expr::Not(e) => !e.matches(obj),
            Expr::In(f, set) => set.iter().any(|l| compare(&obj[f.as_str()], Cmp::Eq, l)),
            Expr::Cmp(f, op, l) => compare(&obj[f.as_str()], *op, l),
        }
    }
}

fn compare(v: &Value, op: Cmp, lit: &Lit) -> bool {
    let ord = match (v, lit) {
        (Value::Number(n), Lit::Number(x)) => n.as_f64().and_then(|n| n.partial_cmp(x)),
        (Value::Bool(b), Lit::Bool(x)) => Some(b.cmp(x)),
        (Value::String(s), Lit::Text(x)) => Some(s.as_str().cmp(x.as_str())),
        (Value::String(s), Lit::Ip(x)) => s.parse::<IpAddr>().ok().map(|ip| ip.cmp(x)),
        (Value::String(s), Lit::Cidr(net, len)) => {
            let inside = s.parse::<IpAddr>().is_ok_and(|ip| in_cidr(ip, *net, *len));
            return match op {
                Cmp::Eq => inside,
                Cmp::Ne => !inside,
                _ => false,
            };
        }
        _ => None,
    };
    let Some(ord) = ord else { return op == Cmp::Ne };
    match op {
        Cmp::Eq => ord.is_eq(),
        Cmp::Ne => ord.is_ne(),
        Cmp::Lt => ord.is_lt(),
        Cmp::Le => ord.is_le(),
        Cmp::Gt => ord.is_gt(),
        Cmp::Ge => ord.is_ge(),
    }
}

/// Whether `ip` lies in `net/len` (IPv4-mapped IPv6 addresses count as IPv4).
pub fn in_cidr(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    let canon = |a: IpAddr| match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    };
    match (canon(ip), canon(net)) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        &self.toks[self.i].1
    }

    fn pos(&self) -> usize {
        self.toks[self.i].0
    }

    fn err(&self, message: impl Into<String>) -> FilterError {
        FilterError {
            pos: self.pos(),
            message: message.into(),
        }
    }

    fn keyword(&self, k: &str) -> bool {
        matches!(self.peek(), Tok::Word(w) if w.eq_ignore_ascii_case(k))
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        let mut e = self.and()?;
        while self.keyword("or") {
            self.i += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut e = self.not()?;
        while self.keyword("and") {
            self.i += 1;
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }

    fn not(&mut self) -> Result<Expr, FilterError> {
        if self.keyword("not") {
            self.i += 1;
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, FilterError> {
        match self.peek().clone() {
            Tok::LParen => {
                self.i += 1;
                let e = self.or()?;
                if *self.peek() != Tok::RParen {
                    return Err(self.err("expected `)` to close the parenthesis"));
                }
                self.i += 1;
                Ok(e)
            }
            Tok::Word(w)
                if !["and", "or", "in"]
                    .iter()
                    .any(|k| w.eq_ignore_ascii_case(k)) =>
            {
                self.comparison(w)
            }
            Tok::End => Err(self
                .err("the filter ends too early: expected a comparison such as `rst.count > 0`")),
            _ => Err(self.err("expected a field name such as `rst.count`, `not` or `(`")),
        }
    }

    fn field_type(&self, name: &str) -> Result<Type, FilterError> {
        if let Some((_, t)) = self.fields.iter().find(|(f, _)| *f == name) {
            return Ok(*t);
        }
        let close: Vec<&str> = self
            .fields
            .iter()
            .map(|(f, _)| *f)
            .filter(|f| similar(f, name))
            .collect();
        let hint = if close.is_empty() {
            format!(
                "known fields: {}",
                self.fields
                    .iter()
                    .map(|(f, _)| *f)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!("did you mean {}?", close.join(" or "))
        };
        Err(self.err(format!("unknown field `{name}`: {hint}")))
    }

    fn comparison(&mut self, field: String) -> Result<Expr, FilterError> {
        let ty = self.field_type(&field)?;
        self.i += 1;
        if self.keyword("in") {
            self.i += 1;
            return self.in_set(field, ty);
        }
        if self.keyword("not")
            && matches!(&self.toks[self.i + 1].1, Tok::Word(w) if w.eq_ignore_ascii_case("in"))
        {
            self.i += 2;
            return Ok(Expr::Not(Box::new(self.in_set(field, ty)?)));
        }
        let op = match self.peek() {
            Tok::Op(op) => match *op {
                "=" => Cmp::Eq,
                "!=" => Cmp::Ne,
                "<" => Cmp::Lt,
                "<=" => Cmp::Le,
                ">" => Cmp::Gt,
                _ => Cmp::Ge,
            },
            _ => {
                return Err(self.err(format!(
                    "expected an operator (= != < <= > >= in) after `{field}`"
                )));
            }
        };
        if !matches!(ty, Type::Number) && !matches!(op, Cmp::Eq | Cmp::Ne) && ty != Type::Ip {
            return Err(self.err(format!(
                "`{field}` is {}: only = and != compare it",
                ty.name()
            )));
        }
        self.i += 1;
        let at = self.pos();
        let lit = self.literal(&field, ty)?;
        if matches!(lit, Lit::Cidr(..)) && !matches!(op, Cmp::Eq | Cmp::Ne) {
            return Err(FilterError {
                pos: at,
                message: "a CIDR block takes `in`, = or !=".into(),
            });
        }
        Ok(Expr::Cmp(field, op, lit))
    }

    fn in_set(&mut self, field: String, ty: Type) -> Result<Expr, FilterError> {
        if *self.peek() != Tok::LParen {
            // A single CIDR block or value: `client.ip in 10.0.0.0/8`.
            let lit = self.literal(&field, ty)?;
            return Ok(Expr::In(field, vec![lit]));
        }
        self.i += 1;
        let mut set = Vec::new();
        loop {
            set.push(self.literal(&field, ty)?);
            match self.peek() {
                Tok::Comma => self.i += 1,
                Tok::RParen => {
                    self.i += 1;
                    return Ok(Expr::In(field, set));
                }
                _ => return Err(self.err("expected `,` or `)` in the set")),
            }
        }
    }

    fn literal(&mut self, field: &str, ty: Type) -> Result<Lit, FilterError> {
        let (pos, tok) = self.toks[self.i].clone();
        let bad = |what: &str| FilterError {
            pos,
            message: format!("`{field}` is {}, but {what} is not", ty.name()),
        };
        let lit = match (ty, &tok) {
            (_, Tok::End) => {
                return Err(FilterError {
                    pos,
                    message: format!("expected {} after the operator", ty.name()),
                });
            }
            (Type::Number, Tok::Word(w)) => {
                Lit::Number(w.parse().map_err(|_| bad(&format!("`{w}`")))?)
            }
            (Type::Ip, Tok::Word(w) | Tok::Str(w)) => match w.split_once('/') {
                Some((net, len)) => {
                    let net: IpAddr = net.parse().map_err(|_| bad(&format!("`{w}`")))?;
                    let max = if net.is_ipv4() { 32 } else { 128 };
                    let len: u8 = len.parse().ok().filter(|l| *l <= max).ok_or(FilterError {
                        pos,
                        message: format!("prefix length must be 0 to {max}"),
                    })?;
                    Lit::Cidr(net, len)
                }
                None => Lit::Ip(w.parse().map_err(|_| bad(&format!("`{w}`")))?),
            },
            (Type::Text, Tok::Word(w) | Tok::Str(w)) => Lit::Text(w.clone()),
            (Type::Bool, Tok::Word(w)) if w.eq_ignore_ascii_case("true") => Lit::Bool(true),
            (Type::Bool, Tok::Word(w)) if w.eq_ignore_ascii_case("false") => Lit::Bool(false),
            (_, Tok::Str(s)) => return Err(bad(&format!("the string \"{s}\""))),
            (_, Tok::Word(w)) => return Err(bad(&format!("`{w}`"))),
            (_, Tok::Op(op)) => {
                return Err(FilterError {
                    pos,
                    message: format!("expected {}, found `{op}`", ty.name()),
                });
            }
            _ => {
                return Err(FilterError {
                    pos,
                    message: format!("expected {} here", ty.name()),
                });
            }
        };
        self.i += 1;
        Ok(lit)
    }
}

/// Loosely alike: within two edits, the same words in another order, or a
/// prefix of each other.
fn similar(known: &str, typed: &str) -> bool {
    let k = known.to_ascii_lowercase();
    let t = typed.to_ascii_lowercase();
    edits(&k, &t) <= 2 || k.starts_with(&t) || t.starts_with(&k) || {
        let parts = |s: &str| {
            let mut v: Vec<String> = s.split(['.', '_']).map(String::from).collect();
            v.sort();
            v
        };
        parts(&k) == parts(&t)
    }
}

/// Levenshtein distance.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

impl fmt::Display for Lit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lit::Number(n) => write!(f, "{n}"),
            Lit::Ip(ip) => write!(f, "{ip}"),
            Lit::Cidr(ip, l) => write!(f, "{ip}/{l}"),
            Lit::Text(s) => write!(f, "{s:?}"),
            Lit::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
