//! A connection as flowmon reports it: the client/server view, its close
//! class and Zeek's state, rendered as a flat JSON object or a table row.
//! Every field carries its one vocabulary name, shared with the filters.

use std::{collections::HashMap, fmt::Write as _, net::IpAddr, sync::Arc};

use flowmon_common::flow::{FlowKey, FlowValue};
use serde_json::{Map, Value, json};

use crate::{
    close::{Close, ClosedBy, Timeouts, earliest},
    model::Conn,
    prefetch::{self, AHEAD},
};

/// A reported connection.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnRecord {
    pub conn: Conn,
    /// Shared by every record of the interface: a poll makes thousands of
    /// records, and a copy of the name each was an allocation each.
    pub iface: Arc<str>,
    pub close: Close,
    pub closed_by: ClosedBy,
    /// Unix seconds of the first and last packet.
    pub first_seen: f64,
    pub last_seen: f64,
}

impl ConnRecord {
    /// Classifies `conn` as of `now_ns` (the packets' clock); `offset_ns`
    /// turns that clock into Unix time (0 for capture timestamps).
    pub fn new(conn: Conn, iface: Arc<str>, now_ns: u64, t: &Timeouts, offset_ns: i128) -> Self {
        let (close, closed_by) = conn.classify(now_ns, t);
        Self {
            first_seen: unix_secs(conn.first_ns(), offset_ns),
            last_seen: unix_secs(conn.last_ns(), offset_ns),
            conn,
            iface,
            close,
            closed_by,
        }
    }

