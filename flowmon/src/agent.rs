//! The live agent's poll: read the kernel's table, report the connections
//! that have finished, remove them, and summarise the rest.
//!
//! # Read and remove without losing or doubling a count
//! A poll first reads every entry, then decides from that copy which
//! connections are finished. Packets keep arriving in between, so the copy
//! is never what gets reported: the finished entries are taken out of the
//! table by the `flowmon_take` program (run through `BPF_PROG_TEST_RUN`, a
//! batch of 512 per syscall), which copies each value and frees its slot at
//! once. Every packet counted before the take is in that value; a packet
//! after it finds no entry and starts a new one, which a later poll reports
//! on its own. Nothing is counted in two records, and nothing falls between
//! them. Connections the kernel itself retired (a new SYN on their tuple)
//! arrive through the CLOSED ring buffer, and had their counters zeroed in
//! the same program run, so they too are whole. When that retirement happens between the
//! read and the take, the take finds first-packet times that differ from
//! the ones read and leaves the new connection in place.
//!
//! A connection whose class is final is taken at the first poll that sees
//! it so, not when its linger has passed: the agent holds it meanwhile
//! ([`crate::linger`]) and merges trailing packets into it, so it is read
//! once rather than at every poll of the wait.

use std::{collections::HashMap, time::Duration};

use flowmon_common::{
    flow::{FlowKey, FlowValue, TAKE_BATCH},
    stats::{STAT_COUNT, STAT_DIRTY_LOST, STAT_FLOWS_CREATED},
};
use rustc_hash::FxHashSet;

use crate::{
    close::{Close, Timeouts},
    kernel::{Kernel, KernelError, Taken},
    linger::{Held, Route},
    model::Conn,
    recent::Recent,
    record::{self, ConnRecord},
    summary::{Clock, Poll, Tracker},
};

/// Whether a connection in class `close`, silent for `silent`, should be
/// reported now. Closed connections wait out the linger (held by the agent),
/// so trailing ACKs and RSTs are counted in them.
pub fn is_due(close: Close, silent: Duration, t: &Timeouts) -> bool {
    match close {
        Close::Fin | Close::FinRst | Close::Rst | Close::Refused | Close::OrphanRst => {
            silent >= t.linger
        }
        Close::Evicted => true,
        // These classes are only given once their timeout has passed.
        Close::Unanswered | Close::HalfClosed | Close::Idle => true,
        Close::Open | Close::Connecting => false,
    }
}

/// One poll's output.
pub struct PollResult {
    pub poll: Poll,
    /// Connections finished and removed in this poll, oldest first.
    pub closed: Vec<ConnRecord>,
    /// The connections not yet reported: the entries in the table, and
    /// those held through their linger (those unchanged since the previous
    /// poll only with [`Agent::export_held`]).
    pub live: Vec<(FlowKey, FlowValue)>,
}

/// See [`Agent::after_stretch`].
pub type AfterStretch = Box<dyn FnMut(&mut Kernel, &[(FlowKey, FlowValue)]) + Send>;

