//! The flow table: every flow the machine remembers, in a slab of slots, with the indexes the
//! machine's questions need, so that no input scans all flows (a bridge may hold a million):
//!
//! * by key — the flow an event belongs to;
//! * by user — the flows in progress with a user (a changed identity ends them);
//! * by device — the flows in progress bound to a user's device (CX-03: a new attempt from that
//!   device cancels them);
//! * awaiting keys — the flows in progress that may act when keys arrive (`ready` and QR flows).
//!
//! The indexes store slot numbers only; the data lives once, in the slot. A flow taken out for a
//! transition is put back into the state-dependent indexes only if its new state moved it there:
//! most transitions (a `key`, a `mac`) change nothing the indexes see, and cost no hashing.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hash, RandomState};

use hashbrown::HashTable;

use super::timers::FlowId;
use crate::flow::{Flow, State};
use crate::types::FlowKey;

/// The flows and their indexes.
#[derive(Debug, Default)]
pub(crate) struct FlowTable {
    /// Slot `i` holds the flow whose handle is `FlowId(i)`; `None` while free or taken out.
    slots: Vec<Option<Flow>>,
    /// Free slots, reused last-freed first.
    free: Vec<u32>,
    by_key: HashTable<FlowId>,
    by_user: HashTable<FlowId>,
    by_device: HashTable<FlowId>,
    awaiting_keys: BTreeSet<FlowId>,
    /// By slot: the hash under which the flow is in `by_device`, if it is (its device string may
    /// be gone by the time the flow leaves the index).
    device_hash: Vec<u64>,
    /// Seeded per table, so that a peer cannot choose keys that collide (the hashes decide nothing
    /// the machine outputs: every list it returns is sorted).
    hasher: RandomState,
    len: usize,
}

/// Where a flow sits in the state-dependent indexes: in progress or not, awaiting keys or not, and
/// which device string it is bound to (its address and length: the string moves from state to
/// state without being copied, so the same address means the same device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    progress: bool,
    awaits: bool,
    device: Option<(usize, usize)>,
}

impl Placement {
    fn of(flow: &Flow) -> Placement {
        let progress = in_progress(&flow.state);
        Placement {
            progress,
            awaits: progress && awaits_keys(&flow.state),
            device: flow.state.device().filter(|_| progress).map(|d| (d.as_ptr() as usize, d.len())),
        }
    }
}

/// Whether a flow in this state is in the "in progress" indexes.
fn in_progress(state: &State) -> bool {
    !state.ended()
}

fn awaits_keys(state: &State) -> bool {
    matches!(state, State::Ready(_) | State::Qr(_))
}

impl FlowTable {
    fn hash_key(&self, key: &FlowKey) -> u64 {
        self.hasher.hash_one(key)
    }

    fn hash_user(&self, user: &str) -> u64 {
        self.hasher.hash_one(user)
    }

    fn hash_device(&self, user: &str, device: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        (user, device).hash(&mut h);
        std::hash::Hasher::finish(&h)
    }

    fn slot(&self, id: FlowId) -> Option<&Flow> {
        self.slots.get(id.0 as usize)?.as_ref()
    }

    /// The handle of the flow with this key.
    pub(crate) fn id(&self, key: &FlowKey) -> Option<FlowId> {
        let slots = &self.slots;
        let same = |id: &FlowId| slots[id.0 as usize].as_ref().is_some_and(|f| f.key == *key);
        self.by_key.find(self.hash_key(key), same).copied()
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
        let hash = self.hash_key(&flow.key);
        self.slots[id.0 as usize] = Some(flow);
        let Self { slots, by_key, hasher, .. } = self;
        by_key.insert_unique(hash, id, |i| slots[i.0 as usize].as_ref().map_or(0, |f| hasher.hash_one(&f.key)));
        self.enter(id);
        self.len += 1;
        id
    }

    /// Takes a flow out for a transition; [`FlowTable::put`] puts it back with the placement
    /// returned here. While out, the flow is found by no index.
    pub(crate) fn take(&mut self, id: FlowId) -> Option<(Flow, Placement)> {
        let flow = self.slots.get_mut(id.0 as usize)?.take()?;
        let placement = Placement::of(&flow);
        Some((flow, placement))
    }

