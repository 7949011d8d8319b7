//! QR verification flows: each mode, each side showing and scanning, QR then SAS, and a negative
//! test for every check.

mod support;

use mxverify_proto::qr::{QrMode, QrPayload, QrSecret};
use mxverify_proto::wire::Method;
use mxverify_proto::*;
use serde_json::json;
use support::net::*;

fn qr_config() -> Config {
    Config {
        methods: vec![Method::SasV1, Method::QrShowV1, Method::QrScanV1, Method::ReciprocateV1],
        ..Config::default()
    }
}

fn qr_net(da: Dev, db: Dev) -> Net {
    Net::with_config(da, db, qr_config(), qr_config())
}

/// The code `side` shows.
fn shown(net: &Net, side: Side) -> Option<(Vec<u8>, u8)> {
    net.events(side).into_iter().find_map(|e| match e {
        Event::QrCode { payload, mode, .. } => Some((payload.clone(), *mode)),
        _ => None,
    })
}

fn flows(net: &Net) -> (FlowKey, FlowKey) {
    (net.flow_of(Side::A), net.flow_of(Side::B))
}

/// `scanner` scans the other side's code; the displayer's user confirms.
fn scan_and_confirm(net: &mut Net, scanner: Side, payload: &[u8]) {
    let (fa, fb) = flows(net);
    let (fs, fd) = if scanner == Side::A { (fa, fb) } else { (fb, fa) };
    let now = net.lb.now;
    net.m(scanner).scan_qr(&fs, payload, now).unwrap();
    net.run();
    if net.events(scanner.other()).iter().any(|e| matches!(e, Event::QrScanned { .. })) {
        net.m(scanner.other()).confirm(&fd, now).unwrap();
        net.run();
    }
}

fn done_keys(net: &Net, side: Side) -> Vec<(Ed25519PublicKey, KeyKind)> {
    net.done(side).map(|k| k.into_iter().map(|k| (k.key, k.kind)).collect()).unwrap_or_default()
}

#[test]
fn mode_0_other_user_each_side_shows_and_scans() {
    for in_room in [false, true] {
        for scanner in [Side::A, Side::B] {
            let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
            net.request_and_accept(in_room);
            // Both sides can show and scan, so both show a code of mode 0x00.
            let (payload, mode) = shown(&net, scanner.other()).expect("displayer shows a code");
            assert_eq!(mode, 0);
            assert_eq!(shown(&net, scanner).unwrap().1, 0);
            scan_and_confirm(&mut net, scanner, &payload);
            let (s, d) = (net.dev(scanner).clone(), net.dev(scanner.other()).clone());
            // QR-07: each trusts the other's master key.
            assert_eq!(done_keys(&net, scanner), vec![(d.msk.clone().unwrap(), KeyKind::MasterKey)]);
            assert_eq!(done_keys(&net, scanner.other()), vec![(s.msk.clone().unwrap(), KeyKind::MasterKey)]);
            assert!(net.cancels_sent().is_empty());
            assert_eq!(
                net.sent_types(scanner),
                [
                    if scanner == Side::A { "m.key.verification.request" } else { "m.key.verification.ready" },
                    "m.key.verification.start",
                    "m.key.verification.done"
                ]
                .map(|t| if in_room && t == "m.key.verification.request" {
                    "m.room.message"
                } else {
                    t
                })
            );
        }
    }
}

#[test]
fn mode_1_and_2_self_verification() {
    // A trusts the master key, A2 does not: A shows mode 0x01, A2 shows mode 0x02.
    for scanner in [Side::A, Side::B] {
        let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(ALICE, "A2").untrusting());
        net.request_and_accept(false);
        assert_eq!(shown(&net, Side::A).unwrap().1, 1);
        assert_eq!(shown(&net, Side::B).unwrap().1, 2);
        let (payload, _) = shown(&net, scanner.other()).unwrap();
        scan_and_confirm(&mut net, scanner, &payload);
        let msk = net.da.msk.clone().unwrap();
        if scanner == Side::B {
            // Mode 0x01 scanned by A2: it checks key1 = the master key and key2 = its own device
            // key, then trusts the master key; A trusts A2's device key.
            assert_eq!(done_keys(&net, Side::B), vec![(msk.clone(), KeyKind::MasterKey)]);
            assert_eq!(done_keys(&net, Side::A), vec![(net.db.ed25519.clone(), KeyKind::Device)]);
        } else {
            // Mode 0x02 scanned by the trusting device: it trusts A2's device; A2 trusts the MSK.
            assert_eq!(done_keys(&net, Side::A), vec![(net.db.ed25519.clone(), KeyKind::Device)]);
            assert_eq!(done_keys(&net, Side::B), vec![(msk, KeyKind::MasterKey)]);
        }
        assert!(net.cancels_sent().is_empty());
    }
}

