//! The `m.sas.v1` flow ([spec: SAS](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification)),
//! from `start` to `done`, for both roles: S sends the (winning) `start`, A sends `accept`.
//!
//! Each phase holds what it needs: the ephemeral key until the agreement consumes it, the choice
//! once the accept is made, the shared secret once the keys are exchanged, and what the other side
//! already did while our user compares.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::step::{Ctx, End, How, Next, Peer, Pinned, Refused, Step, done_sent_event, encode, we_win_tie_break};
use crate::cancel::{CancelCode, LocalCause};
use crate::canonical;
use crate::crypto::{self, EphemeralKey, KeyAgreement, MacMethod, Party, SharedSecret};
use crate::emoji;
use crate::keys::Ed25519PublicKey;
use crate::types::{Action, DropReason, Event, FlowKey, FlowPhase, KeyKind, SasParams, VerifiedKey, ed25519_key_id};
use crate::wire::{self, Accept, MacMsg, Method, Msg, MsgKind, SasOffer, Start, StartMethod};

/// A SAS transition: the next SAS state, or the end of the flow.
type Transition = super::step::Transition<Box<Sas>>;
/// A user action on SAS.
type Acted = super::step::Acted<Box<Sas>>;

/// The SAS methods we know, in our order.
const SAS_METHODS: [&str; 2] = ["decimal", "emoji"];
const SHA256: &str = "sha256";

/// What the accepter chose (SA-05).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Choice {
    key_agreement: KeyAgreement,
    mac: MacMethod,
    emoji: bool,
    decimal: bool,
}

/// SAS in one flow: what holds for its whole life, and the current phase.
#[derive(Debug)]
pub(crate) struct Sas {
    c: Common,
    phase: Phase,
}

/// What a SAS exchange keeps from start to end.
#[derive(Debug)]
struct Common {
    /// The other device.
    device: String,
    /// Whether our start is the one in force.
    we_start: bool,
    /// The start content as the commitment hashes it, canonical JSON (CM-02..CM-04); `None` if
    /// their start has no canonical form (the accept then fails).
    start_content: Option<String>,
    /// The start's offer.
    offer: SasOffer,
    /// The other side's keys, fixed when SAS started (TR-01).
    pinned: Pinned,
}

#[derive(Debug)]
enum Phase {
    /// S: start sent, waiting for `accept`.
    AwaitAccept(EphemeralKey),
    /// A, legacy start-first flow: waiting for our user to accept the start.
    AwaitUserAccept,
    /// A: `accept` sent, waiting for S's `key` (SQ-04: our key goes only after theirs).
    AwaitStarterKey { eph: EphemeralKey, choice: Choice },
    /// S: `key` sent, waiting for A's `key` to check its commitment.
    AwaitAccepterKey { eph: EphemeralKey, choice: Choice, accept: Accept },
    /// Keys exchanged: SAS shown; MACs and `done` to exchange.
    Exchanged(Box<Exchanged>, Stage),
}

#[derive(Debug)]
struct Exchanged {
    secret: SharedSecret,
    choice: Choice,
    /// Their ephemeral key, to recognise a duplicate `key`.
    their_key: String,
    /// S: the accept we got, to recognise a duplicate.
    their_accept: Option<Accept>,
    /// What the user compares: emoji indices and numbers, as negotiated.
    shown: (Option<[u8; 7]>, Option<[u16; 3]>),
}

/// After the keys: what our user and the other side have done.
#[derive(Debug)]
enum Stage {
    /// Our user compares the SAS; the other side may already be further.
    Compare(Theirs),
    /// Our user confirmed and our MAC went out; waiting for theirs.
    AwaitTheirMac,
    /// Both MACs verified and our `done` sent; waiting for theirs.
    AwaitTheirDone(CheckedMac),
}

/// What the other side did while our user compares.
#[derive(Debug)]
enum Theirs {
    Nothing,
    Mac(CheckedMac),
    MacAndDone(CheckedMac),
}

/// Their `mac`, verified, and the keys it proved.
#[derive(Debug)]
struct CheckedMac {
    mac: MacMsg,
    keys: Vec<VerifiedKey>,
}

impl Stage {
    fn their_mac(&self) -> Option<&MacMsg> {
        match self {
            Stage::Compare(Theirs::Mac(c) | Theirs::MacAndDone(c)) | Stage::AwaitTheirDone(c) => Some(&c.mac),
            Stage::Compare(Theirs::Nothing) | Stage::AwaitTheirMac => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Stage::Compare(_) => "waiting for you to compare the emoji",
            Stage::AwaitTheirMac => "waiting for the other device to confirm",
            Stage::AwaitTheirDone(_) => "waiting for the other device to finish",
        }
    }
}

