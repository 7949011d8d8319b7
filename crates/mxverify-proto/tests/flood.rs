//! One user cannot fill the machine: however many requests or starts one peer sends, the machine
//! remembers at most 64 flows with them (forgetting their oldest ended flows early to make room),
//! so its memory and the cost of each of their requests stay bounded, and other users are served
//! as before. Nor can many users together: the machine remembers at most `Config::max_flows`.

use std::collections::BTreeMap;

use mxverify_proto::*;
use serde_json::{Value, json};

const T0: u64 = 1_700_000_000_000;
const EVE: &str = "@eve:example.org";
/// The bound the machine keeps per user (`FLOWS_PER_USER` in the machine).
const BOUND: usize = 64;

fn machine() -> Machine {
    machine_with(Config::default())
}

fn machine_with(config: Config) -> Machine {
    let own = OwnIdentity {
        user_id: "@bot:example.org".into(),
        device_id: "BOT".into(),
        ed25519: Ed25519PublicKey::from_bytes([7; 32]),
        master_key: None,
        trusts_master_key: false,
    };
    Machine::new(own, config, Box::new(SeededEntropy::new(5)))
}

fn to_device(sender: &str, event_type: &str, content: Value) -> IncomingEvent {
    IncomingEvent { sender: sender.into(), event_type: event_type.into(), content, room: None }
}

fn request(sender: &str, device: &str, txn: &str, now: Millis) -> IncomingEvent {
    let content = json!({"from_device": device, "methods": ["m.sas.v1"], "timestamp": now, "transaction_id": txn});
    to_device(sender, "m.key.verification.request", content)
}

fn user(i: usize) -> String {
    format!("@u{i}:example.org")
}

fn cancel_from(sender: &str, txn: &str) -> IncomingEvent {
    to_device(sender, "m.key.verification.cancel", json!({"code": "m.user", "reason": "x", "transaction_id": txn}))
}

/// A `key` message for flow `txn`: a late message, for a flow that should be remembered as ended.
fn late_key(sender: &str, txn: &str) -> IncomingEvent {
    let content = json!({"key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "transaction_id": txn});
    to_device(sender, "m.key.verification.key", content)
}

/// A request waiting from each of Eve's first [`BOUND`] devices: she is at the bound.
fn eve_at_the_bound(m: &mut Machine, now: Millis) {
    for i in 0..BOUND {
        m.receive(request(EVE, &format!("D{i}"), &format!("t{i}"), now), now);
    }
}

fn flows_with(m: &Machine, user: &str) -> usize {
    m.flows().filter(|k| matches!(k, FlowKey::ToDevice { user_id, .. } if user_id == user)).count()
}

fn key(user: &str, txn: &str) -> FlowKey {
    FlowKey::ToDevice { user_id: user.into(), transaction_id: txn.into() }
}

/// The events and messages the machine put out since the last call.
fn drain(m: &mut Machine) -> (Vec<Event>, Vec<Outgoing>) {
    let events = std::iter::from_fn(|| m.poll_event()).collect();
    let outgoing = std::iter::from_fn(|| m.poll_outgoing()).collect();
    (events, outgoing)
}

fn dropped_for_limit(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Dropped { reason: DropReason::FlowLimit, .. }))
}

