//! IPFIX export (RFC 7011): one bidirectional record (RFC 5103) per
//! finished connection, and periodic records for long-lived ones (active
//! timeout). This module builds the messages; the agent sends them over UDP.
//!
//! The source of every record is the client (the initiator, biflowDirection
//! 1; 0 "arbitrary" when the direction was guessed from the ports). Forward
//! elements describe what the client sent, reverse elements (PEN 29305)
//! what the server sent. Packet and octet counts are deltas since the
//! connection's previous record; the flag counts are totals.
//!
//! The close class and the closing side travel in two enterprise elements
//! under [`DEFAULT_PEN`] (32473, the number RFC 5612 reserves for
//! documentation: a site with its own PEN passes it with `--ipfix-pen`).

use std::{net::IpAddr, time::Duration};

use flowmon_common::flow::{DirStats, FlowKey, FlowValue};
use rustc_hash::FxHashMap;

use crate::{
    close::{Close, ClosedBy},
    model::Conn,
    record::ConnRecord,
};

/// RFC 5103's PEN for reverse information elements.
pub const REVERSE_PEN: u32 = 29305;
/// flowmon's enterprise elements live under this PEN unless told otherwise.
pub const DEFAULT_PEN: u32 = 32473;
/// Enterprise element: the close class, one octet (see [`close_code`]).
pub const IE_CLOSE_CLASS: u16 = 1;
/// Enterprise element: who closed, one octet (see [`closed_by_code`]).
pub const IE_CLOSED_BY: u16 = 2;

pub const TEMPLATE_V4: u16 = 256;
pub const TEMPLATE_V6: u16 = 257;

/// Messages stay below this, so a record never needs IP fragmentation on
/// an Ethernet path.
const MAX_MESSAGE: usize = 1400;

/// flowEndReason (IANA registry, element 136).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EndReason {
    IdleTimeout = 1,
    ActiveTimeout = 2,
    EndOfFlow = 3,
    ForcedEnd = 4,
    LackOfResources = 5,
}

impl EndReason {
    /// Why a reported connection ended.
    pub fn of(close: Close) -> Self {
        match close {
            Close::Fin | Close::FinRst | Close::Rst | Close::Refused | Close::OrphanRst => {
                EndReason::EndOfFlow
            }
            Close::Unanswered | Close::HalfClosed | Close::Idle => EndReason::IdleTimeout,
            // Still open when the agent stopped.
            Close::Open | Close::Connecting => EndReason::ForcedEnd,
            Close::Evicted => EndReason::LackOfResources,
        }
    }
}

/// The close class as the enterprise element carries it: its position in
/// [`Close::ALL`] plus one (fin 1, fin-rst 2, rst 3, refused 4, unanswered 5,
/// half-closed 6, open 7, idle 8, connecting 9, orphan-rst 10, evicted 11).
pub fn close_code(c: Close) -> u8 {
    Close::ALL.iter().position(|x| *x == c).expect("in ALL") as u8 + 1
}

/// Who closed: client 1, server 2, both 3, none 0.
pub fn closed_by_code(c: ClosedBy) -> u8 {
    match c {
        ClosedBy::None => 0,
        ClosedBy::Client => 1,
        ClosedBy::Server => 2,
        ClosedBy::Both => 3,
    }
}

/// (element id, length, enterprise number) of every field, in order, for
/// addresses of `addr_len` bytes.
fn fields(v6: bool, pen: u32) -> Vec<(u16, u16, Option<u32>)> {
    let r = Some(REVERSE_PEN);
    let (src, dst, alen) = if v6 { (27, 28, 16) } else { (8, 12, 4) };
    vec![
        (src, alen, None),
        (dst, alen, None),
        (7, 2, None),   // sourceTransportPort
        (11, 2, None),  // destinationTransportPort
        (4, 1, None),   // protocolIdentifier
        (10, 4, None),  // ingressInterface
        (58, 2, None),  // vlanId
        (152, 8, None), // flowStartMilliseconds
        (153, 8, None), // flowEndMilliseconds
        (2, 8, None),   // packetDeltaCount
        (1, 8, None),   // octetDeltaCount
        (2, 8, r),
        (1, 8, r),
        (6, 2, None), // tcpControlBits
        (6, 2, r),
        (218, 8, None), // tcpSynTotalCount
        (219, 8, None), // tcpFinTotalCount
        (220, 8, None), // tcpRstTotalCount
        (218, 8, r),
        (219, 8, r),
        (220, 8, r),
        (136, 1, None), // flowEndReason
        (239, 1, None), // biflowDirection
        (IE_CLOSE_CLASS, 1, Some(pen)),
        (IE_CLOSED_BY, 1, Some(pen)),
    ]
}

