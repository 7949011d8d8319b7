//! The verification machine: every flow of this device, keyed by flow, driven by events, user
//! actions and the caller's clock ([spec: key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)).
//!
//! The machine never performs I/O: inputs are [`Machine::receive`], the user actions, and
//! [`Machine::handle_timeout`]; outputs are drained with [`Machine::poll_outgoing`] and
//! [`Machine::poll_event`], and [`Machine::next_deadline`] says when to call back.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::cancel::{self, CancelCode, CancelInfo, FlowStatus, LocalCause, Via};
use crate::sas::{self, Sas, SasPhase, SasStep};
use crate::types::*;
use crate::wire::{self, Envelope, Method, Msg, MsgKind, Ready, Request, StartMethod};

/// How many unknown to-device flows we remember having answered, so junk is answered once.
const UNKNOWN_REPLY_MEMORY: usize = 256;
/// How many events may wait for keys at once (a bound against floods).
const MAX_HELD: usize = 64;

#[derive(Debug)]
pub(crate) enum State {
    /// Our request is out; waiting for `ready` (or `cancel`).
    Sent,
    /// Their request waits for our user, until the prompt deadline (RQ-04).
    Received { prompt_deadline: Millis },
    /// Both ready; either side may start a method (ST-01). Holds our QR code if we show one.
    Ready(Option<Box<crate::qr::flow::ShownQr>>),
    /// Displayer: the other device scanned our code with the right secret; waiting for our user
    /// to confirm that it shows success (QR-05).
    QrScanned(Box<crate::qr::flow::ShownQr>),
    /// QR: our side is satisfied and `done` was sent (displayer) or the reciprocation was sent
    /// (scanner); waiting for the other side's `done`. Holds what will be trusted.
    QrWaitingForDone(crate::qr::flow::QrTrust),
    /// SAS in progress.
    Sas(Box<Sas>),
    /// Verified.
    Done,
    /// Ended without verification.
    Cancelled(CancelInfo),
    /// Only while a transition holds the real state.
    Moving,
}

impl State {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Sent => "waiting for the other device to accept",
            Self::Received { .. } => "waiting for you to accept",
            Self::Ready(_) => "ready to start a method",
            Self::QrScanned(_) => "waiting for you to confirm that the other device scanned the code",
            Self::QrWaitingForDone(_) => "waiting for the other device to finish",
            Self::Sas(s) => s.phase.name(),
            Self::Done => "done",
            Self::Cancelled(_) => "cancelled",
            Self::Moving => "changing state",
        }
    }

    fn ended(&self) -> bool {
        matches!(self, Self::Done | Self::Cancelled(_))
    }
}

#[derive(Debug)]
pub(crate) struct Flow {
    pub(crate) key: FlowKey,
    pub(crate) other_user: String,
    /// Bound by the request (theirs), the ready (ours), or a legacy start.
    pub(crate) other_device: Option<String>,
    /// To-device requests we sent: every device it went to (RQ-09).
    request_devices: Vec<String>,
    pub(crate) we_requested: bool,
    /// `false` for the legacy start-first flow (ST-06), which needs no `done` from the peer.
    pub(crate) from_request: bool,
    pub(crate) their_methods: Vec<Method>,
    deadline: Millis,
    last_activity: Millis,
    pub(crate) state: State,
}

impl Flow {
    /// A flow from a request (the common case); callers adjust what differs.
    fn new(
        key: FlowKey,
        other_user: &str,
        other_device: Option<String>,
        we_requested: bool,
        deadline: Millis,
        now: Millis,
        state: State,
    ) -> Flow {
        Flow {
            key,
            other_user: other_user.to_owned(),
            other_device,
            request_devices: Vec::new(),
            we_requested,
            from_request: true,
            their_methods: Vec::new(),
            deadline,
            last_activity: now,
            state,
        }
    }

    /// A legacy flow that begins with a SAS start and no request (ST-06).
    fn start_first(
        key: FlowKey,
        other_user: &str,
        device: &str,
        we_started: bool,
        deadline: Millis,
        now: Millis,
    ) -> Flow {
        let mut flow =
            Flow::new(key, other_user, Some(device.to_owned()), we_started, deadline, now, State::Ready(None));
        flow.from_request = false;
        flow.their_methods = vec![Method::SasV1];
        flow
    }

    fn status(&self) -> FlowStatus {
        if self.state.ended() { FlowStatus::Ended } else { FlowStatus::Active }
    }

    fn via(&self) -> Via {
        match self.key {
            FlowKey::ToDevice { .. } => Via::ToDevice,
            FlowKey::Room { .. } => Via::Room,
        }
    }

    fn envelope(&self) -> Envelope {
        match &self.key {
            FlowKey::ToDevice { transaction_id, .. } => Envelope::ToDevice(transaction_id.clone()),
            FlowKey::Room { event_id, .. } => Envelope::Room(Some(event_id.clone())),
        }
    }

    fn destination(&self) -> Destination {
        match &self.key {
            FlowKey::ToDevice { user_id, .. } => Destination::ToDevice {
                user_id: user_id.clone(),
                device_ids: match &self.other_device {
                    Some(d) => vec![d.clone()],
                    None => self.request_devices.clone(),
                },
            },
            FlowKey::Room { room_id, .. } => Destination::Room { room_id: room_id.clone() },
        }
    }
}

#[derive(Debug)]
struct PendingRoomRequest {
    room_id: String,
    user_id: String,
    created: Millis,
}

#[derive(Debug)]
struct Held {
    event: IncomingEvent,
    until: Millis,
}

