//! What `flowmon run` prints each poll: pure functions from map contents to a
//! [`Poll`], rendered as one compact text block or one JSON object.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
};

use rustc_hash::FxHashMap;

use flowmon_common::{
    flow::{DirStats, FlowKey, FlowValue},
    stats::{STAT_COUNT, STAT_FLOWS_CREATED, STAT_NAMES},
    table::last_active,
};
use serde_json::{Map, Value, json};

use crate::{
    close::{Timeouts, earliest},
    model::Conn,
    record::ConnRecord,
};

/// JSON schema version of the poll objects.
pub const SCHEMA_VERSION: u32 = 1;

/// Flag and packet counts summed over connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
    pub syn: u64,
    pub synack: u64,
    pub fin: u64,
    pub rst: u64,
}

impl Counts {
    fn add_dir(&mut self, n: &DirDigest, b: &DirDigest) {
        self.packets += n.packets.saturating_sub(b.packets);
        self.bytes += n.bytes.saturating_sub(b.bytes);
        self.syn += u64::from(n.syn.saturating_sub(b.syn));
        self.synack += u64::from(n.synack.saturating_sub(b.synack));
        self.fin += u64::from(n.fin.saturating_sub(b.fin));
        self.rst += u64::from(n.rst.saturating_sub(b.rst));
    }
}

/// Deltas in total and per side: `sides[0]` what clients sent, `sides[1]`
/// what servers sent.
#[derive(Default)]
struct Deltas {
    total: Counts,
    sides: [Counts; 2],
}

impl Deltas {
    fn add(&mut self, k: &FlowKey, v: &FlowValue, now: &Digest, before: Option<&Digest>) {
        let b = before.copied().unwrap_or_default();
        let (client_dir, _) = crate::model::orient(k, v);
        for d in 0..2 {
            let (n, b) = (&now.dir[d], &b.dir[d]);
            self.total.add_dir(n, b);
            self.sides[usize::from(d != client_dir)].add_dir(n, b);
        }
    }
}

/// What the tracker remembers of a direction: the counters deltas are made
/// of, not the times. 32 bytes where a whole `DirStats` is 104: the agent
/// holds one of these pairs per tracked connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DirDigest {
    packets: u64,
    bytes: u64,
    syn: u32,
    synack: u32,
    fin: u32,
    rst: u32,
}

/// What the tracker remembers of a connection: enough to compute deltas,
/// and to report it should the kernel evict it before it ends (times to the
/// second: two `u32` fit in the key's padding where two `u64` would not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Digest {
    dir: [DirDigest; 2],
    /// CLOCK_MONOTONIC seconds of the first and last packet.
    first_s: u32,
    last_s: u32,
    /// The sweep cycle ([`Tracker::poll_part`]) in which it was last read.
    seen: u32,
}

impl Digest {
    fn of(v: &FlowValue) -> Self {
        let d = |s: &DirStats| DirDigest {
            packets: s.packets,
            bytes: s.bytes,
            syn: s.syn,
            synack: s.synack,
            fin: s.fin,
            rst: s.rst,
        };
        let first = earliest(&[v.dir[0].first_ns, v.dir[1].first_ns]);
        let last = last_active(v);
        let secs = |ns: u64| u32::try_from(ns / 1_000_000_000).unwrap_or(u32::MAX);
        Self {
            dir: [d(&v.dir[0]), d(&v.dir[1])],
            first_s: secs(first),
            // Rounded up, so that the last packet is never later than it says.
            last_s: u32::try_from(last.div_ceil(1_000_000_000)).unwrap_or(u32::MAX),
            seen: 0,
        }
    }

    /// Whether `later`, read under the same key, must be another entry: a
    /// counter went down or the first packet moved later, which one entry's
    /// never do. The kernel evicted this one and the tuple's next packets
    /// made a new one, all between two polls. An entry with a SYN is left
    /// out: that is how a retired connection's successor starts, and the
    /// retired one comes through the ring buffer, maybe only next poll.
    fn replaced_by(&self, later: &Digest) -> bool {
        if later.dir[0].syn + later.dir[1].syn > 0 {
            return false;
        }
        let down = |a: &DirDigest, b: &DirDigest| {
            b.packets < a.packets
                || b.bytes < a.bytes
                || b.syn < a.syn
                || b.synack < a.synack
                || b.fin < a.fin
                || b.rst < a.rst
        };
        later.first_s > self.first_s
            || down(&self.dir[0], &later.dir[0])
            || down(&self.dir[1], &later.dir[1])
    }

