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
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use flowmon_common::{
    count::{Clock, ordered, record, starts_new_connection},
    flow::{
        CLOSED_FINISHED, CLOSED_RETIRED, CLOSED_RING_BYTES, CONFIG_FLAG_HAND_OVER, CONFIG_FLAG_LOG,
        Config, DEFAULT_MAX_FLOWS, DIRTY_RING_BYTES, FlowKey, FlowValue, RetiredFlow, TAKE_ABSENT,
        TAKE_BATCH, TAKE_REMOVED, TAKE_REPLACED, TakeBatch, TakeSlot,
    },
    parse::{MAX_HEADER_OFFSET, PacketBytes, Parsed, TcpSegment, parse_ethernet},
    stats::{
        CpuState, STAT_DIRTY_LOST, STAT_FLOWS_CREATED, STAT_FRAGMENTS, STAT_INSERT_FAILED,
        STAT_MALFORMED, STAT_NON_TCP, STAT_RETIRED, STAT_SPLIT_FAILED, STAT_TCP,
    },
    table::{
        Bucket, Slot, WAYS, bucket_of, bucket2_of, buckets_for, hash, key_eq, last_active,
        pick_bucket, tag_of,
    },
};

/// The flow table (see flowmon_common::table): one way per connection in
/// buckets of 14, each bucket holding its ways' slots. A full bucket makes
/// room by evicting its least recently active way, so a full table never
/// refuses a new connection; the agent notices the disappearance and
/// reports it as evicted. Sized at load time (`--max-flows`) and mapped by
/// the agent.
#[map]
static BUCKETS: Array<Bucket> =
    Array::with_max_entries(buckets_for(DEFAULT_MAX_FLOWS), BPF_F_MMAPABLE);

/// This CPU's global counters and parse scratch (one lookup a packet).
#[map]
static STATS: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);

/// Connections retired because a new one started on their tuple.
#[map]
static CLOSED: RingBuf = RingBuf::with_byte_size(CLOSED_RING_BYTES, 0);

/// Keys of connections that saw packets since the agent's last poll (one per
/// connection per poll epoch), when the agent reads incrementally.
#[map]
static DIRTY: RingBuf = RingBuf::with_byte_size(DIRTY_RING_BYTES, 0);

/// The agent's settings, as global data: the programs address it directly
/// (one instruction, no lookup), where a one-entry array map costs a
/// lookup each packet, and a pointer the JIT keeps on the stack and reloads
/// at every use (flag overhead about 0.5 ns lower, docs/performance.md).
/// The loader makes it a one-entry array named after its section, which
/// the agent writes and pins like any map (flowmon::kernel).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.config")]
static mut CONFIG: Config = unsafe { core::mem::zeroed() };

#[inline(always)]
fn config() -> &'static Config {
    // Safety: only the agent writes it, through the map, whole values at a
    // time; a reference read during a run sees the config as it then is.
    unsafe { &*(&raw const CONFIG) }
}

/// A zeroed value to insert from: a 208-byte value on the 512-byte BPF stack
/// would crowd out the parser's locals.
#[map]
static ZERO: Array<FlowValue> = Array::with_max_entries(1, 0);

/// Connections the agent takes out of the table, a batch per run of
/// `flowmon_take`; the agent reads and writes it through `mmap`.
#[map]
static TAKE: Array<TakeBatch> = Array::with_max_entries(1, BPF_F_MMAPABLE);

const BPF_F_MMAPABLE: u32 = 1 << 10;

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

/// Adds one to this CPU's counter `index`, on the paths that have not
/// looked the CPU's state up already.
#[inline(always)]
fn bump(index: u32) {
    if let Some(cpu) = STATS.get_ptr_mut(0) {
        count(cpu, index);
    }
}

#[inline(always)]
fn count(cpu: *mut CpuState, index: u32) {
    // Safety: this CPU's state, which only this CPU writes, and a program
    // runs to completion on one CPU without preemption by another flowmon
    // program on it.
    if let Some(n) = unsafe { (*cpu).stats.get_mut(index as usize) } {
        *n += 1;
    }
}

