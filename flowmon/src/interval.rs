//! Per-interval aggregates: connections opened and closed by class, SYN per
//! connection, FIN and RST from each side, RST per connection; globally, per
//! interface, and for the busiest servers and server ports, in bounded memory.
//!
//! Intervals are aligned to multiples of their length in Unix time, so two
//! agents (or one agent before and after a restart) cut time the same way.
//! A closed connection counts in the interval of the poll that reported it.

use std::net::IpAddr;

use rustc_hash::FxHashMap;

use serde_json::{Value, json};

use crate::{aggregate::Metrics, record::ConnRecord};

/// Schema version of interval rows (store, snapshots).
pub const SCHEMA_VERSION: u32 = 1;

/// Servers and ports kept per interval, busiest first.
pub const TOP: usize = 10;

/// Distinct servers (and ports) tracked within one interval: past this,
/// connections to new ones count globally and per interface only.
pub const TRACKED: usize = 10_000;

/// What an aggregate covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Global,
    Iface(String),
    Server(IpAddr),
    Port(u16),
}

impl Scope {
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Iface(_) => "iface",
            Scope::Server(_) => "server",
            Scope::Port(_) => "port",
        }
    }

    /// The scope's key as text: "" for global, the name, address or port.
    pub fn key(&self) -> String {
        match self {
            Scope::Global => String::new(),
            Scope::Iface(n) => n.clone(),
            Scope::Server(ip) => ip.to_string(),
            Scope::Port(p) => p.to_string(),
        }
    }
}

/// One finished interval of one scope.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate {
    /// Unix milliseconds, `[start, end)`.
    pub start_ms: u64,
    pub end_ms: u64,
    pub scope: Scope,
    /// Connections first seen in the interval.
    pub opened: u64,
    /// Connections that ended in the interval.
    pub closed: Metrics,
}

impl Aggregate {
    /// The flat JSON row (snapshots, the store, `graph`).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "schema": SCHEMA_VERSION,
            "type": "interval",
            "start": self.start_ms as f64 / 1e3,
            "end": self.end_ms as f64 / 1e3,
            "scope": self.scope.kind(),
            "key": self.scope.key(),
            "opened": self.opened,
        });
        let fields = self.closed.fields_json();
        let (Value::Object(dst), Value::Object(src)) = (&mut v, fields) else {
            unreachable!("both are objects")
        };
        dst.extend(src);
        v
    }
}

/// The interval being filled.
#[derive(Debug)]
pub struct Intervals {
    len_ms: u64,
    start_ms: Option<u64>,
    global: Metrics,
    opened: u64,
    ifaces: FxHashMap<String, (u64, Metrics)>,
    servers: FxHashMap<IpAddr, Metrics>,
    ports: FxHashMap<u16, Metrics>,
}

impl Intervals {
    pub fn new(len_ms: u64) -> Self {
        Self {
            len_ms: len_ms.max(1),
            start_ms: None,
            global: Metrics::default(),
            opened: 0,
            ifaces: FxHashMap::default(),
            servers: FxHashMap::default(),
            ports: FxHashMap::default(),
        }
    }

    pub fn len_ms(&self) -> u64 {
        self.len_ms
    }

    /// Adds one poll at `now_ms`: connections first seen (`opened`, by
    /// interface name) and the records of those that ended. Returns the rows
    /// of the interval that `now_ms` closed, if it closed one.
    pub fn add(
        &mut self,
        now_ms: u64,
        opened: &[(String, u64)],
        closed: &[ConnRecord],
    ) -> Vec<Aggregate> {
        let done = self.roll(now_ms);
        for (iface, n) in opened {
            self.opened += n;
            self.iface(iface).0 += n;
        }
        // A poll's connections nearly all share one interface: its row is
        // found once per run of them, not hashed for each.
        let mut rest = closed;
        while let Some(first) = rest.first() {
            let n = rest.iter().take_while(|r| r.iface == first.iface).count();
            let row = &mut self.iface(&first.iface).1;
            rest[..n].iter().for_each(|r| row.add(r));
            rest = &rest[n..];
        }
        for r in closed {
            self.global.add(r);
            let (server, port) = r.conn.server();
            if let Some(m) = bounded(&mut self.servers, server) {
                m.add(r);
            }
            if let Some(m) = bounded(&mut self.ports, port) {
                m.add(r);
            }
        }
        done
    }

