//! Prometheus metrics: what each poll and each interval adds, as counters
//! and gauges in the OpenMetrics text format.
//!
//! Label values come from small fixed sets (packet kinds, sides, flags,
//! close classes, attached interfaces) and, for the busiest servers and
//! ports of the last interval, from at most [`crate::interval::TOP`] of each,
//! replaced every interval: cardinality stays bounded however many hosts
//! the link carries.

use std::{collections::HashMap, sync::atomic::AtomicU64, time::Duration};

use flowmon_common::stats::{
    STAT_COUNT, STAT_FLOWS_CREATED, STAT_FRAGMENTS, STAT_INSERT_FAILED, STAT_MALFORMED,
    STAT_NON_TCP, STAT_PACKETS, STAT_RETIRED, STAT_SPLIT_FAILED, STAT_TCP,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use crate::{
    interval::{Aggregate, Scope},
    record::ConnRecord,
    summary::{Counts, Poll},
};

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type Ratios = Family<Labels, Gauge<f64, AtomicU64>>;

/// The content type of [`Metrics::render`]'s output.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`Metrics::render_text`]'s output.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

const SIDES: [&str; 2] = ["client", "server"];

/// Everything the agent exports to Prometheus.
pub struct Metrics {
    registry: Registry,
    /// Kernel totals last seen, to turn them into counter increments.
    totals: [u64; STAT_COUNT as usize],
    evicted: u64,
    kernel_packets: Counters,
    kernel_flows: Counters,
    flows_evicted: Counter,
    flows_active: Gauge,
    table_capacity: Gauge,
    table_usage: Gauge<f64, AtomicU64>,
    tcp_packets: Counters,
    tcp_bytes: Counters,
    tcp_flags: Counters,
    opened: Counters,
    closed: Counters,
    rst_per_conn: Ratios,
    syn_per_conn: Gauge<f64, AtomicU64>,
    interval_closed: Gauge,
    top_server_closed: Gauges,
    top_server_rst_per_conn: Ratios,
    top_port_closed: Gauges,
    top_port_rst_per_conn: Ratios,
    polls: Counter,
    poll_seconds: Gauge<f64, AtomicU64>,
    last_poll: Gauge<f64, AtomicU64>,
    resident: Gauge,
    export_errors: Counters,
    ipfix_messages: Counter,
    ipfix_records: Counter,
}

fn l(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_string())).collect()
}

