//! Two machines wired together in memory: a stand-in homeserver that delivers to-device messages to
//! the named device and room events (with event IDs, and echoes to the sender) to both members,
//! each parsed from the JSON text the sender wrote, as over a wire
//! ([spec: key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)).
//! Used by `mxverify demo`, the benchmarks and the tests; no I/O, and time is whatever the caller
//! says it is. Only with the `loopback` feature.
//!
//! ```
//! use mxverify_proto::loopback::{Loopback, Side};
//! use mxverify_proto::*;
//!
//! let id = |user: &str, device: &str| OwnIdentity {
//!     user_id: user.into(),
//!     device_id: device.into(),
//!     ed25519: Ed25519PublicKey::from_bytes([device.len() as u8; 32]),
//!     master_key: None,
//!     trusts_master_key: false,
//! };
//! let alice = Machine::new(id("@alice:example.org", "A"), Config::default(), Box::new(SeededEntropy::new(1)));
//! let bob = Machine::new(id("@bob:example.org", "BB"), Config::default(), Box::new(SeededEntropy::new(2)));
//! let mut net = Loopback::new(alice, bob, 1_700_000_000_000);
//! net.exchange_device_keys();
//! let flow_a = net.a.request_to_device("@bob:example.org", &["BB".into()], net.now).unwrap();
//! net.run();
//! let flow_b = net.flow_of(Side::B).unwrap();
//! net.b.accept(&flow_b, net.now).unwrap();
//! net.run();
//! net.a.start_sas(&flow_a, net.now).unwrap();
//! net.run();
//! net.a.confirm(&flow_a, net.now).unwrap();
//! net.b.confirm(&flow_b, net.now).unwrap();
//! net.run();
//! assert_eq!(net.events.iter().filter(|(_, e)| matches!(e, Event::Done { .. })).count(), 2);
//! ```

use crate::machine::Machine;
use crate::types::*;

/// Which of the two machines.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Side {
    /// The first machine.
    A,
    /// The second machine.
    B,
}

impl Side {
    /// The other one.
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// A message on its way.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq)]
pub struct InFlight {
    /// Who sent it.
    pub from: Side,
    /// What was sent.
    pub out: Outgoing,
}

/// A filter on the wire: may change a message, or return `false` to drop it.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
pub type Filter = Box<dyn FnMut(&mut InFlight) -> bool>;

/// Two machines and the messages between them.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
pub struct Loopback {
    /// The first machine.
    pub a: Machine,
    /// The second machine.
    pub b: Machine,
    /// The shared clock (milliseconds).
    pub now: Millis,
    /// Messages sent and not yet delivered, oldest first.
    pub queue: Vec<InFlight>,
    /// Every message sent, in order (while [`Loopback::keep_log`] is set).
    pub log: Vec<InFlight>,
    /// Whether [`Loopback::log`] records messages (the default); benchmarks turn it off, since a
    /// copy of every message is the test harness's cost, not the protocol's.
    pub keep_log: bool,
    /// Every event either machine emitted, in order.
    pub events: Vec<(Side, Event)>,
    /// Applied to each message as it is delivered.
    pub filter: Option<Filter>,
    next_event: u64,
}

impl Loopback {
    /// Wires two machines together at time `now`.
    pub fn new(a: Machine, b: Machine, now: Millis) -> Self {
        // Room for a whole verification's messages and events up front: growing the harness's
        // own lists is not the protocol's cost.
        let (queue, events) = (Vec::with_capacity(16), Vec::with_capacity(32));
        Self { a, b, now, queue, log: vec![], keep_log: true, events, filter: None, next_event: 1 }
    }

    /// Gives each machine the other's device key and master key (and, for two devices of one
    /// user, both devices), as a homeserver's `/keys/query` would.
    pub fn exchange_device_keys(&mut self) {
        let (ia, ib) = (self.a.own_identity().clone(), self.b.own_identity().clone());
        let keys_of = |ids: &[&OwnIdentity]| UserKeys {
            devices: ids.iter().map(|i| (i.device_id.clone(), i.ed25519.clone())).collect(),
            master_key: ids[0].master_key.clone(),
            other_cross_signing_keys: vec![],
        };
        let (for_a, for_b) = if ia.user_id == ib.user_id {
            (keys_of(&[&ia, &ib]), keys_of(&[&ia, &ib]))
        } else {
            (keys_of(&[&ib]), keys_of(&[&ia]))
        };
        let now = self.now;
        self.a.update_user_keys(&ib.user_id, for_a, now);
        self.b.update_user_keys(&ia.user_id, for_b, now);
    }

