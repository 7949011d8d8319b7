//! Known-answer tests: VECTORS.md (spec, libolm/goolm, vodozemac, matrix-rust-sdk, derived) and the
//! matrix-js-sdk wire captures, recomputed from the recorded keys — and one run of the whole
//! machine against a recorded js-sdk exchange. Plus a cross-check against vodozemac's `sas`.

use std::path::PathBuf;

use mxverify_proto::crypto::{self, EphemeralKey, KeyAgreement, MacMethod, Party};
use mxverify_proto::*;
use serde_json::{Value, json};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn hex32(s: &str) -> [u8; 32] {
    hex(s).try_into().unwrap()
}

const ALICE_PRIV: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
const BOB_PRIV: &str = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb";
const ALICE_PUB: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo";
const BOB_PUB: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08";
const TXN: &str = "S0meUniqueAndOpaqueString";
const ROOM_FLOW: &str = "$143273582443PhrSn:example.org";
const S_DEVICE_KEY: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo";
const S_MSK: &str = "PUAXw+hDiVqStwqnTRt+vJyYLM8uxJaMwM1V8Sr0Zgw";

fn v6_parties<'a>() -> (Party<'a>, Party<'a>) {
    (
        Party { user_id: "@alice:example.org", device_id: "ALICEDEVICE", ephemeral_key: ALICE_PUB },
        Party { user_id: "@bob:example.org", device_id: "BOBDEVICE", ephemeral_key: BOB_PUB },
    )
}

#[test]
fn v2_libolm_keys_and_outputs() {
    let alice = EphemeralKey::from_random(hex32(ALICE_PRIV));
    let bob = EphemeralKey::from_random(hex32(BOB_PRIV));
    assert_eq!(alice.public_b64(), ALICE_PUB);
    assert_eq!(bob.public_b64(), BOB_PUB);
    let sa = alice.agree(BOB_PUB).unwrap();
    let sb = bob.agree(ALICE_PUB).unwrap();
    assert_eq!(sa.sas_bytes("SAS"), sb.sas_bytes("SAS"));
    assert_eq!(sa.sas_bytes("SAS").to_vec(), hex("3987a872e7b9"));
    assert_eq!(
        sa.mac("Hello world!", "MAC").to_vec(),
        hex("da748c53733e14c053096420e48a08528104ac564e8e788065376a3617fe0e6a")
    );
    assert_eq!(
        sa.mac_encoded(MacMethod::HkdfHmacSha256V2, "Hello world!", "MAC"),
        "2nSMU3M+FMBTCWQg5IoIUoEErFZOjniAZTdqNhf+Dmo"
    );
    assert_eq!(
        sa.mac_encoded(MacMethod::HkdfHmacSha256Legacy, "Hello world!", "MAC"),
        "2nSMTXM+TStTU3RUVTNSVVZUTlNWVlpVVGxOV1ZscFY"
    );
}

#[test]
fn v5_commitment_matrix_rust_sdk() {
    let content = json!({"from_device":"XOWLHHFSWM","transaction_id":"bYxBsirjUJO9osar6ST4i2M2NjrYLA7l","method":"m.sas.v1","key_agreement_protocols":["curve25519-hkdf-sha256","curve25519"],"hashes":["sha256"],"message_authentication_codes":["hkdf-hmac-sha256","hmac-sha256"],"short_authentication_string":["decimal","emoji"]});
    assert_eq!(
        canonical::to_string(&content).unwrap(),
        r#"{"from_device":"XOWLHHFSWM","hashes":["sha256"],"key_agreement_protocols":["curve25519-hkdf-sha256","curve25519"],"message_authentication_codes":["hkdf-hmac-sha256","hmac-sha256"],"method":"m.sas.v1","short_authentication_string":["decimal","emoji"],"transaction_id":"bYxBsirjUJO9osar6ST4i2M2NjrYLA7l"}"#
    );
    assert_eq!(
        crypto::commitment("Q/NmNFEUS1fS+YeEmiZkjjblKTitrKOAk7cPEumcMlg", &content).unwrap(),
        "CCQmB4JCdB0FW21FdAnHj/Hu8+W9+Nb0vgwPEnZZQ4g"
    );
}

