//! The timer table: every deadline the machine keeps, and the only place they live. The next
//! deadline is the first entry of an ordered queue; `handle_timeout` pops what is due, in time
//! order. The queue is kept in two lanes, merged at the front: the times at which ended flows are
//! forgotten, and all others; so the flow that ended first is at hand when a full machine must
//! forget one early (`Config::max_flows`).
//!
//! Stopping or moving a timer only changes its record: the queue entry it leaves behind is stale
//! and is dropped when it reaches the front (or is found stale there). So accepting a request or
//! ending a flow never searches the middle of a queue a million entries long; the only queue
//! operations are inserts (a new flow's deadlines, or an ended flow's forget time, both near the
//! end) and pops at the front. A stale entry lives at most until its own time, so the queue holds
//! at most the deadlines set within the longest timeout.
//!
//! A flow's record remembers the time of a stopped deadline until its stale entry leaves the
//! queue, so every queue entry of a flow is known to its record: a flow forgotten before its time
//! (to make room for a newcomer, see `FLOWS_PER_USER`) takes its entries out with it
//! ([`TimerTable::clear`]), and the queue never holds more than three entries per slot.

use std::collections::{BTreeSet, HashMap};

use crate::types::Millis;

/// A flow's internal handle: its slot in the flow table (reused once the flow is forgotten).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct FlowId(pub(crate) u32);

/// One deadline. For equal times the order of the variants is the order of handling: a flow's
/// own deadlines before the events held for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// An incoming request's prompt closes (RQ-04).
    Prompt(FlowId),
    /// The flow times out (TO-01).
    Expire(FlowId),
    /// An ended flow is forgotten (its id joins the cancel gate's memory of closed ids).
    Forget(FlowId),
    /// An in-room request whose event ID never came back is given up.
    PendingRoom(u64),
    /// An event held for keys is given up.
    Held(u64),
}

/// No deadline.
const NONE: Millis = Millis::MAX;
/// Marks a flow deadline that was stopped while its entry is still in the queue (deadlines are
/// milliseconds since 1970 and `set` caps them below `NONE`, so the top bit is free).
const STOPPED: Millis = 1 << 63;

/// Queue entries: the kind in the top two bits, then for flows which deadline (bits 32–33) and
/// the slot, so that at equal times the order is the order of [`Timer`]'s variants.
const PENDING_ROOM: u64 = 1 << 62;
const HELD: u64 = 2 << 62;
const KIND: u64 = 3 << 62;
const ID: u64 = !KIND;

#[derive(Debug, Default)]
pub(crate) struct TimerTable {
    /// `(when, entry)`, live or stale, in two lanes ([`lane`]); the first entry of each is always
    /// live.
    queues: [BTreeSet<(Millis, u64)>; 2],
    /// A flow's prompt, expiry and forget deadlines, by slot: `NONE` when it has no queue entry,
    /// the time when it runs, the time with `STOPPED` when it was stopped and its stale entry
    /// still waits in the queue.
    flows: Vec<[Millis; 3]>,
    /// The deadlines of the other timers.
    others: HashMap<Timer, Millis>,
}

/// A flow's three timers, in the order of its deadlines' record.
fn flow_timers(flow: FlowId) -> [Timer; 3] {
    [Timer::Prompt(flow), Timer::Expire(flow), Timer::Forget(flow)]
}

/// A flow timer's slot and index in its deadlines.
fn flow_timer(timer: Timer) -> Option<(usize, usize)> {
    match timer {
        Timer::Prompt(f) => Some((f.0 as usize, 0)),
        Timer::Expire(f) => Some((f.0 as usize, 1)),
        Timer::Forget(f) => Some((f.0 as usize, 2)),
        Timer::PendingRoom(_) | Timer::Held(_) => None,
    }
}

fn entry(timer: Timer) -> u64 {
    match timer {
        Timer::Prompt(f) => u64::from(f.0),
        Timer::Expire(f) => (1 << 32) | u64::from(f.0),
        Timer::Forget(f) => (2 << 32) | u64::from(f.0),
        Timer::PendingRoom(id) => PENDING_ROOM | (id & ID),
        Timer::Held(id) => HELD | (id & ID),
    }
}

/// The queue lane of an entry: 1 for a forget time, 0 for every other deadline.
fn lane(entry: u64) -> usize {
    usize::from(entry & KIND == 0 && (entry >> 32) == 2)
}

fn timer_of(entry: u64) -> Timer {
    let id = entry & ID;
    match entry & KIND {
        PENDING_ROOM => Timer::PendingRoom(id),
        HELD => Timer::Held(id),
        _ => flow_timers(FlowId(id as u32))[(id >> 32) as usize],
    }
}

