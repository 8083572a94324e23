//! Kernel programs: count TCP flag events per connection, both directions.
//!
//! `flowmon_xdp` sees received packets, `flowmon_tc` (clsact egress) sent ones;
//! both call [`handle`], which runs the shared parser and counting routine from
//! flowmon-common. Every path passes the packet: a monitor never drops or
//! alters traffic, and a packet it cannot parse only bumps a counter.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{classifier, map, xdp},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use flowmon_common::{
    count::{Clock, record, starts_new_connection},
    flow::{
        CLOSED_RING_BYTES, CONFIG_FLAG_LOG, Config, DEFAULT_MAX_FLOWS, DIRTY_RING_BYTES, FlowKey,
        FlowValue, RetiredFlow, TAKE_ABSENT, TAKE_BATCH, TAKE_GONE, TAKE_REMOVED, TAKE_REPLACED,
        TakeBatch, TakeSlot,
    },
    parse::{MAX_HEADER_OFFSET, PacketBytes, Parsed, TcpSegment, parse_ethernet},
    stats::{
        STAT_COUNT, STAT_DIRTY_LOST, STAT_FLOWS_CREATED, STAT_FRAGMENTS, STAT_INSERT_FAILED,
        STAT_MALFORMED, STAT_NON_TCP, STAT_PACKETS, STAT_RETIRED, STAT_SPLIT_FAILED, STAT_TCP,
    },
};

/// One entry per connection. LRU so that a full table never refuses a new
/// connection: the least recently active entry makes room, and the agent
/// notices the disappearance and reports it as evicted. Its size is set at
/// load time (`--max-flows`).
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Connections retired because a new one started on their tuple.
#[map]
static CLOSED: RingBuf = RingBuf::with_byte_size(CLOSED_RING_BYTES, 0);

/// Keys of connections that saw packets since the agent's last poll (one per
/// connection per poll epoch), when the agent reads incrementally.
#[map]
static DIRTY: RingBuf = RingBuf::with_byte_size(DIRTY_RING_BYTES, 0);

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Per-CPU scratch for the segment being parsed, off the 512-byte stack.
#[map]
static SEG: PerCpuArray<TcpSegment> = PerCpuArray::with_max_entries(1, 0);

/// A zeroed value to insert from: a 208-byte value on the 512-byte BPF stack
/// would crowd out the parser's locals.
#[map]
static ZERO: Array<FlowValue> = Array::with_max_entries(1, 0);

/// Connections the agent takes out of the table, a batch per run of
/// `flowmon_take`; the agent reads and writes it through `mmap`.
#[map]
static TAKE: Array<TakeBatch> = Array::with_max_entries(1, BPF_F_MMAPABLE);

const BPF_F_MMAPABLE: u32 = 1 << 10;
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;
const EEXIST: i32 = 17;

/// Reads a packet through direct packet access, as the verifier requires:
/// every offset is bounded before it is added to the packet pointer, and every
/// read is checked against the end.
struct Direct {
    data: usize,
    end: usize,
}

impl PacketBytes for Direct {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        let start = self.data + offset;
        if start + core::mem::size_of::<T>() > self.end {
            return None;
        }
        // Safety: the range [start, start + size) lies inside the packet, as
        // checked just above.
        Some(unsafe { (start as *const T).read_unaligned() })
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // Safety: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

/// Parses and counts one packet. `segs` is the number of wire packets the
/// buffer stands for and `len` its length from the link header on; `None`
/// means one packet whose IP length is taken from its header.
#[inline(always)]
fn handle<C: aya_ebpf::EbpfContext>(ctx: &C, pkt: &Direct, ifindex: u32, gso: Option<(u32, u32)>) {
    bump(STAT_PACKETS);
    let Some(seg) = SEG.get_ptr_mut(0) else {
        return;
    };
    // Safety: this CPU's scratch slot; a program runs to completion on one CPU
    // without preemption by another flowmon program on the same CPU.
    let seg = unsafe { &mut *seg };
    match parse_ethernet(pkt, ifindex, seg) {
        Parsed::Tcp => {}
        Parsed::NotTcp => return bump(STAT_NON_TCP),
        Parsed::Fragment => return bump(STAT_FRAGMENTS),
        Parsed::Malformed => return bump(STAT_MALFORMED),
    };
    bump(STAT_TCP);
    // The one entry of a one-entry array: always there.
    let Some(cfg) = CONFIG.get(0) else { return };
    let clock = Ktime(cfg);
    let (packets, ip_bytes) = match gso {
        // A GSO super-packet: every wire segment repeats the headers.
        Some((segs, len)) if segs > 1 => {
            let ip = u64::from(len.saturating_sub(seg.l3_offset));
            (segs, ip + u64::from(segs - 1) * u64::from(seg.hdr_len))
        }
        Some((_, len)) => (1, u64::from(len.saturating_sub(seg.l3_offset))),
        None => (1, u64::from(seg.ip_len)),
    };
    let value = match FLOWS.get_ptr_mut(&seg.key) {
        // Safety: `v` points into the map element, valid during this run.
        Some(v) if starts_new_connection(unsafe { &*v }, seg) => match retire(v, seg) {
            Retire::Fresh(fresh) => fresh,
            Retire::Kept => v,
            Retire::Lost => return bump(STAT_INSERT_FAILED),
        },
        Some(v) => v,
        None => {
            let Some(zero) = ZERO.get(0) else { return };
            match FLOWS.insert(&seg.key, zero, BPF_NOEXIST) {
                Ok(()) => bump(STAT_FLOWS_CREATED),
                // Another CPU inserted it between our lookup and insert.
                Err(e) if e == -EEXIST => {}
                Err(_) => return bump(STAT_INSERT_FAILED),
            }
            match FLOWS.get_ptr_mut(&seg.key) {
                Some(v) => v,
                None => return bump(STAT_INSERT_FAILED),
            }
        }
    };
    // Safety: `value` points into the map element, valid during this program
    // run; concurrent writers go through `record`'s atomics as well.
    unsafe { record(value, seg, packets, ip_bytes, &clock) };
    if cfg.epoch != 0 {
        announce(value, &seg.key, cfg.epoch);
    }
    if cfg.flags & CONFIG_FLAG_LOG != 0 {
        debug!(
            ctx,
            "tcp if={} flags={:x} dir={} sport={} dport={}",
            ifindex,
            seg.flags,
            seg.dir,
            seg.key.port_a,
            seg.key.port_b
        );
    }
}

/// CLOCK_MONOTONIC, or the capture time `flowmon replay` sets in
/// [`Config::clock_override_ns`] for each packet when it is not 0. The exact
/// clock costs 20–40 ns per read in a VM; the coarse one comes from jiffies
/// (an inlined load) as the agent calibrated it in the config.
struct Ktime<'a>(&'a Config);

