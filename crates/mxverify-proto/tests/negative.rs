//! A negative test for every check: each must end in the right cancel code, sent by the right
//! side, with nothing trusted, at most one cancel on the wire per flow, and no cancel answered.

mod support;

use mxverify_proto::*;
use serde_json::json;
use support::net::*;

const LOW_ORDER: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"; // the all-zero point
const OTHER_HASH: &str = "Q/NmNFEUS1fS+YeEmiZkjjblKTitrKOAk7cPEumcMlg";

fn pair() -> Net {
    Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"))
}

/// Runs request → ready → A starts SAS → both confirm, with `tamper` on the wire.
fn sas_flow(net: &mut Net, in_room: bool) {
    let (fa, fb) = net.request_and_accept(in_room);
    let now = net.lb.now;
    net.lb.a.start_sas(&fa, now).unwrap();
    net.run();
    let _ = net.lb.a.confirm(&fa, now);
    let _ = net.lb.b.confirm(&fb, now);
    net.run();
}

/// Checks the outcome of a failed flow: `canceller` sent exactly one cancel with `code`, the other
/// side received it, nobody trusted anything, and no cancel was answered.
fn assert_cancelled(net: &Net, canceller: Side, code: &str) -> CancelInfo {
    let sent = net.cancels_sent();
    assert_eq!(sent, vec![(canceller, code.to_owned())], "cancels on the wire");
    let ours = net.cancelled(canceller).expect("canceller reports the cancel");
    assert!(ours.by_us && ours.sent && ours.code.as_str() == code, "{ours:?}");
    assert!(ours.cause.is_some(), "our own cancels carry a local cause");
    let theirs = net.cancelled(canceller.other()).expect("the other side reports it");
    assert!(!theirs.by_us && theirs.code.as_str() == code, "{theirs:?}");
    assert!(net.done(Side::A).is_none() && net.done(Side::B).is_none(), "nothing may be trusted");
    ours
}

fn tamper(net: &mut Net, event_type: &'static str, f: impl Fn(&mut Wire) + 'static) {
    net.set_tamper(move |w: &mut Wire| {
        if w.out.event_type == event_type {
            f(w);
        }
        true
    });
}

#[test]
fn wrong_commitment() {
    let mut net = pair();
    tamper(&mut net, "m.key.verification.accept", |w| set(w, "commitment", json!(OTHER_HASH)));
    sas_flow(&mut net, false);
    let info = assert_cancelled(&net, Side::A, "m.mismatched_commitment");
    assert_eq!(info.cause, Some(LocalCause::CommitmentMismatch));
}

#[test]
fn wrong_device_key_mac() {
    for in_room in [false, true] {
        let mut net = pair();
        tamper(&mut net, "m.key.verification.mac", |w| {
            if w.from == Side::B {
                w.out.content.edit(|c| c["mac"]["ed25519:B1"] = json!(OTHER_HASH));
            }
        });
        sas_flow(&mut net, in_room);
        let info = assert_cancelled(&net, Side::A, "m.key_mismatch");
        assert_eq!(info.cause, Some(LocalCause::KeyMacMismatch("ed25519:B1".into())));
    }
}

#[test]
fn wrong_key_list_mac() {
    let mut net = pair();
    tamper(&mut net, "m.key.verification.mac", |w| {
        if w.from == Side::A {
            set(w, "keys", json!(OTHER_HASH));
        }
    });
    sas_flow(&mut net, false);
    let info = assert_cancelled(&net, Side::B, "m.key_mismatch");
    assert_eq!(info.cause, Some(LocalCause::KeyListMacMismatch));
}

#[test]
fn removed_key_from_mac_breaks_the_key_list_mac() {
    let mut net = pair();
    tamper(&mut net, "m.key.verification.mac", |w| {
        if w.from == Side::B {
            let msk = format!("ed25519:{}", fake_key(&format!("{BOB}/msk")));
            w.out.content.edit(|c| {
                c["mac"].as_object_mut().unwrap().remove(&msk);
            });
        }
    });
    sas_flow(&mut net, false);
    assert_eq!(assert_cancelled(&net, Side::A, "m.key_mismatch").cause, Some(LocalCause::KeyListMacMismatch));
}

#[test]
fn wrong_master_key_mac() {
    let mut net = pair();
    let msk = format!("ed25519:{}", fake_key(&format!("{BOB}/msk")));
    let id = msk.clone();
    tamper(&mut net, "m.key.verification.mac", move |w| {
        if w.from == Side::B {
            w.out.content.edit(|c| c["mac"][&id] = json!(OTHER_HASH));
        }
    });
    sas_flow(&mut net, false);
    assert_eq!(assert_cancelled(&net, Side::A, "m.key_mismatch").cause, Some(LocalCause::KeyMacMismatch(msk)));
}

#[test]
fn user_says_mismatch() {
    let mut net = pair();
    let (fa, fb) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    net.lb.b.mismatch(&fb, net.lb.now).unwrap();
    net.run();
    assert!(net.lb.a.confirm(&fa, net.lb.now).is_err(), "no confirming a cancelled flow");
    assert_eq!(assert_cancelled(&net, Side::B, "m.mismatched_sas").cause, Some(LocalCause::UserSaidMismatch));
}

#[test]
fn unknown_start_method() {
    let mut net = pair();
    tamper(&mut net, "m.key.verification.start", |w| set(w, "method", json!("org.example.telepathy")));
    sas_flow(&mut net, false);
    let info = assert_cancelled(&net, Side::B, "m.unknown_method");
    assert_eq!(info.cause, Some(LocalCause::UnsupportedMethod("org.example.telepathy".into())));
}

