//! One complete to-device SAS verification in process, mxverify-proto against matrix-sdk-crypto, in
//! one run (see README.md beside this folder).
//!
//! * `mxverify_full_sas`: the flow of `crates/mxverify-proto/benches/flow.rs`'s
//!   `full_sas_verification`: two machines, request → ready → start → accept → key → key → mac →
//!   mac → done → done, every message written as JSON text by its sender and parsed on delivery.
//! * `sdk_crypto_full_sas`: the same ten messages between two `OlmMachine`s (in-memory store) that
//!   already know each other's device and cross-signing keys; each to-device message goes over the
//!   wire as the JSON text of a to-device event and comes in through `receive_sync_changes`, as in a
//!   sync.
//!
//! Set-up (machines, key exchange) is excluded from the timings in both; so is dropping the result.
//!
//! Run: `scripts/compare-bench` (or `cargo bench` in this folder). Before the timings, it prints
//! the event types each flow put on the wire, once.

use std::collections::{BTreeMap, VecDeque};

use matrix_sdk_crypto::types::requests::{
    AnyIncomingResponse, AnyOutgoingRequest, KeysQueryRequest, OutgoingRequest, OutgoingVerificationRequest,
    ToDeviceRequest, UploadSigningKeysRequest,
};
use matrix_sdk_crypto::{DecryptionSettings, EncryptionSyncChanges, OlmMachine, TrustRequirement};
use mxverify_proto::loopback::Loopback;
use ruma::api::client::keys::{get_keys, upload_keys, upload_signatures, upload_signing_keys};
use ruma::api::client::sync::sync_events::DeviceLists;
use ruma::api::client::to_device::send_event_to_device;
use ruma::events::AnyToDeviceEvent;
use ruma::serde::Raw;
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId, TransactionId, UInt, UserId, device_id, user_id};
use serde_json::Value;
use serde_json::value::RawValue;

fn main() {
    print_wire_once();
    divan::main();
}

// ------------------------------------------------------------------------------------------------
// mxverify-proto: the same set-up and flow as `full_sas_verification` in the crate's own bench.

const NOW: u64 = 1_700_000_000_000;

/// The pair and the flow of `full_sas_verification` in `crates/mxverify-proto/benches/flow.rs`
/// (one place for both: `Loopback::benchmark_pair` and `Loopback::full_sas`).
fn pair(seed: u64) -> Loopback {
    Loopback::benchmark_pair(seed, NOW)
}

fn full_flow(mut net: Loopback) -> Loopback {
    net.full_sas();
    net
}

#[divan::bench]
fn mxverify_full_sas(bencher: divan::Bencher) {
    let mut seed = 0;
    bencher
        .with_inputs(|| {
            seed += 2;
            pair(seed)
        })
        .bench_local_values(full_flow);
}

// ------------------------------------------------------------------------------------------------
// matrix-sdk-crypto: set-up against a stand-in for the homeserver's key endpoints.

/// What the homeserver's key endpoints hold: the device keys from `/keys/upload`, the cross-signing
/// keys from `/keys/device_signing/upload` and the signatures from `/keys/signatures/upload`,
/// served back by `/keys/query`.
#[derive(Default)]
struct KeyServer {
    devices: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Value>>,
    master: BTreeMap<OwnedUserId, Value>,
    self_signing: BTreeMap<OwnedUserId, Value>,
    user_signing: BTreeMap<OwnedUserId, Value>,
}

fn raw<T>(value: &Value) -> Raw<T> {
    Raw::from_json(serde_json::value::to_raw_value(value).unwrap())
}

impl KeyServer {
    /// `POST /keys/upload`.
    fn upload_keys(&mut self, user: &UserId, req: &upload_keys::v3::Request) -> upload_keys::v3::Response {
        if let Some(keys) = &req.device_keys {
            let keys: Value = serde_json::from_str(keys.json().get()).unwrap();
            let device: OwnedDeviceId = keys["device_id"].as_str().unwrap().into();
            self.devices.entry(user.to_owned()).or_default().insert(device, keys);
        }
        let count = UInt::new(req.one_time_keys.len() as u64).unwrap();
        upload_keys::v3::Response::new(BTreeMap::from([(OneTimeKeyAlgorithm::SignedCurve25519, count)]))
    }

