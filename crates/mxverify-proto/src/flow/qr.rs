//! The QR flow inside a request ([spec: QR codes](https://spec.matrix.org/v1.19/client-server-api/#qr-codes)):
//! the displayer shows a code after `ready`; the scanner checks it and answers with an
//! `m.reciprocate.v1` start; the displayer checks the secret and asks its user to confirm; both
//! send `done`.

use subtle::ConstantTimeEq;

use super::step::{Ctx, End, How, Next, Peer, Refused, Step, check_no_clash, done_sent_event, we_win_tie_break};
use crate::cancel::{CancelCode, LocalCause};
use crate::keys::Ed25519PublicKey;
use crate::qr::{QrMode, QrPayload, QrSecret};
use crate::types::{Action, DropReason, Event, FlowPhase, KeyKind, UserKeys, VerifiedKey};
use crate::wire::{Method, Msg, MsgKind, Start, StartMethod};

/// A QR transition: the next QR state, or the end of the flow.
type Transition = super::step::Transition<Box<Qr>>;
/// A user action on QR.
type Acted = super::step::Acted<Box<Qr>>;

/// The code we show, and what we will trust once it was scanned and our user confirmed.
#[derive(Debug)]
pub(crate) struct ShownQr {
    payload: QrPayload,
    /// The displayer trusts the second key of its code (QR-07).
    trust: VerifiedKey,
}

/// QR after a scan.
#[derive(Debug)]
pub(crate) struct Qr {
    /// The other device.
    pub(crate) device: String,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Scanner: the user scanned the other device's code before we knew the keys to check it
    /// against; it is checked when they arrive (principle 7: nothing is refused for lack of keys).
    ScanPending { payload: QrPayload, shown: Option<Box<ShownQr>> },
    /// Scanner: the code checked out and our reciprocation went out; waiting for the displayer's
    /// `done` (QR-04). Our own code stays, in case the other device scanned it at the same moment
    /// and its start wins the tie-break (ST-03).
    Reciprocated { trust: VerifiedKey, shown: Option<Box<ShownQr>> },
    /// Displayer: the other device scanned our code with the right secret; waiting for our user
    /// to confirm that it shows success (QR-05).
    Scanned { shown: Box<ShownQr> },
    /// Displayer: our user confirmed and our `done` went out; waiting for theirs (QR-06).
    DoneSent { trust: VerifiedKey },
}

type Refusal = (CancelCode, LocalCause);

fn key_mismatch(what: &str) -> Refusal {
    (CancelCode::KeyMismatch, LocalCause::QrMismatch(what.to_owned()))
}

impl ShownQr {
    /// Our code for a ready flow, with the mode chosen from the relationship (QR-02), if we know
    /// the keys it needs. Emits [`Event::QrCode`].
    pub(crate) fn make(ctx: &mut Ctx<'_>, device: &str) -> Option<(ShownQr, Event)> {
        let (mode, key1, key2, trust) = keys_to_show(ctx, device)?;
        let bytes: [u8; 16] = ctx.random();
        let secret = QrSecret::generate(|buf| buf.copy_from_slice(&bytes));
        // Keys that are not Ed25519 points cannot be put in a code (QF-10): show none.
        let payload = QrPayload::new(mode, ctx.key.flow_id(), *key1.as_bytes(), *key2.as_bytes(), secret).ok()?;
        let event = Event::QrCode { flow: ctx.key.clone(), payload: payload.encode(), mode: mode.as_byte() };
        Some((ShownQr { payload, trust }, event))
    }

    /// The code's bytes.
    pub(crate) fn payload(&self) -> &QrPayload {
        &self.payload
    }
}

/// The mode and keys of our code (QF-04, QF-06, QF-07), and what the displayer trusts once the
/// scan is confirmed: always the second key (QR-07).
fn keys_to_show(ctx: &Ctx<'_>, dev: &str) -> Option<(QrMode, Ed25519PublicKey, Ed25519PublicKey, VerifiedKey)> {
    let own_msk = ctx.own.master_key.clone()?;
    if !ctx.self_verification() {
        let their_msk = ctx.their_keys?.master_key.clone()?;
        Some((QrMode::OtherUser, own_msk, their_msk.clone(), VerifiedKey::master_key(their_msk)))
    } else if ctx.own.trusts_master_key {
        let dev_key = ctx.their_keys?.devices.get(dev)?.clone();
        Some((QrMode::SelfTrusted, own_msk, dev_key.clone(), VerifiedKey::device(dev, dev_key)))
    } else {
        Some((QrMode::SelfUntrusted, ctx.own.ed25519.clone(), own_msk.clone(), VerifiedKey::master_key(own_msk)))
    }
}