#[test]
fn start_with_nothing_in_common() {
    for (field, value, what) in [
        ("key_agreement_protocols", json!(["org.example.ka"]), "key agreement protocol"),
        ("hashes", json!(["sha512"]), "hash"),
        ("message_authentication_codes", json!(["hmac-sha256"]), "message authentication code"),
        ("short_authentication_string", json!(["org.example.octal"]), "short authentication string method"),
    ] {
        let mut net = pair();
        let v = value.clone();
        tamper(&mut net, "m.key.verification.start", move |w| set(w, field, v.clone()));
        sas_flow(&mut net, false);
        let info = assert_cancelled(&net, Side::B, "m.unknown_method");
        assert_eq!(info.cause, Some(LocalCause::NoCommonMethod(what)), "{field}");
    }
}

#[test]
fn accept_choosing_what_was_not_offered() {
    for (field, value, what) in [
        ("key_agreement_protocol", json!("org.example.ka"), "key agreement protocol"),
        ("hash", json!("sha512"), "hash"),
        ("message_authentication_code", json!("hmac-sha256"), "message authentication code"),
        ("short_authentication_string", json!(["decimal", "octal"]), "short authentication string method"),
        ("short_authentication_string", json!([]), "short authentication string method"),
    ] {
        let mut net = pair();
        let v = value.clone();
        tamper(&mut net, "m.key.verification.accept", move |w| set(w, field, v.clone()));
        sas_flow(&mut net, false);
        let info = assert_cancelled(&net, Side::A, "m.unknown_method");
        assert_eq!(info.cause, Some(LocalCause::AcceptNotOffered(what)), "{field}");
    }
}

#[test]
fn malformed_messages_are_invalid() {
    for (ty, field, value) in [
        ("m.key.verification.key", "key", json!("not base64!")),
        ("m.key.verification.key", "key", json!(42)),
        ("m.key.verification.accept", "commitment", json!("c2hvcnQ")),
        ("m.key.verification.mac", "mac", json!(["x"])),
        ("m.key.verification.mac", "keys", json!(null)),
        ("m.key.verification.start", "hashes", json!("sha256")),
        ("m.key.verification.start", "from_device", json!("")),
    ] {
        let mut net = pair();
        let v = value.clone();
        let target = ty;
        let mut done = false;
        // Only the first such message: MACs cross, and both would be malformed otherwise.
        net.set_tamper(move |w: &mut Wire| {
            if w.out.event_type == target && !std::mem::replace(&mut done, true) {
                if v.is_null() {
                    w.out.content.edit(|c| {
                        c.as_object_mut().unwrap().remove(field);
                    });
                } else {
                    set(w, field, v.clone());
                }
            }
            true
        });
        sas_flow(&mut net, false);
        let canceller = net.cancels_sent().first().map(|c| c.0).expect("someone cancels");
        let info = assert_cancelled(&net, canceller, "m.invalid_message");
        assert!(matches!(info.cause, Some(LocalCause::Malformed(e)) if e.field == field), "{ty} {field}: {info:?}");
    }
}

#[test]
fn low_order_ephemeral_key() {
    let mut net = pair();
    tamper(&mut net, "m.key.verification.key", |w| {
        if w.from == Side::A {
            set(w, "key", json!(LOW_ORDER));
        }
    });
    sas_flow(&mut net, false);
    assert_eq!(assert_cancelled(&net, Side::B, "m.invalid_message").cause, Some(LocalCause::NonContributoryKey));
}

#[test]
fn message_out_of_order() {
    // A `mac` before any keys were exchanged.
    let mut net = pair();
    let (fa, _) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.collect();
    let txn = fa.flow_id().to_owned();
    net.lb.b.receive(
        to_device(
            ALICE,
            "m.key.verification.mac",
            json!({"transaction_id": txn, "mac": {"ed25519:A1": OTHER_HASH}, "keys": OTHER_HASH}),
        ),
        net.lb.now,
    );
    net.run();
    let info = net.cancelled(Side::B).unwrap();
    assert_eq!(info.code, CancelCode::UnexpectedMessage);
    assert!(matches!(info.cause, Some(LocalCause::Unexpected { message: "m.key.verification.mac", .. })));
    assert!(net.done(Side::A).is_none() && net.done(Side::B).is_none());
    assert_eq!(net.cancels_sent().len(), 1);
}

#[test]
fn done_before_mac_is_unexpected() {
    let mut net = pair();
    let (fa, fb) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    net.lb.b.receive(to_device(ALICE, "m.key.verification.done", json!({"transaction_id": fb.flow_id()})), net.lb.now);
    net.run();
    assert_eq!(net.cancelled(Side::B).unwrap().code, CancelCode::UnexpectedMessage);
    assert!(net.done(Side::B).is_none());
}

#[test]
fn colliding_starts_with_different_methods() {
    let mut net = pair();
    let (fa, fb) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.collect();
    net.lb.queue.clear();
    net.lb.b.receive(
        to_device(ALICE, "m.key.verification.start", json!({"transaction_id": fb.flow_id(), "from_device": "A1", "method": "m.reciprocate.v1", "secret": "MTIzNDU2Nzg"})),
        net.lb.now,
    );
    net.lb.b.start_sas(&fb, net.lb.now).unwrap_err();
    // B already started SAS itself, then sees a reciprocate start from A: ST-04.
    let mut net = pair();
    let (fa, fb) = net.request_and_accept(false);
    net.lb.b.start_sas(&fb, net.lb.now).unwrap();
    net.collect();
    net.lb.queue.clear();
    net.lb.b.receive(
        to_device(ALICE, "m.key.verification.start", json!({"transaction_id": fa.flow_id(), "from_device": "A1", "method": "m.reciprocate.v1", "secret": "MTIzNDU2Nzg"})),
        net.lb.now,
    );
    net.collect();
    let info = net.cancelled(Side::B).unwrap();
    assert_eq!(info.code, CancelCode::UnexpectedMessage);
    assert_eq!(info.cause, Some(LocalCause::StartCollision));
}

