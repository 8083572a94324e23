//! Finished connections the agent has taken out of the kernel table and
//! holds while they wait out their linger.
//!
//! A connection whose class is final (FIN both ways, RST, refused) is
//! reported only once it has been silent for `--linger`, so that trailing
//! ACKs and RSTs are counted in it. Left in the table, it was read again by
//! every poll of that wait (three reads for a 2 s linger at 1 s polls, most
//! of a busy agent's work). It is taken at the first poll that sees it
//! final instead, and held here. A trailing packet after the take finds no
//! entry and starts one; the next poll reads that entry, takes it and merges
//! it into the held connection, whose linger starts over, as it would have
//! in the table. An entry with a SYN (no ACK) is a new connection on the
//! tuple, as the kernel decides when it retires a finished entry: the held
//! one is then over, and the new one is left alone.

use std::{collections::hash_map::Entry, time::Duration};

use flowmon_common::{
    flow::{FlowKey, FlowValue},
    table::last_active,
};
use rustc_hash::FxHashMap;

use crate::prefetch;

/// What an entry read from the kernel, under a key, is to the held ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// No connection is held on its tuple.
    Own,
    /// Trailing packets of the held connection: merge them in.
    Trailing,
    /// A new connection on the held one's tuple: the held one is over.
    Successor,
}

/// The held connections, by key. The values live in a slab, the map holds
/// indices: connections come and go every poll, and the map's periodic
/// rehash (clearing the tombstones of removed keys) moved whole 256-byte
/// entries. What each poll's passes test (when the connection was last
/// active, whether it was added or merged into since the last
/// [`Held::split`]) is kept beside the index, so a pass walks the map's own
/// memory in order and reaches into the slab only for the connections it
/// moves.
#[derive(Default)]
pub struct Held {
    index: FxHashMap<FlowKey, Slot>,
    slab: Vec<FlowValue>,
    free: Vec<u32>,
    /// Scratch of [`Held::end_due`]: the connections it ends.
    due: Vec<(FlowKey, u32)>,
    /// Calls of [`Held::shrink`] in a row that found it roomy.
    roomy_calls: u32,
}

/// How much roomier than its connections [`Held`] may grow before
/// [`Held::shrink`] gives the room back; below `SHRINK_FLOOR` connections
/// it never does (the gap keeps a steady load from shrinking and growing
/// back every poll).
const SPARSE: usize = 8;
const SHRINK_FLOOR: usize = 4096;
/// How many polls in a row [`Held`] must be roomy before it shrinks: the
/// next burst within them finds the room of the last. Shrunk after each
/// burst's linger, the map grew again by doubling at the next, each new
/// table larger than any hole the heap had (the records' chunks had taken
/// them), into fresh pages faulted in and zeroed: 2,000 to 3,700 faults on
/// the benchmark's measured replay, 3.5 s after its warm-up's burst
/// (docs/performance.md).
const SHRINK_AFTER: u32 = 10;

#[derive(Clone, Copy)]
struct Slot {
    at: u32,
    touched: bool,
    last: u64,
}

