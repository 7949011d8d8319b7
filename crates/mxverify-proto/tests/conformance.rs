//! Wire conformance: every js-sdk sample parses into the right message, and every message the
//! machine emits, over both transports, validates against the spec's JSON schemas.

mod support;

use std::path::{Path, PathBuf};

use mxverify_proto::wire::{self, Envelope, Msg, MsgKind};
use mxverify_proto::*;
use serde_json::{Value, json};
use support::net::*;
use support::schema::validate_event;

fn samples() -> Vec<(PathBuf, Value)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Value)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "json") {
                out.push((p.clone(), serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()));
            }
        }
    }
    let mut out = vec![];
    walk(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/js-sdk-wire/samples"), &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_js_sdk_sample_parses_into_the_right_message() {
    let all = samples();
    assert_eq!(all.len(), 37);
    for (path, ev) in all {
        let name = path.display().to_string();
        let in_room = ev.get("room_id").is_some();
        let ty = ev["type"].as_str().unwrap();
        let content = &ev["content"];
        let p = wire::parse(ty, content, in_room, None).unwrap_or_else(|| panic!("{name}: not a verification event"));
        let msg = p.msg.unwrap_or_else(|e| panic!("{name}: {e}"));
        let want_kind = if ty == "m.room.message" { MsgKind::Request } else { MsgKind::from_event_type(ty).unwrap() };
        assert_eq!(msg.kind(), want_kind, "{name}");
        let envelope = if in_room {
            assert_eq!(
                p.flow_id.as_deref(),
                content.pointer("/m.relates_to/event_id").and_then(Value::as_str),
                "{name}"
            );
            Envelope::Room(p.flow_id.clone())
        } else {
            assert_eq!(p.flow_id.as_deref(), content["transaction_id"].as_str(), "{name}");
            Envelope::ToDevice(p.flow_id.clone().unwrap())
        };
        // Re-encoding gives the same message back, written as canonical JSON.
        let (ty2, content2) = wire::encode(&msg, &envelope);
        assert_eq!(ty2, ty, "{name}");
        let content2_value = content2.to_value();
        assert_eq!(canonical::to_string(&content2_value).unwrap(), content2.as_str(), "{name}");
        let again = wire::parse(ty2, &content2_value, in_room, None).unwrap().msg.unwrap();
        assert_eq!(again, msg, "{name}");
        // And the known fields are carried exactly.
        match &msg {
            Msg::Cancel(c) => {
                assert_eq!(c.code.as_str(), content["code"].as_str().unwrap(), "{name}");
                assert!(path.file_name().unwrap().to_string_lossy().starts_with(c.code.as_str()), "{name}");
            }
            Msg::Mac(m) => assert_eq!(json!(m.mac), content["mac"], "{name}"),
            Msg::Start(s) => assert_eq!(s.from_device, content["from_device"].as_str().unwrap()),
            _ => {}
        }
    }
}

fn as_event(w: &Wire, net: &Net, n: usize) -> Value {
    let sender = net.dev(w.from).user.clone();
    match &w.out.destination {
        Destination::Room { room_id } => json!({
            "type": w.out.event_type, "sender": sender, "content": w.out.content,
            "room_id": room_id, "event_id": format!("$e{n}:example.org"), "origin_server_ts": T0,
        }),
        _ => json!({"type": w.out.event_type, "sender": sender, "content": w.out.content}),
    }
}

fn validate_log(net: &Net, seen: &mut std::collections::BTreeSet<String>) {
    for (n, w) in net.lb.log.iter().enumerate() {
        let ev = as_event(w, net, n);
        validate_event(&ev).unwrap_or_else(|e| panic!("{ev:#}\n{e:?}"));
        let transport = if matches!(w.out.destination, Destination::Room { .. }) { "room" } else { "to-device" };
        seen.insert(format!("{transport} {}", w.out.event_type));
    }
}

#[test]
fn everything_the_machine_emits_validates() {
    let mut seen = std::collections::BTreeSet::new();
    for in_room in [false, true] {
        // A whole flow.
        let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
        let (fa, fb) = net.request_and_accept(in_room);
        net.lb.a.start_sas(&fa, net.lb.now).unwrap();
        net.run();
        net.lb.a.confirm(&fa, net.lb.now).unwrap();
        net.lb.b.confirm(&fb, net.lb.now).unwrap();
        net.run();
        validate_log(&net, &mut seen);
        // Cancels, each code we send.
        let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
        let (fa, fb) = net.request_and_accept(in_room);
        net.lb.a.start_sas(&fa, net.lb.now).unwrap();
        net.run();
        net.lb.b.mismatch(&fb, net.lb.now).unwrap();
        net.run();
        validate_log(&net, &mut seen);
    }
    // m.accepted, m.unknown_transaction and m.timeout (to-device only by nature).
    let mut net = Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    net.lb.a.request_to_device(BOB, &["B1".into(), "B2".into()], T0).unwrap();
    net.run();
    let fb = net.flow_of(Side::B);
    net.lb.b.accept(&fb, T0).unwrap();
    net.run();
    net.lb.b.receive(
        IncomingEvent {
            sender: ALICE.into(),
            event_type: "m.key.verification.key".into(),
            content: json!({"transaction_id": "x", "key": "x"}),
            room: None,
        },
        T0,
    );
    net.advance(11 * 60_000);
    validate_log(&net, &mut seen);
    let legacy = &mut Net::new(Dev::new(ALICE, "A1"), Dev::new(BOB, "B1"));
    legacy.a.start_sas_without_request(BOB, "B1", T0).unwrap();
    legacy.run();
    validate_log(legacy, &mut seen);
    for ty in ["request", "ready", "start", "accept", "key", "mac", "done", "cancel"] {
        let t = format!("m.key.verification.{ty}");
        assert!(seen.contains(&format!("to-device {t}")), "{t} not covered: {seen:?}");
        if ty != "request" {
            assert!(seen.contains(&format!("room {t}")), "{t} not covered in rooms: {seen:?}");
        }
    }
    assert!(seen.contains("room m.room.message"));
}

#[test]
fn emoji_translations_match_the_spec_i18n_files() {
    // The crate ships sas-emoji.json; its translations must be the spec's per-language files.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/spec-data/data-definitions/sas-emoji-v1-i18n");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let lang = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if lang == "base" {
            continue;
        }
        let names: std::collections::BTreeMap<String, Option<String>> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for i in 0..64 {
            let e = mxverify_proto::emoji::emoji(i);
            let want = names.get(e.description).cloned().flatten().filter(|t| !t.is_empty());
            assert_eq!(e.name_in(&lang).map(str::to_owned), want, "{lang} {}", e.description);
            checked += 1;
        }
    }
    assert_eq!(checked, 32 * 64);
}