/// Our offer in a start (EV-SS-02..05): what the configuration allows, best first.
fn our_offer(p: &SasParams) -> SasOffer {
    SasOffer {
        key_agreement_protocols: p.key_agreements.iter().map(|k| k.as_str().to_owned()).collect(),
        hashes: vec![SHA256.to_owned()],
        message_authentication_codes: p.macs.iter().map(|m| m.as_str().to_owned()).collect(),
        short_authentication_string: p.sas_methods().iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// Their start content as the commitment must hash it: canonical JSON of the content as received,
/// with the in-room relation added back if an encrypted event's decrypted content lacks it
/// (CM-02, CM-03, CM-04). `None` if it has no canonical form.
pub(crate) fn start_content_for_commitment(content: &Value, key: &FlowKey) -> Option<String> {
    if let (FlowKey::Room { event_id, .. }, Some(obj)) = (key, content.as_object())
        && !obj.contains_key("m.relates_to")
    {
        let mut obj = obj.clone();
        obj.insert("m.relates_to".to_owned(), json!({ "rel_type": "m.reference", "event_id": event_id }));
        return canonical::to_string(&Value::Object(obj)).ok();
    }
    canonical::to_string(content).ok()
}

/// The accepter's choices from a start's offer (SA-05, SA-06, SA-07): our preferred key agreement
/// and MAC among those offered, `sha256`, and every SAS method both know.
fn choose(offer: &SasOffer, p: &SasParams) -> Result<Choice, &'static str> {
    let offered = |list: &[String], v: &str| list.iter().any(|o| o == v);
    let key_agreement = p
        .key_agreements
        .iter()
        .copied()
        .find(|k| offered(&offer.key_agreement_protocols, k.as_str()))
        .ok_or("key agreement protocol")?;
    if !offered(&offer.hashes, SHA256) {
        return Err("hash");
    }
    let mac = p
        .macs
        .iter()
        .copied()
        .find(|m| offered(&offer.message_authentication_codes, m.as_str()))
        .ok_or("message authentication code")?;
    let decimal = p.decimal && offered(&offer.short_authentication_string, "decimal");
    let emoji = p.emoji && offered(&offer.short_authentication_string, "emoji");
    if !decimal && !emoji {
        return Err("short authentication string method");
    }
    Ok(Choice { key_agreement, mac, emoji, decimal })
}

/// The starter's check of an accept (SA-06): each choice must be one we offered and support.
fn check_accept(offer: &SasOffer, accept: &Accept) -> Result<Choice, &'static str> {
    let offered = |list: &[String], v: &str| list.iter().any(|o| o == v);
    let key_agreement = KeyAgreement::from_wire(&accept.key_agreement_protocol)
        .filter(|k| offered(&offer.key_agreement_protocols, k.as_str()))
        .ok_or("key agreement protocol")?;
    if accept.hash != SHA256 || !offered(&offer.hashes, SHA256) {
        return Err("hash");
    }
    let mac = MacMethod::from_wire(&accept.message_authentication_code)
        .filter(|m| offered(&offer.message_authentication_codes, m.as_str()))
        .ok_or("message authentication code")?;
    let sas = &accept.short_authentication_string;
    if sas.is_empty()
        || sas.iter().any(|s| !SAS_METHODS.contains(&s.as_str()) || !offered(&offer.short_authentication_string, s))
    {
        return Err("short authentication string method");
    }
    let has = |s: &str| sas.iter().any(|o| o == s);
    Ok(Choice { key_agreement, mac, emoji: has("emoji"), decimal: has("decimal") })
}

impl Sas {
    /// The other device.
    pub(crate) fn device(&self) -> &str {
        &self.c.device
    }

    /// The other device, for a flow that ends here.
    pub(crate) fn into_device(self) -> String {
        self.c.device
    }

