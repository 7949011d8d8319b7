//! An in-memory homeserver between two machines: to-device delivery to named devices, and a room
//! whose events (with IDs and timestamps) reach both members, echoes included.
#![allow(dead_code)]

use std::collections::BTreeMap;

use mxverify_proto::*;
use serde_json::Value;

pub const ALICE: &str = "@alice:example.org";
pub const BOB: &str = "@bob:example.org";
pub const ROOM: &str = "!room:example.org";
pub const T0: u64 = 1_700_000_000_000;

/// A device and its keys.
#[derive(Clone, Debug)]
pub struct Dev {
    pub user: String,
    pub device: String,
    pub ed25519: String,
    pub msk: Option<String>,
    pub trusts_msk: bool,
}

/// Deterministic fake Ed25519-looking keys (the core only compares and MACs them).
pub fn fake_key(label: &str) -> String {
    use sha2::Digest;
    mxverify_proto::b64::encode(sha2::Sha256::digest(label.as_bytes()))
}

impl Dev {
    pub fn new(user: &str, device: &str) -> Self {
        Dev {
            user: user.into(),
            device: device.into(),
            ed25519: fake_key(&format!("{user}/{device}")),
            msk: Some(fake_key(&format!("{user}/msk"))),
            trusts_msk: true,
        }
    }
    pub fn identity(&self) -> OwnIdentity {
        OwnIdentity {
            user_id: self.user.clone(),
            device_id: self.device.clone(),
            ed25519: self.ed25519.clone(),
            master_key: self.msk.clone(),
            trusts_master_key: self.trusts_msk,
        }
    }
}

/// Which side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// A message in flight.
#[derive(Clone, Debug)]
pub struct Wire {
    pub from: Side,
    pub out: Outgoing,
}

/// The emoji names and decimals a side showed.
pub type Shown = (Option<Vec<String>>, Option<[u16; 3]>);

pub type Tamper = Box<dyn FnMut(&mut Wire) -> bool>;

pub struct Net {
    pub a: Machine,
    pub b: Machine,
    pub da: Dev,
    pub db: Dev,
    pub now: u64,
    pub events_a: Vec<Event>,
    pub events_b: Vec<Event>,
    /// Everything sent, in order.
    pub log: Vec<Wire>,
    /// Messages queued but not yet delivered.
    pub queue: Vec<Wire>,
    /// Returns `false` to drop the message.
    pub tamper: Option<Tamper>,
    next_event: u64,
}

pub fn keys_of(devs: &[&Dev]) -> UserKeys {
    let mut devices = BTreeMap::new();
    for d in devs {
        devices.insert(d.device.clone(), d.ed25519.clone());
    }
    UserKeys {
        devices,
        master_key: devs[0].msk.clone(),
        other_cross_signing_keys: vec![],
    }
}

impl Net {
    pub fn new(da: Dev, db: Dev) -> Self {
        Self::with_config(da, db, Config::default(), Config::default())
    }

    pub fn with_config(da: Dev, db: Dev, ca: Config, cb: Config) -> Self {
        let mut a = Machine::new(da.identity(), ca, Box::new(SeededEntropy::new(1)));
        let mut b = Machine::new(db.identity(), cb, Box::new(SeededEntropy::new(2)));
        // Each side knows the other's keys (and its own user's, for self-verification).
        let (ka, kb) = if da.user == db.user {
            let k = keys_of(&[&da, &db]);
            (k.clone(), k)
        } else {
            (keys_of(&[&db]), keys_of(&[&da]))
        };
        a.update_user_keys(&db.user, ka, T0);
        b.update_user_keys(&da.user, kb, T0);
        Net {
            a,
            b,
            da,
            db,
            now: T0,
            events_a: vec![],
            events_b: vec![],
            log: vec![],
            queue: vec![],
            tamper: None,
            next_event: 1,
        }
    }