/// One device sends 20 000 requests, one per millisecond: each new one cancels the one in
/// progress (CX-03), and the ended ones would stay remembered for ten minutes. The machine keeps
/// 64 flows with that user at most, every request is still handled (none dropped for the bound),
/// and a request after the flood waits for our user as usual.
#[test]
fn one_device_flooding_requests_stays_bounded() {
    let mut m = machine();
    for i in 0..20_000u64 {
        let now = T0 + i;
        m.receive(request(EVE, "EVEDEVICE", &format!("t{i}"), now), now);
        let (events, _) = drain(&mut m);
        assert!(!dropped_for_limit(&events), "request {i} dropped although ended flows could make room");
        assert!(
            events.iter().any(|e| matches!(e, Event::IncomingRequest { .. } | Event::Cancelled { .. })),
            "request {i} was not handled: {events:?}"
        );
        if i % 1_000 == 0 {
            assert!(flows_with(&m, EVE) <= BOUND, "{} flows with one user", flows_with(&m, EVE));
            m.check_invariants().unwrap();
        }
    }
    assert_eq!(flows_with(&m, EVE), BOUND);
    // Every second request finds the one before it in progress, and both end (CX-03).
    let last = m.flow(&key(EVE, "t19999")).expect("the last request is remembered");
    assert!(
        matches!(&last.phase, FlowPhase::Cancelled(info) if info.cause == Some(LocalCause::MultipleAttempts)),
        "{:?}",
        last.phase
    );
    let now = T0 + 20_000;
    m.receive(request(EVE, "EVEDEVICE", "t20000", now), now);
    drain(&mut m);
    let next = m.flow(&key(EVE, "t20000")).expect("the next request is remembered");
    assert!(matches!(next.phase, FlowPhase::Incoming { .. }), "{:?}", next.phase);
    assert_eq!(flows_with(&m, EVE), BOUND);
    m.check_invariants().unwrap();

    // A late message for a flow forgotten early (its id among the gate's recently closed ones)
    // is dropped as for an ended flow, not answered as an unknown transaction.
    m.receive(late_key(EVE, "t19930"), now);
    let (events, outgoing) = drain(&mut m);
    assert!(m.flow(&key(EVE, "t19930")).is_none(), "forgotten early");
    assert!(events.iter().any(|e| matches!(e, Event::Dropped { reason: DropReason::FlowEnded, .. })), "{events:?}");
    assert!(outgoing.is_empty(), "{outgoing:?}");

    // Another user is served as before.
    m.receive(request("@bob:example.org", "BOBDEVICE", "b1", now), now);
    let (events, _) = drain(&mut m);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::IncomingRequest { flow, .. } if *flow == key("@bob:example.org", "b1")))
    );
}

/// 64 of one user's devices each have a request waiting (no CX-03 between different devices):
/// the 65th is dropped with `FlowLimit` — no prompt, nothing on the wire, the 64 untouched — while
/// another user's request is prompted. Once one of the 64 ends, the next request makes room by
/// forgetting it.
#[test]
fn a_user_with_64_verifications_in_progress_opens_no_more() {
    let mut m = machine();
    let now = T0;
    eve_at_the_bound(&mut m, now);
    let (events, outgoing) = drain(&mut m);
    assert_eq!(events.iter().filter(|e| matches!(e, Event::IncomingRequest { .. })).count(), BOUND);
    assert!(outgoing.is_empty());

    m.receive(request(EVE, "D64", "t64", now), now);
    let (events, outgoing) = drain(&mut m);
    assert!(dropped_for_limit(&events), "{events:?}");
    assert!(!events.iter().any(|e| matches!(e, Event::IncomingRequest { .. })), "{events:?}");
    assert!(outgoing.is_empty(), "nothing goes out for a dropped request: {outgoing:?}");
    assert_eq!(flows_with(&m, EVE), BOUND);
    assert!(m.flow(&key(EVE, "t64")).is_none());
    assert!(
        (0..BOUND).all(|i| matches!(m.flow(&key(EVE, &format!("t{i}"))).unwrap().phase, FlowPhase::Incoming { .. }))
    );

    m.receive(request("@bob:example.org", "BOBDEVICE", "b1", now), now);
    let (events, _) = drain(&mut m);
    assert!(events.iter().any(|e| matches!(e, Event::IncomingRequest { .. })), "{events:?}");

    // Eve cancels one of hers: the next request forgets that one and is prompted.
    m.receive(cancel_from(EVE, "t0"), now);
    drain(&mut m);
    m.receive(request(EVE, "D65", "t65", now), now);
    let (events, _) = drain(&mut m);
    assert!(
        events.iter().any(|e| matches!(e, Event::IncomingRequest { flow, .. } if *flow == key(EVE, "t65"))),
        "{events:?}"
    );
    assert_eq!(flows_with(&m, EVE), BOUND);
    assert!(m.flow(&key(EVE, "t0")).is_none(), "the ended flow made room");
    // Its id is among the gate's recently closed ones: the same request again is not a new flow.
    m.receive(request(EVE, "D0", "t0", now), now);
    let (events, _) = drain(&mut m);
    assert!(events.iter().any(|e| matches!(e, Event::Dropped { reason: DropReason::FlowEnded, .. })), "{events:?}");
    m.check_invariants().unwrap();
}