fn template_record(id: u16, v6: bool, pen: u32) -> Vec<u8> {
    let f = fields(v6, pen);
    let mut b = Vec::new();
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&(f.len() as u16).to_be_bytes());
    for (ie, len, ent) in f {
        match ent {
            Some(pen) => {
                b.extend_from_slice(&(ie | 0x8000).to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&pen.to_be_bytes());
            }
            None => {
                b.extend_from_slice(&ie.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
            }
        }
    }
    b
}

/// One record to send.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowRecord {
    pub client: (IpAddr, u16),
    pub server: (IpAddr, u16),
    pub ifindex: u32,
    pub vlan: u16,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Deltas since the previous record: `[client, server]`.
    pub packets: [u64; 2],
    pub octets: [u64; 2],
    pub flags: [u16; 2],
    /// Totals (SYN counts packets with SYN set, so the server's includes
    /// its SYN-ACKs).
    pub syn: [u64; 2],
    pub fin: [u64; 2],
    pub rst: [u64; 2],
    pub reason: EndReason,
    pub guessed: bool,
    pub close: Close,
    pub closed_by: ClosedBy,
}

/// The union of TCP flags one side sent, as far as the counters tell: ACK
/// when it sent a SYN-ACK, a pure ACK or data (PSH, URG, ECE and CWR are
/// not tracked).
pub fn control_bits(d: &DirStats) -> u16 {
    let mut f = 0;
    if d.fin > 0 {
        f |= 0x01;
    }
    if d.syn + d.synack > 0 {
        f |= 0x02;
    }
    if d.rst > 0 {
        f |= 0x04;
    }
    if d.synack > 0 || d.first_ack_ns != 0 || d.data_packets > 0 {
        f |= 0x10;
    }
    f
}

impl FlowRecord {
    /// A record for connection `c`; `before` is what earlier records of it
    /// already carried (packets and octets by canonical direction).
    pub fn new(
        c: &Conn,
        before: &Sent,
        offset_ns: i128,
        reason: EndReason,
        close: Close,
        closed_by: ClosedBy,
    ) -> Self {
        let ms = |ns: u64| ((i128::from(ns) + offset_ns) / 1_000_000).max(0) as u64;
        let dirs = [c.client_dir, 1 - c.client_dir];
        let d = |i: usize| &c.value.dir[dirs[i]];
        let pair = |f: &dyn Fn(usize) -> u64| [f(0), f(1)];
        Self {
            client: c.client(),
            server: c.server(),
            ifindex: c.key.ifindex,
            vlan: c.key.vlan,
            start_ms: ms(c.first_ns()),
            end_ms: ms(c.last_ns()),
            packets: pair(&|i| d(i).packets.saturating_sub(before.packets[dirs[i]])),
            octets: pair(&|i| d(i).bytes.saturating_sub(before.octets[dirs[i]])),
            flags: [control_bits(d(0)), control_bits(d(1))],
            syn: pair(&|i| u64::from(d(i).syn + d(i).synack)),
            fin: pair(&|i| u64::from(d(i).fin)),
            rst: pair(&|i| u64::from(d(i).rst)),
            reason,
            guessed: c.direction_guessed,
            close,
            closed_by,
        }
    }

    fn v6(&self) -> bool {
        self.client.0.is_ipv6()
    }

