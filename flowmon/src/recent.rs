//! The recently finished connections the agent keeps for queries: the last
//! `keep` of them, oldest first.
//!
//! Each poll's records stay in the list the poll built them in (a chunk),
//! rather than each being copied into one ring: a record is about 300
//! bytes, and writing every one of them again into a ring of 100,000,
//! whose lines are long out of the cache, was a tenth of the agent's work
//! per connection.
//! The oldest chunk is dropped whole once none of it is kept; until then,
//! the records of it that are no longer kept are skipped, so the memory
//! held is at most `keep` records and the skipped ones. Before a poll builds its records, the
//! oldest they will push out are forgotten, and a dropped chunk's
//! allocation is kept, emptied, for the poll to build them in
//! ([`Recent::room_for`]): a busy agent allocated megabytes a poll for
//! them, and whenever that outgrew what the previous polls had freed, the
//! heap grew into pages the kernel then faulted in and zeroed, a sixth of
//! the agent's CPU on the benchmark's replay (docs/performance.md).

use std::collections::VecDeque;

use crate::record::ConnRecord;

#[derive(Default)]
pub struct Recent {
    chunks: VecDeque<Vec<ConnRecord>>,
    /// Records of the oldest chunk that are no longer kept.
    skip: usize,
    /// Records kept: all the chunks', less `skip`.
    len: usize,
    /// The largest dropped chunk, emptied.
    spare: Vec<ConnRecord>,
}

impl Recent {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a poll's records (oldest first), and forgets the oldest beyond
    /// `keep`.
    pub fn push(&mut self, records: Vec<ConnRecord>, keep: usize) {
        if !records.is_empty() {
            self.len += records.len();
            self.chunks.push_back(records);
        } else if records.capacity() > self.spare.capacity() {
            // A quiet poll's: handed back, not freed.
            self.spare = records;
        }
        self.forget_beyond(keep);
    }

    /// An empty list with room for the `n` records a poll is about to
    /// build, once the oldest records those will push out of the `keep`
    /// are forgotten: their chunks' allocations serve the new ones. Built
    /// first and forgotten after, the new records outgrew what the heap
    /// had free whenever a burst's poll was the largest yet, into fresh
    /// pages that the kernel faulted in and zeroed one by one (2,400 to
    /// 4,800 faults on the benchmark's measured replay).
    pub fn room_for(&mut self, n: usize, keep: usize) -> Vec<ConnRecord> {
        self.forget_beyond(keep.saturating_sub(n));
        let spare = std::mem::take(&mut self.spare);
        if spare.capacity() >= n {
            return spare;
        }
        // Freed before the new one is allocated, so that the heap can
        // join it with the chunks just dropped; grown instead, it would
        // be copied whole. Rounded up, so that chunks come in few sizes
        // and a dropped one has room for a poll of about its size: sized
        // exactly, the next larger poll found no dropped chunk nor hole in
        // the heap its size, and grew the heap.
        drop(spare);
        Vec::with_capacity(n.next_power_of_two())
    }

    fn forget_beyond(&mut self, keep: usize) {
        while self.len > keep {
            let over = self.len - keep;
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.len() - self.skip;
            if left <= over {
                if let Some(mut gone) = self.chunks.pop_front() {
                    gone.clear();
                    if gone.capacity() > self.spare.capacity() {
                        self.spare = gone;
                    }
                }
                self.skip = 0;
                self.len -= left;
            } else {
                self.skip += over;
                self.len -= over;
            }
        }
    }

    /// The kept records, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &ConnRecord> {
        self.chunks
            .iter()
            .enumerate()
            .flat_map(|(i, c)| &c[if i == 0 { self.skip } else { 0 }..])
    }
}

#[cfg(test)]
mod tests {
    use flowmon_common::flow::{FlowKey, FlowValue};

    use super::*;
    use crate::{close::Timeouts, model::Conn};

    fn records(ports: std::ops::Range<u16>) -> Vec<ConnRecord> {
        ports
            .map(|p| {
                let key = FlowKey {
                    port_a: p,
                    ..FlowKey::default()
                };
                let conn = Conn::new(key, FlowValue::default());
                ConnRecord::new(conn, "if0".into(), 0, &Timeouts::default(), 0)
            })
            .collect()
    }

    fn ports(r: &Recent) -> Vec<u16> {
        r.iter().map(|r| r.conn.key.port_a).collect()
    }

    #[test]
    fn keeps_the_last_records_across_chunks() {
        let mut r = Recent::default();
        r.push(records(0..3), 5);
        r.push(Vec::new(), 5);
        r.push(records(3..6), 5);
        assert_eq!(ports(&r), [1, 2, 3, 4, 5]);
        assert_eq!(r.len(), 5);
        r.push(records(6..8), 5);
        assert_eq!(ports(&r), [3, 4, 5, 6, 7], "the first chunk is gone");
        assert_eq!(r.chunks.len(), 2);
        r.push(records(8..20), 5);
        assert_eq!(ports(&r), [15, 16, 17, 18, 19]);
        assert_eq!((r.chunks.len(), r.len()), (1, 5));
        // The largest chunk dropped (3 records) serves the next poll.
        let spare = r.room_for(0, 5);
        assert!(spare.is_empty() && spare.capacity() >= 3);
        assert_eq!(r.room_for(0, 5).capacity(), 0, "handed out once");
        assert_eq!(ports(&r), [15, 16, 17, 18, 19]);
    }

    /// The records a poll is about to add push the oldest out first, and
    /// the next poll's records are built in what they held.
    #[test]
    fn room_for_a_poll_comes_from_the_records_it_pushes_out() {
        let mut r = Recent::default();
        r.push(records(0..4), 8);
        r.push(records(4..8), 8);
        let held = r.chunks[0].as_ptr();
        let mut next = r.room_for(4, 8);
        assert_eq!(ports(&r), [4, 5, 6, 7], "the oldest chunk forgotten first");
        assert_eq!((next.as_ptr(), next.capacity() >= 4), (held, true));
        next.extend(records(8..12));
        r.push(next, 8);
        assert_eq!(ports(&r), (4..12).collect::<Vec<_>>());
        // Part of a chunk pushed out: skipped, kept until all of it is.
        let next = r.room_for(6, 8);
        assert_eq!(ports(&r), [10, 11]);
        assert!(next.capacity() >= 6, "grown: nothing whole was dropped");
        r.push(next, 8);
        // More than are kept: all forgotten, the poll's own oldest too.
        let mut next = r.room_for(10, 8);
        assert!(r.is_empty());
        next.extend(records(12..22));
        r.push(next, 8);
        assert_eq!(ports(&r), (14..22).collect::<Vec<_>>());
    }

    #[test]
    fn keeping_none_keeps_nothing() {
        let mut r = Recent::default();
        r.push(records(0..3), 0);
        assert!(r.is_empty());
        assert_eq!(ports(&r), Vec::<u16>::new());
        assert!(r.chunks.is_empty());
    }
}