#[test]
fn keys_changed_during_the_flow() {
    let mut net = pair();
    let (fa, fb) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    // Bob's device key changes in A's view after the start pinned it (TR-01).
    let mut changed = keys_of(&[&net.db.clone()]);
    changed.devices.insert("B1".into(), fake_key("rotated"));
    net.lb.a.update_user_keys(BOB, changed, net.lb.now);
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.lb.b.confirm(&fb, net.lb.now).unwrap();
    net.run();
    assert_eq!(assert_cancelled(&net, Side::A, "m.key_mismatch").cause, Some(LocalCause::KeysChanged));
}

#[test]
fn device_id_equal_to_a_cross_signing_key_is_refused() {
    let mut net = pair();
    let mut keys = keys_of(&[&net.db.clone()]);
    let msk = keys.master_key.clone().unwrap().to_string();
    keys.devices.insert(msk.clone(), fake_key("evil"));
    net.lb.a.update_user_keys(BOB, keys, net.lb.now);
    let (fa, _) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    let info = assert_cancelled(&net, Side::A, "m.key_mismatch");
    assert_eq!(info.cause, Some(LocalCause::DeviceIdClashesWithCrossSigningKey(msk)));
}

#[test]
fn flow_timeout_sends_one_m_timeout() {
    let mut net = pair();
    let fa = net.lb.a.request_to_device(BOB, &["B1".into()], T0).unwrap();
    net.collect();
    net.lb.now += 1000; // B gets the request a second later, so A's deadline comes first
    net.run();
    let fb = net.flow_of(Side::B);
    net.lb.b.accept(&fb, net.lb.now).unwrap();
    net.run();
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    net.lb.now = T0;
    let deadline = net.lb.a.next_deadline().unwrap();
    assert_eq!(deadline, T0 + 10 * 60_000, "the deadline is exact and known in advance");
    net.advance(10 * 60_000 - 1);
    assert!(net.cancelled(Side::A).is_none());
    net.advance(1);
    net.run();
    net.advance(60_000);
    net.run();
    let info = assert_cancelled(&net, Side::A, "m.timeout");
    assert!(matches!(info.cause, Some(LocalCause::TimedOut(_))));
}

#[test]
fn unanswered_prompt_closes_silently_after_two_minutes() {
    let mut net = pair();
    let now = net.lb.now;
    net.lb.a.request_to_device(BOB, &["B1".into()], now).unwrap();
    net.run();
    let fb = net.flow_of(Side::B);
    assert_eq!(net.lb.b.flow(&fb).unwrap().deadline, Some(now + 2 * 60_000));
    net.advance(2 * 60_000);
    let info = net.cancelled(Side::B).expect("prompt dismissed");
    assert_eq!(info.code, CancelCode::Timeout);
    assert!(!info.sent && info.by_us);
    assert!(net.cancels_sent().is_empty(), "a dismissed prompt sends nothing (RQ-04/RQ-06)");
    assert!(net.lb.b.accept(&fb, net.lb.now).is_err());
    // The requester gives up at its own deadline; the prompt's tombstone ignores that cancel.
    net.advance(8 * 60_000);
    net.run();
    assert_eq!(net.cancels_sent(), vec![(Side::A, "m.timeout".into())]);
}

#[test]
fn prompt_deadline_is_earlier_of_timestamp_and_receipt() {
    let mut net = pair();
    let now = net.lb.now;
    net.lb.a.request_to_device(BOB, &["B1".into()], now).unwrap();
    net.collect();
    net.lb.now += 9 * 60_000; // delivered nine minutes late: one minute of the ten left
    net.deliver(0);
    net.collect();
    let fb = net.flow_of(Side::B);
    assert_eq!(net.lb.b.flow(&fb).unwrap().deadline, Some(now + 10 * 60_000));
}

#[test]
fn request_time_window() {
    for (offset, accepted) in
        [(-10 * 60_000i64, true), (-10 * 60_000 - 1, false), (5 * 60_000, true), (5 * 60_000 + 1, false)]
    {
        let mut net = pair();
        let ts = (T0 as i64 + offset) as u64;
        net.lb.b.receive(
            to_device(
                ALICE,
                "m.key.verification.request",
                json!({"from_device": "A1", "methods": ["m.sas.v1"], "timestamp": ts, "transaction_id": "t1"}),
            ),
            T0,
        );
        net.collect();
        let prompted = net.events(Side::B).into_iter().any(|e| matches!(e, Event::IncomingRequest { .. }));
        assert_eq!(prompted, accepted, "offset {offset}");
        assert!(net.cancels_sent().is_empty(), "ignored requests get no reply");
    }
}

#[test]
fn cancel_is_never_answered() {
    let mut net = pair();
    // A cancel for an unknown flow, and one for a known flow, and a second one after that.
    let ev = |txn: &str| {
        to_device(ALICE, "m.key.verification.cancel", json!({"transaction_id": txn, "code": "m.user", "reason": "no"}))
    };
    net.lb.b.receive(ev("unknown"), T0);
    let (_, fb) = net.request_and_accept(false);
    net.lb.b.receive(ev(fb.flow_id()), T0);
    net.lb.b.receive(ev(fb.flow_id()), T0);
    net.run();
    assert!(net.cancels_sent().is_empty(), "{:?}", net.cancels_sent());
    let info = net.cancelled(Side::B).unwrap();
    assert!(!info.by_us && info.code == CancelCode::User);
}