    fn encode(&self, b: &mut Vec<u8>) {
        let ip = |b: &mut Vec<u8>, a: IpAddr| match a {
            IpAddr::V4(a) => b.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => b.extend_from_slice(&a.octets()),
        };
        ip(b, self.client.0);
        ip(b, self.server.0);
        b.extend_from_slice(&self.client.1.to_be_bytes());
        b.extend_from_slice(&self.server.1.to_be_bytes());
        b.push(6);
        b.extend_from_slice(&self.ifindex.to_be_bytes());
        b.extend_from_slice(&self.vlan.to_be_bytes());
        for v in [
            self.start_ms,
            self.end_ms,
            self.packets[0],
            self.octets[0],
            self.packets[1],
            self.octets[1],
        ] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&self.flags[0].to_be_bytes());
        b.extend_from_slice(&self.flags[1].to_be_bytes());
        for v in [
            self.syn[0],
            self.fin[0],
            self.rst[0],
            self.syn[1],
            self.fin[1],
            self.rst[1],
        ] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.push(self.reason as u8);
        b.push(if self.guessed { 0 } else { 1 });
        b.push(close_code(self.close));
        b.push(closed_by_code(self.closed_by));
    }
}

/// What earlier records of a long-lived connection carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// By canonical direction.
    pub packets: [u64; 2],
    pub octets: [u64; 2],
    first_ns: u64,
    last_export_ns: u64,
    /// The poll that last saw it in the table (entries gone from the table
    /// without a record are forgotten).
    seen: u64,
}

/// Export settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub domain: u32,
    /// A connection open this long gets a record (flowEndReason 2), and
    /// another every `active_timeout` after.
    pub active_timeout: Duration,
    /// Templates go out again after this long (UDP loses them otherwise).
    pub template_refresh: Duration,
    pub pen: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            domain: 1,
            active_timeout: Duration::from_secs(60),
            template_refresh: Duration::from_secs(60),
            pen: DEFAULT_PEN,
        }
    }
}

/// The exporting process: message sequence, templates, and what was sent
/// of long-lived connections.
pub struct Exporter {
    opts: Options,
    /// Data records sent so far (the header's sequence number).
    sequence: u32,
    last_templates_ms: Option<u64>,
    sent: FxHashMap<FlowKey, Sent>,
    polls: u64,
}

impl Exporter {
    pub fn new(opts: Options) -> Self {
        Self {
            opts,
            sequence: 0,
            last_templates_ms: None,
            sent: FxHashMap::default(),
            polls: 0,
        }
    }

    /// Records for one poll: every connection reported as finished
    /// (`closed`; with `forced`, as the agent stops, open ones get
    /// flowEndReason 4) and every live connection due for an active-timeout
    /// record. `now_ns` is kernel time, `offset_ns` turns it into Unix time.
    pub fn records(
        &mut self,
        closed: &[ConnRecord],
        live: &[(FlowKey, FlowValue)],
        now_ns: u64,
        offset_ns: i128,
    ) -> Vec<FlowRecord> {
        self.polls += 1;
        let mut out = Vec::new();
        for r in closed {
            let before = match self.sent.remove(&r.conn.key) {
                Some(s) if s.first_ns == r.conn.first_ns() => s,
                _ => Sent::default(),
            };
            out.push(FlowRecord::new(
                &r.conn,
                &before,
                offset_ns,
                EndReason::of(r.close),
                r.close,
                r.closed_by,
            ));
        }
        let active = self.opts.active_timeout.as_nanos() as u64;
        for (k, v) in live {
            let c = Conn::new(*k, *v);
            let s = self.sent.get(k).filter(|s| s.first_ns == c.first_ns());
            let since = s.map_or(c.first_ns(), |s| s.last_export_ns);
            if now_ns.saturating_sub(since) < active {
                if let Some(s) = self.sent.get_mut(k) {
                    s.seen = self.polls;
                }
                continue;
            }
            let before = s.copied().unwrap_or_default();
            out.push(FlowRecord::new(
                &c,
                &before,
                offset_ns,
                EndReason::ActiveTimeout,
                Close::Open,
                ClosedBy::None,
            ));
            self.sent.insert(
                *k,
                Sent {
                    packets: [v.dir[0].packets, v.dir[1].packets],
                    octets: [v.dir[0].bytes, v.dir[1].bytes],
                    first_ns: c.first_ns(),
                    last_export_ns: now_ns,
                    seen: self.polls,
                },
            );
        }
        let polls = self.polls;
        self.sent.retain(|_, s| s.seen == polls);
        out
    }

