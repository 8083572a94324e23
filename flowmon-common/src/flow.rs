//! The flow table's key and value: one entry per connection, both directions.
//!
//! # Key layout
//! One entry per connection (not one per direction): the two endpoints are stored
//! in canonical order, the numerically lower `(address, port)` first as side A.
//! A packet from A to B counts in `dir[DIR_A_TO_B]`, from B to A in
//! `dir[DIR_B_TO_A]`. Why: one lookup per packet finds both directions, user space
//! reads both directions of a connection in one consistent copy (needed to order
//! events such as "who sent FIN first"), and the table holds half as many entries
//! as a per-direction layout would. Which side is the client is decided in user
//! space from the SYN and SYN-ACK times, not by the key.
//!
//! The key also carries the interface index and the outer VLAN id, so that a
//! router watching two interfaces, or a trunk carrying the same addresses in two
//! VLANs, never merges two different paths into one count.

/// Index of the direction from side A (the lower endpoint) to side B.
pub const DIR_A_TO_B: usize = 0;
/// Index of the direction from side B to side A.
pub const DIR_B_TO_A: usize = 1;

/// Address family codes carried in [`FlowKey::family`].
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// Canonical connection key. IPv4 addresses occupy the first four bytes of the
/// 16-byte fields, the rest is zero. Every byte, padding included, is written
/// by [`FlowKey::write_canonical`], since the tables hash the raw bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    /// Ports in host byte order.
    pub port_a: u16,
    pub port_b: u16,
    pub ifindex: u32,
    /// Outer 802.1Q/802.1ad VLAN id, 0 when untagged.
    pub vlan: u16,
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 44);

const _: () = assert!(core::mem::align_of::<FlowKey>() == 4);
const _: () = assert!(core::mem::offset_of!(FlowKey, addr_b) == 16);

/// A packet's endpoints as the parser reads them, before they are put in
/// canonical order: addresses as four words each in network byte order
/// (IPv4 in the first word, the rest 0), ports in host order.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    pub vlan: u16,
    pub family: u8,
}

impl FlowKey {
    /// Writes the key of `e`'s connection, endpoints in canonical order, and
    /// returns the packet's direction index.
    ///
    /// The key is built in registers and stored as five 64-bit words and a
    /// 32-bit one, the widths the hash and the comparison read it back with:
    /// a wide load of bytes written by several narrower stores cannot be
    /// forwarded from the store buffer and waits for them to retire, which
    /// cost the kernel programs several nanoseconds a packet. Assigning byte
    /// arrays whole would also compile to a `memset` call, a loop of one-byte
    /// stores, in the kernel programs.
    #[inline(always)]
    pub fn write_canonical(&mut self, e: &Endpoints) -> usize {
        // Addresses compare as big-endian numbers, a word at a time.
        let mut src_first = None;
        let mut i = 0;
        while i < 4 {
            let (a, b) = (u32::from_be(e.src[i]), u32::from_be(e.dst[i]));
            if a != b {
                src_first = Some(a < b);
                break;
            }
            i += 1;
        }
        let (dir, a, b, pa, pb) = if src_first.unwrap_or(e.sport <= e.dport) {
            (DIR_A_TO_B, &e.src, &e.dst, e.sport, e.dport)
        } else {
            (DIR_B_TO_A, &e.dst, &e.src, e.dport, e.sport)
        };
        let w = [
            pair32(a[0], a[1]),
            pair32(a[2], a[3]),
            pair32(b[0], b[1]),
            pair32(b[2], b[3]),
            pair32(pair16(pa, pb), e.ifindex),
        ];
        let last = pair16(e.vlan, u16::from(e.family));
        let p = (self as *mut FlowKey).cast::<u8>();
        // Safety: the offsets lie within the 44-byte key, which holds plain
        // integers only; unaligned stores because FlowKey is only 4-aligned.
        unsafe {
            let mut i = 0;
            while i < 5 {
                p.add(8 * i).cast::<u64>().write_unaligned(w[i]);
                i += 1;
            }
            p.add(40).cast::<u32>().write_unaligned(last);
        }
        dir
    }
}

/// The 64-bit word whose memory holds `lo` then `hi`.
#[inline(always)]
fn pair32(lo: u32, hi: u32) -> u64 {
    if cfg!(target_endian = "little") {
        u64::from(lo) | (u64::from(hi) << 32)
    } else {
        (u64::from(lo) << 32) | u64::from(hi)
    }
}

/// The 32-bit word whose memory holds `lo` then `hi`.
#[inline(always)]
fn pair16(lo: u16, hi: u16) -> u32 {
    if cfg!(target_endian = "little") {
        u32::from(lo) | (u32::from(hi) << 16)
    } else {
        (u32::from(lo) << 16) | u32::from(hi)
    }
}

