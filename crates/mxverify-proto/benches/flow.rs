//! One complete SAS verification in process, beside the bare cryptography it cannot avoid.
//!
//! * `full_sas_verification`: two new machines, request → ready → start → accept → key → key → mac
//!   → mac → done → done, every message written as JSON text by its sender and parsed on delivery.
//! * `full_sas_verification_again`: the same flow between two machines that have verified before
//!   (a bot or bridge verifies many times over its life), including forgetting the finished flows
//!   afterwards: the steady state, without the first-use growth of a new machine's tables.
//! * `crypto_floor`: the same flow's cryptography alone — 2 X25519 key generations, 2 agreements,
//!   the commitment hash (made and checked), SAS bytes on both sides, and every MAC made and checked
//!   (device key, master key and key list, both directions).
//!
//! Run: `cargo bench -p mxverify-proto --bench flow`. Before divan's table it prints both flows'
//! ratios to the floor measured in rounds (a new pair's flow, the same pair's flow again, a floor,
//! in turn; medians of 1 000 rounds), which a change in the machine's load during the run cannot
//! skew. Memory and the cost of many flows at once
//! are in `benches/scale.rs`.

use mxverify_proto::crypto::{self, EphemeralKey, KeyAgreement, MacMethod, Party};
use mxverify_proto::loopback::Loopback;
use mxverify_proto::*;
use serde_json::json;

const NOW: u64 = 1_700_000_000_000;

fn pair(seed: u64) -> Loopback {
    Loopback::benchmark_pair(seed, NOW)
}

fn full_flow(mut net: Loopback) -> Loopback {
    net.full_sas();
    net
}

/// One more verification between the same two machines, then the clock moves on until both have
/// forgotten it (its flows' slots and timers freed).
fn again(net: &mut Loopback) {
    net.events.clear();
    net.full_sas();
    net.advance(Config::default().timeouts.flow + 1);
}

#[divan::bench]
fn full_sas_verification(bencher: divan::Bencher) {
    let mut seed = 0;
    bencher
        .with_inputs(|| {
            seed += 2;
            pair(seed)
        })
        .bench_local_values(full_flow);
}

/// The offer both sides' commitment covers (as our `start` sends it).
fn start_content() -> serde_json::Value {
    json!({"from_device":"ALICEDEVICE","method":"m.sas.v1","transaction_id":"0123456789abcdef0123456789abcdef",
        "key_agreement_protocols":["curve25519-hkdf-sha256","curve25519"],"hashes":["sha256"],
        "message_authentication_codes":["hkdf-hmac-sha256.v2","org.matrix.msc3783.hkdf-hmac-sha256","hkdf-hmac-sha256"],
        "short_authentication_string":["decimal","emoji"]})
}

/// The cryptography of one SAS verification, both sides, from two secrets.
fn floor((s, a): ([u8; 32], [u8; 32]), start: &serde_json::Value) {
    let (ks, ka) = (EphemeralKey::from_random(s), EphemeralKey::from_random(a));
    let (ps, pa) = (ks.public_b64(), ka.public_b64());
    let commitment = crypto::commitment(&pa, start).unwrap();
    assert_eq!(crypto::commitment(&pa, start).unwrap(), commitment);
    let (ss, sa) = (ks.agree(&pa).unwrap(), ka.agree(&ps).unwrap());
    let info = KeyAgreement::Curve25519HkdfSha256.sas_info(
        &Party { user_id: "@alice:example.org", device_id: "ALICEDEVICE", ephemeral_key: &ps },
        &Party { user_id: "@bob:example.org", device_id: "BOBDEVICE", ephemeral_key: &pa },
        "0123456789abcdef0123456789abcdef",
    );
    assert_eq!(ss.sas_bytes(&info), sa.sas_bytes(&info));
    // Three MACs each way (device key, master key, key list), each made and checked.
    for (mine, theirs) in [(&ss, &sa), (&sa, &ss)] {
        for item in ["ed25519:DEVICE", "ed25519:MASTERKEYMASTERKEYMASTERKEYMASTERKEYMASTE", "KEY_IDS"] {
            let info =
                crypto::mac_info(("@alice:example.org", "ALICEDEVICE"), ("@bob:example.org", "BOBDEVICE"), "txn", item);
            let mac =
                mine.mac_encoded(MacMethod::HkdfHmacSha256V2, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", &info);
            assert!(theirs.verify_mac(
                MacMethod::HkdfHmacSha256V2,
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                &info,
                &mac
            ));
        }
    }
}

fn secrets(seed: &mut SeededEntropy) -> ([u8; 32], [u8; 32]) {
    let (mut s, mut a) = ([0u8; 32], [0u8; 32]);
    seed.fill(&mut s);
    seed.fill(&mut a);
    (s, a)
}

#[divan::bench]
fn full_sas_verification_again(bencher: divan::Bencher) {
    let mut net = pair(1);
    again(&mut net);
    bencher.bench_local(|| again(&mut net));
}

#[divan::bench]
fn crypto_floor(bencher: divan::Bencher) {
    let start = start_content();
    let mut seed = SeededEntropy::new(9);
    bencher.with_inputs(|| secrets(&mut seed)).bench_local_values(|secrets| floor(secrets, &start));
}

/// The ratios, measured pairwise: a flow between new machines, one between the same two machines
/// again, and a floor, alternately, so that a change in the machine's load affects all alike
/// (divan runs one benchmark after the other).
fn paired_ratio(rounds: usize) {
    use std::time::{Duration, Instant};
    let start = start_content();
    let mut seed = SeededEntropy::new(9);
    let mut warm = pair(1);
    again(&mut warm);
    let [mut fresh, mut repeated, mut floors]: [Vec<Duration>; 3] = std::array::from_fn(|_| Vec::with_capacity(rounds));
    for i in 0..rounds as u64 {
        let (net, keys) = (pair(1_000 + 2 * i), secrets(&mut seed));
        let t = Instant::now();
        divan::black_box(full_flow(net));
        fresh.push(t.elapsed());
        let t = Instant::now();
        again(&mut warm);
        repeated.push(t.elapsed());
        let t = Instant::now();
        floor(keys, &start);
        floors.push(t.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[rounds / 2]
    };
    let (fresh, repeated, floor) = (median(&mut fresh), median(&mut repeated), median(&mut floors));
    let ratio = |d: Duration| d.as_secs_f64() / floor.as_secs_f64();
    println!(
        "paired medians over {rounds} rounds: crypto_floor {floor:.1?}; full_sas_verification {fresh:.1?}, ratio {:.3}; \
         full_sas_verification_again {repeated:.1?}, ratio {:.3}",
        ratio(fresh),
        ratio(repeated)
    );
}

fn main() {
    // Run as a test (`cargo test --benches`), a few rounds show that the measurement works.
    let testing = std::env::args().any(|a| a == "--test") || !std::env::args().any(|a| a == "--bench");
    paired_ratio(if testing { 3 } else { 1_000 });
    divan::main();
}