    /// Packs `records` into messages at Unix time `now_ms`, templates first
    /// when they are due.
    pub fn messages(&mut self, records: &[FlowRecord], now_ms: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut rest = records;
        while !rest.is_empty() {
            let mut body = Vec::new();
            if self.last_templates_ms.is_none_or(|t| {
                now_ms.saturating_sub(t) >= self.opts.template_refresh.as_millis() as u64
            }) {
                let mut set = template_record(TEMPLATE_V4, false, self.opts.pen);
                set.extend(template_record(TEMPLATE_V6, true, self.opts.pen));
                push_set(&mut body, 2, &set);
                self.last_templates_ms = Some(now_ms);
            }
            let first_seq = self.sequence;
            // Consecutive records of one family share a data set.
            while let Some(first) = rest.first() {
                let v6 = first.v6();
                let mut set = Vec::new();
                let mut n = 0;
                for r in rest.iter().take_while(|r| r.v6() == v6) {
                    let mut one = Vec::new();
                    r.encode(&mut one);
                    if 16 + body.len() + 4 + set.len() + one.len() > MAX_MESSAGE && n > 0 {
                        break;
                    }
                    set.extend(one);
                    n += 1;
                }
                if n == 0 {
                    break;
                }
                if 16 + body.len() + 4 + set.len() > MAX_MESSAGE && !body.is_empty() {
                    break;
                }
                push_set(&mut body, if v6 { TEMPLATE_V6 } else { TEMPLATE_V4 }, &set);
                self.sequence = self.sequence.wrapping_add(n as u32);
                rest = &rest[n..];
            }
            out.push(header(&body, now_ms, first_seq, self.opts.domain));
        }
        out
    }
}

fn push_set(body: &mut Vec<u8>, id: u16, content: &[u8]) {
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(&((content.len() + 4) as u16).to_be_bytes());
    body.extend_from_slice(content);
}