/// What one direction of a connection has sent. Times are nanoseconds on the
/// clock the program reads (CLOCK_MONOTONIC live, capture time on replay);
/// 0 means "never". The `first_*` times let user space order events: who sent
/// FIN first, whether an RST came after a FIN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirStats {
    pub packets: u64,
    /// IP-layer bytes (IP header included, link header and padding excluded),
    /// the unit Zeek's `*_ip_bytes` use.
    pub bytes: u64,
    /// SYN without ACK.
    pub syn: u32,
    /// SYN with ACK.
    pub synack: u32,
    pub fin: u32,
    pub rst: u32,
    /// Segments carrying TCP payload.
    pub data_packets: u32,
    /// The poll epoch ([`Config::epoch`]) in which this connection was
    /// last announced on the DIRTY ring (kept in `dir[0]`; 0 in `dir[1]`).
    pub epoch: u32,
    pub first_ns: u64,
    pub last_ns: u64,
    pub first_syn_ns: u64,
    pub first_synack_ns: u64,
    pub first_fin_ns: u64,
    pub first_rst_ns: u64,
    pub first_data_ns: u64,
    /// First pure ACK: ACK set, no SYN/FIN/RST, no payload.
    pub first_ack_ns: u64,
}
const _: () = assert!(core::mem::size_of::<DirStats>() == 104);
// The counting routine reads `fin` and `rst` as one aligned word.
const _: () =
    assert!(core::mem::offset_of!(DirStats, rst) == core::mem::offset_of!(DirStats, fin) + 4);
const _: () = assert!(core::mem::offset_of!(DirStats, fin) % 8 == 0);

/// Value of the flow table: both directions of one connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub dir: [DirStats; 2],
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 208);

impl FlowValue {
    /// Adds `other`, counted for the same connection elsewhere, to `self`:
    /// counters add up, first times take the earlier, last times the later.
    pub fn merge(&mut self, other: &FlowValue) {
        let first = |a: u64, b: u64| match (a, b) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        };
        let mut d = 0;
        while d < 2 {
            let (a, b) = (&mut self.dir[d], &other.dir[d]);
            a.packets += b.packets;
            a.bytes += b.bytes;
            a.syn += b.syn;
            a.synack += b.synack;
            a.fin += b.fin;
            a.rst += b.rst;
            a.data_packets += b.data_packets;
            a.first_ns = first(a.first_ns, b.first_ns);
            a.last_ns = a.last_ns.max(b.last_ns);
            a.first_syn_ns = first(a.first_syn_ns, b.first_syn_ns);
            a.first_synack_ns = first(a.first_synack_ns, b.first_synack_ns);
            a.first_fin_ns = first(a.first_fin_ns, b.first_fin_ns);
            a.first_rst_ns = first(a.first_rst_ns, b.first_rst_ns);
            a.first_data_ns = first(a.first_data_ns, b.first_data_ns);
            a.first_ack_ns = first(a.first_ack_ns, b.first_ack_ns);
            a.epoch = a.epoch.max(b.epoch);
            d += 1;
        }
    }
}

/// A connection the programs took out of the table and sent to user space
/// through the CLOSED ring buffer: retired because a new one started on its
/// tuple (a SYN after FIN or RST), so that both lifetimes are reported
/// apart, or handed over by its last packet ([`CONFIG_FLAG_HAND_OVER`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetiredFlow {
    pub key: FlowKey,
    /// [`CLOSED_RETIRED`] or [`CLOSED_FINISHED`].
    pub kind: u32,
    pub value: FlowValue,
}

/// [`RetiredFlow::kind`]: a new connection started on the tuple.
pub const CLOSED_RETIRED: u32 = 0;
/// [`RetiredFlow::kind`]: the connection's last packet handed it over.
pub const CLOSED_FINISHED: u32 = 1;
const _: () = assert!(core::mem::size_of::<RetiredFlow>() == 256);

/// Connections the agent takes out of the table per run of the take
/// program: one `BPF_PROG_TEST_RUN` (repeated this many times) instead of
/// one each.
pub const TAKE_BATCH: usize = 512;

/// [`TakeSlot::status`] as the agent leaves it: the program did not get to it.
pub const TAKE_PENDING: u32 = 0;
/// No entry under the key.
pub const TAKE_ABSENT: u32 = 1;
/// The entry under the key is a later connection (the kernel retired the one
/// the agent saw), or has counted a SYN since the agent read it (which may
/// make it one): left in place, for the next poll to look at again.
pub const TAKE_REPLACED: u32 = 2;
/// Copied into [`TakeSlot::value`] and deleted.
pub const TAKE_REMOVED: u32 = 3;
/// Copied, but gone before the delete (evicted meanwhile): the copy is all
/// there is of it.
pub const TAKE_GONE: u32 = 4;

