//! What the transition tests share: two parties that know each other's keys, a context for each,
//! and helpers to look into transitions.

use curve25519_dalek::{EdwardsPoint, Scalar};
use serde_json::Value;

use super::step::{Ctx, How, Next, Origin, Step, Transition};
use crate::keys::Ed25519PublicKey;
use crate::types::{Config, Entropy, FlowKey, OwnIdentity, UserKeys};
use crate::wire::{self, Envelope, Method, Msg};

/// Reproducible bytes (tests only).
pub(crate) struct Bytes(pub(crate) u8);

impl Entropy for Bytes {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 = self.0.wrapping_mul(167).wrapping_add(13);
            *b = self.0;
        }
    }
}

/// A valid Ed25519 public key (QR codes need points of the curve).
pub(crate) fn key(n: u8) -> Ed25519PublicKey {
    Ed25519PublicKey::from_bytes(EdwardsPoint::mul_base(&Scalar::from(u64::from(n))).compress().to_bytes())
}

/// One side of a flow, as its transitions see it.
pub(crate) struct Party {
    pub(crate) own: OwnIdentity,
    pub(crate) config: Config,
    pub(crate) key: FlowKey,
    pub(crate) other_user: String,
    pub(crate) origin: Origin,
    pub(crate) their_keys: Option<UserKeys>,
    pub(crate) entropy: Bytes,
    pub(crate) retry: bool,
}

impl Party {
    pub(crate) fn ctx(&mut self) -> Ctx<'_> {
        Ctx {
            own: &self.own,
            config: &self.config,
            key: &self.key,
            other_user: &self.other_user,
            origin: self.origin,
            their_keys: self.their_keys.as_ref(),
            entropy: &mut self.entropy,
            deadline: 1_000,
            retry: self.retry,
        }
    }
}

pub(crate) const ALICE: &str = "@alice:example.org";
pub(crate) const BOB: &str = "@bob:example.org";

fn identity(user: &str, device: &str, n: u8) -> OwnIdentity {
    OwnIdentity {
        user_id: user.into(),
        device_id: device.into(),
        ed25519: key(n),
        master_key: Some(key(n + 1)),
        trusts_master_key: true,
    }
}

pub(crate) fn keys_of(own: &OwnIdentity) -> UserKeys {
    UserKeys {
        devices: [(own.device_id.clone(), own.ed25519.clone())].into(),
        master_key: own.master_key.clone(),
        other_cross_signing_keys: Vec::new(),
    }
}

/// Alice (device A1) requested a to-device verification of Bob (device B1); each knows the
/// other's keys; both can do SAS and QR.
pub(crate) fn alice_and_bob() -> (Party, Party) {
    let (a, b) = (identity(ALICE, "A1", 1), identity(BOB, "B1", 3));
    let config = Config {
        methods: vec![Method::SasV1, Method::QrShowV1, Method::QrScanV1, Method::ReciprocateV1],
        ..Config::default()
    };
    let party = |own: OwnIdentity, other: &OwnIdentity, flow_user: &str, origin, seed| Party {
        their_keys: Some(keys_of(other)),
        other_user: other.user_id.clone(),
        key: FlowKey::ToDevice { user_id: flow_user.into(), transaction_id: "txn".into() },
        own,
        config: config.clone(),
        origin,
        entropy: Bytes(seed),
        retry: false,
    };
    let alice = party(a.clone(), &b, BOB, Origin::OurRequest, 1);
    let bob = party(b, &a, ALICE, Origin::TheirRequest { ready_echoed: false }, 2);
    (alice, bob)
}

/// Both parties' methods.
pub(crate) fn all_methods() -> Vec<Method> {
    vec![Method::SasV1, Method::QrShowV1, Method::QrScanV1, Method::ReciprocateV1]
}

/// The state after a transition that must go on.
#[track_caller]
pub(crate) fn going<S>((next, step): Transition<S>) -> (S, Step) {
    match next {
        Next::Go(state) => (state, step),
        Next::End(end) => panic!("the flow ended: {end:?}"),
    }
}

/// The end of a transition that must end the flow.
#[track_caller]
pub(crate) fn ending<S>((next, step): Transition<S>) -> (How, Step) {
    match next {
        Next::End(end) => (end.how, step),
        Next::Go(_) => panic!("the flow went on"),
    }
}

/// The messages a step sends.
pub(crate) fn sent(step: &Step) -> Vec<&Msg> {
    step.out.iter().map(|o| &o.msg).collect()
}

/// The raw content a message would have on the wire in this flow.
pub(crate) fn raw(msg: &Msg) -> Value {
    wire::encode(msg, &Envelope::ToDevice("txn".into())).1.to_value()
}

/// The canonical JSON of that content, as a SAS flow keeps a start for its commitment.
pub(crate) fn canonical(msg: &Msg) -> Option<String> {
    Some(wire::encode(msg, &Envelope::ToDevice("txn".into())).1.into_string())
}