#[test]
fn malformed_cancel_still_ends_the_flow() {
    let mut net = pair();
    let (_, fb) = net.request_and_accept(false);
    net.lb
        .b
        .receive(to_device(ALICE, "m.key.verification.cancel", json!({"transaction_id": fb.flow_id(), "code": 7})), T0);
    net.run();
    assert!(net.cancels_sent().is_empty());
    assert!(net.cancelled(Side::B).is_some());
}

#[test]
fn error_loop_rule_nothing_after_the_end() {
    // B cancels with m.invalid_message; A, not knowing, sends something unexpected: no reply.
    let mut net = pair();
    tamper(&mut net, "m.key.verification.key", |w| {
        if w.from == Side::A {
            set(w, "key", json!(12));
        }
    });
    sas_flow(&mut net, false);
    net.lb.filter = None;
    let fb = net.flow_of(Side::B);
    for ty in
        ["m.key.verification.key", "m.key.verification.mac", "m.key.verification.done", "m.key.verification.start"]
    {
        net.lb.b.receive(to_device(ALICE, ty, json!({"transaction_id": fb.flow_id()})), T0);
    }
    net.run();
    assert_eq!(net.cancels_sent(), vec![(Side::B, "m.invalid_message".into())]);
}

#[test]
fn unknown_transaction_answered_once() {
    let mut net = pair();
    for _ in 0..3 {
        net.lb.b.receive(
            to_device(ALICE, "m.key.verification.key", json!({"transaction_id": "ghost", "key": OTHER_HASH})),
            T0,
        );
    }
    // Unknown starts are legacy flows, not unknown transactions; unknown cancels are never answered.
    net.collect();
    let sent: Vec<_> =
        net.log.iter().map(|w| (w.from, w.out.content.to_value()["code"].clone(), w.out.destination.clone())).collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].1, json!("m.unknown_transaction"));
    assert_eq!(sent[0].2, Destination::ToDevice { user_id: ALICE.into(), device_ids: vec!["*".into()] });
}

#[test]
fn accepted_elsewhere_is_told_to_the_other_devices() {
    let mut net = pair();
    let now = net.lb.now;
    let fa = net.a.request_to_device(BOB, &["B1".into(), "B2".into(), "B3".into()], now).unwrap();
    net.run();
    let fb = net.flow_of(Side::B);
    net.lb.b.accept(&fb, now).unwrap();
    net.run();
    let accepted: Vec<_> = net
        .log
        .iter()
        .filter(|w| w.out.event_type == "m.key.verification.cancel")
        .map(|w| (w.out.content.to_value()["code"].clone(), w.out.destination.clone()))
        .collect();
    assert_eq!(
        accepted,
        vec![(
            json!("m.accepted"),
            Destination::ToDevice { user_id: BOB.into(), device_ids: vec!["B2".into(), "B3".into()] }
        )]
    );
    assert!(net.lb.a.flow(&fa).unwrap().cancel.is_none(), "the flow itself goes on with B1");
    // From now on only B1 is addressed.
    net.lb.a.start_sas(&fa, now).unwrap();
    net.collect();
    assert!(
        matches!(&net.lb.queue.last().unwrap().out.destination, Destination::ToDevice { device_ids, .. } if device_ids == &vec!["B1".to_string()])
    );
}

#[test]
fn rejection_by_one_device_is_told_to_all() {
    let mut net = pair();
    let now = net.lb.now;
    net.lb.a.request_to_device(BOB, &["B1".into(), "B2".into()], now).unwrap();
    net.run();
    let fb = net.flow_of(Side::B);
    net.lb.b.cancel(&fb, now).unwrap();
    net.run();
    let sent: Vec<_> = net
        .log
        .iter()
        .filter(|w| w.out.event_type == "m.key.verification.cancel")
        .map(|w| (w.from, w.out.content.to_value()["code"].clone()))
        .collect();
    assert_eq!(sent, vec![(Side::B, json!("m.user")), (Side::A, json!("m.user"))]);
    assert!(!net.cancelled(Side::A).unwrap().by_us);
}

#[test]
fn second_attempt_by_the_same_device_cancels_both() {
    let mut net = pair();
    let req = |txn: &str| {
        to_device(
            ALICE,
            "m.key.verification.request",
            json!({"from_device": "A1", "methods": ["m.sas.v1"], "timestamp": T0, "transaction_id": txn}),
        )
    };
    net.lb.b.receive(req("first"), T0);
    net.lb.b.receive(req("second"), T0);
    net.collect();
    let codes: Vec<_> = net
        .log
        .iter()
        .map(|w| (w.out.content.to_value()["transaction_id"].clone(), w.out.content.to_value()["code"].clone()))
        .collect();
    assert_eq!(
        codes,
        vec![(json!("first"), json!("m.unexpected_message")), (json!("second"), json!("m.unexpected_message"))]
    );
    // A request from another device of the same user is a separate flow and cancels nothing.
    let mut net = pair();
    net.lb.b.receive(req("first"), T0);
    let mut other = req("other");
    other.content["from_device"] = json!("A2");
    net.lb.b.receive(other, T0);
    net.collect();
    assert!(net.lb.log.is_empty());
}