impl Metrics {
    /// `capacity`: the kernel table's size; `start_unix`: when the agent started.
    pub fn new(capacity: u32, start_unix: f64) -> Self {
        let mut r = Registry::with_prefix("flowmon");
        macro_rules! reg {
            ($name:expr, $help:expr, $m:expr) => {{
                let m = $m;
                r.register($name, $help, m.clone());
                m
            }};
            ($name:expr, $help:expr, $unit:expr, $m:expr) => {{
                let m = $m;
                r.register_with_unit($name, $help, $unit, m.clone());
                m
            }};
        }
        // A gauge, not an OpenMetrics info: Prometheus' text format, which
        // promtool checks, has no info type.
        let build: Gauges = Gauges::default();
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        r.register("build_info", "flowmon's version", build);
        let start: Gauge<f64, AtomicU64> = Gauge::default();
        start.set(start_unix);
        r.register_with_unit(
            "agent_start_time",
            "When the agent started (Unix time)",
            Unit::Seconds,
            start,
        );
        let m = Self {
            totals: [0; STAT_COUNT as usize],
            evicted: 0,
            kernel_packets: reg!(
                "kernel_packets",
                "Packets the kernel programs saw, by kind (all, tcp, non_tcp, malformed, fragment)",
                Counters::default()
            ),
            kernel_flows: reg!(
                "kernel_flow_events",
                "Flow table events in the kernel (created, insert_failed: table full, split_failed: ring full, retired: new SYN after a close)",
                Counters::default()
            ),
            flows_evicted: reg!(
                "flows_evicted",
                "Connections the kernel table evicted (full) before the agent reported them",
                Counter::default()
            ),
            flows_active: reg!(
                "flows_active",
                "Connections in the kernel table",
                Gauge::default()
            ),
            table_capacity: reg!(
                "flow_table_capacity",
                "Connections the kernel table holds at most",
                Gauge::default()
            ),
            table_usage: reg!(
                "flow_table_usage_ratio",
                "Fraction of the kernel table in use",
                Gauge::default()
            ),
            tcp_packets: reg!(
                "tcp_packets",
                "TCP packets in connections, by the side that sent them",
                Counters::default()
            ),
            tcp_bytes: reg!(
                "tcp",
                "IP bytes of TCP packets in connections, by the side that sent them",
                Unit::Bytes,
                Counters::default()
            ),
            tcp_flags: reg!(
                "tcp_flags",
                "TCP flag events (syn, synack, fin, rst), by the side that sent them",
                Counters::default()
            ),
            opened: reg!(
                "connections_opened",
                "Connections first seen, by interface",
                Counters::default()
            ),
            closed: reg!(
                "connections_closed",
                "Connections reported as finished, by interface and close class",
                Counters::default()
            ),
            rst_per_conn: reg!(
                "rst_per_connection",
                "RST per connection closed in the last interval, by the side that sent them",
                Ratios::default()
            ),
            syn_per_conn: reg!(
                "syn_per_connection",
                "SYN per connection closed in the last interval (above 1: retries)",
                Gauge::default()
            ),
            interval_closed: reg!(
                "interval_connections_closed",
                "Connections closed in the last interval",
                Gauge::default()
            ),
            top_server_closed: reg!(
                "top_server_connections_closed",
                "Connections closed in the last interval, for its busiest servers",
                Gauges::default()
            ),
            top_server_rst_per_conn: reg!(
                "top_server_rst_per_connection",
                "RST per connection closed in the last interval, for its busiest servers, by side",
                Ratios::default()
            ),
            top_port_closed: reg!(
                "top_port_connections_closed",
                "Connections closed in the last interval, for its busiest server ports",
                Gauges::default()
            ),
            top_port_rst_per_conn: reg!(
                "top_port_rst_per_connection",
                "RST per connection closed in the last interval, for its busiest server ports, by side",
                Ratios::default()
            ),
            polls: reg!(
                "agent_polls",
                "Polls of the kernel table",
                Counter::default()
            ),
            poll_seconds: reg!(
                "agent_poll_duration",
                "How long the last poll took",
                Unit::Seconds,
                Gauge::default()
            ),
            last_poll: reg!(
                "agent_last_poll_time",
                "When the last poll ended (Unix time)",
                Unit::Seconds,
                Gauge::default()
            ),
            resident: reg!(
                "agent_resident_memory",
                "The agent's own resident memory (shared pages, such as the mapped flow table, left out)",
                Unit::Bytes,
                Gauge::default()
            ),
            export_errors: reg!(
                "agent_export_errors",
                "Failed writes, by sink (history, snapshot, ipfix)",
                Counters::default()
            ),
            ipfix_messages: reg!("ipfix_messages", "IPFIX messages sent", Counter::default()),
            ipfix_records: reg!(
                "ipfix_records",
                "IPFIX data records sent",
                Counter::default()
            ),
            registry: r,
        };
        m.table_capacity.set(i64::from(capacity));
        // Error counters exist from the start at zero, so an alert on their
        // rate sees a series before the first failure.
        for sink in ["history", "snapshot", "ipfix"] {
            m.export_errors
                .get_or_create(&vec![("sink", sink.to_string())])
                .inc_by(0);
        }
        m
    }