    /// One of the machines.
    pub fn machine(&mut self, side: Side) -> &mut Machine {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    /// Moves what both machines want to send into the queue, and their events into `events`.
    pub fn collect(&mut self) {
        for side in [Side::A, Side::B] {
            while let Some(out) = self.machine(side).poll_outgoing() {
                if self.keep_log {
                    self.log.push(InFlight { from: side, out: out.clone() });
                }
                self.queue.push(InFlight { from: side, out });
            }
            while let Some(e) = self.machine(side).poll_event() {
                self.events.push((side, e));
            }
        }
    }

    /// Delivers the queued message at `index` (through the filter), then collects.
    pub fn deliver(&mut self, index: usize) {
        let mut msg = self.queue.remove(index);
        if let Some(filter) = self.filter.as_mut()
            && !filter(&mut msg)
        {
            return;
        }
        let to = msg.from.other();
        let sender = self.machine(msg.from).own_identity().user_id.clone();
        let now = self.now;
        match &msg.out.destination {
            Destination::ToDevice { user_id, device_ids } => {
                let receiver = self.machine(to).own_identity();
                if *user_id == receiver.user_id && device_ids.iter().any(|d| *d == receiver.device_id || d == "*") {
                    let ev = IncomingEvent {
                        sender,
                        event_type: msg.out.event_type.to_owned(),
                        content: msg.out.content.to_value(),
                        room: None,
                    };
                    self.machine(to).receive(ev, now);
                }
            }
            Destination::Room { room_id } => {
                let event_id = format!("${}:loopback", self.next_event);
                self.next_event += 1;
                if msg.out.flow.is_none() && msg.out.event_type == "m.room.message" {
                    // The homeserver's answer to the send gives the request its event ID.
                    let _ = self.machine(msg.from).room_event_sent(msg.out.id, &event_id, now);
                }
                let room = RoomContext {
                    room_id: room_id.clone(),
                    event_id,
                    origin_server_ts: now,
                    relates_to_fallback: None,
                };
                let ev = IncomingEvent {
                    sender,
                    event_type: msg.out.event_type.to_owned(),
                    content: msg.out.content.to_value(),
                    room: Some(room),
                };
                // Like a real sync, the sender sees its own event too.
                self.machine(msg.from).receive(ev.clone(), now);
                self.machine(to).receive(ev, now);
            }
        }
        self.collect();
    }

    /// Delivers everything, oldest first, until both machines are quiet.
    pub fn run(&mut self) {
        self.collect();
        while !self.queue.is_empty() {
            self.deliver(0);
        }
    }

    /// Moves the clock forward and lets both machines handle what became due.
    pub fn advance(&mut self, ms: Millis) {
        self.now += ms;
        let now = self.now;
        self.a.handle_timeout(now);
        self.b.handle_timeout(now);
        self.collect();
    }

    /// The first flow `side` heard of (a request it got or sent, or a start).
    pub fn flow_of(&self, side: Side) -> Option<FlowKey> {
        self.events.iter().find_map(|(s, e)| match e {
            Event::IncomingRequest { flow, .. } | Event::RequestSent { flow } | Event::Started { flow, .. }
                if *s == side =>
            {
                Some(flow.clone())
            }
            _ => None,
        })
    }

    /// The pair the benchmarks time: `@alice:example.org`/`ALICEDEVICE` and
    /// `@bob:example.org`/`BOBDEVICE`, each with a master key it trusts, their entropy seeded
    /// with `seed` and `seed + 1`, knowing each other's keys at `now`; no log is kept. (With the
    /// `seeded-entropy` feature.)
    #[cfg(feature = "seeded-entropy")]
    #[must_use]
    pub fn benchmark_pair(seed: u64, now: Millis) -> Loopback {
        let identity = |user: &str, device: &str| OwnIdentity {
            user_id: user.into(),
            device_id: device.into(),
            ed25519: crate::keys::Ed25519PublicKey::from_bytes([device.len() as u8; 32]),
            master_key: Some(crate::keys::Ed25519PublicKey::from_bytes([user.len() as u8 + 100; 32])),
            trusts_master_key: true,
        };
        let machine = |user, device, seed| {
            Machine::new(identity(user, device), Config::default(), Box::new(SeededEntropy::new(seed)))
        };
        let a = machine("@alice:example.org", "ALICEDEVICE", seed);
        let b = machine("@bob:example.org", "BOBDEVICE", seed + 1);
        let mut net = Loopback::new(a, b, now);
        net.keep_log = false;
        net.exchange_device_keys();
        net
    }

    /// One complete SAS verification over to-device messages, request to both `done`: A requests
    /// B's device, B accepts, A starts SAS, both users confirm. Panics unless both sides report
    /// [`Event::Done`] (for tests and benchmarks).
    pub fn full_sas(&mut self) {
        let device = self.b.own_identity().device_id.clone();
        let user = self.b.own_identity().user_id.clone();
        let now = self.now;
        let fa = self.a.request_to_device(&user, &[device], now).expect("a request to one device");
        self.run();
        let fb = self.flow_of(Side::B).expect("B heard of the request");
        self.b.accept(&fb, now).expect("B accepts");
        self.run();
        self.a.start_sas(&fa, now).expect("A starts SAS");
        self.run();
        self.a.confirm(&fa, now).expect("A confirms");
        self.b.confirm(&fb, now).expect("B confirms");
        self.run();
        let done = self.events.iter().filter(|(_, e)| matches!(e, Event::Done { .. })).count();
        assert_eq!(done, 2, "both sides verified");
    }
}
