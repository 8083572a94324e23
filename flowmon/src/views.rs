//! The query views: `flows`, `top clients|servers`, `conversations` and
//! `diagnose`, as pure functions from connection records to rows. A row is a
//! flat JSON object keyed by field names, so one filter language serves
//! connections and view rows alike, `--json` prints rows as they are, and the
//! agent's API answers with the very same rows.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    aggregate::{GroupBy, aggregate},
    close::Close,
    diagnose,
    filter::{CONN_FIELDS, Expr, FilterError, Type},
    record::ConnRecord,
    services::Services,
};

/// Which view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum View {
    Flows,
    TopClients,
    TopServers,
    Conversations,
    Diagnose,
    /// The agent's own health (`flowmon::status`), not a view of connections.
    Status,
}

/// A query: what the CLI sends to the agent, and what it runs itself on a capture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub view: View,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// `FIELD`, `FIELD:asc` or `FIELD:desc` (numbers sort descending by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<IpAddr>,
    /// Only connections seen in the last this many seconds, finished ones
    /// read from the history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<f64>,
}

impl Request {
    pub fn new(view: View) -> Self {
        Self {
            view,
            filter: None,
            sort: None,
            limit: None,
            client: None,
            server: None,
            since: None,
        }
    }
}

/// How a column prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A count: right-aligned, 1.2k above 9999.
    Count,
    /// A ratio: two decimals.
    Ratio,
    /// An address, endpoint or word.
    Text,
    /// Unix seconds, printed as UTC time of day.
    Time,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub key: String,
    pub title: String,
    pub kind: Kind,
}

/// A view's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub columns: Vec<Column>,
    pub rows: Vec<Value>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ViewError {
    #[error("{}", .error.render(.text))]
    Filter { text: String, error: FilterError },
    #[error("cannot sort by `{field}`: it is not a field of this view (fields: {known})")]
    Sort { field: String, known: String },
    #[error(
        "the filter mixes connection fields ({conn}) with fields of this view ({row}): filter connections or rows, not both"
    )]
    Mixed { conn: String, row: String },
    #[error("status describes a running agent: there is none for a capture")]
    AgentOnly,
}

fn col(key: &str, title: &str, kind: Kind) -> Column {
    Column {
        key: key.into(),
        title: title.into(),
        kind,
    }
}

/// Fields of the `top` and `conversations` rows.
pub const ROW_FIELDS: &[(&str, Type)] = &[
    ("client.ip", Type::Ip),
    ("server.ip", Type::Ip),
    ("server.port", Type::Number),
    ("app", Type::Text),
    ("conns", Type::Number),
    ("ct.count", Type::Number),
    ("syn.count", Type::Number),
    ("syn.per_conn", Type::Number),
    ("fin.count.clt", Type::Number),
    ("fin.count.srv", Type::Number),
    ("rst.count.clt", Type::Number),
    ("rst.count.srv", Type::Number),
    ("rst.per_conn", Type::Number),
    ("rst.per_conn.clt", Type::Number),
    ("rst.per_conn.srv", Type::Number),
    ("close.fin", Type::Number),
    ("close.fin-rst", Type::Number),
    ("close.rst", Type::Number),
    ("close.refused", Type::Number),
    ("close.unanswered", Type::Number),
    ("close.half-closed", Type::Number),
    ("close.open", Type::Number),
    ("close.idle", Type::Number),
    ("close.connecting", Type::Number),
    ("close.orphan-rst", Type::Number),
];

/// Runs `req` over `records`.
pub fn run(
    req: &Request,
    records: &[ConnRecord],
    services: &Services,
) -> Result<Response, ViewError> {
    match req.view {
        View::Flows => flows(req, records),
        View::TopClients => grouped(req, records, GroupBy::Client, services),
        View::TopServers => grouped(req, records, GroupBy::Server, services),
        View::Conversations => grouped(req, records, GroupBy::Conversation, services),
        View::Diagnose => {
            let kept = filter_records(req, records)?;
            Ok(diagnose::findings(&kept, services))
        }
        View::Status => Err(ViewError::AgentOnly),
    }
}