    /// The connection as last seen, for reporting it once it is gone: the
    /// counts are exact as of that poll, the times to the second, and the
    /// first flag of each kind is dated at the first packet.
    fn value(&self) -> FlowValue {
        let mut v = FlowValue::default();
        let (first, last) = (
            u64::from(self.first_s) * 1_000_000_000,
            u64::from(self.last_s) * 1_000_000_000,
        );
        for (s, d) in v.dir.iter_mut().zip(&self.dir) {
            if d.packets == 0 {
                continue;
            }
            let at = |n: u32| if n > 0 { first } else { 0 };
            *s = DirStats {
                packets: d.packets,
                bytes: d.bytes,
                syn: d.syn,
                synack: d.synack,
                fin: d.fin,
                rst: d.rst,
                first_ns: first,
                last_ns: last,
                first_syn_ns: at(d.syn),
                first_synack_ns: at(d.synack),
                first_fin_ns: at(d.fin),
                first_rst_ns: at(d.rst),
                ..DirStats::default()
            };
        }
        v
    }
}

/// One poll's worth of facts.
#[derive(Clone, Debug, PartialEq)]
pub struct Poll {
    pub time_unix_ms: u64,
    pub interval_ms: u64,
    pub ifaces: Vec<String>,
    /// Global counters since load, by `flowmon_common::stats` index.
    pub totals: [u64; STAT_COUNT as usize],
    /// Connections created by the kernel and no longer in its table.
    pub flows_evicted: u64,
    pub flows_active: usize,
    pub flows_new: usize,
    /// Counts added since the previous poll.
    pub delta: Counts,
    /// The same per side: `[client, server]`.
    pub sides: [Counts; 2],
    /// Connections first seen in this poll, by interface index (whether
    /// still open or already ended).
    pub opened: BTreeMap<u32, u64>,
    /// Connections that saw packets since the previous poll, busiest first.
    pub changed: Vec<Conn>,
    /// Connections seen by the previous poll and gone from the table without
    /// the agent removing them: evicted. Their values are as last seen.
    pub vanished: Vec<(FlowKey, FlowValue)>,
}

/// Remembers the previous poll so the next one can report what changed.
///
/// Connections the agent holds through their linger are not remembered
/// here: each is counted once when the agent takes it ([`Tracker::hold`])
/// and again only for trailing packets merged into it
/// ([`Tracker::merge`]), so its end needs no lookup. Remembering them cost
/// an insert and a remove per connection in a map of every tracked one,
/// a tenth of the agent's work on short connections.
#[derive(Default)]
pub struct Tracker {
    prev: FxHashMap<FlowKey, Digest>,
    prev_time_unix_ms: Option<u64>,
    /// Evictions since load, as last reported.
    evicted: u64,
    /// The current sweep cycle: a whole-table poll is one cycle, a partial
    /// sweep as many polls as it takes to get round the table.
    cycle: u32,
    /// Leave [`Poll::changed`] empty: only the per-poll output shows it, and
    /// copying and sorting every changed connection is a tenth of a poll.
    pub skip_changed: bool,
    /// For the next poll: see [`Tracker::set_held`].
    held: HeldPart,
    /// What connections ended, held or merged into since the last poll
    /// added: the next poll's starting point.
    pending: Update,
}

/// Which connections of a poll the agent holds through their linger.
#[derive(Clone, Copy, Debug)]
struct HeldPart {
    /// The live entries from this index on.
    from: usize,
    /// How many more it holds, unchanged since the previous poll (not in
    /// the poll's lists at all).
    quiet: usize,
}

impl Default for HeldPart {
    fn default() -> Self {
        Self {
            from: usize::MAX,
            quiet: 0,
        }
    }
}

