//! The timer table: every deadline the machine keeps, and the only place they live. The next
//! deadline is the first entry; `handle_timeout` pops what is due, in time order.

use std::collections::{BTreeSet, HashMap};

use crate::types::Millis;

/// A flow's internal handle (stable while the flow is remembered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct FlowId(pub(crate) u64);

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

#[derive(Debug, Default)]
pub(crate) struct TimerTable {
    by_time: BTreeSet<(Millis, Timer)>,
    at: HashMap<Timer, Millis>,
}

impl TimerTable {
    /// Sets (or moves) a timer.
    pub(crate) fn set(&mut self, timer: Timer, when: Millis) {
        if let Some(old) = self.at.insert(timer, when) {
            self.by_time.remove(&(old, timer));
        }
        self.by_time.insert((when, timer));
    }

    /// Stops a timer, if it runs.
    pub(crate) fn stop(&mut self, timer: Timer) {
        if let Some(old) = self.at.remove(&timer) {
            self.by_time.remove(&(old, timer));
        }
    }

    /// When a timer fires, if it runs.
    pub(crate) fn get(&self, timer: Timer) -> Option<Millis> {
        self.at.get(&timer).copied()
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Millis> {
        self.by_time.first().map(|(when, _)| *when)
    }

    /// Removes and returns the earliest timer due at `now`.
    pub(crate) fn pop_due(&mut self, now: Millis) -> Option<Timer> {
        let &(when, timer) = self.by_time.first()?;
        if when > now {
            return None;
        }
        self.by_time.pop_first();
        self.at.remove(&timer);
        Some(timer)
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
}