#[test]
fn bystanders_and_foreign_requests_in_rooms_are_ignored() {
    let mut net = pair();
    let (fa, fb) = net.request_and_accept(true);
    // Carol, also in the room, injects events into the flow.
    for ty in ["m.key.verification.start", "m.key.verification.cancel", "m.key.verification.mac"] {
        let ev = IncomingEvent {
            sender: "@carol:example.org".into(),
            event_type: ty.into(),
            content: json!({"m.relates_to": {"rel_type": "m.reference", "event_id": fa.flow_id()}, "from_device": "C1", "method": "m.sas.v1"}),
            room: Some(RoomContext {
                room_id: ROOM.into(),
                event_id: "$carol".into(),
                origin_server_ts: T0,
                relates_to_fallback: None,
            }),
        };
        net.lb.a.receive(ev.clone(), T0);
        net.lb.b.receive(ev, T0);
    }
    // A request for Carol is not B's business.
    net.lb.b.receive(
        IncomingEvent {
            sender: ALICE.into(),
            event_type: "m.room.message".into(),
            content: json!({"msgtype": "m.key.verification.request", "to": "@carol:example.org", "from_device": "A1", "methods": ["m.sas.v1"]}),
            room: Some(RoomContext { room_id: ROOM.into(), event_id: "$forcarol".into(), origin_server_ts: T0, relates_to_fallback: None }),
        },
        T0,
    );
    net.run();
    assert!(net.cancels_sent().is_empty());
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.lb.b.confirm(&fb, net.lb.now).unwrap();
    net.run();
    assert!(net.done(Side::A).is_some() && net.done(Side::B).is_some());
}

#[test]
fn own_other_device_answering_in_room_dismisses_the_prompt() {
    let mut net = pair();
    net.lb.a.request_in_room(ROOM, BOB, net.lb.now);
    net.run();
    let fb = net.flow_of(Side::B);
    // Bob's other device B2 answers first.
    net.lb.b.receive(
        IncomingEvent {
            sender: BOB.into(),
            event_type: "m.key.verification.ready".into(),
            content: json!({"m.relates_to": {"rel_type": "m.reference", "event_id": fb.flow_id()}, "from_device": "B2", "methods": ["m.sas.v1"]}),
            room: Some(RoomContext { room_id: ROOM.into(), event_id: "$b2ready".into(), origin_server_ts: T0, relates_to_fallback: None }),
        },
        T0,
    );
    net.collect();
    let info = net.cancelled(Side::B).unwrap();
    assert_eq!(info.cause, Some(LocalCause::AnsweredByOwnDevice));
    assert!(!info.sent);
    assert!(net.cancels_sent().is_empty(), "no m.accepted in rooms (RQ-11)");
}

#[test]
fn start_from_another_device_is_not_adopted() {
    let mut net = pair();
    let (fa, fb) = net.request_and_accept(false);
    net.lb.b.receive(
        IncomingEvent {
            sender: ALICE.into(),
            event_type: "m.key.verification.start".into(),
            content: json!({"transaction_id": fb.flow_id(), "from_device": "A9", "method": "m.sas.v1",
                "key_agreement_protocols": ["curve25519-hkdf-sha256"], "hashes": ["sha256"],
                "message_authentication_codes": ["hkdf-hmac-sha256.v2"], "short_authentication_string": ["decimal"]}),
            room: None,
        },
        T0,
    );
    net.run();
    assert!(net.cancels_sent().is_empty());
    assert!(
        net.events(Side::B).into_iter().any(|e| matches!(e, Event::Dropped { reason: DropReason::OtherDevice, .. }))
    );
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    assert!(net.sas(Side::B).is_some());
}

#[test]
fn duplicates_are_ignored_not_cancelled() {
    // element-web#12849: duplicate key events must not kill the flow.
    let mut net = pair();
    net.lb.filter = None;
    let (fa, fb) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.collect();
    while !net.lb.queue.is_empty() {
        let w = net.lb.queue[0].clone();
        net.deliver(0);
        net.lb.queue.insert(0, w); // deliver everything twice
        net.deliver(0);
        net.collect();
    }
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.lb.b.confirm(&fb, net.lb.now).unwrap();
    net.collect();
    while !net.lb.queue.is_empty() {
        let w = net.lb.queue[0].clone();
        net.deliver(0);
        net.lb.queue.insert(0, w);
        net.deliver(0);
        net.collect();
    }
    assert!(net.cancels_sent().is_empty(), "{:?}", net.cancels_sent());
    assert!(net.done(Side::A).is_some() && net.done(Side::B).is_some());
}

#[test]
fn custom_cancel_codes_are_reported_verbatim() {
    let mut net = pair();
    let (_, fb) = net.request_and_accept(false);
    net.lb.b.receive(
        to_device(
            ALICE,
            "m.key.verification.cancel",
            json!({"transaction_id": fb.flow_id(), "code": "org.example.busy", "reason": "Busy right now"}),
        ),
        T0,
    );
    net.collect();
    let info = net.cancelled(Side::B).unwrap();
    assert_eq!(info.code, CancelCode::Custom("org.example.busy".into()));
    assert!(info.explain().contains("Busy right now"), "{}", info.explain());
}

