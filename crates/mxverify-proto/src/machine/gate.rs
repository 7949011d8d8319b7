//! The cancel gate: the only place that decides whether a cancel goes on the wire, together with
//! the memory it needs (flow ids answered as unknown, and ids of flows that ended or were cancelled
//! before we knew them). The rule (CX-04, CX-06, CX-07, EV-RQI-05):
//!
//! * never answer a cancel;
//! * never send anything for a flow that has ended, nor a cancel once our `done` went out;
//! * an unknown to-device flow gets `m.unknown_transaction` once per flow id, except for a
//!   `request` or a `start` (CX-04 exempts every start: it may legitimately open a flow);
//! * never answer in-room events of flows that are not ours;
//! * an active flow is cancelled with the code the failed check wants (the flow then ends, so at
//!   most one cancel is sent for it).

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

use crate::cancel::CancelCode;
use crate::types::FlowKey;
use crate::wire::MsgKind;

/// How many flow ids each memory keeps, oldest forgotten first.
const MEMORY: usize = 256;

/// What led to the cancel being considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// An incoming message of this kind.
    Incoming(MsgKind),
    /// Something on our side: a user action, a deadline.
    Local,
}

/// The state of the flow an offending message belongs to, as the rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlowStatus {
    /// No flow with this id exists (or it was forgotten).
    Unknown,
    /// A flow that has not ended.
    Active,
    /// A flow that has not ended but whose `done` we sent: no cancel may follow it.
    DoneSent,
    /// A flow that ended (done or cancelled, by either side).
    Ended,
}

/// Which transport the flow uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    ToDevice,
    Room,
}

impl Via {
    pub(crate) fn of(key: &FlowKey) -> Via {
        match key {
            FlowKey::ToDevice { .. } => Via::ToDevice,
            FlowKey::Room { .. } => Via::Room,
        }
    }
}

/// The rule itself, without memory.
fn verdict(trigger: Trigger, via: Via, status: FlowStatus, wanted: CancelCode) -> Option<CancelCode> {
    if trigger == Trigger::Incoming(MsgKind::Cancel) {
        return None;
    }
    match status {
        FlowStatus::Ended | FlowStatus::DoneSent => None,
        // CX-04: a request or a start may open a flow, so neither is an unknown transaction; in
        // rooms, flows that are not ours are never answered (EV-RQI-05).
        FlowStatus::Unknown
            if via == Via::Room || matches!(trigger, Trigger::Incoming(MsgKind::Request | MsgKind::Start)) =>
        {
            None
        }
        FlowStatus::Unknown => Some(CancelCode::UnknownTransaction),
        FlowStatus::Active => Some(wanted),
    }
}

/// The rule and its memory.
#[derive(Debug, Default)]
pub(crate) struct CancelGate {
    /// To-device flow ids we answered with `m.unknown_transaction`.
    answered_unknown: Memory<FlowKey>,
    /// Flows that ended and were forgotten, or that a cancel overtook before we knew them.
    closed: Memory<FlowKey>,
}

/// A bounded set that forgets its oldest item first; asked on every request, so a lookup does not
/// walk it.
#[derive(Debug)]
struct Memory<T> {
    order: VecDeque<T>,
    set: HashSet<T>,
}

impl<T> Default for Memory<T> {
    fn default() -> Self {
        Self { order: VecDeque::new(), set: HashSet::new() }
    }
}

impl<T: Clone + Eq + Hash> Memory<T> {
    fn contains(&self, item: &T) -> bool {
        self.set.contains(item)
    }

    /// Adds an item, forgetting the oldest first when full.
    fn remember(&mut self, item: T) {
        if !self.set.insert(item.clone()) {
            return;
        }
        if self.order.len() == MEMORY
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(item);
    }
}

impl CancelGate {
    /// Whether a problem in a flow we know is answered with a cancel, and with which code.
    pub(crate) fn for_flow(
        &self,
        trigger: Trigger,
        key: &FlowKey,
        status: FlowStatus,
        wanted: CancelCode,
    ) -> Option<CancelCode> {
        verdict(trigger, Via::of(key), status, wanted)
    }

    /// An event for a to-device flow we do not know (CX-04): the code to answer with, at most
    /// once per flow id.
    pub(crate) fn for_unknown(&mut self, kind: MsgKind, key: &FlowKey) -> Option<CancelCode> {
        let code = verdict(Trigger::Incoming(kind), Via::of(key), FlowStatus::Unknown, CancelCode::UnknownTransaction)?;
        if !matches!(key, FlowKey::ToDevice { .. }) || self.answered_unknown.contains(key) {
            return None;
        }
        self.answered_unknown.remember(key.clone());
        Some(code)
    }

