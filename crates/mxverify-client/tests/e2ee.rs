//! The checks around the ciphers, without a homeserver: two devices' Olm accounts talk through
//! in-memory messages, and every rule on a decrypted payload, a room key or a room event is
//! broken once to see that the message is refused with its reason and nothing is trusted.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use mxverify_client::keys::{self, DeviceKeys};
use mxverify_client::megolm::{self, MegolmError, OlmSender, Outbound, RoomEncryption, RoomKeyOutcome};
use mxverify_client::olm::{Olm, OlmError};
use mxverify_client::store::Store;
use serde_json::{Value, json};

const ROOM: &str = "!dm:example.org";

fn temp_dir(label: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "mxverify-e2ee-{}-{label}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

struct Dev {
    user: String,
    device: String,
    store: Store,
    olm: Olm,
}

impl Dev {
    fn new(user: &str, device: &str) -> Dev {
        let mut store = Store::open(&temp_dir(device)).unwrap();
        let olm = Olm::load(&mut store, user, device, [device.len() as u8; 32]).unwrap();
        Dev { user: user.into(), device: device.into(), store, olm }
    }

    /// What another device knows of this one after `/keys/query`.
    fn keys(&self) -> DeviceKeys {
        let json = self.olm.device_keys();
        let resp = json!({"device_keys": {&self.user: {&self.device: json}}});
        keys::check_user(&resp, &self.user).devices.remove(&self.device).expect("valid device keys")
    }

    fn sender(&self) -> OlmSender {
        OlmSender {
            user_id: self.user.clone(),
            device_id: self.device.clone(),
            curve25519: self.olm.curve25519(),
            ed25519: self.olm.ed25519(),
        }
    }

    /// A one-time key of ours, as `/keys/claim` would hand it out (signed).
    fn claim(&mut self) -> Value {
        let upload = self.olm.keys_to_upload(&mut self.store, 0, Some(false)).unwrap().unwrap();
        self.olm.mark_keys_published(&mut self.store).unwrap();
        upload["one_time_keys"].as_object().unwrap().values().next().unwrap().clone()
    }
}

/// Alice with an outbound session to Bob.
fn pair() -> (Dev, Dev) {
    let mut alice = Dev::new("@alice:example.org", "ALICE");
    let mut bob = Dev::new("@bob:example.org", "BOB");
    let otk = bob.claim();
    assert!(keys::has_valid_signature(&otk, &bob.user, &bob.device, &bob.olm.ed25519()), "one-time keys are signed");
    alice.olm.create_outbound(&mut alice.store, &bob.olm.curve25519(), otk["key"].as_str().unwrap(), 1).unwrap();
    (alice, bob)
}

/// The payload Alice's client would send Bob, for the tests to break.
fn payload(alice: &Dev, bob: &Dev, event_type: &str, content: Value) -> Value {
    json!({
        "type": event_type,
        "content": content,
        "sender": alice.user,
        "recipient": bob.user,
        "recipient_keys": {"ed25519": bob.olm.ed25519()},
        "keys": {"ed25519": alice.olm.ed25519()},
    })
}

fn send(alice: &mut Dev, bob: &Dev, payload: &Value) -> Value {
    alice.olm.encrypt_payload(&mut alice.store, &bob.olm.curve25519(), payload).unwrap()
}

fn refused(r: Result<mxverify_client::olm::OlmPlaintext, OlmError>, needle: &str) {
    match r {
        Err(OlmError::BadPayload(why)) => assert!(why.contains(needle), "{why:?} should mention {needle:?}"),
        other => panic!("expected a refused payload ({needle}), got {other:?}"),
    }
}

#[test]
fn a_good_message_decrypts_and_is_attributed_to_its_device() {
    let (mut alice, mut bob) = pair();
    let content = json!({"transaction_id": "t1", "from_device": "ALICE", "methods": ["m.sas.v1"], "timestamp": 5});
    let encrypted =
        alice.olm.encrypt(&mut alice.store, &bob.user, &bob.keys(), "m.key.verification.request", &content).unwrap();
    assert_eq!(encrypted["algorithm"], "m.olm.v1.curve25519-aes-sha2");
    assert_eq!(encrypted["ciphertext"][bob.olm.curve25519()]["type"], 0, "a new session sends pre-key messages");
    let plain = bob.olm.decrypt(&mut bob.store, &alice.user, &encrypted, 10).unwrap();
    assert_eq!(plain.event_type, "m.key.verification.request");
    assert_eq!(plain.content, content);
    let alice_keys = alice.keys();
    assert_eq!(plain.attribute([&alice_keys]).unwrap().device_id, "ALICE");
    // sender_device_keys alone identify the device too (a device we never queried).
    assert_eq!(plain.attribute([]).unwrap().device_id, "ALICE");

    // Bob answers over the same session; Alice's session then switches to normal messages.
    let reply =
        bob.olm.encrypt(&mut bob.store, &alice.user, &alice.keys(), "m.key.verification.ready", &json!({})).unwrap();
    alice.olm.decrypt(&mut alice.store, &bob.user, &reply, 20).unwrap();
    let second = alice.olm.encrypt(&mut alice.store, &bob.user, &bob.keys(), "m.dummy", &json!({})).unwrap();
    assert_eq!(second["ciphertext"][bob.olm.curve25519()]["type"], 1);
    assert_eq!(bob.olm.decrypt(&mut bob.store, &alice.user, &second, 30).unwrap().event_type, "m.dummy");
}

#[test]
fn sessions_survive_a_restart() {
    let (mut alice, mut bob) = pair();
    let first = alice.olm.encrypt(&mut alice.store, &bob.user, &bob.keys(), "m.dummy", &json!({})).unwrap();
    bob.olm.decrypt(&mut bob.store, &alice.user, &first, 10).unwrap();
    // Both reload their account and sessions from the store, as after a restart.
    alice.olm = Olm::load(&mut alice.store, &alice.user, &alice.device, [5; 32]).unwrap();
    bob.olm = Olm::load(&mut bob.store, &bob.user, &bob.device, [3; 32]).unwrap();
    let second = alice.olm.encrypt(&mut alice.store, &bob.user, &bob.keys(), "m.dummy", &json!({"n": 2})).unwrap();
    assert_eq!(bob.olm.decrypt(&mut bob.store, &alice.user, &second, 20).unwrap().content["n"], 2);
}

#[test]
fn the_payload_must_name_the_real_sender() {
    let (mut alice, mut bob) = pair();
    let mut p = payload(&alice, &bob, "m.key.verification.start", json!({}));
    p["sender"] = json!("@mallory:example.org");
    let m = send(&mut alice, &bob, &p);
    refused(bob.olm.decrypt(&mut bob.store, &alice.user, &m, 1), "@mallory:example.org");
}

#[test]
fn the_payload_must_be_addressed_to_us() {
    let (mut alice, mut bob) = pair();
    let mut p = payload(&alice, &bob, "m.key.verification.start", json!({}));
    p["recipient"] = json!("@carol:example.org");
    let m = send(&mut alice, &bob, &p);
    refused(bob.olm.decrypt(&mut bob.store, &alice.user, &m, 1), "addressed to");
}

#[test]
fn the_payload_must_name_our_device_key() {
    let (mut alice, mut bob) = pair();
    let mut p = payload(&alice, &bob, "m.key.verification.start", json!({}));
    p["recipient_keys"]["ed25519"] = json!(alice.olm.ed25519());
    let m = send(&mut alice, &bob, &p);
    refused(bob.olm.decrypt(&mut bob.store, &alice.user, &m, 1), "recipient_keys");
}

#[test]
fn the_senders_ed25519_key_must_be_the_devices() {
    let (mut alice, mut bob) = pair();
    let carol = Dev::new("@alice:example.org", "CAROL");
    let mut p = payload(&alice, &bob, "m.key.verification.start", json!({}));
    p["keys"]["ed25519"] = json!(carol.olm.ed25519());
    let m = send(&mut alice, &bob, &p);
    let plain = bob.olm.decrypt(&mut bob.store, &alice.user, &m, 1).unwrap();
    match plain.attribute([&alice.keys(), &carol.keys()]) {
        Err(OlmError::BadPayload(why)) => assert!(why.contains("keys.ed25519"), "{why}"),
        other => panic!("{other:?}"),
    }
    // And a device we know nothing of cannot be attributed at all.
    let plain_unknown = {
        let mut p = payload(&alice, &bob, "m.dummy", json!({}));
        p["keys"]["ed25519"] = json!(alice.olm.ed25519());
        let m = send(&mut alice, &bob, &p);
        bob.olm.decrypt(&mut bob.store, &alice.user, &m, 2).unwrap()
    };
    assert!(plain_unknown.attribute([&carol.keys()]).is_err());
}

#[test]
fn sender_device_keys_must_match_the_session_and_be_signed() {
    let (mut alice, mut bob) = pair();
    let carol = Dev::new("@alice:example.org", "CAROL");
    // Another device's keys: the Curve25519 key is not the session's.
    let mut p = payload(&alice, &bob, "m.dummy", json!({}));
    p["sender_device_keys"] = carol.olm.device_keys();
    let m = send(&mut alice, &bob, &p);
    refused(bob.olm.decrypt(&mut bob.store, &alice.user, &m, 1), "Curve25519");
    // Our own keys with the signature broken.
    let mut p = payload(&alice, &bob, "m.dummy", json!({}));
    let mut dk = alice.olm.device_keys();
    dk["algorithms"] = json!(["m.olm.v1.curve25519-aes-sha2"]);
    p["sender_device_keys"] = dk;
    let m = send(&mut alice, &bob, &p);
    refused(bob.olm.decrypt(&mut bob.store, &alice.user, &m, 2), "self-signed");
    // Keys of another user.
    let mut p = payload(&alice, &bob, "m.dummy", json!({}));
    let mut dk = alice.olm.device_keys();
    dk["user_id"] = json!("@mallory:example.org");
    p["sender_device_keys"] = dk;
    let m = send(&mut alice, &bob, &p);
    refused(bob.olm.decrypt(&mut bob.store, &alice.user, &m, 3), "another user");
}

#[test]
fn messages_for_another_device_or_broken_ones_are_refused() {
    let (mut alice, mut bob) = pair();
    let dave = Dev::new("@bob:example.org", "DAVE");
    let m = alice.olm.encrypt(&mut alice.store, &bob.user, &bob.keys(), "m.dummy", &json!({})).unwrap();
    assert_eq!(dave_decrypt(dave, &alice.user, &m), Err(OlmError::NotForThisDevice));
    // Garbage in every field.
    for bad in [
        json!({"algorithm": "m.megolm.v1.aes-sha2"}),
        json!({"algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": "not a key"}),
        json!({"algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": alice.olm.curve25519(),
               "ciphertext": {bob.olm.curve25519(): {"type": 7, "body": "AAAA"}}}),
        json!({"algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": alice.olm.curve25519(),
               "ciphertext": {bob.olm.curve25519(): {"type": 0, "body": "!!"}}}),
        json!("not even an object"),
    ] {
        assert!(
            matches!(
                bob.olm.decrypt(&mut bob.store, &alice.user, &bad, 1),
                Err(OlmError::Malformed(_) | OlmError::NotForThisDevice)
            ),
            "{bad}"
        );
    }
    // A normal message from a device we share no session with cannot be decrypted: unwedge.
    bob.olm.decrypt(&mut bob.store, &alice.user, &m, 1).unwrap();
    let reply = bob.olm.encrypt(&mut bob.store, &alice.user, &alice.keys(), "m.dummy", &json!({})).unwrap();
    alice.olm.decrypt(&mut alice.store, &bob.user, &reply, 2).unwrap();
    let normal = alice.olm.encrypt(&mut alice.store, &bob.user, &bob.keys(), "m.dummy", &json!({})).unwrap();
    let mut stranger = Dev::new("@bob:example.org", "BOB");
    let mut to_stranger = normal.clone();
    let body = to_stranger["ciphertext"][bob.olm.curve25519()].clone();
    to_stranger["ciphertext"] = json!({stranger.olm.curve25519(): body});
    assert!(matches!(
        stranger.olm.decrypt(&mut stranger.store, &alice.user, &to_stranger, 3),
        Err(OlmError::Undecryptable { .. })
    ));
}

fn dave_decrypt(mut dave: Dev, sender: &str, m: &Value) -> Result<String, OlmError> {
    dave.olm.decrypt(&mut dave.store, sender, m, 1).map(|p| p.event_type)
}

#[test]
fn a_replayed_olm_message_does_not_decrypt_twice() {
    let (mut alice, mut bob) = pair();
    let m = alice.olm.encrypt(&mut alice.store, &bob.user, &bob.keys(), "m.key.verification.mac", &json!({})).unwrap();
    bob.olm.decrypt(&mut bob.store, &alice.user, &m, 1).unwrap();
    assert!(matches!(bob.olm.decrypt(&mut bob.store, &alice.user, &m, 2), Err(OlmError::Undecryptable { .. })));
}

#[test]
fn one_time_keys_are_topped_up_only_when_low_and_fallback_keys_replaced_when_used() {
    let mut bob = Dev::new("@bob:example.org", "BOB");
    let first = bob.olm.keys_to_upload(&mut bob.store, 0, Some(false)).unwrap().unwrap();
    assert_eq!(first["one_time_keys"].as_object().unwrap().len(), 50);
    let fallback = first["fallback_keys"].as_object().unwrap();
    assert_eq!(fallback.len(), 1);
    let fb = fallback.values().next().unwrap();
    assert_eq!(fb["fallback"], true, "the fallback flag is part of the signed object");
    assert!(keys::has_valid_signature(fb, &bob.user, &bob.device, &bob.olm.ed25519()));
    bob.olm.mark_keys_published(&mut bob.store).unwrap();
    assert_eq!(bob.olm.keys_to_upload(&mut bob.store, 50, Some(true)).unwrap(), None);
    assert_eq!(bob.olm.keys_to_upload(&mut bob.store, 30, Some(true)).unwrap(), None, "still plenty");
    let top_up = bob.olm.keys_to_upload(&mut bob.store, 10, Some(true)).unwrap().unwrap();
    assert_eq!(top_up["one_time_keys"].as_object().unwrap().len(), 40);
    assert!(top_up.get("fallback_keys").is_none());
    bob.olm.mark_keys_published(&mut bob.store).unwrap();
    let replaced = bob.olm.keys_to_upload(&mut bob.store, 50, Some(false)).unwrap().unwrap();
    assert_eq!(replaced["fallback_keys"].as_object().unwrap().len(), 1, "a used fallback key is replaced");
}

// ----- Megolm ----------------------------------------------------------------------------------

fn room_event(sender: &str, event_id: &str, content: Value) -> Value {
    json!({"sender": sender, "event_id": event_id, "type": "m.room.encrypted", "content": content, "origin_server_ts": 1})
}

/// Alice's outbound session in the room, its key accepted by Bob as coming from Alice's device.
fn megolm_pair() -> (Dev, Dev, Outbound) {
    let (alice, bob) = pair();
    let out = Outbound::create(&alice.store, &[5; 32], ROOM, &alice.sender(), 1).unwrap();
    let outcome = megolm::accept_room_key(&bob.store, &[3; 32], &alice.sender(), &out.room_key_content()).unwrap();
    assert!(matches!(outcome, RoomKeyOutcome::Stored { .. }));
    (alice, bob, out)
}

fn encrypt_in_room(alice: &Dev, out: &mut Outbound, event_type: &str, content: &Value) -> Value {
    out.encrypt(&alice.store, &[5; 32], &alice.sender(), event_type, content).unwrap()
}

#[test]
fn room_events_decrypt_with_the_relation_in_the_clear() {
    let (alice, bob, mut out) = megolm_pair();
    let content = json!({"from_device": "ALICE", "methods": ["m.sas.v1"],
                         "m.relates_to": {"rel_type": "m.reference", "event_id": "$req"}});
    let wire = encrypt_in_room(&alice, &mut out, "m.key.verification.ready", &content);
    assert_eq!(wire["m.relates_to"]["event_id"], "$req", "the relation is also in the cleartext");
    assert!(wire["ciphertext"].is_string() && wire["session_id"] == out.session_id());
    let d =
        megolm::decrypt_room_event(&bob.store, &[3; 32], ROOM, &room_event(&alice.user, "$1", wire.clone())).unwrap();
    assert_eq!(d.event_type, "m.key.verification.ready");
    assert_eq!(d.content, content);
    assert_eq!(d.relates_to.unwrap()["event_id"], "$req");
    assert_eq!(d.sender_device, "ALICE");
    // The same event decrypted again (a restart, a retried sync) is not a replay.
    megolm::decrypt_room_event(&bob.store, &[3; 32], ROOM, &room_event(&alice.user, "$1", wire)).unwrap();
}

#[test]
fn a_replayed_message_index_is_refused() {
    let (alice, bob, mut out) = megolm_pair();
    let wire = encrypt_in_room(&alice, &mut out, "m.key.verification.done", &json!({}));
    megolm::decrypt_room_event(&bob.store, &[3; 32], ROOM, &room_event(&alice.user, "$first", wire.clone())).unwrap();
    match megolm::decrypt_room_event(&bob.store, &[3; 32], ROOM, &room_event(&alice.user, "$again", wire)) {
        Err(MegolmError::Refused(why)) => assert!(why.contains("replay") && why.contains("$first"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_event_from_another_sender_or_for_another_room_is_refused() {
    let (alice, bob, mut out) = megolm_pair();
    let wire = encrypt_in_room(&alice, &mut out, "m.key.verification.start", &json!({}));
    match megolm::decrypt_room_event(&bob.store, &[3; 32], ROOM, &room_event("@mallory:example.org", "$1", wire)) {
        Err(MegolmError::Refused(why)) => assert!(why.contains("belongs to device ALICE"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The server moved an event of another room here: the plaintext names the other room.
    let other_room = Outbound::create(&alice.store, &[5; 32], "!other:example.org", &alice.sender(), 1).unwrap();
    let mut key = other_room.room_key_content();
    key["room_id"] = json!(ROOM); // Alice's key, delivered for our room
    megolm::accept_room_key(&bob.store, &[3; 32], &alice.sender(), &key).unwrap();
    let mut other_room = other_room;
    let wire = encrypt_in_room(&alice, &mut other_room, "m.key.verification.start", &json!({}));
    match megolm::decrypt_room_event(&bob.store, &[3; 32], ROOM, &room_event(&alice.user, "$2", wire)) {
        Err(MegolmError::Refused(why)) => assert!(why.contains("!other:example.org"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_room_key_from_another_devices_session_is_refused() {
    let (alice, bob, out) = megolm_pair();
    let mallory = Dev::new("@mallory:example.org", "MALLORY");
    // Mallory forwards Alice's session key over her own Olm session: it stays bound to Alice.
    match megolm::accept_room_key(&bob.store, &[3; 32], &mallory.sender(), &out.room_key_content()) {
        Err(MegolmError::Refused(why)) => assert!(why.contains("already came from device ALICE"), "{why}"),
        other => panic!("{other:?}"),
    }
    // A key for a session Bob has not seen, delivered by Mallory, is bound to Mallory: Alice's
    // events that use it are refused.
    let mut alice_second = Outbound::create(&alice.store, &[5; 32], ROOM, &alice.sender(), 2).unwrap();
    megolm::accept_room_key(&bob.store, &[3; 32], &mallory.sender(), &alice_second.room_key_content()).unwrap();
    let wire = encrypt_in_room(&alice, &mut alice_second, "m.key.verification.start", &json!({}));
    match megolm::decrypt_room_event(&bob.store, &[3; 32], ROOM, &room_event(&alice.user, "$3", wire)) {
        Err(MegolmError::Refused(why)) => assert!(why.contains("MALLORY"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_room_key_whose_session_id_lies_or_whose_key_is_broken_is_refused() {
    let (alice, bob, _) = megolm_pair();
    let out = Outbound::create(&alice.store, &[5; 32], ROOM, &alice.sender(), 1).unwrap();
    let mut key = out.room_key_content();
    key["session_id"] = json!("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert!(matches!(
        megolm::accept_room_key(&bob.store, &[3; 32], &alice.sender(), &key),
        Err(MegolmError::Refused(_))
    ));
    let mut key = out.room_key_content();
    let mut raw = mxverify_proto::b64::decode(key["session_key"].as_str().unwrap()).unwrap();
    raw[10] ^= 1; // the signature no longer matches
    key["session_key"] = json!(mxverify_proto::b64::encode(raw));
    assert!(matches!(
        megolm::accept_room_key(&bob.store, &[3; 32], &alice.sender(), &key),
        Err(MegolmError::Malformed(_))
    ));
    key["algorithm"] = json!("m.olm.v1.curve25519-aes-sha2");
    assert!(matches!(
        megolm::accept_room_key(&bob.store, &[3; 32], &alice.sender(), &key),
        Err(MegolmError::Malformed(_))
    ));
}

#[test]
fn an_event_before_its_key_waits_and_a_tampered_one_is_refused() {
    let (alice, bob) = pair();
    let mut out = Outbound::create(&alice.store, &[5; 32], ROOM, &alice.sender(), 1).unwrap();
    let wire = encrypt_in_room(&alice, &mut out, "m.room.message", &json!({"msgtype": "m.key.verification.request"}));
    let early = megolm::decrypt_room_event(&bob.store, &[3; 32], ROOM, &room_event(&alice.user, "$1", wire.clone()));
    assert!(early.as_ref().is_err_and(MegolmError::is_waiting_for_key), "{early:?}");
    // A copy of the key that starts after the message cannot decrypt it: the event still waits.
    megolm::accept_room_key(&bob.store, &[3; 32], &alice.sender(), &out.room_key_content()).unwrap();
    let still = megolm::decrypt_room_event(&bob.store, &[3; 32], ROOM, &room_event(&alice.user, "$1", wire));
    assert!(matches!(still, Err(MegolmError::UnknownIndex { first_known: 1, index: 0 })), "{still:?}");
    let fresh = Outbound::create(&alice.store, &[5; 32], "!fresh:example.org", &alice.sender(), 1).unwrap();
    let mut fresh = fresh;
    let key = fresh.room_key_content();
    let wire = encrypt_in_room(&alice, &mut fresh, "m.room.message", &json!({"msgtype": "m.text"}));
    let room = "!fresh:example.org";
    assert!(
        megolm::decrypt_room_event(&bob.store, &[3; 32], room, &room_event(&alice.user, "$2", wire.clone()))
            .is_err_and(|e| e.is_waiting_for_key())
    );
    megolm::accept_room_key(&bob.store, &[3; 32], &alice.sender(), &key).unwrap();
    megolm::decrypt_room_event(&bob.store, &[3; 32], room, &room_event(&alice.user, "$2", wire.clone())).unwrap();
    let mut tampered = wire;
    let mut raw = mxverify_proto::b64::decode(tampered["ciphertext"].as_str().unwrap()).unwrap();
    raw[12] ^= 0x40;
    tampered["ciphertext"] = json!(mxverify_proto::b64::encode(raw));
    assert!(matches!(
        megolm::decrypt_room_event(&bob.store, &[3; 32], room, &room_event(&alice.user, "$3", tampered)),
        Err(MegolmError::Refused(_) | MegolmError::Malformed(_))
    ));
}

#[test]
fn outbound_sessions_rotate_by_age_count_and_departure() {
    let alice = Dev::new("@alice:example.org", "ALICE");
    let settings =
        RoomEncryption::from_content(&json!({"algorithm": "m.megolm.v1.aes-sha2", "rotation_period_msgs": 2})).unwrap();
    assert_eq!(settings.rotation_period_ms, 604_800_000, "the spec's default");
    let mut out = Outbound::create(&alice.store, &[5; 32], ROOM, &alice.sender(), 1_000).unwrap();
    let bob_dev = megolm::recipient_id("@bob:example.org", "BOB", "curve");
    let recipients: BTreeSet<String> = [bob_dev.clone()].into();
    assert_eq!(out.missing(&recipients), vec![&bob_dev]);
    out.mark_shared(&alice.store, [bob_dev.clone()]).unwrap();
    assert!(out.missing(&recipients).is_empty());
    assert_eq!(out.rotation_reason(&settings, 2_000, &recipients), None);
    assert!(out.rotation_reason(&settings, 1_000 + 604_800_000, &recipients).is_some(), "a week old");
    assert!(out.rotation_reason(&settings, 2_000, &BTreeSet::new()).unwrap().contains("@bob:example.org"), "Bob left");
    encrypt_in_room(&alice, &mut out, "m.dummy", &json!({}));
    encrypt_in_room(&alice, &mut out, "m.dummy", &json!({}));
    assert!(out.rotation_reason(&settings, 2_000, &recipients).unwrap().contains("2 messages"));
    // The state survives a reload (a restart): same session, same count.
    let again = Outbound::load(&alice.store, &[5; 32], ROOM).unwrap().unwrap();
    assert_eq!(again.session_id(), out.session_id());
    assert!(again.rotation_reason(&settings, 2_000, &recipients).is_some());
    // Hostile settings are brought into range.
    let odd = RoomEncryption::from_content(
        &json!({"algorithm": "m.megolm.v1.aes-sha2", "rotation_period_ms": 1, "rotation_period_msgs": 0}),
    )
    .unwrap();
    assert_eq!((odd.rotation_period_ms, odd.rotation_period_msgs), (3_600_000, 1));
    assert_eq!(RoomEncryption::from_content(&json!({"algorithm": "m.olm.v1.curve25519-aes-sha2"})), None);
}
