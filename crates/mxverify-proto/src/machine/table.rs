//! The flow table: every flow the machine remembers, in a slab of slots, with the indexes the
//! machine's questions need, so that no input scans all flows (a bridge may hold a million):
//!
//! * by key — the flow an event belongs to;
//! * by user — the flows with a user: a changed identity ends those in progress, and CX-03 (a new
//!   attempt from a device cancels those in progress) looks among them for the device's. The
//!   machine keeps at most `FLOWS_PER_USER` flows a peer opened with one user, so this stays a
//!   short list (a device index of its own cost every new request two more cache misses).
//!
//! The indexes store slot numbers only; the data lives once, in the slot. A flow enters them when
//! it is created and leaves them when it is forgotten, not when it ends: the questions filter on
//! the state they read anyway, so a transition touches no index. With a million flows every index
//! access is a cache miss, so the fewer the better.
//!
//! One set follows the state instead: the flows that keys arriving may move on (a ready flow that
//! may show a QR code, a scan waiting to be checked). Our own keys concern every user's flows, and
//! a homeserver decides how often they change; without the set, each change read every flow.
//! Few flows are ever in it, and a transition that neither enters nor leaves it does not touch it.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use super::timers::FlowId;
use crate::flow::{Flow, State};
use crate::types::FlowKey;
use crate::wire::Method;

/// The flows and their indexes.
#[derive(Debug)]
pub(crate) struct FlowTable {
    /// Slot `i` holds the flow whose handle is `FlowId(i)`; `None` while free or taken out.
    slots: Vec<Option<Flow>>,
    /// Free slots, reused last-freed first.
    free: Vec<u32>,
    by_key: HashTable<FlowId>,
    by_user: HashTable<FlowId>,
    /// Seeded per table, so that a peer cannot choose keys that collide (the hashes decide nothing
    /// the machine outputs: every list it returns is sorted).
    hasher: RandomState,
    len: usize,
    /// The flows for which [`State::awaits_keys`] holds, kept in step at each insert and put.
    awaiting: BTreeSet<FlowId>,
    /// Our methods, which that depends on.
    ours: Vec<Method>,
}

/// A key's parts, as the key index hashes and compares them.
fn parts(key: &FlowKey) -> (bool, &str, &str) {
    match key {
        FlowKey::ToDevice { user_id, transaction_id } => (false, user_id, transaction_id),
        FlowKey::Room { room_id, event_id } => (true, room_id, event_id),
    }
}

/// The hash under which a flow is in the key index: that of its key's parts, so that
/// [`FlowTable::find`] hashes the parts of an incoming event alike.
fn hash_key(hasher: &RandomState, key: &FlowKey) -> u64 {
    hasher.hash_one(parts(key))
}

