//! The `m.sas.v1` flow ([spec: SAS](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification)),
//! from `start` to `done`, for both roles: S sends the (winning) `start`, A sends `accept`.

use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::cancel::{CancelCode, LocalCause};
use crate::crypto::{self, EphemeralKey, KeyAgreement, MacMethod, Party, SharedSecret};
use crate::emoji;
use crate::machine::{Flow, Machine};
use crate::types::{DropReason, Event, FlowKey, KeyKind, SasParams, VerifiedKey};
use crate::wire::{self, Accept, Envelope, MacMsg, Msg, SasOffer, Start, StartMethod};

/// The SAS methods we know, in our order.
const SAS_METHODS: [&str; 2] = ["decimal", "emoji"];
const SHA256: &str = "sha256";

/// The other side's keys, fixed by value when SAS starts (TR-01).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pinned {
    pub(crate) device_key: String,
    pub(crate) master_key: Option<String>,
}

/// What the accepter chose (SA-05).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Choice {
    key_agreement: KeyAgreement,
    mac: MacMethod,
    emoji: bool,
    decimal: bool,
}

pub(crate) struct Exchanged {
    secret: SharedSecret,
    their_key: String,
    confirmed: bool,
    their_mac: Option<(MacMsg, Vec<VerifiedKey>)>,
    done_sent: bool,
    their_done: bool,
}

impl Exchanged {
    fn name(&self) -> &'static str {
        if !self.confirmed {
            "waiting for you to compare the emoji"
        } else if self.their_mac.is_none() {
            "waiting for the other device to confirm"
        } else {
            "waiting for the other device to finish"
        }
    }
}

pub(crate) enum SasPhase {
    /// S: start sent, waiting for `accept`.
    AwaitAccept(EphemeralKey),
    /// A, legacy start-first flow: waiting for our user to accept the start.
    AwaitUserAccept,
    /// A: `accept` sent, waiting for S's `key` (SQ-04: our key goes only after theirs).
    AwaitStarterKey(EphemeralKey),
    /// S: `key` sent, waiting for A's `key` to check the commitment.
    AwaitAccepterKey(EphemeralKey),
    /// Keys exchanged: SAS shown, MACs and `done` to exchange.
    Exchanged(Box<Exchanged>),
    /// Only during a transition.
    Moving,
}

impl std::fmt::Debug for SasPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl SasPhase {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::AwaitAccept(_) => "waiting for the other device to accept SAS",
            Self::AwaitUserAccept => "waiting for you to accept SAS",
            Self::AwaitStarterKey(_) | Self::AwaitAccepterKey(_) => "exchanging keys",
            Self::Exchanged(x) => x.name(),
            Self::Moving => "changing state",
        }
    }
}

/// SAS state of one flow.
#[derive(Debug)]
pub(crate) struct Sas {
    we_start: bool,
    starter_device: String,
    /// The start content hashed for the commitment (CM-02..CM-04).
    start_content: Value,
    offer: SasOffer,
    choice: Option<Choice>,
    /// S: the accepter's commitment. A: our accept, to recognise duplicates.
    accept: Option<Accept>,
    pinned: Pinned,
    pub(crate) phase: SasPhase,
}

/// What a SAS transition asks the machine to do.
#[derive(Default)]
pub(crate) struct SasStep {
    pub(crate) send: Vec<Msg>,
    pub(crate) events: Vec<Event>,
    pub(crate) fail: Option<(CancelCode, LocalCause)>,
    pub(crate) verified: Option<Vec<VerifiedKey>>,
}

impl SasStep {
    fn fail(code: CancelCode, cause: LocalCause) -> Self {
        Self { fail: Some((code, cause)), ..Self::default() }
    }

    fn unexpected(msg: &Msg, state: &'static str) -> Self {
        Self::fail(CancelCode::UnexpectedMessage, LocalCause::Unexpected { message: msg.kind().event_type(), state })
    }

