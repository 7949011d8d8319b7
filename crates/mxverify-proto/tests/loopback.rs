//! Complete flows between two machines, for each role, transport and start combination.

mod support;

use mxverify_proto::*;
use support::net::*;

fn assert_verified_both(net: &Net) {
    let (sa, sb) = (net.sas(Side::A).expect("A shows SAS"), net.sas(Side::B).expect("B shows SAS"));
    assert_eq!(sa, sb, "both sides must show the same emoji and decimals");
    let ka = net.done(Side::A).expect("A verified");
    let kb = net.done(Side::B).expect("B verified");
    // Each side verified exactly the other's device key and master key.
    let ids = |keys: &[VerifiedKey]| keys.iter().map(|k| (k.key_id.clone(), k.key.clone())).collect::<Vec<_>>();
    let mut want_a = vec![(format!("ed25519:{}", net.db.device), net.db.ed25519.clone())];
    let mut want_b = vec![(format!("ed25519:{}", net.da.device), net.da.ed25519.clone())];
    want_a.push((format!("ed25519:{}", net.db.msk.clone().unwrap()), net.db.msk.clone().unwrap()));
    want_b.push((format!("ed25519:{}", net.da.msk.clone().unwrap()), net.da.msk.clone().unwrap()));
    want_a.sort();
    want_b.sort();
    let (mut ga, mut gb) = (ids(&ka), ids(&kb));
    ga.sort();
    gb.sort();
    assert_eq!(ga, want_a);
    assert_eq!(gb, want_b);
    assert!(net.cancels_sent().is_empty(), "no cancel in a good flow: {:?}", net.cancels_sent());
}

/// Both users say the emoji match; both sides must then verify exactly the other's keys.
fn confirm_both(net: &mut Net, fa: &FlowKey, fb: &FlowKey) {
    let now = net.lb.now;
    net.lb.a.confirm(fa, now).unwrap();
    net.lb.b.confirm(fb, now).unwrap();
    net.run();
    assert_verified_both(net);
}

fn full_flow(in_room: bool, same_user: bool, requester_starts: bool) -> Net {
    let db = if same_user { Dev::new(ALICE, "ALICE2") } else { Dev::new(BOB, "BOBDEVICE") };
    let mut net = Net::new(Dev::new(ALICE, "ALICE1"), db);
    let (fa, fb) = net.request_and_accept(in_room);
    let now = net.lb.now;
    if requester_starts {
        net.lb.a.start_sas(&fa, now).unwrap();
    } else {
        net.lb.b.start_sas(&fb, now).unwrap();
    }
    net.run();
    confirm_both(&mut net, &fa, &fb);
    net
}

#[test]
fn to_device_other_user_requester_starts() {
    full_flow(false, false, true);
}

#[test]
fn to_device_other_user_responder_starts() {
    full_flow(false, false, false);
}

#[test]
fn to_device_self_verification_both_starters() {
    full_flow(false, true, true);
    full_flow(false, true, false);
}

#[test]
fn in_room_requester_starts() {
    let net = full_flow(true, false, true);
    // In-room messages carry the relation and no transaction id.
    for w in &net.lb.log {
        if w.out.event_type != "m.room.message" {
            assert!(w.out.content.to_value().get("m.relates_to").is_some(), "{:?}", w.out);
            assert!(w.out.content.to_value().get("transaction_id").is_none());
        }
    }
}

#[test]
fn in_room_responder_starts() {
    full_flow(true, false, false);
}

#[test]
fn message_order_follows_the_spec() {
    let net = full_flow(false, false, true);
    assert_eq!(
        net.sent_types(Side::A),
        [
            "m.key.verification.request",
            "m.key.verification.start",
            "m.key.verification.key",
            "m.key.verification.mac",
            "m.key.verification.done"
        ]
    );
    assert_eq!(
        net.sent_types(Side::B),
        [
            "m.key.verification.ready",
            "m.key.verification.accept",
            "m.key.verification.key",
            "m.key.verification.mac",
            "m.key.verification.done"
        ]
    );
}

#[test]
fn accepter_sends_its_key_only_after_the_starters() {
    // SQ-04: hold back A's key and check B has not sent its own.
    let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let (fa, _) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.collect();
    net.deliver(0); // start → B, which answers with accept
    net.collect();
    let accept = net.queue.iter().position(|w| w.out.event_type == "m.key.verification.accept").unwrap();
    net.deliver(accept);
    net.collect();
    // Now A's key is queued; B has sent no key yet.
    assert!(net.lb.log.iter().all(|w| !(w.from == Side::B && w.out.event_type == "m.key.verification.key")));
    net.run();
    assert!(net.lb.log.iter().any(|w| w.from == Side::B && w.out.event_type == "m.key.verification.key"));
}