fn header(body: &[u8], now_ms: u64, sequence: u32, domain: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + body.len());
    m.extend_from_slice(&10u16.to_be_bytes());
    m.extend_from_slice(&((16 + body.len()) as u16).to_be_bytes());
    m.extend_from_slice(&((now_ms / 1000) as u32).to_be_bytes());
    m.extend_from_slice(&sequence.to_be_bytes());
    m.extend_from_slice(&domain.to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Parses `udp://HOST:PORT`.
pub fn parse_target(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("udp://")
        .ok_or_else(|| format!("{s:?}: write the collector as udp://HOST:PORT (IPFIX over UDP)"))?;
    if rest
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(format!(
            "{s:?}: write the collector as udp://HOST:PORT, e.g. udp://127.0.0.1:4739"
        ));
    }
    Ok(rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interval::tests::conn;

    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_be_bytes([b[i], b[i + 1]])
    }

    fn u64_at(b: &[u8], i: usize) -> u64 {
        u64::from_be_bytes(b[i..i + 8].try_into().unwrap())
    }

    #[test]
    fn one_record_per_finished_connection() {
        let mut e = Exporter::new(Options::default());
        let recs = e.records(&[conn(1, 80, 2)], &[], 0, 1_000_000_000_000);
        assert_eq!(recs.len(), 1);
        let r = &recs[0];
        assert_eq!(r.client, ("10.0.1.1".parse().unwrap(), 40000));
        assert_eq!(r.server, ("10.0.0.1".parse().unwrap(), 80));
        assert_eq!(
            (r.packets, r.syn, r.rst, r.fin),
            ([3, 2], [1, 1], [0, 2], [0, 0])
        );
        assert_eq!(
            (r.start_ms, r.end_ms),
            (1_000_000, 1_000_000),
            "ns 1..6 after the epoch offset"
        );
        assert_eq!(
            (r.reason, r.close, r.flags),
            (EndReason::EndOfFlow, Close::Rst, [0x02, 0x16])
        );
        let msgs = e.messages(&recs, 1_795_000_000_000);
        assert_eq!(msgs.len(), 1);
        let m = &msgs[0];
        assert_eq!((u16_at(m, 0), u16_at(m, 2) as usize), (10, m.len()));
        assert_eq!(
            u32::from_be_bytes(m[8..12].try_into().unwrap()),
            0,
            "sequence"
        );
        // Template set: 25 fields, eight with an enterprise number.
        assert_eq!(
            (u16_at(m, 16), u16_at(m, 20), u16_at(m, 22)),
            (2, TEMPLATE_V4, 25)
        );
        let tset = u16_at(m, 18) as usize;
        assert_eq!(tset, 4 + 2 * (4 + 25 * 4 + 8 * 4), "v4 and v6 templates");
        let d = 16 + tset;
        assert_eq!(u16_at(m, d), TEMPLATE_V4);
        let rec = &m[d + 4..];
        assert_eq!(&rec[0..4], &[10, 0, 1, 1]);
        assert_eq!(u16_at(rec, 8), 40000);
        assert_eq!(u64_at(rec, 19 + 8 + 8), 3, "client packets");
        assert_eq!(
            rec.len(),
            4 + 4 + 2 + 2 + 1 + 4 + 2 + 6 * 8 + 2 * 2 + 6 * 8 + 4
        );
        assert_eq!(
            &rec[rec.len() - 4..],
            &[3, 1, 3, 2],
            "end of flow, initiator, rst, server"
        );
        // The next message carries no template and counts the record sent.
        let m = &e.messages(&recs, 1_795_000_001_000)[0];
        assert_eq!(
            (
                u16_at(m, 16),
                u32::from_be_bytes(m[8..12].try_into().unwrap())
            ),
            (TEMPLATE_V4, 1)
        );
    }

    #[test]
    fn long_lived_connections_get_active_records_with_deltas() {
        let opts = Options {
            active_timeout: Duration::from_secs(60),
            ..Options::default()
        };
        let mut e = Exporter::new(opts);
        let mut c = conn(1, 80, 0);
        let live = |c: &ConnRecord| vec![(c.conn.key, c.conn.value)];
        assert!(
            e.records(&[], &live(&c), 30_000_000_000, 0).is_empty(),
            "younger than the timeout"
        );
        let recs = e.records(&[], &live(&c), 61_000_000_000, 0);
        assert_eq!(
            (recs.len(), recs[0].reason, recs[0].packets),
            (1, EndReason::ActiveTimeout, [3, 2])
        );
        assert!(
            e.records(&[], &live(&c), 62_000_000_000, 0).is_empty(),
            "not again until a timeout later"
        );
        // Two more client packets, then the end: the final record has the rest.
        c.conn.value.dir[1].packets += 2;
        let recs = e.records(&[c.clone()], &[], 70_000_000_000, 0);
        assert_eq!(
            (recs[0].reason, recs[0].packets),
            (EndReason::EndOfFlow, [2, 0])
        );
        assert!(e.sent.is_empty());
    }

    #[test]
    fn many_records_split_into_messages_below_the_mtu() {
        let mut e = Exporter::new(Options::default());
        let closed: Vec<_> = (0..40).map(|i| conn(i, 80, 1)).collect();
        let recs = e.records(&closed, &[], 0, 0);
        let msgs = e.messages(&recs, 0);
        assert!(msgs.len() > 1 && msgs.iter().all(|m| m.len() <= MAX_MESSAGE));
        let seqs: Vec<u32> = msgs
            .iter()
            .map(|m| u32::from_be_bytes(m[8..12].try_into().unwrap()))
            .collect();
        let per: Vec<u32> = msgs
            .iter()
            .map(|m| {
                let mut i = 16;
                let mut n = 0;
                while i < m.len() {
                    let (id, len) = (u16_at(m, i), u16_at(m, i + 2) as usize);
                    if id == TEMPLATE_V4 {
                        n += (len - 4) as u32 / 123;
                    }
                    i += len;
                }
                n
            })
            .collect();
        assert_eq!(per.iter().sum::<u32>(), 40);
        for i in 1..msgs.len() {
            assert_eq!(seqs[i], seqs[i - 1] + per[i - 1]);
        }
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("udp://127.0.0.1:4739").unwrap(),
            "127.0.0.1:4739"
        );
        assert_eq!(parse_target("udp://[::1]:4739").unwrap(), "[::1]:4739");
        assert!(
            parse_target("127.0.0.1:4739")
                .unwrap_err()
                .contains("udp://HOST:PORT")
        );
        assert!(parse_target("udp://host").is_err());
    }
}