/// A new attempt from a device whose earlier one is among the 64 in progress ends that one
/// (CX-03) before the bound is looked at, so it is not dropped for the bound: both end as
/// parallel attempts, as without the bound, and the earlier one makes room.
#[test]
fn a_new_attempt_from_a_device_at_the_bound_still_cancels_its_earlier_one() {
    let mut m = machine();
    let now = T0;
    eve_at_the_bound(&mut m, now);
    drain(&mut m);
    m.receive(request(EVE, "D5", "again", now), now);
    let (events, _) = drain(&mut m);
    assert!(!dropped_for_limit(&events), "{events:?}");
    for txn in ["t5", "again"] {
        let cancelled = |e: &Event| {
            matches!(e, Event::Cancelled { flow, info }
            if *flow == key(EVE, txn) && info.cause == Some(LocalCause::MultipleAttempts))
        };
        assert!(events.iter().any(cancelled), "{txn}: {events:?}");
    }
    // The one that ended first is the one forgotten to make room (its end was reported).
    assert!(m.flow(&key(EVE, "t5")).is_none());
    assert!(matches!(m.flow(&key(EVE, "again")).unwrap().phase, FlowPhase::Cancelled(_)));
    assert_eq!(flows_with(&m, EVE), BOUND);
    m.check_invariants().unwrap();
}

/// Flows we opened ourselves count too and may take a user past the bound (our own requests are
/// not refused): their request then needs as many ended flows forgotten as it takes to get back
/// under the bound, and those leave no deadline behind.
#[test]
fn our_own_flows_past_the_bound() {
    let mut m = machine();
    let now = T0;
    let ours: Vec<FlowKey> =
        (0..BOUND + 6).map(|_| m.request_to_device(EVE, &["EVEDEVICE".to_owned()], now).unwrap()).collect();
    for flow in &ours[..3] {
        m.cancel(flow, now).unwrap();
    }
    drain(&mut m);
    m.receive(request(EVE, "OTHER", "r1", now), now);
    let (events, outgoing) = drain(&mut m);
    assert!(dropped_for_limit(&events), "7 must go, 3 have ended: {events:?}");
    assert!(outgoing.is_empty());
    assert_eq!(flows_with(&m, EVE), BOUND + 6);

    for flow in &ours[3..10] {
        m.cancel(flow, now).unwrap();
    }
    drain(&mut m);
    m.receive(request(EVE, "OTHER", "r2", now), now);
    let (events, _) = drain(&mut m);
    assert!(events.iter().any(|e| matches!(e, Event::IncomingRequest { .. })), "{events:?}");
    assert_eq!(flows_with(&m, EVE), BOUND);
    assert!(ours[..7].iter().all(|f| m.flow(f).is_none()), "the seven oldest ended flows went");
    assert!(ours[7..].iter().all(|f| m.flow(f).is_some()));
    m.check_invariants().unwrap();
}