    pub(crate) fn name(&self) -> &'static str {
        self.phase.name()
    }

    /// Whether our `done` went out.
    pub(crate) fn done_sent(&self) -> bool {
        matches!(self.phase, Phase::Exchanged(_, Stage::AwaitTheirDone(_)))
    }

    /// Whether the user can now confirm or deny the SAS.
    pub(crate) fn can_confirm(&self) -> bool {
        matches!(&self.phase, Phase::Exchanged(_, Stage::Compare(_)))
    }

    /// The public projection of this state, and the actions legal in it.
    pub(crate) fn project(&self) -> (FlowPhase, Vec<Action>) {
        match &self.phase {
            Phase::AwaitUserAccept => (FlowPhase::SasIncoming, vec![Action::Accept, Action::Cancel]),
            Phase::AwaitAccept(_) | Phase::AwaitStarterKey { .. } | Phase::AwaitAccepterKey { .. } => {
                (FlowPhase::SasStarted, vec![Action::Cancel])
            }
            Phase::Exchanged(x, Stage::Compare(_)) => (
                FlowPhase::SasCompare { emoji: emoji_of(x.shown.0), decimals: x.shown.1 },
                vec![Action::Confirm, Action::Mismatch, Action::Cancel],
            ),
            Phase::Exchanged(_, Stage::AwaitTheirMac) => (FlowPhase::SasConfirmed, vec![Action::Cancel]),
            Phase::Exchanged(_, Stage::AwaitTheirDone(m)) => (FlowPhase::DoneSent { keys: m.keys.clone() }, Vec::new()),
        }
    }

    /// We start SAS (SQ-01): a fresh ephemeral key and our offer.
    pub(crate) fn start(device: String, pinned: Pinned, ctx: &mut Ctx<'_>) -> (Sas, Msg) {
        let eph = EphemeralKey::from_random(ctx.random());
        let offer = our_offer(&ctx.config.sas);
        let msg = Msg::Start(Start { from_device: ctx.own.device_id.clone(), method: StartMethod::Sas(offer.clone()) });
        // CM-04: as S, the commitment covers exactly the content we send (canonical as written).
        let start_content = Some(encode(&msg, ctx).into_string());
        let c = Common { device, we_start: true, start_content, offer, pinned };
        (Sas { c, phase: Phase::AwaitAccept(eph) }, msg)
    }

    /// Their start arrived: we are A. In a request flow the user already agreed, so we accept at
    /// once; a legacy start waits for the user (ST-06).
    pub(crate) fn from_their_start(
        device: String,
        offer: SasOffer,
        content: Option<String>,
        pinned: Pinned,
        ctx: &mut Ctx<'_>,
    ) -> Transition {
        let c = Common { device, we_start: false, start_content: content, offer, pinned };
        if ctx.origin.began_with_request() {
            c.user_accepts(ctx)
        } else {
            c.stay(Phase::AwaitUserAccept, Step::default())
        }
    }

    /// Our user accepts a legacy start.
    pub(crate) fn user_accepts(self: Box<Self>, ctx: &mut Ctx<'_>) -> Acted {
        match self.phase {
            Phase::AwaitUserAccept => Ok(self.c.user_accepts(ctx)),
            phase => Err(self.c.refuse(phase, "accept")),
        }
    }

    /// A start while SAS is already running: a collision (ST-03, ST-04) or a duplicate.
    pub(crate) fn on_start(self: Box<Self>, start: Start, raw: &Value, ctx: &mut Ctx<'_>) -> Transition {
        let Sas { c, phase } = *self;
        let StartMethod::Sas(offer) = start.method else {
            return c.fail(CancelCode::UnexpectedMessage, LocalCause::StartCollision);
        };
        if !c.we_start {
            // Two starts without a canonical form count as the same: neither can be accepted, and
            // the user's accept of the first ends the flow with `m.invalid_message` either way.
            return if start_content_for_commitment(raw, ctx.key) == c.start_content {
                c.dropped(phase, ctx, MsgKind::Start, DropReason::Duplicate)
            } else {
                c.unexpected(MsgKind::Start, phase.name())
            };
        }
        if we_win_tie_break(ctx, &start.from_device) {
            return c.dropped(phase, ctx, MsgKind::Start, DropReason::LostTieBreak);
        }
        if !matches!(phase, Phase::AwaitAccept(_)) {
            // They won the tie-break, but we already moved on with an accept of theirs: impossible
            // for an honest peer.
            return c.unexpected(MsgKind::Start, phase.name());
        }
        // We lost: our start is void (its key is dropped and zeroized); we accept theirs.
        let mut step = Step::default();
        step.events.push(Event::Started { flow: ctx.key.clone(), method: Method::SasV1, by_us: false });
        let content = start_content_for_commitment(raw, ctx.key);
        let (next, more) = Sas::from_their_start(c.device, offer, content, c.pinned, ctx);
        step.append(more);
        (next, step)
    }

    /// `accept`, `key`, `mac` and `done`.
    pub(crate) fn on_message(self: Box<Self>, msg: Msg, ctx: &mut Ctx<'_>) -> Transition {
        let Sas { c, phase } = *self;
        let kind = msg.kind();
        let name = phase.name();
        match (phase, msg) {
            (Phase::AwaitAccept(eph), Msg::Accept(accept)) => match check_accept(&c.offer, &accept) {
                Err(field) => c.fail(CancelCode::UnknownMethod, LocalCause::AcceptNotOffered(field)),
                Ok(choice) => {
                    // SQ-03: keep the commitment, send our key.
                    let mut step = Step::default();
                    step.send(Msg::Key(eph.public_b64()), c.peer());
                    c.stay(Phase::AwaitAccepterKey { eph, choice, accept }, step)
                }
            },
            (Phase::AwaitStarterKey { eph, choice }, Msg::Key(theirs)) => {
                // SQ-04: only now does A reveal its key.
                let ours = Msg::Key(eph.public_b64());
                c.exchange(eph, choice, theirs, None, Some(ours), ctx)
            }
            (Phase::AwaitAccepterKey { eph, choice, accept }, Msg::Key(theirs)) => {
                // SQ-05: the accepter's key must hash to its commitment.
                let expected =
                    c.start_content.as_deref().map(|s| crypto::commitment_of_canonical(&theirs, s)).unwrap_or_default();
                if !bool::from(expected.as_bytes().ct_eq(accept.commitment.as_bytes())) {
                    return c.fail(CancelCode::MismatchedCommitment, LocalCause::CommitmentMismatch);
                }
                c.exchange(eph, choice, theirs, Some(accept), None, ctx)
            }
            (Phase::AwaitAccepterKey { eph, choice, accept }, Msg::Accept(a)) if a == accept => {
                c.dropped(Phase::AwaitAccepterKey { eph, choice, accept }, ctx, kind, DropReason::Duplicate)
            }
            (Phase::Exchanged(x, stage), msg) => c.on_exchanged(x, stage, msg, ctx),
            (_, _) => c.unexpected(kind, name),
        }
    }

    /// The user confirmed that the SAS match (SQ-09): send our MAC.
    pub(crate) fn confirm(self: Box<Self>, ctx: &mut Ctx<'_>) -> Acted {
        let Sas { c, phase } = *self;
        match phase {
            Phase::Exchanged(x, Stage::Compare(theirs)) => {
                let mut step = Step::default();
                step.send(Msg::Mac(c.our_mac(&x.secret, x.choice.mac, ctx)), c.peer());
                Ok(match theirs {
                    Theirs::Nothing => c.stay(Phase::Exchanged(x, Stage::AwaitTheirMac), step),
                    Theirs::Mac(m) => c.finish(x, m, false, step, ctx),
                    Theirs::MacAndDone(m) => c.finish(x, m, true, step, ctx),
                })
            }
            phase => Err(c.refuse(phase, "confirm")),
        }
    }
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::AwaitAccept(_) => "waiting for the other device to accept SAS",
            Phase::AwaitUserAccept => "waiting for you to accept SAS",
            Phase::AwaitStarterKey { .. } | Phase::AwaitAccepterKey { .. } => "exchanging keys",
            Phase::Exchanged(_, stage) => stage.name(),
        }
    }
}

