//! The kernel's flow table as the agent sees it: the BUCKETS array map
//! mapped into this process and read in place, without a syscall per entry.
//!
//! The layout and the hash are flowmon_common::table's, shared with the
//! programs. Reads take no lock, like the programs' lookups: a way's copy
//! counts only when its tag is the same before and after it, so a way that
//! changed owner meanwhile is not reported under the wrong key.

use std::{io, os::fd::BorrowedFd};

use flowmon_common::{
    flow::{FlowKey, FlowValue},
    table::{
        Bucket, Seeds, Slot, WAYS, bucket_of, bucket2_of, hash, key_eq, last_active, pick_bucket,
        tag_of, try_lock,
    },
};

use crate::{bpfsys::MappedArray, prefetch};

/// How many buckets ahead [`FlowTable::read_buckets`] asks for.
const PREFETCH: usize = 16;

pub struct FlowTable {
    buckets: MappedArray<Bucket>,
    seeds: Seeds,
}

impl FlowTable {
    /// Maps the BUCKETS map (`n` buckets); `seeds` is the table's hash
    /// seed.
    pub fn new(buckets: BorrowedFd<'_>, n: u32, seeds: Seeds) -> io::Result<Self> {
        Ok(Self {
            buckets: MappedArray::new(buckets, n as usize)?,
            seeds,
        })
    }

    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// The tag of way `w` of bucket `b`, as it is now.
    fn tag(&self, b: usize, w: usize) -> u32 {
        // Safety: a valid element of the mapping; the programs write tags
        // with single stores.
        unsafe { (&raw const (*self.buckets.ptr(b)).tags[w]).read_volatile() }
    }

    /// Way `w`'s slot in bucket `b`.
    fn slot(&self, b: usize, w: usize) -> *mut Slot {
        // Safety: a valid element of the mapping, and `w < WAYS`.
        unsafe { (&raw mut (*self.buckets.ptr(b)).slots[w]) }
    }

    /// The key in way `w` of bucket `b`, as it is now.
    fn key(&self, b: usize, w: usize) -> FlowKey {
        // Safety: a valid slot of the mapping; FlowKey is plain data.
        unsafe { (&raw const (*self.slot(b, w)).key).read_volatile() }
    }

    /// Appends the entries of buckets `from..to` to `out`; returns how many.
    pub fn read_buckets(
        &self,
        from: usize,
        to: usize,
        out: &mut Vec<(FlowKey, FlowValue)>,
    ) -> usize {
        let start = out.len();
        let to = to.min(self.buckets());
        for b in from..to {
            // Each bucket's tags are a cache line of a page of their own
            // (a bucket is 3,648 bytes): a mostly empty table is read at the
            // speed of its misses, one after another, unless the next ones
            // are already on their way (past `to` too: a whole read comes
            // in stretches).
            if b + PREFETCH < self.buckets() {
                prefetch::line(self.buckets.ptr(b + PREFETCH));
            }
            for w in 0..WAYS {
                let tag = self.tag(b, w);
                if tag == 0 {
                    continue;
                }
                let slot = self.slot(b, w);
                // Safety: a valid element of the mapping; both plain data.
                let entry = unsafe {
                    (
                        (&raw const (*slot).key).read_volatile(),
                        (&raw const (*slot).value).read_volatile(),
                    )
                };
                if self.tag(b, w) == tag {
                    out.push(entry);
                }
            }
        }
        out.len() - start
    }

    /// Where `key` may live: its two buckets and tag, and, if present, its
    /// bucket (0 or 1) and way.
    fn locate(&self, key: &FlowKey) -> ([usize; 2], u32, Option<(usize, usize)>) {
        let (b, tag) = self.place(key);
        let found = (0..2)
            .flat_map(|i| (0..WAYS).map(move |w| (i, w)))
            .find(|&(i, w)| self.tag(b[i], w) == tag && key_eq(&self.key(b[i], w), key));
        (b, tag, found)
    }

    /// A key's two buckets and its tag.
    fn place(&self, key: &FlowKey) -> ([usize; 2], u32) {
        let h = hash(key, &self.seeds);
        let n = self.buckets() as u32;
        (
            [bucket_of(h, n) as usize, bucket2_of(h, n) as usize],
            tag_of(h),
        )
    }