    /// Adds one poll: kernel totals, per-side deltas, connections opened
    /// (by interface index, named through `names`) and closed.
    pub fn observe_poll(
        &mut self,
        p: &Poll,
        closed: &[ConnRecord],
        names: &HashMap<u32, String>,
        took: Duration,
    ) {
        let kinds = [
            (STAT_PACKETS, "all"),
            (STAT_TCP, "tcp"),
            (STAT_NON_TCP, "non_tcp"),
            (STAT_MALFORMED, "malformed"),
            (STAT_FRAGMENTS, "fragment"),
        ];
        for (i, kind) in kinds {
            let d = p.totals[i as usize].saturating_sub(self.totals[i as usize]);
            self.kernel_packets
                .get_or_create(&l(&[("kind", kind)]))
                .inc_by(d);
        }
        let events = [
            (STAT_FLOWS_CREATED, "created"),
            (STAT_INSERT_FAILED, "insert_failed"),
            (STAT_SPLIT_FAILED, "split_failed"),
            (STAT_RETIRED, "retired"),
        ];
        for (i, event) in events {
            let d = p.totals[i as usize].saturating_sub(self.totals[i as usize]);
            self.kernel_flows
                .get_or_create(&l(&[("event", event)]))
                .inc_by(d);
        }
        self.totals = p.totals;
        self.flows_evicted
            .inc_by(p.flows_evicted.saturating_sub(self.evicted));
        self.evicted = p.flows_evicted;
        self.flows_active.set(p.flows_active as i64);
        let cap = self.table_capacity.get().max(1) as f64;
        self.table_usage.set(p.flows_active as f64 / cap);
        for (side, c) in SIDES.iter().zip(&p.sides) {
            self.observe_side(side, c);
        }
        for (ifindex, n) in &p.opened {
            let iface = names
                .get(ifindex)
                .cloned()
                .unwrap_or_else(|| ifindex.to_string());
            self.opened
                .get_or_create(&vec![("iface", iface)])
                .inc_by(*n);
        }
        for r in closed {
            self.closed
                .get_or_create(&vec![
                    ("iface", r.iface.to_string()),
                    ("class", r.close.as_str().to_string()),
                ])
                .inc();
        }
        self.polls.inc();
        self.poll_seconds.set(took.as_secs_f64());
        self.last_poll.set(p.time_unix_ms as f64 / 1e3);
        if let Some(rss) = resident_bytes() {
            self.resident.set(rss as i64);
        }
    }