    /// `POST /keys/device_signing/upload`.
    fn upload_signing_keys(&mut self, user: &UserId, req: &UploadSigningKeysRequest) {
        let slots = [
            (&mut self.master, &req.master_key),
            (&mut self.self_signing, &req.self_signing_key),
            (&mut self.user_signing, &req.user_signing_key),
        ];
        for (slot, key) in slots {
            if let Some(key) = key {
                slot.insert(user.to_owned(), serde_json::to_value(key).unwrap());
            }
        }
    }

    /// `POST /keys/signatures/upload`: each signed object's signatures join the stored key's.
    fn upload_signatures(&mut self, req: &upload_signatures::v3::Request) {
        let signed: BTreeMap<String, BTreeMap<String, Value>> =
            serde_json::from_value(serde_json::to_value(&req.signed_keys).unwrap()).unwrap();
        for (user, keys) in signed {
            let user: OwnedUserId = user.try_into().unwrap();
            for (key_id, object) in keys {
                // A device is named by its ID, a cross-signing key by its public key.
                let stored = match self.devices.get_mut(&user).and_then(|d| d.get_mut(key_id.as_str())) {
                    Some(device) => device,
                    None => [&mut self.master, &mut self.self_signing, &mut self.user_signing]
                        .into_iter()
                        .filter_map(|slot| slot.get_mut(&user))
                        .find(|key| key["keys"].as_object().unwrap().values().any(|k| *k == key_id.as_str()))
                        .expect("a signature for a key the server does not have"),
                };
                let into = stored["signatures"].as_object_mut().expect("a signatures object");
                for (signer, sigs) in object["signatures"].as_object().unwrap() {
                    let signer = into.entry(signer.clone()).or_insert_with(|| Value::Object(Default::default()));
                    signer.as_object_mut().unwrap().extend(sigs.as_object().unwrap().clone());
                }
            }
        }
    }

    /// `POST /keys/query`: every device and the cross-signing keys of the users asked for (the
    /// user-signing key only to its owner).
    fn query_keys(&self, requester: &UserId, req: &KeysQueryRequest) -> get_keys::v3::Response {
        let mut resp = get_keys::v3::Response::new();
        for user in req.device_keys.keys() {
            if let Some(devices) = self.devices.get(user) {
                resp.device_keys.insert(user.clone(), devices.iter().map(|(d, k)| (d.clone(), raw(k))).collect());
            }
            if let Some(key) = self.master.get(user) {
                resp.master_keys.insert(user.clone(), raw(key));
            }
            if let Some(key) = self.self_signing.get(user) {
                resp.self_signing_keys.insert(user.clone(), raw(key));
            }
            if let Some(key) = self.user_signing.get(user).filter(|_| user == requester) {
                resp.user_signing_keys.insert(user.clone(), raw(key));
            }
        }
        resp
    }

    /// Answers a key upload or key query and hands the answer to the machine.
    async fn serve(&mut self, machine: &OlmMachine, request: &OutgoingRequest) {
        let id = request.request_id();
        match request.request() {
            AnyOutgoingRequest::KeysUpload(req) => {
                let resp = self.upload_keys(machine.user_id(), req);
                machine.mark_request_as_sent(id, &resp).await.unwrap();
            }
            AnyOutgoingRequest::KeysQuery(req) => {
                let resp = self.query_keys(machine.user_id(), req);
                machine.mark_request_as_sent(id, &resp).await.unwrap();
            }
            other => panic!("unexpected request during set-up: {other:?}"),
        }
    }
}