/// Parses and counts one packet. `segs` is the number of wire packets the
/// buffer stands for and `len` its length from the link header on; `None`
/// means one packet whose IP length is taken from its header.
#[inline(always)]
fn handle<C: aya_ebpf::EbpfContext>(ctx: &C, pkt: &Direct, ifindex: u32, gso: Option<(u32, u32)>) {
    let Some(cpu) = STATS.get_ptr_mut(0) else {
        return;
    };
    // Safety: this CPU's scratch (see `count`).
    let seg = unsafe { &mut (*cpu).seg };
    match parse_ethernet(pkt, ifindex, seg) {
        Parsed::Tcp => {}
        Parsed::NotTcp => return count(cpu, STAT_NON_TCP),
        Parsed::Fragment => return count(cpu, STAT_FRAGMENTS),
        Parsed::Malformed => return count(cpu, STAT_MALFORMED),
    };
    count(cpu, STAT_TCP);
    let cfg = config();
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
    let h = hash(&seg.key, &cfg.seeds);
    let found = match lookup(h, &seg.key, cfg) {
        // Safety: `v` points into the slot, valid during this run.
        Some(v) if starts_new_connection(unsafe { &*v }, seg) => match Place::at(h, cfg) {
            Some(at) => match retire(&at, v, seg) {
                Retired::Done => {
                    bump(STAT_RETIRED);
                    Some(v)
                }
                Retired::Gone => None,
                Retired::Failed => {
                    bump(STAT_SPLIT_FAILED);
                    Some(v)
                }
            },
            None => {
                bump(STAT_SPLIT_FAILED);
                Some(v)
            }
        },
        found => found,
    };
    let value = match found {
        Some(v) => v,
        None => match Place::at(h, cfg).and_then(|at| insert(&at, &seg.key)) {
            Some(v) => v,
            None => return bump(STAT_INSERT_FAILED),
        },
    };
    // Safety: `value` points into the map element, valid during this program
    // run; other writers go through `record` as well.
    let closing = unsafe { record(value, seg, packets, ip_bytes, &clock) };
    // `record` finds `closing` on its event path only (a routine segment
    // pays nothing), and the hand-over is a call, not inlined, taken before
    // anything else: tested after the announcement and the log, with
    // `closing` kept across them, it cost SYN, FIN and RST segments 1.2 ns
    // on TC under `BPF_PROG_TEST_RUN`, and given what the log needs, 0.5-1
    // ns more on data and flags (docs/performance.md). So a connection
    // handed over is not announced (the agent drains it from the ring), and
    // the segment that hands it over is not logged.
    // Safety: as for `record`.
    if closing && cfg.flags & CONFIG_FLAG_HAND_OVER != 0 && whole(unsafe { &*value }) {
        return hand_over(&seg.key);
    }
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

/// CLOCK_MONOTONIC from jiffies, or the capture time `flowmon replay` sets
/// in [`Config::clock_override_ns`] for each packet when it is not 0. The
/// coarse reading is one inlined load, as the agent calibrated it in the
/// config; an exact one (`bpf_ktime_get_ns`) is a helper call that cost
/// 40 ns a packet in a VM, more than all the rest of a SYN's, FIN's or
/// RST's counting. Events take the coarse reading kept in order within the
/// connection ([`ordered`]). There is no helper fallback: the agent always
/// fills in the conversion (`flowmon::ticks`), and a call anywhere on this
/// path made LLVM keep the packet's values on the stack around it (~1 ns a
/// packet).
struct Ktime<'a>(&'a Config);