/// The user scanned a verification code (QR-03, QR-04) in a ready flow with `device`, where we
/// show `shown` (if anything): check it and, if it holds, send the `m.reciprocate.v1` start. A code
/// that does not hold ends the flow. A code scanned before the keys it must be checked against are
/// known waits for them. (The request phase checked that scanning is a common method and that the
/// bytes are a verification code at all.)
pub(crate) fn scan(device: String, shown: Option<Box<ShownQr>>, payload: QrPayload, ctx: &mut Ctx<'_>) -> Transition {
    if let Err((code, cause)) = check_shape(ctx, &payload) {
        return (Next::fail(Peer::Device(device), code, cause), Step::default());
    }
    // Mode 0x01 is checked against our own keys only; the others need the other side's.
    if payload.mode() != QrMode::SelfTrusted && !ctx.has_device_key(&device) {
        let qr = Qr { device, phase: Phase::ScanPending { payload, shown } };
        return (Next::Go(Box::new(qr)), Step { ask_keys: true, ..Step::default() });
    }
    complete_scan(device, payload, shown, ctx)
}

/// The scanned code is checked against the keys we know; if it holds, our reciprocation goes out.
fn complete_scan(device: String, payload: QrPayload, shown: Option<Box<ShownQr>>, ctx: &mut Ctx<'_>) -> Transition {
    let trust = match check_keys(ctx, &device, &payload) {
        Ok(trust) => trust,
        Err((code, cause)) => return (Next::fail(Peer::Device(device), code, cause), Step::default()),
    };
    let mut step = Step::default();
    let start = Start {
        from_device: ctx.own.device_id.clone(),
        method: StartMethod::Reciprocate { secret: payload.secret().to_base64() },
    };
    step.send(Msg::Start(start), Peer::Device(device.clone()));
    step.events.push(Event::Started { flow: ctx.key.clone(), method: Method::ReciprocateV1, by_us: true });
    (Next::Go(Box::new(Qr { device, phase: Phase::Reciprocated { trust, shown } })), step)
}

/// QR-03, the part that needs no keys: the code is for this flow, and its mode fits the
/// relationship.
fn check_shape(ctx: &Ctx<'_>, p: &QrPayload) -> Result<(), Refusal> {
    if p.flow_id() != ctx.key.flow_id() {
        return Err(key_mismatch("the code belongs to another verification"));
    }
    let wrong_user = |what: &str| (CancelCode::UserMismatch, LocalCause::QrMismatch(what.to_owned()));
    match (p.mode(), ctx.self_verification()) {
        (QrMode::OtherUser, true) => Err(wrong_user("the code is for verifying another user, not our own devices")),
        (QrMode::SelfTrusted | QrMode::SelfUntrusted, false) => {
            Err(wrong_user("the code is for a self-verification, not for verifying another user"))
        }
        _ => Ok(()),
    }
}

/// QR-03: the scanned keys must be what we know (and the other user must not have a device ID
/// equal to a cross-signing key, TR-02); returns what the scanner trusts (the first key, QR-07).
fn check_keys(ctx: &Ctx<'_>, dev: &str, p: &QrPayload) -> Result<VerifiedKey, Refusal> {
    if let Some(keys) = ctx.their_keys {
        check_no_clash(keys).map_err(|cause| (CancelCode::KeyMismatch, cause))?;
    }
    let own_msk =
        ctx.own.master_key.as_ref().ok_or_else(|| key_mismatch("we have no master key to check the code against"))?;
    let (key1, key2) = (Ed25519PublicKey::from_bytes(*p.key1()), Ed25519PublicKey::from_bytes(*p.key2()));
    let theirs = ctx.their_keys;
    match p.mode() {
        QrMode::OtherUser => {
            let their_msk = theirs
                .and_then(|k| k.master_key.as_ref())
                .ok_or_else(|| key_mismatch("we do not know the other user's master key"))?;
            if key1 != *their_msk {
                return Err(key_mismatch("the first key is not the other user's master key"));
            }
            if key2 != *own_msk {
                return Err(key_mismatch("the second key is not our master key"));
            }
            Ok(VerifiedKey::master_key(their_msk.clone()))
        }
        QrMode::SelfTrusted => {
            if key1 != *own_msk {
                return Err(key_mismatch("the first key is not our master key"));
            }
            if key2 != ctx.own.ed25519 {
                return Err(key_mismatch("the second key is not this device's key"));
            }
            Ok(VerifiedKey::master_key(own_msk.clone()))
        }
        QrMode::SelfUntrusted => {
            // The displayer asks us to vouch for the master key: only worth anything if we trust it.
            if !ctx.own.trusts_master_key {
                return Err(key_mismatch(
                    "this device does not trust the master key itself, so the code proves nothing",
                ));
            }
            let dev_key = theirs
                .and_then(|k| k.devices.get(dev))
                .ok_or_else(|| key_mismatch("we do not know the other device's key"))?;
            if key1 != *dev_key {
                return Err(key_mismatch("the first key is not the other device's key"));
            }
            if key2 != *own_msk {
                return Err(key_mismatch("the second key is not our master key"));
            }
            Ok(VerifiedKey::device(dev, dev_key.clone()))
        }
    }
}

