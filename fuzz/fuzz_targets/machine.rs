//! A machine with flows in every state receives arbitrary events: it never panics, never answers
//! a cancel, sends at most one cancel per flow id, and its indexes and timers stay consistent. It
//! may remember 8 flows only, so that inputs reach its bound and make it forget flows early.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use mxverify_proto::loopback::{Loopback, Side};
use mxverify_proto::*;
use serde_json::Value;

fn identity(user: &str, device: &str) -> OwnIdentity {
    OwnIdentity {
        user_id: user.into(),
        device_id: device.into(),
        ed25519: Ed25519PublicKey::from_bytes([device.len() as u8; 32]),
        master_key: Some(Ed25519PublicKey::from_bytes([7u8; 32])),
        trusts_master_key: true,
    }
}

fuzz_target!(|data: &[u8]| {
    // The input is a JSON array of [sender, type, content, room_or_null] events.
    let Ok(Value::Array(events)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let a = Machine::new(identity("@alice:x", "A"), Config::default(), Box::new(SeededEntropy::new(1)));
    let small = Config { max_flows: 8, ..Config::default() };
    let b = Machine::new(identity("@bob:x", "B"), small, Box::new(SeededEntropy::new(2)));
    let mut net = Loopback::new(a, b, 1_700_000_000_000);
    net.exchange_device_keys();
    // A flow up to the SAS, so the events meet a machine in an interesting state.
    let fa = net.a.request_to_device("@bob:x", &["B".into()], net.now).unwrap();
    net.run();
    let fb = net.flow_of(Side::B).unwrap();
    net.b.accept(&fb, net.now).unwrap();
    net.run();
    net.a.start_sas(&fa, net.now).unwrap();
    net.run();
    let sent_before = net.b.poll_outgoing().is_some();
    assert!(!sent_before);
    let mut cancels: BTreeMap<String, usize> = BTreeMap::new();
    let mut got_cancel: Vec<String> = vec![];
    for ev in events {
        let Value::Array(parts) = ev else { continue };
        let (Some(sender), Some(ty), Some(content)) =
            (parts.first().and_then(Value::as_str), parts.get(1).and_then(Value::as_str), parts.get(2))
        else {
            continue;
        };
        let room = parts.get(3).and_then(Value::as_str).map(|event_id| RoomContext {
            room_id: "!r:x".into(),
            event_id: event_id.into(),
            origin_server_ts: net.now,
            relates_to_fallback: None,
        });
        let flow_id = content.get("transaction_id").and_then(Value::as_str).map(|t| format!("{sender}|{t}"));
        if ty == "m.key.verification.cancel"
            && room.is_none()
            && let Some(f) = &flow_id
        {
            got_cancel.push(f.clone());
        }
        let now = net.now;
        net.b.receive(
            IncomingEvent { sender: sender.into(), event_type: ty.into(), content: content.clone(), room },
            now,
        );
        while let Some(out) = net.b.poll_outgoing() {
            if out.event_type == "m.key.verification.cancel"
                && let Destination::ToDevice { user_id, .. } = &out.destination
            {
                let f = format!("{user_id}|{}", out.content.to_value()["transaction_id"].as_str().unwrap_or(""));
                assert!(!got_cancel.contains(&f), "answered a cancel: {out:?}");
                let n = cancels.entry(f).or_default();
                *n += 1;
                assert!(*n <= 1, "two cancels for one flow");
            }
        }
        while net.b.poll_event().is_some() {}
        // The flow table's indexes and the timer queue agree with the flows after every event.
        if let Err(e) = net.b.check_invariants() {
            panic!("{e}");
        }
    }
});