/// One connection to take out of the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TakeSlot {
    pub key: FlowKey,
    /// One of the `TAKE_*` constants, written by the program.
    pub status: u32,
    /// `dir[d].first_ns` as the agent read them: an entry whose first times
    /// differ (where these are not 0) is a later connection on the tuple.
    pub seen_first_ns: [u64; 2],
    /// SYNs (without ACK) of both directions as the agent read them.
    pub seen_syn: u32,
    pub _pad: u32,
    pub value: FlowValue,
}
const _: () = assert!(core::mem::size_of::<TakeSlot>() == 280);

/// The one value of the TAKE array map, shared with the agent through
/// `mmap`: the agent writes keys and `count`, runs the take program `count`
/// times, each run takes slot `next` and advances it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TakeBatch {
    pub next: u32,
    pub count: u32,
    pub slots: [TakeSlot; TAKE_BATCH],
}
const _: () = assert!(core::mem::size_of::<TakeBatch>() == 8 + 280 * TAKE_BATCH);

/// Bytes of the DIRTY ring buffer: 4 MiB, about 80,000 keys (44 bytes plus
/// an 8-byte record header, rounded to 8) changed per poll before the agent
/// falls back to reading the whole table.
pub const DIRTY_RING_BYTES: u32 = 4 << 20;

/// Bytes of the CLOSED ring buffer: 16 MiB, about 63,000 connections (256
/// bytes and an 8-byte header each), a second of them at the highest rate
/// the benchmark's replay reaches, handed over between two polls. When it
/// is full a finished connection stays in the table for the agent's take.
pub const CLOSED_RING_BYTES: u32 = 16 << 20;

/// Default number of connections the kernel table holds (`--max-flows`).
/// Memory: a 256-byte slot (44-byte key, padding, 208-byte value) and a
/// 14th of a 64-byte bucket, for a fifth more ways than connections
/// ([`crate::table::buckets_for`]), so about 313 bytes per connection,
/// 78 MiB at the default.
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;

/// The agent's settings for the programs: their global `CONFIG`, which the
/// agent writes as the one entry of its map (`.data.config`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// When non-zero, the programs use this as the packet time instead of
    /// `bpf_ktime_get_ns`: `flowmon replay` sets it to each packet's capture time.
    pub clock_override_ns: u64,
    /// Bit 0: kernel-side debug logging through aya-log.
    pub flags: u32,
    /// The agent's poll epoch, 0 when it reads the whole table every
    /// poll. Otherwise a connection's first packet in each epoch puts
    /// its key on the DIRTY ring, so the agent reads only what changed.
    pub epoch: u32,
    /// Entries the agent has removed from the flow table since the table was
    /// created. The programs never read it: it lives here so that with a
    /// pinned table it survives agent restarts, and evictions (created minus
    /// live minus removed) stay right.
    pub agent_removed: u64,
    /// The coarse clock ([`crate::count::Clock::coarse`]) from jiffies, which
    /// the programs read with one inlined load where a clock helper call
    /// costs 15–25 ns: `jiffies_ns + (jiffies - jiffies_at) * tick_ns`.
    /// The agent measures the three at load time (see `flowmon::ticks`).
    pub tick_ns: u64,
    /// A jiffies value, with [`Config::jiffies_ns`] ...
    pub jiffies_at: u64,
    /// ... the CLOCK_MONOTONIC time at which jiffies took it.
    pub jiffies_ns: u64,
    /// The flow table's hash seed ([`crate::table::hash`]), random per
    /// table: kept with a pinned table, like the entries it placed.
    pub seeds: crate::table::Seeds,
    /// Buckets in the flow table ([`crate::table::buckets_for`]) ...
    pub buckets: u32,
    /// ... and the connections it was sized for (`--max-flows`).
    pub max_flows: u32,
    /// [`crate::table::TABLE_LAYOUT`] of the agent that made the table.
    pub table_layout: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 112);

/// [`Config::flags`] bit that turns on aya-log debug output.
pub const CONFIG_FLAG_LOG: u32 = 1;
/// [`Config::flags`] bit that has a whole connection's last packet (an RST,
/// or a pure ACK once both sides sent a FIN) hand it over on the CLOSED
/// ring and free its way: set by an agent, which drains the ring each poll.
pub const CONFIG_FLAG_HAND_OVER: u32 = 2;