impl Tracker {
    /// Starts from `live` as if a poll had just seen it.
    pub fn seed(&mut self, live: &[(FlowKey, FlowValue)]) {
        // Marked as of an earlier cycle: the next one must meet them again.
        let seen = self.cycle.wrapping_sub(1);
        self.prev = live
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    Digest {
                        seen,
                        ..Digest::of(v)
                    },
                )
            })
            .collect();
    }

    /// Builds a poll from the live entries, and what was given since the
    /// previous poll ([`Tracker::end`], [`Tracker::hold`],
    /// [`Tracker::merge`]). `kept` are connections this poll does not see
    /// as live but knows are there (left in place of a take): remembered as
    /// they were, not evicted.
    /// `removed` is how many entries the agent has deleted since load.
    pub fn poll(
        &mut self,
        live: &[(FlowKey, FlowValue)],
        kept: &[FlowKey],
        totals: [u64; STAT_COUNT as usize],
        ifaces: Vec<String>,
        time_unix_ms: u64,
        removed: u64,
    ) -> Poll {
        // The whole table was read: one poll is a whole sweep cycle.
        let quiet = self.held.quiet;
        let mut u = self.update(live, kept, true);
        u.flows_active = live.len() + kept.len() + quiet;
        self.finish(u, totals, ifaces, time_unix_ms, removed)
    }

    /// A poll that read part of the table: `live`, the entries read (those
    /// that changed and a slice of the sweep), and `kept` as in
    /// [`Tracker::poll`]. Connections not read are remembered as they were. When
    /// `cycle_done`, the sweep has just been round the whole table: what it
    /// did not meet, and no packet brought back, is gone without the agent
    /// removing it, so evicted.
    #[allow(clippy::too_many_arguments)]
    pub fn poll_part(
        &mut self,
        live: &[(FlowKey, FlowValue)],
        kept: &[FlowKey],
        cycle_done: bool,
        totals: [u64; STAT_COUNT as usize],
        ifaces: Vec<String>,
        time_unix_ms: u64,
        removed: u64,
    ) -> Poll {
        let held = self.held;
        let mut u = self.update(live, kept, cycle_done);
        u.flows_active += live.len().saturating_sub(held.from) + held.quiet;
        self.finish(u, totals, ifaces, time_unix_ms, removed)
    }

    /// A connection that ended without being held (retired by a new SYN
    /// on its tuple, timed out, evicted or flushed): what it counted since
    /// it was last read, and it is forgotten. Given before the poll whose
    /// live entries may hold its tuple's next connection, which then
    /// starts from zero.
    pub fn end(&mut self, k: &FlowKey, v: &FlowValue) {
        let before = self.forget(k);
        let u = &mut self.pending;
        if before.is_none() {
            *u.opened.entry(k.ifindex).or_default() += 1;
        }
        u.delta.add(k, v, &Digest::of(v), before.as_ref());
    }

    /// What was remembered of `k`, forgotten. Short connections end
    /// before any poll sees them open, so the map is often empty; hashing
    /// the key to find that out was a thirtieth of the agent's work on
    /// them (docs/performance.md).
    fn forget(&mut self, k: &FlowKey) -> Option<Digest> {
        if self.prev.is_empty() {
            return None;
        }
        self.prev.remove(k)
    }

    /// A connection the agent has taken out of the table to hold through
    /// its linger: counted as a live entry read now would be (new, or what
    /// it added since it was last read), and forgotten here. It is then
    /// counted again only for what [`Tracker::merge`] adds, and its end
    /// adds nothing.
    pub fn hold(&mut self, k: &FlowKey, v: &FlowValue) {
        let now = Digest::of(v);
        let mut before = self.forget(k);
        let u = &mut self.pending;
        if let Some(b) = before.filter(|b| b.replaced_by(&now)) {
            // Evicted, and its tuple in use again (see `update`).
            u.vanished.push((*k, b.value()));
            before = None;
        }
        if before.is_none() {
            u.flows_new += 1;
            *u.opened.entry(k.ifindex).or_default() += 1;
        }
        u.delta.add(k, v, &now, before.as_ref());
    }

    /// Trailing packets the agent merged into the connection it holds on
    /// `k`, which was `before` and is now `merged`: what they added is
    /// counted, on the sides the whole connection gives them.
    pub fn merge(&mut self, k: &FlowKey, before: &FlowValue, merged: &FlowValue) {
        self.pending
            .delta
            .add(k, merged, &Digest::of(merged), Some(&Digest::of(before)));
    }

    /// Takes in what a poll read, in place, after what was given since the
    /// previous poll. Each tuple's delta is what all its lifetimes counted
    /// since the previous poll: an ended lifetime continues the remembered
    /// counts, so it consumes them; a live entry on the same tuple then
    /// starts from zero, as the new connection it is. The live entries from
    /// [`HeldPart::from`] on are held connections, counted when given:
    /// they are only listed as changed. Entries read (and `kept`) are
    /// marked with the current sweep cycle; when `cycle_done`, those the
    /// cycle never met are vanished.
    fn update(
        &mut self,
        live: &[(FlowKey, FlowValue)],
        kept: &[FlowKey],
        cycle_done: bool,
    ) -> Update {
        let Update {
            mut delta,
            mut opened,
            mut changed,
            mut vanished,
            mut flows_new,
            ..
        } = std::mem::take(&mut self.pending);
        let held = std::mem::take(&mut self.held);
        let (table, held_live) = live.split_at(held.from.min(live.len()));
        for (k, v) in table {
            let now = Digest {
                seen: self.cycle,
                ..Digest::of(v)
            };
            let mut before = self.prev.insert(*k, now);
            if let Some(b) = before.filter(|b| b.replaced_by(&now)) {
                // Evicted, and its tuple in use again: reported as evicted,
                // the entry now there counted as new.
                vanished.push((*k, b.value()));
                before = None;
            }
            if before.is_none() {
                flows_new += 1;
                *opened.entry(k.ifindex).or_default() += 1;
            }
            delta.add(k, v, &now, before.as_ref());
            if !self.skip_changed && before.map(|b| b.dir) != Some(now.dir) {
                changed.push(Conn::new(*k, *v));
            }
        }
        if !self.skip_changed {
            changed.extend(held_live.iter().map(|(k, v)| Conn::new(*k, *v)));
        }
        for k in kept {
            if let Some(d) = self.prev.get_mut(k) {
                d.seen = self.cycle;
            }
        }
        if cycle_done {
            let cycle = self.cycle;
            self.prev.retain(|k, d| {
                let stays = d.seen == cycle;
                if !stays {
                    vanished.push((*k, d.value()));
                }
                stays
            });
            self.cycle = self.cycle.wrapping_add(1);
        }
        Update {
            delta,
            opened,
            changed,
            vanished,
            flows_new,
            flows_active: self.prev.len(),
        }
    }

    /// Tells the next poll that its live entries from `from` on are
    /// connections the agent holds through their linger (taken out of the
    /// table, or merged into, since the last poll), and that it holds
    /// `quiet` more, unchanged, which the poll is not given: those are
    /// remembered as they were, and counted as in the table, until they
    /// end, without a lookup each poll.
    pub fn set_held(&mut self, from: usize, quiet: usize) {
        self.held = HeldPart { from, quiet };
    }

    /// How many connections the tracker remembers (those in the table, as
    /// far as it has seen).
    pub fn tracked(&self) -> usize {
        self.prev.len()
    }

    fn finish(
        &mut self,
        mut u: Update,
        totals: [u64; STAT_COUNT as usize],
        ifaces: Vec<String>,
        time_unix_ms: u64,
        removed: u64,
    ) -> Poll {
        u.vanished
            .sort_by_key(|(k, v)| (v.dir[0].first_ns.max(v.dir[1].first_ns), *k));
        u.changed
            .sort_by_key(|c| std::cmp::Reverse(c.value.dir[0].packets + c.value.dir[1].packets));
        let interval_ms = self
            .prev_time_unix_ms
            .map_or(0, |p| time_unix_ms.saturating_sub(p));
        // Entries leave the table by the agent's removal or by eviction
        // (a retired connection's entry is reused, not removed), so the
        // rest of what the kernel created and no longer holds was evicted.
        // The agent reads the counters before the table, so entries created
        // in between are in the table but not yet in `created`: the estimate
        // can dip for a poll, never overshoot, and the highest is the count.
        let flows_evicted = self.evicted.max(
            totals[STAT_FLOWS_CREATED as usize].saturating_sub(u.flows_active as u64 + removed),
        );
        self.evicted = flows_evicted;
        self.prev_time_unix_ms = Some(time_unix_ms);
        Poll {
            time_unix_ms,
            interval_ms,
            ifaces,
            totals,
            flows_evicted,
            flows_active: u.flows_active,
            flows_new: u.flows_new,
            delta: u.delta.total,
            sides: u.delta.sides,
            opened: u.opened,
            changed: u.changed,
            vanished: u.vanished,
        }
    }
}