/// The kernel handle plus what the agent remembers between polls.
pub struct Agent {
    pub kernel: Kernel,
    pub timeouts: Timeouts,
    /// For tests: runs after a whole read has read and sorted each stretch
    /// of buckets, given what it read so far, so that a test can send
    /// packets at a chosen point of a poll (a race between the programs
    /// and the agent, made to happen).
    #[doc(hidden)]
    pub after_stretch: Option<AfterStretch>,
    tracker: Tracker,
    /// Entries removed in the current poll (added to the kernel's tally).
    removed: u64,
    /// Recently finished connections, newest last, for queries.
    recent: Recent,
    /// How many finished connections `recent` keeps.
    pub keep: usize,
    /// Scratch of the records' order, kept for the next poll.
    sort_keys: Vec<record::SortKey>,
    /// Entries this poll meant to take but left (a new connection in place
    /// of a retired one): still in the table, but not in this poll's live
    /// list.
    kept: Vec<FlowKey>,
    /// Evicted connections reported (the rest of the kernel's evictions
    /// came and went between two polls, unseen).
    pub evicted_reported: u64,
    /// Connections reported since this agent started, evicted ones included.
    pub reported: u64,
    /// Past this many connections the agent stops reading the whole table
    /// every poll (see [`Agent::read`]).
    pub full_scan_limit: usize,
    /// In incremental mode, polls per sweep of the whole table: timeouts
    /// (unanswered, half-closed, idle) are seen at most this many polls late.
    pub sweep_polls: u32,
    /// Where the sweep goes on next poll.
    cursor: Option<u64>,
    /// The kernel's count of announcements it had no room for, as last seen.
    dirty_lost: u64,
    /// Polls that read only part of the table.
    pub partial_polls: u64,
    /// Polls that found by the counters that the table was empty, and did
    /// not read it.
    pub empty_polls: u64,
    /// The connections a poll takes out of the table, and whether each is
    /// to be held (kept for their buffers).
    due: Vec<(FlowKey, FlowValue)>,
    hold: Vec<bool>,
    /// Connections handed over since this poll began reading (see
    /// [`Agent::drain_closed`]).
    late_handed: FxHashSet<FlowKey>,
    /// Connections handed over during one stretch's read (kept for its
    /// buffer).
    handed: FxHashSet<FlowKey>,
    /// Finished connections taken out of the table, waiting out their linger.
    held: Held,
    /// Buffers kept from poll to poll: a whole read's result (handed back
    /// through [`Agent::remember`]), the held connections unchanged.
    spare: Vec<(FlowKey, FlowValue)>,
    unchanged: Vec<(FlowKey, FlowValue)>,
    /// The connections a poll reports, kept for the next: grown once, not
    /// by doubling in every poll.
    ended: Vec<(FlowKey, FlowValue)>,
    /// Whether [`PollResult::live`] lists the held connections that did not
    /// change since the previous poll: only the IPFIX exporter needs them,
    /// and copying them is two copies of every held connection, every poll.
    pub export_held: bool,
}

/// What one poll read.
struct Read {
    entries: Vec<(FlowKey, FlowValue)>,
    /// `None`: the whole table; `Some(cycle_done)`: part of it, and whether
    /// the sweep got round the table with this poll.
    part: Option<bool>,
    /// The whole table is still to be read into `entries` (empty, its room
    /// reserved), by [`Agent::read_and_take`].
    whole: bool,
}

/// A poll's entries on their way out of the table ([`Agent::sift`]).
struct Sift {
    /// Finished connections (and trailing entries of held ones) to take.
    due: Vec<(FlowKey, FlowValue)>,
    /// For each of `due`: held through its linger once taken, or ended.
    hold: Vec<bool>,
    /// Keys of held connections a new connection on their tuple ended.
    succeeded: Vec<FlowKey>,
}

/// Buckets a whole read reads between two looks at what it found.
const READ_STRETCH: usize = 64;

/// Connections in the table past which the agent reads incrementally.
pub const FULL_SCAN_LIMIT: usize = 65_536;

impl Agent {
    pub fn new(kernel: Kernel, timeouts: Timeouts) -> Self {
        Self {
            kernel,
            timeouts,
            after_stretch: None,
            tracker: Tracker::default(),
            removed: 0,
            recent: Recent::default(),
            keep: 100_000,
            sort_keys: Vec::new(),
            kept: Vec::new(),
            evicted_reported: 0,
            reported: 0,
            full_scan_limit: FULL_SCAN_LIMIT,
            sweep_polls: 30,
            cursor: None,
            dirty_lost: 0,
            partial_polls: 0,
            empty_polls: 0,
            due: Vec::new(),
            hold: Vec::new(),
            late_handed: FxHashSet::default(),
            handed: FxHashSet::default(),
            held: Held::default(),
            spare: Vec::new(),
            unchanged: Vec::new(),
            ended: Vec::new(),
            export_held: true,
        }
    }