#[test]
fn abandoning_a_lost_flow_tells_the_other_side_once() {
    // After a restart the machine no longer knows the flow: it sends one m.user cancel.
    let mut net = pair();
    let key = FlowKey::ToDevice { user_id: BOB.into(), transaction_id: "lost".into() };
    net.lb.a.abandon(key.clone(), BOB, Some("B1".into()), T0);
    net.lb.a.abandon(key.clone(), BOB, Some("B1".into()), T0);
    net.collect();
    let info = net.cancelled(Side::A).unwrap();
    assert_eq!((info.code, info.cause, info.sent), (CancelCode::User, Some(LocalCause::Abandoned), true));
    let sent: Vec<_> =
        net.lb.log.iter().map(|w| (w.out.content.to_value()["code"].clone(), w.out.destination.clone())).collect();
    assert_eq!(
        sent,
        vec![(json!("m.user"), Destination::ToDevice { user_id: BOB.into(), device_ids: vec!["B1".into()] })]
    );
    // A flow the machine still runs is simply cancelled; an ended one is left alone.
    let mut net = pair();
    let (fa, _) = net.request_and_accept(false);
    net.lb.a.abandon(fa.clone(), BOB, Some("B1".into()), T0);
    net.lb.a.abandon(fa, BOB, Some("B1".into()), T0);
    net.run();
    assert_eq!(net.cancels_sent(), vec![(Side::A, "m.user".into())]);
    assert_eq!(net.cancelled(Side::B).unwrap().code, CancelCode::User);
}

#[test]
fn a_request_accepted_by_another_of_our_devices_closes_quietly() {
    // Bob's B2 answered Alice's request to all of Bob's devices; B1 (side B here) gets m.accepted.
    let mut net = pair();
    net.lb.a.request_to_device(BOB, &["B1".into(), "B2".into()], T0).unwrap();
    net.run();
    let fb = net.flow_of(Side::B);
    net.lb.b.receive(
        to_device(
            ALICE,
            "m.key.verification.cancel",
            json!({"transaction_id": fb.flow_id(), "code": "m.accepted", "reason": "Accepted elsewhere"}),
        ),
        T0,
    );
    net.collect();
    let info = net.cancelled(Side::B).unwrap();
    assert_eq!((info.code.clone(), info.by_us), (CancelCode::Accepted, false));
    assert!(info.explain().contains("Another of your devices answered"), "{}", info.explain());
    assert!(net.cancels_sent().is_empty(), "nothing answered");
    assert!(net.lb.b.accept(&fb, T0).is_err(), "the prompt is gone");
}

// ----- hardening -------------------------------------------------------------------------------

fn room_event(sender: &str, ty: &str, flow_id: &str, event_id: &str, body: serde_json::Value) -> IncomingEvent {
    let mut content = body;
    content["m.relates_to"] = json!({"rel_type": "m.reference", "event_id": flow_id});
    IncomingEvent {
        sender: sender.into(),
        event_type: ty.into(),
        content,
        room: Some(RoomContext {
            room_id: ROOM.into(),
            event_id: event_id.into(),
            origin_server_ts: T0,
            relates_to_fallback: None,
        }),
    }
}

#[test]
fn own_other_device_that_answered_first_in_room_makes_us_stand_down() {
    // RQ-11: B1 accepted too, but B2's ready comes first in the room: B1 stands down silently.
    let mut net = pair();
    net.lb.a.request_in_room(ROOM, BOB, net.lb.now);
    net.run();
    let fb = net.flow_of(Side::B);
    net.lb.b.accept(&fb, net.lb.now).unwrap();
    net.collect(); // B1's ready is on its way, not yet in the timeline
    let ready = json!({"from_device": "B2", "methods": ["m.sas.v1"]});
    net.lb.b.receive(room_event(BOB, "m.key.verification.ready", fb.flow_id(), "$b2ready", ready), T0);
    net.collect();
    let info = net.cancelled(Side::B).expect("B1 stands down");
    assert_eq!(info.cause, Some(LocalCause::AnsweredByOwnDevice));
    assert!(!info.sent);
    net.run();
    assert!(net.cancels_sent().is_empty(), "standing down sends nothing: {:?}", net.cancels_sent());
    assert!(net.lb.b.start_sas(&fb, net.lb.now).is_err());
}

#[test]
fn own_other_device_answering_after_us_in_room_is_ignored() {
    // B1's ready is first in the timeline: B2's later ready does not concern B1.
    let mut net = pair();
    let (fa, fb) = net.request_and_accept(true);
    let ready = json!({"from_device": "B2", "methods": ["m.sas.v1"]});
    net.lb.b.receive(room_event(BOB, "m.key.verification.ready", fb.flow_id(), "$b2ready", ready), T0);
    net.collect();
    assert!(net.cancelled(Side::B).is_none());
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.lb.b.confirm(&fb, net.lb.now).unwrap();
    net.run();
    assert!(net.done(Side::A).is_some() && net.done(Side::B).is_some());
}

#[test]
fn starts_for_unknown_to_device_flows_never_get_unknown_transaction() {
    // CX-04 exempts every start: a reciprocation (or a malformed start) for an unknown flow gets no answer.
    let mut net = pair();
    let starts = [
        json!({"transaction_id": "ghost1", "from_device": "A1", "method": "m.reciprocate.v1", "secret": "MTIzNDU2Nzg"}),
        json!({"transaction_id": "ghost2", "from_device": "A1", "method": "m.reciprocate.v1"}),
        json!({"transaction_id": "ghost3", "from_device": "A1"}),
    ];
    for s in starts {
        net.lb.b.receive(to_device(ALICE, "m.key.verification.start", s), T0);
    }
    net.collect();
    assert!(net.lb.log.is_empty(), "{:?}", net.lb.log);
    // Other unknown messages still get their one m.unknown_transaction.
    net.lb.b.receive(to_device(ALICE, "m.key.verification.done", json!({"transaction_id": "ghost4"})), T0);
    net.collect();
    assert_eq!(net.lb.log.len(), 1);
}

