//! How a connection ended and who ended it: flowmon's close classes, plus
//! Zeek's `conn_state` and `history`, all derived from one entry's counters
//! and first-event times. Pure functions of the entry and a clock: the live
//! agent and `analyze` call them alike.

use std::time::Duration;

use flowmon_common::flow::DirStats;

use crate::model::Conn;

/// Timeouts that decide when an incomplete connection gets its final class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A SYN with no reply after this long is `unanswered`.
    pub syn: Duration,
    /// One FIN and nothing from the other side after this long is `half-closed`.
    pub close: Duration,
    /// An established connection silent this long is `idle`.
    pub idle: Duration,
    /// A closed connection is final after this much silence: trailing ACKs
    /// and RSTs arriving within it still belong to it.
    pub linger: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            syn: Duration::from_secs(10),
            close: Duration::from_secs(60),
            idle: Duration::from_secs(300),
            linger: Duration::from_secs(2),
        }
    }
}

/// flowmon's close classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Close {
    /// FIN from both sides, no RST.
    Fin,
    /// FIN and RST both seen.
    FinRst,
    /// Ended by RST without FIN.
    Rst,
    /// SYN answered by RST, never established.
    Refused,
    /// SYN(s) with no reply past the SYN timeout.
    Unanswered,
    /// One side sent FIN, the other nothing past the close timeout.
    HalfClosed,
    /// Established (or seen midstream) and active.
    Open,
    /// Established, silent past the idle timeout, no close seen.
    Idle,
    /// SYN sent, waiting for the handshake, within the SYN timeout.
    Connecting,
    /// RST with no connection context at all: no SYN, no SYN-ACK, no data.
    OrphanRst,
    /// Pushed out of a full kernel table before it ended: its counts are
    /// those of the agent's last poll. Never the result of classifying.
    Evicted,
}

impl Close {
    pub const ALL: [Close; 11] = [
        Close::Fin,
        Close::FinRst,
        Close::Rst,
        Close::Refused,
        Close::Unanswered,
        Close::HalfClosed,
        Close::Open,
        Close::Idle,
        Close::Connecting,
        Close::OrphanRst,
        Close::Evicted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Close::Fin => "fin",
            Close::FinRst => "fin-rst",
            Close::Rst => "rst",
            Close::Refused => "refused",
            Close::Unanswered => "unanswered",
            Close::HalfClosed => "half-closed",
            Close::Open => "open",
            Close::Idle => "idle",
            Close::Connecting => "connecting",
            Close::OrphanRst => "orphan-rst",
            Close::Evicted => "evicted",
        }
    }

    /// The class named `s` (as [`Close::as_str`] writes it).
    pub fn parse(s: &str) -> Option<Close> {
        Close::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether no further packet can change the class (only trailing ones,
    /// which the linger absorbs).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Close::Fin | Close::FinRst | Close::Rst | Close::Refused | Close::OrphanRst
        )
    }
}

/// Which side is responsible for the end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClosedBy {
    Client,
    Server,
    Both,
    None,
}

impl ClosedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Server => "server",
            ClosedBy::Both => "both",
            ClosedBy::None => "none",
        }
    }

    /// The side named `s` (as [`ClosedBy::as_str`] writes it).
    pub fn parse(s: &str) -> Option<ClosedBy> {
        [
            ClosedBy::Client,
            ClosedBy::Server,
            ClosedBy::Both,
            ClosedBy::None,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }

    fn from_sides(client: bool, server: bool) -> Self {
        match (client, server) {
            (true, true) => ClosedBy::Both,
            (true, false) => ClosedBy::Client,
            (false, true) => ClosedBy::Server,
            (false, false) => ClosedBy::None,
        }
    }
}

/// The earliest non-zero time among `ts`, 0 when none.
pub fn earliest(ts: &[u64]) -> u64 {
    ts.iter().copied().filter(|&t| t != 0).min().unwrap_or(0)
}

/// Who closed first: the side with the earlier first FIN (or RST).
fn first_closer(clt: u64, srv: u64) -> ClosedBy {
    match (clt, srv) {
        (0, 0) => ClosedBy::None,
        (_, 0) => ClosedBy::Client,
        (0, _) => ClosedBy::Server,
        (c, s) if c < s => ClosedBy::Client,
        (c, s) if s < c => ClosedBy::Server,
        _ => ClosedBy::Both,
    }
}