    /// Reads the table at kernel time `now_ns` (CLOCK_MONOTONIC), reports
    /// and removes what is finished. `flush` reports and removes everything
    /// (used when the agent stops).
    pub fn poll(
        &mut self,
        now_ns: u64,
        unix_ms: u64,
        names: &HashMap<u32, String>,
        flush: bool,
    ) -> Result<PollResult, KernelError> {
        let clock = Clock::now();
        // The counters before the table: entries created in between are then
        // in the table but not in `created`, so evictions (created minus what
        // is in the table or was removed) are at worst undercounted for one
        // poll, never overcounted, and a monotonic counter stays exact.
        let totals = self.kernel.stats()?;
        let mut ended = std::mem::take(&mut self.ended);
        // What was handed over before this poll read anything: no copy of
        // it can be read, so its keys need not be kept.
        self.drain_closed(&mut ended, &mut Vec::new(), None);
        let read = self.read(&totals, flush)?;
        // What stays is what was read, less what is taken: kept in place
        // rather than copied out entry by entry.
        let mut live = read.entries;
        let mut sift = Sift {
            due: std::mem::take(&mut self.due),
            hold: std::mem::take(&mut self.hold),
            succeeded: Vec::new(),
        };
        let sifted = if read.whole {
            self.read_and_take(&mut live, &mut sift, now_ns, flush, &mut ended)
        } else {
            self.drain_after_read(&mut live, 0, &mut sift.succeeded, &mut ended)
                .and_then(|()| {
                    self.sift(&mut live, 0, &mut sift, now_ns, flush);
                    self.take_sifted(&mut sift, true, &mut ended)
                })
        };
        (self.due, self.hold) = (sift.due, sift.hold);
        sifted?;
        if !self.late_handed.is_empty() {
            // An entry read before its connection was handed over, and
            // sorted before the drain that brought the hand-over in, is a
            // stale copy of a connection now held or already ended: not a
            // live one. Left in, the tracker would remember it, and report
            // it evicted once a sweep cycle did not meet it again (a SYN
            // counted twice, found by the benchmark's real connections).
            // An entry on the key read after the hand-over goes too: the
            // next poll reads it as new, and it is not in this poll's
            // `created` counter (made after the poll read the counters),
            // so not counted as evicted either.
            let late = &self.late_handed;
            live.retain(|(k, _)| !late.contains(k));
            self.late_handed.clear();
        }
        self.held
            .end_due(now_ns, self.timeouts.linger, flush, &mut ended);
        self.held.shrink();
        // Held connections count as in the table: those that changed (just
        // taken, or merged into) as read, the rest as known to be there,
        // without a lookup each.
        let mut unchanged = std::mem::take(&mut self.unchanged);
        let held_from = live.len();
        let quiet = if self.tracker.skip_changed && !self.export_held {
            // Nothing reads the held connections' copies (neither the
            // list of changed connections nor an exporter): all of them
            // count as quiet. Copying the changed ones into the live list
            // was a twelfth of a busy agent's work (docs/performance.md).
            self.held.len()
        } else {
            self.held
                .split(&mut live, self.export_held.then_some(&mut unchanged))
        };
        self.tracker.set_held(held_from, quiet);
        let mut kept = std::mem::take(&mut self.kept);
        let removed = std::mem::take(&mut self.removed);
        self.kernel.add_agent_removed(removed)?;
        let ifaces = self
            .kernel
            .attached()
            .iter()
            .map(|a| a.iface.clone())
            .collect();
        // Held connections were removed from the table but are counted in
        // it here: evictions are what the kernel created and neither holds
        // nor had removed.
        let removed_total = self
            .kernel
            .agent_removed()
            .saturating_sub(self.held.len() as u64);
        let poll = match read.part {
            None => self
                .tracker
                .poll(&live, &kept, totals, ifaces, unix_ms, removed_total),
            Some(cycle_done) => self.tracker.poll_part(
                &live,
                &kept,
                cycle_done,
                totals,
                ifaces,
                unix_ms,
                removed_total,
            ),
        };
        kept.clear();
        self.kept = kept;
        // Exporters that asked for them see every connection not yet
        // reported.
        live.extend_from_slice(&unchanged);
        unchanged.clear();
        self.unchanged = unchanged;
        self.choose_mode()?;
        // Both lists in one order, found on small keys before the records
        // are built: sorting the records cost a tenth of a busy poll.
        let mut closed = self
            .recent
            .room_for(ended.len() + poll.vanished.len(), self.keep);
        record::extend_sorted(
            &mut closed,
            &mut self.sort_keys,
            &ended,
            &poll.vanished,
            names,
            now_ns,
            &self.timeouts,
            clock.offset_ns,
        );
        self.evicted_reported += poll.vanished.len() as u64;
        ended.clear();
        self.ended = ended;
        self.reported += closed.len() as u64;
        Ok(PollResult { poll, closed, live })
    }

