//! Renders a view's rows as an aligned table: counts right-aligned and
//! shortened (12.3k), ratios with two decimals, times as UTC time of day;
//! with color, a bold header and RST and refusal figures in red.

use std::fmt::Write as _;

use serde_json::Value;

use crate::{
    record::clock_time,
    views::{Kind, Response},
};

const BOLD: &str = "\x1b[1m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const RESET: &str = "\x1b[0m";

/// 1234 -> "1234", 12345 -> "12.3k", 4_500_000 -> "4.5M".
pub fn count(n: f64) -> String {
    match n {
        n if n < 10_000.0 => format!("{n}"),
        n if n < 1e6 => format!("{:.1}k", n / 1e3),
        n if n < 1e9 => format!("{:.1}M", n / 1e6),
        n => format!("{:.1}G", n / 1e9),
    }
}

fn cell(v: &Value, kind: Kind) -> String {
    match (kind, v) {
        (_, Value::Null) => "-".into(),
        (Kind::Count, Value::Number(n)) => count(n.as_f64().unwrap_or(0.0)),
        (Kind::Ratio, Value::Number(n)) => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
        (Kind::Time, Value::Number(n)) => clock_time(n.as_f64().unwrap_or(0.0)),
        (_, Value::String(s)) => s.clone(),
        (_, Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), String::from))
            .collect::<Vec<_>>()
            .join(", "),
        (_, other) => other.to_string(),
    }
}

/// Whether a cell deserves attention: a non-zero RST figure, a refusal or
/// abort class, a warning.
fn alarming(key: &str, v: &Value) -> bool {
    let nonzero = v.as_f64().is_some_and(|n| n > 0.0);
    (key.starts_with("rst.") && nonzero)
        || matches!(
            v.as_str(),
            Some("refused" | "unanswered" | "rst" | "fin-rst" | "orphan-rst" | "warning")
        )
}

/// The table; `color` adds ANSI colors.
pub fn table(resp: &Response, color: bool) -> String {
    let cols = &resp.columns;
    let cells: Vec<Vec<String>> = resp
        .rows
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| cell(&r[c.key.as_str()], c.kind))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.title.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let right = |k: Kind| matches!(k, Kind::Count | Kind::Ratio);
    let mut out = String::new();
    let last = cols.len().saturating_sub(1);
    let mut line = String::new();
    for (i, c) in cols.iter().enumerate() {
        let w = widths[i];
        let t = if right(c.kind) {
            format!("{:>w$}", c.title)
        } else if i == last {
            c.title.clone()
        } else {
            format!("{:<w$}", c.title)
        };
        line.push_str(&t);
        if i != last {
            line.push_str("  ");
        }
    }
    if color {
        let _ = writeln!(out, "{BOLD}{line}{RESET}");
    } else {
        let _ = writeln!(out, "{}", line.trim_end());
    }
    for (row, r) in cells.iter().zip(&resp.rows) {
        let mut line = String::new();
        for (i, c) in cols.iter().enumerate() {
            let w = widths[i];
            let text = if right(c.kind) {
                format!("{:>w$}", row[i])
            } else if i == last {
                row[i].clone()
            } else {
                format!("{:<w$}", row[i])
            };
            let v = &r[c.key.as_str()];
            if color && alarming(&c.key, v) {
                let hue = if v.as_str() == Some("warning") {
                    YELLOW
                } else {
                    RED
                };
                let _ = write!(line, "{hue}{text}{RESET}");
            } else {
                line.push_str(&text);
            }
            if i != last {
                line.push_str("  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::views::Column;

    #[test]
    fn readable_numbers() {
        assert_eq!(
            (
                count(7.0),
                count(9999.0),
                count(12_345.0),
                count(4_500_000.0)
            ),
            ("7".into(), "9999".into(), "12.3k".into(), "4.5M".into())
        );
    }

    #[test]
    fn aligned_table() {
        let resp = Response {
            columns: vec![
                Column {
                    key: "server.ip".into(),
                    title: "server".into(),
                    kind: Kind::Text,
                },
                Column {
                    key: "conns".into(),
                    title: "conns".into(),
                    kind: Kind::Count,
                },
                Column {
                    key: "rst.per_conn".into(),
                    title: "RST/conn".into(),
                    kind: Kind::Ratio,
                },
                Column {
                    key: "closes".into(),
                    title: "closes".into(),
                    kind: Kind::Text,
                },
            ],
            rows: vec![
                json!({"server.ip": "10.0.0.1", "conns": 12345, "rst.per_conn": 1.0, "closes": "refused 3"}),
                json!({"server.ip": "fd00::1", "conns": 5, "rst.per_conn": 0, "closes": "fin 5"}),
            ],
        };
        assert_eq!(
            table(&resp, false),
            "server    conns  RST/conn  closes\n10.0.0.1  12.3k      1.00  refused 3\nfd00::1       5      0.00  fin 5\n"
        );
        let colored = table(&resp, true);
        assert!(colored.starts_with("\x1b[1mserver"));
        assert!(colored.contains("\x1b[31m    1.00\x1b[0m"), "{colored:?}");
    }
}
