//! Two devices verify each other with emoji, entirely in memory: the `loopback` network stands in
//! for the homeserver, and each person's answers are the program's.
//!
//!     cargo run -p mxverify-proto --example two_devices
//!
//! The keys come from `SeededEntropy` so that the run can be repeated; never do that for real.
use mxverify_proto::loopback::{Loopback, Side};
use mxverify_proto::*;

fn main() {
    let identity = |user: &str, device: &str, key: u8| OwnIdentity {
        user_id: user.into(),
        device_id: device.into(),
        ed25519: Ed25519PublicKey::from_bytes([key; 32]),
        master_key: None,
        trusts_master_key: false,
    };
    let alice =
        Machine::new(identity("@alice:example.org", "LAPTOP", 1), Config::default(), Box::new(SeededEntropy::new(1)));
    let bob =
        Machine::new(identity("@bob:example.org", "PHONE", 2), Config::default(), Box::new(SeededEntropy::new(2)));
    let mut net = Loopback::new(alice, bob, 1_700_000_000_000);
    net.exchange_device_keys();

    // Alice asks; Bob's device shows the request and Bob accepts; Alice starts SAS.
    let flow_a = net.a.request_to_device("@bob:example.org", &["PHONE".into()], net.now).expect("Bob has a device");
    net.run();
    let flow_b = net.flow_of(Side::B).expect("Bob's device got the request");
    net.b.accept(&flow_b, net.now).expect("a request waits for an answer");
    net.run();
    net.a.start_sas(&flow_a, net.now).expect("both are ready");
    net.run();

    // Both screens show the same emoji; each person compares and says they match.
    for (side, event) in &net.events {
        if let Event::Sas { emoji: Some(emoji), .. } = event {
            let shown: Vec<String> = emoji.iter().map(|e| format!("{} {}", e.symbol, e.description)).collect();
            println!("{side:?} sees: {}", shown.join(", "));
        }
    }
    net.a.confirm(&flow_a, net.now).expect("the SAS is shown");
    net.b.confirm(&flow_b, net.now).expect("the SAS is shown");
    net.run();
    for (side, event) in &net.events {
        if let Event::Done { user_id, device_id, keys, .. } = event {
            println!("{side:?} verified {user_id} ({device_id}): {} key(s)", keys.len());
        }
    }
    let done = net.events.iter().filter(|(_, e)| matches!(e, Event::Done { .. })).count();
    assert_eq!(done, 2, "both devices verified each other");
}