/// What one poll changed, before it is summed up.
#[derive(Default)]
struct Update {
    delta: Deltas,
    opened: BTreeMap<u32, u64>,
    changed: Vec<Conn>,
    vanished: Vec<(FlowKey, FlowValue)>,
    flows_new: usize,
    flows_active: usize,
}

/// Converts kernel times (CLOCK_MONOTONIC ns) to Unix time in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Unix time minus monotonic time, in ns.
    pub offset_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let mono =
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
        let real =
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME).expect("CLOCK_REALTIME");
        let ns = |t: nix::sys::time::TimeSpec| {
            i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
        };
        Self {
            offset_ns: ns(real) - ns(mono),
        }
    }

    /// Seconds since the Unix epoch for kernel time `ns`; `None` for 0 ("never").
    pub fn unix_secs(&self, ns: u64) -> Option<f64> {
        (ns != 0).then(|| (i128::from(ns) + self.offset_ns) as f64 / 1e9)
    }
}

fn iface_name<'a>(names: &'a HashMap<u32, String>, ifindex: u32) -> std::borrow::Cow<'a, str> {
    names
        .get(&ifindex)
        .map_or_else(|| ifindex.to_string().into(), |n| n.as_str().into())
}

/// The poll as one JSON object (`flowmon run --json`, one per line). Live
/// connections are classified as of kernel time `now_ns`.
pub fn poll_json(
    p: &Poll,
    names: &HashMap<u32, String>,
    clock: &Clock,
    now_ns: u64,
    t: &Timeouts,
) -> Value {
    let mut totals = Map::new();
    for (name, v) in STAT_NAMES.iter().zip(p.totals) {
        totals.insert((*name).to_string(), json!(v));
    }
    totals.insert("flows_evicted".into(), json!(p.flows_evicted));
    json!({
        "schema": SCHEMA_VERSION,
        "time": p.time_unix_ms as f64 / 1e3,
        "interval_ms": p.interval_ms,
        "ifaces": p.ifaces,
        "totals": totals,
        "flows_active": p.flows_active,
        "flows_new": p.flows_new,
        "delta": p.delta,
        "changed": p
            .changed
            .iter()
            .map(|c| ConnRecord::new(*c, iface_name(names, c.key.ifindex).into(), now_ns, t, clock.offset_ns).to_json())
            .collect::<Vec<_>>(),
    })
}

