//! The flow table's layout: buckets of slots in one array map, found by a
//! seeded hash that the programs and the agent compute alike.
//!
//! Why arrays and not a BPF hash map: a hash map lookup is a call into the
//! kernel (hashing, bucket walk, `memcmp`), and every kernel function return
//! pays for the host's return-stack mitigations; an array lookup is inlined
//! by the verifier. Hashing and comparing in the program, with no call at
//! all, halved the cost of a data segment (docs/performance.md). The agent
//! reads the table through `mmap`, with no syscall per entry either.
//!
//! `BUCKETS[b]` holds a lock, the tags of its [`WAYS`] ways and the ways'
//! slots (key and counters), one element, so that a packet makes one
//! lookup for its bucket and its slot: each inlined lookup is still a call
//! to LLVM, which keeps the values live across it on the stack. A tag is 0
//! for a free way, else the key's fingerprint ([`tag_of`], never 0).
//! Packets find their entry without the lock: a way becomes visible when
//! its tag is written, after its key and zeroed counters. Whoever changes
//! which key a way holds (a packet inserting or evicting, the agent's take)
//! holds the bucket's lock for it.

use crate::flow::{FlowKey, FlowValue};

/// Ways per bucket: the lock and 14 tags fill one 64-byte cache line, so a
/// lookup touches that line and the slot it finds.
pub const WAYS: usize = 14;

/// One bucket: its lock (0 free, 1 held; a 64-bit word because the bpf
/// target's compare-and-swap is 64-bit) and its ways' tags in the first
/// cache line, then the ways' slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub lock: u64,
    pub tags: [u32; WAYS],
    pub slots: [Slot; WAYS],
}
const _: () = assert!(core::mem::size_of::<Bucket>() == 64 + WAYS * 256);
const _: () = assert!(core::mem::offset_of!(Bucket, slots) == 64);

/// One way: the connection's key and what it counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub key: FlowKey,
    pub _pad: u32,
    pub value: FlowValue,
}
const _: () = assert!(core::mem::size_of::<Slot>() == 256);

/// Buckets for a table of `max_flows` connections: a fifth more ways than
/// that, because with two choices per key the first bucket overflows when
/// about 88 % of the ways are taken (at 90 %, 3 connections in 10,000 find
/// both their buckets full and evict another).
#[inline]
pub const fn buckets_for(max_flows: u32) -> u32 {
    let ways = (max_flows as u64 * 6).div_ceil(5);
    let b = ways.div_ceil(WAYS as u64);
    if b == 0 { 1 } else { b as u32 }
}

/// A table's hash seed, spread into one word for each pair of key words
/// ([`hash`]). Kept in the config spread, so the programs load six words
/// instead of rotating the seed five times a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seeds(pub [u64; 6]);
const _: () = assert!(core::mem::size_of::<Seeds>() == 48);

impl Seeds {
    pub const fn new(seed: u64) -> Self {
        Self([
            seed,
            seed.rotate_left(13),
            seed.rotate_left(29),
            seed.rotate_left(41),
            seed.rotate_left(53),
            seed.rotate_left(7),
        ])
    }
}

/// The key's hash under `seeds`. An IPv4 key (most of them) mixes only the
/// words that can differ between IPv4 keys: the two addresses, the ports
/// with the interface, and VLAN with family (three multiplies); the other
/// six address words of an IPv4 key are always 0 ([`FlowKey::write_canonical`]).
/// Any other key mixes its 11 words in pairs, each pair with its own seed
/// word and multiplier. Then both fold alike. Cheap in the programs
/// (independent multiplies), and seeded at load time so that nobody outside
/// can aim connections at one bucket. Changing it changes where a pinned
/// table's entries are: bump [`TABLE_LAYOUT`].
///
/// [`FlowKey::write_canonical`]: crate::flow::FlowKey::write_canonical
#[inline(always)]
pub fn hash(key: &FlowKey, seeds: &Seeds) -> u64 {
    // Safety: FlowKey is 44 bytes of plain data, 4-aligned (asserted in flow).
    let w = unsafe { &*(key as *const FlowKey).cast::<[u32; 11]>() };
    let pair = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    let s = &seeds.0;
    let mut h = if key.family == 4 {
        let a = (pair(w[0], w[4]) ^ s[0]).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let b = (pair(w[8], w[9]) ^ s[1]).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        let c = (u64::from(w[10]) ^ s[2]).wrapping_mul(0x1656_67B1_9E37_79F9);
        a.wrapping_add(b) ^ c
    } else {
        let p = |i: usize| pair(w[2 * i], w[2 * i + 1]);
        let a = (p(0) ^ s[0]).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let b = (p(1) ^ s[1]).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        let c = (p(2) ^ s[2]).wrapping_mul(0x1656_67B1_9E37_79F9);
        let d = (p(3) ^ s[3]).wrapping_mul(0x85EB_CA77_C2B2_AE63);
        let e = (p(4) ^ s[4]).wrapping_mul(0x27D4_EB2F_1656_67C5);
        let f = (u64::from(w[10]) ^ s[5]).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        a.wrapping_add(b).wrapping_add(c) ^ d.wrapping_add(e).wrapping_add(f)
    };
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 32)
}