impl Conn {
    /// The three-way handshake completed: the server's SYN-ACK was
    /// acknowledged by the client (the client's SYN itself may have been
    /// missed by the capture).
    pub fn handshake(&self) -> bool {
        let (clt, srv) = (self.clt(), self.srv());
        let reply = earliest(&[clt.first_ack_ns, clt.first_data_ns, clt.first_fin_ns]);
        srv.synack > 0 && reply != 0 && reply >= srv.first_synack_ns
    }

    /// No SYN or SYN-ACK from either side: the connection was already open
    /// when flowmon started watching, or the capture lost its start.
    pub fn midstream(&self) -> bool {
        let (a, b) = (self.clt(), self.srv());
        a.syn + a.synack + b.syn + b.synack == 0
    }

    /// `ct.count`: 1 for an established connection, that is a completed
    /// handshake, or midstream traffic in which both sides sent more than RSTs.
    pub fn ct_count(&self) -> u32 {
        let (clt, srv) = (self.clt(), self.srv());
        let talked = |d: &DirStats| d.packets > u64::from(d.rst);
        u32::from(self.handshake() || (self.midstream() && talked(clt) && talked(srv)))
    }

    /// Last packet time, either direction.
    pub fn last_ns(&self) -> u64 {
        self.clt().last_ns.max(self.srv().last_ns)
    }

    /// First packet time, either direction.
    pub fn first_ns(&self) -> u64 {
        earliest(&[self.clt().first_ns, self.srv().first_ns])
    }

    /// The close class and the side responsible, as of time `now_ns` (on the
    /// packets' clock).
    pub fn classify(&self, now_ns: u64, t: &Timeouts) -> (Close, ClosedBy) {
        let (clt, srv) = (self.clt(), self.srv());
        let since = |ts: u64| Duration::from_nanos(now_ns.saturating_sub(ts));
        let silent = since(self.last_ns());
        let no_data = clt.data_packets + srv.data_packets == 0;
        if self.midstream()
            && no_data
            && clt.rst + srv.rst > 0
            && clt.fin + srv.fin == 0
            && clt.first_ack_ns == 0
            && srv.first_ack_ns == 0
        {
            return (
                Close::OrphanRst,
                ClosedBy::from_sides(clt.rst > 0, srv.rst > 0),
            );
        }
        if !self.handshake() && !self.midstream() && clt.syn > 0 {
            if srv.rst > 0 && srv.synack == 0 {
                return (Close::Refused, ClosedBy::Server);
            }
            if srv.packets == 0 && clt.fin + clt.rst == 0 {
                let class = if silent >= t.syn {
                    Close::Unanswered
                } else {
                    Close::Connecting
                };
                return (class, ClosedBy::None);
            }
            if srv.synack > 0 && clt.rst + srv.rst + clt.fin + srv.fin == 0 {
                // SYN-ACK sent, never acknowledged.
                let class = if silent >= t.syn {
                    Close::Unanswered
                } else {
                    Close::Connecting
                };
                return (class, ClosedBy::None);
            }
        }
        let (any_fin, any_rst) = (clt.fin + srv.fin > 0, clt.rst + srv.rst > 0);
        if any_fin && any_rst {
            return (
                Close::FinRst,
                ClosedBy::from_sides(clt.rst > 0, srv.rst > 0),
            );
        }
        if any_rst {
            return (Close::Rst, ClosedBy::from_sides(clt.rst > 0, srv.rst > 0));
        }
        if clt.fin > 0 && srv.fin > 0 {
            return (Close::Fin, first_closer(clt.first_fin_ns, srv.first_fin_ns));
        }
        if any_fin {
            let by = ClosedBy::from_sides(clt.fin > 0, srv.fin > 0);
            let fin_at = earliest(&[clt.first_fin_ns, srv.first_fin_ns]);
            let class = if since(fin_at) >= t.close && silent >= t.linger {
                Close::HalfClosed
            } else {
                Close::Open
            };
            return (
                class,
                if class == Close::HalfClosed {
                    by
                } else {
                    ClosedBy::None
                },
            );
        }
        if silent >= t.idle {
            return (Close::Idle, ClosedBy::None);
        }
        (Close::Open, ClosedBy::None)
    }

