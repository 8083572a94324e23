//! A connection as flowmon reports it: the client/server view, its close
//! class and Zeek's state, rendered as a flat JSON object or a table row.
//! Every field carries its one vocabulary name, shared with the filters.

use std::{collections::HashMap, fmt::Write as _, net::IpAddr};

use serde_json::{Map, Value, json};

use crate::{
    close::{Close, ClosedBy, Timeouts},
    model::Conn,
};

/// A reported connection.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnRecord {
    pub conn: Conn,
    pub iface: String,
    pub close: Close,
    pub closed_by: ClosedBy,
    pub conn_state: &'static str,
    pub history: String,
    /// Unix seconds of the first and last packet.
    pub first_seen: f64,
    pub last_seen: f64,
}

impl ConnRecord {
    /// Classifies `conn` as of `now_ns` (the packets' clock); `offset_ns`
    /// turns that clock into Unix time (0 for capture timestamps).
    pub fn new(conn: Conn, iface: String, now_ns: u64, t: &Timeouts, offset_ns: i128) -> Self {
        let (close, closed_by) = conn.classify(now_ns, t);
        let unix = |ns: u64| (i128::from(ns) + offset_ns) as f64 / 1e9;
        Self {
            first_seen: unix(conn.first_ns()),
            last_seen: unix(conn.last_ns()),
            conn_state: conn.conn_state(),
            history: conn.history(),
            conn,
            iface,
            close,
            closed_by,
        }
    }

    /// The record of a connection the kernel evicted: the class says so,
    /// whatever its last-seen packets looked like.
    pub fn mark_evicted(&mut self) {
        self.close = Close::Evicted;
        self.closed_by = ClosedBy::None;
    }

    /// A record read back from history: the class and times as they were
    /// reported, the rest derived again from the entry.
    pub fn from_parts(
        conn: Conn,
        iface: String,
        close: Close,
        closed_by: ClosedBy,
        first_seen: f64,
        last_seen: f64,
    ) -> Self {
        Self {
            conn_state: conn.conn_state(),
            history: conn.history(),
            conn,
            iface,
            close,
            closed_by,
            first_seen,
            last_seen,
        }
    }

    /// The flat JSON object, keys in the connection vocabulary.
    pub fn to_json(&self) -> Value {
        let c = &self.conn;
        let (cip, cport) = c.client();
        let (sip, sport) = c.server();
        let (clt, srv) = (c.clt(), c.srv());
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("client.ip", json!(cip.to_string()));
        put("client.port", json!(cport));
        put("server.ip", json!(sip.to_string()));
        put("server.port", json!(sport));
        put("iface", json!(self.iface));
        put("vlan", json!(c.key.vlan));
        put("first_seen", json!(self.first_seen));
        put("last_seen", json!(self.last_seen));
        put(
            "duration",
            json!(c.last_ns().saturating_sub(c.first_ns()) as f64 / 1e9),
        );
        put("pkts.clt", json!(clt.packets));
        put("pkts.srv", json!(srv.packets));
        put("bytes.clt", json!(clt.bytes));
        put("bytes.srv", json!(srv.bytes));
        put("syn.count", json!(clt.syn + srv.syn));
        put("syn.count.clt", json!(clt.syn));
        put("syn.count.srv", json!(srv.syn));
        put("synack.count", json!(clt.synack + srv.synack));
        put("synack.count.clt", json!(clt.synack));
        put("synack.count.srv", json!(srv.synack));
        put("fin.count", json!(clt.fin + srv.fin));
        put("fin.count.clt", json!(clt.fin));
        put("fin.count.srv", json!(srv.fin));
        put("rst.count", json!(clt.rst + srv.rst));
        put("rst.count.clt", json!(clt.rst));
        put("rst.count.srv", json!(srv.rst));
        put("data_pkts.clt", json!(clt.data_packets));
        put("data_pkts.srv", json!(srv.data_packets));
        put("ct.count", json!(c.ct_count()));
        put("close", json!(self.close.as_str()));
        put("closed_by", json!(self.closed_by.as_str()));
        put("direction_guessed", json!(c.direction_guessed));
        put("conn_state", json!(self.conn_state));
        put("history", json!(self.history));
        Value::Object(m)
    }
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}:{port}"),
        IpAddr::V6(_) => format!("[{ip}]:{port}"),
    }
}

