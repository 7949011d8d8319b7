//! An in-memory homeserver between two machines: to-device delivery to named devices, and a room
//! whose events (with IDs and timestamps) reach both members, echoes included.
#![allow(dead_code)]

use std::collections::BTreeMap;

use mxverify_proto::loopback::Loopback;
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
    pub ed25519: Ed25519PublicKey,
    pub msk: Option<Ed25519PublicKey>,
    pub trusts_msk: bool,
}

/// Deterministic Ed25519 public keys (valid curve points, as QR codes need), from a label.
pub fn fake_key(label: &str) -> Ed25519PublicKey {
    use sha2::Digest;
    let seed: [u8; 32] = sha2::Sha256::digest(label.as_bytes()).into();
    Ed25519PublicKey::from_bytes(vodozemac::Ed25519SecretKey::from_slice(&seed).public_key().as_bytes().to_owned())
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
    /// A device that does not trust its user's master key (for QR mode 0x02).
    pub fn untrusting(mut self) -> Self {
        self.trusts_msk = false;
        self
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

pub use mxverify_proto::loopback::{InFlight as Wire, Side};

pub type Tamper = mxverify_proto::loopback::Filter;

/// The emoji names and decimals a side showed.
pub type Shown = (Option<Vec<String>>, Option<[u16; 3]>);

/// The library's loopback plus what the tests know about both devices.
pub struct Net {
    pub lb: Loopback,
    pub da: Dev,
    pub db: Dev,
}

impl std::ops::Deref for Net {
    type Target = Loopback;
    fn deref(&self) -> &Loopback {
        &self.lb
    }
}

impl std::ops::DerefMut for Net {
    fn deref_mut(&mut self) -> &mut Loopback {
        &mut self.lb
    }
}

pub fn keys_of(devs: &[&Dev]) -> UserKeys {
    let mut devices = BTreeMap::new();
    for d in devs {
        devices.insert(d.device.clone(), d.ed25519.clone());
    }
    UserKeys { devices, master_key: devs[0].msk.clone(), other_cross_signing_keys: vec![] }
}

impl Net {
    pub fn new(da: Dev, db: Dev) -> Self {
        Self::with_config(da, db, Config::default(), Config::default())
    }

    pub fn with_config(da: Dev, db: Dev, ca: Config, cb: Config) -> Self {
        let a = Machine::new(da.identity(), ca, Box::new(SeededEntropy::new(1)));
        let b = Machine::new(db.identity(), cb, Box::new(SeededEntropy::new(2)));
        let mut lb = Loopback::new(a, b, T0);
        lb.exchange_device_keys();
        Net { lb, da, db }
    }

    pub fn m(&mut self, side: Side) -> &mut Machine {
        self.lb.machine(side)
    }

    pub fn dev(&self, side: Side) -> &Dev {
        if side == Side::A { &self.da } else { &self.db }
    }

    pub fn set_tamper(&mut self, f: impl FnMut(&mut Wire) -> bool + 'static) {
        self.lb.filter = Some(Box::new(f));
    }

    pub fn events(&self, side: Side) -> Vec<&Event> {
        self.lb.events.iter().filter(|(s, _)| *s == side).map(|(_, e)| e).collect()
    }

    /// The flow key of the first request/started flow seen on `side`.
    pub fn flow_of(&self, side: Side) -> FlowKey {
        self.lb.flow_of(side).unwrap_or_else(|| panic!("no flow on {side:?}: {:?}", self.events(side)))
    }

    pub fn sas(&self, side: Side) -> Option<Shown> {
        self.events(side).iter().find_map(|e| match e {
            Event::Sas { emoji, decimals, .. } => {
                Some((emoji.as_ref().map(|v| v.iter().map(|e| e.description.to_string()).collect()), *decimals))
            }
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
        self.lb
            .log
            .iter()
            .filter(|w| w.out.event_type == "m.key.verification.cancel")
            .map(|w| (w.from, w.out.content.to_value()["code"].as_str().unwrap_or("").to_owned()))
            .collect()
    }

    pub fn sent_types(&self, side: Side) -> Vec<&'static str> {
        self.lb.log.iter().filter(|w| w.from == side).map(|w| w.out.event_type).collect()
    }

    /// Runs a whole request → ready → SAS → confirm exchange. `starter` starts SAS.
    pub fn request_and_accept(&mut self, in_room: bool) -> (FlowKey, FlowKey) {
        let now = self.lb.now;
        let target_user = self.db.user.clone();
        let target_device = self.db.device.clone();
        if in_room {
            self.lb.a.request_in_room(ROOM, &target_user, now);
        } else {
            self.lb.a.request_to_device(&target_user, &[target_device], now).unwrap();
        }
        self.run();
        let fb = self.flow_of(Side::B);
        self.lb.b.accept(&fb, now).unwrap();
        self.run();
        (self.flow_of(Side::A), fb)
    }
}

/// A to-device event as the homeserver delivers it.
pub fn to_device(sender: &str, event_type: &str, content: Value) -> IncomingEvent {
    IncomingEvent { sender: sender.into(), event_type: event_type.into(), content, room: None }
}

/// Sets a JSON field of a message in flight.
pub fn set(w: &mut Wire, field: &str, v: Value) {
    w.out.content.edit(|c| c[field] = v);
}