impl Common {
    fn peer(&self) -> Peer {
        Peer::Device(self.device.clone())
    }

    fn stay(self, phase: Phase, step: Step) -> Transition {
        (Next::Go(Box::new(Sas { c: self, phase })), step)
    }

    fn refuse(self, phase: Phase, action: &'static str) -> Box<Refused<Box<Sas>>> {
        let state = phase.name();
        Refused::wrong_state(Box::new(Sas { c: self, phase }), state, action)
    }

    fn fail(&self, code: CancelCode, cause: LocalCause) -> Transition {
        (Next::fail(self.peer(), code, cause), Step::default())
    }

    fn unexpected(&self, kind: MsgKind, state: &'static str) -> Transition {
        self.fail(CancelCode::UnexpectedMessage, LocalCause::Unexpected { message: kind.event_type(), state })
    }

    fn dropped(self, phase: Phase, ctx: &Ctx<'_>, kind: MsgKind, reason: DropReason) -> Transition {
        let step = Step::dropped(ctx, kind, reason);
        self.stay(phase, step)
    }

    /// A accepts the start (SQ-02): choose, commit to a fresh ephemeral key, send `accept`.
    fn user_accepts(self, ctx: &mut Ctx<'_>) -> Transition {
        let choice = match choose(&self.offer, &ctx.config.sas) {
            Ok(c) => c,
            Err(what) => return self.fail(CancelCode::UnknownMethod, LocalCause::NoCommonMethod(what)),
        };
        let eph = EphemeralKey::from_random(ctx.random());
        let Some(commitment) =
            self.start_content.as_deref().map(|s| crypto::commitment_of_canonical(&eph.public_b64(), s))
        else {
            let e = wire::WireError { field: "content", problem: wire::Problem::Invalid("no canonical JSON form") };
            return self.fail(CancelCode::InvalidMessage, LocalCause::Malformed(e));
        };
        let sas_methods: Vec<String> = SAS_METHODS
            .iter()
            .filter(|s| (**s == "emoji" && choice.emoji) || (**s == "decimal" && choice.decimal))
            .map(|s| (*s).to_owned())
            .collect();
        let accept = Accept {
            key_agreement_protocol: choice.key_agreement.as_str().to_owned(),
            hash: SHA256.to_owned(),
            message_authentication_code: choice.mac.as_str().to_owned(),
            short_authentication_string: sas_methods,
            commitment,
        };
        let mut step = Step::default();
        step.send(Msg::Accept(accept), self.peer());
        self.stay(Phase::AwaitStarterKey { eph, choice }, step)
    }