    /// Puts back a flow taken out (its key and user unchanged), moving it between the
    /// state-dependent indexes only if its new state says so.
    pub(crate) fn put(&mut self, id: FlowId, flow: Flow, before: Placement) {
        let after = Placement::of(&flow);
        let user_hash = (after != before).then(|| self.hash_user(&flow.other_user));
        self.slots[id.0 as usize] = Some(flow);
        if let Some(user_hash) = user_hash {
            self.leave(id, user_hash, before);
            self.enter(id);
        }
    }

    /// Forgets a flow entirely; its slot is reused.
    pub(crate) fn forget(&mut self, id: FlowId) -> Option<Flow> {
        let (flow, placement) = self.take(id)?;
        self.leave(id, self.hash_user(&flow.other_user), placement);
        if let Ok(entry) = self.by_key.find_entry(self.hash_key(&flow.key), |i| *i == id) {
            entry.remove();
        }
        self.free.push(id.0);
        self.len -= 1;
        Some(flow)
    }

    /// Every flow's key, in slot order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &FlowKey> {
        self.slots.iter().flatten().map(|f| &f.key)
    }

    /// The flows in progress with `user`, in handle order.
    pub(crate) fn in_progress_with(&self, user: &str) -> Vec<FlowId> {
        let slots = &self.slots;
        let mut ids: Vec<FlowId> = self
            .by_user
            .iter_hash(self.hash_user(user))
            .copied()
            .filter(|id| slots[id.0 as usize].as_ref().is_some_and(|f| f.other_user == user))
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The flows in progress bound to `user`'s `device`, in handle order.
    pub(crate) fn in_progress_with_device(&self, user: &str, device: &str) -> Vec<FlowId> {
        let slots = &self.slots;
        let mut ids: Vec<FlowId> = self
            .by_device
            .iter_hash(self.hash_device(user, device))
            .copied()
            .filter(|id| {
                slots[id.0 as usize].as_ref().is_some_and(|f| f.other_user == user && f.state.device() == Some(device))
            })
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The flows that may act when keys arrive (`ready` and QR flows), in handle order; with
    /// `user`, only theirs.
    pub(crate) fn awaiting_keys(&self, user: Option<&str>) -> Vec<FlowId> {
        match user {
            None => self.awaiting_keys.iter().copied().collect(),
            Some(user) => {
                self.in_progress_with(user).into_iter().filter(|id| self.awaiting_keys.contains(id)).collect()
            }
        }
    }

    /// Enters the state-dependent indexes of the flow in slot `id`, as its state says.
    fn enter(&mut self, id: FlowId) {
        let Some(flow) = self.slot(id) else { return };
        if !in_progress(&flow.state) {
            return;
        }
        let user_hash = self.hash_user(&flow.other_user);
        let device_hash = flow.state.device().map(|d| self.hash_device(&flow.other_user, d));
        let awaits = awaits_keys(&flow.state);
        let Self { slots, by_user, by_device, awaiting_keys, device_hash: hashes, hasher, .. } = self;
        by_user.insert_unique(user_hash, id, |i| {
            slots[i.0 as usize].as_ref().map_or(0, |f| hasher.hash_one(f.other_user.as_str()))
        });
        if let Some(hash) = device_hash {
            let slot = id.0 as usize;
            if hashes.len() <= slot {
                hashes.resize(slot + 1, 0);
            }
            hashes[slot] = hash;
            by_device.insert_unique(hash, id, |i| hashes[i.0 as usize]);
        }
        if awaits {
            awaiting_keys.insert(id);
        }
    }

    /// Leaves the state-dependent indexes, where `before` says the flow in slot `id` (of the user
    /// with this hash) was.
    fn leave(&mut self, id: FlowId, user_hash: u64, before: Placement) {
        if !before.progress {
            return;
        }
        if let Ok(entry) = self.by_user.find_entry(user_hash, |i| *i == id) {
            entry.remove();
        }
        if before.device.is_some()
            && let Ok(entry) = self.by_device.find_entry(self.device_hash[id.0 as usize], |i| *i == id)
        {
            entry.remove();
        }
        if before.awaits {
            self.awaiting_keys.remove(&id);
        }
    }

    /// Whether every index agrees with the slots (for tests): each flow is found by its key, is
    /// in exactly the indexes its state says, and no index holds anything else.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut counts = (0, 0, 0, 0, 0);
        for (i, flow) in self.slots.iter().enumerate() {
            let Some(flow) = flow else { continue };
            let id = FlowId(i as u32);
            counts.0 += 1;
            if self.id(&flow.key) != Some(id) {
                return Err(format!("{:?} is not found by its key", flow.key));
            }
            let progress = in_progress(&flow.state);
            let with_user = self.in_progress_with(&flow.other_user).contains(&id);
            if with_user != progress {
                return Err(format!("{:?}: in the user index {with_user}, in progress {progress}", flow.key));
            }
            counts.1 += usize::from(progress);
            let bound = flow.state.device().filter(|_| progress);
            if let Some(device) = bound
                && !self.in_progress_with_device(&flow.other_user, device).contains(&id)
            {
                return Err(format!("{:?} is missing from the device index", flow.key));
            }
            counts.2 += usize::from(bound.is_some());
            let awaits = progress && awaits_keys(&flow.state);
            if self.awaiting_keys.contains(&id) != awaits {
                return Err(format!("{:?}: awaiting-keys index disagrees", flow.key));
            }
            counts.3 += usize::from(awaits);
        }
        counts.4 = self.free.len();
        let (flows, users, devices, awaiting, free) = counts;
        let sizes = (self.by_key.len(), self.by_user.len(), self.by_device.len(), self.awaiting_keys.len());
        if sizes != (flows, users, devices, awaiting) || self.len != flows || flows + free != self.slots.len() {
            return Err(format!(
                "index sizes {sizes:?}, expected {:?}; len {} of {} slots, {free} free",
                (flows, users, devices, awaiting),
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

    fn incoming(device: &str) -> State {
        State::Incoming(Incoming { device: device.into(), methods: vec![Method::SasV1] })
    }

    #[test]
    fn indexes_follow_the_state_and_slots_are_reused() {
        let mut t = FlowTable::default();
        let a = t.insert(flow("@a:x", "1", incoming("D1")));
        let b = t.insert(flow("@a:x", "2", State::Requested(Requested { devices: vec!["D1".into()] })));
        let c = t.insert(flow("@b:x", "3", incoming("D1")));
        t.check().unwrap();
        assert_eq!(t.in_progress_with("@a:x"), [a, b]);
        assert_eq!(t.in_progress_with_device("@a:x", "D1"), [a], "a request not yet answered is bound to no device");
        assert_eq!(t.in_progress_with_device("@b:x", "D1"), [c]);
        assert!(t.awaiting_keys(None).is_empty());

        // A transition: the flow leaves the state indexes while out, and enters as its new state says.
        let (mut f, placement) = t.take(a).unwrap();
        assert!(t.in_progress_with("@a:x") == [b] && t.id(&f.key).is_none(), "a flow taken out is not found");
        f.state = State::Ready(Ready { device: "D2".into(), methods: vec![], shown: None });
        t.put(a, f, placement);
        t.check().unwrap();
        assert_eq!(t.in_progress_with_device("@a:x", "D2"), [a]);
        assert!(t.in_progress_with_device("@a:x", "D1").is_empty());
        assert_eq!(t.awaiting_keys(Some("@a:x")), [a]);
        assert!(t.awaiting_keys(Some("@b:x")).is_empty());

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
        let mut t = FlowTable::default();
        let a = t.insert(flow("@a:x", "1", incoming("D1")));
        t.check().unwrap();
        let hash = t.hash_user("@a:x");
        t.by_user.find_entry(hash, |i| *i == a).unwrap().remove();
        assert!(t.check().unwrap_err().contains("user index"));

        let mut t = FlowTable::default();
        let a = t.insert(flow("@a:x", "1", incoming("D1")));
        t.awaiting_keys.insert(a);
        assert!(t.check().unwrap_err().contains("awaiting-keys"));
    }

    /// Many flows of one user, and many devices: the device index answers for one device only.
    #[test]
    fn many_flows_of_one_user() {
        let mut t = FlowTable::default();
        let ids: Vec<FlowId> =
            (0..1000).map(|i| t.insert(flow("@eve:x", &i.to_string(), incoming(&format!("D{i}"))))).collect();
        assert_eq!(t.in_progress_with_device("@eve:x", "D500"), [ids[500]]);
        assert_eq!(t.in_progress_with("@eve:x"), ids);
        t.check().unwrap();
    }
}