#[test]
fn late_inputs_find_their_flows_timed_out() {
    // No handle_timeout in between: each input first ends what is due at its `now`.
    let mut net = pair();
    let (fa, fb) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    let late = net.lb.now + 10 * 60_000 + 1;
    assert!(matches!(net.lb.a.confirm(&fa, late), Err(ActionError::WrongState { .. })), "a late confirm is refused");
    let info = net.lb.a.flow(&fa).unwrap().cancel.expect("the flow timed out");
    assert_eq!(info.code, CancelCode::Timeout);
    // A late message: B's flow times out first, and the message is for an ended flow.
    net.lb.b.receive(to_device(ALICE, "m.key.verification.done", json!({"transaction_id": fb.flow_id()})), late);
    net.collect();
    assert_eq!(net.cancelled(Side::B).unwrap().code, CancelCode::Timeout);
    assert!(net.events(Side::B).iter().any(|e| matches!(e, Event::Dropped { reason: DropReason::FlowEnded, .. })));
    assert_eq!(net.cancels_sent(), vec![(Side::A, "m.timeout".into()), (Side::B, "m.timeout".into())]);
    // A late accept of a prompt that closed is refused; so is a late key update's held event.
    let mut net = pair();
    net.lb.a.request_to_device(BOB, &["B1".into()], T0).unwrap();
    net.run();
    let fb = net.flow_of(Side::B);
    assert!(net.lb.b.accept(&fb, T0 + 2 * 60_000).is_err(), "the prompt closed at its deadline");
    assert!(net.cancels_sent().is_empty());
}

/// A start with no canonical JSON form (a float) cannot be committed to (CM-01): the accepter
/// cancels with `m.invalid_message`, in both transports.
#[test]
fn start_without_canonical_form() {
    for in_room in [false, true] {
        let mut net = pair();
        tamper(&mut net, "m.key.verification.start", |w| set(w, "org.example.weight", json!(1.5)));
        sas_flow(&mut net, in_room);
        let info = assert_cancelled(&net, Side::B, "m.invalid_message");
        assert!(matches!(info.cause, Some(LocalCause::Malformed(_))), "{info:?}");
    }
}

/// A legacy start with no canonical form waits for the user like any other; its exact repeat is
/// dropped as a duplicate, and the user's accept ends the flow with `m.invalid_message`.
#[test]
fn legacy_start_without_canonical_form() {
    let mut net = pair();
    let mut start = legacy_start(ALICE, "A1", "legacy-float");
    start.content["org.example.weight"] = json!(1.5);
    net.lb.b.receive(start.clone(), T0);
    net.lb.b.receive(start, T0);
    net.collect();
    assert!(net.cancels_sent().is_empty(), "the repeat is a duplicate, not a second start");
    let fb = net.flow_of(Side::B);
    net.lb.b.accept(&fb, T0).unwrap();
    net.collect();
    assert_eq!(net.cancels_sent(), vec![(Side::B, "m.invalid_message".to_owned())]);
    let info = net.cancelled(Side::B).unwrap();
    assert!(matches!(info.cause, Some(LocalCause::Malformed(_))), "{info:?}");
}

fn legacy_start(sender: &str, device: &str, txn: &str) -> IncomingEvent {
    to_device(
        sender,
        "m.key.verification.start",
        json!({"transaction_id": txn, "from_device": device, "method": "m.sas.v1",
            "key_agreement_protocols": ["curve25519-hkdf-sha256"], "hashes": ["sha256"],
            "message_authentication_codes": ["hkdf-hmac-sha256.v2"], "short_authentication_string": ["decimal"]}),
    )
}

#[test]
fn a_flood_from_one_sender_cannot_evict_anothers_held_events() {
    let mut net = pair();
    // B knows nobody's keys: every start is held until they come.
    net.lb.b = Machine::new(net.db.identity(), Config::default(), Box::new(SeededEntropy::new(9)));
    let fa = net.lb.a.start_sas_without_request(BOB, "B1", T0).unwrap();
    net.run();
    for i in 0..200 {
        net.lb.b.receive(legacy_start("@eve:example.org", &format!("E{i}"), &format!("eve{i}")), T0);
    }
    net.collect();
    assert!(net.lb.flow_of(Side::B).is_none(), "everything is held");
    let keys = keys_of(&[&net.da.clone()]);
    net.lb.b.update_user_keys(ALICE, keys, T0);
    net.run();
    let fb = net.flow_of(Side::B);
    assert_eq!(fb.flow_id(), fa.flow_id(), "Alice's held start survived Eve's flood");
    net.lb.b.accept(&fb, T0).unwrap();
    net.run();
    net.lb.a.confirm(&fa, T0).unwrap();
    net.lb.b.confirm(&fb, T0).unwrap();
    net.run();
    assert!(net.done(Side::A).is_some() && net.done(Side::B).is_some());
    // Eve's flood was cut at her quota, reported.
    let dropped = net
        .events(Side::B)
        .iter()
        .filter(|e| matches!(e, Event::Dropped { sender, .. } if sender == "@eve:example.org"))
        .count();
    assert!(dropped > 0);
}

#[test]
fn device_key_changed_after_our_done_ends_the_flow_without_a_cancel() {
    let mut net = pair();
    let (fa, fb) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.run(); // A's MAC reaches B
    net.lb.b.confirm(&fb, net.lb.now).unwrap();
    net.collect(); // B's MAC and done are queued
    let mac = net.lb.queue.iter().position(|w| w.out.event_type == "m.key.verification.mac").unwrap();
    net.deliver(mac); // A verifies B's MAC and sends its done
    assert!(net.sent_types(Side::A).contains(&"m.key.verification.done"));
    // Bob's device key changes in A's view before B's done arrives (TR-01).
    let mut changed = keys_of(&[&net.db.clone()]);
    changed.devices.insert("B1".into(), fake_key("rotated"));
    net.lb.a.update_user_keys(BOB, changed, net.lb.now);
    net.run();
    let info = net.cancelled(Side::A).expect("A's flow fails");
    assert!(info.by_us && !info.sent, "{info:?}");
    assert_eq!((info.code, info.cause), (CancelCode::KeyMismatch, Some(LocalCause::KeysChangedAfterDone)));
    assert!(net.done(Side::A).is_none(), "nothing verified");
    assert!(net.cancels_sent().is_empty(), "our done went out: no cancel after it");
}