    pub fn m(&mut self, side: Side) -> &mut Machine {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    pub fn dev(&self, side: Side) -> &Dev {
        match side {
            Side::A => &self.da,
            Side::B => &self.db,
        }
    }

    pub fn events(&self, side: Side) -> &Vec<Event> {
        match side {
            Side::A => &self.events_a,
            Side::B => &self.events_b,
        }
    }

    /// Moves everything both machines want to send into the queue, and drains their events.
    pub fn collect(&mut self) {
        for side in [Side::A, Side::B] {
            while let Some(out) = self.m(side).poll_outgoing() {
                self.log.push(Wire {
                    from: side,
                    out: out.clone(),
                });
                self.queue.push(Wire { from: side, out });
            }
            while let Some(e) = self.m(side).poll_event() {
                match side {
                    Side::A => self.events_a.push(e),
                    Side::B => self.events_b.push(e),
                }
            }
        }
    }

    /// Delivers one queued message (index `i`).
    pub fn deliver(&mut self, i: usize) {
        let mut w = self.queue.remove(i);
        if let Some(t) = self.tamper.as_mut()
            && !t(&mut w)
        {
            return;
        }
        let from = self.dev(w.from).clone();
        let to = w.from.other();
        let to_dev = self.dev(to).clone();
        let now = self.now;
        match &w.out.destination {
            Destination::ToDevice {
                user_id,
                device_ids,
            } => {
                if *user_id == to_dev.user
                    && device_ids.iter().any(|d| *d == to_dev.device || d == "*")
                {
                    let ev = IncomingEvent {
                        sender: from.user.clone(),
                        event_type: w.out.event_type.to_string(),
                        content: w.out.content.clone(),
                        room: None,
                    };
                    self.m(to).receive(ev, now);
                }
            }
            Destination::Room { room_id } => {
                let event_id = format!("$ev{}:example.org", self.next_event);
                self.next_event += 1;
                if w.out.flow.is_none() && w.out.event_type == "m.room.message" {
                    let _ = self.m(w.from).room_event_sent(w.out.id, &event_id, now);
                }
                let ctx = RoomContext {
                    room_id: room_id.clone(),
                    event_id,
                    origin_server_ts: now,
                    relates_to_fallback: None,
                };
                let ev = IncomingEvent {
                    sender: from.user.clone(),
                    event_type: w.out.event_type.to_string(),
                    content: w.out.content.clone(),
                    room: Some(ctx),
                };
                // The sender sees its own echo first, like a real sync.
                self.m(w.from).receive(ev.clone(), now);
                self.m(to).receive(ev, now);
            }
        }
    }

    /// Delivers in order until nothing is left.
    pub fn run(&mut self) {
        self.collect();
        let mut guard = 0;
        while !self.queue.is_empty() {
            self.deliver(0);
            self.collect();
            guard += 1;
            assert!(guard < 1000, "message storm");
        }
    }

    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
        let now = self.now;
        self.a.handle_timeout(now);
        self.b.handle_timeout(now);
        self.collect();
    }

    /// The flow key of the first request/started flow seen on `side`.
    pub fn flow_of(&self, side: Side) -> FlowKey {
        for e in self.events(side) {
            match e {
                Event::IncomingRequest { flow, .. }
                | Event::RequestSent { flow }
                | Event::Started { flow, .. } => {
                    return flow.clone();
                }
                _ => {}
            }
        }
        panic!("no flow on {side:?}: {:?}", self.events(side))
    }

    pub fn sas(&self, side: Side) -> Option<Shown> {
        self.events(side).iter().find_map(|e| match e {
            Event::Sas {
                emoji, decimals, ..
            } => Some((
                emoji
                    .as_ref()
                    .map(|v| v.iter().map(|e| e.description.to_string()).collect()),
                *decimals,
            )),
            _ => None,
        })
    }

    pub fn done(&self, side: Side) -> Option<Vec<VerifiedKey>> {
        self.events(side).iter().find_map(|e| match e {
            Event::Done { keys, .. } => Some(keys.clone()),
            _ => None,
        })
    }

    pub fn cancelled(&self, side: Side) -> Option<CancelInfo> {
        self.events(side).iter().find_map(|e| match e {
            Event::Cancelled { info, .. } => Some(info.clone()),
            _ => None,
        })
    }

    /// Every cancel that went on the wire, with its sender.
    pub fn cancels_sent(&self) -> Vec<(Side, String)> {
        self.log
            .iter()
            .filter(|w| w.out.event_type == "m.key.verification.cancel")
            .map(|w| {
                (
                    w.from,
                    w.out.content["code"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    pub fn sent_types(&self, side: Side) -> Vec<&'static str> {
        self.log
            .iter()
            .filter(|w| w.from == side)
            .map(|w| w.out.event_type)
            .collect()
    }

    /// Runs a whole request → ready → SAS → confirm exchange. `starter` starts SAS.
    pub fn request_and_accept(&mut self, in_room: bool) -> (FlowKey, FlowKey) {
        let now = self.now;
        let target_user = self.db.user.clone();
        let target_device = self.db.device.clone();
        if in_room {
            self.a.request_in_room(ROOM, &target_user, now);
        } else {
            self.a
                .request_to_device(&target_user, &[target_device], now)
                .unwrap();
        }
        self.run();
        let fb = self.flow_of(Side::B);
        self.b.accept(&fb, now).unwrap();
        self.run();
        (self.flow_of(Side::A), fb)
    }
}

/// Sets a JSON field of a message in flight.
pub fn set(w: &mut Wire, field: &str, v: Value) {
    w.out.content[field] = v;
}