/// Two machines with cross-signing set up, each knowing the other's devices and cross-signing
/// keys, with nothing left to send.
async fn sdk_pair() -> (OlmMachine, OlmMachine) {
    let alice = OlmMachine::new(user_id!("@alice:example.org"), device_id!("ALICEDEVICE")).await;
    let bob = OlmMachine::new(user_id!("@bob:example.org"), device_id!("BOBDEVICE")).await;
    let mut server = KeyServer::default();
    for m in [&alice, &bob] {
        let boot = m.bootstrap_cross_signing(false).await.unwrap();
        if let Some(req) = &boot.upload_keys_req {
            server.serve(m, req).await;
        }
        server.upload_signing_keys(m.user_id(), &boot.upload_signing_keys_req);
        let uploaded = upload_signing_keys::v3::Response::new();
        m.mark_request_as_sent(&TransactionId::new(), AnyIncomingResponse::SigningKeysUpload(&uploaded)).await.unwrap();
        server.upload_signatures(&boot.upload_signatures_req);
        m.mark_request_as_sent(&TransactionId::new(), &upload_signatures::v3::Response::new()).await.unwrap();
    }
    alice.update_tracked_users([bob.user_id()]).await.unwrap();
    bob.update_tracked_users([alice.user_id()]).await.unwrap();
    for m in [&alice, &bob] {
        for _ in 0..4 {
            let requests = m.outgoing_requests().await.unwrap();
            if requests.is_empty() {
                break;
            }
            for req in &requests {
                server.serve(m, req).await;
            }
        }
        assert!(m.outgoing_requests().await.unwrap().is_empty(), "set-up left requests to send");
    }
    (alice, bob)
}

// ------------------------------------------------------------------------------------------------
// matrix-sdk-crypto: the wire and the flow.

/// A to-device event as a sync carries it.
#[derive(serde::Serialize)]
struct WireEvent<'a> {
    sender: &'a UserId,
    #[serde(rename = "type")]
    event_type: &'a str,
    content: &'a RawValue,
}

/// Messages sent and not yet delivered (recipient, to-device event as JSON text), oldest first;
/// like `Loopback`'s, the log of every message sent is kept only when asked for (not in the
/// timings).
#[derive(Default)]
struct Wire {
    queue: VecDeque<(OwnedUserId, String)>,
    keep_log: bool,
    log: Vec<String>,
    signature_uploads: usize,
}

impl Wire {
    /// `PUT /sendToDevice`: each message goes on the wire as the JSON text of the event the
    /// recipient's sync will carry.
    fn put(&mut self, from: &OlmMachine, req: &ToDeviceRequest) {
        let event_type = req.event_type.to_string();
        for (user, devices) in &req.messages {
            for content in devices.values() {
                let event = WireEvent { sender: from.user_id(), event_type: &event_type, content: content.json() };
                let text = serde_json::to_string(&event).unwrap();
                if self.keep_log {
                    self.log.push(text.clone());
                }
                self.queue.push_back((user.clone(), text));
            }
        }
    }

    /// Sends a request an API call returned; like matrix-sdk's client, these are sent and not
    /// reported back.
    fn send(&mut self, from: &OlmMachine, req: OutgoingVerificationRequest) {
        match req {
            OutgoingVerificationRequest::ToDevice(req) => self.put(from, &req),
            OutgoingVerificationRequest::InRoom(_) => unreachable!("to-device flow"),
        }
    }

    /// Sends what the machine queued itself, and reports each as sent (`mark_request_as_sent`).
    async fn flush(&mut self, m: &OlmMachine) {
        for req in m.outgoing_requests().await.unwrap() {
            match req.request() {
                AnyOutgoingRequest::ToDeviceRequest(r) => {
                    self.put(m, r);
                    m.mark_request_as_sent(req.request_id(), &send_event_to_device::v3::Response::new()).await.unwrap();
                }
                AnyOutgoingRequest::SignatureUpload(_) => {
                    self.signature_uploads += 1;
                    m.mark_request_as_sent(req.request_id(), &upload_signatures::v3::Response::new()).await.unwrap();
                }
                other => panic!("unexpected request during the flow: {other:?}"),
            }
        }
    }

    /// Delivers everything, oldest first, one event per sync, until both machines are quiet.
    async fn run(&mut self, alice: &OlmMachine, bob: &OlmMachine) {
        let settings = DecryptionSettings { sender_device_trust_requirement: TrustRequirement::Untrusted };
        let (changed_devices, one_time_keys_counts) = (DeviceLists::new(), BTreeMap::new());
        loop {
            self.flush(alice).await;
            self.flush(bob).await;
            let Some((to, text)) = self.queue.pop_front() else { break };
            let m = if to == alice.user_id() { alice } else { bob };
            let event: Raw<AnyToDeviceEvent> = serde_json::from_str(&text).unwrap();
            let changes = EncryptionSyncChanges {
                to_device_events: vec![event],
                changed_devices: &changed_devices,
                one_time_keys_counts: &one_time_keys_counts,
                unused_fallback_keys: None,
                next_batch_token: None,
            };
            m.receive_sync_changes(changes, &settings).await.unwrap();
        }
    }
}

