//! The timer table: every deadline the machine keeps, and the only place they live. The next
//! deadline is the first entry of an ordered queue; `handle_timeout` pops what is due, in time
//! order. A flow has at most one entry in the queue (its earliest deadline), so a million waiting
//! flows cost a million entries, and every operation is logarithmic at most.

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
    /// An ended flow is forgotten (its id stays closed in the cancel gate).
    Forget(FlowId),
    /// An in-room request whose event ID never came back is given up.
    PendingRoom(u64),
    /// An event held for keys is given up.
    Held(u64),
}

/// No deadline.
const NONE: Millis = Millis::MAX;

/// Queue entries: the kind in the top two bits, so that at equal times flows come first.
const FLOW: u64 = 0;
const PENDING_ROOM: u64 = 1 << 62;
const HELD: u64 = 2 << 62;
const ID: u64 = (1 << 62) - 1;

#[derive(Debug, Default)]
pub(crate) struct TimerTable {
    /// `(when, entry)`: one entry per flow (its earliest deadline) and per other timer.
    queue: BTreeSet<(Millis, u64)>,
    /// A flow's prompt, expiry and forget deadlines, by slot (`NONE` when not set).
    flows: Vec<[Millis; 3]>,
    /// The deadlines of the other timers.
    others: HashMap<Timer, Millis>,
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
        Timer::Prompt(f) | Timer::Expire(f) | Timer::Forget(f) => FLOW | u64::from(f.0),
        Timer::PendingRoom(id) => PENDING_ROOM | (id & ID),
        Timer::Held(id) => HELD | (id & ID),
    }
}

impl TimerTable {
    /// Changes one of a flow's deadlines, keeping its queue entry at the earliest.
    fn set_flow(&mut self, slot: usize, which: usize, when: Millis) {
        if self.flows.len() <= slot {
            if when == NONE {
                return;
            }
            self.flows.resize(slot + 1, [NONE; 3]);
        }
        let deadlines = &mut self.flows[slot];
        let before = deadlines.iter().copied().min().unwrap_or(NONE);
        deadlines[which] = when;
        let after = deadlines.iter().copied().min().unwrap_or(NONE);
        if before != after {
            let e = FLOW | slot as u64;
            if before != NONE {
                self.queue.remove(&(before, e));
            }
            if after != NONE {
                self.queue.insert((after, e));
            }
        }
    }

    /// Sets (or moves) a timer.
    pub(crate) fn set(&mut self, timer: Timer, when: Millis) {
        let when = when.min(NONE - 1);
        match flow_timer(timer) {
            Some((slot, which)) => self.set_flow(slot, which, when),
            None => {
                if let Some(old) = self.others.insert(timer, when) {
                    self.queue.remove(&(old, entry(timer)));
                }
                self.queue.insert((when, entry(timer)));
            }
        }
    }

    /// Stops a timer, if it runs.
    pub(crate) fn stop(&mut self, timer: Timer) {
        match flow_timer(timer) {
            Some((slot, which)) => self.set_flow(slot, which, NONE),
            None => {
                if let Some(old) = self.others.remove(&timer) {
                    self.queue.remove(&(old, entry(timer)));
                }
            }
        }
    }

    /// When a timer fires, if it runs.
    pub(crate) fn get(&self, timer: Timer) -> Option<Millis> {
        match flow_timer(timer) {
            Some((slot, which)) => self.flows.get(slot).map(|d| d[which]).filter(|&w| w != NONE),
            None => self.others.get(&timer).copied(),
        }
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Millis> {
        self.queue.first().map(|(when, _)| *when)
    }

    /// Removes and returns the earliest timer due at `now`.
    pub(crate) fn pop_due(&mut self, now: Millis) -> Option<Timer> {
        let &(when, e) = self.queue.first()?;
        if when > now {
            return None;
        }
        let id = e & ID;
        match e & !ID {
            FLOW => {
                let slot = id as usize;
                let which = self.flows[slot].iter().position(|&w| w == when).unwrap_or(0);
                let flow = FlowId(slot as u32);
                self.set_flow(slot, which, NONE);
                Some([Timer::Prompt(flow), Timer::Expire(flow), Timer::Forget(flow)][which])
            }
            kind => {
                let timer = if kind == PENDING_ROOM { Timer::PendingRoom(id) } else { Timer::Held(id) };
                self.queue.pop_first();
                self.others.remove(&timer);
                Some(timer)
            }
        }
    }

    /// How many entries the queue holds (for tests: one per flow with a deadline, one per other
    /// timer).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
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
    fn one_queue_entry_per_flow_and_ties_by_kind() {
        let mut t = TimerTable::default();
        let (f, g) = (FlowId(0), FlowId(3));
        t.set(Timer::Prompt(f), 50);
        t.set(Timer::Expire(f), 80);
        t.set(Timer::Expire(g), 60);
        t.set(Timer::PendingRoom(1), 50);
        assert_eq!(t.queued(), 3, "a flow's two deadlines are one entry");
        assert_eq!(t.pop_due(100), Some(Timer::Prompt(f)), "flows before other timers at equal times");
        assert_eq!(t.pop_due(100), Some(Timer::PendingRoom(1)));
        assert_eq!(t.pop_due(100), Some(Timer::Expire(g)));
        assert_eq!(t.queued(), 1, "the flow's next deadline took its place");
        t.set(Timer::Forget(f), 80);
        assert_eq!(t.pop_due(100), Some(Timer::Expire(f)), "expiry before forgetting at equal times");
        assert_eq!(t.pop_due(100), Some(Timer::Forget(f)));
        assert_eq!((t.pop_due(u64::MAX), t.next(), t.queued()), (None, None, 0));
        t.stop(Timer::Forget(FlowId(1_000)));
        assert_eq!(t.queued(), 0, "stopping a timer never set changes nothing");
    }
}