#[test]
fn v6_full_sas_scenario() {
    let (s, a) = v6_parties();
    let secret = EphemeralKey::from_random(hex32(ALICE_PRIV)).agree(BOB_PUB).unwrap();
    let cases = [
        (
            KeyAgreement::Curve25519HkdfSha256,
            TXN,
            format!(
                "MATRIX_KEY_VERIFICATION_SAS|@alice:example.org|ALICEDEVICE|{ALICE_PUB}|@bob:example.org|BOBDEVICE|{BOB_PUB}|{TXN}"
            ),
            "ca2d65460883",
            [7469, 6525, 1772],
            [50, 34, 53, 37, 17, 32, 34],
        ),
        (
            KeyAgreement::Curve25519HkdfSha256,
            ROOM_FLOW,
            format!(
                "MATRIX_KEY_VERIFICATION_SAS|@alice:example.org|ALICEDEVICE|{ALICE_PUB}|@bob:example.org|BOBDEVICE|{BOB_PUB}|{ROOM_FLOW}"
            ),
            "5523134c4836",
            [3724, 4149, 2572],
            [21, 18, 12, 19, 19, 4, 32],
        ),
        (
            KeyAgreement::Curve25519,
            TXN,
            format!("MATRIX_KEY_VERIFICATION_SAS@alice:example.orgALICEDEVICE@bob:example.orgBOBDEVICE{TXN}"),
            "bad985d8b11b",
            [6979, 2559, 4160],
            [46, 45, 38, 5, 54, 11, 4],
        ),
    ];
    for (ka, flow, info, bytes, dec, emo) in cases {
        assert_eq!(ka.sas_info(&s, &a, flow), info);
        let b = secret.sas_bytes(&info);
        assert_eq!(b.to_vec(), hex(bytes));
        assert_eq!(crypto::decimals(&b), dec);
        assert_eq!(crypto::emoji_indices(&b), emo);
        // HK-03: the requester-first or swapped order gives something else.
        assert_ne!(secret.sas_bytes(&ka.sas_info(&a, &s, flow)), b);
    }
    let names: Vec<_> = [50u8, 34, 53, 37, 17, 32, 34].iter().map(|&i| emoji::emoji(i).description).collect();
    assert_eq!(names, ["Flag", "Spanner", "Aeroplane", "Umbrella", "Cactus", "Hat", "Spanner"]);

    // V6.4 MACs sent by S.
    let sender = ("@alice:example.org", "ALICEDEVICE");
    let receiver = ("@bob:example.org", "BOBDEVICE");
    let msk_id = format!("ed25519:{S_MSK}");
    let rows = [
        (
            "ed25519:ALICEDEVICE",
            S_DEVICE_KEY,
            "FpF3hjzP5CVqnWiexRFZ7zSGAUUEUoj0VCHZ8NIZvdg",
            "FpF3MzzPelBqbEJxYkVKeFlrVktlRmxyVmt0bFJteHk",
        ),
        (
            msk_id.as_str(),
            S_MSK,
            "UkSEbZOwzVnYl47Kl0DfSrFzv2fWxJ0J0DzReAOUe1U",
            "UkSERZOwT3fYM2ZZTTJaWlRUSmFXbFJVU21GWGJGSlY",
        ),
    ];
    for (id, input, v2, legacy) in rows {
        let info = crypto::mac_info(sender, receiver, TXN, id);
        assert_eq!(secret.mac_encoded(MacMethod::HkdfHmacSha256V2, input, &info), v2);
        assert_eq!(secret.mac_encoded(MacMethod::Msc3783, input, &info), v2);
        assert_eq!(secret.mac_encoded(MacMethod::HkdfHmacSha256Legacy, input, &info), legacy);
        assert!(secret.verify_mac(MacMethod::HkdfHmacSha256V2, input, &info, v2));
        assert!(secret.verify_mac(MacMethod::HkdfHmacSha256Legacy, input, &info, legacy));
        assert!(!secret.verify_mac(MacMethod::HkdfHmacSha256V2, input, &info, legacy));
        assert!(!secret.verify_mac(MacMethod::HkdfHmacSha256V2, "other", &info, v2));
    }
    let list = format!("ed25519:ALICEDEVICE,{msk_id}");
    let info = crypto::mac_info(sender, receiver, TXN, "KEY_IDS");
    assert_eq!(
        secret.mac_encoded(MacMethod::HkdfHmacSha256V2, &list, &info),
        "H9OMK80Amx8gvvNJGoKPV3FP4YA6/uzuG92QO3g5Ym0"
    );
    assert_eq!(
        secret.mac_encoded(MacMethod::HkdfHmacSha256Legacy, &list, &info),
        "H9OMTc0AMEEgRUVnUlVWblVsVldibFZzVmxkaWJGWno"
    );
    // Direction check: A's IDs first.
    let info = crypto::mac_info(receiver, sender, TXN, "ed25519:BOBDEVICE");
    assert_eq!(
        secret.mac_encoded(MacMethod::HkdfHmacSha256V2, S_MSK, &info),
        "t2UAfFgiJ4pCxVddiV5DEo1DIe3UihstIsSXGN0047c"
    );

    // V6.5 commitments.
    let start = json!({"from_device":"ALICEDEVICE","method":"m.sas.v1","transaction_id":TXN,"key_agreement_protocols":["curve25519-hkdf-sha256"],"hashes":["sha256"],"message_authentication_codes":["hkdf-hmac-sha256.v2","hkdf-hmac-sha256"],"short_authentication_string":["decimal","emoji"]});
    assert_eq!(crypto::commitment(BOB_PUB, &start).unwrap(), "pVwwE0zJxTxBnaEDE6nsgVkFbC4DDUEfP8+z21h/DRU");
    let mut room = start.clone();
    room.as_object_mut().unwrap().remove("transaction_id");
    room["m.relates_to"] = json!({"event_id": ROOM_FLOW, "rel_type": "m.reference"});
    assert_eq!(crypto::commitment(BOB_PUB, &room).unwrap(), "zQeRavWDhf6KKUUxSIhoHdtiRHdNsXOK7KCJipZdlbI");
}