    /// What this poll reads: the whole table, or (in incremental mode) the
    /// connections announced on the DIRTY ring since the last poll and the
    /// next slice of the sweep.
    fn read(
        &mut self,
        totals: &[u64; STAT_COUNT as usize],
        flush: bool,
    ) -> Result<Read, KernelError> {
        let lost = totals[STAT_DIRTY_LOST as usize];
        let overflowed = lost > self.dirty_lost;
        self.dirty_lost = lost;
        if self.kernel.epoch() == 0 || flush || overflowed {
            if self.kernel.epoch() != 0 {
                // Announcements of this epoch are covered by the whole read.
                self.kernel
                    .set_epoch(self.kernel.epoch().wrapping_add(1).max(1))?;
                self.kernel.drain_dirty();
            }
            if self.in_table(totals) == Some(0) {
                // A whole read costs the table's size, not what it holds:
                // the tags of every bucket, each on a page of its own
                // (0.3-0.5 ms a poll for the default table, empty: section
                // 2 of the benchmark).
                self.cursor = None;
                self.empty_polls += 1;
                let mut entries = std::mem::take(&mut self.spare);
                entries.clear();
                return Ok(Read {
                    entries,
                    part: None,
                    whole: false,
                });
            }
            return Ok(self.whole_read(totals));
        }
        // A new epoch first: a packet from here on announces its connection
        // for the next poll, so none falls between two drains.
        self.kernel
            .set_epoch(self.kernel.epoch().wrapping_add(1).max(1))?;
        let mut keys: FxHashSet<FlowKey> = self.kernel.drain_dirty().into_iter().collect();
        // A key costs a hash and a few cache misses, a whole read a copy of
        // every occupied slot: when much of a big table changed, reading
        // all of it is cheaper.
        if keys.len() > 4096 && keys.len() > self.tracked() / 8 {
            return Ok(self.whole_read(totals));
        }
        let slice = (self.tracked() / self.sweep_polls.max(1) as usize).max(4096);
        // Into the last poll's buffer, as a whole read: a fresh one grew
        // into pages never touched before, every partial poll.
        let (mut entries, next) =
            self.kernel
                .flows_from(std::mem::take(&mut self.spare), self.cursor, slice)?;
        self.cursor = next;
        for (k, _) in &entries {
            keys.remove(k);
        }
        for k in keys {
            if let Some(v) = self.kernel.lookup_flow(&k)? {
                entries.push((k, v));
            }
        }
        self.partial_polls += 1;
        Ok(Read {
            entries,
            part: Some(next.is_none()),
            whole: false,
        })
    }

    /// A whole read for the poll to make ([`Agent::read_and_take`]), into
    /// the last poll's buffer, emptied, with room for what the table holds.
    fn whole_read(&mut self, totals: &[u64; STAT_COUNT as usize]) -> Read {
        self.cursor = None;
        let mut entries = std::mem::take(&mut self.spare);
        entries.clear();
        entries.reserve(self.expected(totals));
        Read {
            entries,
            part: None,
            whole: true,
        }
    }

    /// About how many entries the table holds ([`Agent::in_table`], which
    /// the capacity bounds), plus the held connections the poll appends:
    /// what a whole read reserves.
    fn expected(&self, totals: &[u64; STAT_COUNT as usize]) -> usize {
        let in_table = self.in_table(totals).unwrap_or(0);
        in_table.min(u64::from(self.kernel.capacity())) as usize + self.held.len()
    }

    /// At most how many entries the table holds, from the counters: what
    /// the programs created and the benchmarks inserted, less what the
    /// agent removed (an eviction replaces an entry but counts as created,
    /// so this is never less than the truth; a trailing packet's entry
    /// counts as created too). `None` when the counters disagree (more
    /// removed than created, as if the statistics had been lost under a
    /// kept table), and then nothing can be told from them.
    fn in_table(&self, totals: &[u64; STAT_COUNT as usize]) -> Option<u64> {
        (totals[STAT_FLOWS_CREATED as usize] + self.kernel.user_inserted())
            .checked_sub(self.kernel.agent_removed())
    }

    /// Reads incrementally past `full_scan_limit` connections in the table
    /// and the whole table again below half of it (the gap keeps a table
    /// near the limit from switching every poll).
    fn choose_mode(&mut self) -> Result<(), KernelError> {
        let tracked = self.tracked();
        if self.kernel.epoch() == 0 && tracked > self.full_scan_limit {
            // This poll read everything: announcements start from here.
            self.kernel.set_epoch(1)?;
            self.cursor = None;
        } else if self.kernel.epoch() != 0 && tracked <= self.full_scan_limit / 2 {
            self.kernel.set_epoch(0)?;
            self.kernel.drain_dirty();
        }
        Ok(())
    }