/// The poll as a compact text block: one summary line, then the busiest
/// changed connections (at most `max_conns`).
pub fn poll_text(p: &Poll, names: &HashMap<u32, String>, max_conns: usize) -> String {
    let t = &p.totals;
    let d = &p.delta;
    let secs = p.time_unix_ms / 1000;
    let mut s = format!(
        "{:02}:{:02}:{:02} {} | conns {} ({} new) | pkts {} | SYN {} SYN-ACK {} FIN {} RST {} | non-TCP {} malformed {} fragments {} evicted {}\n",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        p.ifaces.join(","),
        p.flows_active,
        p.flows_new,
        d.packets,
        d.syn,
        d.synack,
        d.fin,
        d.rst,
        t[2],
        t[3],
        t[4],
        p.flows_evicted,
    );
    for c in p.changed.iter().take(max_conns) {
        let (cip, cport) = c.client();
        let (sip, sport) = c.server();
        let (clt, srv) = (c.clt(), c.srv());
        let arrow = if c.direction_guessed { "?>" } else { "->" };
        let _ = writeln!(
            s,
            "  {:<8} {} {arrow} {}  pkts {}/{}  SYN {}/{}  FIN {}/{}  RST {}/{}",
            iface_name(names, c.key.ifindex),
            fmt_endpoint(cip, cport),
            fmt_endpoint(sip, sport),
            clt.packets,
            srv.packets,
            clt.syn,
            srv.synack,
            clt.fin,
            srv.fin,
            clt.rst,
            srv.rst,
        );
    }
    if p.changed.len() > max_conns {
        let _ = writeln!(s, "  ... and {} more", p.changed.len() - max_conns);
    }
    s
}

/// A finished connection as one text line under the poll summary.
pub fn closed_text(r: &crate::record::ConnRecord) -> String {
    let c = &r.conn;
    let (cip, cport) = c.client();
    let (sip, sport) = c.server();
    let (clt, srv) = (c.clt(), c.srv());
    format!(
        "  closed   {} {} {}  {} by {}  {} {}  pkts {}/{}  FIN {}/{}  RST {}/{}\n",
        fmt_endpoint(cip, cport),
        if c.direction_guessed { "?>" } else { "->" },
        fmt_endpoint(sip, sport),
        r.close.as_str(),
        r.closed_by.as_str(),
        r.conn_state(),
        r.history(),
        clt.packets,
        srv.packets,
        clt.fin,
        srv.fin,
        clt.rst,
        srv.rst,
    )
}