/// Formats a Unix time as UTC `HH:MM:SS.mmm`.
pub fn clock_time(unix: f64) -> String {
    let ms = (unix * 1e3).round() as u64;
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// Records as an aligned table, one connection per line.
pub fn table(records: &[ConnRecord]) -> String {
    let header = [
        "first_seen",
        "client",
        "",
        "server",
        "iface",
        "pkts c/s",
        "SYN c/s",
        "FIN c/s",
        "RST c/s",
        "ct",
        "close",
        "closed_by",
        "state",
        "history",
    ];
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let c = &r.conn;
            let (cip, cport) = c.client();
            let (sip, sport) = c.server();
            let (clt, srv) = (c.clt(), c.srv());
            vec![
                clock_time(r.first_seen),
                endpoint(cip, cport),
                if c.direction_guessed { "?>" } else { "->" }.to_string(),
                endpoint(sip, sport),
                r.iface.clone(),
                format!("{}/{}", clt.packets, srv.packets),
                format!("{}/{}", clt.syn, srv.synack),
                format!("{}/{}", clt.fin, srv.fin),
                format!("{}/{}", clt.rst, srv.rst),
                c.ct_count().to_string(),
                r.close.as_str().to_string(),
                r.closed_by.as_str().to_string(),
                r.conn_state.to_string(),
                r.history.clone(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header.iter().map(|s| s.to_string()).collect::<Vec<_>>()).chain(rows)
    {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// Sorts records the way every report lists them: by first packet, then key.
/// Sorted through their keys, then moved once: a record is 340 bytes, and
/// a merge sort moved each one many times (a tenth of a live poll).
pub fn sort(records: &mut [ConnRecord]) {
    // f64::total_cmp's order, as an integer.
    let total = |x: f64| {
        let b = x.to_bits() as i64;
        b ^ (((b >> 63) as u64) >> 1) as i64
    };
    records.sort_by_cached_key(|r| (total(r.first_seen), r.conn.key));
}

/// Builds records for `flows` with interface names from `names`, sorted.
pub fn build(
    flows: Vec<(
        flowmon_common::flow::FlowKey,
        flowmon_common::flow::FlowValue,
    )>,
    names: &HashMap<u32, String>,
    now_ns: u64,
    t: &Timeouts,
    offset_ns: i128,
) -> Vec<ConnRecord> {
    let mut records = Vec::with_capacity(flows.len());
    extend(&mut records, &flows, names, now_ns, t, offset_ns);
    sort(&mut records);
    records
}

/// Appends the records of `flows` to `records`, unsorted (for a caller
/// that adds more before its one [`sort`]).
pub fn extend(
    records: &mut Vec<ConnRecord>,
    flows: &[(
        flowmon_common::flow::FlowKey,
        flowmon_common::flow::FlowValue,
    )],
    names: &HashMap<u32, String>,
    now_ns: u64,
    t: &Timeouts,
    offset_ns: i128,
) {
    records.extend(flows.iter().map(|&(k, v)| {
        let iface = names
            .get(&k.ifindex)
            .cloned()
            .unwrap_or_else(|| k.ifindex.to_string());
        ConnRecord::new(Conn::new(k, v), iface, now_ns, t, offset_ns)
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowmon_common::flow::{FlowKey, FlowValue};

    #[test]
    fn sort_orders_by_first_seen_then_key() {
        let firsts = [2.5, -1.0, 0.0, 2.5, 1e9, -0.0, 2.5];
        let mut records: Vec<ConnRecord> = firsts
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                let key = FlowKey {
                    port_a: 100 - i as u16,
                    ..FlowKey::default()
                };
                let mut r = ConnRecord::new(
                    Conn::new(key, FlowValue::default()),
                    "x".into(),
                    0,
                    &Timeouts::default(),
                    0,
                );
                r.first_seen = f;
                r
            })
            .collect();
        let mut expected: Vec<(f64, u16)> = records
            .iter()
            .map(|r| (r.first_seen, r.conn.key.port_a))
            .collect();
        expected.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        sort(&mut records);
        let got: Vec<(f64, u16)> = records
            .iter()
            .map(|r| (r.first_seen, r.conn.key.port_a))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(
            got.iter().map(|g| g.1).collect::<Vec<_>>(),
            [99, 95, 98, 94, 97, 100, 96]
        );
    }
}