impl FlowTable {
    /// An empty table, for a machine offering `ours`.
    pub(crate) fn new(ours: Vec<Method>) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashTable::new(),
            by_user: HashTable::new(),
            hasher: RandomState::new(),
            len: 0,
            awaiting: BTreeSet::new(),
            ours,
        }
    }

    fn hash_key(&self, key: &FlowKey) -> u64 {
        hash_key(&self.hasher, key)
    }

    fn hash_user(&self, user: &str) -> u64 {
        self.hasher.hash_one(user)
    }

    fn slot(&self, id: FlowId) -> Option<&Flow> {
        self.slots.get(id.0 as usize)?.as_ref()
    }

    /// The handle of the flow with this key.
    pub(crate) fn id(&self, key: &FlowKey) -> Option<FlowId> {
        let (room, scope, id) = parts(key);
        self.find(room, scope, id)
    }

    /// The handle of the flow with this key, given in parts (so that an incoming event finds its
    /// flow without building a key): in a room or not, the user or room, the flow id.
    pub(crate) fn find(&self, room: bool, scope: &str, flow_id: &str) -> Option<FlowId> {
        let slots = &self.slots;
        let same = |id: &FlowId| slots[id.0 as usize].as_ref().is_some_and(|f| parts(&f.key) == (room, scope, flow_id));
        self.by_key.find(self.hasher.hash_one((room, scope, flow_id)), same).copied()
    }

    pub(crate) fn get(&self, key: &FlowKey) -> Option<&Flow> {
        self.slot(self.id(key)?)
    }

    pub(crate) fn by_id(&self, id: FlowId) -> Option<&Flow> {
        self.slot(id)
    }

    /// A flow, to change what no index depends on (its origin).
    pub(crate) fn get_mut(&mut self, id: FlowId) -> Option<&mut Flow> {
        self.slots.get_mut(id.0 as usize)?.as_mut()
    }

    /// How many flows the table remembers.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Adds a flow (its key must be new).
    pub(crate) fn insert(&mut self, flow: Flow) -> FlowId {
        let id = match self.free.pop() {
            Some(i) => FlowId(i),
            None => {
                self.slots.push(None);
                FlowId(u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 flows"))
            }
        };
        let (key_hash, user_hash) = (self.hash_key(&flow.key), self.hash_user(&flow.other_user));
        self.follow_state(id, &flow.state);
        self.slots[id.0 as usize] = Some(flow);
        let Self { slots, by_key, by_user, hasher, .. } = self;
        let flow_of = |i: &FlowId| slots[i.0 as usize].as_ref();
        by_key.insert_unique(key_hash, id, |i| flow_of(i).map_or(0, |f| hash_key(hasher, &f.key)));
        by_user.insert_unique(user_hash, id, |i| flow_of(i).map_or(0, |f| hasher.hash_one(f.other_user.as_str())));
        self.len += 1;
        id
    }

    /// Takes a flow out for a transition; [`FlowTable::put`] puts it back. While out, the flow is
    /// found by no index.
    pub(crate) fn take(&mut self, id: FlowId) -> Option<Flow> {
        self.slots.get_mut(id.0 as usize)?.take()
    }

    /// Puts back a flow taken out (its key and user unchanged).
    pub(crate) fn put(&mut self, id: FlowId, flow: Flow) {
        self.follow_state(id, &flow.state);
        self.slots[id.0 as usize] = Some(flow);
    }

    /// Enters a flow in the set of those awaiting keys, or takes it out, as its state says.
    fn follow_state(&mut self, id: FlowId, state: &State) {
        if state.awaits_keys(&self.ours) {
            self.awaiting.insert(id);
        } else if !self.awaiting.is_empty() {
            self.awaiting.remove(&id);
        }
    }

    /// Forgets a flow entirely; its slot is reused.
    pub(crate) fn forget(&mut self, id: FlowId) -> Option<Flow> {
        let flow = self.take(id)?;
        if let Ok(entry) = self.by_key.find_entry(self.hash_key(&flow.key), |i| *i == id) {
            entry.remove();
        }
        if let Ok(entry) = self.by_user.find_entry(self.hash_user(&flow.other_user), |i| *i == id) {
            entry.remove();
        }
        self.awaiting.remove(&id);
        self.free.push(id.0);
        self.len -= 1;
        Some(flow)
    }

    /// Every flow with its handle, in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (FlowId, &Flow)> {
        self.slots.iter().enumerate().filter_map(|(i, f)| Some((FlowId(i as u32), f.as_ref()?)))
    }

    /// Every flow's key, in slot order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &FlowKey> {
        self.iter().map(|(_, f)| &f.key)
    }

    /// Every flow the table remembers with `user`, ended ones included, in handle order.
    pub(crate) fn with_user(&self, user: &str) -> Vec<FlowId> {
        self.of_user(user, |_| true)
    }

    /// The flows in progress with `user`, in handle order.
    pub(crate) fn in_progress_with(&self, user: &str) -> Vec<FlowId> {
        self.of_user(user, |f| !f.state.ended())
    }

    /// Of `flows` (a user's, from [`FlowTable::with_user`]), those in progress bound to their
    /// `device`, in the same order.
    pub(crate) fn in_progress_on(&self, flows: &[FlowId], device: &str) -> Vec<FlowId> {
        let bound_there = |f: &Flow| f.state.device() == Some(device) && !f.state.ended();
        flows.iter().copied().filter(|id| self.slot(*id).is_some_and(bound_there)).collect()
    }

    /// The flows in progress bound to `user`'s `device`, in handle order.
    #[cfg(test)]
    fn in_progress_with_device(&self, user: &str, device: &str) -> Vec<FlowId> {
        self.in_progress_on(&self.with_user(user), device)
    }

    /// The flows with `user` that satisfy `keep`, in handle order (under a user's hash the index
    /// may hold other users' flows too).
    fn of_user(&self, user: &str, keep: impl Fn(&Flow) -> bool) -> Vec<FlowId> {
        let with_user = |f: &Flow| f.other_user == user && keep(f);
        let mut ids: Vec<FlowId> = self
            .by_user
            .iter_hash(self.hash_user(user))
            .copied()
            .filter(|id| self.slot(*id).is_some_and(with_user))
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The flows that keys arriving may move on ([`State::awaits_keys`]), in handle order; with
    /// `user`, only theirs (for our own keys, every user's).
    pub(crate) fn awaiting_keys(&self, user: Option<&str>) -> Vec<FlowId> {
        match user {
            None => self.awaiting.iter().copied().collect(),
            Some(user) => self.in_progress_with(user).into_iter().filter(|id| self.awaiting.contains(id)).collect(),
        }
    }

    /// Whether every index agrees with the slots (for tests): each flow is found by its key and
    /// its user, and no index holds anything else.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut flows = 0;
        for (id, flow) in self.iter() {
            flows += 1;
            if self.id(&flow.key) != Some(id) {
                return Err(format!("{:?} is not found by its key", flow.key));
            }
            if !self.by_user.iter_hash(self.hash_user(&flow.other_user)).any(|x| *x == id) {
                return Err(format!("{:?} is not in the user index", flow.key));
            }
            if self.awaiting.contains(&id) != flow.state.awaits_keys(&self.ours) {
                return Err(format!(
                    "{:?} ({}) is wrongly in or out of the set awaiting keys",
                    flow.key,
                    flow.state.name()
                ));
            }
        }
        if let Some(id) = self.awaiting.iter().find(|id| self.slot(**id).is_none()) {
            return Err(format!("slot {} holds no flow but awaits keys", id.0));
        }
        let free = self.free.len();
        let sizes = (self.by_key.len(), self.by_user.len());
        if sizes != (flows, flows) || self.len != flows || flows + free != self.slots.len() {
            return Err(format!(
                "index sizes {sizes:?}, expected {:?}; len {} of {} slots, {free} free",
                (flows, flows),
                self.len,
                self.slots.len()
            ));
        }
        if self.free.iter().any(|&i| self.slots[i as usize].is_some()) {
            return Err("a free slot holds a flow".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Incoming, Origin, Ready, Requested};
    use crate::wire::Method;

    fn flow(user: &str, txn: &str, state: State) -> Flow {
        Flow {
            key: FlowKey::ToDevice { user_id: user.into(), transaction_id: txn.into() },
            other_user: user.into(),
            origin: Origin::TheirRequest { ready_echoed: false },
            state,
        }
    }

    /// A table for a machine that offers SAS and both QR methods.
    fn table() -> FlowTable {
        FlowTable::new(vec![Method::SasV1, Method::QrShowV1, Method::QrScanV1, Method::ReciprocateV1])
    }

    /// A ready flow whose device offered `methods`, showing no code.
    fn ready(device: &str, methods: &[Method]) -> State {
        State::Ready(Ready { device: device.into(), methods: methods.to_vec().into(), shown: None })
    }

    fn incoming(device: &str) -> State {
        State::Incoming(Incoming { device: device.into(), methods: vec![Method::SasV1].into() })
    }

    #[test]
    fn indexes_follow_the_state_and_slots_are_reused() {
        let mut t = table();
        let a = t.insert(flow("@a:x", "1", incoming("D1")));
        let b = t.insert(flow("@a:x", "2", State::Requested(Requested { devices: vec!["D1".into()] })));
        let c = t.insert(flow("@b:x", "3", incoming("D1")));
        t.check().unwrap();
        assert_eq!(t.in_progress_with("@a:x"), [a, b]);
        assert_eq!(t.in_progress_with_device("@a:x", "D1"), [a], "a request not yet answered is bound to no device");
        assert_eq!(t.in_progress_with_device("@b:x", "D1"), [c]);
        assert!(t.awaiting_keys(None).is_empty());

        // A transition: while out the flow is found by no index.
        let mut f = t.take(a).unwrap();
        assert!(t.in_progress_with("@a:x") == [b] && t.id(&f.key).is_none(), "a flow taken out is not found");
        f.state = ready("D1", &[Method::SasV1, Method::QrScanV1, Method::ReciprocateV1]);
        t.put(a, f);
        t.check().unwrap();
        assert_eq!(t.in_progress_with_device("@a:x", "D1"), [a]);
        assert_eq!(t.awaiting_keys(Some("@a:x")), [a], "it may show a QR code once the keys are known");
        assert_eq!(t.awaiting_keys(None), [a]);
        assert!(t.awaiting_keys(Some("@b:x")).is_empty());

        // Our request answered by one of the devices it went to: now bound to that device. It
        // offered SAS only, so no keys will let it show a code.
        let mut f = t.take(b).unwrap();
        f.state = ready("D2", &[Method::SasV1]);
        t.put(b, f);
        t.check().unwrap();
        assert_eq!(t.awaiting_keys(None), [a]);
        assert_eq!(t.in_progress_with_device("@a:x", "D2"), [b]);
        assert_eq!(t.in_progress_with_device("@a:x", "D1"), [a]);

        // An ended flow stays in the indexes until forgotten, but no question finds it.
        let mut f = t.take(c).unwrap();
        f.state = State::Done(crate::flow::Finished { device: "D1".into(), keys: vec![] });
        t.put(c, f);
        t.check().unwrap();
        assert!(t.in_progress_with("@b:x").is_empty() && t.in_progress_with_device("@b:x", "D1").is_empty());
        // A flow that leaves the set by a transition, and one forgotten while in it.
        let mut f = t.take(a).unwrap();
        f.state = State::Done(crate::flow::Finished { device: "D1".into(), keys: vec![] });
        t.put(a, f);
        t.check().unwrap();
        assert!(t.awaiting_keys(None).is_empty() && t.awaiting_keys(Some("@a:x")).is_empty());
        let mut f = t.take(c).unwrap();
        f.state = ready("D1", &[Method::QrScanV1, Method::ReciprocateV1]);
        t.put(c, f);
        assert_eq!(t.awaiting_keys(None), [c]);
        t.forget(c).unwrap();
        assert!(t.awaiting_keys(None).is_empty());
        t.check().unwrap();
        let c = t.insert(flow("@b:x", "3", State::Done(crate::flow::Finished { device: "D1".into(), keys: vec![] })));
        let key = t.by_id(c).unwrap().key.clone();
        assert!(t.forget(c).is_some() && t.forget(c).is_none());
        assert!(t.id(&key).is_none() && t.in_progress_with("@b:x").is_empty());
        let d = t.insert(flow("@c:x", "4", incoming("D3")));
        assert_eq!(d, c, "the freed slot is reused");
        t.check().unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.keys().count(), 3);
    }

    #[test]
    fn the_check_finds_an_index_that_disagrees() {
        let mut t = table();
        let a = t.insert(flow("@a:x", "1", incoming("D1")));
        t.check().unwrap();
        let hash = t.hash_user("@a:x");
        t.by_user.find_entry(hash, |i| *i == a).unwrap().remove();
        assert!(t.check().unwrap_err().contains("user index"));

        let mut t = table();
        let a = t.insert(flow("@a:x", "1", incoming("D1")));
        let hash = t.hash_key(&t.by_id(a).unwrap().key.clone());
        t.by_key.find_entry(hash, |i| *i == a).unwrap().remove();
        assert!(t.check().unwrap_err().contains("not found by its key"));

        // The set awaiting keys: a flow missing from it, one in it wrongly, one forgotten.
        let mut t = table();
        let a = t.insert(flow("@a:x", "1", ready("D1", &[Method::QrScanV1, Method::ReciprocateV1])));
        t.check().unwrap();
        t.awaiting.clear();
        assert!(t.check().unwrap_err().contains("awaiting keys"));
        let mut t = table();
        let a2 = t.insert(flow("@a:x", "1", incoming("D1")));
        t.awaiting.insert(a2);
        assert!(t.check().unwrap_err().contains("awaiting keys"));
        t.awaiting.clear();
        t.awaiting.insert(FlowId(a.0 + 7));
        assert!(t.check().unwrap_err().contains("holds no flow"));
    }

    /// A machine that offers SAS only never shows a QR code: none of its flows await keys, however
    /// many QR methods the other device offers.
    #[test]
    fn without_qr_no_flow_awaits_keys() {
        let mut t = FlowTable::new(vec![Method::SasV1]);
        let all = [Method::SasV1, Method::QrShowV1, Method::QrScanV1, Method::ReciprocateV1];
        t.insert(flow("@a:x", "1", ready("D1", &all)));
        assert!(t.awaiting_keys(None).is_empty() && t.awaiting_keys(Some("@a:x")).is_empty());
        t.check().unwrap();
    }

    /// Many flows of one user, and many devices: a device's flows are told apart among them.
    #[test]
    fn many_flows_of_one_user() {
        let mut t = table();
        let ids: Vec<FlowId> =
            (0..1000).map(|i| t.insert(flow("@eve:x", &i.to_string(), incoming(&format!("D{i}"))))).collect();
        assert_eq!(t.in_progress_with_device("@eve:x", "D500"), [ids[500]]);
        assert_eq!(t.in_progress_with("@eve:x"), ids);
        t.check().unwrap();
    }
}