    fn drop(flow: &Flow, msg: &Msg, reason: DropReason) -> Self {
        let event =
            Event::Dropped { sender: flow.other_user.clone(), event_type: msg.kind().event_type().into(), reason };
        Self { events: vec![event], ..Self::default() }
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

/// The start content as the commitment must hash it: as received, with the in-room relation added
/// back if an encrypted event's decrypted content lacks it (CM-03, CM-04).
pub(crate) fn start_content_for_commitment(content: &Value, key: &FlowKey) -> Value {
    let mut content = content.clone();
    if let (FlowKey::Room { event_id, .. }, Some(obj)) = (key, content.as_object_mut()) {
        obj.entry("m.relates_to").or_insert_with(|| json!({ "rel_type": "m.reference", "event_id": event_id }));
    }
    content
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
    /// We start SAS (SQ-01): a fresh ephemeral key and our offer.
    pub(crate) fn start(m: &mut Machine, flow: &Flow, pinned: Pinned) -> (Sas, Msg) {
        let eph = EphemeralKey::from_random(m.random_bytes());
        let offer = our_offer(&m.config.sas);
        let msg = Msg::Start(Start { from_device: m.own.device_id.clone(), method: StartMethod::Sas(offer.clone()) });
        let envelope = match &flow.key {
            FlowKey::ToDevice { transaction_id, .. } => Envelope::ToDevice(transaction_id.clone()),
            FlowKey::Room { event_id, .. } => Envelope::Room(Some(event_id.clone())),
        };
        // CM-04: as S, the commitment covers exactly the content we send.
        let start_content = wire::encode(&msg, &envelope).1;
        let sas = Sas {
            we_start: true,
            starter_device: m.own.device_id.clone(),
            start_content,
            offer,
            choice: None,
            accept: None,
            pinned,
            phase: SasPhase::AwaitAccept(eph),
        };
        (sas, msg)
    }

    /// Their start arrived: we are A. In a request flow the user already agreed, so we accept at
    /// once; a legacy start waits for the user (ST-06).
    pub(crate) fn from_their_start(
        m: &mut Machine,
        flow: &Flow,
        start: &Start,
        content: Value,
        pinned: Pinned,
    ) -> (Sas, SasStep) {
        let StartMethod::Sas(offer) = &start.method else { unreachable!("only SAS starts reach here") };
        let mut sas = Sas {
            we_start: false,
            starter_device: start.from_device.clone(),
            start_content: content,
            offer: offer.clone(),
            choice: None,
            accept: None,
            pinned,
            phase: SasPhase::AwaitUserAccept,
        };
        let step = if flow.from_request { sas.user_accepts(m) } else { SasStep::default() };
        (sas, step)
    }

    /// A accepts the start (SQ-02): choose, commit to a fresh ephemeral key, send `accept`.
    pub(crate) fn user_accepts(&mut self, m: &mut Machine) -> SasStep {
        let choice = match choose(&self.offer, &m.config.sas) {
            Ok(c) => c,
            Err(what) => {
                return SasStep::fail(CancelCode::UnknownMethod, LocalCause::NoCommonMethod(what));
            }
        };
        let eph = EphemeralKey::from_random(m.random_bytes());
        let commitment = match crypto::commitment(&eph.public_b64(), &self.start_content) {
            Ok(c) => c,
            Err(_) => {
                let e = wire::WireError { field: "content", problem: wire::Problem::Invalid("no canonical JSON form") };
                return SasStep::fail(CancelCode::InvalidMessage, LocalCause::Malformed(e));
            }
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
        self.choice = Some(choice);
        self.accept = Some(accept.clone());
        self.phase = SasPhase::AwaitStarterKey(eph);
        SasStep { send: vec![Msg::Accept(accept)], ..SasStep::default() }
    }

    /// Whether the user can now confirm or deny the SAS.
    pub(crate) fn can_confirm(&self) -> bool {
        matches!(&self.phase, SasPhase::Exchanged(x) if !x.confirmed)
    }

    /// A start while SAS is already running: a collision (ST-03, ST-04) or a duplicate.
    pub(crate) fn on_start(&mut self, m: &mut Machine, flow: &Flow, start: &Start, raw: &Value) -> SasStep {
        let msg = Msg::Start(start.clone());
        let StartMethod::Sas(_) = &start.method else {
            return SasStep::fail(CancelCode::UnexpectedMessage, LocalCause::StartCollision);
        };
        if !self.we_start {
            let same = start_content_for_commitment(raw, &flow.key) == self.start_content;
            return if same {
                SasStep::drop(flow, &msg, DropReason::Duplicate)
            } else {
                SasStep::unexpected(&msg, self.phase.name())
            };
        }
        // ST-03, ST-05: the smaller user ID wins; for one user, the smaller device ID. Byte order
        // of UTF-8 strings is code-point order.
        let we_win = if m.own.user_id != flow.other_user {
            m.own.user_id < flow.other_user
        } else {
            m.own.device_id < start.from_device
        };
        if we_win {
            return SasStep::drop(flow, &msg, DropReason::LostTieBreak);
        }
        if !matches!(self.phase, SasPhase::AwaitAccept(_)) {
            // They won the tie-break, but we already moved on with an accept of ours: impossible
            // for an honest peer.
            return SasStep::unexpected(&msg, self.phase.name());
        }
        // We lost: our start is void (its key is dropped and zeroized); we accept theirs.
        let (mut sas, mut step) =
            Sas::from_their_start(m, flow, start, start_content_for_commitment(raw, &flow.key), self.pinned.clone());
        std::mem::swap(self, &mut sas);
        step.events.insert(0, Event::Started { flow: flow.key.clone(), method: "m.sas.v1".into(), by_us: false });
        step
    }

    /// `accept`, `key`, `mac` and `done`.
    pub(crate) fn on_message(&mut self, m: &mut Machine, flow: &Flow, msg: Msg) -> SasStep {
        let phase = std::mem::replace(&mut self.phase, SasPhase::Moving);
        let (phase, step) = match (phase, msg) {
            (SasPhase::AwaitAccept(eph), Msg::Accept(accept)) => {
                match check_accept(&self.offer, &accept) {
                    Err(field) => (
                        SasPhase::AwaitAccept(eph),
                        SasStep::fail(CancelCode::UnknownMethod, LocalCause::AcceptNotOffered(field)),
                    ),
                    Ok(choice) => {
                        // SQ-03: store the commitment, send our key.
                        self.choice = Some(choice);
                        self.accept = Some(accept);
                        let key = Msg::Key(eph.public_b64());
                        (SasPhase::AwaitAccepterKey(eph), SasStep { send: vec![key], ..SasStep::default() })
                    }
                }
            }
            (SasPhase::AwaitStarterKey(eph), Msg::Key(theirs)) => {
                // SQ-04: only now does A reveal its key.
                let ours = eph.public_b64();
                self.exchange(m, flow, eph, theirs, Some(Msg::Key(ours)))
            }
            (SasPhase::AwaitAccepterKey(eph), Msg::Key(theirs)) => {
                // SQ-05: the accepter's key must hash to its commitment.
                let committed = self.accept.as_ref().map(|a| a.commitment.as_str()).unwrap_or_default();
                let expected = crypto::commitment(&theirs, &self.start_content).unwrap_or_default();
                if !bool::from(expected.as_bytes().ct_eq(committed.as_bytes())) {
                    (
                        SasPhase::AwaitAccepterKey(eph),
                        SasStep::fail(CancelCode::MismatchedCommitment, LocalCause::CommitmentMismatch),
                    )
                } else {
                    self.exchange(m, flow, eph, theirs, None)
                }
            }
            (SasPhase::Exchanged(mut x), Msg::Mac(mac)) => {
                let step = if let Some((seen, _)) = &x.their_mac {
                    if *seen == mac {
                        SasStep::drop(flow, &Msg::Mac(mac), DropReason::Duplicate)
                    } else {
                        SasStep::unexpected(&Msg::Mac(mac), x.name())
                    }
                } else {
                    match self.check_mac(m, flow, &x.secret, &mac) {
                        Err(cause) => SasStep::fail(CancelCode::KeyMismatch, cause),
                        Ok(keys) => {
                            x.their_mac = Some((mac, keys));
                            self.try_finish(m, flow, &mut x)
                        }
                    }
                };
                (SasPhase::Exchanged(x), step)
            }
            (SasPhase::Exchanged(mut x), Msg::Done) => {
                let step = if x.their_mac.is_none() {
                    SasStep::unexpected(&Msg::Done, x.name())
                } else if x.their_done {
                    SasStep::drop(flow, &Msg::Done, DropReason::Duplicate)
                } else {
                    x.their_done = true;
                    self.try_finish(m, flow, &mut x)
                };
                (SasPhase::Exchanged(x), step)
            }
            (SasPhase::Exchanged(x), Msg::Key(k)) if k == x.their_key => {
                (SasPhase::Exchanged(x), SasStep::drop(flow, &Msg::Key(k), DropReason::Duplicate))
            }
            (
                phase @ (SasPhase::AwaitAccepterKey(_) | SasPhase::AwaitStarterKey(_) | SasPhase::Exchanged(_)),
                Msg::Accept(a),
            ) if self.we_start && self.accept.as_ref() == Some(&a) => {
                (phase, SasStep::drop(flow, &Msg::Accept(a), DropReason::Duplicate))
            }
            (phase, msg) => {
                let step = SasStep::unexpected(&msg, phase.name());
                (phase, step)
            }
        };
        self.phase = phase;
        step
    }

    /// The user confirmed that the SAS match (SQ-09): send our MAC.
    pub(crate) fn confirm(&mut self, m: &mut Machine, flow: &Flow) -> SasStep {
        let SasPhase::Exchanged(mut x) = std::mem::replace(&mut self.phase, SasPhase::Moving) else {
            unreachable!("confirm is only offered once keys are exchanged")
        };
        x.confirmed = true;
        let mac = self.our_mac(m, flow, &x.secret);
        let mut step = self.try_finish(m, flow, &mut x);
        step.send.insert(0, Msg::Mac(mac));
        self.phase = SasPhase::Exchanged(x);
        step
    }

    fn exchange(
        &mut self,
        m: &mut Machine,
        flow: &Flow,
        eph: EphemeralKey,
        theirs: String,
        reply: Option<Msg>,
    ) -> (SasPhase, SasStep) {
        let ours = eph.public_b64();
        let secret = match eph.agree(&theirs) {
            Ok(s) => s,
            // The key is consumed either way; the flow is over.
            Err(_) => {
                return (SasPhase::Moving, SasStep::fail(CancelCode::InvalidMessage, LocalCause::NonContributoryKey));
            }
        };
        let choice = self.choice.clone().expect("choice made before keys");
        let own = (m.own.user_id.as_str(), m.own.device_id.as_str(), ours.as_str());
        let other_device = flow.other_device.as_deref().unwrap_or_default();
        let other = (flow.other_user.as_str(), other_device, theirs.as_str());
        let (s, a) = if self.we_start { (own, other) } else { (other, own) };
        let info = choice.key_agreement.sas_info(
            &Party { user_id: s.0, device_id: s.1, ephemeral_key: s.2 },
            &Party { user_id: a.0, device_id: a.1, ephemeral_key: a.2 },
            flow.key.flow_id(),
        );
        debug_assert_eq!(s.1, self.starter_device);
        let bytes = secret.sas_bytes(&info);
        // RS#6944: show only what was negotiated.
        let event = Event::Sas {
            flow: flow.key.clone(),
            emoji: choice.emoji.then(|| crypto::emoji_indices(&bytes).iter().map(|&i| emoji::emoji(i)).collect()),
            decimals: choice.decimal.then(|| crypto::decimals(&bytes)),
        };
        let x = Exchanged {
            secret,
            their_key: theirs,
            confirmed: false,
            their_mac: None,
            done_sent: false,
            their_done: false,
        };
        (
            SasPhase::Exchanged(Box::new(x)),
            SasStep { send: reply.into_iter().collect(), events: vec![event], ..SasStep::default() },
        )
    }

    /// Our `mac` (MC-01..MC-07): our device key, and our master key if this device trusts it.
    fn our_mac(&self, m: &Machine, flow: &Flow, secret: &SharedSecret) -> MacMsg {
        let method = self.choice.as_ref().expect("choice made").mac;
        let mut keys = vec![(format!("ed25519:{}", m.own.device_id), m.own.ed25519.clone())];
        if let (Some(msk), true) = (&m.own.master_key, m.own.trusts_master_key) {
            keys.push((format!("ed25519:{msk}"), msk.clone()));
        }
        keys.sort();
        let sender = (m.own.user_id.as_str(), m.own.device_id.as_str());
        let receiver = (flow.other_user.as_str(), flow.other_device.as_deref().unwrap_or_default());
        let flow_id = flow.key.flow_id();
        let ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
        let list = secret.mac_encoded(method, &ids.join(","), &crypto::mac_info(sender, receiver, flow_id, "KEY_IDS"));
        let mac = keys
            .iter()
            .map(|(id, key)| {
                (id.clone(), secret.mac_encoded(method, key, &crypto::mac_info(sender, receiver, flow_id, id)))
            })
            .collect();
        MacMsg { mac, keys: list }
    }

    /// Checks their `mac` against our own copies of their keys (SQ-10, MV-01..MV-04).
    fn check_mac(
        &self,
        m: &Machine,
        flow: &Flow,
        secret: &SharedSecret,
        mac: &MacMsg,
    ) -> Result<Vec<VerifiedKey>, LocalCause> {
        let method = self.choice.as_ref().expect("choice made").mac;
        let other_device = flow.other_device.as_deref().unwrap_or_default();
        let sender = (flow.other_user.as_str(), other_device);
        let receiver = (m.own.user_id.as_str(), m.own.device_id.as_str());
        let flow_id = flow.key.flow_id();
        // MV-01: the key list first (BTreeMap keys are sorted lexicographically).
        let ids: Vec<&str> = mac.mac.keys().map(String::as_str).collect();
        if !secret.verify_mac(
            method,
            &ids.join(","),
            &crypto::mac_info(sender, receiver, flow_id, "KEY_IDS"),
            &mac.keys,
        ) {
            return Err(LocalCause::KeyListMacMismatch);
        }
        let device_id = format!("ed25519:{other_device}");
        let master_id = self.pinned.master_key.as_ref().map(|k| format!("ed25519:{k}"));
        let mut verified = Vec::new();
        for (id, value) in &mac.mac {
            // MV-02: MAC over our own copy; MV-04: key IDs we have no key for are skipped.
            let (key, kind) = if *id == device_id {
                (&self.pinned.device_key, KeyKind::Device)
            } else if Some(id) == master_id.as_ref() {
                (self.pinned.master_key.as_ref().expect("master id implies key"), KeyKind::MasterKey)
            } else {
                continue;
            };
            if !secret.verify_mac(method, key, &crypto::mac_info(sender, receiver, flow_id, id), value) {
                return Err(LocalCause::KeyMacMismatch(id.clone()));
            }
            verified.push(VerifiedKey { key_id: id.clone(), key: key.clone(), kind });
        }
        if verified.is_empty() {
            return Err(LocalCause::NothingVerified);
        }
        Ok(verified)
    }

    /// SQ-11, SQ-12: `done` once we confirmed and their MAC verified; verified once both `done`s
    /// are exchanged (a legacy start-first peer sends none).
    fn try_finish(&mut self, m: &Machine, flow: &Flow, x: &mut Exchanged) -> SasStep {
        let mut step = SasStep::default();
        let Some((_, keys)) = &x.their_mac else {
            return step;
        };
        if !x.confirmed {
            return step;
        }
        if !x.done_sent {
            if !m.keys_unchanged(flow, &self.pinned) {
                return SasStep::fail(CancelCode::KeyMismatch, LocalCause::KeysChanged);
            }
            x.done_sent = true;
            step.send.push(Msg::Done);
        }
        if x.their_done || !flow.from_request {
            step.verified = Some(keys.clone());
        }
        step
    }
}