fn js_vectors() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/js-sdk-wire/vectors");
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 4);
    out
}

#[test]
fn js_sdk_vectors_recomputed() {
    for (name, v) in js_vectors() {
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_else(|| panic!("{name}: {p}")).to_owned();
        let raw = EphemeralKey::from_random(b64::decode32(&s("/raw_device/sas_x25519_private_key")).unwrap());
        assert_eq!(raw.public_b64(), s("/raw_device/sas_x25519_public_key"), "{name}");
        let secret = raw.agree(&s("/js_device/sas_x25519_public_key")).unwrap();
        let starter = Party {
            user_id: &s("/starter/userId"),
            device_id: &s("/starter/deviceId"),
            ephemeral_key: &s("/starter/key"),
        };
        let accepter = Party {
            user_id: &s("/accepter/userId"),
            device_id: &s("/accepter/deviceId"),
            ephemeral_key: &s("/accepter/key"),
        };
        let info = KeyAgreement::from_wire(&s("/methods/key_agreement")).unwrap().sas_info(
            &starter,
            &accepter,
            &s("/transaction_id"),
        );
        assert_eq!(info, s("/sas_info"), "{name}");
        let bytes = secret.sas_bytes(&info);
        assert_eq!(bytes.to_vec(), hex(&s("/sas_bytes_hex")), "{name}");
        let dec: Vec<u64> = v["decimals"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(crypto::decimals(&bytes).map(u64::from).to_vec(), dec, "{name}");
        let names: Vec<&str> = crypto::emoji_indices(&bytes).iter().map(|&i| emoji::emoji(i).description).collect();
        assert_eq!(json!(names), v["emoji"], "{name}");
        // What js-sdk displayed, symbols included.
        let shown: Vec<Value> = crypto::emoji_indices(&bytes)
            .iter()
            .map(|&i| json!([emoji::emoji(i).symbol, emoji::emoji(i).description]))
            .collect();
        assert_eq!(json!(shown), v["js_displayed"]["emoji"], "{name}");
        // The commitment: accepter's key over the start content.
        assert_eq!(
            crypto::commitment(accepter.ephemeral_key, &v["start_content"]).unwrap(),
            s("/accept_content/commitment"),
            "{name}"
        );
        // MACs both ways.
        let mac = MacMethod::from_wire(&s("/methods/mac")).unwrap();
        let raw_id = (s("/raw_device/user_id"), s("/raw_device/device_id"));
        let js_id = (s("/js_device/user_id"), s("/js_device/device_id"));
        let txn = s("/transaction_id");
        let check = |content: &Value, from: &(String, String), to: &(String, String), key: &str| {
            let sender = (from.0.as_str(), from.1.as_str());
            let receiver = (to.0.as_str(), to.1.as_str());
            let ids: Vec<&String> = content["mac"].as_object().unwrap().keys().collect();
            let list = ids.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",");
            assert!(
                secret.verify_mac(
                    mac,
                    &list,
                    &crypto::mac_info(sender, receiver, &txn, "KEY_IDS"),
                    content["keys"].as_str().unwrap()
                ),
                "{name} keys"
            );
            let id = format!("ed25519:{}", from.1);
            assert!(
                secret.verify_mac(
                    mac,
                    key,
                    &crypto::mac_info(sender, receiver, &txn, &id),
                    content["mac"][&id].as_str().unwrap()
                ),
                "{name} mac"
            );
        };
        check(&v["mac_from_js"]["content"], &js_id, &raw_id, &s("/js_device/ed25519"));
        check(&v["mac_from_raw"]["content"], &raw_id, &js_id, &s("/raw_device/ed25519"));
    }
}

