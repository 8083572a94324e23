//! The global per-CPU counters (the STATS map) and their indices.

/// Every packet the programs saw: the sum of the next four, which user
/// space computes (the programs leave this slot 0).
pub const STAT_PACKETS: u32 = 0;
/// TCP segments counted in the flow table (first fragments included).
pub const STAT_TCP: u32 = 1;
/// Well-formed packets that are not TCP (ARP, UDP, ICMP, ...).
pub const STAT_NON_TCP: u32 = 2;
/// Packets truncated or invalid at some layer (short Ethernet/VLAN header,
/// bad IP version or header length, IPv6 extension chain longer than the
/// programs follow, TCP data offset below 5 or past the packet).
pub const STAT_MALFORMED: u32 = 3;
/// IPv4/IPv6 fragments other than the first: they carry no TCP header.
pub const STAT_FRAGMENTS: u32 = 4;
/// New connection entries inserted into the flow table.
pub const STAT_FLOWS_CREATED: u32 = 5;
/// Inserts the kernel refused (the packet is still passed, not counted per flow).
pub const STAT_INSERT_FAILED: u32 = 6;
/// New connections on a reused tuple that could not be split from the
/// previous one (the CLOSED ring buffer was full): they were counted into it.
pub const STAT_SPLIT_FAILED: u32 = 7;
/// Connections retired to the CLOSED ring buffer because a new one started on
/// their tuple.
pub const STAT_RETIRED: u32 = 8;
/// Changed connections the DIRTY ring had no room for: the agent then reads
/// the whole table.
pub const STAT_DIRTY_LOST: u32 = 9;
/// Number of slots in the STATS map.
pub const STAT_COUNT: u32 = 10;

/// Human-readable names, indexed like the constants above.
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "packets",
    "tcp",
    "non_tcp",
    "malformed",
    "fragments",
    "flows_created",
    "insert_failed",
    "split_failed",
    "retired",
    "dirty_lost",
];

/// The one value of the per-CPU STATS map: this CPU's counters, and the
/// scratch where the programs parse a segment (off the 512-byte BPF stack).
/// One map for both, so a packet makes one map lookup for them, not three.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// Indexed by the `STAT_*` constants.
    pub stats: [u64; STAT_COUNT as usize],
    pub seg: crate::parse::TcpSegment,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CpuState>() == 152);