    /// Connections known to be in the table, what a whole read costs: not
    /// the held ones, taken out of it. Counted with them, a burst of
    /// short connections (each read once, then held through its linger)
    /// switched the programs to announcing every new connection on the
    /// DIRTY ring, for polls whose many changes then read the whole table
    /// anyway.
    fn tracked(&self) -> usize {
        self.tracker.tracked()
    }

    /// Whether polls list the connections that changed ([`Poll::changed`]):
    /// only per-poll output needs them.
    pub fn list_changed(&mut self, on: bool) {
        self.tracker.skip_changed = !on;
    }

    /// Keeps a poll's closed connections (once its reports are written) for
    /// queries, up to [`Agent::keep`]: handed back rather than copied by the
    /// poll, which cost a tenth of it.
    pub fn remember(&mut self, result: PollResult) {
        let PollResult {
            closed, mut live, ..
        } = result;
        // The live list's allocation serves the next whole read.
        live.clear();
        self.spare = live;
        self.recent.push(closed, self.keep);
    }

    /// The recently finished connections, oldest first.
    pub fn recent(&self) -> impl Iterator<Item = &ConnRecord> {
        self.recent.iter()
    }

    /// After resuming a pinned table: what is in it now was counted by the
    /// previous agent's polls (as far as it got), so the first poll's
    /// deltas start from here rather than count it all again.
    pub fn resume(&mut self) -> Result<(), KernelError> {
        if self.kernel.resumed() {
            self.tracker.seed(&self.kernel.flows()?);
        }
        Ok(())
    }

    /// Removes the finished connection `seen` (read earlier from the table)
    /// and returns its final value. `None` if it is gone, or if the kernel
    /// retired it in the meantime because a new SYN reached its tuple: the
    /// new connection then stays in the table (the retired one arrives
    /// through the ring buffer).
    pub fn take_finished(
        &mut self,
        key: &FlowKey,
        seen: &FlowValue,
    ) -> Result<Option<FlowValue>, KernelError> {
        let mut ended = Vec::new();
        self.take_all(&[(*key, *seen)], &[false], true, &mut ended)?;
        Ok(ended.pop().map(|(_, v)| v))
    }

    /// Takes in what the programs took out of the table since the last
    /// drain: connections handed over by their last packet, held through
    /// their linger as if taken (a new connection on the tuple of a held
    /// one ends it), and connections a new SYN retired from their tuple.
    /// Called before a poll reads the table, between reading entries and
    /// sorting them (an entry that trailing packets started after a
    /// hand-over is read only once the hand-over is on the ring, and must
    /// find the connection held, or it would be taken for a new one), and
    /// after each take (which finds a connection handed over since the
    /// read absent): otherwise a connection the tracker remembers would
    /// miss this poll and be counted as evicted. Adds the keys of the
    /// connections handed over to `handed`, when given.
    ///
    /// `succeeded` are the keys of held connections that a new connection
    /// read on their tuple is to end at the next take: one this drain ends
    /// is left out, since what is held there next (the successor itself,
    /// handed over since it was read) is not over.
    fn drain_closed(
        &mut self,
        ended: &mut Vec<(FlowKey, FlowValue)>,
        succeeded: &mut Vec<FlowKey>,
        mut handed: Option<&mut FxHashSet<FlowKey>>,
    ) {
        let (held, tracker, removed) = (&mut self.held, &mut self.tracker, &mut self.removed);
        let mut end_held = |held: &mut Held, k: &FlowKey, ended: &mut Vec<_>| {
            ended.extend(held.end(k));
            if !succeeded.is_empty() {
                succeeded.retain(|s| s != k);
            }
        };
        self.kernel.drain_closed_each(|k, v, finished| {
            let route = held.route(k, v);
            if finished {
                if let Some(h) = handed.as_deref_mut() {
                    h.insert(*k);
                }
                if route == Route::Successor {
                    end_held(held, k, ended);
                }
                // Out of the table as a take would have it.
                *removed += 1;
                match held.hold(*k, *v) {
                    None => tracker.hold(k, v),
                    Some((before, merged)) => tracker.merge(k, &before, merged),
                }
                return;
            }
            // Retired means a new SYN reached the tuple: a held connection
            // there is over, with what the retired entry counted after it
            // (unless that entry is a whole connection of its own).
            match route {
                Route::Own => {
                    tracker.end(k, v);
                    ended.push((*k, *v));
                }
                Route::Trailing => {
                    if let Some((before, merged)) = held.hold(*k, *v) {
                        tracker.merge(k, &before, merged);
                    }
                    end_held(held, k, ended);
                }
                Route::Successor => {
                    end_held(held, k, ended);
                    tracker.end(k, v);
                    ended.push((*k, *v));
                }
            }
        });
    }