fn parse(text: &str, fields: &[(&str, Type)]) -> Result<Expr, ViewError> {
    Expr::parse(text, fields).map_err(|error| ViewError::Filter {
        text: text.into(),
        error,
    })
}

/// Whether `r` passes the request's `client` and `server` address options.
fn keep_by_ip(req: &Request, r: &ConnRecord) -> bool {
    req.client.is_none_or(|c| r.conn.client().0 == c)
        && req.server.is_none_or(|s| r.conn.server().0 == s)
}

fn filter_records<'a>(
    req: &Request,
    records: &'a [ConnRecord],
) -> Result<Vec<&'a ConnRecord>, ViewError> {
    let expr = req
        .filter
        .as_deref()
        .map(|f| parse(f, CONN_FIELDS))
        .transpose()?;
    Ok(records
        .iter()
        .filter(|r| keep_by_ip(req, r) && expr.as_ref().is_none_or(|e| e.matches(&r.to_json())))
        .collect())
}

fn flows(req: &Request, records: &[ConnRecord]) -> Result<Response, ViewError> {
    let kept = filter_records(req, records)?;
    let mut rows: Vec<Value> = kept.iter().map(|r| r.to_json()).collect();
    sort_rows(
        &mut rows,
        req.sort.as_deref().unwrap_or("last_seen"),
        CONN_FIELDS,
    )?;
    truncate(&mut rows, req.limit);
    let columns = vec![
        col("last_seen", "last seen", Kind::Time),
        col("client", "client", Kind::Text),
        col("server", "server", Kind::Text),
        col("iface", "iface", Kind::Text),
        col("pkts.clt", "pkts clt", Kind::Count),
        col("pkts.srv", "pkts srv", Kind::Count),
        col("syn.count", "SYN", Kind::Count),
        col("fin.count.clt", "FIN clt", Kind::Count),
        col("fin.count.srv", "FIN srv", Kind::Count),
        col("rst.count.clt", "RST clt", Kind::Count),
        col("rst.count.srv", "RST srv", Kind::Count),
        col("ct.count", "ct", Kind::Count),
        col("close", "close", Kind::Text),
        col("closed_by", "by", Kind::Text),
        col("conn_state", "state", Kind::Text),
        col("history", "history", Kind::Text),
    ];
    for r in &mut rows {
        r["client"] = json!(endpoint(&r["client.ip"], &r["client.port"]));
        r["server"] = json!(endpoint(&r["server.ip"], &r["server.port"]));
    }
    Ok(Response { columns, rows })
}

