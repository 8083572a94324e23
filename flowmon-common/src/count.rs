//! The counting routine: adds one TCP segment to a connection's entry.
//!
//! The kernel runs it on map memory that other CPUs update at the same time
//! (XDP on one receive queue, TC egress on another core), so every counter is
//! an atomic add and every "first time" is a compare-and-swap from 0: a plain
//! read-modify-write would lose counts under load. User space runs the very
//! same code on its own table.

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
/// The kernel then retires the old entry and starts a fresh one; the offline
/// path does the same, so both report the same lifetimes.
#[inline(always)]
pub fn starts_new_connection(v: &FlowValue, seg: &TcpSegment) -> bool {
    let syn_only = seg.flags as u8 & (TCP_SYN | TCP_ACK) == TCP_SYN;
    syn_only && (v.dir[0].fin | v.dir[1].fin | v.dir[0].rst | v.dir[1].rst) != 0
}

/// Where [`record`] takes the packet's time from (nanoseconds).
pub trait Clock {
    /// The exact time: for times that order events (first SYN, FIN, RST, data,
    /// ACK of each side) and for the packets that may end a connection.
    fn precise(&self) -> u64;
    /// A time at most one kernel tick (4 ms at HZ=250) behind the exact one,
    /// for refreshing `last_ns` on an established connection's packets, which
    /// only idle timeouts read. In the kernel it is much cheaper to get.
    fn coarse(&self) -> u64;
}

/// One time for every packet: offline analysis and replay, where the packet's
/// capture time is both exact and free.
#[derive(Clone, Copy, Debug)]
pub struct Fixed(pub u64);

impl Clock for Fixed {
    #[inline(always)]
    fn precise(&self) -> u64 {
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
/// The exact time is read only when the packet sets one of the direction's
/// first-event times, carries SYN, FIN or RST, or follows this side's own FIN
/// or RST (so the last packets of a closing connection, which end its
/// duration, are exact); any other packet refreshes `last_ns` from the coarse
/// clock, never moving it backwards.
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
) {
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
    // as the repr(C) layout guarantees, and only accessed atomically.
    unsafe {
        add64(&raw mut (*d).packets, packets as u64);
        add64(&raw mut (*d).bytes, ip_bytes);
        let flags = seg.flags as u8;
        let pure_ack = flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 && flags & TCP_ACK != 0;
        let routine = flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
            && get(&raw const (*d).first_ns) != 0
            && (get(&raw const (*d).fin) | get(&raw const (*d).rst)) == 0
            && if seg.payload_len > 0 {
                get(&raw const (*d).first_data_ns) != 0
            } else {
                !pure_ack || get(&raw const (*d).first_ack_ns) != 0
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
            return;
        }
        let now = clock.precise();
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
    }
}

/// A field another CPU may be writing: read once, as it is now.
#[inline(always)]
unsafe fn get<T: Copy>(p: *const T) -> T {
    // Safety: forwarded from `record`.
    unsafe { p.read_volatile() }
}

#[cfg(target_arch = "bpf")]
use bpf_atomics::{add32, add64, first};
#[cfg(not(target_arch = "bpf"))]
use user_atomics::{add32, add64, first};

/// The bpf target has no `core::sync::atomic` read-modify-write types, so the
/// kernel build uses the intrinsic, which LLVM lowers to the BPF atomic add
/// (`lock *(u64 *)(r + off) += r`, available since the first eBPF ISA).
#[cfg(target_arch = "bpf")]
mod bpf_atomics {
    use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};

    #[inline(always)]
    pub(super) unsafe fn add64(p: *mut u64, v: u64) {
        // Safety: forwarded from `record`.
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(p, v) };
    }

    #[inline(always)]
    pub(super) unsafe fn add32(p: *mut u32, v: u32) {
        // Safety: forwarded from `record`.
        unsafe { atomic_xadd::<u32, u32, { Relaxed }>(p, v) };
    }

    /// Sets `*p` to `now` unless an earlier packet already did. Not a
    /// compare-and-swap: BPF cmpxchg needs ISA v3, which the bpf target does
    /// not default to. Two CPUs racing here both hold a "first" packet of the
    /// same direction within nanoseconds of each other, so either time is right.
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