fn fmt_endpoint(ip: std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V4(_) => format!("{ip}:{port}"),
        std::net::IpAddr::V6(_) => format!("[{ip}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use flowmon_common::flow::{DIR_A_TO_B, DIR_B_TO_A};

    use super::*;

    fn flow(port_b: u16, clt_pkts: u64, srv_pkts: u64) -> (FlowKey, FlowValue) {
        let mut k = FlowKey {
            port_a: 80,
            port_b,
            family: 4,
            ifindex: 3,
            ..Default::default()
        };
        k.addr_a[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.addr_b[..4].copy_from_slice(&[10, 0, 0, 2]);
        let mut v = FlowValue::default();
        v.dir[DIR_B_TO_A].packets = clt_pkts;
        v.dir[DIR_B_TO_A].syn = 1;
        v.dir[DIR_B_TO_A].first_ns = 1_000_000_000;
        v.dir[DIR_A_TO_B].packets = srv_pkts;
        v.dir[DIR_A_TO_B].synack = 1;
        v.dir[DIR_A_TO_B].rst = 1;
        v.dir[DIR_A_TO_B].last_ns = 3_500_000_000;
        (k, v)
    }

    fn totals(created: u64) -> [u64; STAT_COUNT as usize] {
        let mut t = [0; STAT_COUNT as usize];
        t[STAT_FLOWS_CREATED as usize] = created;
        t
    }

    /// A poll given `ended` as the agent gives what ended unheld.
    #[allow(clippy::too_many_arguments)]
    fn poll(
        tr: &mut Tracker,
        live: &[(FlowKey, FlowValue)],
        ended: &[(FlowKey, FlowValue)],
        kept: &[FlowKey],
        totals: [u64; STAT_COUNT as usize],
        ifaces: Vec<String>,
        time_unix_ms: u64,
        removed: u64,
    ) -> Poll {
        for (k, v) in ended {
            tr.end(k, v);
        }
        tr.poll(live, kept, totals, ifaces, time_unix_ms, removed)
    }

    #[test]
    fn deltas_count_only_what_is_new() {
        let mut tr = Tracker::default();
        let p = poll(
            &mut tr,
            &[flow(40000, 3, 2)],
            &[],
            &[],
            totals(1),
            vec!["veth0".into()],
            10_000,
            0,
        );
        assert_eq!(
            (
                p.flows_new,
                p.delta.packets,
                p.delta.syn,
                p.delta.synack,
                p.delta.rst
            ),
            (1, 5, 1, 1, 1)
        );
        assert_eq!(
            (
                p.sides[0].packets,
                p.sides[0].syn,
                p.sides[1].packets,
                p.sides[1].synack
            ),
            (3, 1, 2, 1),
            "client and server sides"
        );
        assert_eq!(p.opened, BTreeMap::from([(3, 1)]));
        let p = poll(
            &mut tr,
            &[flow(40000, 5, 2), flow(40001, 1, 1)],
            &[],
            &[],
            totals(2),
            vec!["veth0".into()],
            11_000,
            0,
        );
        assert_eq!(
            (p.flows_new, p.delta.packets, p.delta.syn, p.interval_ms),
            (1, 4, 1, 1000)
        );
        assert_eq!(p.changed.len(), 2);
        assert_eq!(p.changed[0].key.port_b, 40000, "busiest first");
        let p = poll(
            &mut tr,
            &[flow(40000, 5, 2), flow(40001, 1, 1)],
            &[],
            &[],
            totals(2),
            vec!["veth0".into()],
            12_000,
            0,
        );
        assert_eq!(
            (p.delta, p.changed.len(), p.flows_evicted),
            (Counts::default(), 0, 0)
        );
    }

    #[test]
    fn deltas_include_connections_that_ended() {
        let mut tr = Tracker::default();
        poll(
            &mut tr,
            &[flow(40000, 3, 2)],
            &[],
            &[],
            totals(1),
            vec![],
            0,
            0,
        );
        // The connection ended at 4/2 and a new one on the same tuple has 1/0.
        let p = poll(
            &mut tr,
            &[flow(40000, 1, 0)],
            &[flow(40000, 4, 2)],
            &[],
            totals(1),
            vec![],
            1_000,
            1,
        );
        assert_eq!(
            p.delta.packets, 2,
            "one more packet in the old lifetime, one in the new"
        );
        assert_eq!(p.opened, BTreeMap::from([(3, 1)]), "the new lifetime");
    }

    #[test]
    fn entries_gone_from_the_table_are_evictions() {
        let mut tr = Tracker::default();
        let p = poll(&mut tr, &[flow(1, 1, 1)], &[], &[], totals(5), vec![], 0, 1);
        assert_eq!(
            p.flows_evicted, 3,
            "5 created, 1 live, 1 removed by the agent"
        );
        // Entries counted in the table but not yet in `created` (read
        // first) make the estimate dip: the count never goes back.
        let p = poll(
            &mut tr,
            &[flow(1, 1, 1), flow(2, 1, 1), flow(3, 1, 1)],
            &[],
            &[],
            totals(6),
            vec![],
            0,
            1,
        );
        assert_eq!(p.flows_evicted, 3);
    }

    #[test]
    fn connections_gone_unremoved_are_reported_as_last_seen() {
        let mut tr = Tracker::default();
        let (a, b, c) = (flow(40000, 3, 2), flow(40001, 4, 1), flow(40002, 1, 0));
        poll(&mut tr, &[a, b, c], &[], &[], totals(3), vec![], 0, 0);
        // `a` ended (removed by the agent), `b` was left by a take and is
        // not in the live list, `c` vanished: only `c` was evicted.
        let p = poll(&mut tr, &[], &[a], &[b.0], totals(3), vec![], 1000, 1);
        assert_eq!(p.vanished.len(), 1);
        let (k, v) = p.vanished[0];
        assert_eq!(k, c.0);
        let (clt, srv) = (&v.dir[DIR_B_TO_A], &v.dir[DIR_A_TO_B]);
        assert_eq!(
            (clt.packets, clt.syn, srv.packets, srv.synack, srv.rst),
            (1, 1, 0, 0, 0),
            "the counts as last polled; the silent direction stays empty"
        );
        assert_eq!(
            (clt.first_ns, clt.first_syn_ns, clt.last_ns),
            (1_000_000_000, 1_000_000_000, 4_000_000_000),
            "times to the second: first rounded down, last up"
        );
        // `b` is still remembered: its next poll counts only what is new.
        let p = poll(&mut tr, &[b], &[], &[], totals(3), vec![], 2000, 1);
        assert_eq!((p.delta.packets, p.flows_new, p.vanished.len()), (0, 0, 0));
    }

    #[test]
    fn held_connections_are_counted_when_held_and_merged_not_when_they_end() {
        let mut tr = Tracker::default();
        let (a, b) = (flow(40000, 3, 2), flow(40001, 4, 1));
        // `b` is in the table; `a` was just taken and is held (last in the
        // live list).
        tr.hold(&a.0, &a.1);
        tr.set_held(1, 0);
        let p = poll(&mut tr, &[b, a], &[], &[], totals(2), vec![], 0, 1);
        assert_eq!((p.delta.packets, p.flows_new, p.flows_active), (10, 2, 2));
        assert_eq!(p.opened, BTreeMap::from([(3, 2)]));
        assert_eq!(p.changed.len(), 2, "both are new");
        assert_eq!(tr.tracked(), 1, "the held one is the agent's to remember");
        // Unchanged and held, so not given: not vanished, still active.
        tr.set_held(1, 1);
        let p = poll(&mut tr, &[b], &[], &[], totals(2), vec![], 1000, 1);
        assert_eq!(
            (p.vanished.len(), p.flows_active, p.delta.packets),
            (0, 2, 0)
        );
        // A trailing packet from the client merged into it: counted on the
        // client's side, changed, and still held.
        let mut trailing = FlowValue::default();
        trailing.dir[DIR_B_TO_A].packets = 1;
        trailing.dir[DIR_B_TO_A].fin = 1;
        let mut more = a;
        more.1.merge(&trailing);
        tr.merge(&a.0, &a.1, &more.1);
        tr.set_held(1, 0);
        let p = poll(&mut tr, &[b, more], &[], &[], totals(3), vec![], 2000, 2);
        assert_eq!(
            (
                p.delta.packets,
                p.delta.fin,
                p.sides[0].packets,
                p.sides[0].fin
            ),
            (1, 1, 1, 1)
        );
        assert_eq!((p.flows_new, p.flows_active, p.changed.len()), (0, 2, 1));
        assert!(p.opened.is_empty());
        tr.set_held(1, 1);
        let p = poll(&mut tr, &[b], &[], &[], totals(3), vec![], 3000, 2);
        assert_eq!(p.vanished.len(), 0);
        // Its linger over: the agent reports it, the tracker adds nothing.
        tr.set_held(1, 0);
        let p = poll(&mut tr, &[b], &[], &[], totals(3), vec![], 4000, 2);
        assert_eq!((p.delta.packets, p.flows_active, tr.tracked()), (0, 1, 1));
    }

    #[test]
    fn a_connection_read_live_then_held_counts_only_what_it_added() {
        let mut tr = Tracker::default();
        let a = flow(40000, 3, 2);
        poll(&mut tr, &[a], &[], &[], totals(1), vec![], 0, 0);
        // Read open last poll; now final, taken and held with 2 packets more.
        let later = flow(40000, 4, 3);
        tr.hold(&later.0, &later.1);
        tr.set_held(0, 0);
        let p = poll(&mut tr, &[later], &[], &[], totals(1), vec![], 1000, 1);
        assert_eq!(
            (
                p.delta.packets,
                p.flows_new,
                p.flows_active,
                p.vanished.len()
            ),
            (2, 0, 1, 0)
        );
        assert_eq!(tr.tracked(), 0);
    }

    #[test]
    fn a_partial_poll_counts_held_connections_as_active() {
        let mut tr = Tracker::default();
        let (a, b) = (flow(40000, 3, 2), flow(40001, 4, 1));
        tr.hold(&a.0, &a.1);
        tr.set_held(1, 4);
        let p = tr.poll_part(&[b, a], &[], false, totals(6), vec![], 0, 1);
        assert_eq!((p.flows_active, p.flows_new, p.delta.packets), (6, 2, 10));
    }

    #[test]
    fn an_entry_evicted_and_made_again_between_polls_is_reported() {
        let mut tr = Tracker::default();
        let a = flow(40000, 5, 4);
        poll(&mut tr, &[a], &[], &[], totals(1), vec![], 0, 0);
        // The same tuple, fewer packets and no SYN: another entry (the
        // tuple's later packets, after an eviction the agent never saw).
        let mut again = flow(40000, 2, 1);
        again.1.dir[DIR_B_TO_A].syn = 0;
        let p = poll(&mut tr, &[again], &[], &[], totals(2), vec![], 1000, 0);
        assert_eq!(p.vanished.len(), 1);
        assert_eq!(p.vanished[0].1.dir[DIR_B_TO_A].packets, 5);
        assert_eq!((p.flows_new, p.delta.packets, p.flows_active), (1, 3, 1));
        // More packets on the same entry: just a delta.
        let mut more = flow(40000, 3, 1);
        more.1.dir[DIR_B_TO_A].syn = 0;
        let p = poll(&mut tr, &[more], &[], &[], totals(2), vec![], 2000, 0);
        assert_eq!((p.vanished.len(), p.flows_new, p.delta.packets), (0, 0, 1));
        // Fewer packets with a SYN: a retired connection's successor, whose
        // predecessor the ring buffer brings; nothing is reported here.
        let p = poll(
            &mut tr,
            &[flow(40000, 1, 0)],
            &[],
            &[],
            totals(3),
            vec![],
            3000,
            0,
        );
        assert_eq!(p.vanished.len(), 0);
    }

    #[test]
    fn json_uses_the_connection_vocabulary() {
        let mut tr = Tracker::default();
        let p = poll(
            &mut tr,
            &[flow(40000, 3, 2)],
            &[],
            &[],
            totals(1),
            vec!["veth0".into()],
            10_000,
            0,
        );
        let names = HashMap::from([(3, "veth0".to_string())]);
        let clock = Clock {
            offset_ns: 1_700_000_000_000_000_000,
        };
        let j = poll_json(&p, &names, &clock, 4_000_000_000, &Timeouts::default());
        let c = &j["changed"][0];
        assert_eq!(c["client.ip"], "10.0.0.2");
        assert_eq!(c["client.port"], 40000);
        assert_eq!(c["server.ip"], "10.0.0.1");
        assert_eq!(c["server.port"], 80);
        assert_eq!(c["iface"], "veth0");
        assert_eq!(
            (c["pkts.clt"].as_u64(), c["pkts.srv"].as_u64()),
            (Some(3), Some(2))
        );
        assert_eq!(
            (
                c["syn.count.clt"].as_u64(),
                c["rst.count.srv"].as_u64(),
                c["rst.count"].as_u64()
            ),
            (Some(1), Some(1), Some(1))
        );
        assert_eq!(c["first_seen"].as_f64(), Some(1_700_000_001.0));
        assert_eq!(c["duration"].as_f64(), Some(2.5));
        assert_eq!(c["direction_guessed"], false);
        assert_eq!(
            (
                c["close"].as_str(),
                c["closed_by"].as_str(),
                c["conn_state"].as_str()
            ),
            (Some("rst"), Some("server"), Some("REJ"))
        );
        assert_eq!(j["totals"]["flows_created"], 1);
        assert_eq!(j["schema"], SCHEMA_VERSION);
    }

    #[test]
    fn text_names_client_then_server() {
        let mut tr = Tracker::default();
        let p = poll(
            &mut tr,
            &[flow(40000, 3, 2)],
            &[],
            &[],
            totals(1),
            vec!["veth0".into()],
            3_600_000 + 61_000,
            0,
        );
        let names = HashMap::from([(3, "veth0".to_string())]);
        let text = poll_text(&p, &names, 10);
        assert_eq!(
            text,
            "01:01:01 veth0 | conns 1 (1 new) | pkts 5 | SYN 1 SYN-ACK 1 FIN 0 RST 1 | non-TCP 0 malformed 0 fragments 0 evicted 0\n  \
             veth0    10.0.0.2:40000 -> 10.0.0.1:80  pkts 3/2  SYN 1/1  FIN 0/0  RST 0/1\n"
        );
    }
}