#[test]
fn a_replaced_master_key_is_reported_and_fails_the_flows_with_that_user() {
    let mut net = pair();
    let identity_changes = |net: &Net| {
        net.events(Side::A)
            .into_iter()
            .filter(|e| matches!(e, Event::IdentityChanged { .. }))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(identity_changes(&net).is_empty(), "first keys for a user are no change");
    let (fa, _) = net.request_and_accept(false);
    let carol = net.lb.a.request_to_device("@carol:example.org", &["C1".into()], T0).unwrap();
    net.lb.queue.clear();
    net.lb.a.start_sas(&fa, T0).unwrap();
    net.run();
    let same = keys_of(&[&net.db.clone()]);
    net.lb.a.update_user_keys(BOB, same.clone(), T0);
    net.collect();
    assert!(identity_changes(&net).is_empty(), "the same master key again is no change");
    // Bob's master key is replaced (TR-06): reported, and the flow with Bob fails (TR-01).
    let old = net.db.msk.clone().unwrap();
    let new = fake_key("bob's new identity");
    let mut replaced = same.clone();
    replaced.master_key = Some(new.clone());
    net.lb.a.update_user_keys(BOB, replaced.clone(), T0);
    net.run();
    let changes = identity_changes(&net);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(matches!(&changes[0], Event::IdentityChanged { user_id, old_master_key, new_master_key }
        if user_id == BOB && *old_master_key == old && *new_master_key == Some(new.clone())));
    let info = assert_cancelled(&net, Side::A, "m.key_mismatch");
    assert_eq!(info.cause, Some(LocalCause::KeysChanged));
    assert!(net.lb.a.flow(&carol).unwrap().cancel.is_none(), "a flow with another user goes on");
    // Removing the master key is a change too.
    replaced.master_key = None;
    net.lb.a.update_user_keys(BOB, replaced, T0);
    net.collect();
    let changes = identity_changes(&net);
    assert!(matches!(changes.last(), Some(Event::IdentityChanged { new_master_key: None, .. })), "{changes:?}");
}

#[test]
fn a_flow_whose_done_we_sent_is_never_cancelled_by_us() {
    let mut net = pair();
    let (fa, fb) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.run();
    net.lb.b.confirm(&fb, net.lb.now).unwrap();
    net.collect();
    let mac = net.lb.queue.iter().position(|w| w.out.event_type == "m.key.verification.mac").unwrap();
    net.deliver(mac);
    net.lb.queue.clear(); // B's done never arrives
    assert!(net.events(Side::A).iter().any(|e| matches!(e, Event::DoneSent { .. })));
    assert!(matches!(net.lb.a.cancel(&fa, net.lb.now), Err(ActionError::WrongState { .. })));
    net.lb.a.abandon(fa.clone(), BOB, Some("B1".into()), net.lb.now);
    net.advance(10 * 60_000);
    let info = net.cancelled(Side::A).expect("the flow ends at its deadline");
    assert_eq!((info.code, info.sent), (CancelCode::Timeout, false));
    assert!(net.done(Side::A).is_none());
    assert!(!net.sent_types(Side::A).contains(&"m.key.verification.cancel"), "no cancel after our done");
}

#[test]
fn qr_keys_changed_after_the_displayers_done_end_the_flow_without_a_cancel() {
    use mxverify_proto::wire::Method;
    let config = || Config {
        methods: vec![Method::SasV1, Method::QrShowV1, Method::QrScanV1, Method::ReciprocateV1],
        ..Config::default()
    };
    // A self-verification: A1 (displayer, mode 0x01) trusts A2's device key once A2 scanned.
    let mut net = Net::with_config(Dev::new(ALICE, "A1"), Dev::new(ALICE, "A2"), config(), config());
    let (fa, fb) = net.request_and_accept(false);
    let code = net
        .events(Side::A)
        .into_iter()
        .find_map(|e| match e {
            Event::QrCode { payload, .. } => Some(payload.clone()),
            _ => None,
        })
        .unwrap();
    net.lb.b.scan_qr(&fb, &code, net.lb.now).unwrap();
    net.run();
    net.lb.a.confirm(&fa, net.lb.now).unwrap(); // A1's done goes out
    net.collect();
    let done = net.lb.queue.iter().position(|w| w.from == Side::A && w.out.event_type == "m.key.verification.done");
    net.deliver(done.unwrap()); // A2 answers with its done
    // A2's device key changes in A1's view before A2's done arrives.
    let mut keys = keys_of(&[&net.da.clone(), &net.db.clone()]);
    keys.devices.insert("A2".into(), fake_key("rotated"));
    net.lb.a.update_user_keys(ALICE, keys, net.lb.now);
    net.run();
    let info = net.cancelled(Side::A).expect("A1's flow fails");
    assert_eq!(
        (info.code, info.sent, info.cause),
        (CancelCode::KeyMismatch, false, Some(LocalCause::KeysChangedAfterDone))
    );
    assert!(net.done(Side::A).is_none());
    assert!(net.cancels_sent().is_empty());
}
