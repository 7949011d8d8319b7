//! The flows of a verification: the request phase ([`request`]), SAS ([`sas`]) and QR ([`qr`]).
//!
//! Each state is a type holding exactly the data of that moment. Each input is a transition that
//! consumes the state and returns what comes next ([`Next`]: a new state, or the end of the flow)
//! with what to send and report ([`Step`]). Transitions never see the machine: they get a [`Ctx`]
//! (who we are, our configuration, what we know of the other side's keys, and the entropy they may
//! draw from). The machine routes inputs, applies steps, keeps the deadlines and decides, through its
//! cancel gate, whether an ending puts a cancel on the wire.

pub(crate) mod qr;
pub(crate) mod request;
pub(crate) mod sas;

use serde_json::Value;

use crate::cancel::{CancelCode, CancelInfo, LocalCause};
use crate::keys::Ed25519PublicKey;
use crate::types::{
    Action, ActionError, Config, DropReason, Entropy, Event, FlowKey, FlowPhase, Millis, OwnIdentity, UserKeys,
    VerifiedKey,
};
use crate::wire::{self, Envelope, Method, Msg, MsgKind};

pub(crate) use request::{Incoming, Ready, Requested};

/// One flow: who it is with, how it began, and its state.
#[derive(Debug)]
pub(crate) struct Flow {
    pub(crate) key: FlowKey,
    pub(crate) other_user: String,
    pub(crate) origin: Origin,
    pub(crate) state: State,
}

/// How a flow began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// We sent the request.
    OurRequest,
    /// They sent the request. In a room, whether our `ready` has come back in the timeline yet:
    /// another of our devices whose `ready` comes first takes the flow (RQ-11).
    TheirRequest { ready_echoed: bool },
    /// A start without a request (ST-06), by us or by them.
    LegacyStart { by_us: bool },
}

impl Origin {
    pub(crate) fn we_requested(self) -> bool {
        matches!(self, Origin::OurRequest | Origin::LegacyStart { by_us: true })
    }

    /// `false` for the legacy start-first flow, which needs no `done` from the peer.
    pub(crate) fn began_with_request(self) -> bool {
        !matches!(self, Origin::LegacyStart { .. })
    }
}

/// Where in its life a flow is.
#[derive(Debug)]
pub(crate) enum State {
    /// Our request is out; waiting for `ready` (or `cancel`).
    Requested(Requested),
    /// Their request waits for our user, until the prompt closes (RQ-04).
    Incoming(Incoming),
    /// Both ready; either side may start a method (ST-01).
    Ready(Ready),
    /// SAS in progress.
    Sas(Box<sas::Sas>),
    /// QR in progress (after a scan).
    Qr(Box<qr::Qr>),
    /// Verified.
    Done(Finished),
    /// Ended without verification.
    Cancelled(Box<Ended>),
}

/// A verified flow.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) device: String,
    pub(crate) keys: Vec<VerifiedKey>,
}

/// A flow that ended without verification.
#[derive(Debug)]
pub(crate) struct Ended {
    pub(crate) device: Option<String>,
    pub(crate) info: CancelInfo,
}