impl TimerTable {
    /// Sets (or moves) a timer.
    pub(crate) fn set(&mut self, timer: Timer, when: Millis) {
        let when = when.min(STOPPED - 1);
        match flow_timer(timer) {
            Some((slot, which)) => {
                if self.flows.len() <= slot {
                    self.flows.resize(slot + 1, [NONE; 3]);
                }
                // A flow sets each deadline once; should one move, its old entry goes at once so
                // that every entry of a flow stays known to its record.
                let old = std::mem::replace(&mut self.flows[slot][which], when);
                self.remove_entry(timer, old);
            }
            None => {
                self.others.insert(timer, when);
            }
        }
        let e = entry(timer);
        self.queues[lane(e)].insert((when, e));
        self.purge();
    }

    /// Stops a timer, if it runs (its queue entry becomes stale).
    pub(crate) fn stop(&mut self, timer: Timer) {
        match flow_timer(timer) {
            Some((slot, which)) => {
                if let Some(d) = self.record(slot, which)
                    && *d != NONE
                {
                    *d |= STOPPED;
                }
            }
            None => {
                self.others.remove(&timer);
            }
        }
        self.purge();
    }

    /// When a timer fires, if it runs.
    pub(crate) fn get(&self, timer: Timer) -> Option<Millis> {
        match flow_timer(timer) {
            Some((slot, which)) => self.flows.get(slot).map(|d| d[which]).filter(|&w| w & STOPPED == 0),
            None => self.others.get(&timer).copied(),
        }
    }

    /// The first entry of the queue: the earlier of the two lanes' first.
    fn first(&self) -> Option<(Millis, u64)> {
        self.queues.iter().filter_map(|q| q.first().copied()).min()
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Millis> {
        self.first().map(|(when, _)| when)
    }

    /// Removes and returns the earliest timer due at `now`.
    pub(crate) fn pop_due(&mut self, now: Millis) -> Option<Timer> {
        let (when, e) = self.first()?;
        if when > now {
            return None;
        }
        self.queues[lane(e)].pop_first();
        self.left_queue(when, e);
        self.purge();
        Some(timer_of(e))
    }

    /// The flow with the earliest forget time: of the ended flows, the one that ended first.
    pub(crate) fn first_to_forget(&self) -> Option<FlowId> {
        self.queues[1].first().map(|&(_, e)| FlowId(e as u32))
    }

    /// How many forget times are queued: the number of ended flows, since the machine never
    /// stops a forget time (it moves none either, and a flow forgotten early takes its own out).
    pub(crate) fn forget_times(&self) -> usize {
        self.queues[1].len()
    }

    /// Takes every queue entry of a flow's slot out of the queue, running or stale, and clears
    /// its deadlines: for a flow forgotten before its time.
    pub(crate) fn clear(&mut self, flow: FlowId) {
        let Some(deadlines) = self.flows.get_mut(flow.0 as usize) else { return };
        let deadlines = std::mem::replace(deadlines, [NONE; 3]);
        for (timer, when) in flow_timers(flow).into_iter().zip(deadlines) {
            self.remove_entry(timer, when);
        }
        self.purge();
    }

    /// A flow deadline's record, if its slot has one.
    fn record(&mut self, slot: usize, which: usize) -> Option<&mut Millis> {
        self.flows.get_mut(slot).map(|d| &mut d[which])
    }

    /// Takes out of the queue the entry a flow deadline's `record` knows of, running or stale.
    fn remove_entry(&mut self, timer: Timer, record: Millis) {
        if record != NONE {
            let e = entry(timer);
            self.queues[lane(e)].remove(&(record & !STOPPED, e));
        }
    }

    /// Forgets what the records say of a queue entry that just left the queue: a running
    /// timer has fired, a stopped one's stale entry is gone.
    fn left_queue(&mut self, when: Millis, e: u64) {
        let timer = timer_of(e);
        match flow_timer(timer) {
            Some((slot, which)) => {
                if let Some(d) = self.record(slot, which)
                    && *d != NONE
                    && *d & !STOPPED == when
                {
                    *d = NONE;
                }
            }
            None => {
                if self.others.get(&timer) == Some(&when) {
                    self.others.remove(&timer);
                }
            }
        }
    }

    /// Whether a queue entry is the timer's current deadline.
    fn live(&self, when: Millis, e: u64) -> bool {
        self.get(timer_of(e)) == Some(when)
    }

    /// Drops stale entries from the front of each lane, so that the first entry is a live
    /// deadline.
    fn purge(&mut self) {
        for lane in 0..self.queues.len() {
            while let Some(&(when, e)) = self.queues[lane].first() {
                if self.live(when, e) {
                    break;
                }
                self.queues[lane].pop_first();
                self.left_queue(when, e);
            }
        }
    }

    /// How many entries the queue holds, live or stale (for tests).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.queues.iter().map(BTreeSet::len).sum()
    }