impl Clock for Ktime<'_> {
    #[inline(always)]
    fn precise(&self) -> u64 {
        if self.0.clock_override_ns != 0 {
            return self.0.clock_override_ns;
        }
        // Safety: a helper without preconditions.
        unsafe { bpf_ktime_get_ns() }
    }
    #[inline(always)]
    fn coarse(&self) -> u64 {
        let c = self.0;
        if c.clock_override_ns != 0 {
            return c.clock_override_ns;
        }
        if c.tick_ns != 0 {
            // Safety: a helper without preconditions, inlined by the verifier.
            let ticks = unsafe { bpf_jiffies64() }.wrapping_sub(c.jiffies_at);
            return c.jiffies_ns.wrapping_add(ticks.wrapping_mul(c.tick_ns));
        }
        // Safety: a helper without preconditions (Linux 5.11).
        unsafe { bpf_ktime_get_coarse_ns() }
    }
}

/// Puts `key` on the DIRTY ring once per poll epoch. The epoch
/// check and store race with another CPU's packet of the same connection;
/// the worst outcome is the key twice on the ring, which the agent dedups.
#[inline(always)]
fn announce(value: *mut FlowValue, key: &FlowKey, epoch: u32) {
    // Safety: `value` points into the map element, valid during this run.
    let g = unsafe { &raw mut (*value).dir[0].epoch };
    // Safety: as above; a plain aligned u32.
    if unsafe { g.read_volatile() } == epoch {
        return;
    }
    unsafe { g.write_volatile(epoch) };
    match DIRTY.reserve::<FlowKey>(0) {
        Some(mut slot) => {
            slot.write(*key);
            slot.submit(0);
        }
        None => bump(STAT_DIRTY_LOST),
    }
}

/// Copies a live map element word by word, with volatile reads so LLVM
/// cannot turn it into a memcpy call, which the bpf target cannot link.
///
/// # Safety
/// Both pointers are valid for a whole `FlowValue`.
#[inline(always)]
unsafe fn copy_value(from: *const FlowValue, to: *mut FlowValue) {
    let (from, to) = (from.cast::<u64>(), to.cast::<u64>());
    let mut i = 0;
    while i < core::mem::size_of::<FlowValue>() / 8 {
        // Safety: within both values, as the caller promises.
        unsafe { to.add(i).write(from.add(i).read_volatile()) };
        i += 1;
    }
}

/// What became of an ended connection when a new one started on its tuple.
enum Retire {
    /// Sent to user space; count the packet into this fresh entry.
    Fresh(*mut FlowValue),
    /// The ring buffer was full or the entry could not be replaced: count the
    /// packet into the old entry (a merged lifetime beats a lost count).
    Kept,
    /// Sent to user space, but the fresh entry vanished at once (LRU eviction
    /// under pressure): the packet cannot be counted.
    Lost,
}