    /// Zeek's `conn_state`, computed the way Zeek's base/protocols/conn
    /// script does from each endpoint's TCP state.
    pub fn conn_state(&self) -> &'static str {
        let (clt, srv) = (self.clt(), self.srv());
        let est = self.handshake();
        let os = endpoint(clt, est);
        let rs = endpoint(srv, est);
        let inactive = |s: Ep| matches!(s, Ep::Inactive | Ep::Partial);
        if rs == Ep::Reset {
            if matches!(os, Ep::SynSent | Ep::SynAckSent)
                || (os == Ep::Reset && clt.data_packets == 0 && srv.data_packets == 0)
            {
                return "REJ";
            }
            return if inactive(os) { "RSTRH" } else { "RSTR" };
        }
        if os == Ep::Reset {
            if inactive(rs) {
                // Zeek: history matches /^?S[^HAFGIQ]*R.*/.
                let h = self.history();
                let h = h.strip_prefix('^').unwrap_or(&h);
                let syn_then_rst = h
                    .strip_prefix('S')
                    .is_some_and(|rest| rest.chars().find(|c| "HAFR".contains(*c)) == Some('R'));
                return if syn_then_rst { "RSTOS0" } else { "OTH" };
            }
            return "RSTO";
        }
        match (os, rs) {
            (Ep::Closed, Ep::Closed) => "SF",
            (Ep::Closed, r) => {
                if inactive(r) {
                    "SH"
                } else {
                    "S2"
                }
            }
            (o, Ep::Closed) => {
                if inactive(o) {
                    "SHR"
                } else {
                    "S3"
                }
            }
            (Ep::SynSent, Ep::Inactive) => "S0",
            (Ep::Established, Ep::Established) => "S1",
            _ => "OTH",
        }
    }

    /// Zeek-style history: the first SYN (S), SYN-ACK (H), pure ACK (A),
    /// data (D), FIN (F) and RST (R) of each side in time order, upper case
    /// for the client and lower case for the server; `^` in front when the
    /// server sent the first packet (Zeek's "flipped"). Each letter appears
    /// once per side: flowmon keeps first times, not every repetition.
    pub fn history(&self) -> String {
        // At most six first-times a side: on the stack, not the heap (one
        // allocation less for every connection reported).
        let mut events = [(0u64, 0u8, 0u8, ' '); 12];
        let mut n = 0;
        for (side, d) in [(0u8, self.clt()), (1u8, self.srv())] {
            for (rank, t, letter) in [
                (0u8, d.first_syn_ns, 'S'),
                (1, d.first_synack_ns, 'H'),
                (2, d.first_ack_ns, 'A'),
                (3, d.first_data_ns, 'D'),
                (4, d.first_fin_ns, 'F'),
                (5, d.first_rst_ns, 'R'),
            ] {
                if t != 0 {
                    let l = if side == 0 {
                        letter
                    } else {
                        letter.to_ascii_lowercase()
                    };
                    events[n] = (t, side, rank, l);
                    n += 1;
                }
            }
        }
        let events = &mut events[..n];
        events.sort_unstable();
        let mut h = String::with_capacity(n + 1);
        let (c, s) = (self.clt().first_ns, self.srv().first_ns);
        if s != 0 && (c == 0 || s < c) {
            h.push('^');
        }
        h.extend(events.iter().map(|e| e.3));
        h
    }
}

/// One endpoint's TCP state as Zeek tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ep {
    Inactive,
    SynSent,
    SynAckSent,
    Partial,
    Established,
    Closed,
    Reset,
}

fn endpoint(d: &DirStats, established: bool) -> Ep {
    if d.rst > 0 {
        Ep::Reset
    } else if d.fin > 0 {
        Ep::Closed
    } else if established {
        Ep::Established
    } else if d.syn > 0 {
        Ep::SynSent
    } else if d.synack > 0 {
        Ep::SynAckSent
    } else if d.packets > 0 {
        Ep::Partial
    } else {
        Ep::Inactive
    }
}

#[cfg(test)]
#[path = "close_tests.rs"]
mod tests;