/// Everything one device needs to run any number of verifications at once.
pub struct Machine {
    pub(crate) own: OwnIdentity,
    pub(crate) config: Config,
    entropy: Box<dyn Entropy + Send>,
    pub(crate) keys: HashMap<String, UserKeys>,
    flows: BTreeMap<FlowKey, Flow>,
    pending_room: BTreeMap<u64, PendingRoomRequest>,
    held: Vec<Held>,
    keys_asked: Vec<String>,
    answered_unknown: VecDeque<(String, String)>,
    /// Ids of flows that ended and were forgotten, or were cancelled before we knew them (a
    /// reordered cancel overtook its request): a late message must never reopen them.
    ended_ids: VecDeque<FlowKey>,
    pub(crate) outgoing: VecDeque<Outgoing>,
    pub(crate) events: VecDeque<Event>,
    next_id: u64,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("own", &self.own).field("flows", &self.flows.len()).finish_non_exhaustive()
    }
}

/// A read-only view of one flow for user interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    /// The flow.
    pub key: FlowKey,
    /// The other user.
    pub other_user: String,
    /// The other device, once known.
    pub other_device: Option<String>,
    /// Whether we sent the request.
    pub we_requested: bool,
    /// A short description of the state.
    pub state: &'static str,
    /// When the flow (or its prompt) ends by itself.
    pub deadline: Millis,
    /// Set once the flow was cancelled.
    pub cancel: Option<CancelInfo>,
    /// Set once the flow is verified.
    pub verified: bool,
}

impl Machine {
    /// A machine for this device. `entropy` supplies every random byte (transaction ids,
    /// ephemeral keys, QR secrets).
    pub fn new(own: OwnIdentity, config: Config, entropy: Box<dyn Entropy + Send>) -> Self {
        Self {
            own,
            config,
            entropy,
            keys: HashMap::new(),
            flows: BTreeMap::new(),
            pending_room: BTreeMap::new(),
            held: Vec::new(),
            keys_asked: Vec::new(),
            answered_unknown: VecDeque::new(),
            ended_ids: VecDeque::new(),
            outgoing: VecDeque::new(),
            events: VecDeque::new(),
            next_id: 1,
        }
    }

    /// Our identity.
    pub fn own_identity(&self) -> &OwnIdentity {
        &self.own
    }

    /// Replaces what we know of our own identity (e.g. after cross-signing was set up).
    pub fn set_own_identity(&mut self, own: OwnIdentity) {
        self.own = own;
    }

    /// Gives the machine a user's keys (already checked by the caller); events held for them are
    /// processed now (principle: never drop a request for lack of keys).
    pub fn update_user_keys(&mut self, user_id: &str, keys: UserKeys, now: Millis) {
        self.keys.insert(user_id.to_owned(), keys);
        self.keys_asked.retain(|u| u != user_id);
        let (ready, rest): (Vec<Held>, Vec<Held>) =
            std::mem::take(&mut self.held).into_iter().partition(|h| h.event.sender == user_id);
        self.held = rest;
        for h in ready {
            self.receive_inner(h.event, now, true);
        }
        // Ready flows that could not show a QR code for lack of keys may now.
        let waiting: Vec<FlowKey> = self
            .flows
            .values()
            .filter(|f| {
                matches!(f.state, State::Ready(None)) && (f.other_user == user_id || user_id == self.own.user_id)
            })
            .map(|f| f.key.clone())
            .collect();
        for key in waiting {
            let _ = self.with_flow(&key, |m, flow| {
                m.offer_qr(flow);
                Ok(())
            });
        }
    }

