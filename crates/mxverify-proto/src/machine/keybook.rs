//! The key book: what the caller told us of users' keys, the events waiting for keys we do not
//! have yet (principle: never drop a request for lack of keys), and which users' keys we asked for.

use std::collections::{HashMap, VecDeque};

use crate::types::{IncomingEvent, UserKeys};

/// How many events may wait for keys at once (a bound against floods).
pub(crate) const MAX_HELD: usize = 64;

/// An event waiting for its sender's keys.
#[derive(Debug)]
pub(crate) struct Held {
    /// Its handle (its deadline is `Timer::Held(id)`).
    pub(crate) id: u64,
    pub(crate) event: IncomingEvent,
}

#[derive(Debug, Default)]
pub(crate) struct KeyBook {
    users: HashMap<String, UserKeys>,
    /// Oldest first.
    held: VecDeque<Held>,
    /// Users whose keys we asked for and have not received since.
    asked: Vec<String>,
    next_held: u64,
}

impl KeyBook {
    /// What we know of a user's keys.
    pub(crate) fn get(&self, user: &str) -> Option<&UserKeys> {
        self.users.get(user)
    }

    /// Whether we know any keys of this user.
    pub(crate) fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Whether we know this device's key.
    pub(crate) fn has_device(&self, user: &str, device: &str) -> bool {
        self.users.get(user).is_some_and(|k| k.devices.contains_key(device))
    }

    /// Records a user's keys and hands back the events that waited for them, oldest first.
    pub(crate) fn update(&mut self, user: &str, keys: UserKeys) -> Vec<Held> {
        self.users.insert(user.to_owned(), keys);
        self.asked.retain(|u| u != user);
        let (ready, rest): (VecDeque<Held>, VecDeque<Held>) =
            std::mem::take(&mut self.held).into_iter().partition(|h| h.event.sender == user);
        self.held = rest;
        ready.into()
    }

    /// Whether the caller must be asked for this user's keys: once, until they arrive.
    pub(crate) fn ask(&mut self, user: &str) -> bool {
        if self.asked.iter().any(|u| u == user) {
            return false;
        }
        self.asked.push(user.to_owned());
        true
    }

    /// Holds an event until its sender's keys arrive. Returns its handle and the event pushed out
    /// to make room, if any.
    pub(crate) fn hold(&mut self, event: IncomingEvent) -> (u64, Option<Held>) {
        let evicted = if self.held.len() >= MAX_HELD { self.held.pop_front() } else { None };
        let id = self.next_held;
        self.next_held += 1;
        self.held.push_back(Held { id, event });
        (id, evicted)
    }

    /// Gives up a held event (its deadline passed).
    pub(crate) fn release(&mut self, id: u64) -> Option<IncomingEvent> {
        let i = self.held.iter().position(|h| h.id == id)?;
        self.held.remove(i).map(|h| h.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(sender: &str) -> IncomingEvent {
        IncomingEvent {
            sender: sender.into(),
            event_type: "m.key.verification.start".into(),
            content: serde_json::json!({}),
            room: None,
        }
    }

    #[test]
    fn held_events_come_back_with_their_keys() {
        let mut book = KeyBook::default();
        assert!(book.ask("@a:x"));
        assert!(!book.ask("@a:x"), "asked once until the keys come");
        let (a, _) = book.hold(ev("@a:x"));
        let (b, _) = book.hold(ev("@b:x"));
        let back = book.update("@a:x", UserKeys::default());
        assert_eq!(back.iter().map(|h| h.id).collect::<Vec<_>>(), [a]);
        assert!(book.knows("@a:x") && !book.has_device("@a:x", "D"));
        assert!(book.ask("@a:x"), "a later need asks again");
        assert_eq!(book.release(b).map(|e| e.sender), Some("@b:x".into()));
        assert!(book.release(b).is_none());
    }

    #[test]
    fn holding_is_bounded() {
        let mut book = KeyBook::default();
        for _ in 0..MAX_HELD {
            assert!(book.hold(ev("@a:x")).1.is_none());
        }
        let (_, evicted) = book.hold(ev("@a:x"));
        assert_eq!(evicted.map(|h| h.id), Some(0));
    }
}