    /// The row of `iface`, the name copied only when it is new (once per
    /// interface and interval, not once per connection).
    fn iface(&mut self, iface: &str) -> &mut (u64, Metrics) {
        if !self.ifaces.contains_key(iface) {
            self.ifaces.insert(iface.to_string(), Default::default());
        }
        self.ifaces.get_mut(iface).expect("inserted above")
    }

    /// Closes the current interval if `now_ms` is past it (an interval with
    /// nothing in it still gives its global row: a gap in a graph means the
    /// agent was down, not that nothing happened).
    fn roll(&mut self, now_ms: u64) -> Vec<Aggregate> {
        let start = now_ms - now_ms % self.len_ms;
        match self.start_ms {
            None => {
                self.start_ms = Some(start);
                Vec::new()
            }
            Some(s) if start > s => {
                let rows = self.rows(s, s + self.len_ms);
                self.start_ms = Some(start);
                rows
            }
            Some(_) => Vec::new(),
        }
    }

    /// Ends the current interval now (when the agent stops): its end is
    /// `now_ms`, not the aligned boundary.
    pub fn finish(&mut self, now_ms: u64) -> Vec<Aggregate> {
        match self.start_ms.take() {
            Some(s) => self.rows(s, now_ms.max(s)),
            None => Vec::new(),
        }
    }

    fn rows(&mut self, start_ms: u64, end_ms: u64) -> Vec<Aggregate> {
        let row = |scope, opened, closed| Aggregate {
            start_ms,
            end_ms,
            scope,
            opened,
            closed,
        };
        let mut out = vec![row(
            Scope::Global,
            std::mem::take(&mut self.opened),
            std::mem::take(&mut self.global),
        )];
        let mut ifaces: Vec<_> = self.ifaces.drain().collect();
        ifaces.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(
            ifaces
                .into_iter()
                .map(|(n, (o, m))| row(Scope::Iface(n), o, m)),
        );
        out.extend(
            busiest(self.servers.drain())
                .into_iter()
                .map(|(ip, m)| row(Scope::Server(ip), 0, m)),
        );
        out.extend(
            busiest(self.ports.drain())
                .into_iter()
                .map(|(p, m)| row(Scope::Port(p), 0, m)),
        );
        out
    }
}

fn bounded<K: std::hash::Hash + Eq>(m: &mut FxHashMap<K, Metrics>, k: K) -> Option<&mut Metrics> {
    if m.len() < TRACKED {
        Some(m.entry(k).or_default())
    } else {
        m.get_mut(&k)
    }
}

/// The [`TOP`] groups with the most connections, ties by key.
fn busiest<K: Ord>(groups: impl Iterator<Item = (K, Metrics)>) -> Vec<(K, Metrics)> {
    let mut v: Vec<_> = groups.collect();
    v.sort_by(|a, b| b.1.conns.cmp(&a.1.conns).then_with(|| a.0.cmp(&b.0)));
    v.truncate(TOP);
    v
}

#[cfg(test)]
pub(crate) mod tests {
    use flowmon_common::flow::{DIR_A_TO_B, DIR_B_TO_A, FlowKey, FlowValue};

    use super::*;
    use crate::{
        close::{Close, Timeouts},
        model::Conn,
    };