/// Yields fixed bytes first (the recorded private key), then deterministic filler.
struct Scripted(Vec<u8>, SeededEntropy);

impl Entropy for Scripted {
    fn fill(&mut self, buf: &mut [u8]) {
        if self.0.len() >= buf.len() {
            let rest = self.0.split_off(buf.len());
            buf.copy_from_slice(&self.0);
            self.0 = rest;
        } else {
            self.1.fill(buf);
        }
    }
}

/// Our machine plays the recorded "raw" accepter against the recorded js-sdk messages and must
/// produce the very accept, key and MAC that the raw device sent.
#[test]
fn machine_replays_recorded_js_sdk_exchange() {
    let (_, v) = js_vectors().into_iter().find(|(n, _)| n.starts_with("ok-js-requests-js-starts")).unwrap();
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap().to_owned();
    let private = b64::decode32(&s("/raw_device/sas_x25519_private_key")).unwrap().to_vec();
    let own = OwnIdentity {
        user_id: s("/raw_device/user_id"),
        device_id: s("/raw_device/device_id"),
        ed25519: s("/raw_device/ed25519").parse().unwrap(),
        master_key: None,
        trusts_master_key: false,
    };
    let mut m = Machine::new(own, Config::default(), Box::new(Scripted(private, SeededEntropy::new(0))));
    let js_user = s("/js_device/user_id");
    let js_device = s("/js_device/device_id");
    let txn = s("/transaction_id");
    let now = 1_795_676_123_512;
    let mut keys = UserKeys::default();
    keys.devices.insert(js_device.clone(), s("/js_device/ed25519").parse().unwrap());
    m.update_user_keys(&js_user, keys, now);
    let ev = |ty: &str, content: Value| IncomingEvent {
        sender: js_user.clone(),
        event_type: ty.into(),
        content,
        room: None,
    };
    m.receive(
        ev(
            "m.key.verification.request",
            json!({"from_device": js_device, "methods": ["m.sas.v1"], "timestamp": now, "transaction_id": txn}),
        ),
        now,
    );
    let flow = FlowKey::ToDevice { user_id: js_user.clone(), transaction_id: txn.clone() };
    m.accept(&flow, now).unwrap();
    m.receive(ev("m.key.verification.start", v["start_content"].clone()), now);
    m.receive(
        ev("m.key.verification.key", json!({"transaction_id": txn, "key": s("/js_device/sas_x25519_public_key")})),
        now,
    );
    let mut sent = vec![];
    while let Some(o) = m.poll_outgoing() {
        sent.push(o);
    }
    let accept = sent.iter().find(|o| o.event_type == "m.key.verification.accept").unwrap().content.to_value();
    for f in [
        "commitment",
        "key_agreement_protocol",
        "hash",
        "message_authentication_code",
        "short_authentication_string",
        "transaction_id",
    ] {
        assert_eq!(accept[f], v["accept_content"][f], "{f}");
    }
    let key = sent.iter().find(|o| o.event_type == "m.key.verification.key").unwrap().content.to_value();
    assert_eq!(key["key"], v["raw_device"]["sas_x25519_public_key"]);
    let sas = std::iter::from_fn(|| m.poll_event()).find_map(|e| match e {
        Event::Sas { emoji, decimals, .. } => Some((emoji.unwrap(), decimals.unwrap())),
        _ => None,
    });
    let (emoji, decimals) = sas.expect("SAS shown");
    assert_eq!(json!(decimals), v["decimals"]);
    assert_eq!(json!(emoji.iter().map(|e| e.description).collect::<Vec<_>>()), v["emoji"]);
    m.receive(ev("m.key.verification.mac", v["mac_from_js"]["content"].clone()), now);
    m.confirm(&flow, now).unwrap();
    let mac = std::iter::from_fn(|| m.poll_outgoing()).find(|o| o.event_type == "m.key.verification.mac").unwrap();
    assert_eq!(mac.content.to_value(), v["mac_from_raw"]["content"]);
    m.receive(ev("m.key.verification.done", json!({"transaction_id": txn})), now);
    let done = std::iter::from_fn(|| m.poll_event()).find_map(|e| match e {
        Event::Done { keys, .. } => Some(keys),
        _ => None,
    });
    let keys = done.expect("verified");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].key, s("/js_device/ed25519"));
}