    fn observe_side(&self, side: &str, c: &Counts) {
        let s = |extra: &[(&'static str, &str)]| {
            let mut v = l(extra);
            v.push(("side", side.to_string()));
            v
        };
        self.tcp_packets.get_or_create(&s(&[])).inc_by(c.packets);
        self.tcp_bytes.get_or_create(&s(&[])).inc_by(c.bytes);
        for (flag, n) in [
            ("syn", c.syn),
            ("synack", c.synack),
            ("fin", c.fin),
            ("rst", c.rst),
        ] {
            self.tcp_flags
                .get_or_create(&s(&[("flag", flag)]))
                .inc_by(n);
        }
    }

    /// Replaces the last-interval gauges with a finished interval's rows.
    pub fn observe_interval(&self, rows: &[Aggregate]) {
        self.top_server_closed.clear();
        self.top_server_rst_per_conn.clear();
        self.top_port_closed.clear();
        self.top_port_rst_per_conn.clear();
        for a in rows {
            let m = &a.closed;
            let per_side = [m.rst_per_conn_clt(), m.rst_per_conn_srv()];
            match &a.scope {
                Scope::Global => {
                    self.interval_closed.set(m.conns as i64);
                    self.syn_per_conn.set(m.syn_per_conn());
                    for (side, v) in SIDES.iter().zip(per_side) {
                        self.rst_per_conn
                            .get_or_create(&l(&[("side", side)]))
                            .set(v);
                    }
                }
                Scope::Iface(_) => {}
                Scope::Server(ip) => {
                    let ip = ip.to_string();
                    self.top_server_closed
                        .get_or_create(&l(&[("server", &ip)]))
                        .set(m.conns as i64);
                    for (side, v) in SIDES.iter().zip(per_side) {
                        self.top_server_rst_per_conn
                            .get_or_create(&l(&[("server", &ip), ("side", side)]))
                            .set(v);
                    }
                }
                Scope::Port(p) => {
                    let p = p.to_string();
                    self.top_port_closed
                        .get_or_create(&l(&[("port", &p)]))
                        .set(m.conns as i64);
                    for (side, v) in SIDES.iter().zip(per_side) {
                        self.top_port_rst_per_conn
                            .get_or_create(&l(&[("port", &p), ("side", side)]))
                            .set(v);
                    }
                }
            }
        }
    }

    /// A write to `sink` (history, snapshot, ipfix) failed.
    pub fn export_error(&self, sink: &'static str) {
        self.export_errors
            .get_or_create(&vec![("sink", sink.to_string())])
            .inc();
    }

    /// IPFIX messages and data records sent.
    pub fn ipfix_sent(&self, messages: u64, records: u64) {
        self.ipfix_messages.inc_by(messages);
        self.ipfix_records.inc_by(records);
    }

    /// The exposition, OpenMetrics text format ([`OPENMETRICS`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The exposition in Prometheus' text format 0.0.4 ([`TEXT`]), for
    /// scrapers that do not ask for OpenMetrics (and for promtool).
    pub fn render_text(&self) -> String {
        to_text_format(&self.render())
    }
}

/// Prometheus' text format 0.0.4 from OpenMetrics text: counter families
/// are named with their `_total` suffix there, and there are no `# UNIT`
/// or `# EOF` lines.
fn to_text_format(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                out.push_str(&format!("{p}{name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// This process's own resident memory, from /proc/self/statm: resident
/// less shared pages. The mapped flow table is the kernel's memory, seen
/// through the mapping as shared file pages (78 MiB at the default size),
/// and would otherwise swamp what the agent itself uses.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut fields = statm.split_whitespace().skip(1);
    let resident: u64 = fields.next()?.parse().ok()?;
    let shared: u64 = fields.next()?.parse().ok()?;
    let pages = resident.saturating_sub(shared);
    Some(
        pages
            * nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
                .ok()??
                .max(0) as u64,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::interval::{Intervals, tests::conn};

    fn poll(totals_packets: u64, rst_srv: u64) -> Poll {
        let mut totals = [0; STAT_COUNT as usize];
        totals[STAT_PACKETS as usize] = totals_packets;
        totals[STAT_FLOWS_CREATED as usize] = 3;
        Poll {
            time_unix_ms: 1_795_000_000_000,
            interval_ms: 1000,
            ifaces: vec!["veth0".into()],
            totals,
            flows_evicted: 1,
            flows_active: 2,
            flows_new: 2,
            delta: Counts::default(),
            sides: [
                Counts {
                    packets: 5,
                    syn: 1,
                    ..Default::default()
                },
                Counts {
                    packets: 4,
                    rst: rst_srv,
                    ..Default::default()
                },
            ],
            opened: BTreeMap::from([(3, 2)]),
            vanished: vec![],
            changed: vec![],
        }
    }

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counters_add_deltas_and_gauges_follow_the_last_interval() {
        let mut m = Metrics::new(100, 1.0);
        let names = HashMap::from([(3, "veth0".to_string())]);
        m.observe_poll(
            &poll(10, 1),
            &[conn(1, 80, 1)],
            &names,
            Duration::from_millis(5),
        );
        m.observe_poll(
            &poll(25, 2),
            &[conn(1, 80, 1), conn(2, 80, 0)],
            &names,
            Duration::from_millis(5),
        );
        let mut iv = Intervals::new(1000);
        iv.add(0, &[], &[conn(1, 80, 1), conn(1, 80, 3), conn(2, 443, 0)]);
        m.observe_interval(&iv.add(1000, &[], &[]));
        let t = m.render();
        let want = [
            (r#"flowmon_kernel_packets_total{kind="all"}"#, 25.0),
            (r#"flowmon_tcp_flags_total{flag="rst",side="server"}"#, 3.0),
            (r#"flowmon_tcp_flags_total{flag="syn",side="client"}"#, 2.0),
            (r#"flowmon_tcp_packets_total{side="client"}"#, 10.0),
            (r#"flowmon_connections_opened_total{iface="veth0"}"#, 4.0),
            (
                r#"flowmon_connections_closed_total{iface="veth0",class="rst"}"#,
                2.0,
            ),
            (
                r#"flowmon_connections_closed_total{iface="veth0",class="fin"}"#,
                1.0,
            ),
            ("flowmon_flows_evicted_total", 1.0),
            ("flowmon_flows_active", 2.0),
            ("flowmon_flow_table_usage_ratio", 0.02),
            (r#"flowmon_rst_per_connection{side="server"}"#, 4.0 / 3.0),
            (
                r#"flowmon_top_server_connections_closed{server="10.0.0.1"}"#,
                2.0,
            ),
            (
                r#"flowmon_top_server_rst_per_connection{server="10.0.0.1",side="server"}"#,
                2.0,
            ),
            (r#"flowmon_top_port_connections_closed{port="443"}"#, 1.0),
            ("flowmon_agent_polls_total", 2.0),
        ];
        for (name, v) in want {
            assert_eq!(sample(&t, name), Some(v), "{name} in\n{t}");
        }
        assert!(t.ends_with("# EOF\n"));
        // Every metric the shipped Grafana dashboard graphs is exported.
        let page = m.render_text();
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/grafana-dashboard.json")).unwrap();
        let mut used = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for t in panel["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                for (i, _) in expr.match_indices("flowmon_") {
                    let name: String = expr[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(
                        page.contains(&format!("\n# TYPE {name} ")),
                        "the dashboard graphs {name}"
                    );
                    used += 1;
                }
            }
        }
        assert!(used >= 12, "{used}");
    }
}
