//! The counting routine: adds one TCP segment to a connection's entry.
//!
//! The kernel runs it on map memory that other CPUs may update at the same
//! time, but each direction of a connection has one writer at a time (see
//! `bpf_counters` below), so the kernel's counters are plain adds. User space
//! runs the very same code on its own table.

use crate::{
    flow::{DirStats, FlowValue},
    parse::TcpSegment,
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Whether `seg` opens a new connection on a tuple whose entry holds one
/// that has ended: a SYN without ACK after any FIN or RST. A retransmitted SYN
/// of a connection that has not ended stays in it, and so does a SYN-ACK.
/// The kernel then retires the old entry and starts a fresh one, timed after
/// the old one's latest packet; the offline path does the same, so both
/// report the same lifetimes.
#[inline(always)]
pub fn starts_new_connection(v: &FlowValue, seg: &TcpSegment) -> bool {
    let syn_only = seg.flags as u8 & (TCP_SYN | TCP_ACK) == TCP_SYN;
    syn_only && (v.dir[0].fin | v.dir[1].fin | v.dir[0].rst | v.dir[1].rst) != 0
}

/// Where [`record`] takes the packet's time from (nanoseconds).
pub trait Clock {
    /// The time of a packet that records an event: one that sets one of its
    /// direction's first times, carries SYN, FIN or RST, or follows its own
    /// side's FIN or RST. `latest` is the latest time the connection holds,
    /// either direction. A clock too coarse to tell two packets apart
    /// returns a time after `latest` ([`ordered`]), so the times keep the
    /// order in which the events were counted: who sent FIN first, whether
    /// an RST came after a FIN.
    fn event(&self, latest: u64) -> u64;
    /// A time at most one kernel tick (4 ms at HZ=250) behind the exact one,
    /// for refreshing `last_ns` on an established connection's packets. In
    /// the kernel it is one inlined load, where an exact clock read is a
    /// helper call that cost 40 ns a packet in a VM.
    fn coarse(&self) -> u64;
}

/// An event's time from a coarse clock reading: the reading, or 1 ns past
/// the connection's latest time when the reading is not after it (events
/// within one tick), so that events stay ordered.
#[inline(always)]
pub fn ordered(coarse: u64, latest: u64) -> u64 {
    if coarse > latest { coarse } else { latest + 1 }
}

/// One time for every packet: offline analysis and replay, where the packet's
/// capture time is both exact and free.
#[derive(Clone, Copy, Debug)]
pub struct Fixed(pub u64);

impl Clock for Fixed {
    #[inline(always)]
    fn event(&self, _latest: u64) -> u64 {
        self.0
    }
    #[inline(always)]
    fn coarse(&self) -> u64 {
        self.0
    }
}

/// Adds `seg` to `value`. `packets` is how many wire packets the segment
/// stands for (more than 1 only for a GSO super-packet seen at TC egress) and
/// `ip_bytes` their IP-layer bytes; `clock` gives the packet time.
///
/// A packet that sets one of the direction's first-event times, carries SYN,
/// FIN or RST, or follows this side's own FIN or RST takes an event time
/// ([`Clock::event`]) and sets `last_ns`; any other packet refreshes
/// `last_ns` from the coarse clock, never moving it backwards.
///
/// Returns whether the packet may close the connection: an RST, or a pure
/// ACK from a side that has sent a FIN once the other side has too (the
/// ACK of the last FIN). Found on the event path only, so that the routine
/// packets' path is as it was.
///
/// # Safety
/// `value` must point to a live, aligned `FlowValue` for the whole call; other
/// threads may update it concurrently only through this function.
#[inline(always)]
pub unsafe fn record<C: Clock>(
    value: *mut FlowValue,
    seg: &TcpSegment,
    packets: u32,
    ip_bytes: u64,
    clock: &C,
) -> bool {
    // Safety: the caller guarantees `value` is valid; an index of 0 or 1 is in
    // bounds, and a constant index keeps the verifier's job simple.
    let d: *mut DirStats = unsafe {
        if seg.dir == 0 {
            &raw mut (*value).dir[0]
        } else {
            &raw mut (*value).dir[1]
        }
    };
    // Safety: every field pointer below is derived from the valid `d`, aligned
    // as the repr(C) layout guarantees.
    unsafe {
        add64(&raw mut (*d).packets, packets as u64);
        add64(&raw mut (*d).bytes, ip_bytes);
        let flags = seg.flags as u8;
        let pure_ack = flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 && flags & TCP_ACK != 0;
        // A first data or pure-ACK time is set with the first time, so
        // checking it covers both. FIN and RST counts, adjacent, are read
        // as one word: no FIN or RST from this side yet.
        let routine = flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
            && get((&raw const (*d).fin).cast::<u64>()) == 0
            && if seg.payload_len > 0 {
                get(&raw const (*d).first_data_ns) != 0
            } else if pure_ack {
                get(&raw const (*d).first_ack_ns) != 0
            } else {
                get(&raw const (*d).first_ns) != 0
            };
        if seg.payload_len > 0 {
            add32(&raw mut (*d).data_packets, packets);
        }
        let last = &raw mut (*d).last_ns;
        if routine {
            let now = clock.coarse();
            // Plain stores: the last writer wins, and any writer's time is
            // recent. Only ever forward, as an exact time may be newer.
            if now > last.read_volatile() {
                last.write_volatile(now);
            }
            return false;
        }
        let now = clock.event(crate::table::last_active(&*value));
        if flags & TCP_SYN != 0 {
            if flags & TCP_ACK != 0 {
                add32(&raw mut (*d).synack, 1);
                first(&raw mut (*d).first_synack_ns, now);
            } else {
                add32(&raw mut (*d).syn, 1);
                first(&raw mut (*d).first_syn_ns, now);
            }
        }
        if flags & TCP_FIN != 0 {
            add32(&raw mut (*d).fin, 1);
            first(&raw mut (*d).first_fin_ns, now);
        }
        if flags & TCP_RST != 0 {
            add32(&raw mut (*d).rst, 1);
            first(&raw mut (*d).first_rst_ns, now);
        }
        if seg.payload_len > 0 {
            first(&raw mut (*d).first_data_ns, now);
        } else if pure_ack {
            first(&raw mut (*d).first_ack_ns, now);
        }
        first(&raw mut (*d).first_ns, now);
        last.write_volatile(now);
        flags & TCP_RST != 0
            || (pure_ack
                && seg.payload_len == 0
                && get(&raw const (*value).dir[0].fin) != 0
                && get(&raw const (*value).dir[1].fin) != 0)
    }
}

/// A field another CPU may be writing: read once, as it is now.
#[inline(always)]
unsafe fn get<T: Copy>(p: *const T) -> T {
    // Safety: forwarded from `record`.
    unsafe { p.read_volatile() }
}

#[cfg(target_arch = "bpf")]
use bpf_counters::{add32, add64, first};
#[cfg(not(target_arch = "bpf"))]
use user_atomics::{add32, add64, first};

/// Plain adds, not atomic ones: a BPF atomic add is a locked x86
/// instruction, and the three on a data segment (packets, bytes, data
/// packets) cost 17 of its 50 ns on the Intel host of the benchmark
/// (docs/performance.md). What makes plain adds exact is that a direction's
/// fields have one writer at a time: the two directions are separate
/// fields, XDP sees a direction's packets from one receive queue (RSS hashes
/// its tuple to one queue, whose NAPI poll runs on one CPU at a time), and
/// TC egress sees a socket's segments sent under the socket's lock. Only two
/// CPUs counting the same direction of the same connection within the same
/// few nanoseconds could lose one count (a SYN-ACK retransmitted by the
/// timer while a duplicate SYN draws one from another CPU, say).
#[cfg(target_arch = "bpf")]
mod bpf_counters {
    #[inline(always)]
    pub(super) unsafe fn add64(p: *mut u64, v: u64) {
        // Safety: forwarded from `record`.
        unsafe { p.write_volatile(p.read_volatile().wrapping_add(v)) };
    }

    #[inline(always)]
    pub(super) unsafe fn add32(p: *mut u32, v: u32) {
        // Safety: forwarded from `record`.
        unsafe { p.write_volatile(p.read_volatile().wrapping_add(v)) };
    }

    /// Sets `*p` to `now` unless an earlier packet already did. Two CPUs
    /// racing here both hold a "first" packet of the same direction within
    /// nanoseconds of each other, so either time is right.
    #[inline(always)]
    pub(super) unsafe fn first(p: *mut u64, now: u64) {
        // Safety: forwarded from `record`.
        unsafe {
            if p.read_volatile() == 0 {
                p.write_volatile(now);
            }
        }
    }
}

#[cfg(not(target_arch = "bpf"))]
mod user_atomics {
    use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

    #[inline(always)]
    pub(super) unsafe fn add64(p: *mut u64, v: u64) {
        // Safety: forwarded from `record`.
        unsafe { AtomicU64::from_ptr(p) }.fetch_add(v, Relaxed);
    }

    #[inline(always)]
    pub(super) unsafe fn add32(p: *mut u32, v: u32) {
        // Safety: forwarded from `record`.
        unsafe { AtomicU32::from_ptr(p) }.fetch_add(v, Relaxed);
    }

    #[inline(always)]
    pub(super) unsafe fn first(p: *mut u64, now: u64) {
        // Safety: forwarded from `record`.
        let _ = unsafe { AtomicU64::from_ptr(p) }.compare_exchange(0, now, Relaxed, Relaxed);
    }
}