/// Sends the ended connection in `old` to user space and gives its tuple a
/// zeroed entry. Replacing the element (BPF_EXIST) rather than zeroing it in
/// place means a packet of the old connection being counted on another CPU at
/// this instant lands in the old element's memory, not in the new connection.
#[inline(always)]
fn retire(old: *mut FlowValue, seg: &TcpSegment) -> Retire {
    let Some(mut slot) = CLOSED.reserve::<RetiredFlow>(0) else {
        bump(STAT_SPLIT_FAILED);
        return Retire::Kept;
    };
    let dst = slot.as_mut_ptr();
    // Safety: `dst` is this reservation, `old` the live map element.
    unsafe {
        (*dst).key = seg.key;
        (*dst)._pad = 0;
        copy_value(old, &raw mut (*dst).value);
    }
    // Submit only once the fresh entry is in place: otherwise the packets
    // would be counted both in the retired copy and in the old entry.
    let replaced = ZERO
        .get(0)
        .is_some_and(|zero| FLOWS.insert(&seg.key, zero, BPF_EXIST).is_ok());
    if !replaced {
        slot.discard(0);
        bump(STAT_SPLIT_FAILED);
        return Retire::Kept;
    }
    slot.submit(0);
    bump(STAT_RETIRED);
    match FLOWS.get_ptr_mut(&seg.key) {
        Some(v) => Retire::Fresh(v),
        None => Retire::Lost,
    }
}

#[xdp]
pub fn flowmon_xdp(ctx: XdpContext) -> u32 {
    let pkt = Direct {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    handle(&ctx, &pkt, ctx.ingress_ifindex() as u32, None);
    XDP_PASS
}

#[classifier]
pub fn flowmon_tc(ctx: TcContext) -> i32 {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // Safety: the context pointer the kernel handed us; these fields are
    // readable by TC programs.
    let (ifindex, segs, len) = unsafe { ((*skb).ifindex, (*skb).gso_segs, (*skb).len) };
    let pkt = Direct {
        data: ctx.data(),
        end: ctx.data_end(),
    };
    handle(&ctx, &pkt, ifindex, Some((segs, len)));
    // "No opinion": the packet continues to any later filter, then out.
    TC_ACT_UNSPEC
}

/// Takes slot `next` of the TAKE batch out of the flow table and advances
/// `next`: run by the agent through `BPF_PROG_TEST_RUN`, repeated `count`
/// times, so a batch of finished connections costs one syscall instead of
/// one each. Never attached. A TC program rather than XDP: an XDP test run
/// patches the XDP dispatcher's code in and out on every call (an IPI to
/// each CPU), which cost a fifth of the take.
///
/// The copy and the delete are as close as in `BPF_MAP_LOOKUP_AND_DELETE_ELEM`
/// (which copies under the bucket lock that packet programs do not take):
/// only a packet another CPU handles in the few nanoseconds between the two
/// can go uncounted, or, if it is a SYN that retires the connection, be
/// taken with it.
#[classifier]
pub fn flowmon_take(_ctx: TcContext) -> i32 {
    let Some(batch) = TAKE.get_ptr_mut(0) else {
        return TC_ACT_UNSPEC;
    };
    // Safety: the map's one element, valid during this run; the agent does
    // not touch it while its test run is in progress.
    unsafe {
        let i = (*batch).next as usize;
        if i >= TAKE_BATCH || i >= (*batch).count as usize {
            return TC_ACT_UNSPEC;
        }
        (*batch).next = i as u32 + 1;
        let slot = (&raw mut (*batch).slots).cast::<TakeSlot>().add(i);
        (*slot).status = take(slot);
    }
    TC_ACT_UNSPEC
}

/// Takes `slot`'s key out of the table; returns its `TAKE_*` status.
#[inline(always)]
unsafe fn take(slot: *mut TakeSlot) -> u32 {
    // Safety: `slot` is a TAKE slot (see `flowmon_take`); `live` the element.
    unsafe {
        let key = &(*slot).key;
        let Some(live) = FLOWS.get_ptr_mut(key) else {
            return TAKE_ABSENT;
        };
        let mut d = 0;
        while d < 2 {
            let seen = (*slot).seen_first_ns[d];
            if seen != 0 && (*live).dir[d].first_ns != seen {
                return TAKE_REPLACED;
            }
            d += 1;
        }
        if (*live).dir[0].syn + (*live).dir[1].syn != (*slot).seen_syn {
            return TAKE_REPLACED;
        }
        copy_value(live, &raw mut (*slot).value);
        if FLOWS.remove(key).is_ok() {
            TAKE_REMOVED
        } else {
            TAKE_GONE
        }
    }
}

/// Writes jiffies and then CLOCK_MONOTONIC into the first 16 bytes of the
/// packet: run by the agent through `BPF_PROG_TEST_RUN` to calibrate the
/// coarse clock (see [`Config::tick_ns`]). Never attached.
#[xdp]
pub fn flowmon_clock(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 16 <= end {
        // Safety: the 16 bytes lie inside the packet, as checked; a helper
        // without preconditions each.
        unsafe {
            let j = bpf_jiffies64();
            let t = bpf_ktime_get_ns();
            (data as *mut u64).write_unaligned(j);
            ((data + 8) as *mut u64).write_unaligned(t);
        }
    }
    XDP_PASS
}

/// Baselines for the benchmarks: the same program types doing nothing, so
/// `cargo xtask bench` measures flowmon's cost as the difference in one run.
/// Never attached by the agent.
#[xdp]
pub fn flowmon_pass_xdp(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[classifier]
pub fn flowmon_pass_tc(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