impl State {
    /// A short description, for people.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            State::Requested(_) => "waiting for the other device to accept",
            State::Incoming(_) => "waiting for you to accept",
            State::Ready(_) => "ready to start a method",
            State::Sas(s) => s.name(),
            State::Qr(q) => q.name(),
            State::Done(_) => "done",
            State::Cancelled(_) => "cancelled",
        }
    }

    pub(crate) fn ended(&self) -> bool {
        matches!(self, State::Done(_) | State::Cancelled(_))
    }

    /// Whether our `done` went out and the flow waits for theirs: no cancel may follow.
    pub(crate) fn done_sent(&self) -> bool {
        match self {
            State::Sas(s) => s.done_sent(),
            State::Qr(q) => q.done_sent(),
            _ => false,
        }
    }

    /// The other device, once bound.
    pub(crate) fn device(&self) -> Option<&str> {
        match self {
            State::Requested(_) => None,
            State::Incoming(i) => Some(&i.device),
            State::Ready(r) => Some(&r.device),
            State::Sas(s) => Some(s.device()),
            State::Qr(q) => Some(&q.device),
            State::Done(d) => Some(&d.device),
            State::Cancelled(e) => e.device.as_deref(),
        }
    }

    /// Who a message of this flow goes to (to-device; in rooms everyone in the room sees it).
    pub(crate) fn peer(&self) -> Peer {
        match self {
            State::Requested(r) => Peer::Devices(r.devices.clone()),
            other => match other.device() {
                Some(d) => Peer::Device(d.to_owned()),
                None => Peer::Devices(Vec::new()),
            },
        }
    }

    /// The public projection of this state, and the actions legal in it.
    pub(crate) fn project(&self, config: &Config) -> (FlowPhase, Vec<Action>) {
        use Action::{Accept, Cancel, ScanQr, StartSas};
        match self {
            State::Requested(_) => (FlowPhase::Requested, vec![Cancel]),
            State::Incoming(i) => {
                let common = common_methods(&config.methods, &i.methods);
                let actions = if common.is_empty() { vec![Cancel] } else { vec![Accept, Cancel] };
                (FlowPhase::Incoming { methods: i.methods.clone(), common_methods: common }, actions)
            }
            State::Ready(r) => {
                let methods = common_methods(&config.methods, &r.methods);
                let mut actions = Vec::new();
                if methods.contains(&Method::SasV1) {
                    actions.push(StartSas);
                }
                if methods.contains(&Method::QrScanV1) {
                    actions.push(ScanQr);
                }
                actions.push(Cancel);
                let qr_code = r.shown.as_ref().map(|s| s.payload().encode());
                (FlowPhase::Ready { methods, qr_code }, actions)
            }
            State::Sas(s) => s.project(),
            State::Qr(q) => q.project(),
            State::Done(d) => (FlowPhase::Done { keys: d.keys.clone() }, Vec::new()),
            State::Cancelled(e) => (FlowPhase::Cancelled(e.info.clone()), Vec::new()),
        }
    }

    /// A message of the flow, other than a cancel (which the machine handles for every state).
    pub(crate) fn on_message(self, msg: Msg, raw: &Value, ctx: &mut Ctx<'_>) -> Transition {
        let kind = msg.kind();
        match (self, msg) {
            (State::Requested(r), Msg::Ready(ready)) => r.on_ready(ready, ctx),
            (State::Ready(r), Msg::Ready(_)) => {
                (Next::Go(State::Ready(r)), Step::dropped(ctx, kind, DropReason::Duplicate))
            }
            (State::Ready(r), Msg::Start(start)) => r.on_start(start, raw, ctx),
            (State::Sas(s), Msg::Start(start)) => s.on_start(start, raw, ctx),
            (State::Sas(s), msg @ (Msg::Accept(_) | Msg::Key(_) | Msg::Mac(_) | Msg::Done)) => s.on_message(msg, ctx),
            (State::Qr(q), Msg::Start(start)) => q.on_start(start, ctx),
            (State::Qr(q), Msg::Done) => q.on_done(ctx),
            (state, _) => {
                let peer = state.peer();
                let cause = LocalCause::Unexpected { message: kind.event_type(), state: state.name() };
                (Next::fail(peer, CancelCode::UnexpectedMessage, cause), Step::default())
            }
        }
    }

    /// Their cancel (CX-01): the flow ends. RQ-08: a device that refuses our request to several
    /// devices ends it for all, and the others are told with `m.user` (we cannot tell which device
    /// refused).
    pub(crate) fn on_cancel(self, cancel: wire::Cancel) -> Transition {
        let mut step = Step::default();
        if let State::Requested(r) = &self
            && r.devices.len() > 1
        {
            let code = CancelCode::User;
            let msg = Msg::Cancel(wire::Cancel { reason: code.default_reason().to_owned(), code });
            step.send(msg, Peer::Devices(r.devices.clone()));
        }
        let how = How::CancelledByThem { code: cancel.code, reason: cancel.reason };
        (Next::End(End { how, peer: self.peer() }), step)
    }

    /// The user accepts: an incoming request (sends `ready`, RQ-07), or a legacy start.
    pub(crate) fn accept(self, ctx: &mut Ctx<'_>) -> Acted {
        match self {
            State::Incoming(i) => i.accept(ctx),
            State::Sas(s) => s.user_accepts(ctx),
            other => Err(wrong_state(other, "accept")),
        }
    }

    /// The user starts SAS in a ready flow (ST-01).
    pub(crate) fn start_sas(self, ctx: &mut Ctx<'_>) -> Acted {
        match self {
            State::Ready(r) => r.start_sas(ctx),
            other => Err(wrong_state(other, "start SAS")),
        }
    }

    /// The user says the emoji match (SQ-09), or that the other device showed success (QR-05).
    pub(crate) fn confirm(self, ctx: &mut Ctx<'_>) -> Acted {
        match self {
            State::Qr(q) => q.confirm(ctx),
            State::Sas(s) => s.confirm(ctx),
            other => Err(wrong_state(other, "confirm")),
        }
    }

    /// The user says the emoji differ (SQ-08), or that the other device did not show success.
    pub(crate) fn mismatch(self) -> Acted {
        match self {
            State::Sas(s) if s.can_confirm() => {
                let peer = Peer::Device(s.device().to_owned());
                Ok((Next::fail(peer, CancelCode::MismatchedSas, LocalCause::UserSaidMismatch), Step::default()))
            }
            State::Qr(q) if q.awaits_confirmation() => {
                let cause = LocalCause::QrMismatch("you said the other device did not show success".into());
                Ok((Next::fail(Peer::Device(q.device.clone()), CancelCode::KeyMismatch, cause), Step::default()))
            }
            other => Err(wrong_state(other, "report a mismatch")),
        }
    }

    /// The user scanned the other device's code (QR-03, QR-04).
    pub(crate) fn scan_qr(self, scanned: &[u8], ctx: &mut Ctx<'_>) -> Acted {
        match self {
            State::Ready(r) => qr::scan(r, scanned, ctx),
            other => Err(wrong_state(other, "scan a QR code")),
        }
    }

    /// The keys of the other user (or ours, for a self-verification) arrived: a ready flow may
    /// now show its code, and a scan that waited for them completes.
    pub(crate) fn keys_arrived(self, ctx: &mut Ctx<'_>) -> Transition {
        match self {
            State::Ready(mut ready) if ready.shown.is_none() => {
                let mut step = Step::default();
                if let Err(cause) = ready.offer_qr(ctx, &mut step) {
                    return (Next::fail(Peer::Device(ready.device), CancelCode::KeyMismatch, cause), step);
                }
                (Next::Go(State::Ready(ready)), step)
            }
            State::Qr(q) => q.keys_arrived(ctx),
            other => (Next::Go(other), Step::default()),
        }
    }

    /// The user cancels or rejects (CX-01, RQ-08); `cause` says why. A flow whose `done` we sent
    /// is not cancelled: the other side may already trust us.
    pub(crate) fn cancel(self, cause: LocalCause) -> Acted {
        if self.ended() || self.done_sent() {
            return Err(wrong_state(self, "cancel"));
        }
        Ok((Next::fail(self.peer(), CancelCode::User, cause), Step::default()))
    }
}