#[test]
fn shown_codes_decode_to_the_right_fields() {
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    net.request_and_accept(true);
    let (payload, _) = shown(&net, Side::A).unwrap();
    let p = QrPayload::decode(&payload).unwrap();
    assert_eq!(p.mode(), QrMode::OtherUser);
    assert_eq!(p.flow_id(), net.flow_of(Side::A).flow_id());
    assert!(p.flow_id().starts_with('$'), "in-room codes carry the request event ID");
    assert_eq!(b64::encode(p.key1()), net.da.msk.clone().unwrap());
    assert_eq!(b64::encode(p.key2()), net.db.msk.clone().unwrap());
    assert_eq!(p.secret().len(), 16);
    assert_eq!(net.lb.a.qr_code(&net.flow_of(Side::A)), Some(payload));
}

#[test]
fn qr_then_sas() {
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let (fa, fb) = net.request_and_accept(false);
    assert!(shown(&net, Side::A).is_some());
    net.lb.b.start_sas(&fb, net.lb.now).unwrap();
    net.run();
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.lb.b.confirm(&fb, net.lb.now).unwrap();
    net.run();
    assert!(net.done(Side::A).is_some() && net.done(Side::B).is_some());
    assert!(net.cancels_sent().is_empty());
    assert_eq!(net.lb.a.qr_code(&fa), None, "the code is gone once SAS started");
}

