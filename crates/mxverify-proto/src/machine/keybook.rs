//! The key book: what the caller told us of users' keys, the events waiting for keys we do not
//! have yet (principle: never drop a request for lack of keys), and which users' keys we asked for.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::keys::Ed25519PublicKey;
use crate::types::{IncomingEvent, UserKeys};

/// How many events may wait for keys at once, from everyone together (a bound against floods).
pub(crate) const MAX_HELD: usize = 64;
/// How many events one sender may have waiting for keys: a flood from one sender only ever
/// displaces that sender's own events.
pub(crate) const MAX_HELD_PER_SENDER: usize = 8;
/// How many users may be remembered as asked for at once. Past it the memory starts afresh: a
/// user asked for again costs the caller one more key query, never a lost event.
pub(crate) const MAX_ASKED: usize = 1 << 16;

/// An event waiting for its sender's keys.
#[derive(Debug)]
pub(crate) struct Held {
    /// Its handle (its deadline is `Timer::Held(id)`).
    pub(crate) id: u64,
    pub(crate) event: IncomingEvent,
}

/// What [`KeyBook::update`] changed.
#[derive(Debug)]
pub(crate) struct Updated {
    /// The user's previous master key, if the update replaced it with another one or removed it.
    pub(crate) replaced_master: Option<Ed25519PublicKey>,
    /// The events that waited for these keys, oldest first.
    pub(crate) released: Vec<Held>,
}

/// What became of an event given to [`KeyBook::hold`].
#[derive(Debug)]
pub(crate) enum Hold {
    /// Held under this handle; the sender's oldest held event made room for it.
    Held { id: u64, evicted: Option<Held> },
    /// Not held: too many events wait already.
    Refused(IncomingEvent),
}

#[derive(Debug, Default)]
pub(crate) struct KeyBook {
    users: HashMap<String, UserKeys>,
    /// Oldest first.
    held: VecDeque<Held>,
    /// Users whose keys we asked for and have not received since.
    asked: HashSet<Box<str>>,
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

    /// Records a user's keys. Returns the master key they replace, if it was a different one
    /// (TR-06), and the events that waited for them, oldest first.
    pub(crate) fn update(&mut self, user: &str, keys: UserKeys) -> Updated {
        let new_master = keys.master_key.clone();
        let old = self.users.insert(user.to_owned(), keys);
        let replaced_master = old.and_then(|k| k.master_key).filter(|old| Some(old) != new_master.as_ref());
        self.asked.remove(user);
        let (ready, rest): (VecDeque<Held>, VecDeque<Held>) =
            std::mem::take(&mut self.held).into_iter().partition(|h| h.event.sender == user);
        self.held = rest;
        Updated { replaced_master, released: ready.into() }
    }

    /// Whether the caller must be asked for this user's keys: once, until they arrive.
    pub(crate) fn ask(&mut self, user: &str) -> bool {
        if self.asked.contains(user) {
            return false;
        }
        if self.asked.len() >= MAX_ASKED {
            self.asked.clear();
        }
        self.asked.insert(user.into());
        true
    }

    /// Holds an event until its sender's keys arrive. A sender at its quota gives up its own
    /// oldest event; when everyone together is at the global bound, the new event is refused, so
    /// that no sender ever pushes out another's.
    pub(crate) fn hold(&mut self, event: IncomingEvent) -> Hold {
        let theirs = self.held.iter().filter(|h| h.event.sender == event.sender).count();
        let evicted = if theirs >= MAX_HELD_PER_SENDER {
            let oldest = self.held.iter().position(|h| h.event.sender == event.sender);
            oldest.and_then(|i| self.held.remove(i))
        } else if self.held.len() >= MAX_HELD {
            return Hold::Refused(event);
        } else {
            None
        };
        let id = self.next_held;
        self.next_held += 1;
        self.held.push_back(Held { id, event });
        Hold::Held { id, evicted }
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

    fn id(hold: Hold) -> u64 {
        match hold {
            Hold::Held { id, .. } => id,
            Hold::Refused(_) => panic!("refused"),
        }
    }

    #[test]
    fn held_events_come_back_with_their_keys() {
        let mut book = KeyBook::default();
        assert!(book.ask("@a:x"));
        assert!(!book.ask("@a:x"), "asked once until the keys come");
        let a = id(book.hold(ev("@a:x")));
        let b = id(book.hold(ev("@b:x")));
        let up = book.update("@a:x", UserKeys::default());
        assert_eq!(up.released.iter().map(|h| h.id).collect::<Vec<_>>(), [a]);
        assert_eq!(up.replaced_master, None);
        assert!(book.knows("@a:x") && !book.has_device("@a:x", "D"));
        assert!(book.ask("@a:x"), "a later need asks again");
        assert_eq!(book.release(b).map(|e| e.sender), Some("@b:x".into()));
        assert!(book.release(b).is_none());
    }

    #[test]
    fn a_replaced_master_key_is_reported() {
        let mut book = KeyBook::default();
        let k = |n: u8| Some(Ed25519PublicKey::from_bytes([n; 32]));
        let with = |msk| UserKeys { master_key: msk, ..UserKeys::default() };
        assert_eq!(book.update("@a:x", with(k(1))).replaced_master, None, "first keys replace nothing");
        assert_eq!(book.update("@a:x", with(k(1))).replaced_master, None, "the same key again");
        assert_eq!(book.update("@a:x", with(k(2))).replaced_master, k(1));
        assert_eq!(book.update("@a:x", with(None)).replaced_master, k(2));
        assert_eq!(book.update("@a:x", with(k(3))).replaced_master, None, "none known before");
    }

    #[test]
    fn one_sender_cannot_push_out_another() {
        let mut book = KeyBook::default();
        let alice = id(book.hold(ev("@alice:x")));
        for i in 0..100 {
            match book.hold(ev("@eve:x")) {
                Hold::Held { evicted, .. } => {
                    assert_eq!(evicted.is_some(), i >= MAX_HELD_PER_SENDER, "{i}");
                    assert!(evicted.is_none_or(|e| e.event.sender == "@eve:x"));
                }
                Hold::Refused(_) => panic!("Eve only displaces her own"),
            }
        }
        assert!(book.release(alice).is_some(), "Alice's event survived the flood");
    }

    #[test]
    fn holding_is_bounded_for_everyone_together() {
        let mut book = KeyBook::default();
        for i in 0..MAX_HELD {
            let sender = format!("@u{}:x", i % (MAX_HELD / MAX_HELD_PER_SENDER));
            assert!(matches!(book.hold(ev(&sender)), Hold::Held { evicted: None, .. }));
        }
        assert!(matches!(book.hold(ev("@late:x")), Hold::Refused(_)), "full: a newcomer is refused");
        // A sender at its quota still replaces its own oldest event.
        assert!(matches!(book.hold(ev("@u0:x")), Hold::Held { evicted: Some(_), .. }));
        assert_eq!(book.held.len(), MAX_HELD);
    }

    #[test]
    fn the_memory_of_asked_users_is_bounded() {
        let mut book = KeyBook::default();
        for i in 0..=MAX_ASKED {
            assert!(book.ask(&format!("@u{i}:x")));
        }
        assert!(book.asked.len() <= MAX_ASKED);
        assert!(!book.ask(&format!("@u{MAX_ASKED}:x")), "the newest ask is remembered");
    }
}
