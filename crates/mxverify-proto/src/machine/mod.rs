//! The verification machine: every flow of this device, keyed by flow, driven by events, user
//! actions and the caller's clock ([spec: key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)).
//!
//! The machine never performs I/O: inputs are [`Machine::receive`], the user actions, and
//! [`Machine::handle_timeout`]; outputs are drained with [`Machine::poll_outgoing`] and
//! [`Machine::poll_event`], and [`Machine::next_deadline`] says when to call back.
//!
//! Inside, the machine is a router. The flows themselves are state types with pure transitions
//! (`crate::flow`); the machine keeps the flow table, the key book (known keys, held events,
//! outstanding key requests), the cancel gate (the error-loop rule and the memory it needs), the
//! timer table (the only source of deadlines), and turns messages into wire events.

mod gate;
mod keybook;
mod table;
mod timers;

use std::collections::{HashMap, VecDeque};

use crate::cancel::{CancelCode, CancelInfo, LocalCause};
use crate::flow::{Ctx, End, Ended, Finished, Flow, How, Incoming, Next, Origin, Peer, Ready, Requested, State, Step};
use crate::types::*;
use crate::wire::{self, Envelope, Method, Methods, Msg, MsgKind, Request, StartMethod};
use gate::{CancelGate, FlowStatus, Trigger};
use keybook::{Hold, KeyBook};
use table::FlowTable;
use timers::{FlowId, Timer, TimerTable};

/// How many flows the machine remembers with one other user at most, ended ones included, before
/// a flow they open forgets their oldest ended one early (or, if all are in progress, is dropped).
/// Without a bound, one device sending requests faster than its ended flows are forgotten would
/// grow the table without limit and make each new request look through all of its earlier ones
/// (CX-03); no real user has this many verifications with us at once.
pub(crate) const FLOWS_PER_USER: usize = 64;

#[derive(Debug)]
struct PendingRoomRequest {
    room_id: String,
    user_id: String,
}

/// Everything one device needs to run any number of verifications at once: the state of every
/// flow, what it knows of other users' keys, and every deadline.
///
/// Inputs are [`Machine::receive`], the user actions, [`Machine::update_user_keys`] and
/// [`Machine::handle_timeout`]; each takes the caller's `now` and first ends what is due at it.
/// Outputs are drained with [`Machine::poll_event`] and [`Machine::poll_outgoing`]: handle the
/// events of an input before sending the messages it queued (a trust record persisted on
/// [`Event::DoneSent`] must be on disk before our `done` goes out). [`Machine::next_deadline`]
/// says when to call [`Machine::handle_timeout`]. The crate documentation has a complete example.
///
/// `Machine` is `Send`, so it can live in a task of its own; it is not `Sync` (every input takes
/// `&mut self`).
///
/// ```
/// use mxverify_proto::*;
///
/// struct Os; // stands for the operating system's secure random source
/// impl Entropy for Os {
///     fn fill(&mut self, buf: &mut [u8]) {
///         buf.fill(4); // illustration only: use real random bytes
///     }
/// }
/// let own = OwnIdentity {
///     user_id: "@bot:example.org".into(),
///     device_id: "BOTDEVICE".into(),
///     ed25519: Ed25519PublicKey::from_bytes([1; 32]),
///     master_key: None,
///     trusts_master_key: false,
/// };
/// let mut machine = Machine::new(own, Config::default(), Box::new(Os));
/// let now = 1_700_000_000_000;
/// let flow = machine.request_to_device("@alice:example.org", &["PHONE".into()], now)?;
/// // The machine asks for Alice's keys, reports the request, and has a message to send.
/// assert!(matches!(machine.poll_event(), Some(Event::KeysNeeded { .. })));
/// assert!(matches!(machine.poll_event(), Some(Event::RequestSent { .. })));
/// let out = machine.poll_outgoing().unwrap();
/// assert_eq!(out.event_type, "m.key.verification.request");
/// assert!(matches!(out.destination, Destination::ToDevice { .. }));
/// // Nobody answers: at the deadline the machine gives up and tells Alice's device.
/// assert_eq!(machine.next_deadline(), Some(now + 10 * 60_000));
/// machine.handle_timeout(now + 10 * 60_000);
/// assert_eq!(machine.flow(&flow).unwrap().cancel.unwrap().code, CancelCode::Timeout);
/// assert_eq!(machine.poll_outgoing().unwrap().event_type, "m.key.verification.cancel");
/// # Ok::<(), ActionError>(())
/// ```
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework), [SAS](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification),
/// [QR codes](https://spec.matrix.org/v1.19/client-server-api/#qr-codes).
pub struct Machine {
    own: OwnIdentity,
    config: Config,
    entropy: Box<dyn Entropy + Send>,
    flows: FlowTable,
    pending_room: HashMap<u64, PendingRoomRequest>,
    keys: KeyBook,
    gate: CancelGate,
    timers: TimerTable,
    outgoing: VecDeque<Outgoing>,
    events: VecDeque<Event>,
    next_id: u64,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("own", &self.own).field("flows", &self.flows.len()).finish_non_exhaustive()
    }
}