fn wrong_state(state: State, action: &'static str) -> Box<Refused> {
    let name = state.name();
    Refused::new(state, ActionError::WrongState { action, state: name })
}

/// Who the messages of a flow go to over to-device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Peer {
    /// The bound device.
    Device(String),
    /// Several devices (our request before anyone answered), or none known.
    Devices(Vec<String>),
}

impl Peer {
    pub(crate) fn devices(self) -> Vec<String> {
        match self {
            Peer::Device(d) => vec![d],
            Peer::Devices(ds) => ds,
        }
    }

    fn device(self) -> Option<String> {
        match self {
            Peer::Device(d) => Some(d),
            Peer::Devices(_) => None,
        }
    }
}

/// A message to send.
#[derive(Debug)]
pub(crate) struct Out {
    pub(crate) msg: Msg,
    pub(crate) to: Peer,
}

/// How a flow ends.
#[derive(Debug)]
pub(crate) enum How {
    /// Every check passed: these keys are verified.
    Verified(Vec<VerifiedKey>),
    /// A check failed or the user cancelled: the machine's cancel gate decides whether a cancel
    /// with this code goes on the wire.
    Failed(CancelCode, LocalCause),
    /// Closed without a word on the wire (a prompt nobody answered, a request another of our
    /// devices took).
    Dismissed(CancelCode, LocalCause),
    /// The other side cancelled.
    CancelledByThem { code: CancelCode, reason: String },
}

/// The end of a flow, and who the flow was with.
#[derive(Debug)]
pub(crate) struct End {
    pub(crate) how: How,
    pub(crate) peer: Peer,
}

impl End {
    /// The other device, if one was bound.
    pub(crate) fn device(&self) -> Option<String> {
        self.peer.clone().device()
    }
}

/// What follows a transition.
#[derive(Debug)]
pub(crate) enum Next {
    /// The flow goes on in this state.
    Go(State),
    /// The flow ends.
    End(End),
}