    /// The next message to send, if any.
    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        self.outgoing.pop_front()
    }

    /// The next event for the user interface, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// A view of one flow.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowInfo> {
        self.flows.get(key).map(|f| FlowInfo {
            key: f.key.clone(),
            other_user: f.other_user.clone(),
            other_device: f.other_device.clone(),
            we_requested: f.we_requested,
            state: f.state.name(),
            deadline: match f.state {
                State::Received { prompt_deadline } => prompt_deadline,
                _ => f.deadline,
            },
            cancel: match &f.state {
                State::Cancelled(info) => Some(info.clone()),
                _ => None,
            },
            verified: matches!(f.state, State::Done),
        })
    }

    pub(crate) fn flow_state(&self, key: &FlowKey) -> Option<&State> {
        self.flows.get(key).map(|f| &f.state)
    }

    /// Every flow the machine still remembers (active ones and recently ended ones).
    pub fn flows(&self) -> impl Iterator<Item = &FlowKey> {
        self.flows.keys()
    }

    /// When [`Machine::handle_timeout`] must be called next (principle 8: exact deadlines).
    pub fn next_deadline(&self) -> Option<Millis> {
        let flows = self.flows.values().map(|f| match f.state {
            State::Received { prompt_deadline } => prompt_deadline,
            State::Done | State::Cancelled(_) => f.last_activity + self.config.timeouts.flow,
            _ => f.deadline,
        });
        let pending = self.pending_room.values().map(|p| p.created + self.config.timeouts.flow);
        let held = self.held.iter().map(|h| h.until);
        flows.chain(pending).chain(held).min()
    }

    /// Ends what is due at `now`: unanswered prompts close silently (RQ-04), unfinished flows are
    /// cancelled with `m.timeout` (TO-01), ended flows are forgotten after the flow timeout.
    pub fn handle_timeout(&mut self, now: Millis) {
        let due: Vec<FlowKey> = self
            .flows
            .values()
            .filter(|f| match f.state {
                State::Received { prompt_deadline } => prompt_deadline <= now,
                State::Done | State::Cancelled(_) => f.last_activity + self.config.timeouts.flow <= now,
                _ => f.deadline <= now,
            })
            .map(|f| f.key.clone())
            .collect();
        for key in due {
            let Some(mut flow) = self.flows.remove(&key) else {
                continue;
            };
            match flow.state {
                State::Done | State::Cancelled(_) => {
                    remember(&mut self.ended_ids, key);
                    continue;
                }
                State::Received { .. } => {
                    // The prompt is dismissed without a message: another of our devices may still
                    // answer, and the requester times out on its own (RQ-04, RQ-06).
                    self.end_silently(
                        &mut flow,
                        CancelCode::Timeout,
                        LocalCause::TimedOut("the request was not answered in time"),
                    );
                }
                _ => self.fail(
                    &mut flow,
                    None,
                    CancelCode::Timeout,
                    LocalCause::TimedOut("the verification did not finish in time"),
                    now,
                ),
            }
            self.flows.insert(key, flow);
        }
        let timeout = self.config.timeouts.flow;
        self.pending_room.retain(|_, p| p.created + timeout > now);
        let (expired, kept): (Vec<Held>, Vec<Held>) =
            std::mem::take(&mut self.held).into_iter().partition(|h| h.until <= now);
        self.held = kept;
        for h in expired {
            self.events.push_back(Event::Dropped {
                sender: h.event.sender.clone(),
                event_type: h.event.event_type.clone(),
                reason: DropReason::KeysNeverArrived,
            });
            // Processing it now with `retry` makes the flow fail with a precise cause.
            self.receive_inner(h.event, now, true);
        }
    }

    // ----- user actions -------------------------------------------------------------------

    /// Requests verification of `user_id`'s devices over to-device messages (RQ-02): all listed
    /// devices get the same `transaction_id`; the first to answer is adopted (RQ-09).
    pub fn request_to_device(
        &mut self,
        user_id: &str,
        device_ids: &[String],
        now: Millis,
    ) -> Result<FlowKey, ActionError> {
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
        let mut flow = Flow::new(key.clone(), user_id, None, true, now + self.config.timeouts.flow, now, State::Sent);
        flow.request_devices = devices;
        self.send(&mut flow, msg, now);
        self.ask_keys_if_unknown(user_id, None);
        self.events.push_back(Event::RequestSent { flow: key.clone() });
        self.flows.insert(key.clone(), flow);
        Ok(key)
    }

    /// Requests verification of `user_id` in `room_id` (FW-02: the way to verify another user).
    /// Returns the outgoing id; once the homeserver has given the event ID, report it with
    /// [`Machine::room_event_sent`], which creates the flow.
    pub fn request_in_room(&mut self, room_id: &str, user_id: &str, now: Millis) -> u64 {
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
        self.pending_room
            .insert(id, PendingRoomRequest { room_id: room_id.to_owned(), user_id: user_id.to_owned(), created: now });
        self.ask_keys_if_unknown(user_id, None);
        id
    }

    /// Reports the event ID the homeserver gave an in-room request: the flow now exists (FW-03).
    pub fn room_event_sent(&mut self, outgoing_id: u64, event_id: &str, now: Millis) -> Result<FlowKey, ActionError> {
        let p = self.pending_room.remove(&outgoing_id).ok_or(ActionError::UnknownOutgoing(outgoing_id))?;
        let key = FlowKey::Room { room_id: p.room_id, event_id: event_id.to_owned() };
        let flow =
            Flow::new(key.clone(), &p.user_id, None, true, p.created + self.config.timeouts.flow, now, State::Sent);
        self.flows.insert(key.clone(), flow);
        self.events.push_back(Event::RequestSent { flow: key.clone() });
        Ok(key)
    }

    /// Starts SAS with a device directly, without a request: the deprecated pre-1.1 to-device flow
    /// (ST-06). Only for peers that support nothing else.
    pub fn start_sas_without_request(
        &mut self,
        user_id: &str,
        device_id: &str,
        now: Millis,
    ) -> Result<FlowKey, ActionError> {
        let key = FlowKey::ToDevice { user_id: user_id.to_owned(), transaction_id: self.random_id() };
        let mut flow = Flow::start_first(key.clone(), user_id, device_id, true, now + self.config.timeouts.flow, now);
        self.start_sas_in(&mut flow, now)?;
        self.flows.insert(key.clone(), flow);
        Ok(key)
    }

    /// Accepts: an incoming request (sends `ready`, RQ-07), or a legacy start (sends `accept`).
    pub fn accept(&mut self, key: &FlowKey, now: Millis) -> Result<(), ActionError> {
        self.with_flow(key, |m, flow| match &flow.state {
            State::Received { .. } => {
                let common = m.common_methods(&flow.their_methods);
                if common.is_empty() {
                    return Err(ActionError::NoCommonMethod("none of the requester's methods is supported here"));
                }
                // EV-RD-02: our methods that correspond to theirs.
                let msg = Msg::Ready(Ready {
                    from_device: m.own.device_id.clone(),
                    methods: m.common_methods(&flow.their_methods),
                });
                flow.state = State::Ready(None);
                m.send(flow, msg, now);
                m.emit_ready(flow);
                m.offer_qr(flow);
                Ok(())
            }
            State::Sas(s) if matches!(s.phase, SasPhase::AwaitUserAccept) => {
                m.sas_step(flow, None, |m, _, sas| sas.user_accepts(m), now);
                Ok(())
            }
            other => Err(ActionError::WrongState { action: "accept", state: other.name() }),
        })
    }

    /// Starts SAS in a ready flow (ST-01).
    pub fn start_sas(&mut self, key: &FlowKey, now: Millis) -> Result<(), ActionError> {
        self.with_flow(key, |m, flow| m.start_sas_in(flow, now))
    }

    /// The user says the emoji/numbers match: send our MAC (SQ-09).
    pub fn confirm(&mut self, key: &FlowKey, now: Millis) -> Result<(), ActionError> {
        self.with_flow(key, |m, flow| {
            if matches!(flow.state, State::QrScanned(_)) {
                m.qr_confirm_scanned(flow, now);
                return Ok(());
            }
            match &flow.state {
                State::Sas(s) if s.can_confirm() => {}
                other => {
                    return Err(ActionError::WrongState { action: "confirm", state: other.name() });
                }
            }
            m.sas_step(flow, None, |m, flow, sas| sas.confirm(m, flow), now);
            Ok(())
        })
    }

    /// The user says the emoji/numbers differ: cancel with `m.mismatched_sas` (SQ-08).
    pub fn mismatch(&mut self, key: &FlowKey, now: Millis) -> Result<(), ActionError> {
        self.with_flow(key, |m, flow| match &flow.state {
            State::Sas(s) if s.can_confirm() => {
                m.fail(flow, None, CancelCode::MismatchedSas, LocalCause::UserSaidMismatch, now);
                Ok(())
            }
            State::QrScanned(_) => {
                let cause = LocalCause::QrMismatch("you said the other device did not show success".into());
                m.fail(flow, None, CancelCode::KeyMismatch, cause, now);
                Ok(())
            }
            other => Err(ActionError::WrongState { action: "report a mismatch", state: other.name() }),
        })
    }

    /// Cancels (or rejects) a flow with `m.user` (CX-01, RQ-08).
    pub fn cancel(&mut self, key: &FlowKey, now: Millis) -> Result<(), ActionError> {
        self.with_flow(key, |m, flow| {
            if flow.state.ended() {
                return Err(ActionError::WrongState { action: "cancel", state: flow.state.name() });
            }
            m.fail(flow, None, CancelCode::User, LocalCause::UserCancelled, now);
            Ok(())
        })
    }

    /// Ends a flow this device lost track of — typically one that was in progress when the
    /// program stopped — so that the other side is told instead of waiting for its timeout.
    /// `other_device` is where a to-device cancel goes. A flow the machine still knows is simply
    /// cancelled; an ended one is left alone.
    pub fn abandon(&mut self, key: FlowKey, other_user: &str, other_device: Option<String>, now: Millis) {
        if let Some(flow) = self.flows.get(&key) {
            if !flow.state.ended() {
                let _ = self.with_flow(&key, |m, flow| {
                    m.fail(flow, None, CancelCode::User, LocalCause::Abandoned, now);
                    Ok(())
                });
            }
            return;
        }
        let deadline = now + self.config.timeouts.flow;
        let mut flow = Flow::new(key.clone(), other_user, other_device, false, deadline, now, State::Ready(None));
        self.fail(&mut flow, None, CancelCode::User, LocalCause::Abandoned, now);
        self.flows.insert(key, flow);
    }

    // ----- incoming -----------------------------------------------------------------------

    /// Handles one event from the homeserver (to-device or room timeline). Non-verification
    /// events are ignored.
    pub fn receive(&mut self, event: IncomingEvent, now: Millis) {
        self.receive_inner(event, now, false);
    }

    fn receive_inner(&mut self, event: IncomingEvent, now: Millis, retry: bool) {
        let in_room = event.room.is_some();
        let fallback = event.room.as_ref().and_then(|r| r.relates_to_fallback.as_ref());
        let Some(parsed) = wire::parse(&event.event_type, &event.content, in_room, fallback) else {
            return;
        };
        if parsed.kind == MsgKind::Request {
            let msg = match parsed.msg {
                Ok(Msg::Request(r)) => r,
                Ok(_) => unreachable!("a request parses into a request"),
                Err(e) => return self.dropped(&event, DropReason::MalformedRequest(e.to_string())),
            };
            return self.receive_request(&event, parsed.flow_id, msg, now);
        }
        let Some(flow_id) = parsed.flow_id else {
            return self.dropped(&event, DropReason::NoFlowId);
        };
        let key = match &event.room {
            None => FlowKey::ToDevice { user_id: event.sender.clone(), transaction_id: flow_id },
            Some(r) => FlowKey::Room { room_id: r.room_id.clone(), event_id: flow_id },
        };
        let Some(mut flow) = self.flows.remove(&key) else {
            if parsed.kind == MsgKind::Cancel {
                // Remember it, so that a request it overtook does not prompt the user later.
                remember(&mut self.ended_ids, key);
                return self.dropped(&event, DropReason::UnknownFlow);
            }
            if self.flow_already_ended(&key) {
                return self.dropped(&event, DropReason::FlowEnded);
            }
            if in_room {
                return self.dropped(&event, DropReason::UnknownRoomFlow);
            }
            if let (MsgKind::Start, Ok(Msg::Start(start))) = (parsed.kind, &parsed.msg)
                && !matches!(start.method, StartMethod::Reciprocate { .. })
            {
                return self.receive_legacy_start(&event, key, start.clone(), now, retry);
            }
            return self.answer_unknown(&event, parsed.kind, key, parsed.msg.ok());
        };
        if in_room && event.sender != flow.other_user {
            self.room_event_from_non_peer(&mut flow, &event, parsed.kind, parsed.msg.ok(), now);
            self.flows.insert(key, flow);
            return;
        }
        if flow.state.ended() {
            self.dropped(&event, DropReason::FlowEnded);
            self.flows.insert(key, flow);
            return;
        }
        flow.last_activity = now;
        match parsed.msg {
            Err(e) => {
                self.fail(&mut flow, Some(parsed.kind), CancelCode::InvalidMessage, LocalCause::Malformed(e), now)
            }
            Ok(msg) => self.on_message(&mut flow, &event, msg, now, retry),
        }
        self.flows.insert(key, flow);
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
        if self.flows.contains_key(&key) {
            return self.dropped(event, DropReason::Duplicate);
        }
        if self.flow_already_ended(&key) {
            return self.dropped(event, DropReason::FlowEnded);
        }
        let prompt_deadline = (ts + t.prompt_after_timestamp).min(now + t.prompt_after_receipt);
        let mut flow = Flow::new(
            key.clone(),
            &event.sender,
            Some(req.from_device.clone()),
            false,
            now + t.flow,
            now,
            State::Received { prompt_deadline },
        );
        flow.their_methods = req.methods.clone();
        if self.cancel_parallel_attempts(&event.sender, &req.from_device, now) {
            self.fail(&mut flow, None, CancelCode::UnexpectedMessage, LocalCause::MultipleAttempts, now);
            self.flows.insert(key, flow);
            return;
        }
        self.events.push_back(Event::IncomingRequest {
            flow: key.clone(),
            from_device: req.from_device.clone(),
            methods: req.methods.iter().map(|m| m.as_str().to_owned()).collect(),
            common_methods: self.common_methods(&req.methods).iter().map(|m| m.as_str().to_owned()).collect(),
            legacy: false,
            deadline: prompt_deadline,
        });
        self.ask_keys_if_unknown(&event.sender, Some(&req.from_device));
        self.flows.insert(key, flow);
    }

    /// A flow id that a cancel overtook, or that we already answered as unknown: opening it now
    /// would put a second cancel for one flow id on the wire.
    fn flow_already_ended(&self, key: &FlowKey) -> bool {
        self.ended_ids.contains(key)
            || matches!(key, FlowKey::ToDevice { user_id, transaction_id }
                if self.answered_unknown.iter().any(|(u, t)| u == user_id && t == transaction_id))
    }

    /// CX-03: a new attempt from a device that already has one in progress with us cancels all.
    fn cancel_parallel_attempts(&mut self, user: &str, device: &str, now: Millis) -> bool {
        let clashing: Vec<FlowKey> = self
            .flows
            .values()
            .filter(|f| !f.state.ended() && f.other_user == user && f.other_device.as_deref() == Some(device))
            .map(|f| f.key.clone())
            .collect();
        for key in &clashing {
            if let Some(mut flow) = self.flows.remove(key) {
                self.fail(&mut flow, None, CancelCode::UnexpectedMessage, LocalCause::MultipleAttempts, now);
                self.flows.insert(key.clone(), flow);
            }
        }
        !clashing.is_empty()
    }

    fn receive_legacy_start(
        &mut self,
        event: &IncomingEvent,
        key: FlowKey,
        start: wire::Start,
        now: Millis,
        retry: bool,
    ) {
        if !self.has_device_key(&event.sender, &start.from_device) && !retry {
            return self.hold(event.clone(), now + self.config.timeouts.prompt_after_receipt);
        }
        let mut flow = Flow::start_first(
            key.clone(),
            &event.sender,
            &start.from_device,
            false,
            now + self.config.timeouts.flow,
            now,
        );
        if self.cancel_parallel_attempts(&event.sender, &start.from_device, now) {
            self.fail(&mut flow, None, CancelCode::UnexpectedMessage, LocalCause::MultipleAttempts, now);
        } else if !self.config.methods.contains(&Method::SasV1) {
            self.fail(
                &mut flow,
                Some(MsgKind::Start),
                CancelCode::UnknownMethod,
                LocalCause::UnsupportedMethod(Method::SasV1.as_str().into()),
                now,
            );
        } else {
            self.on_start(&mut flow, event, start, now, retry);
        }
        self.flows.insert(key, flow);
    }

    /// An event for a to-device flow we do not know (CX-04), answered at most once per flow id.
    fn answer_unknown(&mut self, event: &IncomingEvent, kind: MsgKind, key: FlowKey, msg: Option<Msg>) {
        // Only a request, or a start of a method that can begin a flow, may open one (ST-06).
        let may_open = kind == MsgKind::Request
            || (kind == MsgKind::Start
                && !matches!(msg, Some(Msg::Start(wire::Start { method: StartMethod::Reciprocate { .. }, .. }))));
        let Some(code) =
            cancel::verdict(kind, may_open, Via::ToDevice, FlowStatus::Unknown, CancelCode::UnknownTransaction)
        else {
            return;
        };
        let memo = (event.sender.clone(), key.flow_id().to_owned());
        if self.answered_unknown.contains(&memo) {
            return;
        }
        remember(&mut self.answered_unknown, memo);
        let device = match msg {
            Some(Msg::Ready(r)) => r.from_device,
            _ => "*".to_owned(),
        };
        let cancel = Msg::Cancel(wire::Cancel { code: code.clone(), reason: code.default_reason().to_owned() });
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
        flow: &mut Flow,
        event: &IncomingEvent,
        kind: MsgKind,
        msg: Option<Msg>,
        now: Millis,
    ) {
        let from_device = match &msg {
            Some(Msg::Ready(r)) => Some(r.from_device.as_str()),
            Some(Msg::Start(s)) => Some(s.from_device.as_str()),
            _ => None,
        };
        let other_own_device = event.sender == self.own.user_id && from_device.is_some_and(|d| d != self.own.device_id);
        let answered_elsewhere = matches!(flow.state, State::Received { .. })
            && event.sender == self.own.user_id
            && (other_own_device || kind == MsgKind::Cancel);
        if answered_elsewhere {
            flow.last_activity = now;
            self.end_silently(flow, CancelCode::Accepted, LocalCause::AnsweredByOwnDevice);
            return;
        }
        let reason = if event.sender == self.own.user_id { DropReason::Own } else { DropReason::NotAParty };
        self.dropped(event, reason);
    }

    fn on_message(&mut self, flow: &mut Flow, event: &IncomingEvent, msg: Msg, now: Millis, retry: bool) {
        let kind = msg.kind();
        if let Msg::Cancel(c) = msg {
            return self.on_cancel(flow, c);
        }
        // TR-03 / RQ-12: messages naming a device must come from the device in the flow.
        let named = match &msg {
            Msg::Ready(r) => Some(r.from_device.as_str()),
            Msg::Start(s) => Some(s.from_device.as_str()),
            _ => None,
        };
        if let (Some(named), Some(bound)) = (named, flow.other_device.as_deref())
            && named != bound
        {
            // Our own to-device request went to several devices: a second answer is not adopted.
            self.dropped(event, DropReason::OtherDevice);
            return;
        }
        match (&flow.state, msg) {
            (State::Sent, Msg::Ready(r)) => self.on_ready(flow, r, now),
            (State::Ready(_), Msg::Ready(_)) => self.dropped(event, DropReason::Duplicate),
            (State::Ready(_), Msg::Start(s)) => self.on_start(flow, event, s, now, retry),
            (State::QrWaitingForDone(_), Msg::Done) => self.qr_on_done(flow, now),
            (State::Sas(_), Msg::Start(s)) => {
                let s2 = s.clone();
                self.sas_step(flow, Some(kind), |m, flow, sas| sas.on_start(m, flow, &s2, &event.content), now);
            }
            (State::Sas(_), msg @ (Msg::Accept(_) | Msg::Key(_) | Msg::Mac(_) | Msg::Done)) => {
                self.sas_step(flow, Some(kind), |m, flow, sas| sas.on_message(m, flow, msg), now);
            }
            (state, _) => {
                let state = state.name();
                self.fail(
                    flow,
                    Some(kind),
                    CancelCode::UnexpectedMessage,
                    LocalCause::Unexpected { message: kind.event_type(), state },
                    now,
                )
            }
        }
    }

    fn dropped(&mut self, event: &IncomingEvent, reason: DropReason) {
        self.events.push_back(Event::Dropped {
            sender: event.sender.clone(),
            event_type: event.event_type.clone(),
            reason,
        });
    }

    fn on_ready(&mut self, flow: &mut Flow, ready: Ready, now: Millis) {
        if let FlowKey::ToDevice { .. } = flow.key
            && !flow.request_devices.contains(&ready.from_device)
        {
            // A device we did not ask cannot adopt the request.
            self.events.push_back(Event::Dropped {
                sender: flow.other_user.clone(),
                event_type: MsgKind::Ready.event_type().into(),
                reason: DropReason::OtherDevice,
            });
            return;
        }
        flow.other_device = Some(ready.from_device.clone());
        flow.their_methods = ready.methods;
        // RQ-09: the other devices that got our request learn that it was accepted elsewhere.
        let others: Vec<String> = flow.request_devices.iter().filter(|d| **d != ready.from_device).cloned().collect();
        if !others.is_empty() {
            self.send_to_devices(flow, others, CancelCode::Accepted);
        }
        if self.common_methods(&flow.their_methods).is_empty() {
            return self.fail(
                flow,
                Some(MsgKind::Ready),
                CancelCode::UnknownMethod,
                LocalCause::NoCommonMethod("verification method"),
                now,
            );
        }
        flow.state = State::Ready(None);
        self.emit_ready(flow);
        self.offer_qr(flow);
        self.ask_keys_if_unknown(&flow.other_user.clone(), Some(&ready.from_device));
    }

    fn on_start(&mut self, flow: &mut Flow, event: &IncomingEvent, start: wire::Start, now: Millis, retry: bool) {
        if let (StartMethod::Reciprocate { secret }, State::Ready(Some(_))) = (&start.method, &flow.state) {
            return self.qr_on_reciprocate(flow, secret, now);
        }
        let StartMethod::Sas(_) = &start.method else {
            let method = match &start.method {
                StartMethod::Reciprocate { .. } => "m.reciprocate.v1".to_owned(),
                StartMethod::Other(m) => m.clone(),
                StartMethod::Sas(_) => unreachable!(),
            };
            return self.fail(
                flow,
                Some(MsgKind::Start),
                CancelCode::UnknownMethod,
                LocalCause::UnsupportedMethod(method),
                now,
            );
        };
        if !self.common_methods(&flow.their_methods).contains(&Method::SasV1) && flow.from_request {
            return self.fail(
                flow,
                Some(MsgKind::Start),
                CancelCode::UnknownMethod,
                LocalCause::UnsupportedMethod("m.sas.v1".into()),
                now,
            );
        }
        if !self.has_device_key(&flow.other_user, &start.from_device) && !retry {
            // Principle 7: hold the start until the keys arrive.
            return self.hold(event.clone(), flow.deadline);
        }
        let pinned = match self.pin_keys(flow) {
            Ok(p) => p,
            Err(cause) => {
                return self.fail(flow, Some(MsgKind::Start), CancelCode::KeyMismatch, cause, now);
            }
        };
        let content = sas::start_content_for_commitment(&event.content, &flow.key);
        let (sas, step) = Sas::from_their_start(self, flow, &start, content, pinned);
        flow.state = State::Sas(Box::new(sas));
        self.events.push_back(Event::Started {
            flow: flow.key.clone(),
            method: Method::SasV1.as_str().into(),
            by_us: false,
        });
        if !flow.from_request {
            self.events.push_back(Event::IncomingRequest {
                flow: flow.key.clone(),
                from_device: start.from_device.clone(),
                methods: vec![Method::SasV1.as_str().into()],
                common_methods: vec![Method::SasV1.as_str().into()],
                legacy: true,
                deadline: flow.deadline,
            });
        }
        self.apply_step(flow, Some(MsgKind::Start), step, now);
    }

    fn on_cancel(&mut self, flow: &mut Flow, c: wire::Cancel) {
        // RQ-08/RQ-09: a device that refuses our multi-device request ends it for all; the others
        // (we cannot tell which device refused) are told with `m.user`.
        if matches!(flow.state, State::Sent) && flow.request_devices.len() > 1 {
            let devices = flow.request_devices.clone();
            self.send_to_devices(flow, devices, CancelCode::User);
        }
        let info = CancelInfo { by_us: false, code: c.code, reason: c.reason, cause: None, sent: false };
        flow.state = State::Cancelled(info.clone());
        self.events.push_back(Event::Cancelled { flow: flow.key.clone(), info });
    }

    // ----- SAS plumbing ---------------------------------------------------------------------

    fn start_sas_in(&mut self, flow: &mut Flow, now: Millis) -> Result<(), ActionError> {
        if !matches!(flow.state, State::Ready(_)) {
            return Err(ActionError::WrongState { action: "start SAS", state: flow.state.name() });
        }
        if !self.common_methods(&flow.their_methods).contains(&Method::SasV1) {
            return Err(ActionError::NoCommonMethod("the other device does not offer m.sas.v1"));
        }
        let device = flow.other_device.clone().expect("a ready flow has a bound device");
        if !self.has_device_key(&flow.other_user, &device) {
            let user = flow.other_user.clone();
            self.ask_keys(&user);
            return Err(ActionError::KeysUnknown { user_id: user, device_id: device });
        }
        let pinned = match self.pin_keys(flow) {
            Ok(p) => p,
            Err(cause) => {
                self.fail(flow, None, CancelCode::KeyMismatch, cause, now);
                return Ok(());
            }
        };
        let (sas, msg) = Sas::start(self, flow, pinned);
        flow.state = State::Sas(Box::new(sas));
        self.events.push_back(Event::Started {
            flow: flow.key.clone(),
            method: Method::SasV1.as_str().into(),
            by_us: true,
        });
        self.send(flow, msg, now);
        Ok(())
    }

    /// Runs one SAS transition on the flow's SAS state and applies what it asks for.
    fn sas_step(
        &mut self,
        flow: &mut Flow,
        incoming: Option<MsgKind>,
        f: impl FnOnce(&mut Self, &Flow, &mut Sas) -> SasStep,
        now: Millis,
    ) {
        let State::Sas(mut sas) = std::mem::replace(&mut flow.state, State::Moving) else {
            unreachable!("sas_step on a SAS flow")
        };
        let step = f(self, flow, &mut sas);
        flow.state = State::Sas(sas);
        self.apply_step(flow, incoming, step, now);
    }

    fn apply_step(&mut self, flow: &mut Flow, incoming: Option<MsgKind>, step: SasStep, now: Millis) {
        for msg in step.send {
            self.send(flow, msg, now);
        }
        self.events.extend(step.events);
        if let Some((code, cause)) = step.fail {
            self.fail(flow, incoming, code, cause, now);
        } else if let Some(keys) = step.verified {
            let device_id = flow.other_device.clone().unwrap_or_default();
            flow.state = State::Done;
            self.events.push_back(Event::Done {
                flow: flow.key.clone(),
                user_id: flow.other_user.clone(),
                device_id,
                keys,
            });
        }
    }

    /// The other side's keys, fixed by value for the rest of the flow (TR-01, TR-02).
    fn pin_keys(&self, flow: &Flow) -> Result<sas::Pinned, LocalCause> {
        let device = flow.other_device.as_deref().unwrap_or_default();
        let keys = self.keys.get(&flow.other_user);
        let device_key = keys
            .and_then(|k| k.devices.get(device))
            .cloned()
            .ok_or_else(|| LocalCause::DeviceKeysUnknown(device.to_owned()))?;
        let keys = keys.expect("device key found");
        let cross: Vec<&String> = keys.master_key.iter().chain(&keys.other_cross_signing_keys).collect();
        if let Some(clash) = keys.devices.keys().find(|d| cross.contains(d)) {
            return Err(LocalCause::DeviceIdClashesWithCrossSigningKey(clash.clone()));
        }
        Ok(sas::Pinned { device_key, master_key: keys.master_key.clone() })
    }

    /// Whether the other side's keys still equal the pinned ones (TR-01).
    pub(crate) fn keys_unchanged(&self, flow: &Flow, pinned: &sas::Pinned) -> bool {
        let device = flow.other_device.as_deref().unwrap_or_default();
        let keys = self.keys.get(&flow.other_user);
        keys.and_then(|k| k.devices.get(device)) == Some(&pinned.device_key)
            && keys.and_then(|k| k.master_key.as_ref()) == pinned.master_key.as_ref()
    }

    pub(crate) fn random_bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut buf = [0u8; N];
        self.entropy.fill(&mut buf);
        buf
    }

    // ----- helpers ----------------------------------------------------------------------------

    pub(crate) fn with_flow<T>(
        &mut self,
        key: &FlowKey,
        f: impl FnOnce(&mut Self, &mut Flow) -> Result<T, ActionError>,
    ) -> Result<T, ActionError> {
        let mut flow = self.flows.remove(key).ok_or_else(|| ActionError::UnknownFlow(key.clone()))?;
        let r = f(self, &mut flow);
        self.flows.insert(key.clone(), flow);
        r
    }

    /// Our methods that correspond to theirs (EV-RD-02, QR-01): SAS for SAS, showing a QR code
    /// for their scanning and scanning for their showing (each needing `m.reciprocate.v1` on both
    /// sides), and the reciprocation whenever a QR method remains.
    pub(crate) fn common_methods(&self, theirs: &[Method]) -> Vec<Method> {
        let ours = &self.config.methods;
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

    fn emit_ready(&mut self, flow: &Flow) {
        self.events.push_back(Event::Ready {
            flow: flow.key.clone(),
            other_device: flow.other_device.clone().unwrap_or_default(),
            methods: self.common_methods(&flow.their_methods).iter().map(|m| m.as_str().to_owned()).collect(),
        });
    }

    fn has_device_key(&self, user: &str, device: &str) -> bool {
        self.keys.get(user).is_some_and(|k| k.devices.contains_key(device))
    }

    fn ask_keys(&mut self, user: &str) {
        if !self.keys_asked.iter().any(|u| u == user) {
            self.keys_asked.push(user.to_owned());
            self.events.push_back(Event::KeysNeeded { user_id: user.to_owned() });
        }
    }

    fn ask_keys_if_unknown(&mut self, user: &str, device: Option<&str>) {
        let known = match device {
            Some(d) => self.has_device_key(user, d),
            None => self.keys.contains_key(user),
        };
        if !known {
            self.ask_keys(user);
        }
    }

    fn hold(&mut self, event: IncomingEvent, until: Millis) {
        let user = event.sender.clone();
        if self.held.len() == MAX_HELD {
            let old = self.held.remove(0);
            self.events.push_back(Event::Dropped {
                sender: old.event.sender,
                event_type: old.event.event_type,
                reason: DropReason::KeysNeverArrived,
            });
        }
        self.held.push(Held { event, until });
        self.ask_keys(&user);
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn random_id(&mut self) -> String {
        let bytes: [u8; 16] = self.random_bytes();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn send(&mut self, flow: &mut Flow, msg: Msg, now: Millis) {
        flow.last_activity = now;
        let (event_type, content) = wire::encode(&msg, &flow.envelope());
        let id = self.take_id();
        self.outgoing.push_back(Outgoing {
            id,
            flow: Some(flow.key.clone()),
            destination: flow.destination(),
            event_type,
            content,
        });
    }

    /// A cancel to some devices of a to-device flow that does not end the flow itself (RQ-09).
    fn send_to_devices(&mut self, flow: &Flow, devices: Vec<String>, code: CancelCode) {
        let msg = Msg::Cancel(wire::Cancel { reason: code.default_reason().to_owned(), code });
        let (event_type, content) = wire::encode(&msg, &flow.envelope());
        let id = self.take_id();
        self.outgoing.push_back(Outgoing {
            id,
            flow: Some(flow.key.clone()),
            destination: Destination::ToDevice { user_id: flow.other_user.clone(), device_ids: devices },
            event_type,
            content,
        });
    }

    /// Ends a flow because of us: the only place a flow is cancelled by this device. Whether a
    /// cancel goes on the wire is decided by the error-loop rule (CX-06).
    pub(crate) fn fail(
        &mut self,
        flow: &mut Flow,
        incoming: Option<MsgKind>,
        code: CancelCode,
        cause: LocalCause,
        now: Millis,
    ) {
        let wire_code = match incoming {
            Some(kind) => cancel::verdict(kind, false, flow.via(), flow.status(), code.clone()),
            None if flow.state.ended() => None,
            None => Some(code.clone()),
        };
        if flow.state.ended() {
            return;
        }
        let sent = wire_code.is_some();
        if let Some(code) = wire_code {
            let msg = Msg::Cancel(wire::Cancel { reason: code.default_reason().to_owned(), code });
            self.send(flow, msg, now);
        }
        let info = CancelInfo { by_us: true, reason: code.default_reason().to_owned(), code, cause: Some(cause), sent };
        flow.state = State::Cancelled(info.clone());
        self.events.push_back(Event::Cancelled { flow: flow.key.clone(), info });
    }

    fn end_silently(&mut self, flow: &mut Flow, code: CancelCode, cause: LocalCause) {
        let by_us = !matches!(cause, LocalCause::AnsweredByOwnDevice);
        let info =
            CancelInfo { by_us, reason: code.default_reason().to_owned(), code, cause: Some(cause), sent: false };
        flow.state = State::Cancelled(info.clone());
        self.events.push_back(Event::Cancelled { flow: flow.key.clone(), info });
    }
}

/// Adds to a bounded memory of flow ids, forgetting the oldest first.
fn remember<T>(memory: &mut VecDeque<T>, item: T) {
    if memory.len() == UNKNOWN_REPLY_MEMORY {
        memory.pop_front();
    }
    memory.push_back(item);
}