    /// A connection to 10.0.0.`server`:`port`, `rst` RSTs from the server
    /// after a handshake (or FINs from both sides when 0).
    pub(crate) fn conn(server: u8, port: u16, rst: u32) -> ConnRecord {
        let mut k = FlowKey {
            port_a: port,
            port_b: 40000,
            family: 4,
            ifindex: 3,
            ..Default::default()
        };
        k.addr_a[..4].copy_from_slice(&[10, 0, 0, server]);
        k.addr_b[..4].copy_from_slice(&[10, 0, 1, 1]);
        let mut v = FlowValue::default();
        let c = &mut v.dir[DIR_B_TO_A];
        (c.syn, c.packets, c.first_ns, c.first_syn_ns, c.last_ns) = (1, 3, 1, 1, 5);
        c.fin = u32::from(rst == 0);
        let s = &mut v.dir[DIR_A_TO_B];
        (
            s.synack,
            s.packets,
            s.first_ns,
            s.first_synack_ns,
            s.last_ns,
        ) = (1, 2, 2, 2, 6);
        s.rst = rst;
        s.fin = u32::from(rst == 0);
        ConnRecord::new(
            Conn::new(k, v),
            "veth0".into(),
            10_000_000_000,
            &Timeouts::default(),
            0,
        )
    }

    #[test]
    fn rows_per_interval_scope_and_side() {
        let mut iv = Intervals::new(10_000);
        assert!(
            iv.add(
                100_500,
                &[("veth0".into(), 3)],
                &[conn(1, 80, 0), conn(1, 80, 1)]
            )
            .is_empty()
        );
        assert!(iv.add(105_000, &[], &[conn(2, 443, 2)]).is_empty());
        let rows = iv.add(110_000, &[("veth0".into(), 1)], &[conn(1, 80, 0)]);
        let kinds: Vec<(String, String)> = rows
            .iter()
            .map(|r| (r.scope.kind().to_string(), r.scope.key()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("global", ""),
                ("iface", "veth0"),
                ("server", "10.0.0.1"),
                ("server", "10.0.0.2"),
                ("port", "80"),
                ("port", "443"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let g = &rows[0];
        assert_eq!((g.start_ms, g.end_ms, g.opened), (100_000, 110_000, 3));
        assert_eq!(
            (
                g.closed.conns,
                g.closed.rst_srv,
                g.closed.fin_clt,
                g.closed.closes[&Close::Rst]
            ),
            (3, 3, 1, 2)
        );
        let j = g.to_json();
        assert_eq!(j["rst.per_conn.srv"], 1.0);
        assert_eq!(j["rst.per_conn.clt"], 0.0);
        assert_eq!(
            (
                j["type"].as_str(),
                j["start"].as_f64(),
                j["close.fin"].as_u64()
            ),
            (Some("interval"), Some(100.0), Some(1))
        );
        assert_eq!(rows[2].closed.conns, 2, "10.0.0.1 had two");
        // The next interval holds only what came after.
        let rows = iv.finish(112_000);
        assert_eq!(
            (
                rows[0].start_ms,
                rows[0].end_ms,
                rows[0].opened,
                rows[0].closed.conns
            ),
            (110_000, 112_000, 1, 1)
        );
    }

    #[test]
    fn only_the_busiest_servers_are_kept() {
        let mut iv = Intervals::new(1_000);
        let closed: Vec<ConnRecord> = (1..=(TOP as u8 + 5))
            .flat_map(|s| std::iter::repeat_n(conn(s, 80, 1), usize::from(s)))
            .collect();
        iv.add(0, &[], &closed);
        let rows = iv.add(1_000, &[], &[]);
        let servers: Vec<String> = rows
            .iter()
            .filter(|r| r.scope.kind() == "server")
            .map(|r| r.scope.key())
            .collect();
        assert_eq!(servers.len(), TOP);
        assert_eq!(servers[0], format!("10.0.0.{}", TOP + 5), "busiest first");
        // An empty interval still gives its global row.
        let rows = iv.add(3_500, &[], &[]);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].start_ms, rows[0].closed.conns), (1_000, 0));
    }
}