impl Next {
    pub(crate) fn fail(peer: Peer, code: CancelCode, cause: LocalCause) -> Next {
        Next::End(End { how: How::Failed(code, cause), peer })
    }
}

/// What a transition asks the machine to do besides changing the state.
#[derive(Debug, Default)]
pub(crate) struct Step {
    /// Messages to send, in order.
    pub(crate) out: Vec<Out>,
    /// Events for the user, in order.
    pub(crate) events: Vec<Event>,
    /// Keep the incoming event until the other user's keys arrive, then feed it again.
    pub(crate) hold: bool,
    /// Ask the caller for the other user's keys.
    pub(crate) ask_keys: bool,
}

impl Step {
    pub(crate) fn send(&mut self, msg: Msg, to: Peer) {
        self.out.push(Out { msg, to });
    }

    /// Adds another step's effects after this one's.
    pub(crate) fn append(&mut self, other: Step) {
        self.out.extend(other.out);
        self.events.extend(other.events);
        self.hold |= other.hold;
        self.ask_keys |= other.ask_keys;
    }

    pub(crate) fn dropped(ctx: &Ctx<'_>, kind: MsgKind, reason: DropReason) -> Step {
        let event = Event::Dropped { sender: ctx.other_user.to_owned(), event_type: kind.event_type().into(), reason };
        Step { events: vec![event], ..Step::default() }
    }
}

/// A transition's result.
pub(crate) type Transition = (Next, Step);

/// A user action's result: a transition, or the untouched state and why the action is refused.
pub(crate) type Acted = Result<Transition, Box<Refused>>;

/// A refused user action: the state, untouched, and why.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) state: State,
    pub(crate) error: ActionError,
}

impl Refused {
    pub(crate) fn new(state: State, error: ActionError) -> Box<Refused> {
        Box::new(Refused { state, error })
    }
}

/// What a transition may look at: read-only facts about us and the other side, and the entropy.
pub(crate) struct Ctx<'a> {
    pub(crate) own: &'a OwnIdentity,
    pub(crate) config: &'a Config,
    pub(crate) key: &'a FlowKey,
    pub(crate) other_user: &'a str,
    pub(crate) origin: Origin,
    /// What we know of the other user's keys (for a self-verification, our own user's).
    pub(crate) their_keys: Option<&'a UserKeys>,
    pub(crate) entropy: &'a mut dyn Entropy,
    /// When the flow times out (from the machine's timer table).
    pub(crate) deadline: Millis,
    /// The input waited for keys before: it is not held again.
    pub(crate) retry: bool,
}

impl Ctx<'_> {
    pub(crate) fn random<const N: usize>(&mut self) -> [u8; N] {
        let mut buf = [0u8; N];
        self.entropy.fill(&mut buf);
        buf
    }

    /// Where this flow's id goes in a message (FW-03).
    pub(crate) fn envelope(&self) -> Envelope {
        match self.key {
            FlowKey::ToDevice { transaction_id, .. } => Envelope::ToDevice(transaction_id.clone()),
            FlowKey::Room { event_id, .. } => Envelope::Room(Some(event_id.clone())),
        }
    }

    pub(crate) fn is_to_device(&self) -> bool {
        matches!(self.key, FlowKey::ToDevice { .. })
    }

    pub(crate) fn has_device_key(&self, device: &str) -> bool {
        self.their_keys.is_some_and(|k| k.devices.contains_key(device))
    }

    pub(crate) fn self_verification(&self) -> bool {
        self.other_user == self.own.user_id
    }

    /// Our methods that correspond to theirs (EV-RD-02, QR-01).
    pub(crate) fn common_methods(&self, theirs: &[Method]) -> Vec<Method> {
        common_methods(&self.config.methods, theirs)
    }
}

/// Our methods that correspond to theirs (EV-RD-02, QR-01): SAS for SAS, showing a QR code for
/// their scanning and scanning for their showing (each needing `m.reciprocate.v1` on both sides),
/// and the reciprocation whenever a QR method remains.
pub(crate) fn common_methods(ours: &[Method], theirs: &[Method]) -> Vec<Method> {
    let both_reciprocate = ours.contains(&Method::ReciprocateV1) && theirs.contains(&Method::ReciprocateV1);
    let mut common: Vec<Method> = ours
        .iter()
        .filter(|m| match m {
            Method::QrShowV1 => both_reciprocate && theirs.contains(&Method::QrScanV1),
            Method::QrScanV1 => both_reciprocate && theirs.contains(&Method::QrShowV1),
            Method::ReciprocateV1 => false,
            other => theirs.contains(other),
        })
        .cloned()
        .collect();
    if common.iter().any(|m| matches!(m, Method::QrShowV1 | Method::QrScanV1)) {
        common.push(Method::ReciprocateV1);
    }
    common
}