/// vodozemac (Matrix's reference crypto) on one side, our code on the other: same bytes, same MACs.
#[test]
fn cross_check_with_vodozemac() {
    let mut seed = SeededEntropy::new(77);
    for round in 0..50 {
        let vz = vodozemac::sas::Sas::new();
        let vz_pub = vz.public_key().to_base64();
        let mut secret = [0u8; 32];
        seed.fill(&mut secret);
        let ours = EphemeralKey::from_random(secret);
        let our_pub = ours.public_b64();
        let est = vz.diffie_hellman_with_raw(&our_pub).unwrap();
        let shared = ours.agree(&vz_pub).unwrap();
        let info = format!("MATRIX_KEY_VERIFICATION_SAS|@a:x|A|{our_pub}|@b:x|B|{vz_pub}|txn{round}");
        assert_eq!(shared.sas_bytes(&info), *est.bytes(&info).as_bytes());
        let (e, d) = (est.bytes(&info).emoji_indices(), est.bytes(&info).decimals());
        assert_eq!(crypto::emoji_indices(&shared.sas_bytes(&info)), e);
        assert_eq!(crypto::decimals(&shared.sas_bytes(&info)), [d.0, d.1, d.2]);
        let input = format!("key{round}");
        assert_eq!(
            shared.mac_encoded(MacMethod::HkdfHmacSha256V2, &input, &info),
            est.calculate_mac(&input, &info).to_base64()
        );
        assert_eq!(
            shared.mac_encoded(MacMethod::HkdfHmacSha256Legacy, &input, &info),
            est.calculate_mac_invalid_base64(&input, &info)
        );
    }
}

#[test]
fn low_order_points_are_rejected() {
    // The all-zero point and the order-8 points give a non-contributory secret (SQ-13).
    for bad in ["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"] {
        let k = EphemeralKey::from_random([7; 32]);
        assert_eq!(k.agree(bad).unwrap_err(), crypto::KeyError::NonContributory, "{bad}");
    }
    assert_eq!(EphemeralKey::from_random([7; 32]).agree("c2hvcnQ").unwrap_err(), crypto::KeyError::Malformed);
}