    /// Zeek's state of the connection. It and [`ConnRecord::history`] are
    /// derived from the counts when asked, not stored: a record is made
    /// for every connection, most are never shown, and the history's
    /// string was an allocation each (a twentieth of a busy poll, and 40
    /// bytes more per remembered record).
    pub fn conn_state(&self) -> &'static str {
        self.conn.conn_state()
    }

    /// Zeek's history of the connection.
    pub fn history(&self) -> String {
        self.conn.history()
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
            conn,
            iface: iface.into(),
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
        put("iface", json!(&*self.iface));
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
        put("conn_state", json!(self.conn_state()));
        put("history", json!(self.history()));
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
                r.iface.to_string(),
                format!("{}/{}", clt.packets, srv.packets),
                format!("{}/{}", clt.syn, srv.synack),
                format!("{}/{}", clt.fin, srv.fin),
                format!("{}/{}", clt.rst, srv.rst),
                c.ct_count().to_string(),
                r.close.as_str().to_string(),
                r.closed_by.as_str().to_string(),
                r.conn_state().to_string(),
                r.history(),
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

/// A record's place in report order, in integers: its first packet (in
/// `f64::total_cmp`'s order), then its key field by field as `FlowKey`'s
/// derived `Ord` compares them (addresses as big-endian numbers), then its
/// position. Integers compare in a few instructions, where the key's
/// address arrays compared through a call to memcmp, for thousands of
/// records a poll.
pub type SortKey = (i64, u128, u128, u64, u32, u32);

fn sort_key(first_seen: f64, k: &FlowKey, position: usize) -> SortKey {
    let b = first_seen.to_bits() as i64;
    (
        b ^ (((b >> 63) as u64) >> 1) as i64,
        u128::from_be_bytes(k.addr_a),
        u128::from_be_bytes(k.addr_b),
        u64::from(k.port_a) << 48 | u64::from(k.port_b) << 32 | u64::from(k.ifindex),
        u32::from(k.vlan) << 16 | u32::from(k.family) << 8 | u32::from(k._pad),
        position as u32,
    )
}

/// Appends the records of `ended`, then of `evicted` (marked so), to
/// `records` in the order every report lists them: by first packet, then
/// key, then position. The order is found on the keys first and each
/// record built in its place: records built, then sorted, were moved
/// about (300 bytes each) and compared field by field. `keys` is scratch,
/// left empty: a caller that calls again keeps its room, as a poll's keys
/// (megabytes in a burst) allocated afresh grew the heap into new pages.
#[allow(clippy::too_many_arguments)]
pub fn extend_sorted(
    records: &mut Vec<ConnRecord>,
    keys: &mut Vec<SortKey>,
    ended: &[(FlowKey, FlowValue)],
    evicted: &[(FlowKey, FlowValue)],
    names: &HashMap<u32, String>,
    now_ns: u64,
    t: &Timeouts,
    offset_ns: i128,
) {
    keys.clear();
    keys.extend(ended.iter().chain(evicted).enumerate().map(|(i, (k, v))| {
        let first = earliest(&[v.dir[0].first_ns, v.dir[1].first_ns]);
        sort_key(unix_secs(first, offset_ns), k, i)
    }));
    keys.sort_unstable();
    records.reserve(keys.len());
    let mut ifaces: Vec<(u32, Arc<str>)> = Vec::new();
    let at = |i: usize| ended.get(i).unwrap_or_else(|| &evicted[i - ended.len()]);
    for (j, key) in keys.iter().enumerate() {
        // In report order the connections are at random places in their
        // lists, most of them out of the cache in a busy poll.
        if let Some(next) = keys.get(j + AHEAD) {
            prefetch::all(at(next.5 as usize));
        }
        let i = key.5 as usize;
        let (k, v) = at(i);
        let mut r = ConnRecord::new(
            Conn::new(*k, *v),
            shared_name(&mut ifaces, names, k.ifindex),
            now_ns,
            t,
            offset_ns,
        );
        if i >= ended.len() {
            r.mark_evicted();
        }
        records.push(r);
    }
    keys.clear();
}

/// Seconds since the Unix epoch of `ns` on a clock `offset_ns` behind it.
fn unix_secs(ns: u64, offset_ns: i128) -> f64 {
    (i128::from(ns) + offset_ns) as f64 / 1e9
}

/// Interface `ifindex`'s name, made once per call of [`extend_sorted`] and
/// shared by its records (a poll's records come from a few interfaces).
fn shared_name(
    made: &mut Vec<(u32, Arc<str>)>,
    names: &HashMap<u32, String>,
    ifindex: u32,
) -> Arc<str> {
    if let Some((_, name)) = made.iter().find(|(i, _)| *i == ifindex) {
        return name.clone();
    }
    let name: Arc<str> = iface_name(names, ifindex).into();
    made.push((ifindex, name.clone()));
    name
}

fn iface_name(names: &HashMap<u32, String>, ifindex: u32) -> String {
    names
        .get(&ifindex)
        .cloned()
        .unwrap_or_else(|| ifindex.to_string())
}

/// Builds records for `flows` with interface names from `names`, sorted.
pub fn build(
    flows: Vec<(FlowKey, FlowValue)>,
    names: &HashMap<u32, String>,
    now_ns: u64,
    t: &Timeouts,
    offset_ns: i128,
) -> Vec<ConnRecord> {
    let mut records = Vec::new();
    extend_sorted(
        &mut records,
        &mut Vec::new(),
        &flows,
        &[],
        names,
        now_ns,
        t,
        offset_ns,
    );
    records
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowmon_common::flow::{FlowKey, FlowValue};

    /// Ties on the first packet (connections within one tick of the
    /// kernel's coarse clock) and on the key too (a reused tuple), across
    /// the two lists a poll reports.
    #[test]
    fn extend_sorted_orders_and_marks_the_evicted() {
        let flow = |port: u16, first: u64, packets: u64| {
            let key = FlowKey {
                port_a: port,
                ..FlowKey::default()
            };
            let mut v = FlowValue::default();
            v.dir[0].first_ns = first;
            v.dir[0].last_ns = first;
            v.dir[0].packets = packets;
            (key, v)
        };
        let ended = [flow(9, 5, 1), flow(3, 5, 2), flow(9, 5, 3), flow(1, 7, 4)];
        let vanished = [flow(2, 5, 5), flow(9, 4, 6), flow(3, 5, 7)];
        let (names, t) = (
            HashMap::from([(0, "veth0".to_string())]),
            Timeouts::default(),
        );
        let mut got = Vec::new();
        let mut keys = Vec::new();
        extend_sorted(
            &mut got, &mut keys, &ended, &vanished, &names, 10, &t, 1_000,
        );
        assert!(keys.is_empty());
        // By first packet, then key, then position (the ended first).
        let order = [
            (true, 1),
            (true, 0),
            (false, 1),
            (true, 2),
            (false, 0),
            (false, 2),
            (false, 3),
        ];
        let want: Vec<ConnRecord> = order
            .iter()
            .map(|&(gone, i)| {
                let (k, v) = if gone { vanished[i] } else { ended[i] };
                let mut r = ConnRecord::new(Conn::new(k, v), "veth0".into(), 10, &t, 1_000);
                if gone {
                    r.mark_evicted();
                }
                r
            })
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            got.iter()
                .map(|r| (r.conn.key.port_a, r.conn.value.dir[0].packets, r.close))
                .collect::<Vec<_>>(),
            [
                (9, 6, Close::Evicted),
                (2, 5, Close::Evicted),
                (3, 2, want[2].close),
                (3, 7, Close::Evicted),
                (9, 1, want[4].close),
                (9, 3, want[5].close),
                (1, 4, want[6].close),
            ]
        );
        assert!(got[..].iter().all(|r| &*r.iface == "veth0"));
    }

    #[test]
    fn sort_keys_order_by_first_seen_then_key() {
        let firsts = [2.5, -1.0, 0.0, 2.5, 1e9, -0.0, 2.5];
        let mut keyed: Vec<(SortKey, (f64, u16))> = firsts
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                let key = FlowKey {
                    port_a: 100 - i as u16,
                    ..FlowKey::default()
                };
                (sort_key(f, &key, i), (f, key.port_a))
            })
            .collect();
        let mut expected: Vec<(f64, u16)> = keyed.iter().map(|k| k.1).collect();
        expected.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        keyed.sort_unstable_by_key(|k| k.0);
        let got: Vec<(f64, u16)> = keyed.iter().map(|k| k.1).collect();
        assert_eq!(got, expected);
        assert_eq!(
            got.iter().map(|g| g.1).collect::<Vec<_>>(),
            [99, 95, 98, 94, 97, 100, 96]
        );
    }
}
