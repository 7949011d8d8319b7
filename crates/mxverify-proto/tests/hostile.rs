//! Two machines over a hostile channel (drops, duplicates, reordering, corrupted fields, events
//! injected by a third party, random user actions, time jumps). Whatever happens:
//! no panic; never a cancel in reply to a cancel; at most one cancel sent per flow; nothing trusted
//! unless the MACs verified (so both sides saw the same SAS and the keys are the real ones); and in
//! the end every flow is done or cancelled.

mod support;

use std::collections::BTreeMap;

use mxverify_proto::*;
use proptest::prelude::*;
use serde_json::{Value, json};
use support::net::*;

#[derive(Debug, Clone)]
enum Op {
    Deliver(usize),
    Drop(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Corrupt(usize, usize, u8),
    Inject(usize, bool),
    Act(bool, u8),
    Scan(bool, u8),
    Advance(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => any::<usize>().prop_map(Op::Deliver),
        1 => any::<usize>().prop_map(Op::Drop),
        1 => any::<usize>().prop_map(Op::Duplicate),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Swap(a, b)),
        1 => (any::<usize>(), any::<usize>(), any::<u8>()).prop_map(|(a, b, c)| Op::Corrupt(a, b, c)),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(a, b)| Op::Inject(a, b)),
        3 => (any::<bool>(), any::<u8>()).prop_map(|(a, b)| Op::Act(a, b)),
        1 => (any::<bool>(), any::<u8>()).prop_map(|(a, b)| Op::Scan(a, b)),
        1 => (0u32..400_000).prop_map(Op::Advance),
    ]
}