/// The displayer gets the reciprocation (QR-05): the secret must be the one in our code (compared
/// in constant time); then our user confirms.
pub(crate) fn on_reciprocate(
    device: String,
    shown: Option<Box<ShownQr>>,
    secret: &str,
    ctx: &mut Ctx<'_>,
) -> Transition {
    let peer = Peer::Device(device.clone());
    let Some(shown) = shown else {
        // They cannot have scanned a code we never showed.
        let cause = LocalCause::UnsupportedMethod(Method::ReciprocateV1.as_str().to_owned());
        return (Next::fail(peer, CancelCode::UnknownMethod, cause), Step::default());
    };
    let matches = QrSecret::from_base64(secret).is_ok_and(|s| bool::from(s.ct_eq(shown.payload.secret())));
    if !matches {
        let cause =
            LocalCause::QrMismatch("the secret does not match our code — someone may be attempting an attack".into());
        return (Next::fail(peer, CancelCode::KeyMismatch, cause), Step::default());
    }
    let mut step = Step::default();
    step.events.push(Event::Started { flow: ctx.key.clone(), method: Method::ReciprocateV1, by_us: false });
    step.events.push(Event::QrScanned { flow: ctx.key.clone() });
    (Next::Go(Box::new(Qr { device, phase: Phase::Scanned { shown } })), step)
}

/// TR-01: the key about to be trusted is still the key we know (and TR-02 still holds).
fn trust_holds(ctx: &Ctx<'_>, dev: &str, trust: &VerifiedKey) -> Result<(), LocalCause> {
    let theirs: Option<&UserKeys> = ctx.their_keys;
    let same = match trust.kind {
        KeyKind::MasterKey if ctx.self_verification() => ctx.own.master_key.as_ref() == Some(&trust.key),
        KeyKind::MasterKey => theirs.and_then(|t| t.master_key.as_ref()) == Some(&trust.key),
        KeyKind::Device => theirs.and_then(|t| t.devices.get(dev)) == Some(&trust.key),
    };
    if !same {
        return Err(LocalCause::KeysChanged);
    }
    theirs.map_or(Ok(()), check_no_clash)
}