#[test]
fn legacy_start_without_request() {
    let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let now = net.lb.now;
    let fa = net.lb.a.start_sas_without_request(BOB, "B1", now).unwrap();
    net.run();
    let fb = net.flow_of(Side::B);
    assert!(net.events(Side::B).into_iter().any(|e| matches!(e, Event::IncomingRequest { legacy: true, .. })));
    net.lb.b.accept(&fb, now).unwrap();
    net.run();
    confirm_both(&mut net, &fa, &fb);
}

#[test]
fn simultaneous_starts_smaller_user_wins() {
    for (a_user, b_user) in [(ALICE, BOB), (BOB, ALICE)] {
        let mut net = Net::new(Dev::new(a_user, "DEV1"), Dev::new(b_user, "DEV2"));
        let (fa, fb) = net.request_and_accept(false);
        let now = net.lb.now;
        net.lb.a.start_sas(&fa, now).unwrap();
        net.lb.b.start_sas(&fb, now).unwrap();
        net.run();
        let (ma, mb) = (net.lb.a.flow(&fa).unwrap(), net.lb.b.flow(&fb).unwrap());
        assert!(ma.cancel.is_none() && mb.cancel.is_none(), "{ma:?} {mb:?}");
        confirm_both(&mut net, &fa, &fb);
        // The winner (smaller user ID, ST-03) is the one whose start was answered with an accept.
        let accepter = net.log.iter().find(|w| w.out.event_type == "m.key.verification.accept").unwrap().from;
        let winner = if a_user < b_user { Side::A } else { Side::B };
        assert_eq!(accepter, winner.other());
    }
}

#[test]
fn simultaneous_starts_same_user_smaller_device_wins() {
    let mut net = Net::new(Dev::new(ALICE, "ZZZ"), Dev::new(ALICE, "AAA"));
    let (fa, fb) = net.request_and_accept(false);
    let now = net.lb.now;
    net.lb.a.start_sas(&fa, now).unwrap();
    net.lb.b.start_sas(&fb, now).unwrap();
    net.run();
    confirm_both(&mut net, &fa, &fb);
    let accepter = net.log.iter().find(|w| w.out.event_type == "m.key.verification.accept").unwrap().from;
    assert_eq!(accepter, Side::A, "device AAA (side B) wins, so side A accepts");
}

#[test]
fn master_key_left_out_when_not_trusted() {
    let mut da = Dev::new(ALICE, "A1");
    da.trusts_msk = false;
    let mut net = Net::new(da, Dev::new(BOB, "B1"));
    let (fa, fb) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.lb.b.confirm(&fb, net.lb.now).unwrap();
    net.run();
    let kb = net.done(Side::B).unwrap();
    assert_eq!(kb.len(), 1);
    assert_eq!(kb[0].kind, KeyKind::Device);
}

#[test]
fn mac_before_confirmation_is_kept_until_the_user_confirms() {
    let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let (fa, fb) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.run();
    assert!(net.done(Side::B).is_none(), "B must not verify before its user confirmed");
    assert!(net.done(Side::A).is_none());
    net.lb.b.confirm(&fb, net.lb.now).unwrap();
    net.run();
    assert_verified_both(&net);
}

#[test]
fn keys_arriving_late_do_not_lose_the_start() {
    let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    // B forgets A's keys: the start must be held, keys asked for, and the flow resumed.
    net.lb.b = Machine::new(net.db.identity(), Config::default(), Box::new(SeededEntropy::new(9)));
    let now = net.lb.now;
    let fa = net.lb.a.request_to_device(BOB, &["B1".into()], now).unwrap();
    net.run();
    assert!(net.events(Side::B).into_iter().any(|e| matches!(e, Event::KeysNeeded { user_id } if user_id == ALICE)));
    let fb = net.flow_of(Side::B);
    net.lb.b.accept(&fb, now).unwrap();
    net.run();
    net.lb.a.start_sas(&fa, now).unwrap();
    net.run();
    assert!(net.sas(Side::B).is_none(), "start held while keys are unknown");
    net.lb.b.update_user_keys(ALICE, keys_of(&[&net.da.clone()]), now);
    net.run();
    assert!(net.sas(Side::B).is_some());
    confirm_both(&mut net, &fa, &fb);
}