/// A legacy start (SAS started without a request) opens a flow too, and is bounded alike.
#[test]
fn legacy_starts_count_towards_the_bound() {
    let mut m = machine();
    let now = T0;
    let devices: BTreeMap<String, Ed25519PublicKey> =
        (0..=BOUND).map(|i| (format!("D{i}"), Ed25519PublicKey::from_bytes([i as u8 + 1; 32]))).collect();
    m.update_user_keys(EVE, UserKeys { devices, master_key: None, other_cross_signing_keys: vec![] }, now);
    eve_at_the_bound(&mut m, now);
    drain(&mut m);
    let start = json!({
        "from_device": format!("D{BOUND}"),
        "method": "m.sas.v1",
        "key_agreement_protocols": ["curve25519-hkdf-sha256"],
        "hashes": ["sha256"],
        "message_authentication_codes": ["hkdf-hmac-sha256.v2"],
        "short_authentication_string": ["decimal", "emoji"],
        "transaction_id": "legacy",
    });
    m.receive(to_device(EVE, "m.key.verification.start", start), now);
    let (events, outgoing) = drain(&mut m);
    assert!(dropped_for_limit(&events), "{events:?}");
    assert!(outgoing.is_empty(), "{outgoing:?}");
    assert!(m.flow(&key(EVE, "legacy")).is_none());
}

/// Many users together fill a machine of `max_flows = 100`: the 101st user's request is dropped
/// as `MachineFull` (no prompt, nothing on the wire, the 100 untouched); once flows have ended, a
/// newcomer makes room by forgetting the one that ended first, whose late messages are still
/// recognised; and our own requests are never refused.
#[test]
fn many_users_fill_the_machine_to_its_bound_and_no_further() {
    const MAX: usize = 100;
    let mut m = machine_with(Config { max_flows: MAX, ..Config::default() });
    let now = T0;
    for i in 0..MAX {
        m.receive(request(&user(i), "DEV", "t", now), now);
    }
    let (events, _) = drain(&mut m);
    assert_eq!(events.iter().filter(|e| matches!(e, Event::IncomingRequest { .. })).count(), MAX);

    m.receive(request(&user(MAX), "DEV", "t", now), now);
    let (events, outgoing) = drain(&mut m);
    assert!(
        matches!(&events[..], [Event::Dropped { reason: DropReason::MachineFull, sender, .. }] if *sender == user(MAX)),
        "{events:?}"
    );
    assert!(outgoing.is_empty(), "nothing goes out for a dropped request: {outgoing:?}");
    assert!(m.flow(&key(&user(MAX), "t")).is_none());
    assert_eq!(m.flows().count(), MAX);
    assert!((0..MAX).all(|i| matches!(m.flow(&key(&user(i), "t")).unwrap().phase, FlowPhase::Incoming { .. })));

    // Two senders cancel, 7 then 3: each newcomer forgets the flow that ended first.
    m.receive(cancel_from(&user(7), "t"), now + 1);
    m.receive(cancel_from(&user(3), "t"), now + 2);
    drain(&mut m);
    for (newcomer, gone, kept) in [(MAX, 7, Some(3)), (MAX + 1, 3, None)] {
        m.receive(request(&user(newcomer), "DEV", "t", now + 3), now + 3);
        let (events, _) = drain(&mut m);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::IncomingRequest { flow, .. } if *flow == key(&user(newcomer), "t"))),
            "{events:?}"
        );
        assert!(m.flow(&key(&user(gone), "t")).is_none(), "the flow that ended first made room");
        if let Some(kept) = kept {
            assert!(matches!(m.flow(&key(&user(kept), "t")).unwrap().phase, FlowPhase::Cancelled(_)));
        }
        assert_eq!(m.flows().count(), MAX);
        m.check_invariants().unwrap();
    }
    // None ended now: the next is dropped again.
    m.receive(request(&user(MAX + 2), "DEV", "t", now + 4), now + 4);
    let (events, _) = drain(&mut m);
    assert!(events.iter().any(|e| matches!(e, Event::Dropped { reason: DropReason::MachineFull, .. })), "{events:?}");

    // A late message for a flow forgotten early is dropped as for an ended flow, not answered.
    m.receive(late_key(&user(7), "t"), now + 5);
    let (events, outgoing) = drain(&mut m);
    assert!(events.iter().any(|e| matches!(e, Event::Dropped { reason: DropReason::FlowEnded, .. })), "{events:?}");
    assert!(outgoing.is_empty(), "{outgoing:?}");

    // Our own request goes out even so.
    let ours = m.request_to_device(&user(1), &["DEV".to_owned()], now + 6).unwrap();
    assert!(m.flow(&ours).is_some() && m.flows().count() == MAX + 1);
    m.check_invariants().unwrap();
}