impl Qr {
    pub(crate) fn name(&self) -> &'static str {
        match self.phase {
            Phase::ScanPending { .. } => "waiting for the other device's keys to check the scanned code",
            Phase::Scanned { .. } => "waiting for you to confirm that the other device scanned the code",
            Phase::Reciprocated { .. } | Phase::DoneSent { .. } => "waiting for the other device to finish",
        }
    }

    /// The public projection of this state, and the actions legal in it.
    pub(crate) fn project(&self) -> (FlowPhase, Vec<Action>) {
        match &self.phase {
            Phase::ScanPending { .. } => (FlowPhase::QrScanPending, vec![Action::Cancel]),
            Phase::Reciprocated { .. } => (FlowPhase::QrReciprocated, vec![Action::Cancel]),
            Phase::Scanned { .. } => (FlowPhase::QrScanned, vec![Action::Confirm, Action::Mismatch, Action::Cancel]),
            Phase::DoneSent { trust } => (FlowPhase::DoneSent { keys: vec![trust.clone()] }, Vec::new()),
        }
    }

    /// Whether our user is asked to confirm that the other device showed success.
    pub(crate) fn awaits_confirmation(&self) -> bool {
        matches!(self.phase, Phase::Scanned { .. })
    }

    /// Whether our `done` went out.
    pub(crate) fn done_sent(&self) -> bool {
        matches!(self.phase, Phase::DoneSent { .. })
    }

    fn peer(&self) -> Peer {
        Peer::Device(self.device.clone())
    }

    fn unexpected(&self, kind: MsgKind) -> Transition {
        let cause = LocalCause::Unexpected { message: kind.event_type(), state: self.name() };
        (Next::fail(self.peer(), CancelCode::UnexpectedMessage, cause), Step::default())
    }

    /// Whether a scanned code waits for the keys to check it.
    pub(crate) fn scan_pending(&self) -> bool {
        matches!(self.phase, Phase::ScanPending { .. })
    }

    /// Keys arrived: a scan that waited for the other user's keys is checked now if they are
    /// `theirs` (only our own arriving changes nothing it is checked against).
    pub(crate) fn keys_arrived(self, theirs: bool, ctx: &mut Ctx<'_>) -> Transition {
        match self.phase {
            Phase::ScanPending { payload, shown } if theirs => complete_scan(self.device, payload, shown, ctx),
            phase => (Next::Go(Box::new(Qr { device: self.device, phase })), Step::default()),
        }
    }

    /// A start after our scan: both devices scanned each other's code at once, so two
    /// reciprocations crossed (ST-03: the one from the smaller user ID, then device ID, wins), or
    /// a start of another method (ST-04).
    pub(crate) fn on_start(self, start: Start, ctx: &mut Ctx<'_>) -> Transition {
        let secret = match start.method {
            StartMethod::Reciprocate { secret } => secret,
            StartMethod::Sas(_) | StartMethod::Other(_) => {
                return (
                    Next::fail(self.peer(), CancelCode::UnexpectedMessage, LocalCause::StartCollision),
                    Step::default(),
                );
            }
        };
        match self.phase {
            Phase::Reciprocated { trust, shown } => {
                if we_win_tie_break(ctx, &start.from_device) {
                    let step = Step::dropped(ctx, MsgKind::Start, DropReason::LostTieBreak);
                    return (
                        Next::Go(Box::new(Qr { device: self.device, phase: Phase::Reciprocated { trust, shown } })),
                        step,
                    );
                }
                // We lost: our reciprocation is void, and we are the displayer of the code they scanned.
                on_reciprocate(self.device, shown, &secret, ctx)
            }
            phase => Qr { device: self.device, phase }.unexpected(MsgKind::Start),
        }
    }

    /// Our user confirmed that the other device shows success: send `done` (QR-05, QR-06).
    pub(crate) fn confirm(self, ctx: &mut Ctx<'_>) -> Acted {
        let Phase::Scanned { shown } = self.phase else {
            let state = self.name();
            return Err(Refused::wrong_state(Box::new(self), state, "confirm"));
        };
        let peer = Peer::Device(self.device.clone());
        if let Err(cause) = trust_holds(ctx, &self.device, &shown.trust) {
            return Ok((Next::fail(peer, CancelCode::KeyMismatch, cause), Step::default()));
        }
        let mut step = Step::default();
        step.send(Msg::Done, peer);
        step.events.push(done_sent_event(ctx, &self.device, std::slice::from_ref(&shown.trust)));
        let qr = Qr { device: self.device, phase: Phase::DoneSent { trust: shown.trust } };
        Ok((Next::Go(Box::new(qr)), step))
    }

    /// The other side's `done`: the scanner answers with its own (QR-06); both now trust, if the
    /// keys are still the ones checked (TR-01).
    pub(crate) fn on_done(self, ctx: &mut Ctx<'_>) -> Transition {
        let peer = self.peer();
        match self.phase {
            Phase::Reciprocated { trust, .. } => {
                if let Err(cause) = trust_holds(ctx, &self.device, &trust) {
                    return (Next::fail(peer, CancelCode::KeyMismatch, cause), Step::default());
                }
                let mut step = Step::default();
                step.send(Msg::Done, peer.clone());
                step.events.push(done_sent_event(ctx, &self.device, std::slice::from_ref(&trust)));
                (Next::End(End { how: How::Verified(vec![trust]), peer }), step)
            }
            Phase::DoneSent { trust } => {
                // Our `done` went out: keys replaced since end the flow here, without a cancel.
                if trust_holds(ctx, &self.device, &trust).is_err() {
                    let cause = LocalCause::KeysChangedAfterDone;
                    return (Next::fail(peer, CancelCode::KeyMismatch, cause), Step::default());
                }
                (Next::End(End { how: How::Verified(vec![trust]), peer }), Step::default())
            }
            phase => Qr { device: self.device, phase }.unexpected(MsgKind::Done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::testing::*;

    /// The code `party` shows to `device`.
    fn shown_by(party: &mut Party, device: &str) -> Box<ShownQr> {
        Box::new(ShownQr::make(&mut party.ctx(), device).expect("a code is shown").0)
    }

    fn code(shown: &ShownQr) -> QrPayload {
        QrPayload::decode(&shown.payload.encode()).unwrap()
    }

    fn reciprocation(step: &Step) -> Start {
        match &sent(step)[..] {
            [Msg::Start(start)] => start.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn secret_of(start: Start) -> String {
        match start.method {
            StartMethod::Reciprocate { secret } => secret,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_code_shown_names_both_master_keys_and_the_displayer_trusts_the_scanners() {
        let (mut alice, _) = alice_and_bob();
        let (shown, event) = ShownQr::make(&mut alice.ctx(), "B1").unwrap();
        assert!(matches!(event, Event::QrCode { mode: 0, .. }));
        assert_eq!(shown.payload.mode(), QrMode::OtherUser);
        assert_eq!(shown.payload.flow_id(), "txn");
        assert_eq!(shown.payload.key1(), alice.own.master_key.as_ref().unwrap().as_bytes());
        let bob_msk = alice.their_keys.as_ref().unwrap().master_key.clone().unwrap();
        assert_eq!(shown.payload.key2(), bob_msk.as_bytes());
        assert_eq!(shown.trust, VerifiedKey::master_key(bob_msk));
    }

    #[test]
    fn scan_reciprocate_confirm_done() {
        let (mut alice, mut bob) = alice_and_bob();
        let alice_code = shown_by(&mut alice, "B1");
        // Bob scans Alice's code: his side is satisfied; he tells her with the secret.
        let (bob_state, step) = going(scan("A1".into(), None, code(&alice_code), &mut bob.ctx()));
        let start = reciprocation(&step);
        assert_eq!(bob_state.project().0, FlowPhase::QrReciprocated);
        // Alice checks the secret, then asks her user.
        let (alice_state, step) =
            going(on_reciprocate("B1".into(), Some(alice_code), &secret_of(start), &mut alice.ctx()));
        assert!(matches!(&step.events[..], [Event::Started { by_us: false, .. }, Event::QrScanned { .. }]));
        assert_eq!(alice_state.project().1, [Action::Confirm, Action::Mismatch, Action::Cancel]);
        let (alice_state, step) = going(alice_state.confirm(&mut alice.ctx()).unwrap());
        assert_eq!(sent(&step), [&Msg::Done]);
        assert!(matches!(&step.events[..], [Event::DoneSent { keys, .. }] if keys[0].kind == KeyKind::MasterKey));
        assert!(alice_state.done_sent());
        // Bob answers Alice's done with his own and trusts her master key.
        let (how, step) = ending(bob_state.on_done(&mut bob.ctx()));
        assert_eq!(sent(&step), [&Msg::Done]);
        let alice_msk = alice.own.master_key.clone().unwrap();
        assert!(matches!(how, How::Verified(keys) if keys == [VerifiedKey::master_key(alice_msk)]));
        let (how, _) = ending(alice_state.on_done(&mut alice.ctx()));
        assert!(matches!(how, How::Verified(_)));
    }

    #[test]
    fn a_wrong_secret_is_refused() {
        let (mut alice, _) = alice_and_bob();
        let alice_code = shown_by(&mut alice, "B1");
        let (how, _) = ending(on_reciprocate("B1".into(), Some(alice_code), "bm90IHRoZSBzZWNyZXQ", &mut alice.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::KeyMismatch, LocalCause::QrMismatch(m)) if m.contains("secret")));
        // Without a code shown there is nothing to reciprocate.
        let (how, _) = ending(on_reciprocate("B1".into(), None, "AAAA", &mut alice.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::UnknownMethod, _)));
    }

    #[test]
    fn a_scan_before_the_keys_waits_for_them() {
        let (mut alice, mut bob) = alice_and_bob();
        let alice_code = shown_by(&mut alice, "B1");
        let known = bob.their_keys.take();
        let (state, step) = going(scan("A1".into(), None, code(&alice_code), &mut bob.ctx()));
        assert!(step.ask_keys && step.out.is_empty());
        assert_eq!(state.project().0, FlowPhase::QrScanPending);
        bob.their_keys = known;
        let (state, step) = going(state.keys_arrived(true, &mut bob.ctx()));
        reciprocation(&step);
        assert_eq!(state.project().0, FlowPhase::QrReciprocated);
    }

    #[test]
    fn a_code_for_another_flow_is_refused_at_once() {
        let (mut alice, mut bob) = alice_and_bob();
        let alice_code = shown_by(&mut alice, "B1");
        bob.key = crate::types::FlowKey::ToDevice { user_id: ALICE.into(), transaction_id: "other".into() };
        bob.their_keys = None; // even without keys: the code is not for this flow
        let (how, _) = ending(scan("A1".into(), None, code(&alice_code), &mut bob.ctx()));
        assert!(
            matches!(how, How::Failed(CancelCode::KeyMismatch, LocalCause::QrMismatch(m)) if m.contains("another verification"))
        );
    }

    #[test]
    fn a_clashing_device_id_refuses_the_scan() {
        let (mut alice, mut bob) = alice_and_bob();
        let alice_code = shown_by(&mut alice, "B1");
        let keys = bob.their_keys.as_mut().unwrap();
        let msk = keys.master_key.clone().unwrap().to_string();
        keys.devices.insert(msk.clone(), key(99));
        let (how, _) = ending(scan("A1".into(), None, code(&alice_code), &mut bob.ctx()));
        assert!(
            matches!(how, How::Failed(CancelCode::KeyMismatch, LocalCause::DeviceIdClashesWithCrossSigningKey(d)) if d == msk)
        );
    }

    #[test]
    fn crossed_reciprocations_the_smaller_user_is_the_scanner() {
        let (mut alice, mut bob) = alice_and_bob();
        let (alice_code, bob_code) = (shown_by(&mut alice, "B1"), shown_by(&mut bob, "A1"));
        let (alice_scan, bob_scan) = (code(&bob_code), code(&alice_code));
        let (alice_state, a_step) = going(scan("B1".into(), Some(alice_code), alice_scan, &mut alice.ctx()));
        let (bob_state, b_step) = going(scan("A1".into(), Some(bob_code), bob_scan, &mut bob.ctx()));
        // @alice < @bob: Alice's reciprocation wins; she ignores Bob's...
        let (alice_state, step) = going(alice_state.on_start(reciprocation(&b_step), &mut alice.ctx()));
        assert!(matches!(&step.events[..], [Event::Dropped { reason: DropReason::LostTieBreak, .. }]));
        assert_eq!(alice_state.project().0, FlowPhase::QrReciprocated);
        // ...and Bob becomes the displayer of the code she scanned.
        let (bob_state, step) = going(bob_state.on_start(reciprocation(&a_step), &mut bob.ctx()));
        assert!(matches!(&step.events[..], [Event::Started { by_us: false, .. }, Event::QrScanned { .. }]));
        assert_eq!(bob_state.project().0, FlowPhase::QrScanned);
        // A start of another method at that point is a collision of different methods.
        let other = Start { from_device: "B1".into(), method: StartMethod::Other("org.example.x".into()) };
        let (how, _) = ending(alice_state.on_start(other, &mut alice.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::UnexpectedMessage, LocalCause::StartCollision)));
    }

    #[test]
    fn keys_replaced_after_the_displayers_done_end_the_flow_without_verifying() {
        let (mut alice, mut bob) = alice_and_bob();
        let alice_code = shown_by(&mut alice, "B1");
        let (_, step) = going(scan("A1".into(), None, code(&alice_code), &mut bob.ctx()));
        let secret = secret_of(reciprocation(&step));
        let (state, _) = going(on_reciprocate("B1".into(), Some(alice_code), &secret, &mut alice.ctx()));
        let (state, _) = going(state.confirm(&mut alice.ctx()).unwrap());
        alice.their_keys.as_mut().unwrap().master_key = Some(key(66));
        let (how, _) = ending(state.on_done(&mut alice.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::KeyMismatch, LocalCause::KeysChangedAfterDone)));
    }
}