#[test]
fn advertising_follows_capabilities() {
    // A can only show, B can only scan: A advertises show, B scan; only A shows a code.
    let show = Config { methods: vec![Method::QrShowV1, Method::ReciprocateV1], ..Config::default() };
    let scan = Config { methods: vec![Method::QrScanV1, Method::ReciprocateV1], ..Config::default() };
    let mut net = Net::with_config(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"), show, scan);
    let (_, fb) = net.request_and_accept(false);
    let ready = net.lb.log.iter().find(|w| w.out.event_type == "m.key.verification.ready").unwrap();
    assert_eq!(ready.out.content.to_value()["methods"], json!(["m.qr_code.scan.v1", "m.reciprocate.v1"]));
    assert!(shown(&net, Side::A).is_some());
    assert!(shown(&net, Side::B).is_none());
    assert!(matches!(net.lb.b.start_sas(&fb, net.lb.now), Err(ActionError::NoCommonMethod(_))));
    let (payload, _) = shown(&net, Side::A).unwrap();
    scan_and_confirm(&mut net, Side::B, &payload);
    assert!(net.done(Side::A).is_some() && net.done(Side::B).is_some());
    // Nobody who can scan on the other side: no code, and scanning is refused.
    let mut net = Net::with_config(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"), qr_config(), Config::default());
    let (fa, _) = net.request_and_accept(false);
    assert!(shown(&net, Side::A).is_none());
    assert!(matches!(net.lb.a.scan_qr(&fa, b"MATRIX", net.lb.now), Err(ActionError::NoCommonMethod(_))));
}

/// The fields of a payload: mode, flow id, key 1, key 2, secret.
type Parts = (QrMode, String, [u8; 32], [u8; 32], Vec<u8>);

/// A named change to a payload.
type Alteration = (&'static str, fn(&mut Parts));

/// Rebuilds a shown code with one field changed.
fn altered(payload: &[u8], f: impl FnOnce(&mut Parts)) -> Vec<u8> {
    let p = QrPayload::decode(payload).unwrap();
    let mut parts = (p.mode(), p.flow_id().to_owned(), *p.key1(), *p.key2(), p.secret().as_bytes().to_vec());
    f(&mut parts);
    QrPayload::new(parts.0, parts.1, parts.2, parts.3, QrSecret::from_bytes(parts.4)).unwrap().encode()
}

fn other_point() -> [u8; 32] {
    *fake_key("someone else").as_bytes()
}

/// Scanner B scans A's (altered) code; returns the cancel B reports.
fn scan_altered(net: &mut Net, f: impl FnOnce(&mut Parts)) -> CancelInfo {
    let (payload, _) = shown(net, Side::A).unwrap();
    let bad = altered(&payload, f);
    let fb = net.flow_of(Side::B);
    net.lb.b.scan_qr(&fb, &bad, net.lb.now).unwrap();
    net.run();
    assert!(net.done(Side::A).is_none() && net.done(Side::B).is_none(), "nothing trusted");
    assert_eq!(net.cancels_sent().len(), 1);
    net.cancelled(Side::B).expect("the scanner cancels")
}

#[test]
fn scanner_checks_every_key_and_the_flow_id() {
    let cases: [Alteration; 3] = [
        ("first key", |p| p.2 = other_point()),
        ("second key", |p| p.3 = other_point()),
        ("another verification", |p| p.1 = "$not-this-flow".into()),
    ];
    for (what, f) in cases {
        let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
        net.request_and_accept(false);
        let info = scan_altered(&mut net, f);
        assert_eq!(info.code, CancelCode::KeyMismatch, "{what}");
        assert!(matches!(&info.cause, Some(LocalCause::QrMismatch(m)) if m.contains(what)), "{what}: {info:?}");
        assert_eq!(net.cancelled(Side::A).unwrap().code, CancelCode::KeyMismatch);
    }
    // The same for the self-verification modes, each key position.
    for (mode_pos, f) in
        [("first key", (|p| p.2 = other_point()) as fn(&mut Parts)), ("second key", |p| p.3 = other_point())]
    {
        for a in [Dev::new(ALICE, "A1"), Dev::new(ALICE, "A1").untrusting()] {
            let mut net = qr_net(a, Dev::new(ALICE, "A2"));
            net.request_and_accept(false);
            let info = scan_altered(&mut net, f);
            assert_eq!(info.code, CancelCode::KeyMismatch, "{mode_pos}");
            assert!(matches!(&info.cause, Some(LocalCause::QrMismatch(m)) if m.contains(mode_pos)), "{info:?}");
        }
    }
}

#[test]
fn wrong_mode_for_the_relationship_is_a_user_mismatch() {
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    net.request_and_accept(false);
    let info = scan_altered(&mut net, |p| p.0 = QrMode::SelfTrusted);
    assert_eq!(info.code, CancelCode::UserMismatch);
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(ALICE, "A2"));
    net.request_and_accept(false);
    let info = scan_altered(&mut net, |p| p.0 = QrMode::OtherUser);
    assert_eq!(info.code, CancelCode::UserMismatch);
}

#[test]
fn mode_2_needs_a_scanner_that_trusts_the_master_key() {
    // Both untrusting: A shows mode 0x02, and B cannot vouch for the master key.
    let mut net = qr_net(Dev::new(ALICE, "A1").untrusting(), Dev::new(ALICE, "A2").untrusting());
    net.request_and_accept(false);
    assert_eq!(shown(&net, Side::A).unwrap().1, 2);
    let info = scan_altered(&mut net, |_| {});
    assert_eq!(info.code, CancelCode::KeyMismatch);
}

#[test]
fn wrong_secret_is_refused_by_the_displayer() {
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    net.request_and_accept(false);
    let (payload, _) = shown(&net, Side::A).unwrap();
    let bad = altered(&payload, |p| p.4 = b"not the secret!!".to_vec());
    let fb = net.flow_of(Side::B);
    net.lb.b.scan_qr(&fb, &bad, net.lb.now).unwrap();
    net.run();
    let info = net.cancelled(Side::A).expect("the displayer cancels");
    assert_eq!(info.code, CancelCode::KeyMismatch);
    assert!(matches!(&info.cause, Some(LocalCause::QrMismatch(m)) if m.contains("secret")));
    assert!(net.done(Side::A).is_none() && net.done(Side::B).is_none());
    assert_eq!(net.cancels_sent(), vec![(Side::A, "m.key_mismatch".into())]);
}

/// Alice and Bob ready; Bob's device scanned the code Alice's device shows.
fn bob_scanned_alices_code() -> (Net, FlowKey) {
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let (fa, _) = net.request_and_accept(false);
    let (payload, _) = shown(&net, Side::A).unwrap();
    let fb = net.flow_of(Side::B);
    net.lb.b.scan_qr(&fb, &payload, net.lb.now).unwrap();
    net.run();
    (net, fa)
}

#[test]
fn displayer_trusts_only_after_its_user_confirms() {
    let (mut net, fa) = bob_scanned_alices_code();
    assert!(net.events(Side::A).iter().any(|e| matches!(e, Event::QrScanned { .. })));
    assert!(net.done(Side::A).is_none() && net.done(Side::B).is_none());
    // The user says the other device did not show success.
    net.lb.a.mismatch(&fa, net.lb.now).unwrap();
    net.run();
    assert_eq!(net.cancelled(Side::A).unwrap().code, CancelCode::KeyMismatch);
    assert!(net.done(Side::A).is_none() && net.done(Side::B).is_none());
}

#[test]
fn reciprocation_without_a_shown_code_or_flow() {
    // A flow where A shows nothing (it cannot show): a reciprocate start is an unknown method.
    let mut net = Net::with_config(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"), Config::default(), qr_config());
    let (fa, _) = net.request_and_accept(false);
    let recip = |txn: &str| {
        to_device(
            BOB,
            "m.key.verification.start",
            json!({"transaction_id": txn, "from_device": "B1", "method": "m.reciprocate.v1", "secret": "MTIzNDU2Nzg"}),
        )
    };
    net.lb.a.receive(recip(fa.flow_id()), T0);
    net.collect();
    assert_eq!(net.cancelled(Side::A).unwrap().code, CancelCode::UnknownMethod);
    // For a flow nobody knows: no answer at all, since CX-04 exempts every start.
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    net.lb.a.receive(recip("never-seen"), T0);
    net.lb.a.receive(recip("never-seen"), T0);
    net.collect();
    let codes: Vec<_> = net.lb.log.iter().map(|w| w.out.content.to_value()["code"].clone()).collect();
    assert_eq!(codes, Vec::<serde_json::Value>::new());
    assert!(net.cancelled(Side::A).is_none() && net.done(Side::A).is_none());
}

#[test]
fn garbage_scans_are_errors_and_keep_the_flow() {
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let (_, fb) = net.request_and_accept(false);
    let err = net.lb.b.scan_qr(&fb, b"https://example.org", net.lb.now).unwrap_err();
    assert!(matches!(err, ActionError::InvalidQr(_)), "{err}");
    assert!(net.cancelled(Side::B).is_none());
    let (payload, _) = shown(&net, Side::A).unwrap();
    scan_and_confirm(&mut net, Side::B, &payload);
    assert!(net.done(Side::A).is_some() && net.done(Side::B).is_some());
}

#[test]
fn no_switch_to_sas_after_reciprocation() {
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let (fa, fb) = net.request_and_accept(false);
    let (payload, _) = shown(&net, Side::A).unwrap();
    net.lb.b.scan_qr(&fb, &payload, net.lb.now).unwrap();
    assert!(matches!(net.lb.b.start_sas(&fb, net.lb.now), Err(ActionError::WrongState { .. })));
    net.collect();
    net.lb.queue.clear(); // the reciprocation is lost; A starts SAS meanwhile
    net.lb.a.start_sas(&fa, net.lb.now).unwrap();
    net.run();
    // QR-08: B already reciprocated, so a SAS start is out of sequence.
    assert_eq!(net.cancelled(Side::B).unwrap().code, CancelCode::UnexpectedMessage);
    assert!(net.done(Side::A).is_none() && net.done(Side::B).is_none());
}

#[test]
fn qr_keys_changed_before_done() {
    let (mut net, fa) = bob_scanned_alices_code();
    let mut keys = keys_of(&[&net.db.clone()]);
    keys.master_key = Some(fake_key("new master key"));
    net.lb.a.update_user_keys(BOB, keys, net.lb.now);
    // A replaced master key fails the flow at once (TR-06): there is nothing left to confirm.
    assert!(net.lb.a.confirm(&fa, net.lb.now).is_err());
    net.run();
    let info = net.cancelled(Side::A).unwrap();
    assert_eq!((info.code, info.cause), (CancelCode::KeyMismatch, Some(LocalCause::KeysChanged)));
    assert!(net.done(Side::A).is_none() && net.done(Side::B).is_none());
}

// ----- hardening -------------------------------------------------------------------------------

/// The other user's keys as `side` knows them, with a device whose ID is their master key (TR-02).
fn give_clashing_keys(net: &mut Net, side: Side) -> String {
    let other = net.dev(side.other()).clone();
    let mut keys = keys_of(&[&other]);
    let msk = keys.master_key.clone().unwrap();
    keys.devices.insert(msk.to_string(), fake_key("evil"));
    let (user, now) = (other.user.clone(), net.lb.now);
    net.m(side).update_user_keys(&user, keys, now);
    msk.to_string()
}

#[test]
fn device_id_clashing_with_a_cross_signing_key_refuses_showing_a_code() {
    // TR-02 for QR: the displayer must not offer to verify a user with a clashing device ID.
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let msk = give_clashing_keys(&mut net, Side::A);
    net.request_and_accept(false);
    assert!(shown(&net, Side::A).is_none(), "no code is shown for a user we must refuse");
    let info = net.cancelled(Side::A).expect("the displayer refuses");
    assert_eq!(info.code, CancelCode::KeyMismatch);
    assert_eq!(info.cause, Some(LocalCause::DeviceIdClashesWithCrossSigningKey(msk)));
    assert_eq!(net.cancels_sent(), vec![(Side::A, "m.key_mismatch".into())]);
    assert!(net.done(Side::A).is_none() && net.done(Side::B).is_none());
}

#[test]
fn device_id_clashing_with_a_cross_signing_key_refuses_scanning_a_code() {
    // A can only scan, so it shows nothing; it must refuse when it scans Bob's code.
    let scan = Config { methods: vec![Method::QrScanV1, Method::ReciprocateV1], ..Config::default() };
    let show = Config { methods: vec![Method::QrShowV1, Method::ReciprocateV1], ..Config::default() };
    let mut net = Net::with_config(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"), scan, show);
    let msk = give_clashing_keys(&mut net, Side::A);
    let (fa, _) = net.request_and_accept(false);
    assert!(net.cancelled(Side::A).is_none());
    let (payload, _) = shown(&net, Side::B).expect("Bob shows a code");
    net.lb.a.scan_qr(&fa, &payload, net.lb.now).unwrap();
    net.run();
    let info = net.cancelled(Side::A).expect("the scanner refuses");
    assert_eq!(info.code, CancelCode::KeyMismatch);
    assert_eq!(info.cause, Some(LocalCause::DeviceIdClashesWithCrossSigningKey(msk)));
    assert_eq!(net.cancels_sent(), vec![(Side::A, "m.key_mismatch".into())]);
    assert!(net.done(Side::A).is_none() && net.done(Side::B).is_none());
}

/// Both devices scan each other's code at the same moment: two `m.reciprocate.v1` starts cross.
fn colliding_scans(da: Dev, db: Dev) -> (Net, Side) {
    let winner =
        if (da.user.as_str(), da.device.as_str()) < (db.user.as_str(), db.device.as_str()) { Side::A } else { Side::B };
    let mut net = qr_net(da, db);
    let (fa, fb) = net.request_and_accept(false);
    let (pa, pb) = (shown(&net, Side::A).unwrap().0, shown(&net, Side::B).unwrap().0);
    let now = net.lb.now;
    net.lb.a.scan_qr(&fa, &pb, now).unwrap();
    net.lb.b.scan_qr(&fb, &pa, now).unwrap();
    net.run();
    // ST-03: the loser's start is ignored, so the loser is the displayer and its user confirms.
    assert!(net.events(winner.other()).iter().any(|e| matches!(e, Event::QrScanned { .. })), "loser asks its user");
    assert!(!net.events(winner).iter().any(|e| matches!(e, Event::QrScanned { .. })), "winner is the scanner");
    let loser_flow = if winner == Side::A { fb } else { fa };
    net.m(winner.other()).confirm(&loser_flow, now).unwrap();
    net.run();
    assert!(net.cancels_sent().is_empty(), "{:?}", net.cancels_sent());
    assert!(net.done(Side::A).is_some() && net.done(Side::B).is_some());
    (net, winner)
}

#[test]
fn colliding_reciprocations_smaller_user_wins() {
    for (a_user, b_user) in [(ALICE, BOB), (BOB, ALICE)] {
        let (net, _) = colliding_scans(Dev::new(a_user, "DEV1"), Dev::new(b_user, "DEV2"));
        for side in [Side::A, Side::B] {
            let other = net.dev(side.other()).clone();
            assert_eq!(done_keys(&net, side), vec![(other.msk.clone().unwrap(), KeyKind::MasterKey)]);
        }
    }
}

#[test]
fn colliding_reciprocations_same_user_smaller_device_wins() {
    let (net, winner) = colliding_scans(Dev::new(ALICE, "ZZZ"), Dev::new(ALICE, "AAA"));
    assert_eq!(winner, Side::B);
    // The winner scanned the loser's mode 0x01 code: it trusts the master key; the loser, as the
    // displayer, trusts the winner's device key.
    assert_eq!(done_keys(&net, Side::B), vec![(net.da.msk.clone().unwrap(), KeyKind::MasterKey)]);
    assert_eq!(done_keys(&net, Side::A), vec![(net.db.ed25519.clone(), KeyKind::Device)]);
}

/// Bob's device knows nothing of Alice's keys; Alice's device shows a code Bob scans at once.
fn scan_before_keys() -> (Net, FlowKey, FlowKey) {
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    net.lb.b = Machine::new(net.db.identity(), qr_config(), Box::new(SeededEntropy::new(9)));
    let now = net.lb.now;
    let fa = net.lb.a.request_to_device(BOB, &["B1".into()], now).unwrap();
    net.run();
    let fb = net.flow_of(Side::B);
    net.lb.b.accept(&fb, now).unwrap();
    net.run();
    let (payload, _) = shown(&net, Side::A).expect("Alice shows a code");
    net.lb.b.scan_qr(&fb, &payload, now).unwrap();
    net.run();
    assert!(net.cancelled(Side::B).is_none(), "a scan before the keys is held, not refused");
    assert!(net.cancels_sent().is_empty());
    assert!(!net.sent_types(Side::B).contains(&"m.key.verification.start"), "nothing reciprocated yet");
    assert!(net.events(Side::B).iter().any(|e| matches!(e, Event::KeysNeeded { user_id } if user_id == ALICE)));
    (net, fa, fb)
}

#[test]
fn scanning_before_the_keys_are_known_completes_when_they_arrive() {
    let (mut net, fa, _) = scan_before_keys();
    let keys = keys_of(&[&net.da.clone()]);
    net.lb.b.update_user_keys(ALICE, keys, net.lb.now);
    net.run();
    assert!(net.sent_types(Side::B).contains(&"m.key.verification.start"), "the scan completes");
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.run();
    assert!(net.cancels_sent().is_empty(), "{:?}", net.cancels_sent());
    assert_eq!(done_keys(&net, Side::B), vec![(net.da.msk.clone().unwrap(), KeyKind::MasterKey)]);
    assert_eq!(done_keys(&net, Side::A), vec![(net.db.msk.clone().unwrap(), KeyKind::MasterKey)]);
}

#[test]
fn scanning_before_keys_that_never_come_times_out() {
    let (mut net, _, _) = scan_before_keys();
    net.advance(10 * 60_000);
    let info = net.cancelled(Side::B).expect("the flow ends at its deadline");
    assert_eq!(info.code, CancelCode::Timeout);
    assert!(net.done(Side::A).is_none() && net.done(Side::B).is_none());
}

#[test]
fn done_sent_by_displayer_at_confirmation_and_by_scanner_at_the_end() {
    let (mut net, fa) = bob_scanned_alices_code();
    let done_sent = |net: &Net, side: Side| {
        net.events(side).into_iter().find_map(|e| match e {
            Event::DoneSent { keys, .. } => Some(keys.clone()),
            _ => None,
        })
    };
    assert!(done_sent(&net, Side::A).is_none() && done_sent(&net, Side::B).is_none());
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    net.collect();
    assert_eq!(done_sent(&net, Side::A).map(|k| k[0].kind.clone()), Some(KeyKind::MasterKey));
    net.run();
    for side in [Side::A, Side::B] {
        assert_eq!(done_sent(&net, side), net.done(side));
    }
}

#[test]
fn the_projection_of_a_qr_flow() {
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let (fa, fb) = net.request_and_accept(false);
    let (payload, _) = shown(&net, Side::A).unwrap();
    let a = net.lb.a.flow(&fa).unwrap();
    assert!(matches!(&a.phase, FlowPhase::Ready { qr_code: Some(code), .. } if *code == payload));
    assert_eq!(a.actions, [Action::StartSas, Action::ScanQr, Action::Cancel]);
    net.lb.b.scan_qr(&fb, &payload, net.lb.now).unwrap();
    assert_eq!(net.lb.b.flow(&fb).unwrap().phase, FlowPhase::QrReciprocated);
    net.run();
    let a = net.lb.a.flow(&fa).unwrap();
    assert_eq!((a.phase, a.actions), (FlowPhase::QrScanned, vec![Action::Confirm, Action::Mismatch, Action::Cancel]));
    net.lb.a.confirm(&fa, net.lb.now).unwrap();
    let a = net.lb.a.flow(&fa).unwrap();
    assert!(matches!(&a.phase, FlowPhase::DoneSent { keys } if keys.len() == 1));
    assert!(a.actions.is_empty(), "no cancel after our done");
    net.run();
    assert!(net.lb.a.flow(&fa).unwrap().verified && net.lb.b.flow(&fb).unwrap().verified);
}

/// Our own keys arriving let a ready flow with another user show its code: Bob's device learns
/// its master key only after accepting Alice's request. A flow that offered SAS only is left as
/// it was.
#[test]
fn our_own_keys_arriving_let_a_ready_flow_show_its_code() {
    let mut net = qr_net(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    let mut without_msk = net.db.identity();
    without_msk.master_key = None;
    net.lb.b = Machine::new(without_msk, qr_config(), Box::new(SeededEntropy::new(9)));
    let now = net.lb.now;
    net.lb.b.update_user_keys(ALICE, keys_of(&[&net.da.clone()]), now);
    net.lb.a.request_to_device(BOB, &["B1".into()], now).unwrap();
    net.run();
    let fb = net.flow_of(Side::B);
    net.lb.b.accept(&fb, now).unwrap();
    net.run();
    assert!(shown(&net, Side::B).is_none(), "no code without our master key");

    net.lb.b.set_own_identity(net.db.identity());
    net.lb.b.update_user_keys(BOB, keys_of(&[&net.db.clone()]), now);
    net.run();
    let (_, mode) = shown(&net, Side::B).expect("our keys arrived: the code shows");
    assert_eq!(mode, 0);
    assert!(net.cancels_sent().is_empty());
    net.lb.b.check_invariants().unwrap();
}

/// A scan waiting for the other user's keys keeps waiting when only our own keys arrive (they are
/// not the ones it must be checked against), and completes when theirs do.
#[test]
fn a_scan_waiting_for_their_keys_is_not_ended_by_ours() {
    let (mut net, fa, _) = scan_before_keys();
    let now = net.lb.now;
    net.lb.b.update_user_keys(BOB, keys_of(&[&net.db.clone()]), now);
    net.run();
    assert!(net.cancelled(Side::B).is_none() && net.cancels_sent().is_empty(), "{:?}", net.cancels_sent());
    assert!(!net.sent_types(Side::B).contains(&"m.key.verification.start"), "still waiting");
    net.lb.b.update_user_keys(ALICE, keys_of(&[&net.da.clone()]), now);
    net.run();
    assert!(net.sent_types(Side::B).contains(&"m.key.verification.start"), "the scan completes");
    net.lb.a.confirm(&fa, now).unwrap();
    net.run();
    assert!(net.cancels_sent().is_empty(), "{:?}", net.cancels_sent());
    assert!(net.done(Side::A).is_some() && net.done(Side::B).is_some());
}