    /// A flow id that must never open a flow again: opening it would put a second cancel for one
    /// flow id on the wire, or reopen a flow that ended.
    pub(crate) fn is_closed(&self, key: &FlowKey) -> bool {
        self.closed.contains(key) || self.answered_unknown.contains(key)
    }

    /// Remembers a flow id as closed: a flow that ended and is forgotten, or one a cancel
    /// overtook (so the request it overtook never prompts).
    pub(crate) fn close(&mut self, key: FlowKey) {
        self.closed.remember(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_loop_rule() {
        let all = [
            MsgKind::Request,
            MsgKind::Ready,
            MsgKind::Start,
            MsgKind::Accept,
            MsgKind::Key,
            MsgKind::Mac,
            MsgKind::Done,
            MsgKind::Cancel,
        ];
        let statuses = [FlowStatus::Unknown, FlowStatus::Active, FlowStatus::DoneSent, FlowStatus::Ended];
        for kind in all {
            let trigger = Trigger::Incoming(kind);
            for via in [Via::ToDevice, Via::Room] {
                for status in statuses {
                    let v = verdict(trigger, via, status, CancelCode::InvalidMessage);
                    // Never answer a cancel; nothing after the end or after our done.
                    if kind == MsgKind::Cancel || matches!(status, FlowStatus::Ended | FlowStatus::DoneSent) {
                        assert_eq!(v, None, "{kind:?} {via:?} {status:?}");
                    }
                }
                // In rooms, unknown flows are never answered.
                assert_eq!(verdict(trigger, Via::Room, FlowStatus::Unknown, CancelCode::User), None);
            }
        }
        // CX-04: unknown to-device flows get m.unknown_transaction, except for requests and every start.
        for kind in [MsgKind::Ready, MsgKind::Accept, MsgKind::Key, MsgKind::Mac, MsgKind::Done] {
            assert_eq!(
                verdict(Trigger::Incoming(kind), Via::ToDevice, FlowStatus::Unknown, CancelCode::User),
                Some(CancelCode::UnknownTransaction)
            );
        }
        for kind in [MsgKind::Request, MsgKind::Start] {
            assert_eq!(verdict(Trigger::Incoming(kind), Via::ToDevice, FlowStatus::Unknown, CancelCode::User), None);
        }
        let mac = Trigger::Incoming(MsgKind::Mac);
        assert_eq!(verdict(mac, Via::Room, FlowStatus::Active, CancelCode::KeyMismatch), Some(CancelCode::KeyMismatch));
        // Our own cancels go out for active flows only.
        assert_eq!(verdict(Trigger::Local, Via::Room, FlowStatus::Active, CancelCode::User), Some(CancelCode::User));
        assert_eq!(verdict(Trigger::Local, Via::ToDevice, FlowStatus::DoneSent, CancelCode::Timeout), None);
        assert_eq!(verdict(Trigger::Local, Via::ToDevice, FlowStatus::Ended, CancelCode::User), None);
    }

    #[test]
    fn unknown_flows_are_answered_once_and_stay_closed() {
        let mut gate = CancelGate::default();
        let key = FlowKey::ToDevice { user_id: "@a:x".into(), transaction_id: "t".into() };
        assert!(!gate.is_closed(&key));
        assert_eq!(gate.for_unknown(MsgKind::Mac, &key), Some(CancelCode::UnknownTransaction));
        assert_eq!(gate.for_unknown(MsgKind::Mac, &key), None);
        assert!(gate.is_closed(&key));
        let other = FlowKey::ToDevice { user_id: "@a:x".into(), transaction_id: "u".into() };
        assert_eq!(gate.for_unknown(MsgKind::Start, &other), None, "a start is never an unknown transaction");
        assert!(!gate.is_closed(&other));
        let room = FlowKey::Room { room_id: "!r:x".into(), event_id: "$e".into() };
        assert_eq!(gate.for_unknown(MsgKind::Mac, &room), None, "rooms are never answered");
        gate.close(room.clone());
        assert!(gate.is_closed(&room));
        for i in 0..MEMORY {
            gate.close(FlowKey::Room { room_id: "!r:x".into(), event_id: format!("${i}") });
        }
        assert!(!gate.is_closed(&room), "the memory is bounded");
        // The same id closed again takes no second place.
        let last = FlowKey::Room { room_id: "!r:x".into(), event_id: format!("${}", MEMORY - 1) };
        let first_kept = FlowKey::Room { room_id: "!r:x".into(), event_id: "$0".into() };
        gate.close(last.clone());
        assert!(gate.is_closed(&first_kept) && gate.is_closed(&last));
        assert_eq!((gate.closed.order.len(), gate.closed.set.len()), (MEMORY, MEMORY));
    }
}