impl Clock for Ktime<'_> {
    #[inline(always)]
    fn event(&self, latest: u64) -> u64 {
        if self.0.clock_override_ns != 0 {
            return self.0.clock_override_ns;
        }
        ordered(self.coarse(), latest)
    }
    #[inline(always)]
    fn coarse(&self) -> u64 {
        let c = self.0;
        if c.clock_override_ns != 0 {
            return c.clock_override_ns;
        }
        // Safety: a helper without preconditions, inlined by the verifier.
        let ticks = unsafe { bpf_jiffies64() }.wrapping_sub(c.jiffies_at);
        c.jiffies_ns.wrapping_add(ticks.wrapping_mul(c.tick_ns))
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

/// Finds the counters of `key`, whose hash is `h`, in its first bucket and
/// only then in its second: most packets belong to a connection in its
/// first bucket, and this path computes one bucket and touches one bucket
/// line. Takes no lock (see flowmon_common::table).
#[inline(always)]
fn lookup(h: u64, key: &FlowKey, cfg: &Config) -> Option<*mut FlowValue> {
    let tag = tag_of(h);
    match find_in(bucket_of(h, cfg.buckets), tag, key) {
        Some((_, v)) => Some(v),
        None => find_in(bucket2_of(h, cfg.buckets), tag, key).map(|(_, v)| v),
    }
}

/// Where `key` is in bucket `b`: its way and counters.
#[inline(always)]
fn find_in(b: u32, tag: u32, key: &FlowKey) -> Option<(usize, *mut FlowValue)> {
    let bucket = BUCKETS.get_ptr_mut(b)?;
    let mut w = 0;
    while w < WAYS {
        if let Some(v) = still_at(bucket, w, tag, key) {
            return Some((w, v));
        }
        w += 1;
    }
    None
}

/// Way `w`'s slot in `bucket`: pointer arithmetic within the bucket's map
/// element, no lookup.
#[inline(always)]
fn way(bucket: *mut Bucket, w: usize) -> *mut Slot {
    // Safety: `bucket` is a BUCKETS element and `w < WAYS` (every caller
    // loops below it or checks it), so the slot lies inside the element.
    unsafe { (&raw mut (*bucket).slots).cast::<Slot>().add(w) }
}

/// A key's two buckets (see flowmon_common::table) and its tag.
struct Place {
    b: [u32; 2],
    bucket: [*mut Bucket; 2],
    tag: u32,
}

impl Place {
    #[inline(always)]
    fn of(key: &FlowKey, cfg: &Config) -> Option<Self> {
        Self::at(hash(key, &cfg.seeds), cfg)
    }

    /// The place of a key whose hash is `h`.
    #[inline(always)]
    fn at(h: u64, cfg: &Config) -> Option<Self> {
        let b = [bucket_of(h, cfg.buckets), bucket2_of(h, cfg.buckets)];
        Some(Self {
            bucket: [BUCKETS.get_ptr_mut(b[0])?, BUCKETS.get_ptr_mut(b[1])?],
            b,
            tag: tag_of(h),
        })
    }

    /// Where `key` is: which of the two buckets, the way, and its counters.
    #[inline(always)]
    fn find(&self, key: &FlowKey) -> Option<(usize, usize, *mut FlowValue)> {
        if let Some((w, v)) = find_in(self.b[0], self.tag, key) {
            return Some((0, w, v));
        }
        find_in(self.b[1], self.tag, key).map(|(w, v)| (1, w, v))
    }

    /// Takes both buckets' locks, the lower-numbered first; false (none
    /// held) when one stayed busy.
    #[inline(always)]
    fn lock(&self) -> bool {
        let (lo, hi) = if self.b[0] <= self.b[1] {
            (0, 1)
        } else {
            (1, 0)
        };
        if !lock(self.bucket[lo]) {
            return false;
        }
        if self.b[0] != self.b[1] && !lock(self.bucket[hi]) {
            unlock(self.bucket[lo]);
            return false;
        }
        true
    }

    #[inline(always)]
    fn unlock(&self) {
        unlock(self.bucket[0]);
        if self.b[0] != self.b[1] {
            unlock(self.bucket[1]);
        }
    }
}

/// Attempts at a busy bucket lock before giving up: it is held for the few
/// dozen instructions of an insert, a retirement or a take.
const LOCK_TRIES: u32 = 64;

/// Takes `bucket`'s lock; false when it stayed busy.
#[inline(always)]
fn lock(bucket: *mut Bucket) -> bool {
    let mut i = 0;
    while i < LOCK_TRIES {
        // Safety: `bucket` is a BUCKETS element, valid during this run.
        if unsafe { flowmon_common::table::try_lock(&raw mut (*bucket).lock) } {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn unlock(bucket: *mut Bucket) {
    // Safety: as in `lock`; this CPU holds it.
    unsafe { (&raw mut (*bucket).lock).write_volatile(0) };
}

/// Gives `key` a way: a free one in the emptier of its buckets, else the
/// least recently active of both buckets' ways (evicted). `None` when a
/// lock stayed busy.
#[inline(always)]
fn insert(at: &Place, key: &FlowKey) -> Option<*mut FlowValue> {
    if !at.lock() {
        return None;
    }
    // Another CPU may have inserted the key while this one waited.
    if let Some((_, _, v)) = at.find(key) {
        at.unlock();
        return Some(v);
    }
    let Some(pick) = PICK.get_ptr_mut(0) else {
        at.unlock();
        return None;
    };
    // Safety: this CPU's scratch slot (see STATS); the buckets are valid
    // during this run, their locks held.
    let (i, w) = unsafe { choose(at, &mut *pick) };
    let got = if i == 0 {
        claim(at.bucket[0], w, at.tag, key)
    } else {
        claim(at.bucket[1], w, at.tag, key)
    };
    at.unlock();
    got
}

/// Scratch for [`choose`], kept in a map rather than in registers: the
/// verifier then sees one state per way instead of every combination of
/// choices so far, which it could not finish checking.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pick {
    /// First free way of each bucket, `WAYS` if none.
    free: [u32; 2],
    /// Free ways of each bucket.
    nfree: [u32; 2],
    /// The least recently active way so far: bucket, way, time.
    victim: [u32; 2],
    oldest: u64,
}

#[map]
static PICK: PerCpuArray<Pick> = PerCpuArray::with_max_entries(1, 0);

/// The way a new key gets: a free one in the emptier of its buckets, else
/// the least recently active of both buckets' ways. Returns (bucket, way).
///
/// # Safety
/// The key's bucket locks are held.
#[inline(always)]
unsafe fn choose(at: &Place, p: &mut Pick) -> (usize, usize) {
    let p = p as *mut Pick;
    // Safety: `p` is this CPU's scratch; volatile, so that the choices stay
    // in memory, where the verifier does not follow their values.
    unsafe {
        (&raw mut (*p).free).write_volatile([WAYS as u32; 2]);
        (&raw mut (*p).nfree).write_volatile([0; 2]);
        (&raw mut (*p).victim).write_volatile([0, WAYS as u32]);
        (&raw mut (*p).oldest).write_volatile(u64::MAX);
        let mut i = 0;
        while i < 2 {
            let mut w = 0;
            while w < WAYS {
                if (*at.bucket[i]).tags[w] == 0 {
                    let f = &raw mut (*p).free[i];
                    if f.read_volatile() == WAYS as u32 {
                        f.write_volatile(w as u32);
                    }
                    let n = &raw mut (*p).nfree[i];
                    n.write_volatile(n.read_volatile() + 1);
                }
                w += 1;
            }
            i += 1;
        }
        let nfree = (&raw const (*p).nfree).read_volatile();
        let free = (&raw const (*p).free).read_volatile();
        match pick_bucket(nfree) {
            Some(0) => return (0, free[0] as usize),
            Some(_) => return (1, free[1] as usize),
            None => {}
        }
        // Both full: only now read the ways' times (28 cache lines).
        let mut i = 0;
        while i < 2 {
            let mut w = 0;
            while w < WAYS {
                let t = last_active(&(*way(at.bucket[i], w)).value);
                if t < (&raw const (*p).oldest).read_volatile() {
                    (&raw mut (*p).oldest).write_volatile(t);
                    (&raw mut (*p).victim).write_volatile([i as u32, w as u32]);
                }
                w += 1;
            }
            i += 1;
        }
        let v = (&raw const (*p).victim).read_volatile();
        (v[0] as usize, v[1] as usize)
    }
}

/// Writes `key` and zeroed counters into way `w`, then publishes its tag.
/// The way stops being found under its old key first.
#[inline(always)]
fn claim(bucket: *mut Bucket, w: usize, tag: u32, key: &FlowKey) -> Option<*mut FlowValue> {
    if w >= WAYS {
        return None;
    }
    let slot = way(bucket, w);
    let zero = ZERO.get(0)?;
    // Safety: the bucket's lock is held; `slot` and `bucket` are valid
    // during this run.
    unsafe {
        let t = &raw mut (*bucket).tags[w];
        if t.read_volatile() != 0 {
            t.write_volatile(0);
        }
        (*slot).key = *key;
        copy_value(zero, &raw mut (*slot).value);
        t.write_volatile(tag);
        Some(&raw mut (*slot).value)
    }
    .inspect(|_| bump(STAT_FLOWS_CREATED))
}

/// What [`retire`] did.
enum Retired {
    /// The old connection is on the ring, its way zeroed for the new one.
    Done,
    /// The old connection left the table after the lookup found it (the
    /// agent's take, or its last packet handing it over on another CPU):
    /// the new one needs a way of its own.
    Gone,
    /// The ring was full or a lock busy: the packet is counted into the
    /// old connection (a merged lifetime beats a lost count).
    Failed,
}

/// Sends the ended connection in `old` to user space and zeroes its counters
/// for the new connection on its tuple, under the key's bucket locks so
/// that the agent's take or a hand-over cannot copy it at the same time.
#[inline(always)]
fn retire(at: &Place, old: *mut FlowValue, seg: &TcpSegment) -> Retired {
    if !at.lock() {
        return Retired::Failed;
    }
    // Copied to the ring a second time, a connection taken or handed over
    // while this CPU waited for the lock would be reported twice, and the
    // new one counted in a way no lookup finds.
    match at.find(&seg.key) {
        Some((_, _, v)) if v == old => {}
        _ => {
            at.unlock();
            return Retired::Gone;
        }
    }
    let Some(mut slot) = CLOSED.reserve::<RetiredFlow>(0) else {
        at.unlock();
        return Retired::Failed;
    };
    let dst = slot.as_mut_ptr();
    // Safety: `dst` is this reservation, `old` the live slot's counters.
    unsafe {
        (*dst).key = seg.key;
        (*dst).kind = CLOSED_RETIRED;
        copy_value(old, &raw mut (*dst).value);
    }
    slot.submit(0);
    if let Some(zero) = ZERO.get(0) {
        // Safety: `old` is valid during this run, the locks held.
        unsafe {
            let latest = last_active(&*old);
            copy_value(zero, old);
            // The opening side starts from the old connection's latest time,
            // so the new one's events are timed after all of the old one's
            // (`Clock::event` keeps after it). With a coarse clock, two short
            // connections within one tick would otherwise get the same
            // first times, which is how the agent's take tells them apart:
            // it could take the new one for the old one it read, and report
            // the two out of order.
            let d = if seg.dir == 0 {
                &raw mut (*old).dir[0]
            } else {
                &raw mut (*old).dir[1]
            };
            (*d).last_ns = latest;
        }
    }
    at.unlock();
    Retired::Done
}

/// Whether `v` is a whole connection, one that saw a SYN or SYN-ACK: only
/// such a connection is handed over at its last packet ([`record`] tells
/// which packet may be). An entry that trailing packets started after a
/// hand-over is left for the agent, which merges it into the connection it
/// holds.
#[inline(always)]
fn whole(v: &FlowValue) -> bool {
    (v.dir[0].syn | v.dir[1].syn | v.dir[0].synack | v.dir[1].synack) != 0
}

/// Whether `v` is a whole connection that has ended: an RST, or a FIN
/// each way.
#[inline(always)]
fn finished_whole(v: &FlowValue) -> bool {
    whole(v) && ((v.dir[0].rst | v.dir[1].rst) != 0 || (v.dir[0].fin != 0 && v.dir[1].fin != 0))
}

/// Hands the connection on `key` over to the agent: copies it
/// onto the CLOSED ring, marked finished, and frees its way, under its
/// bucket's lock, while its lines are in this CPU's cache. Otherwise the
/// agent's next read fetches them again to find it final, and its take a
/// third time, writing the bucket's lock and tags line that the next
/// connection in the bucket then fetches back (docs/performance.md). When
/// the ring is full or the lock busy it stays in the table, and the agent
/// takes it, as without hand-over. The agent counts what it drains as
/// removed, as what it takes: no counter of its own.
#[inline(never)]
fn hand_over(key: &FlowKey) {
    let Some(at) = Place::of(key, config()) else {
        return;
    };
    let Some((i, w, _)) = at.find(key) else {
        return;
    };
    let bucket = if i == 0 { at.bucket[0] } else { at.bucket[1] };
    if w >= WAYS || !lock(bucket) {
        return;
    }
    // Whole and finished again under the lock: another CPU may have
    // retired the connection that this packet found finished, and the
    // way now holds the next one, just opened.
    if let Some(live) = still_at(bucket, w, at.tag, key)
        // Safety: the way's counters, the bucket's lock held.
        && finished_whole(unsafe { &*live })
        && let Some(mut slot) = CLOSED.reserve::<RetiredFlow>(0)
    {
        let dst = slot.as_mut_ptr();
        // Safety: `dst` is this reservation, `live` the way's counters, the
        // bucket's lock held.
        unsafe {
            (*dst).key = *key;
            (*dst).kind = CLOSED_FINISHED;
            copy_value(live, &raw mut (*dst).value);
        }
        slot.submit(0);
        // Safety: as above; `w < WAYS`.
        unsafe { (&raw mut (*bucket).tags[w]).write_volatile(0) };
    }
    unlock(bucket);
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
/// The copy and the freeing of the way happen under the bucket's lock, which
/// inserts and retirements take too; counting packets does not take it, so
/// only a packet another CPU counts in the few nanoseconds between the two
/// can go uncounted.
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
    let cfg = config();
    // Safety: `slot` is a TAKE slot (see `flowmon_take`).
    let key = unsafe { &(*slot).key };
    let Some(at) = Place::of(key, cfg) else {
        return TAKE_ABSENT;
    };
    // Only the bucket that holds the key is locked: what changes a way
    // (an insert claiming it, a retirement, a take) holds its bucket's
    // lock. Both locks were a second cache line bounced between the
    // agent's CPU and the packets' for every connection taken. The key is
    // found first without the lock, then checked again under it.
    let Some((i, w, _)) = at.find(key) else {
        return TAKE_ABSENT;
    };
    let bucket = if i == 0 { at.bucket[0] } else { at.bucket[1] };
    // A busy lock: left for the next poll, like a changed entry.
    if !lock(bucket) {
        return TAKE_REPLACED;
    }
    let status = match still_at(bucket, w, at.tag, key) {
        Some(live) => take_found(slot, live, bucket, w),
        // Evicted between the look and the lock (or evicted and back as
        // a new connection, left for the next poll to look at).
        None if at.find(key).is_some() => TAKE_REPLACED,
        None => TAKE_ABSENT,
    };
    unlock(bucket);
    status
}

/// The counters of way `w` of `bucket` if it holds `key` (whose tag is
/// `tag`): the test a lookup makes of each way, and a take of the way it
/// found before taking the lock.
#[inline(always)]
fn still_at(bucket: *mut Bucket, w: usize, tag: u32, key: &FlowKey) -> Option<*mut FlowValue> {
    if w >= WAYS {
        return None;
    }
    // Safety: a BUCKETS element, valid during this run, `w < WAYS`; another
    // CPU may write the tag, so it is read once.
    unsafe {
        if (&raw const (*bucket).tags[w]).read_volatile() != tag {
            return None;
        }
        let slot = way(bucket, w);
        key_eq(&(*slot).key, key).then_some(&raw mut (*slot).value)
    }
}

/// Copies the found entry into `slot` and frees its way, unless it is not
/// the connection the agent read.
#[inline(always)]
fn take_found(slot: *mut TakeSlot, live: *mut FlowValue, bucket: *mut Bucket, w: usize) -> u32 {
    if w >= WAYS {
        return TAKE_ABSENT;
    }
    // Safety: `slot` is a TAKE slot; `live` and `bucket` are valid during
    // this run, and the key's bucket locks are held.
    unsafe {
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
        (&raw mut (*bucket).tags[w]).write_volatile(0);
    }
    TAKE_REMOVED
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