    /// Drains the ring after reading `live[from..]`, and reads again the
    /// entries of connections handed over meanwhile: one read before its
    /// hand-over is a stale copy of the connection now held (taken for a
    /// new connection on its tuple, it would be reported twice), one read
    /// after it is a trailing or new entry. The table tells them apart:
    /// after the hand-over, whatever it holds under the key is new.
    fn drain_after_read(
        &mut self,
        live: &mut Vec<(FlowKey, FlowValue)>,
        from: usize,
        succeeded: &mut Vec<FlowKey>,
        ended: &mut Vec<(FlowKey, FlowValue)>,
    ) -> Result<(), KernelError> {
        let mut handed = std::mem::take(&mut self.handed);
        handed.clear();
        self.drain_closed(ended, succeeded, Some(&mut handed));
        if handed.is_empty() {
            self.handed = handed;
            return Ok(());
        }
        self.late_handed.extend(handed.iter().copied());
        let mut stay = from;
        for i in from..live.len() {
            let k = live[i].0;
            let entry = if handed.contains(&k) {
                self.kernel.lookup_flow(&k)?.map(|v| (k, v))
            } else {
                Some(live[i])
            };
            if let Some(e) = entry {
                live[stay] = e;
                stay += 1;
            }
        }
        live.truncate(stay);
        self.handed = handed;
        Ok(())
    }

    /// Reads the whole table into `live` a stretch of buckets at a time,
    /// and takes what is finished once a batch of it is found, while the
    /// lines the take program reads again (the buckets' tags and slots)
    /// are still in the cache. Read whole and then taken, every finished
    /// connection's lines were fetched from memory twice, the second time
    /// behind a pass that prefetched them: the take and that pass were a
    /// fifth of a busy agent's work, and the pass is no longer needed
    /// (docs/performance.md).
    fn read_and_take(
        &mut self,
        live: &mut Vec<(FlowKey, FlowValue)>,
        sift: &mut Sift,
        now_ns: u64,
        flush: bool,
        ended: &mut Vec<(FlowKey, FlowValue)>,
    ) -> Result<(), KernelError> {
        let n = self.kernel.buckets();
        let mut b = 0;
        while b < n {
            let from = live.len();
            self.kernel.read_buckets(b, b + READ_STRETCH, live);
            b += READ_STRETCH;
            self.drain_after_read(live, from, &mut sift.succeeded, ended)?;
            self.sift(live, from, sift, now_ns, flush);
            if let Some(f) = &mut self.after_stretch {
                f(&mut self.kernel, live);
            }
            if sift.due.len() >= TAKE_BATCH || b >= n {
                self.take_sifted(sift, false, ended)?;
            }
        }
        Ok(())
    }

    /// Sorts the entries `live[from..]` just read: trailing packets of a
    /// held connection, and connections finished (due, or waiting out
    /// their linger), go to `sift` to be taken; the rest stay, in order.
    fn sift(
        &self,
        live: &mut Vec<(FlowKey, FlowValue)>,
        from: usize,
        sift: &mut Sift,
        now_ns: u64,
        flush: bool,
    ) {
        let mut stay = from;
        for i in from..live.len() {
            let (k, v) = live[i];
            let hold = match self.held.route(&k, &v) {
                Route::Trailing => Some(true),
                route => {
                    if route == Route::Successor {
                        sift.succeeded.push(k);
                    }
                    let conn = Conn::new(k, v);
                    let (close, _) = conn.classify(now_ns, &self.timeouts);
                    let silent = Duration::from_nanos(now_ns.saturating_sub(conn.last_ns()));
                    if flush || is_due(close, silent, &self.timeouts) {
                        Some(false)
                    } else {
                        // Final, waiting out the linger: held in the agent,
                        // not read again each poll.
                        close.is_final().then_some(true)
                    }
                }
            };
            match hold {
                Some(hold) => {
                    sift.due.push((k, v));
                    sift.hold.push(hold);
                }
                None => {
                    if stay != i {
                        live[stay] = live[i];
                    }
                    stay += 1;
                }
            }
        }
        live.truncate(stay);
    }

