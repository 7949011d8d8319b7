//! What every flow transition shares: the context it may look at ([`Ctx`]), what it asks of the
//! machine ([`Step`]), what comes next ([`Next`]), and the checks of the other side's keys.
//! Nothing here knows the states themselves, so the state modules depend on this one and never
//! the other way round.

use crate::cancel::{CancelCode, LocalCause};
use crate::keys::Ed25519PublicKey;
use crate::types::{
    ActionError, Config, Content, DropReason, Entropy, Event, FlowKey, Millis, OwnIdentity, UserKeys, VerifiedKey,
};
use crate::wire::{self, Envelope, Method, Methods, Msg, MsgKind};

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

    /// The bound device, if any.
    pub(crate) fn device(self) -> Option<String> {
        match self {
            Peer::Device(d) => Some(d),
            Peer::Devices(_) => None,
        }
    }

    /// The bound device, if any, without taking it.
    pub(crate) fn bound(&self) -> Option<&str> {
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

/// What follows a transition: the flow goes on in a state `S`, or ends.
#[derive(Debug)]
pub(crate) enum Next<S> {
    /// The flow goes on in this state.
    Go(S),
    /// The flow ends.
    End(End),
}

impl<S> Next<S> {
    pub(crate) fn fail(peer: Peer, code: CancelCode, cause: LocalCause) -> Next<S> {
        Next::End(End { how: How::Failed(code, cause), peer })
    }

    /// The same outcome with the state wrapped (a SAS state into a flow state, say).
    pub(crate) fn map<T>(self, f: impl FnOnce(S) -> T) -> Next<T> {
        match self {
            Next::Go(s) => Next::Go(f(s)),
            Next::End(end) => Next::End(end),
        }
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
pub(crate) type Transition<S> = (Next<S>, Step);

/// A user action's result: a transition, or the untouched state and why the action is refused.
pub(crate) type Acted<S> = Result<Transition<S>, Box<Refused<S>>>;

/// A refused user action: the state, untouched, and why.
#[derive(Debug)]
pub(crate) struct Refused<S> {
    pub(crate) state: S,
    pub(crate) error: ActionError,
}

impl<S> Refused<S> {
    pub(crate) fn new(state: S, error: ActionError) -> Box<Refused<S>> {
        Box::new(Refused { state, error })
    }

    /// An action the state does not allow.
    pub(crate) fn wrong_state(state: S, name: &'static str, action: &'static str) -> Box<Refused<S>> {
        Refused::new(state, ActionError::WrongState { action, state: name })
    }
}

/// A transition's result with the state wrapped.
pub(crate) fn map<S, T>((next, step): Transition<S>, f: impl FnOnce(S) -> T) -> Transition<T> {
    (next.map(f), step)
}

/// A user action's result with the state wrapped, whichever way it went.
pub(crate) fn map_acted<S, T>(acted: Acted<S>, f: impl FnOnce(S) -> T) -> Acted<T> {
    match acted {
        Ok(t) => Ok(map(t, f)),
        Err(refused) => {
            let Refused { state, error } = *refused;
            Err(Refused::new(f(state), error))
        }
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
    pub(crate) fn common_methods(&self, theirs: &Methods) -> Vec<Method> {
        common_methods(&self.config.methods, theirs)
    }
}

/// Our methods that correspond to theirs (EV-RD-02, QR-01): SAS for SAS, showing a QR code for
/// their scanning and scanning for their showing (each needing `m.reciprocate.v1` on both sides),
/// and the reciprocation whenever a QR method remains.
pub(crate) fn common_methods(ours: &[Method], theirs: &Methods) -> Vec<Method> {
    let mut common: Vec<Method> = ours.iter().filter(|m| corresponds(ours, theirs, m)).cloned().collect();
    if common.iter().any(|m| matches!(m, Method::QrShowV1 | Method::QrScanV1)) {
        common.push(Method::ReciprocateV1);
    }
    common
}

/// Whether `method`, one of ours, corresponds to one of theirs (the reciprocation never does on
/// its own: it comes with a QR method).
pub(crate) fn corresponds(ours: &[Method], theirs: &Methods, method: &Method) -> bool {
    let both_reciprocate = || ours.contains(&Method::ReciprocateV1) && theirs.contains(&Method::ReciprocateV1);
    match method {
        Method::QrShowV1 => theirs.contains(&Method::QrScanV1) && both_reciprocate(),
        Method::QrScanV1 => theirs.contains(&Method::QrShowV1) && both_reciprocate(),
        Method::ReciprocateV1 => false,
        other => theirs.contains(other),
    }
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

/// Encodes a message for this flow, as the commitment needs our own start (CM-04).
pub(crate) fn encode(msg: &Msg, ctx: &Ctx<'_>) -> Content {
    wire::encode(msg, &ctx.envelope()).1
}

/// ST-03, ST-05: of two colliding starts (of the same method), the one from the smaller user ID
/// wins; for one user, the one from the smaller device ID. Byte order of UTF-8 strings is
/// code-point order.
pub(crate) fn we_win_tie_break(ctx: &Ctx<'_>, their_device: &str) -> bool {
    if ctx.own.user_id != ctx.other_user {
        ctx.own.user_id.as_str() < ctx.other_user
    } else {
        ctx.own.device_id.as_str() < their_device
    }
}