/// The version of the table's layout and hashing, kept in a pinned table's
/// config: an agent finding another one there refuses to resume it, as it
/// would look for every entry in the wrong place. 2: IPv4 keys hash three
/// words; 3: slots inside their bucket, one map.
pub const TABLE_LAYOUT: u32 = 3;

/// The bucket of a hash among `buckets` (a multiply, not a division).
#[inline(always)]
pub fn bucket_of(hash: u64, buckets: u32) -> u32 {
    (((hash >> 32) * u64::from(buckets)) >> 32) as u32
}

/// The key's other bucket. Every key may live in either of two buckets, and
/// goes into the emptier one: with one choice, a bucket overflows long
/// before the table is full (at 80 % full, 3.6 % of connections would find
/// their bucket full and evict another); with two, practically none does
/// until the table is.
#[inline(always)]
pub fn bucket2_of(hash: u64, buckets: u32) -> u32 {
    let h = (hash ^ (hash >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
    bucket_of(h, buckets)
}

/// Which of a key's buckets a new key goes into, given their free slots:
/// the emptier (the first on a tie); `None` when both are full. Always the
/// emptier, because preferring the first while it kept a few slots free
/// (which would leave fewer keys in their second bucket, one bucket line
/// per lookup) let a key find both full before the table reached its
/// `--max-flows`, for some seeds (the test below).
#[inline(always)]
pub fn pick_bucket(free: [u32; 2]) -> Option<usize> {
    if free[0] >= free[1] && free[0] > 0 {
        Some(0)
    } else if free[1] > 0 {
        Some(1)
    } else {
        None
    }
}

/// The tag of a hash: its low word, never 0 (0 marks a free way).
#[inline(always)]
pub fn tag_of(hash: u64) -> u32 {
    hash as u32 | 1
}

/// Whether two keys are equal, compared as 64-bit words (no `memcmp` call,
/// which the bpf target cannot link, and half the loads of a word-by-word
/// compare): the last word (VLAN, family) and the three that differ between
/// IPv4 keys, then, unless the family is IPv4, the two holding the rest of
/// the IPv6 addresses (0 in every IPv4 key, see [`hash`]).
#[inline(always)]
pub fn key_eq(a: &FlowKey, b: &FlowKey) -> bool {
    let (x, y) = (
        (a as *const FlowKey).cast::<u8>(),
        (b as *const FlowKey).cast::<u8>(),
    );
    // Safety: every offset read lies within the 44-byte keys; unaligned
    // reads, as FlowKey is only 4-aligned (in the maps it is 8-aligned,
    // and the programs allow misaligned loads anyway).
    let q = |i: usize| unsafe {
        x.add(8 * i).cast::<u64>().read_unaligned() ^ y.add(8 * i).cast::<u64>().read_unaligned()
    };
    let last = unsafe {
        x.add(40).cast::<u32>().read_unaligned() ^ y.add(40).cast::<u32>().read_unaligned()
    };
    let mut d = u64::from(last) | q(0) | q(2) | q(4);
    if a.family != 4 {
        d |= q(1) | q(3);
    }
    d == 0
}

/// Takes a bucket lock if it is free (compare-and-swap 0 to 1, acquiring);
/// false if someone holds it. Released by writing 0.
///
/// # Safety
/// `lock` points to a live, 8-aligned bucket lock.
#[inline(always)]
pub unsafe fn try_lock(lock: *mut u64) -> bool {
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::{AtomicOrdering::Acquire, AtomicOrdering::Relaxed, atomic_cxchg};
        // Safety: forwarded from the caller. 64-bit: the bpf target's
        // default CPU has no 32-bit compare-and-swap.
        unsafe { atomic_cxchg::<u64, { Acquire }, { Relaxed }>(lock, 0, 1).1 }
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        use core::sync::atomic::{AtomicU64, Ordering};
        // Safety: forwarded from the caller.
        unsafe { AtomicU64::from_ptr(lock) }
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }
}

/// The time a way was last active, for choosing which way of a full
/// bucket to evict.
#[inline(always)]
pub fn last_active(v: &FlowValue) -> u64 {
    let (a, b) = (v.dir[0].last_ns, v.dir[1].last_ns);
    if a > b { a } else { b }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        let mut k = FlowKey {
            port_a: 80,
            port_b: port,
            family: 4,
            ifindex: 1,
            ..Default::default()
        };
        k.addr_a[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.addr_b[..4].copy_from_slice(&[10, 0, 0, 2]);
        k
    }

    #[test]
    fn two_choices_fill_the_table_before_any_bucket_overflows() {
        // As many connections as the table is sized for, each into the
        // bucket `pick_bucket` chooses, under several seeds: none may find
        // both full.
        let buckets = buckets_for(140_000);
        for seed in 0..8u64 {
            let seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut n = std::vec![0u32; buckets as usize];
            let (mut full, mut second) = (0, 0);
            for i in 0..140_000u32 {
                let mut k = key((i % 60_000) as u16);
                k.addr_b[..4].copy_from_slice(&(0x0b00_0000 + i / 60_000).to_be_bytes());
                let h = hash(&k, &Seeds::new(seed));
                let b = [
                    bucket_of(h, buckets) as usize,
                    bucket2_of(h, buckets) as usize,
                ];
                match pick_bucket([WAYS as u32 - n[b[0]], WAYS as u32 - n[b[1]]]) {
                    Some(i) => {
                        n[b[i]] += 1;
                        second += i;
                    }
                    None => full += 1,
                }
            }
            assert_eq!(full, 0, "seed {seed:#x}");
            assert!(second < 140_000 / 2, "{second} in their second bucket");
        }
    }

    /// How many of 64k connections that differ only in the client port (as
    /// a busy server's do) land in each of 4681 buckets (65,534 ways).
    fn spread(key: fn(u16) -> FlowKey) -> (u32, f64, usize) {
        let buckets = buckets_for(65_534);
        let mut n = std::vec![0u32; buckets as usize];
        for p in 1..=u16::MAX {
            n[bucket_of(hash(&key(p), &Seeds::new(0x1234_5678_9abc_def0)), buckets) as usize] += 1;
        }
        let empty = n.iter().filter(|&&c| c == 0).count();
        (
            *n.iter().max().unwrap(),
            65_535.0 / f64::from(buckets),
            empty,
        )
    }

    #[test]
    fn keys_spread_evenly_over_buckets() {
        // No bucket may overflow its 14 ways by much more than chance
        // would, for IPv4 keys (three words hashed) and IPv6 ones (all).
        for key in [key, key6] {
            let (max, mean, empty) = spread(key);
            assert!(f64::from(max) < mean * 2.5, "max {max}, mean {mean}");
            assert!(empty < 5, "{empty} empty buckets");
        }
    }

    #[test]
    fn the_seed_changes_where_keys_go_and_tags_are_never_zero() {
        let buckets = buckets_for(262_144);
        let k = key(4242);
        let places: std::collections::BTreeSet<u32> = (0..64u64)
            .map(|s| {
                bucket_of(
                    hash(&k, &Seeds::new(s.wrapping_mul(0x9E37_79B9_7F4A_7C15))),
                    buckets,
                )
            })
            .collect();
        assert!(places.len() > 60, "{places:?}");
        assert!((0..1000u16).all(|p| tag_of(hash(&key(p), &Seeds::new(7))) != 0));
        assert!(key_eq(&key(5), &key(5)) && !key_eq(&key(5), &key(6)));
        assert_eq!(buckets_for(0), 1);
        assert_eq!(buckets_for(512), 44);
    }

    fn key6(port: u16) -> FlowKey {
        let mut k = key(port);
        k.family = 6;
        k.addr_a = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        k.addr_b = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        k
    }

    #[test]
    fn key_eq_agrees_with_eq_on_every_field() {
        // Each byte of the key changed in turn, IPv4 (the bytes an IPv4 key
        // has) and IPv6 (all of them): key_eq must see what == sees.
        let v4_bytes = [0..4, 16..20, 32..44];
        for base in [key(1234), key6(1234)] {
            for i in 0..44 {
                if base.family == 4 && !v4_bytes.iter().any(|r| r.contains(&i)) {
                    continue;
                }
                let mut other = base;
                // Safety: a FlowKey is 44 bytes of plain data.
                let b = unsafe { &mut *(&raw mut other).cast::<[u8; 44]>() };
                b[i] ^= 0x10;
                assert_eq!(key_eq(&base, &other), base == other, "byte {i}");
                assert!(!key_eq(&base, &other), "byte {i}");
            }
            assert!(key_eq(&base, &base.clone()));
        }
        // The same first words under another family are another key.
        let mut v6 = key(1234);
        v6.family = 6;
        assert!(!key_eq(&key(1234), &v6) && !key_eq(&v6, &key(1234)));
    }
}