/// Ten times `max_flows` users each send a request and cancel it at once, then a last one waits:
/// the machine never holds more than its bound, every request is prompted (ended flows always
/// make room), and the flows it keeps are the latest.
#[test]
fn users_without_end_stay_within_the_bound() {
    const MAX: usize = 200;
    let mut m = machine_with(Config { max_flows: MAX, ..Config::default() });
    for i in 0..10 * MAX {
        let now = T0 + i as u64;
        m.receive(request(&user(i), "DEV", "t", now), now);
        m.receive(cancel_from(&user(i), "t"), now);
        let (events, _) = drain(&mut m);
        assert!(events.iter().any(|e| matches!(e, Event::IncomingRequest { .. })), "request {i}: {events:?}");
        assert!(m.flows().count() <= MAX);
        if i % 100 == 0 {
            m.check_invariants().unwrap();
        }
    }
    let survivors: Vec<FlowKey> = m.flows().cloned().collect();
    assert_eq!(survivors.len(), MAX);
    assert!(survivors.iter().all(|k| matches!(k, FlowKey::ToDevice { user_id, .. }
        if user_id.trim_start_matches("@u").trim_end_matches(":example.org").parse::<usize>().unwrap() >= 9 * MAX)));
    m.check_invariants().unwrap();
}

/// A newcomer the machine cannot make room for is refused before anything is forgotten: our own
/// requests took it past its bound, and too few flows have ended to get back under it. With a
/// bound of 0 every peer is refused, and nothing is forgotten either.
#[test]
fn a_refused_newcomer_costs_no_remembered_flow() {
    const MAX: usize = 10;
    let mut m = machine_with(Config { max_flows: MAX, ..Config::default() });
    let now = T0;
    let ours: Vec<FlowKey> =
        (0..MAX + 3).map(|i| m.request_to_device(&user(i), &["DEV".to_owned()], now).unwrap()).collect();
    for flow in &ours[..3] {
        m.cancel(flow, now).unwrap();
    }
    drain(&mut m);
    // 13 flows, 3 ended: getting under 10 takes 4.
    m.receive(request(&user(100), "DEV", "t", now), now);
    let (events, outgoing) = drain(&mut m);
    assert!(events.iter().any(|e| matches!(e, Event::Dropped { reason: DropReason::MachineFull, .. })), "{events:?}");
    assert!(outgoing.is_empty());
    assert_eq!(m.flows().count(), MAX + 3, "nothing forgotten for a newcomer that is refused");
    assert!(ours.iter().all(|k| m.flow(k).is_some()));
    m.check_invariants().unwrap();
    // One more ended: now there are enough, and the four go.
    m.cancel(&ours[3], now).unwrap();
    m.receive(request(&user(101), "DEV", "t", now), now);
    let (events, _) = drain(&mut m);
    assert!(events.iter().any(|e| matches!(e, Event::IncomingRequest { .. })), "{events:?}");
    assert_eq!(m.flows().count(), MAX);
    assert!(ours[..4].iter().all(|k| m.flow(k).is_none()) && ours[4..].iter().all(|k| m.flow(k).is_some()));
    m.check_invariants().unwrap();

    let mut m = machine_with(Config { max_flows: 0, ..Config::default() });
    let flow = m.request_to_device(&user(1), &["DEV".to_owned()], now).unwrap();
    m.cancel(&flow, now).unwrap();
    drain(&mut m);
    m.receive(request(&user(2), "DEV", "t", now), now);
    let (events, _) = drain(&mut m);
    assert!(events.iter().any(|e| matches!(e, Event::Dropped { reason: DropReason::MachineFull, .. })), "{events:?}");
    assert!(m.flow(&flow).is_some(), "the ended flow is still remembered");
}