    /// Starts loading the tags of buckets `b`.
    fn prefetch_tags(&self, b: [usize; 2]) {
        prefetch::line(self.buckets.ptr(b[0]));
        prefetch::line(self.buckets.ptr(b[1]));
    }

    /// Starts loading the slot whose tag is `tag` in buckets `b`, if any
    /// (reading the tags, so best once [`FlowTable::prefetch_tags`] has
    /// brought them in).
    fn prefetch_slot(&self, b: [usize; 2], tag: u32) {
        for b in b {
            if let Some(w) = (0..WAYS).find(|&w| self.tag(b, w) == tag) {
                prefetch::all(self.slot(b, w));
                return;
            }
        }
    }

    /// Starts loading the cache lines the take program will read for
    /// `keys`: their buckets' tags, then the slots those tags point to.
    /// The program goes one key after another, each a chain of misses
    /// (tags, then slot) on lines last touched a poll ago; from here the
    /// misses of a whole batch are in flight together, and the program's
    /// reads of the same physical lines (through the kernel's mapping of
    /// them) then hit the cache. It took the take program's share of a
    /// profile to a third, the agent's CPU a sixth (docs/performance.md).
    pub fn prefetch_takes<'a>(&self, keys: impl Iterator<Item = &'a FlowKey>) {
        let places: Vec<([usize; 2], u32)> = keys.map(|k| self.place(k)).collect();
        for &(b, _) in &places {
            self.prefetch_tags(b);
        }
        for &(b, tag) in &places {
            self.prefetch_slot(b, tag);
        }
    }

    /// One entry, if present.
    pub fn lookup(&self, key: &FlowKey) -> Option<FlowValue> {
        let (b, tag, found) = self.locate(key);
        let (i, w) = found?;
        // Safety: a valid slot of the mapping; plain data.
        let slot = unsafe { self.slot(b[i], w).read_volatile() };
        (self.tag(b[i], w) == tag && key_eq(&slot.key, key)).then_some(slot.value)
    }

    /// Spins for bucket `b`'s lock: the programs hold it for a few dozen
    /// instructions at most.
    fn lock(&self, b: usize) {
        let bucket = self.buckets.ptr(b);
        // Safety: a valid, 8-aligned bucket lock in the mapping.
        while !unsafe { try_lock(&raw mut (*bucket).lock) } {
            std::hint::spin_loop();
        }
    }

    fn unlock(&self, b: usize) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // Safety: as in `lock`; this thread holds it.
        unsafe { (&raw mut (*self.buckets.ptr(b)).lock).write_volatile(0) };
    }

    /// Puts `value` under `key` as the programs would insert it (a free way
    /// in the emptier of its buckets, else the least recently active way of
    /// both), replacing an entry with that key. Tests and benchmarks fill
    /// the table this way.
    pub fn insert(&self, key: &FlowKey, value: &FlowValue) {
        let (b, tag, _) = self.locate(key);
        let (lo, hi) = (b[0].min(b[1]), b[0].max(b[1]));
        self.lock(lo);
        if hi != lo {
            self.lock(hi);
        }
        // Looked for again under the locks: a packet may have inserted the
        // key meanwhile.
        let (_, _, found) = self.locate(key);
        let free = |i: usize| (0..WAYS).filter(|&w| self.tag(b[i], w) == 0).count() as u32;
        let (i, w) = found.unwrap_or_else(|| match pick_bucket([free(0), free(1)]) {
            Some(i) => (i, (0..WAYS).find(|&w| self.tag(b[i], w) == 0).unwrap_or(0)),
            None => (0..2)
                .flat_map(|i| (0..WAYS).map(move |w| (i, w)))
                // Safety: a valid slot of the mapping; plain data.
                .min_by_key(|&(i, w)| {
                    last_active(&unsafe {
                        (&raw const (*self.slot(b[i], w)).value).read_volatile()
                    })
                })
                .unwrap_or((0, 0)),
        });
        let slot = Slot {
            key: *key,
            _pad: 0,
            value: *value,
        };
        // Safety: the locks are held; element pointers within the mapping.
        unsafe {
            let t = &raw mut (*self.buckets.ptr(b[i])).tags[w];
            t.write_volatile(0);
            self.slot(b[i], w).write_volatile(slot);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            t.write_volatile(tag);
        }
        if hi != lo {
            self.unlock(hi);
        }
        self.unlock(lo);
    }
}