    /// The slots whose records still know of a queue entry (for tests: each must hold a flow).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn slots_with_entries(&self) -> impl Iterator<Item = FlowId> + '_ {
        self.flows.iter().enumerate().filter(|(_, d)| d.iter().any(|w| *w != NONE)).map(|(i, _)| FlowId(i as u32))
    }

    /// Whether every running timer has its entry in the queue, every flow entry in the queue is
    /// known to its record (running or stopped), and the first entry is live (for tests);
    /// returns how many timers run.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn check(&self) -> Result<usize, String> {
        let mut running = 0;
        let flows =
            self.flows.iter().enumerate().flat_map(|(slot, d)| flow_timers(FlowId(slot as u32)).into_iter().zip(*d));
        for (timer, when) in flows.filter(|(_, w)| *w != NONE).chain(self.others.iter().map(|(t, w)| (*t, *w))) {
            let (when, stopped) = (when & !STOPPED, when & STOPPED != 0);
            running += usize::from(!stopped);
            if !self.queues[lane(entry(timer))].contains(&(when, entry(timer))) {
                return Err(format!("{timer:?} at {when} (stopped: {stopped}) is not in the queue"));
            }
        }
        for (i, &(when, e)) in self.queues.iter().enumerate().flat_map(|(i, q)| q.iter().map(move |x| (i, x))) {
            let timer = timer_of(e);
            if lane(e) != i {
                return Err(format!("{timer:?} at {when} is in the wrong lane"));
            }
            if let Some((slot, which)) = flow_timer(timer)
                && self.flows.get(slot).is_none_or(|d| d[which] == NONE || d[which] & !STOPPED != when)
            {
                return Err(format!("{timer:?} at {when} is in the queue, unknown to its record"));
            }
        }
        if let Some(&(when, e)) = self.queues.iter().filter_map(|q| q.first()).find(|(when, e)| !self.live(*when, *e)) {
            return Err(format!("the first entry {:?} at {when} is stale", timer_of(e)));
        }
        Ok(running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_move_stop_and_pop_in_order() {
        let mut t = TimerTable::default();
        let f = FlowId(1);
        t.set(Timer::Expire(f), 100);
        t.set(Timer::Prompt(f), 50);
        t.set(Timer::Held(7), 100);
        assert_eq!(t.next(), Some(50));
        t.set(Timer::Prompt(f), 120);
        assert_eq!(t.get(Timer::Prompt(f)), Some(120));
        assert_eq!(t.next(), Some(100));
        assert_eq!(t.pop_due(99), None);
        // Same time: the flow's own deadline comes before a held event's.
        assert_eq!(t.pop_due(100), Some(Timer::Expire(f)));
        assert_eq!(t.pop_due(100), Some(Timer::Held(7)));
        assert_eq!(t.pop_due(100), None);
        t.stop(Timer::Prompt(f));
        assert_eq!(t.next(), None);
        assert_eq!(t.get(Timer::Prompt(f)), None);
    }

    #[test]
    fn ties_by_kind_and_stale_entries() {
        let mut t = TimerTable::default();
        let (f, g) = (FlowId(0), FlowId(3));
        t.set(Timer::Prompt(f), 50);
        t.set(Timer::Expire(f), 80);
        t.set(Timer::Expire(g), 60);
        t.set(Timer::PendingRoom(1), 50);
        assert_eq!(t.check(), Ok(4));
        assert_eq!(t.pop_due(100), Some(Timer::Prompt(f)), "flows before other timers at equal times");
        assert_eq!(t.pop_due(100), Some(Timer::PendingRoom(1)));
        assert_eq!(t.pop_due(100), Some(Timer::Expire(g)));
        t.set(Timer::Forget(f), 80);
        assert_eq!(t.pop_due(100), Some(Timer::Expire(f)), "expiry before forgetting at equal times");
        assert_eq!(t.pop_due(100), Some(Timer::Forget(f)));
        assert_eq!((t.pop_due(u64::MAX), t.next(), t.queued()), (None, None, 0));
        t.stop(Timer::Forget(FlowId(1_000)));
        assert_eq!(t.check(), Ok(0), "stopping a timer never set changes nothing");
    }

    /// The two lanes merge in time order, and the forget lane gives the flow that ended first.
    #[test]
    fn forget_times_in_their_own_lane() {
        let mut t = TimerTable::default();
        t.set(Timer::Forget(FlowId(4)), 70);
        t.set(Timer::Expire(FlowId(5)), 60);
        t.set(Timer::Forget(FlowId(2)), 90);
        t.set(Timer::Expire(FlowId(6)), 70);
        assert_eq!((t.first_to_forget(), t.next(), t.check()), (Some(FlowId(4)), Some(60), Ok(4)));
        assert_eq!(t.pop_due(100), Some(Timer::Expire(FlowId(5))));
        assert_eq!(t.pop_due(100), Some(Timer::Expire(FlowId(6))), "an expiry before a forget time at 70");
        assert_eq!(t.pop_due(100), Some(Timer::Forget(FlowId(4))));
        assert_eq!(t.first_to_forget(), Some(FlowId(2)));
        t.clear(FlowId(2));
        assert_eq!((t.first_to_forget(), t.next(), t.queued()), (None, None, 0));
    }

    #[test]
    fn a_flow_forgotten_early_takes_its_entries_along() {
        let mut t = TimerTable::default();
        let (f, g) = (FlowId(0), FlowId(1));
        t.set(Timer::Prompt(f), 10);
        t.set(Timer::Expire(f), 50);
        t.set(Timer::Expire(g), 5);
        t.stop(Timer::Prompt(f));
        t.stop(Timer::Expire(f));
        t.set(Timer::Forget(f), 60);
        assert_eq!((t.queued(), t.check()), (4, Ok(2)), "stopped deadlines leave stale entries behind");
        t.clear(f);
        assert_eq!((t.queued(), t.check()), (1, Ok(1)));
        assert_eq!(t.slots_with_entries().collect::<Vec<_>>(), [g]);
        assert_eq!(t.pop_due(100), Some(Timer::Expire(g)));
        assert!(t.queued() == 0 && t.slots_with_entries().next().is_none());
        t.clear(FlowId(1_000));
    }

    #[test]
    fn stale_entries_leaving_the_queue_clear_their_records() {
        let mut t = TimerTable::default();
        let f = FlowId(0);
        t.set(Timer::Prompt(f), 10);
        t.set(Timer::Expire(f), 50);
        t.set(Timer::Forget(FlowId(1)), 60);
        t.stop(Timer::Prompt(f));
        assert_eq!((t.queued(), t.flows[0][0]), (2, NONE), "the stale front entry went, and its record with it");
        t.stop(Timer::Expire(f));
        assert_eq!(t.queued(), 1);
        assert_eq!(t.slots_with_entries().collect::<Vec<_>>(), [FlowId(1)]);
        // A deadline moved: its old entry goes at once.
        t.set(Timer::Forget(FlowId(1)), 70);
        t.set(Timer::Forget(FlowId(1)), 90);
        assert_eq!((t.queued(), t.check()), (1, Ok(1)));
    }

    #[test]
    fn the_check_finds_an_entry_unknown_to_its_record() {
        let mut t = TimerTable::default();
        t.set(Timer::Expire(FlowId(0)), 50);
        t.queues[1].insert((80, entry(Timer::Forget(FlowId(0)))));
        assert!(t.check().unwrap_err().contains("unknown to its record"));
    }

    #[test]
    fn stale_entries_never_fire_and_leave_the_front() {
        let mut t = TimerTable::default();
        let f = FlowId(2);
        t.set(Timer::Prompt(f), 10);
        t.set(Timer::Expire(f), 50);
        t.stop(Timer::Prompt(f));
        assert_eq!(t.next(), Some(50), "a stopped timer at the front is dropped at once");
        t.set(Timer::Held(9), 20);
        t.set(Timer::Held(9), 70);
        assert_eq!(t.next(), Some(50), "a moved timer's old entry is dropped when it reaches the front");
        t.set(Timer::Expire(f), 40);
        assert_eq!(t.pop_due(45), Some(Timer::Expire(f)));
        assert_eq!(t.pop_due(69), None, "the expiry moved from 50 to 40 fires once");
        // A slot reused by a new flow: an old entry of the same time and kind is the new flow's.
        t.set(Timer::Expire(f), 80);
        assert_eq!(t.check(), Ok(2));
        assert_eq!(t.pop_due(100), Some(Timer::Held(9)));
        assert_eq!(t.pop_due(100), Some(Timer::Expire(f)));
        assert_eq!((t.pop_due(u64::MAX), t.queued()), (None, 0));
    }
}