    /// Takes what [`Agent::sift`] found; `prefetch` when its lines may
    /// have left the cache since they were read.
    fn take_sifted(
        &mut self,
        sift: &mut Sift,
        prefetch: bool,
        ended: &mut Vec<(FlowKey, FlowValue)>,
    ) -> Result<(), KernelError> {
        // Before the take: a successor that is itself final is held next.
        for k in sift.succeeded.drain(..) {
            ended.extend(self.held.end(&k));
        }
        let taken = if sift.due.is_empty() {
            Ok(())
        } else {
            let taken = self.take_all(&sift.due, &sift.hold, prefetch, ended);
            // A connection handed over between the read and the take is
            // absent for the take: its record is on the ring by now.
            let mut late = std::mem::take(&mut self.late_handed);
            self.drain_closed(ended, &mut sift.succeeded, Some(&mut late));
            self.late_handed = late;
            taken
        };
        sift.due.clear();
        sift.hold.clear();
        taken
    }

    /// Takes the finished connections `seen` out of the table; their final
    /// values go to `ended`, or (where `hold` says so) to the held ones.
    fn take_all(
        &mut self,
        seen: &[(FlowKey, FlowValue)],
        hold: &[bool],
        prefetch: bool,
        ended: &mut Vec<(FlowKey, FlowValue)>,
    ) -> Result<(), KernelError> {
        let (held, kept, removed, tracker) = (
            &mut self.held,
            &mut self.kept,
            &mut self.removed,
            &mut self.tracker,
        );
        self.kernel.take_flows_each(seen, prefetch, |i, t| {
            let key = seen[i].0;
            let value = match t {
                Taken::Removed(v) => {
                    *removed += 1;
                    v
                }
                // Still in the table, but not in this poll's live list (a
                // trailing entry's key is accounted as the held one's).
                Taken::Replaced => {
                    if !held.contains(&key) {
                        kept.push(key);
                    }
                    return;
                }
                Taken::Absent => return,
            };
            if hold.get(i) == Some(&true) {
                match held.hold(key, value) {
                    None => tracker.hold(&key, &value),
                    Some((before, merged)) => tracker.merge(&key, &before, merged),
                }
            } else {
                tracker.end(&key, &value);
                ended.push((key, value));
            }
        })
    }

    /// What queries see: the recently finished connections, then every
    /// connection in the table, classified as of `now_ns`.
    pub fn records(
        &self,
        now_ns: u64,
        names: &HashMap<u32, String>,
    ) -> Result<Vec<ConnRecord>, KernelError> {
        let live = self.live_records(now_ns, names)?;
        Ok(self.recent.iter().cloned().chain(live).collect())
    }

    /// Every connection in the table or held through its linger,
    /// classified as of `now_ns`.
    pub fn live_records(
        &self,
        now_ns: u64,
        names: &HashMap<u32, String>,
    ) -> Result<Vec<ConnRecord>, KernelError> {
        let mut flows = self.kernel.flows()?;
        self.held.add_to(&mut flows);
        Ok(record::build(
            flows,
            names,
            now_ns,
            &self.timeouts,
            Clock::now().offset_ns,
        ))
    }
}

/// Each poll allocates and frees a few megabytes per 10,000 connections.
/// glibc hands such blocks back to the kernel when freed (unmapped, or
/// trimmed off the heap), so every poll faulted in and zeroed fresh pages:
/// a quarter of a poll's time. Fixed thresholds keep them in the heap.
pub fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // Safety: mallopt only sets allocator parameters (32 MiB is glibc's
    // largest mmap threshold).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the kernel programs stamp packets with.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_connections_wait_out_the_linger() {
        let t = Timeouts::default();
        assert!(!is_due(Close::Fin, Duration::from_millis(1500), &t));
        assert!(is_due(Close::Fin, Duration::from_secs(2), &t));
        assert!(is_due(Close::Refused, Duration::from_secs(3), &t));
        assert!(is_due(Close::Idle, Duration::ZERO, &t));
        assert!(!is_due(Close::Open, Duration::from_secs(10_000), &t));
        assert!(!is_due(Close::Connecting, Duration::from_secs(5), &t));
    }
}