    /// A message once the keys are exchanged.
    fn on_exchanged(self, x: Box<Exchanged>, stage: Stage, msg: Msg, ctx: &mut Ctx<'_>) -> Transition {
        let kind = msg.kind();
        let name = stage.name();
        let duplicate = match &msg {
            Msg::Key(k) => *k == x.their_key,
            Msg::Accept(a) => x.their_accept.as_ref() == Some(a),
            Msg::Mac(mac) => match stage.their_mac() {
                Some(seen) if seen == mac => true,
                Some(_) => return self.unexpected(kind, name),
                None => false,
            },
            Msg::Done => matches!(stage, Stage::Compare(Theirs::MacAndDone(_))),
            _ => false,
        };
        if duplicate {
            return self.dropped(Phase::Exchanged(x, stage), ctx, kind, DropReason::Duplicate);
        }
        match (stage, msg) {
            (Stage::Compare(Theirs::Nothing), Msg::Mac(mac)) => {
                match self.check_mac(&x.secret, x.choice.mac, &mac, ctx) {
                    Err(cause) => self.fail(CancelCode::KeyMismatch, cause),
                    Ok(keys) => {
                        let stage = Stage::Compare(Theirs::Mac(CheckedMac { mac, keys }));
                        self.stay(Phase::Exchanged(x, stage), Step::default())
                    }
                }
            }
            (Stage::AwaitTheirMac, Msg::Mac(mac)) => match self.check_mac(&x.secret, x.choice.mac, &mac, ctx) {
                Err(cause) => self.fail(CancelCode::KeyMismatch, cause),
                Ok(keys) => self.finish(x, CheckedMac { mac, keys }, false, Step::default(), ctx),
            },
            (Stage::Compare(Theirs::Mac(m)), Msg::Done) => {
                self.stay(Phase::Exchanged(x, Stage::Compare(Theirs::MacAndDone(m))), Step::default())
            }
            (Stage::AwaitTheirDone(m), Msg::Done) => {
                // TR-01 again at the very end: keys replaced after our `done` are not trusted, and
                // since our `done` went out, the flow ends here without a cancel.
                if self.pinned.holds(ctx.their_keys, &self.device).is_err() {
                    return self.fail(CancelCode::KeyMismatch, LocalCause::KeysChangedAfterDone);
                }
                (Next::End(End { how: How::Verified(m.keys), peer: self.peer() }), Step::default())
            }
            (_, _) => self.unexpected(kind, name),
        }
    }

    /// SQ-11, SQ-12: `done` once we confirmed and their MAC verified, if the keys are still the
    /// pinned ones (TR-01); verified once both `done`s are exchanged (a legacy peer sends none).
    fn finish(
        self,
        x: Box<Exchanged>,
        theirs: CheckedMac,
        their_done: bool,
        mut step: Step,
        ctx: &mut Ctx<'_>,
    ) -> Transition {
        if let Err(cause) = self.pinned.holds(ctx.their_keys, &self.device) {
            return (Next::fail(self.peer(), CancelCode::KeyMismatch, cause), step);
        }
        step.send(Msg::Done, self.peer());
        step.events.push(done_sent_event(ctx, &self.device, &theirs.keys));
        if their_done || !ctx.origin.began_with_request() {
            return (Next::End(End { how: How::Verified(theirs.keys), peer: self.peer() }), step);
        }
        self.stay(Phase::Exchanged(x, Stage::AwaitTheirDone(theirs)), step)
    }

    fn exchange(
        self,
        eph: EphemeralKey,
        choice: Choice,
        theirs: String,
        their_accept: Option<Accept>,
        reply: Option<Msg>,
        ctx: &mut Ctx<'_>,
    ) -> Transition {
        let ours = eph.public_b64();
        // The key is consumed either way; a failed agreement ends the flow.
        let Ok(secret) = eph.agree(&theirs) else {
            return self.fail(CancelCode::InvalidMessage, LocalCause::NonContributoryKey);
        };
        let own = (ctx.own.user_id.as_str(), ctx.own.device_id.as_str(), ours.as_str());
        let other = (ctx.other_user, self.device.as_str(), theirs.as_str());
        let (s, a) = if self.we_start { (own, other) } else { (other, own) };
        let info = choice.key_agreement.sas_info(
            &Party { user_id: s.0, device_id: s.1, ephemeral_key: s.2 },
            &Party { user_id: a.0, device_id: a.1, ephemeral_key: a.2 },
            ctx.key.flow_id(),
        );
        let bytes = secret.sas_bytes(&info);
        // RS#6944: show only what was negotiated.
        let shown =
            (choice.emoji.then(|| crypto::emoji_indices(&bytes)), choice.decimal.then(|| crypto::decimals(&bytes)));
        let event = Event::Sas { flow: ctx.key.clone(), emoji: emoji_of(shown.0), decimals: shown.1 };
        let mut step = Step::default();
        if let Some(reply) = reply {
            step.send(reply, self.peer());
        }
        step.events.push(event);
        let x = Exchanged { secret, choice, their_key: theirs, their_accept, shown };
        self.stay(Phase::Exchanged(Box::new(x), Stage::Compare(Theirs::Nothing)), step)
    }