fn corrupt(v: &mut Value, which: usize, how: u8) {
    let Some(obj) = v.as_object_mut() else { return };
    let keys: Vec<String> = obj.keys().cloned().collect();
    if keys.is_empty() {
        return;
    }
    let key = &keys[which % keys.len()];
    match how % 6 {
        0 => {
            obj.remove(key);
        }
        1 => {
            obj.insert(key.clone(), json!(how));
        }
        2 => {
            obj.insert(key.clone(), json!([]));
        }
        3 => {
            obj.insert(key.clone(), json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
        }
        _ => {
            // Flip one character of a string (a key, MAC, commitment, id...), or of a nested one.
            let target = obj.get_mut(key).unwrap();
            let target = match target {
                Value::Object(m) if !m.is_empty() => {
                    let k = m.keys().nth(which % m.len()).unwrap().clone();
                    m.get_mut(&k).unwrap()
                }
                other => other,
            };
            if let Value::String(s) = target
                && !s.is_empty()
            {
                let mut chars: Vec<char> = s.chars().collect();
                let i = (how as usize) % chars.len();
                chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
                *s = chars.into_iter().collect();
            }
        }
    }
}

/// Runs one case; returns whether each side verified.
fn scenario(in_room: bool, same_user: bool, qr: bool, ops: Vec<Op>) -> [bool; 2] {
    let db = if same_user { Dev::new(ALICE, "A2") } else { Dev::new(BOB, "B1") };
    let config = if qr {
        Config {
            methods: vec![
                wire::Method::SasV1,
                wire::Method::QrShowV1,
                wire::Method::QrScanV1,
                wire::Method::ReciprocateV1,
            ],
            ..Config::default()
        }
    } else {
        Config::default()
    };
    let mut net = Net::with_config(Dev::new(ALICE, "A1"), db, config.clone(), config);
    let now = net.lb.now;
    if in_room && !same_user {
        net.lb.a.request_in_room(ROOM, BOB, now);
    } else {
        let (user, dev) = (net.db.user.clone(), net.db.device.clone());
        net.lb.a.request_to_device(&user, &[dev], now).unwrap();
    }
    net.collect();
    // Index into the log from which each side had received a cancel for a flow id.
    let mut got_cancel: Vec<(Side, String, usize)> = vec![];
    let mut confirmed = [false, false];
    let b_user = net.db.user.clone();
    // A flow as both sides name it: the to-device counterpart pair and txn, or the room event.
    let flow_id_of = |w: &Wire| -> Option<String> {
        let c = &w.out.content.to_value();
        match &w.out.destination {
            Destination::ToDevice { user_id, .. } => {
                let sender = if w.from == Side::A { ALICE } else { b_user.as_str() };
                let mut pair = [sender.to_owned(), user_id.clone()];
                pair.sort();
                c.get("transaction_id").and_then(Value::as_str).map(|t| format!("{pair:?}{t}"))
            }
            _ => c
                .pointer("/m.relates_to/event_id")
                .and_then(Value::as_str)
                .filter(|_| c.pointer("/m.relates_to/rel_type") == Some(&json!("m.reference")))
                .map(str::to_owned),
        }
    };
    let deliver = |net: &mut Net, i: usize, got_cancel: &mut Vec<(Side, String, usize)>| {
        let w = net.lb.queue[i].clone();
        let receiver = net.dev(w.from.other()).clone();
        let reaches = match &w.out.destination {
            Destination::ToDevice { user_id, device_ids } => {
                *user_id == receiver.user && device_ids.iter().any(|d| *d == receiver.device || d == "*")
            }
            _ => true,
        };
        if w.out.event_type == "m.key.verification.cancel"
            && reaches
            && let Some(f) = flow_id_of(&w)
        {
            got_cancel.push((w.from.other(), f, net.lb.log.len()));
        }
        net.deliver(i);
        net.collect();
    };
    for op in ops {
        let op_shown = format!("{op:?}");
        let n = net.lb.queue.len();
        match op {
            Op::Deliver(i) if n > 0 => deliver(&mut net, i % n, &mut got_cancel),
            Op::Drop(i) if n > 0 => {
                net.lb.queue.remove(i % n);
            }
            Op::Duplicate(i) if n > 0 => {
                let w = net.lb.queue[i % n].clone();
                net.lb.queue.push(w);
            }
            Op::Swap(a, b) if n > 0 => net.lb.queue.swap(a % n, b % n),
            Op::Corrupt(i, which, how) if n > 0 => net.lb.queue[i % n].out.content.edit(|c| corrupt(c, which, how)),
            Op::Inject(i, to_a) if n > 0 => {
                // Eve replays a queued message's content as her own.
                let w = net.lb.queue[i % n].clone();
                let room = match &w.out.destination {
                    Destination::Room { room_id } => Some(RoomContext {
                        room_id: room_id.clone(),
                        event_id: format!("$eve{i}"),
                        origin_server_ts: net.lb.now,
                        relates_to_fallback: None,
                    }),
                    _ => None,
                };
                let ev = IncomingEvent {
                    sender: "@eve:example.org".into(),
                    event_type: w.out.event_type.into(),
                    content: w.out.content.to_value(),
                    room,
                };
                let now = net.lb.now;
                if to_a {
                    net.lb.a.receive(ev, now)
                } else {
                    net.lb.b.receive(ev, now)
                }
                net.collect();
            }
            Op::Act(on_a, what) => {
                let side = if on_a { Side::A } else { Side::B };
                let flows: Vec<FlowKey> = net.m(side).flows().cloned().collect();
                let now = net.lb.now;
                for f in flows {
                    let m = net.m(side);
                    let r = match what % 8 {
                        0 | 1 => m.accept(&f, now),
                        2 | 3 => m.start_sas(&f, now),
                        4 | 5 => m.confirm(&f, now),
                        6 => m.mismatch(&f, now),
                        _ => m.cancel(&f, now),
                    };
                    if r.is_ok() && what % 8 >= 4 && what % 8 <= 5 {
                        confirmed[on_a as usize] = true;
                    }
                }
                net.collect();
            }
            Op::Scan(on_a, corrupt) => {
                // The user points the camera at the other side's code (perhaps misread).
                let side = if on_a { Side::A } else { Side::B };
                let code = net.events(side.other()).into_iter().rev().find_map(|e| match e {
                    Event::QrCode { payload, .. } => Some(payload.clone()),
                    _ => None,
                });
                if let Some(mut code) = code {
                    if corrupt % 4 == 0 {
                        let i = usize::from(corrupt) % code.len();
                        code[i] ^= 1;
                    }
                    let flows: Vec<FlowKey> = net.m(side).flows().cloned().collect();
                    let now = net.lb.now;
                    for f in flows {
                        if net.m(side).scan_qr(&f, &code, now).is_ok() {
                            confirmed[on_a as usize] = true; // scanning is the scanner's confirmation
                        }
                    }
                    net.collect();
                }
            }
            Op::Advance(ms) => net.advance(u64::from(ms)),
            _ => {}
        }
        // The indexes (by key, user, device, awaiting keys) and the timer queue agree with the
        // flow table after every step.
        for side in [Side::A, Side::B] {
            if let Err(e) = net.m(side).check_invariants() {
                panic!("{side:?} after {op_shown}: {e}");
            }
        }
    }
    // Drain: deliver everything, then let every deadline pass.
    for _ in 0..3 {
        while !net.lb.queue.is_empty() {
            deliver(&mut net, 0, &mut got_cancel);
        }
        net.advance(11 * 60_000);
    }

    // Never a cancel in reply to a cancel: after receiving one for a flow, no cancel for it.
    for (side, flow, at) in &got_cancel {
        for w in &net.lb.log[*at..] {
            if w.from == *side && w.out.event_type == "m.key.verification.cancel" {
                assert_ne!(flow_id_of(w).as_ref(), Some(flow), "{side:?} answered a cancel: {:?}", w.out);
            }
        }
    }
    // At most one cancel per flow and side.
    let mut count: BTreeMap<(bool, String), usize> = BTreeMap::new();
    for w in &net.lb.log {
        if w.out.event_type == "m.key.verification.cancel" {
            *count.entry((w.from == Side::A, flow_id_of(w).unwrap_or_default())).or_default() += 1;
        }
    }
    assert!(count.values().all(|&c| c <= 1), "{count:?}");
    // Nothing trusted unless the MACs verified: then both saw the same SAS, the user of the
    // trusting side confirmed, and the keys are exactly the other side's real ones.
    for side in [Side::A, Side::B] {
        if let Some(keys) = net.done(side) {
            assert!(confirmed[(side == Side::A) as usize], "{side:?} trusted without its user confirming");
            assert_eq!(net.sas(side), net.sas(side.other()), "{side:?} trusted different SAS");
            let other = net.dev(side.other()).clone();
            for k in keys {
                let real = match k.kind {
                    KeyKind::Device => other.ed25519.clone(),
                    _ => other.msk.clone().unwrap(),
                };
                assert_eq!(k.key, real);
                assert_eq!(
                    k.key_id,
                    format!(
                        "ed25519:{}",
                        if k.kind == KeyKind::Device { other.device.clone() } else { real.to_string() }
                    )
                );
            }
        }
    }
    // Every flow ended (and was forgotten after its tombstone time) — no silent stall.
    for side in [Side::A, Side::B] {
        assert_eq!(net.m(side).flows().count(), 0, "{side:?} still has flows");
        assert_eq!(net.m(side).next_deadline(), None);
    }
    [net.done(Side::A).is_some(), net.done(Side::B).is_some()]
}

proptest! {
    // 512 cases by default; PROPTEST_CASES=N runs more.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_channel_to_device(same_user in any::<bool>(), qr in any::<bool>(), ops in proptest::collection::vec(op(), 0..80)) {
        let _ = scenario(false, same_user, qr, ops);
    }

    #[test]
    fn hostile_channel_in_room(qr in any::<bool>(), ops in proptest::collection::vec(op(), 0..80)) {
        let _ = scenario(true, false, qr, ops);
    }
}

/// The happy paths through the same harness, so the properties are not vacuous.
#[test]
fn harness_reaches_done() {
    use Op::*;
    let sas = vec![
        Deliver(0),
        Act(false, 0),
        Deliver(0),
        Act(true, 2),
        Deliver(0),
        Deliver(0),
        Deliver(0),
        Deliver(0),
        Act(true, 4),
        Act(false, 4),
        Deliver(0),
        Deliver(0),
        Deliver(0),
        Deliver(0),
    ];
    assert_eq!(scenario(false, false, false, sas.clone()), [true, true]);
    assert_eq!(scenario(true, false, true, sas), [true, true]);
    // QR: B scans A's code, A's user confirms.
    let qr =
        vec![Deliver(0), Act(false, 0), Deliver(0), Scan(false, 1), Deliver(0), Act(true, 4), Deliver(0), Deliver(0)];
    assert_eq!(scenario(false, false, true, qr.clone()), [true, true]);
    assert_eq!(scenario(false, true, true, qr), [true, true]);
}