impl Machine {
    /// A machine for this device. `entropy` supplies every random byte (transaction ids,
    /// ephemeral keys, QR secrets).
    #[must_use]
    pub fn new(own: OwnIdentity, config: Config, entropy: Box<dyn Entropy + Send>) -> Self {
        Self {
            flows: FlowTable::new(config.methods.clone()),
            own,
            config,
            entropy,
            pending_room: HashMap::new(),
            keys: KeyBook::default(),
            gate: CancelGate::default(),
            timers: TimerTable::default(),
            outgoing: VecDeque::new(),
            events: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Our identity.
    #[must_use]
    pub fn own_identity(&self) -> &OwnIdentity {
        &self.own
    }

    /// Replaces what we know of our own identity (e.g. after cross-signing was set up). Flows act
    /// on it when our keys next arrive ([`Machine::update_user_keys`] for our own user).
    pub fn set_own_identity(&mut self, own: OwnIdentity) {
        self.own = own;
    }

    /// Gives the machine a user's keys (already checked by the caller); events held for them are
    /// processed now (principle: never drop a request for lack of keys). A master key replaced by
    /// another one (or removed) is reported with [`Event::IdentityChanged`], and every flow with
    /// that user in progress fails with `m.key_mismatch`: the spec requires telling the user of a
    /// changed identity, and never trusting keys that changed during a verification.
    ///
    /// Flows that were waiting for these keys act now: a ready flow shows its QR code, a scanned
    /// code is checked. Our own keys concern every user's flows (our code shows our master key):
    /// give the machine our new identity ([`Machine::set_own_identity`]) before them. Either way
    /// only the flows waiting are looked at, however many the machine holds.
    pub fn update_user_keys(&mut self, user_id: &str, keys: UserKeys, now: Millis) {
        self.handle_timeout(now);
        let new_master = keys.master_key.clone();
        let updated = self.keys.update(user_id, keys);
        if let Some(old_master_key) = updated.replaced_master {
            self.events.push_back(Event::IdentityChanged {
                user_id: user_id.to_owned(),
                old_master_key,
                new_master_key: new_master,
            });
            for id in self.flows.in_progress_with(user_id) {
                self.transition(id, Trigger::Local, false, None, now, |state, _| {
                    (Next::fail(state.into_peer(), CancelCode::KeyMismatch, LocalCause::KeysChanged), Step::default())
                });
            }
        }
        for held in updated.released {
            self.timers.stop(Timer::Held(held.id));
            self.receive_inner(held.event, now, true);
        }
        // Ready flows that could not show a QR code for lack of keys may now; a scan that waited
        // for the other user's keys is checked when they are theirs.
        let waiting = self.flows.awaiting_keys((user_id != self.own.user_id).then_some(user_id));
        for id in waiting {
            self.transition(id, Trigger::Local, false, None, now, |state, ctx| {
                let theirs = ctx.other_user == user_id;
                state.keys_arrived(theirs, ctx)
            });
        }
    }

    /// The next message to send, if any. Send the messages of an input after handling its
    /// events ([`Machine::poll_event`]).
    #[must_use = "a polled message is gone from the machine: send it"]
    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        self.outgoing.pop_front()
    }

    /// The next event for the user interface, if any. Handle them before sending the messages
    /// queued with them: see [`Event::DoneSent`].
    #[must_use = "a polled event is gone from the machine: handle it"]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// A view of one flow: where it is and which actions are legal in it.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowInfo> {
        let id = self.flows.id(key)?;
        let f = self.flows.by_id(id)?;
        let deadline = [Timer::Prompt(id), Timer::Expire(id)].into_iter().find_map(|t| self.timers.get(t));
        let (phase, actions) = f.state.project(&self.config);
        Some(FlowInfo {
            key: f.key.clone(),
            other_user: f.other_user.clone(),
            other_device: f.state.device().map(str::to_owned),
            we_requested: f.origin.we_requested(),
            phase,
            actions,
            state: f.state.name(),
            deadline,
            cancel: match &f.state {
                State::Cancelled(e) => Some(e.info.clone()),
                _ => None,
            },
            verified: matches!(f.state, State::Done(_)),
        })
    }

    /// Every flow the machine still remembers (active ones and recently ended ones).
    pub fn flows(&self) -> impl Iterator<Item = &FlowKey> {
        self.flows.keys()
    }