impl Held {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, key: &FlowKey) -> bool {
        self.index.contains_key(key)
    }

    /// What the entry `value`, read under `key`, is.
    pub fn route(&self, key: &FlowKey, value: &FlowValue) -> Route {
        if !self.contains(key) {
            Route::Own
        } else if value.dir[0].syn + value.dir[1].syn > 0 {
            Route::Successor
        } else {
            Route::Trailing
        }
    }

    /// Holds a connection just taken out of the table. Trailing packets
    /// of one already held are merged into it, and what it was before and
    /// is now are returned (the tracker counts only what they added).
    pub fn hold(&mut self, key: FlowKey, value: FlowValue) -> Option<(FlowValue, &FlowValue)> {
        match self.index.entry(key) {
            Entry::Occupied(mut e) => {
                let s = e.get_mut();
                let v = &mut self.slab[s.at as usize];
                let before = *v;
                v.merge(&value);
                s.last = last_active(v);
                s.touched = true;
                Some((before, v))
            }
            Entry::Vacant(e) => {
                let at = match self.free.pop() {
                    Some(i) => {
                        // Free slots are where connections ended a linger
                        // ago, scattered and long out of the cache: the one
                        // this call's successors will fill is asked for now.
                        if let Some(&next) = self.free.iter().rev().nth(prefetch::AHEAD - 1) {
                            prefetch::all(&self.slab[next as usize]);
                        }
                        self.slab[i as usize] = value;
                        i
                    }
                    None => {
                        self.slab.push(value);
                        (self.slab.len() - 1) as u32
                    }
                };
                e.insert(Slot {
                    at,
                    touched: true,
                    last: last_active(&value),
                });
                None
            }
        }
    }

    /// Ends the held connection on `key`, if any, and returns it.
    pub fn end(&mut self, key: &FlowKey) -> Option<(FlowKey, FlowValue)> {
        let (k, s) = self.index.remove_entry(key)?;
        self.free.push(s.at);
        Some((k, self.slab[s.at as usize]))
    }

    /// Moves to `out` the connections silent for `linger` as of `now_ns`
    /// (all of them when `flush`).
    pub fn end_due(
        &mut self,
        now_ns: u64,
        linger: Duration,
        flush: bool,
        out: &mut Vec<(FlowKey, FlowValue)>,
    ) {
        let linger = linger.as_nanos() as u64;
        let (due, free) = (&mut self.due, &mut self.free);
        self.index.retain(|k, s| {
            let ends = flush || now_ns.saturating_sub(s.last) >= linger;
            if ends {
                due.push((*k, s.at));
                free.push(s.at);
            }
            !ends
        });
        // Their counters were written a linger ago, at random places in the
        // slab: long out of the cache. Copied as the map's pass met them,
        // each was a wait (a tenth of a busy agent's time); asked for
        // [`prefetch::AHEAD`] connections early, the waits overlap.
        out.reserve(due.len());
        for (i, (k, at)) in due.iter().enumerate() {
            if let Some((_, next)) = due.get(i + prefetch::AHEAD) {
                prefetch::all(&self.slab[*next as usize]);
            }
            out.push((*k, self.slab[*at as usize]));
        }
        due.clear();
    }

    /// Gives back the map's room and packs the slab once most of a burst
    /// has ended, for [`SHRINK_AFTER`] calls (polls) in a row: the map
    /// never shrinks by itself, and the slab's free
    /// slots are reused in the order they were freed. The few thousand
    /// connections held after a burst of a hundred thousand were spread
    /// over a map and a slab sized for the burst (16 MB), a cache miss each
    /// in every pass over them: shrinking took about a sixth off the
    /// agent's CPU on the connections after such a burst (medians of 13
    /// alternating runs, docs/performance.md).
    pub fn shrink(&mut self) {
        let live = self.index.len();
        let roomy = SPARSE * live.max(SHRINK_FLOOR);
        if self.slab.len() <= roomy && self.index.capacity() <= roomy {
            self.roomy_calls = 0;
            return;
        }
        self.roomy_calls += 1;
        if self.roomy_calls < SHRINK_AFTER {
            return;
        }
        self.roomy_calls = 0;
        // The survivors move to the front of the slab, in their order
        // there, and the rest of its allocation stays for the next burst:
        // given back, it was grown again into fresh pages, each faulted in
        // and zeroed (a sixth of the agent's CPU on the benchmark's replay,
        // docs/performance.md). A survivor's new place is its rank among
        // the old ones, never after its old place, so moving them in that
        // order overwrites none not yet moved.
        let mut old: Vec<u32> = self.index.values().map(|s| s.at).collect();
        old.sort_unstable();
        for (new, &at) in old.iter().enumerate() {
            self.slab[new] = self.slab[at as usize];
        }
        for s in self.index.values_mut() {
            s.at = old.binary_search(&s.at).unwrap_or_default() as u32;
        }
        self.slab.truncate(live);
        self.free.clear();
        self.index.shrink_to(2 * live);
    }

    /// Splits the held connections for this poll's accounting: those added
    /// or merged into since the last call go to `changed`; with
    /// `unchanged`, the others go there. Returns how many are unchanged.
    pub fn split(
        &mut self,
        changed: &mut Vec<(FlowKey, FlowValue)>,
        mut unchanged: Option<&mut Vec<(FlowKey, FlowValue)>>,
    ) -> usize {
        let mut quiet = 0;
        for (k, s) in &mut self.index {
            if std::mem::take(&mut s.touched) {
                changed.push((*k, self.slab[s.at as usize]));
            } else {
                quiet += 1;
                if let Some(u) = unchanged.as_deref_mut() {
                    u.push((*k, self.slab[s.at as usize]));
                }
            }
        }
        quiet
    }

    /// Adds the held connections to `table` (entries read from the kernel),
    /// each merged with its trailing entry there: what a query shows.
    pub fn add_to(&self, table: &mut Vec<(FlowKey, FlowValue)>) {
        let mut held: FxHashMap<FlowKey, FlowValue> = self
            .index
            .iter()
            .map(|(k, s)| (*k, self.slab[s.at as usize]))
            .collect();
        table.retain(|(k, v)| match self.route(k, v) {
            Route::Trailing => {
                if let Some(h) = held.get_mut(k) {
                    h.merge(v);
                }
                false
            }
            Route::Own | Route::Successor => true,
        });
        table.extend(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            port_a: port,
            ..FlowKey::default()
        }
    }

    fn value(packets: u64, last_ns: u64, syn: u32) -> FlowValue {
        let mut v = FlowValue::default();
        v.dir[0].packets = packets;
        v.dir[0].first_ns = 1;
        v.dir[0].last_ns = last_ns;
        v.dir[0].syn = syn;
        v
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn trailing_packets_merge_and_restart_the_linger() {
        let mut h = Held::default();
        assert!(h.hold(key(1), value(4, S, 0)).is_none(), "newly held");
        assert_eq!(h.route(&key(2), &value(1, S, 0)), Route::Own);
        assert_eq!(h.route(&key(1), &value(1, 2 * S, 0)), Route::Trailing);
        let mut merged = value(4, S, 0);
        merged.merge(&value(1, 2 * S, 0));
        assert_eq!(
            h.hold(key(1), value(1, 2 * S, 0)),
            Some((value(4, S, 0), &merged)),
            "merged: what it was before, and is now"
        );
        let mut out = Vec::new();
        h.end_due(3 * S + S / 2, Duration::from_secs(2), false, &mut out);
        assert!(out.is_empty(), "silent 1.5 s since the trailing packet");
        h.end_due(4 * S, Duration::from_secs(2), false, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].1.dir[0].packets, out[0].1.dir[0].last_ns),
            (5, 2 * S)
        );
        assert!(h.is_empty());
    }

    #[test]
    fn a_syn_is_a_new_connection() {
        let mut h = Held::default();
        h.hold(key(1), value(4, S, 1));
        assert_eq!(h.route(&key(1), &value(1, 2 * S, 1)), Route::Successor);
        assert_eq!(h.end(&key(1)).map(|(_, v)| v.dir[0].packets), Some(4));
        assert_eq!(h.route(&key(1), &value(1, 2 * S, 1)), Route::Own);
    }

    #[test]
    fn ended_slots_are_reused() {
        let mut h = Held::default();
        for round in 0..3u64 {
            for p in 0..100 {
                h.hold(key(p), value(round + 1, S, 0));
            }
            let mut out = Vec::new();
            h.end_due(10 * S, Duration::from_secs(2), false, &mut out);
            assert_eq!(out.len(), 100);
            assert!(out.iter().all(|(_, v)| v.dir[0].packets == round + 1));
        }
        assert_eq!(h.slab.len(), 100);
        assert!(h.is_empty());
    }

    #[test]
    fn queries_see_a_held_connection_with_its_trailing_entry() {
        let mut h = Held::default();
        h.hold(key(1), value(4, S, 0));
        let mut table = vec![(key(1), value(1, 2 * S, 0)), (key(2), value(3, S, 1))];
        h.add_to(&mut table);
        table.sort_by_key(|(k, _)| k.port_a);
        assert_eq!(
            table
                .iter()
                .map(|(k, v)| (k.port_a, v.dir[0].packets))
                .collect::<Vec<_>>(),
            [(1, 5), (2, 3)]
        );
    }

    #[test]
    fn split_tells_changed_from_unchanged_once() {
        let mut h = Held::default();
        h.hold(key(1), value(4, S, 0));
        h.hold(key(2), value(4, S, 0));
        let (mut changed, mut unchanged) = (Vec::new(), Vec::new());
        assert_eq!(h.split(&mut changed, Some(&mut unchanged)), 0);
        assert_eq!((changed.len(), unchanged.len()), (2, 0));
        h.hold(key(2), value(1, 2 * S, 0));
        let (mut changed, mut unchanged) = (Vec::new(), Vec::new());
        assert_eq!(h.split(&mut changed, Some(&mut unchanged)), 1);
        assert_eq!(
            changed,
            [(key(2), {
                let mut v = value(4, S, 0);
                v.merge(&value(1, 2 * S, 0));
                v
            })]
        );
        assert_eq!(unchanged, [(key(1), value(4, S, 0))]);
        // Without the unchanged ones, and nothing changed since.
        assert_eq!(h.split(&mut changed, None), 2);
        assert_eq!(changed.len(), 1);
        let mut out = Vec::new();
        h.end_due(0, Duration::ZERO, true, &mut out);
        assert_eq!(out.len(), 2, "a flush ends them all");
    }

    /// Bursts closer together than [`SHRINK_AFTER`] polls keep the room.
    #[test]
    fn a_burst_within_the_wait_keeps_the_room() {
        let mut h = Held::default();
        let n = (SPARSE * SHRINK_FLOOR) as u16 + 100;
        let mut room = 0;
        for burst in 0..2 {
            for p in 0..n {
                h.hold(key(p), value(1, S, 0));
            }
            // Still held when a poll looks: not roomy, so the wait starts
            // over once the burst has ended.
            h.shrink();
            for p in 5..n {
                h.end(&key(p));
            }
            if burst == 0 {
                room = h.index.capacity();
            }
            for _ in 1..SHRINK_AFTER {
                h.shrink();
            }
            assert_eq!((h.index.capacity(), h.slab.len()), (room, usize::from(n)));
        }
        h.shrink();
        assert_eq!(h.slab.len(), 5);
    }

    #[test]
    fn a_burst_s_room_is_given_back_and_the_survivors_keep_their_values() {
        let mut h = Held::default();
        let n = (SPARSE * SHRINK_FLOOR) as u16 + 100;
        for p in 0..n {
            h.hold(key(p), value(u64::from(p) + 1, S, 0));
        }
        // All but five, spread over the slab, end: the room stays until
        // `shrink`.
        let survivors = [3, 1_000, 1_001, 20_000, n - 1];
        for p in (0..n).filter(|p| !survivors.contains(p)) {
            assert!(h.end(&key(p)).is_some());
        }
        assert_eq!(h.slab.len(), usize::from(n));
        // Not at once: a burst in the next polls finds the room again.
        for _ in 1..SHRINK_AFTER {
            h.shrink();
        }
        assert_eq!(h.slab.len(), usize::from(n));
        assert!(h.index.capacity() >= usize::from(n));
        h.shrink();
        assert_eq!((h.len(), h.slab.len(), h.free.len()), (5, 5, 0));
        assert!(h.index.capacity() < 64, "{}", h.index.capacity());
        assert!(
            h.slab.capacity() >= usize::from(n),
            "the slab's allocation is kept for the next burst"
        );
        for p in survivors {
            assert_eq!(
                h.end(&key(p)),
                Some((key(p), value(u64::from(p) + 1, S, 0)))
            );
        }
        // A steady few are left alone: no copy each poll.
        for p in 0..5 {
            h.hold(key(p), value(1, S, 0));
        }
        h.shrink();
        assert_eq!(h.slab.len(), 5);
    }
}
