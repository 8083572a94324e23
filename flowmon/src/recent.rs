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
//! held is at most `keep` records and one poll's. A dropped chunk's
//! allocation is kept, emptied, for the next poll to build its records in
//! ([`Recent::take_spare`]): a busy agent allocated megabytes a poll for
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

    /// An empty list with the room of the largest chunk dropped since the
    /// last call, for the next poll's records.
    pub fn take_spare(&mut self) -> Vec<ConnRecord> {
        std::mem::take(&mut self.spare)
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
        let spare = r.take_spare();
        assert!(spare.is_empty() && spare.capacity() >= 3);
        assert_eq!(r.take_spare().capacity(), 0, "handed out once");
        assert_eq!(ports(&r), [15, 16, 17, 18, 19]);
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