async fn sdk_flow(alice: OlmMachine, bob: OlmMachine, keep_log: bool) -> (OlmMachine, OlmMachine, Wire) {
    let mut wire = Wire { keep_log, ..Wire::default() };
    let device = alice.get_device(bob.user_id(), bob.device_id(), None).await.unwrap().expect("bob's device");
    let (request_a, out) = device.request_verification();
    wire.send(&alice, out);
    wire.run(&alice, &bob).await;
    let request_b = bob.get_verification_requests(alice.user_id()).pop().expect("the request reached bob");
    wire.send(&bob, request_b.accept().expect("ready"));
    wire.run(&alice, &bob).await;
    let (sas_a, out) = request_a.start_sas().await.unwrap().expect("start");
    wire.send(&alice, out);
    wire.run(&alice, &bob).await;
    let sas_b = bob.get_verification(alice.user_id(), request_b.flow_id().as_str()).and_then(|v| v.sas_v1()).unwrap();
    // Only the side that did not start has anything to accept.
    for (m, sas) in [(&alice, &sas_a), (&bob, &*sas_b)] {
        if let Some(out) = sas.accept() {
            wire.send(m, out);
        }
    }
    wire.run(&alice, &bob).await;
    for (m, sas) in [(&alice, &sas_a), (&bob, &*sas_b)] {
        let (outs, signatures) = sas.confirm().await.unwrap();
        // Uploading the cross-signing signature is the client's business; its content is ready.
        wire.signature_uploads += usize::from(signatures.is_some());
        for out in outs {
            wire.send(m, out);
        }
    }
    wire.run(&alice, &bob).await;
    assert!(sas_a.is_done() && sas_b.is_done() && request_a.is_done() && request_b.is_done());
    (alice, bob, wire)
}

#[divan::bench]
fn sdk_crypto_full_sas(bencher: divan::Bencher) {
    let rt = runtime();
    bencher
        .with_inputs(|| rt.block_on(sdk_pair()))
        .bench_local_values(|(alice, bob)| rt.block_on(sdk_flow(alice, bob, false)));
}

/// matrix-sdk-crypto spawns tasks (when it handles a key query response), on tokio.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().unwrap()
}

/// Runs each flow once, outside the timings, and prints what it put on the wire and what the MACs
/// covered.
fn print_wire_once() {
    let mut net = pair(1);
    net.keep_log = true;
    let net = full_flow(net);
    let ours: Vec<(&str, Value)> = net.log.iter().map(|m| (m.out.event_type, m.out.content.to_value())).collect();
    let ours: Vec<(&str, &Value)> = ours.iter().map(|(t, c)| (*t, c)).collect();
    let rt = runtime();
    let (alice, bob, wire) = rt.block_on(async {
        let (alice, bob) = sdk_pair().await;
        sdk_flow(alice, bob, true).await
    });
    let sdk: Vec<Value> = wire.log.iter().map(|text| serde_json::from_str(text).unwrap()).collect();
    let sdk: Vec<(&str, &Value)> = sdk.iter().map(|e| (e["type"].as_str().unwrap(), &e["content"])).collect();
    for (name, log) in [("mxverify", &ours), ("sdk-crypto", &sdk)] {
        let types: Vec<&str> = log.iter().map(|(t, _)| t.trim_start_matches("m.key.verification.")).collect();
        println!("{name}: {} messages: {}", log.len(), types.join(" "));
        for (_, content) in log.iter().filter(|(t, _)| *t == "m.key.verification.mac") {
            let keys: Vec<&str> = content["mac"].as_object().unwrap().keys().map(|k| k.as_str()).collect();
            println!("{name}: mac over {} keys: {}", keys.len(), keys.join(", "));
        }
    }
    let trust = rt.block_on(async {
        let bob_dev = alice.get_device(bob.user_id(), bob.device_id(), None).await.unwrap().unwrap();
        let alice_dev = bob.get_device(alice.user_id(), alice.device_id(), None).await.unwrap().unwrap();
        [bob_dev.is_locally_trusted(), alice_dev.is_locally_trusted()]
    });
    println!(
        "sdk-crypto: devices locally trusted afterwards (bob's by alice, alice's by bob): {trust:?}; \
         signature uploads made: {}",
        wire.signature_uploads
    );
}
