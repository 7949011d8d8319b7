//! A million requests held in one machine at once, ended on a simulated clock, each with exactly
//! the right outcome at exactly its deadline — the scale a bridge serving many users needs.

use std::collections::HashMap;

use mxverify_proto::*;
use serde_json::json;

const N: usize = 1_000_000;
/// Requests arrive a thousand per millisecond over one second.
const PER_MS: usize = 1_000;
const T0: u64 = 1_700_000_000_000;

fn arrival(i: usize) -> Millis {
    T0 + (i / PER_MS) as u64
}

fn flow_of(i: usize) -> FlowKey {
    FlowKey::ToDevice { user_id: format!("@u{i}:example.org"), transaction_id: format!("t{i}") }
}

fn index_of(key: &FlowKey) -> usize {
    match key {
        FlowKey::ToDevice { transaction_id, .. } => transaction_id[1..].parse().unwrap(),
        other => panic!("no other flows here: {other:?}"),
    }
}

/// What happens to request `i`, chosen by `i % 4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Nobody answers: the prompt closes silently 2 minutes after arrival (RQ-04).
    Unanswered,
    /// Our user accepts at once; nothing follows: `m.timeout` goes out 10 minutes after arrival.
    AcceptedThenTimedOut,
    /// Its sender cancels it half a second after the last request arrived.
    CancelledBySender,
    /// Our user rejects it at once: `m.user` goes out.
    RejectedByUs,
}

fn fate(i: usize) -> Fate {
    [Fate::Unanswered, Fate::AcceptedThenTimedOut, Fate::CancelledBySender, Fate::RejectedByUs][i % 4]
}

/// How a flow ended: when, with which code, by whom, and whether a cancel went out.
type Outcome = (Millis, CancelCode, bool, bool);

fn expected(i: usize, cancelled_at: Millis) -> Outcome {
    let t = Timeouts::default();
    match fate(i) {
        Fate::Unanswered => (arrival(i) + t.prompt_after_receipt, CancelCode::Timeout, true, false),
        Fate::AcceptedThenTimedOut => (arrival(i) + t.flow, CancelCode::Timeout, true, true),
        Fate::CancelledBySender => (cancelled_at, CancelCode::User, false, false),
        Fate::RejectedByUs => (arrival(i), CancelCode::User, true, true),
    }
}

/// What the machine said: each flow's ending, each cancel on the wire, and the prompts.
#[derive(Default)]
struct Tally {
    outcomes: HashMap<usize, Outcome>,
    sent_cancels: HashMap<usize, CancelCode>,
    prompts: usize,
}

impl Tally {
    fn collect(&mut self, m: &mut Machine, now: Millis) {
        while let Some(event) = m.poll_event() {
            match event {
                Event::IncomingRequest { .. } => self.prompts += 1,
                Event::Cancelled { flow, info } => {
                    let i = index_of(&flow);
                    let outcome = (now, info.code, info.by_us, info.sent);
                    assert!(self.outcomes.insert(i, outcome).is_none(), "request {i} ended twice");
                }
                Event::KeysNeeded { .. } | Event::Ready { .. } => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
        while let Some(out) = m.poll_outgoing() {
            let Destination::ToDevice { user_id, .. } = &out.destination else { panic!("room message") };
            match out.event_type {
                "m.key.verification.ready" => {}
                "m.key.verification.cancel" => {
                    let i: usize = user_id[2..user_id.find(':').unwrap()].parse().unwrap();
                    let code = CancelCode::from_wire(out.content.to_value()["code"].as_str().unwrap());
                    assert!(self.sent_cancels.insert(i, code).is_none(), "two cancels for request {i}");
                }
                other => panic!("unexpected message {other}"),
            }
        }
    }
}

#[test]
fn a_million_requests_are_held_and_end_each_as_it_should() {
    let own = OwnIdentity {
        user_id: "@bridge:example.org".into(),
        device_id: "BRIDGE".into(),
        ed25519: Ed25519PublicKey::from_bytes([7; 32]),
        master_key: None,
        trusts_master_key: false,
    };
    let mut m = Machine::new(own, Config::default(), Box::new(SeededEntropy::new(3)));
    let mut tally = Tally::default();

    // Arrival: every request prompts; accepted and rejected ones are answered at once.
    for i in 0..N {
        let now = arrival(i);
        let content = json!({"from_device": "PHONE", "methods": ["m.sas.v1"], "timestamp": now, "transaction_id": format!("t{i}")});
        let event = IncomingEvent {
            sender: format!("@u{i}:example.org"),
            event_type: "m.key.verification.request".into(),
            content,
            room: None,
        };
        m.receive(event, now);
        match fate(i) {
            Fate::AcceptedThenTimedOut => m.accept(&flow_of(i), now).unwrap(),
            Fate::RejectedByUs => m.cancel(&flow_of(i), now).unwrap(),
            _ => {}
        }
        tally.collect(&mut m, now);
    }
    assert_eq!(tally.prompts, N);
    assert_eq!(m.flows().count(), N, "every request is held");
    if cfg!(debug_assertions) {
        // Checking every index takes a while; once is enough.
        m.check_invariants().unwrap();
    }

    // Half the senders of the third kind cancel now, the other half just after.
    let cancelled_at = arrival(N - 1) + 500;
    for i in (0..N).filter(|&i| fate(i) == Fate::CancelledBySender) {
        let event = IncomingEvent {
            sender: format!("@u{i}:example.org"),
            event_type: "m.key.verification.cancel".into(),
            content: json!({"code": "m.user", "reason": "changed my mind", "transaction_id": format!("t{i}")}),
            room: None,
        };
        m.receive(event, cancelled_at);
    }
    tally.collect(&mut m, cancelled_at);

    // The clock moves one millisecond at a time through every deadline: each flow ends exactly
    // at its own, and the machine always says when the next one is.
    let mut now = cancelled_at;
    while let Some(next) = m.next_deadline() {
        assert!(next > now, "a deadline in the past: {next} at {now}");
        // Nothing ends before its time.
        m.handle_timeout(next - 1);
        assert!(m.poll_event().is_none() && m.poll_outgoing().is_none(), "something ended early at {}", next - 1);
        now = next;
        m.handle_timeout(now);
        tally.collect(&mut m, now);
    }
    assert_eq!(m.flows().count(), 0, "every flow is forgotten in the end");
    m.check_invariants().unwrap();

    assert_eq!(tally.outcomes.len(), N);
    for i in 0..N {
        let want = expected(i, cancelled_at);
        assert_eq!(tally.outcomes[&i].clone(), want.clone(), "request {i} ({:?})", fate(i));
        assert_eq!(
            tally.sent_cancels.get(&i).cloned(),
            want.3.then_some(want.1.clone()),
            "cancel on the wire for request {i}"
        );
    }
}