    /// Our `mac` (MC-01..MC-07): our device key, and our master key if this device trusts it.
    fn our_mac(&self, secret: &SharedSecret, method: MacMethod, ctx: &Ctx<'_>) -> MacMsg {
        let own = ctx.own;
        let master = own.master_key.as_ref().filter(|_| own.trusts_master_key).map(Ed25519PublicKey::to_base64);
        let mut keys = vec![(ed25519_key_id(&own.device_id), own.ed25519.to_base64())];
        if let Some(master) = master {
            keys.push((ed25519_key_id(&master), master));
        }
        let mut info =
            crypto::MacInfo::new((&own.user_id, &own.device_id), (ctx.other_user, &self.device), ctx.key.flow_id());
        let mac: BTreeMap<String, String> = keys
            .into_iter()
            .map(|(id, key)| {
                let value = secret.mac_encoded(method, &key, info.item(&id));
                (id, value)
            })
            .collect();
        let list = secret.mac_encoded(method, &key_list(&mac), info.item("KEY_IDS"));
        MacMsg { mac, keys: list }
    }

    /// Checks their `mac` against our own copies of their keys (SQ-10, MV-01..MV-04).
    fn check_mac(
        &self,
        secret: &SharedSecret,
        method: MacMethod,
        mac: &MacMsg,
        ctx: &Ctx<'_>,
    ) -> Result<Vec<VerifiedKey>, LocalCause> {
        let mut info = crypto::MacInfo::new(
            (ctx.other_user, &self.device),
            (&ctx.own.user_id, &ctx.own.device_id),
            ctx.key.flow_id(),
        );
        // MV-01: the key list first.
        if !secret.verify_mac(method, &key_list(&mac.mac), info.item("KEY_IDS"), &mac.keys) {
            return Err(LocalCause::KeyListMacMismatch);
        }
        let device_id = ed25519_key_id(&self.device);
        let master = self.pinned.master_key.as_ref().map(|k| {
            let b64 = k.to_base64();
            (ed25519_key_id(&b64), b64, k)
        });
        let mut verified = Vec::with_capacity(2);
        for (id, value) in &mac.mac {
            // MV-02: MAC over our own copy; MV-04: key IDs we have no key for are skipped.
            let (b64, key, kind) = if *id == device_id {
                (self.pinned.device_key.to_base64(), &self.pinned.device_key, KeyKind::Device)
            } else if let Some((_, b64, key)) = master.as_ref().filter(|(master_id, ..)| master_id == id) {
                (b64.clone(), *key, KeyKind::MasterKey)
            } else {
                continue;
            };
            if !secret.verify_mac(method, &b64, info.item(id), value) {
                return Err(LocalCause::KeyMacMismatch(id.clone()));
            }
            verified.push(VerifiedKey { key_id: id.clone(), key: key.clone(), kind });
        }
        if verified.is_empty() {
            return Err(LocalCause::NothingVerified);
        }
        Ok(verified)
    }
}

/// The `keys` input (MC-04, MV-01): the key IDs sorted and joined by commas (a `BTreeMap` of
/// `String`s iterates in that order).
fn key_list(mac: &BTreeMap<String, String>) -> String {
    let mut list = String::with_capacity(mac.keys().map(|id| id.len() + 1).sum());
    for (i, id) in mac.keys().enumerate() {
        if i > 0 {
            list.push(',');
        }
        list.push_str(id);
    }
    list
}