#[test]
fn start_without_keys_is_a_typed_error() {
    let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    net.lb.a = Machine::new(net.da.identity(), Config::default(), Box::new(SeededEntropy::new(3)));
    let (fa, _) = net.request_and_accept(false);
    let err = net.lb.a.start_sas(&fa, net.lb.now).unwrap_err();
    assert!(matches!(err, ActionError::KeysUnknown { .. }), "{err}");
}

#[test]
fn wrong_state_actions_are_errors() {
    let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let now = net.lb.now;
    let fa = net.lb.a.request_to_device(BOB, &["B1".into()], now).unwrap();
    assert!(matches!(net.lb.a.confirm(&fa, now), Err(ActionError::WrongState { .. })));
    assert!(matches!(net.lb.a.start_sas(&fa, now), Err(ActionError::WrongState { .. })));
    assert!(matches!(net.lb.a.accept(&fa, now), Err(ActionError::WrongState { .. })));
    assert!(matches!(net.lb.a.mismatch(&fa, now), Err(ActionError::WrongState { .. })));
    let bogus = FlowKey::ToDevice { user_id: BOB.into(), transaction_id: "nope".into() };
    assert!(matches!(net.lb.a.cancel(&bogus, now), Err(ActionError::UnknownFlow(_))));
    net.lb.a.cancel(&fa, now).unwrap();
    assert!(matches!(net.lb.a.cancel(&fa, now), Err(ActionError::WrongState { .. })));
}

#[test]
fn every_key_agreement_mac_and_sas_method_combination() {
    use mxverify_proto::crypto::{KeyAgreement, MacMethod};
    let only = |ka: Vec<KeyAgreement>, macs: Vec<MacMethod>, emoji: bool, decimal: bool| Config {
        sas: SasParams { key_agreements: ka, macs, emoji, decimal },
        ..Config::default()
    };
    let all_ka = KeyAgreement::ALL.to_vec();
    let all_mac = MacMethod::ALL.to_vec();
    for ka in KeyAgreement::ALL {
        for mac in MacMethod::ALL {
            for (emoji, decimal) in [(true, true), (true, false), (false, true)] {
                for in_room in [false, true] {
                    // The starter offers everything; the accepter supports only this combination.
                    let mut net = Net::with_config(
                        Dev::new(ALICE, "A1"),
                        Dev::new(BOB, "B1"),
                        Config::default(),
                        only(vec![ka], vec![mac], emoji, decimal),
                    );
                    let (fa, fb) = net.request_and_accept(in_room);
                    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
                    net.run();
                    let accept = net.lb.log.iter().find(|w| w.out.event_type == "m.key.verification.accept").unwrap();
                    assert_eq!(accept.out.content.to_value()["key_agreement_protocol"], ka.as_str());
                    assert_eq!(accept.out.content.to_value()["message_authentication_code"], mac.as_str());
                    let (e, d) = net.sas(Side::A).unwrap();
                    assert_eq!((e.is_some(), d.is_some()), (emoji, decimal), "only negotiated representations");
                    net.lb.a.confirm(&fa, net.lb.now).unwrap();
                    net.lb.b.confirm(&fb, net.lb.now).unwrap();
                    net.run();
                    assert!(
                        net.done(Side::A).is_some() && net.done(Side::B).is_some(),
                        "{ka:?} {mac:?} {emoji} {decimal}"
                    );
                    assert_eq!(net.sas(Side::A), net.sas(Side::B));
                }
            }
        }
    }
    // SA-05: with both sides supporting everything, the deprecated choices are never made.
    let mut net = Net::with_config(
        Dev::new(ALICE, "A1"),
        Dev::new(BOB, "B1"),
        only(all_ka.clone(), all_mac.clone(), true, true),
        only(all_ka, all_mac, true, true),
    );
    let (fa, _) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    let accept = net.lb.log.iter().find(|w| w.out.event_type == "m.key.verification.accept").unwrap();
    assert_eq!(accept.out.content.to_value()["key_agreement_protocol"], "curve25519-hkdf-sha256");
    assert_eq!(accept.out.content.to_value()["message_authentication_code"], "hkdf-hmac-sha256.v2");
}