/// The other side's keys, fixed by value when a method starts (TR-01).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pinned {
    pub(crate) device_key: Ed25519PublicKey,
    pub(crate) master_key: Option<Ed25519PublicKey>,
}

impl Pinned {
    /// Pins the other device's key and its user's master key, refusing a user with a device ID
    /// equal to one of their cross-signing keys (TR-01, TR-02).
    pub(crate) fn pin(their_keys: Option<&UserKeys>, device: &str) -> Result<Pinned, LocalCause> {
        let keys = their_keys.ok_or_else(|| LocalCause::DeviceKeysUnknown(device.to_owned()))?;
        let device_key =
            keys.devices.get(device).cloned().ok_or_else(|| LocalCause::DeviceKeysUnknown(device.to_owned()))?;
        check_no_clash(keys)?;
        Ok(Pinned { device_key, master_key: keys.master_key.clone() })
    }

    /// Whether the other side's keys still equal the pinned ones (TR-01), and still have no
    /// device ID that clashes with a cross-signing key (TR-02).
    pub(crate) fn holds(&self, their_keys: Option<&UserKeys>, device: &str) -> Result<(), LocalCause> {
        let same = their_keys.and_then(|k| k.devices.get(device)) == Some(&self.device_key)
            && their_keys.and_then(|k| k.master_key.as_ref()) == self.master_key.as_ref();
        if !same {
            return Err(LocalCause::KeysChanged);
        }
        their_keys.map_or(Ok(()), check_no_clash)
    }
}

/// TR-02: device key IDs and cross-signing key IDs share one namespace; a user with a device whose
/// ID equals one of their cross-signing keys must be refused.
pub(crate) fn check_no_clash(keys: &UserKeys) -> Result<(), LocalCause> {
    let cross: Vec<&Ed25519PublicKey> = keys.master_key.iter().chain(&keys.other_cross_signing_keys).collect();
    match keys.devices.keys().find(|d| cross.iter().any(|k| **k == ***d)) {
        Some(clash) => Err(LocalCause::DeviceIdClashesWithCrossSigningKey(clash.clone())),
        None => Ok(()),
    }
}

/// The event that says our `done` is going out, with the keys that will be verified.
pub(crate) fn done_sent_event(ctx: &Ctx<'_>, device: &str, keys: &[VerifiedKey]) -> Event {
    Event::DoneSent {
        flow: ctx.key.clone(),
        user_id: ctx.other_user.to_owned(),
        device_id: device.to_owned(),
        keys: keys.to_vec(),
    }
}

/// The event the user sees when both sides are ready.
pub(crate) fn ready_event(ctx: &Ctx<'_>, ready: &Ready) -> Event {
    Event::Ready {
        flow: ctx.key.clone(),
        other_device: ready.device.clone(),
        methods: ctx.common_methods(&ready.methods),
    }
}

/// Encodes a message for this flow, as the commitment needs our own start (CM-04).
pub(crate) fn encode(msg: &Msg, ctx: &Ctx<'_>) -> Value {
    wire::encode(msg, &ctx.envelope()).1
}

/// What the transition tests share: two parties that know each other's keys, a context for each,
/// and helpers to look into transitions.
#[cfg(test)]
pub(crate) mod testing {
    use curve25519_dalek::{EdwardsPoint, Scalar};

    use super::*;

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
    pub(crate) fn going((next, step): Transition) -> (State, Step) {
        match next {
            Next::Go(state) => (state, step),
            Next::End(end) => panic!("the flow ended: {end:?}"),
        }
    }

    /// The end of a transition that must end the flow.
    #[track_caller]
    pub(crate) fn ending((next, step): Transition) -> (How, Step) {
        match next {
            Next::End(end) => (end.how, step),
            Next::Go(state) => panic!("the flow went on: {}", state.name()),
        }
    }

    /// The messages a step sends.
    pub(crate) fn sent(step: &Step) -> Vec<&Msg> {
        step.out.iter().map(|o| &o.msg).collect()
    }

    /// The raw content a message would have on the wire in this flow.
    pub(crate) fn raw(msg: &Msg) -> Value {
        wire::encode(msg, &Envelope::ToDevice("txn".into())).1
    }
}