fn endpoint(ip: &Value, port: &Value) -> String {
    let ip = ip.as_str().unwrap_or("?");
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn grouped(
    req: &Request,
    records: &[ConnRecord],
    by: GroupBy,
    services: &Services,
) -> Result<Response, ViewError> {
    // A filter on connection fields selects connections before grouping; one
    // that uses a view field (conns, rst.per_conn, close.refused, ...)
    // selects rows after it.
    let (conn_filter, row_filter) = match req.filter.as_deref() {
        None => (None, None),
        Some(text) => {
            let all: Vec<(&str, Type)> = CONN_FIELDS.iter().chain(ROW_FIELDS).copied().collect();
            let e = parse(text, &all)?;
            let used = e.fields();
            let conn_only: Vec<&str> = used
                .iter()
                .copied()
                .filter(|f| !ROW_FIELDS.iter().any(|(r, _)| r == f))
                .collect();
            let row_only: Vec<&str> = used
                .iter()
                .copied()
                .filter(|f| !CONN_FIELDS.iter().any(|(c, _)| c == f))
                .collect();
            match (conn_only.is_empty(), row_only.is_empty()) {
                (_, true) => (Some(e), None),
                (true, false) => (None, Some(e)),
                (false, false) => {
                    return Err(ViewError::Mixed {
                        conn: conn_only.join(", "),
                        row: row_only.join(", "),
                    });
                }
            }
        }
    };
    let kept: Vec<ConnRecord> = records
        .iter()
        .filter(|r| keep_by_ip(req, r))
        .filter(|r| conn_filter.as_ref().is_none_or(|e| e.matches(&r.to_json())))
        .cloned()
        .collect();
    let mut rows: Vec<Value> = aggregate(&kept, by)
        .iter()
        .map(|(g, m)| {
            let mut v = m.to_json(g, by);
            if let Some(p) = g.port {
                v["app"] = json!(services.name(p).unwrap_or("-"));
            }
            v["closes"] = json!(close_mix(&v));
            v
        })
        .filter(|v| row_filter.as_ref().is_none_or(|e| e.matches(v)))
        .collect();
    let default_sort = match by {
        GroupBy::Server => "rst.count.srv",
        _ => "conns",
    };
    sort_rows(
        &mut rows,
        req.sort.as_deref().unwrap_or(default_sort),
        ROW_FIELDS,
    )?;
    truncate(&mut rows, req.limit);
    let mut columns = match by {
        GroupBy::Client => vec![col("client.ip", "client", Kind::Text)],
        GroupBy::Server => vec![col("server.ip", "server", Kind::Text)],
        GroupBy::ServerPort | GroupBy::Conversation => vec![
            col("client.ip", "client", Kind::Text),
            col("server.ip", "server", Kind::Text),
            col("server.port", "port", Kind::Count),
            col("app", "app", Kind::Text),
        ],
    };
    columns.extend([
        col("conns", "conns", Kind::Count),
        col("ct.count", "ct", Kind::Count),
        col("syn.count", "SYN", Kind::Count),
        col("syn.per_conn", "SYN/conn", Kind::Ratio),
        col("fin.count.clt", "FIN clt", Kind::Count),
        col("fin.count.srv", "FIN srv", Kind::Count),
        col("rst.count.clt", "RST clt", Kind::Count),
        col("rst.count.srv", "RST srv", Kind::Count),
        col("rst.per_conn", "RST/conn", Kind::Ratio),
        col("closes", "closes", Kind::Text),
    ]);
    Ok(Response { columns, rows })
}

/// "refused 3, fin 2": the close classes of a row, most frequent first.
fn close_mix(row: &Value) -> String {
    let mut mix: Vec<(u64, &str)> = Close::ALL
        .iter()
        .map(|c| {
            (
                row[format!("close.{}", c.as_str())].as_u64().unwrap_or(0),
                c.as_str(),
            )
        })
        .filter(|(n, _)| *n > 0)
        .collect();
    mix.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    mix.iter()
        .map(|(n, c)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn sort_rows(rows: &mut [Value], spec: &str, fields: &[(&str, Type)]) -> Result<(), ViewError> {
    let (field, dir) = match spec.rsplit_once(':') {
        Some((f, d @ ("asc" | "desc"))) => (f, Some(d == "asc")),
        _ => (spec, None),
    };
    let Some(&(_, ty)) = fields.iter().find(|(f, _)| *f == field) else {
        return Err(ViewError::Sort {
            field: field.into(),
            known: fields
                .iter()
                .map(|(f, _)| *f)
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let asc = dir.unwrap_or(ty != Type::Number);
    rows.sort_by(|a, b| {
        let ord = match ty {
            Type::Number => a[field]
                .as_f64()
                .unwrap_or(0.0)
                .total_cmp(&b[field].as_f64().unwrap_or(0.0)),
            Type::Ip => {
                let ip = |v: &Value| v.as_str().and_then(|s| s.parse::<IpAddr>().ok());
                ip(&a[field]).cmp(&ip(&b[field]))
            }
            _ => a[field].as_str().cmp(&b[field].as_str()),
        };
        if asc { ord } else { ord.reverse() }
    });
    Ok(())
}

fn truncate(rows: &mut Vec<Value>, limit: Option<usize>) {
    if let Some(n) = limit {
        rows.truncate(n);
    }
}