/// `DoneSent` for `side`, with its keys, and its position among that side's events.
fn done_sent(net: &Net, side: Side) -> Option<(usize, Vec<VerifiedKey>)> {
    net.events(side).iter().enumerate().find_map(|(i, e)| match e {
        Event::DoneSent { keys, .. } => Some((i, keys.clone())),
        _ => None,
    })
}

#[test]
fn done_sent_announces_exactly_the_keys_of_done() {
    for requester_starts in [true, false] {
        let net = full_flow(false, false, requester_starts);
        for side in [Side::A, Side::B] {
            let (at, keys) = done_sent(&net, side).expect("DoneSent");
            let done_at = net.events(side).iter().position(|e| matches!(e, Event::Done { .. })).unwrap();
            assert!(at < done_at, "DoneSent comes before Done");
            assert_eq!(Some(keys), net.done(side), "the same keys");
        }
    }
}

#[test]
fn done_sent_is_emitted_with_our_done() {
    let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let (fa, fb) = net.request_and_accept(false);
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.lb.b.confirm(&fb, net.lb.now).unwrap();
    // Step by step: whenever a side's `done` is queued, its DoneSent was emitted with it.
    net.collect();
    while !net.lb.queue.is_empty() {
        net.deliver(0);
        for side in [Side::A, Side::B] {
            let sent_done = net.sent_types(side).contains(&"m.key.verification.done");
            assert_eq!(sent_done, done_sent(&net, side).is_some(), "{side:?}");
        }
    }
    assert!(net.done(Side::A).is_some() && net.done(Side::B).is_some());
}

#[test]
fn legacy_flow_reports_done_sent_then_done() {
    let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let now = net.lb.now;
    let fa = net.lb.a.start_sas_without_request(BOB, "B1", now).unwrap();
    net.run();
    let fb = net.flow_of(Side::B);
    net.lb.b.accept(&fb, now).unwrap();
    net.run();
    confirm_both(&mut net, &fa, &fb);
    for side in [Side::A, Side::B] {
        assert_eq!(done_sent(&net, side).map(|(_, k)| k), net.done(side));
    }
}

#[test]
fn the_projection_follows_the_flow_with_its_legal_actions() {
    use mxverify_proto::wire::Method;
    let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let now = net.lb.now;
    let fa = net.lb.a.request_to_device(BOB, &["B1".into()], now).unwrap();
    net.run();
    let fb = net.flow_of(Side::B);
    let a = net.lb.a.flow(&fa).unwrap();
    assert_eq!((a.phase, a.actions), (FlowPhase::Requested, vec![Action::Cancel]));
    let b = net.lb.b.flow(&fb).unwrap();
    assert!(matches!(&b.phase, FlowPhase::Incoming { common_methods, .. } if *common_methods == [Method::SasV1]));
    assert_eq!(b.actions, [Action::Accept, Action::Cancel]);
    assert!(b.can(Action::Accept) && !b.can(Action::Confirm));
    assert_eq!(b.deadline, Some(now + 2 * 60_000), "the prompt's deadline");
    net.lb.b.accept(&fb, now).unwrap();
    net.run();
    let a = net.lb.a.flow(&fa).unwrap();
    assert_eq!(a.phase, FlowPhase::Ready { methods: vec![Method::SasV1], qr_code: None });
    assert_eq!(a.actions, [Action::StartSas, Action::Cancel]);
    assert_eq!(a.deadline, Some(now + 10 * 60_000), "the flow's deadline");
    net.lb.a.start_sas(&fa, now).unwrap();
    net.run();
    for (m, f) in [(&net.lb.a, &fa), (&net.lb.b, &fb)] {
        let info = m.flow(f).unwrap();
        assert!(matches!(&info.phase, FlowPhase::SasCompare { emoji: Some(e), decimals: Some(_) } if e.len() == 7));
        assert_eq!(info.actions, [Action::Confirm, Action::Mismatch, Action::Cancel]);
    }
    net.lb.a.confirm(&fa, now).unwrap();
    let a = net.lb.a.flow(&fa).unwrap();
    assert_eq!((a.phase, a.actions), (FlowPhase::SasConfirmed, vec![Action::Cancel]));
    net.lb.b.confirm(&fb, now).unwrap();
    net.run();
    let a = net.lb.a.flow(&fa).unwrap();
    assert!(matches!(&a.phase, FlowPhase::Done { keys } if Some(keys.clone()) == net.done(Side::A)));
    assert!(a.actions.is_empty() && a.verified && a.deadline.is_none());
}