    /// Checks that the machine's indexes agree with its flow table, that every running timer is
    /// queued, that only remembered flows have deadlines queued, and that every flow has the
    /// deadlines its state needs: an expiry (and, while its prompt is open, a prompt) until it
    /// ends, then a forget time (for property tests).
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        self.flows.check()?;
        self.timers.check()?;
        // With every flow entry of the queue known to its record, this bounds the queue by the
        // flows remembered (three entries each at most), however early flows were forgotten.
        if let Some(id) = self.timers.slots_with_entries().find(|id| self.flows.by_id(*id).is_none()) {
            return Err(format!("slot {} holds no flow but has deadlines queued", id.0));
        }
        let mut ended = 0;
        for (id, flow) in self.flows.iter() {
            let has = |t: Timer| self.timers.get(t).is_some();
            ended += usize::from(flow.state.ended());
            let ok = if flow.state.ended() {
                has(Timer::Forget(id)) && !has(Timer::Expire(id)) && !has(Timer::Prompt(id))
            } else {
                has(Timer::Expire(id))
                    && !has(Timer::Forget(id))
                    && (matches!(flow.state, State::Incoming(_)) || !has(Timer::Prompt(id)))
            };
            if !ok {
                return Err(format!("{:?} ({}) has the wrong deadlines", flow.key, flow.state.name()));
            }
        }
        // No stale forget time either: the count of ended flows is read from them.
        if self.timers.forget_times() != ended {
            return Err(format!("{} forget times queued for {ended} ended flows", self.timers.forget_times()));
        }
        Ok(())
    }

    /// When [`Machine::handle_timeout`] must be called next: the exact earliest deadline of any
    /// flow, prompt or held event.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Millis> {
        self.timers.next()
    }

    /// Ends what is due at `now`: unanswered prompts close silently (another of our devices may
    /// still answer), unfinished flows are cancelled with `m.timeout` (ended locally if our `done`
    /// went out), ended flows are forgotten (at the latest) after the flow timeout, and events
    /// that waited for keys in vain are given up.
    ///
    /// Every other input applies what is due at its `now` first, so a late input never acts on a
    /// flow that should already have ended.
    pub fn handle_timeout(&mut self, now: Millis) {
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Prompt(id) => self.transition(id, Trigger::Local, false, None, now, |state, _| match state {
                    // The prompt is dismissed without a message: another of our devices may still
                    // answer, and the requester times out on its own (RQ-04, RQ-06).
                    State::Incoming(i) => {
                        let cause = LocalCause::TimedOut("the request was not answered in time");
                        let end = End { how: How::Dismissed(CancelCode::Timeout, cause), peer: Peer::Device(i.device) };
                        (Next::End(end), Step::default())
                    }
                    other => (Next::Go(other), Step::default()),
                }),
                Timer::Expire(id) => self.transition(id, Trigger::Local, false, None, now, |state, _| {
                    if state.ended() {
                        return (Next::Go(state), Step::default());
                    }
                    let cause = LocalCause::TimedOut("the verification did not finish in time");
                    (Next::fail(state.into_peer(), CancelCode::Timeout, cause), Step::default())
                }),
                Timer::Forget(id) => self.forget(id),
                Timer::PendingRoom(id) => {
                    self.pending_room.remove(&id);
                }
                Timer::Held(id) => {
                    if let Some(event) = self.keys.release(id) {
                        self.events.push_back(Event::Dropped {
                            sender: event.sender.clone(),
                            event_type: event.event_type.clone(),
                            reason: DropReason::KeysNeverArrived,
                        });
                        // Processing it now without holding makes the flow fail with a precise cause.
                        self.receive_inner(event, now, true);
                    }
                }
            }
        }
    }

    // ----- user actions -------------------------------------------------------------------

    /// Requests verification of `user_id`'s devices over to-device messages: all listed devices
    /// get the same `transaction_id`; the first to answer is adopted, and the others are told
    /// with `m.accepted`.
    pub fn request_to_device(
        &mut self,
        user_id: &str,
        device_ids: &[String],
        now: Millis,
    ) -> Result<FlowKey, ActionError> {
        self.handle_timeout(now);
        let devices: Vec<String> = device_ids
            .iter()
            .filter(|d| !(user_id == self.own.user_id && **d == self.own.device_id))
            .cloned()
            .collect();
        if devices.is_empty() {
            return Err(ActionError::NoDevices);
        }
        let key = FlowKey::ToDevice { user_id: user_id.to_owned(), transaction_id: self.random_id() };
        let msg = Msg::Request(Request {
            from_device: self.own.device_id.clone(),
            methods: self.config.methods.clone(),
            timestamp: Some(now),
            to: None,
        });
        self.send(&key, msg, Peer::Devices(devices.clone()));
        self.ask_keys_if_unknown(user_id, None);
        self.events.push_back(Event::RequestSent { flow: key.clone() });
        let flow = Flow {
            key: key.clone(),
            other_user: user_id.to_owned(),
            origin: Origin::OurRequest,
            state: State::Requested(Requested { devices }),
        };
        self.insert(flow, now + self.config.timeouts.flow);
        Ok(key)
    }

    /// Requests verification of `user_id` in `room_id` (the way the spec recommends to verify
    /// another user).
    /// Returns the outgoing id; once the homeserver has given the event ID, report it with
    /// [`Machine::room_event_sent`], which creates the flow.
    pub fn request_in_room(&mut self, room_id: &str, user_id: &str, now: Millis) -> u64 {
        self.handle_timeout(now);
        let msg = Msg::Request(Request {
            from_device: self.own.device_id.clone(),
            methods: self.config.methods.clone(),
            timestamp: None,
            to: Some(user_id.to_owned()),
        });
        let (event_type, content) = wire::encode(&msg, &Envelope::Room(None));
        let id = self.take_id();
        self.outgoing.push_back(Outgoing {
            id,
            flow: None,
            destination: Destination::Room { room_id: room_id.to_owned() },
            event_type,
            content,
        });
        self.pending_room.insert(id, PendingRoomRequest { room_id: room_id.to_owned(), user_id: user_id.to_owned() });
        self.timers.set(Timer::PendingRoom(id), now + self.config.timeouts.flow);
        self.ask_keys_if_unknown(user_id, None);
        id
    }

    /// Reports the event ID the homeserver gave an in-room request: the flow now exists, and the
    /// event ID is its flow id.
    pub fn room_event_sent(&mut self, outgoing_id: u64, event_id: &str, now: Millis) -> Result<FlowKey, ActionError> {
        self.handle_timeout(now);
        let p = self.pending_room.remove(&outgoing_id).ok_or(ActionError::UnknownOutgoing(outgoing_id))?;
        let deadline = self.timers.get(Timer::PendingRoom(outgoing_id)).unwrap_or(now + self.config.timeouts.flow);
        self.timers.stop(Timer::PendingRoom(outgoing_id));
        let key = FlowKey::Room { room_id: p.room_id, event_id: event_id.to_owned() };
        let flow = Flow {
            key: key.clone(),
            other_user: p.user_id,
            origin: Origin::OurRequest,
            state: State::Requested(Requested { devices: Vec::new() }),
        };
        self.insert(flow, deadline);
        self.events.push_back(Event::RequestSent { flow: key.clone() });
        Ok(key)
    }

    /// Starts SAS with a device directly, without a request: the deprecated pre-1.1 to-device
    /// flow. Only for peers that support nothing else.
    pub fn start_sas_without_request(
        &mut self,
        user_id: &str,
        device_id: &str,
        now: Millis,
    ) -> Result<FlowKey, ActionError> {
        self.handle_timeout(now);
        let key = FlowKey::ToDevice { user_id: user_id.to_owned(), transaction_id: self.random_id() };
        let flow = Flow {
            key: key.clone(),
            other_user: user_id.to_owned(),
            origin: Origin::LegacyStart { by_us: true },
            state: State::Ready(Ready {
                device: device_id.to_owned(),
                methods: vec![Method::SasV1].into(),
                shown: None,
            }),
        };
        let id = self.insert(flow, now + self.config.timeouts.flow);
        if let Err(e) = self.act(&key, now, |state, ctx| state.start_sas(ctx)) {
            self.flows.forget(id);
            self.timers.stop(Timer::Expire(id));
            return Err(e);
        }
        Ok(key)
    }

    /// Accepts: an incoming request (sends `ready`), or a start without a request (sends
    /// `accept`).
    pub fn accept(&mut self, key: &FlowKey, now: Millis) -> Result<(), ActionError> {
        self.act(key, now, |state, ctx| state.accept(ctx))
    }

    /// Starts SAS in a ready flow.
    pub fn start_sas(&mut self, key: &FlowKey, now: Millis) -> Result<(), ActionError> {
        self.act(key, now, |state, ctx| state.start_sas(ctx))
    }

    /// The user says the emoji/numbers match (our MAC goes out), or, for QR, that the other
    /// device shows success (our `done` goes out).
    pub fn confirm(&mut self, key: &FlowKey, now: Millis) -> Result<(), ActionError> {
        self.act(key, now, |state, ctx| state.confirm(ctx))
    }

    /// The user says the emoji/numbers differ: cancel with `m.mismatched_sas` (for QR: the other
    /// device did not show success, `m.key_mismatch`).
    pub fn mismatch(&mut self, key: &FlowKey, now: Millis) -> Result<(), ActionError> {
        self.act(key, now, |state, _| state.mismatch())
    }

    /// Cancels (or rejects) a flow with `m.user`. A flow whose `done` we sent is not cancelled (an
    /// error): the other side may already trust us.
    pub fn cancel(&mut self, key: &FlowKey, now: Millis) -> Result<(), ActionError> {
        self.act(key, now, |state, _| state.cancel(LocalCause::UserCancelled))
    }

    /// The code we are showing in a flow, if any.
    #[must_use]
    pub fn qr_code(&self, key: &FlowKey) -> Option<Vec<u8>> {
        match &self.flows.get(key)?.state {
            State::Ready(Ready { shown: Some(shown), .. }) => Some(shown.payload().encode()),
            _ => None,
        }
    }

    /// The user scanned the other device's code: check it and, if it holds, send the
    /// `m.reciprocate.v1` start. A code that does not hold cancels the flow (`m.key_mismatch`,
    /// or `m.user_mismatch` for a code about the wrong user); bytes that are not a verification
    /// code at all are an error, so the user can try again. A code scanned before the other
    /// side's keys are known waits for them ([`Event::KeysNeeded`]).
    pub fn scan_qr(&mut self, key: &FlowKey, scanned: &[u8], now: Millis) -> Result<(), ActionError> {
        self.act(key, now, |state, ctx| state.scan_qr(scanned, ctx))
    }

    /// Ends a flow this device lost track of — typically one that was in progress when the
    /// program stopped — so that the other side is told instead of waiting for its timeout.
    /// `other_device` is where a to-device cancel goes. A flow the machine still knows is simply
    /// cancelled; an ended one, or one whose `done` we sent, is left alone.
    pub fn abandon(&mut self, key: FlowKey, other_user: &str, other_device: Option<String>, now: Millis) {
        self.handle_timeout(now);
        if let Some(id) = self.flows.id(&key) {
            self.transition(id, Trigger::Local, false, None, now, |state, _| {
                match state.cancel(LocalCause::Abandoned) {
                    Ok(t) => t,
                    Err(refused) => (Next::Go(refused.state), Step::default()),
                }
            });
            return;
        }
        let state = match other_device {
            Some(device) => State::Ready(Ready { device, methods: Vec::new().into(), shown: None }),
            None => State::Requested(Requested { devices: Vec::new() }),
        };
        let flow = Flow {
            key,
            other_user: other_user.to_owned(),
            origin: Origin::TheirRequest { ready_echoed: false },
            state,
        };
        let id = self.insert(flow, now + self.config.timeouts.flow);
        self.transition(id, Trigger::Local, false, None, now, |state, _| match state.cancel(LocalCause::Abandoned) {
            Ok(t) => t,
            Err(refused) => (Next::Go(refused.state), Step::default()),
        });
    }

    // ----- incoming -----------------------------------------------------------------------

    /// Handles one event from the homeserver (to-device or room timeline). Non-verification
    /// events are ignored.
    pub fn receive(&mut self, event: IncomingEvent, now: Millis) {
        self.handle_timeout(now);
        self.receive_inner(event, now, false);
    }

    fn receive_inner(&mut self, event: IncomingEvent, now: Millis, retry: bool) {
        let in_room = event.room.is_some();
        let fallback = event.room.as_ref().and_then(|r| r.relates_to_fallback.as_ref());
        let Some(parsed) = wire::parse(&event.event_type, &event.content, in_room, fallback) else {
            return;
        };
        if parsed.kind == MsgKind::Request {
            return match parsed.msg {
                Ok(Msg::Request(r)) => self.receive_request(&event, parsed.flow_id, r, now),
                Ok(_) => {}
                Err(e) => self.dropped(&event, DropReason::MalformedRequest(e.to_string())),
            };
        }
        let Some(flow_id) = parsed.flow_id else {
            return self.dropped(&event, DropReason::NoFlowId);
        };
        let kind = parsed.kind;
        let scope = event.room.as_ref().map_or(event.sender.as_str(), |r| r.room_id.as_str());
        let Some(id) = self.flows.find(in_room, scope, &flow_id) else {
            let key = match &event.room {
                None => FlowKey::ToDevice { user_id: event.sender.clone(), transaction_id: flow_id },
                Some(r) => FlowKey::Room { room_id: r.room_id.clone(), event_id: flow_id },
            };
            if kind == MsgKind::Cancel {
                // Remember it, so that a request it overtook does not prompt the user later.
                self.gate.close(key);
                return self.dropped(&event, DropReason::UnknownFlow);
            }
            if self.gate.is_closed(&key) {
                return self.dropped(&event, DropReason::FlowEnded);
            }
            if in_room {
                return self.dropped(&event, DropReason::UnknownRoomFlow);
            }
            return match parsed.msg {
                Ok(Msg::Start(start)) if !matches!(start.method, StartMethod::Reciprocate { .. }) => {
                    self.receive_legacy_start(&event, key, start, now, retry)
                }
                msg => self.answer_unknown(&event, kind, key, msg.ok()),
            };
        };
        let Some(flow) = self.flows.by_id(id) else { return };
        let (from_peer, ended) = (event.sender == flow.other_user, flow.state.ended());
        // TR-03 / RQ-12: messages naming a device must come from the device in the flow.
        let named = parsed.msg.as_ref().ok().and_then(Msg::named_device);
        let other_device = named.zip(flow.state.device()).is_some_and(|(named, bound)| named != bound);
        if in_room && !from_peer {
            return self.room_event_from_non_peer(id, &event, kind, named, now);
        }
        if ended {
            return self.dropped(&event, DropReason::FlowEnded);
        }
        let trigger = Trigger::Incoming(kind);
        match parsed.msg {
            Err(e) => self.transition(id, trigger, retry, None, now, |state, _| {
                (Next::fail(state.into_peer(), CancelCode::InvalidMessage, LocalCause::Malformed(e)), Step::default())
            }),
            Ok(Msg::Cancel(c)) => self.transition(id, trigger, retry, None, now, |state, _| state.on_cancel(c)),
            Ok(msg) => {
                if other_device {
                    // Our own to-device request went to several devices: a second answer is not adopted.
                    return self.dropped(&event, DropReason::OtherDevice);
                }
                self.transition(id, trigger, retry, Some(&event), now, |state, ctx| {
                    state.on_message(msg, &event.content, ctx)
                });
            }
        }
    }

    fn receive_request(&mut self, event: &IncomingEvent, txn: Option<String>, req: Request, now: Millis) {
        let (key, ts) = match &event.room {
            None => {
                let Some(txn) = txn else {
                    return self.dropped(event, DropReason::NoFlowId);
                };
                (FlowKey::ToDevice { user_id: event.sender.clone(), transaction_id: txn }, req.timestamp.unwrap_or(0))
            }
            Some(r) => {
                // Our own requests, and requests by our other devices, are not ours to answer; nor
                // are requests for other users (EV-RQI-05).
                if event.sender == self.own.user_id {
                    return self.dropped(event, DropReason::Own);
                }
                if req.to.as_deref() != Some(self.own.user_id.as_str()) {
                    return self.dropped(event, DropReason::NotForUs);
                }
                (FlowKey::Room { room_id: r.room_id.clone(), event_id: r.event_id.clone() }, r.origin_server_ts)
            }
        };
        // RQ-02: a device never verifies itself.
        if event.sender == self.own.user_id && req.from_device == self.own.device_id {
            return self.dropped(event, DropReason::Own);
        }
        // RQ-03 (and RQ-05 for rooms): ignore requests outside the window; the bounds are inclusive.
        let t = &self.config.timeouts;
        if now.saturating_sub(ts) > t.max_age || ts.saturating_sub(now) > t.max_future {
            return self.dropped(event, DropReason::OutsideTimeWindow);
        }
        if self.flows.id(&key).is_some() {
            return self.dropped(event, DropReason::Duplicate);
        }
        if self.gate.is_closed(&key) {
            return self.dropped(event, DropReason::FlowEnded);
        }
        let Some(clashing) = self.admit_attempt(event, &req.from_device, now) else { return };
        let t = &self.config.timeouts;
        let prompt_deadline = (ts + t.prompt_after_timestamp).min(now + t.prompt_after_receipt);
        let flow_deadline = now + t.flow;
        let methods = req.methods.clone();
        let offered = Methods::from(req.methods);
        let common = crate::flow::common_methods(&self.config.methods, &offered);
        let flow = Flow {
            key: key.clone(),
            other_user: event.sender.clone(),
            origin: Origin::TheirRequest { ready_echoed: false },
            state: State::Incoming(Incoming { device: req.from_device.clone(), methods: offered }),
        };
        let id = self.insert(flow, flow_deadline);
        self.timers.set(Timer::Prompt(id), prompt_deadline);
        if clashing {
            return self.end_parallel_attempt(id, now);
        }
        self.events.push_back(Event::IncomingRequest {
            flow: key,
            from_device: req.from_device.clone(),
            methods,
            common_methods: common,
            legacy: false,
            deadline: prompt_deadline,
        });
        self.ask_keys_if_unknown(&event.sender, Some(&req.from_device));
    }

    /// A flow the sender of `event` opens from `device` (a request, a legacy start). CX-03 first:
    /// a new attempt from a device that already has one in progress with us cancels all, and the
    /// attempts it ends can make room under the bound per user. `None`: dropped for that bound
    /// (reported); `Some(clashing)`: open it, and if it clashed end it as well
    /// ([`Machine::end_parallel_attempt`]).
    fn admit_attempt(&mut self, event: &IncomingEvent, device: &str, now: Millis) -> Option<bool> {
        // The user's flows, read once: CX-03 looks among them, the bound counts them (ending an
        // attempt changes its state, not who it is with).
        let flows = self.flows.with_user(&event.sender);
        let clashing = self.flows.in_progress_on(&flows, device);
        for id in &clashing {
            self.end_parallel_attempt(*id, now);
        }
        if let Err(reason) = self.make_room(flows) {
            self.dropped(event, reason);
            return None;
        }
        Some(!clashing.is_empty())
    }

    /// CX-03: one of several attempts from one device ends.
    fn end_parallel_attempt(&mut self, id: FlowId, now: Millis) {
        self.transition(id, Trigger::Local, false, None, now, |state, _| {
            (
                Next::fail(state.into_peer(), CancelCode::UnexpectedMessage, LocalCause::MultipleAttempts),
                Step::default(),
            )
        });
    }

    fn receive_legacy_start(
        &mut self,
        event: &IncomingEvent,
        key: FlowKey,
        start: wire::Start,
        now: Millis,
        retry: bool,
    ) {
        if !self.keys.has_device(&event.sender, &start.from_device) && !retry {
            return self.hold(event.clone(), now + self.config.timeouts.prompt_after_receipt);
        }
        let Some(clashing) = self.admit_attempt(event, &start.from_device, now) else { return };
        let flow = Flow {
            key,
            other_user: event.sender.clone(),
            origin: Origin::LegacyStart { by_us: false },
            state: State::Ready(Ready {
                device: start.from_device.clone(),
                methods: vec![Method::SasV1].into(),
                shown: None,
            }),
        };
        let id = self.insert(flow, now + self.config.timeouts.flow);
        if clashing {
            self.end_parallel_attempt(id, now);
        } else if !self.config.methods.contains(&Method::SasV1) {
            let trigger = Trigger::Incoming(MsgKind::Start);
            self.transition(id, trigger, retry, None, now, |state, _| {
                let cause = LocalCause::UnsupportedMethod(Method::SasV1.as_str().into());
                (Next::fail(state.into_peer(), CancelCode::UnknownMethod, cause), Step::default())
            });
        } else {
            let trigger = Trigger::Incoming(MsgKind::Start);
            self.transition(id, trigger, retry, Some(event), now, |state, ctx| {
                state.on_message(Msg::Start(start), &event.content, ctx)
            });
        }
    }

    /// An event for a to-device flow we do not know (CX-04): the cancel gate decides whether it
    /// is answered (at most once per flow id, never for a start).
    fn answer_unknown(&mut self, event: &IncomingEvent, kind: MsgKind, key: FlowKey, msg: Option<Msg>) {
        let Some(code) = self.gate.for_unknown(kind, &key) else {
            return self.dropped(event, DropReason::UnknownFlow);
        };
        let device = match msg {
            Some(Msg::Ready(r)) => r.from_device,
            _ => "*".to_owned(),
        };
        let cancel = Msg::Cancel(wire::Cancel { reason: code.default_reason().to_owned(), code });
        let (event_type, content) = wire::encode(&cancel, &Envelope::ToDevice(key.flow_id().to_owned()));
        let id = self.take_id();
        self.outgoing.push_back(Outgoing {
            id,
            flow: None,
            destination: Destination::ToDevice { user_id: event.sender.clone(), device_ids: vec![device] },
            event_type,
            content,
        });
    }

    /// In-room events of a flow from someone other than the peer: our own echoes, our other
    /// devices (which may have answered the request, RQ-11), or bystanders (EV-RQI-05).
    fn room_event_from_non_peer(
        &mut self,
        id: FlowId,
        event: &IncomingEvent,
        kind: MsgKind,
        from_device: Option<&str>,
        now: Millis,
    ) {
        let own = event.sender == self.own.user_id;
        let other_own_device = own && from_device.is_some_and(|d| d != self.own.device_id);
        let Some(flow) = self.flows.by_id(id) else { return };
        let prompting = matches!(flow.state, State::Incoming(_));
        // We answered too: whichever `ready` comes first in the room takes the flow (RQ-11), so
        // another of our devices' `ready` before our own's echo means we stand down.
        let answered_first_elsewhere = other_own_device
            && kind == MsgKind::Ready
            && flow.origin == Origin::TheirRequest { ready_echoed: false }
            && !prompting
            && !flow.state.ended();
        if (prompting && own && (other_own_device || kind == MsgKind::Cancel)) || answered_first_elsewhere {
            self.transition(id, Trigger::Local, false, None, now, |state, _| {
                let how = How::Dismissed(CancelCode::Accepted, LocalCause::AnsweredByOwnDevice);
                (Next::End(End { how, peer: state.into_peer() }), Step::default())
            });
            return;
        }
        if own && kind == MsgKind::Ready && !other_own_device {
            // Our own `ready` came back: from now on, a later one from another of our devices is
            // not the first.
            if let Some(flow) = self.flows.get_mut(id) {
                flow.origin = Origin::TheirRequest { ready_echoed: true };
            }
        }
        self.dropped(event, if own { DropReason::Own } else { DropReason::NotAParty });
    }

    /// Forgets a flow, at its forget time or early: its deadlines and their queue entries go, and
    /// its id joins the cancel gate's memory of recently closed ids.
    fn forget(&mut self, id: FlowId) {
        // The deadlines go whatever the slot holds, so that no stray forget time can come back.
        self.timers.clear(id);
        if let Some(flow) = self.flows.forget(id) {
            self.gate.close(flow.key);
        }
    }

    /// Whether a user with these `flows` may open one more with us (a request, a legacy start):
    /// while the machine remembers [`FLOWS_PER_USER`] flows with them, their oldest ended flows
    /// are forgotten early to make room; if too few of them have ended, no. Then the same for all
    /// users together, at [`Config::max_flows`]: the flows that ended first go. Both are decided
    /// before anything is forgotten, so a newcomer that is refused costs no remembered flow.
    fn make_room(&mut self, flows: Vec<FlowId>) -> Result<(), DropReason> {
        let for_user = (flows.len() + 1).saturating_sub(FLOWS_PER_USER);
        let mut theirs = Vec::new();
        if for_user > 0 {
            theirs = flows
                .into_iter()
                .filter(|id| self.flows.by_id(*id).is_some_and(|f| f.state.ended()))
                .map(|id| (self.timers.get(Timer::Forget(id)).unwrap_or(Millis::MAX), id))
                .collect();
            if theirs.len() < for_user {
                return Err(DropReason::FlowLimit);
            }
            theirs.sort_unstable();
            theirs.truncate(for_user);
        }
        // The user's forgotten flows count towards this bound too; the rest must be found among
        // all ended flows (each has one forget time queued).
        let in_all = (self.flows.len() + 1).saturating_sub(self.config.max_flows);
        if in_all > for_user && self.timers.forget_times() < in_all {
            return Err(DropReason::MachineFull);
        }
        for (_, id) in theirs {
            self.forget(id);
        }
        while self.flows.len() >= self.config.max_flows {
            let oldest = self.timers.first_to_forget().ok_or(DropReason::MachineFull)?;
            self.forget(oldest);
        }
        Ok(())
    }

    fn dropped(&mut self, event: &IncomingEvent, reason: DropReason) {
        self.events.push_back(Event::Dropped {
            sender: event.sender.clone(),
            event_type: event.event_type.clone(),
            reason,
        });
    }

    // ----- transitions --------------------------------------------------------------------

    /// Runs a user action on a flow.
    fn act(
        &mut self,
        key: &FlowKey,
        now: Millis,
        f: impl FnOnce(State, &mut Ctx<'_>) -> crate::flow::Acted,
    ) -> Result<(), ActionError> {
        self.handle_timeout(now);
        let id = self.flows.id(key).ok_or_else(|| ActionError::UnknownFlow(key.clone()))?;
        let mut result = Ok(());
        self.transition(id, Trigger::Local, false, None, now, |state, ctx| match f(state, ctx) {
            Ok(t) => t,
            Err(refused) => {
                result = Err(refused.error);
                (Next::Go(refused.state), Step::default())
            }
        });
        if let Err(ActionError::KeysUnknown { user_id, .. }) = &result {
            let user = user_id.clone();
            self.ask_keys(&user);
        }
        result
    }

    /// Takes a flow out of the table, runs one transition on its state, and applies the result:
    /// messages, events, held input, key requests, the next state or the end of the flow.
    fn transition(
        &mut self,
        id: FlowId,
        trigger: Trigger,
        retry: bool,
        input: Option<&IncomingEvent>,
        now: Millis,
        f: impl FnOnce(State, &mut Ctx<'_>) -> crate::flow::Transition,
    ) {
        let Some(Flow { key, other_user, origin, state }) = self.flows.take(id) else {
            return;
        };
        let was_incoming = matches!(state, State::Incoming(_));
        let status = if state.ended() {
            FlowStatus::Ended
        } else if state.done_sent() {
            FlowStatus::DoneSent
        } else {
            FlowStatus::Active
        };
        let deadline = self.timers.get(Timer::Expire(id)).unwrap_or(now);
        let (next, step) = {
            let mut ctx = Ctx {
                own: &self.own,
                config: &self.config,
                key: &key,
                other_user: &other_user,
                origin,
                their_keys: self.keys.get(&other_user),
                entropy: &mut *self.entropy,
                deadline,
                retry,
            };
            f(state, &mut ctx)
        };
        for out in step.out {
            self.send(&key, out.msg, out.to);
        }
        self.events.extend(step.events);
        if step.hold
            && let Some(event) = input
        {
            self.hold(event.clone(), deadline);
        }
        if step.ask_keys {
            self.ask_keys(&other_user);
        }
        let state = match next {
            Next::Go(state) => {
                if was_incoming && !matches!(state, State::Incoming(_)) {
                    self.timers.stop(Timer::Prompt(id));
                }
                state
            }
            Next::End(end) => self.end(id, &key, &other_user, (trigger, status), end, now),
        };
        self.flows.put(id, Flow { key, other_user, origin, state });
    }

    /// The end of a flow: the only place a flow becomes done or cancelled. Whether a cancel goes
    /// on the wire is the cancel gate's decision.
    fn end(
        &mut self,
        id: FlowId,
        key: &FlowKey,
        other_user: &str,
        (trigger, status): (Trigger, FlowStatus),
        end: End,
        now: Millis,
    ) -> State {
        self.timers.stop(Timer::Prompt(id));
        self.timers.stop(Timer::Expire(id));
        self.timers.set(Timer::Forget(id), now + self.config.timeouts.flow);
        let End { how, peer } = end;
        // The ended state keeps the device; it is copied only where a message or an event needs
        // its own.
        let (device, info) = match how {
            How::Verified(keys) => {
                let device = peer.device().unwrap_or_default();
                self.events.push_back(Event::Done {
                    flow: key.clone(),
                    user_id: other_user.to_owned(),
                    device_id: device.clone(),
                    keys: keys.clone(),
                });
                return State::Done(Finished { device, keys });
            }
            How::Failed(code, cause) => {
                let wire_code = self.gate.for_flow(trigger, key, status, code.clone());
                let sent = wire_code.is_some();
                let device = match wire_code {
                    Some(code) => {
                        let device = peer.bound().map(str::to_owned);
                        let msg = Msg::Cancel(wire::Cancel { reason: code.default_reason().to_owned(), code });
                        self.send(key, msg, peer);
                        device
                    }
                    None => peer.device(),
                };
                let info = CancelInfo {
                    by_us: true,
                    reason: code.default_reason().to_owned(),
                    code,
                    cause: Some(cause),
                    sent,
                };
                (device, info)
            }
            How::Dismissed(code, cause) => {
                let by_us = cause != LocalCause::AnsweredByOwnDevice;
                let info = CancelInfo {
                    by_us,
                    reason: code.default_reason().to_owned(),
                    code,
                    cause: Some(cause),
                    sent: false,
                };
                (peer.device(), info)
            }
            How::CancelledByThem { code, reason } => {
                (peer.device(), CancelInfo { by_us: false, code, reason, cause: None, sent: false })
            }
        };
        self.events.push_back(Event::Cancelled { flow: key.clone(), info: info.clone() });
        State::Cancelled(Box::new(Ended { device, info }))
    }

    // ----- helpers ----------------------------------------------------------------------------

    /// Adds a new flow that times out at `deadline`.
    fn insert(&mut self, flow: Flow, deadline: Millis) -> FlowId {
        let id = self.flows.insert(flow);
        self.timers.set(Timer::Expire(id), deadline);
        id
    }

    fn ask_keys(&mut self, user: &str) {
        if self.keys.ask(user) {
            self.events.push_back(Event::KeysNeeded { user_id: user.to_owned() });
        }
    }

    fn ask_keys_if_unknown(&mut self, user: &str, device: Option<&str>) {
        let known = match device {
            Some(d) => self.keys.has_device(user, d),
            None => self.keys.knows(user),
        };
        if !known {
            self.ask_keys(user);
        }
    }

    /// Keeps an event until its sender's keys arrive, at most until `until`.
    fn hold(&mut self, event: IncomingEvent, until: Millis) {
        let user = event.sender.clone();
        match self.keys.hold(event) {
            Hold::Held { id, evicted } => {
                if let Some(old) = evicted {
                    self.timers.stop(Timer::Held(old.id));
                    self.dropped(&old.event, DropReason::HoldLimit);
                }
                self.timers.set(Timer::Held(id), until);
            }
            Hold::Refused(event) => self.dropped(&event, DropReason::HoldLimit),
        }
        self.ask_keys(&user);
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn random_id(&mut self) -> String {
        let mut bytes = [0u8; 16];
        self.entropy.fill(&mut bytes);
        const HEX: &[u8; 16] = b"0123456789abcdef";
        bytes
            .iter()
            .flat_map(|b| [char::from(HEX[usize::from(b >> 4)]), char::from(HEX[usize::from(b & 15)])])
            .collect()
    }

    /// Encodes a message of a flow and queues it for its peer.
    fn send(&mut self, key: &FlowKey, msg: Msg, to: Peer) {
        let envelope = match key {
            FlowKey::ToDevice { transaction_id, .. } => Envelope::ToDevice(transaction_id.clone()),
            FlowKey::Room { event_id, .. } => Envelope::Room(Some(event_id.clone())),
        };
        let (event_type, content) = wire::encode(&msg, &envelope);
        let destination = match key {
            FlowKey::ToDevice { user_id, .. } => {
                Destination::ToDevice { user_id: user_id.clone(), device_ids: to.devices() }
            }
            FlowKey::Room { room_id, .. } => Destination::Room { room_id: room_id.clone() },
        };
        let id = self.take_id();
        self.outgoing.push_back(Outgoing { id, flow: Some(key.clone()), destination, event_type, content });
    }
}
#[cfg(test)]
mod tests {
    /// Waiting flows are the many ones: their state stays small (large states are boxed).
    #[test]
    fn flow_states_stay_small() {
        assert!(std::mem::size_of::<crate::flow::State>() <= 64);
        assert!(std::mem::size_of::<crate::flow::Flow>() <= 160);
    }
}