fn emoji_of(indices: Option<[u8; 7]>) -> Option<Vec<emoji::Emoji>> {
    indices.map(|i| i.iter().map(|&i| emoji::emoji(i)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::testing::{self, *};

    fn only(step: &Step) -> Msg {
        match &sent(step)[..] {
            [msg] => (*msg).clone(),
            other => panic!("expected one message, got {other:?}"),
        }
    }

    fn shown(step: &Step) -> (Option<Vec<emoji::Emoji>>, Option<[u16; 3]>) {
        step.events
            .iter()
            .find_map(|e| match e {
                Event::Sas { emoji, decimals, .. } => Some((emoji.clone(), *decimals)),
                _ => None,
            })
            .expect("the SAS is shown")
    }

    /// Alice starts SAS and Bob accepts; both exchange keys. Returns both states (comparing).
    fn exchanged(alice: &mut testing::Party, bob: &mut testing::Party) -> (Box<Sas>, Box<Sas>) {
        let pinned_by_alice = Pinned::pin(alice.their_keys.as_ref(), "B1").unwrap();
        let (a, start) = Sas::start("B1".into(), pinned_by_alice, &mut alice.ctx());
        let Msg::Start(Start { method: StartMethod::Sas(offer), .. }) = &start else { panic!() };
        let pinned_by_bob = Pinned::pin(bob.their_keys.as_ref(), "A1").unwrap();
        let (b, step) =
            going(Sas::from_their_start("A1".into(), offer.clone(), canonical(&start), pinned_by_bob, &mut bob.ctx()));
        let accept = only(&step);
        assert!(matches!(accept, Msg::Accept(_)), "in a request flow the start is accepted at once");
        let (a, step) = going(Box::new(a).on_message(accept, &mut alice.ctx()));
        let alice_key = only(&step);
        let (b, step) = going(b.on_message(alice_key, &mut bob.ctx()));
        let bob_key = only(&step);
        let bob_sees = shown(&step);
        let (a, step) = going(a.on_message(bob_key, &mut alice.ctx()));
        assert!(sent(&step).is_empty());
        assert_eq!(shown(&step), bob_sees, "both show the same emoji and numbers");
        (a, b)
    }

    #[test]
    fn both_roles_reach_the_same_sas_and_verify_after_both_dones() {
        let (mut alice, mut bob) = alice_and_bob();
        let (a, b) = exchanged(&mut alice, &mut bob);
        assert!(a.can_confirm() && b.can_confirm());
        let (a, step) = going(a.confirm(&mut alice.ctx()).unwrap());
        let alice_mac = only(&step);
        assert_eq!(a.project().0, FlowPhase::SasConfirmed);
        // Bob got Alice's MAC before his user confirmed: it is kept until then.
        let (b, step) = going(b.on_message(alice_mac, &mut bob.ctx()));
        assert!(sent(&step).is_empty());
        let (b, step) = going(b.confirm(&mut bob.ctx()).unwrap());
        let (bob_mac, bob_done) = match &sent(&step)[..] {
            [m @ Msg::Mac(_), Msg::Done] => ((*m).clone(), Msg::Done),
            other => panic!("{other:?}"),
        };
        assert!(matches!(&step.events[..], [Event::DoneSent { keys, .. }] if keys.len() == 2));
        assert!(b.done_sent());
        let (a, step) = going(a.on_message(bob_mac, &mut alice.ctx()));
        assert_eq!(sent(&step), [&Msg::Done]);
        let Event::DoneSent { keys: announced, .. } = &step.events[0] else { panic!() };
        let announced = announced.clone();
        let (how, _) = ending(a.on_message(bob_done, &mut alice.ctx()));
        assert!(matches!(how, How::Verified(keys) if keys == announced), "Done reports the announced keys");
        let (how, _) = ending(b.on_message(Msg::Done, &mut bob.ctx()));
        assert!(matches!(how, How::Verified(keys) if keys.iter().any(|k| k.key == alice.own.ed25519)));
    }

    #[test]
    fn a_key_that_does_not_match_its_commitment_is_refused() {
        let (mut alice, mut bob) = alice_and_bob();
        let pinned = Pinned::pin(alice.their_keys.as_ref(), "B1").unwrap();
        let (a, start) = Sas::start("B1".into(), pinned, &mut alice.ctx());
        let Msg::Start(Start { method: StartMethod::Sas(offer), .. }) = &start else { panic!() };
        let pinned = Pinned::pin(bob.their_keys.as_ref(), "A1").unwrap();
        let (_, step) =
            going(Sas::from_their_start("A1".into(), offer.clone(), canonical(&start), pinned, &mut bob.ctx()));
        let (a, _) = going(Box::new(a).on_message(only(&step), &mut alice.ctx()));
        // Not the key Bob committed to.
        let other = EphemeralKey::from_random([9; 32]).public_b64();
        let (how, _) = ending(a.on_message(Msg::Key(other), &mut alice.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::MismatchedCommitment, LocalCause::CommitmentMismatch)));
    }

    #[test]
    fn colliding_starts_are_won_by_the_smaller_user_id() {
        let (mut alice, mut bob) = alice_and_bob();
        let (a, a_start) =
            Sas::start("B1".into(), Pinned::pin(alice.their_keys.as_ref(), "B1").unwrap(), &mut alice.ctx());
        let (b, b_start) = Sas::start("A1".into(), Pinned::pin(bob.their_keys.as_ref(), "A1").unwrap(), &mut bob.ctx());
        let (Msg::Start(a_start_msg), Msg::Start(b_start_msg)) = (a_start.clone(), b_start.clone()) else { panic!() };
        // @alice < @bob: Alice's start stands, Bob's is dropped on her side...
        let (_, step) = going(Box::new(a).on_start(b_start_msg, &raw(&b_start), &mut alice.ctx()));
        assert!(matches!(&step.events[..], [Event::Dropped { reason: DropReason::LostTieBreak, .. }]));
        // ...and Bob drops his own and accepts hers.
        let (b, step) = going(Box::new(b).on_start(a_start_msg, &raw(&a_start), &mut bob.ctx()));
        assert!(matches!(&sent(&step)[..], [Msg::Accept(_)]));
        assert!(matches!(&step.events[0], Event::Started { by_us: false, .. }));
        assert!(!b.c.we_start);
        // A start of another method is a collision of different methods.
        let (a, _) = Sas::start("B1".into(), Pinned::pin(alice.their_keys.as_ref(), "B1").unwrap(), &mut alice.ctx());
        let recip = Start { from_device: "B1".into(), method: StartMethod::Reciprocate { secret: "AAAA".into() } };
        let (how, _) = ending(Box::new(a).on_start(recip, &Value::Null, &mut alice.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::UnexpectedMessage, LocalCause::StartCollision)));
    }

    #[test]
    fn duplicates_are_dropped_and_out_of_order_messages_cancel() {
        let (mut alice, mut bob) = alice_and_bob();
        let (a, b) = exchanged(&mut alice, &mut bob);
        // Done before any MAC.
        let (how, _) = ending(b.on_message(Msg::Done, &mut bob.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::UnexpectedMessage, LocalCause::Unexpected { .. })));
        let (_, step) = going(a.confirm(&mut alice.ctx()).unwrap());
        let Msg::Mac(mac) = only(&step) else { panic!() };
        // A MAC from another exchange (other ephemeral keys) does not verify.
        let (mut alice2, mut bob2) = alice_and_bob();
        alice2.entropy = Bytes(40);
        let (_, b2) = exchanged(&mut alice2, &mut bob2);
        let (how, _) = ending(b2.on_message(Msg::Mac(mac), &mut bob2.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::KeyMismatch, LocalCause::KeyListMacMismatch)));
    }

    #[test]
    fn a_repeated_mac_is_a_duplicate_and_a_different_one_unexpected() {
        let (mut alice, mut bob) = alice_and_bob();
        let (a, b) = exchanged(&mut alice, &mut bob);
        let (_, step) = going(a.confirm(&mut alice.ctx()).unwrap());
        let Msg::Mac(mac) = only(&step) else { panic!() };
        let (b, _) = going(b.on_message(Msg::Mac(mac.clone()), &mut bob.ctx()));
        let (b, step) = going(b.on_message(Msg::Mac(mac.clone()), &mut bob.ctx()));
        assert!(matches!(&step.events[..], [Event::Dropped { reason: DropReason::Duplicate, .. }]));
        let mut other = mac;
        other.keys = "AAAA".into();
        let (how, _) = ending(b.on_message(Msg::Mac(other), &mut bob.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::UnexpectedMessage, _)));
    }

    #[test]
    fn keys_replaced_after_our_done_end_the_flow_without_verifying() {
        let (mut alice, mut bob) = alice_and_bob();
        let (a, b) = exchanged(&mut alice, &mut bob);
        let (_, step) = going(a.confirm(&mut alice.ctx()).unwrap());
        let (b, _) = going(b.on_message(only(&step), &mut bob.ctx()));
        let (b, _) = going(b.confirm(&mut bob.ctx()).unwrap());
        assert!(b.done_sent());
        // Alice's device key changes in Bob's view before her done arrives.
        bob.their_keys.as_mut().unwrap().devices.insert("A1".into(), key(77));
        let (how, _) = ending(b.on_message(Msg::Done, &mut bob.ctx()));
        assert!(matches!(how, How::Failed(CancelCode::KeyMismatch, LocalCause::KeysChangedAfterDone)));
    }

    #[test]
    fn confirming_before_the_keys_are_exchanged_is_refused() {
        let (mut alice, _) = alice_and_bob();
        let (a, _) = Sas::start("B1".into(), Pinned::pin(alice.their_keys.as_ref(), "B1").unwrap(), &mut alice.ctx());
        let refused = Box::new(a).confirm(&mut alice.ctx()).unwrap_err();
        assert!(matches!(refused.error, crate::types::ActionError::WrongState { action: "confirm", .. }));
        assert!(!refused.state.can_confirm());
    }
}
