//! Plugging the machine into your own Matrix client: the machine never does I/O, so your code
//! sends what it asks (`poll_outgoing`), gives it what `/sync` brings (`receive`), and calls it back
//! at `next_deadline`. Here each device runs on its own thread, and the "homeserver" is a channel
//! carrying the JSON of `PUT /sendToDevice` bodies and `/sync` to-device events, as a real
//! transport would.
//!
//!     cargo run -p mxverify-proto --example custom_transport
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mxverify_proto::*;
use serde_json::{Value, json};

fn now() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis() as Millis
}

/// What a `/sync` response would carry for us: a to-device event, as JSON text.
type Wire = String;

/// One device: its machine, its side of the "homeserver", and the other device's keys.
struct Client {
    user: &'static str,
    machine: Machine,
    to_server: Sender<Wire>,
    from_server: Receiver<Wire>,
}

impl Client {
    /// Sends everything the machine wants sent: a to-device message per target device. A real
    /// client would `PUT /sendToDevice/{event_type}/{txn}` with this body.
    fn send(&mut self) {
        while let Some(out) = self.machine.poll_outgoing() {
            if let Destination::ToDevice { .. } = &out.destination {
                let event = json!({"sender": self.user, "type": out.event_type, "content": out.content});
                self.to_server.send(event.to_string()).expect("the other device is there");
            }
        }
    }

    /// Runs until `until` says the machine's event ends the run; returns that event.
    fn run(&mut self, mut until: impl FnMut(&mut Machine, &Event) -> bool) -> Event {
        loop {
            self.send();
            while let Some(event) = self.machine.poll_event() {
                if until(&mut self.machine, &event) {
                    self.send();
                    return event;
                }
                self.send();
            }
            // Wait for the next message, but never past the machine's next deadline.
            let wait = self.machine.next_deadline().map_or(1_000, |d| d.saturating_sub(now()));
            match self.from_server.recv_timeout(Duration::from_millis(wait)) {
                Ok(text) => {
                    let v: Value = serde_json::from_str(&text).expect("JSON from the server");
                    let event = IncomingEvent {
                        sender: v["sender"].as_str().unwrap_or_default().into(),
                        event_type: v["type"].as_str().unwrap_or_default().into(),
                        content: v["content"].clone(),
                        room: None,
                    };
                    self.machine.receive(event, now());
                }
                Err(_) => self.machine.handle_timeout(now()),
            }
        }
    }
}

/// Randomness from the operating system: every key and secret of a verification comes from it.
struct OsRandom;

impl Entropy for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) {
        getrandom::fill(buf).expect("the operating system's random number generator");
    }
}

fn device(user: &'static str, device: &str, key: u8, wire: (Sender<Wire>, Receiver<Wire>)) -> Client {
    let own = OwnIdentity {
        user_id: user.into(),
        device_id: device.into(),
        ed25519: Ed25519PublicKey::from_bytes([key; 32]),
        master_key: None,
        trusts_master_key: false,
    };
    let mut machine = Machine::new(own, Config::default(), Box::new(OsRandom));
    // The keys a real client fetches with /keys/query and checks before giving them here.
    let (other_user, other_device, other_key) = if user == "@alice:example.org" {
        ("@bob:example.org", "PHONE", 2)
    } else {
        ("@alice:example.org", "LAPTOP", 1)
    };
    let keys = UserKeys {
        devices: [(other_device.to_owned(), Ed25519PublicKey::from_bytes([other_key; 32]))].into(),
        master_key: None,
        other_cross_signing_keys: Vec::new(),
    };
    machine.update_user_keys(other_user, keys, now());
    Client { user, machine, to_server: wire.0, from_server: wire.1 }
}

fn main() {
    let (a_to_b, b_inbox) = channel();
    let (b_to_a, a_inbox) = channel();
    let mut alice = device("@alice:example.org", "LAPTOP", 1, (a_to_b, a_inbox));
    let mut bob = device("@bob:example.org", "PHONE", 2, (b_to_a, b_inbox));

    let bob_thread = thread::spawn(move || {
        // Bob accepts the request and confirms the emoji (a person would compare them first).
        bob.run(|m, event| match event {
            Event::IncomingRequest { flow, .. } => m.accept(flow, now()).is_err(),
            Event::Sas { flow, .. } => m.confirm(flow, now()).is_err(),
            Event::Done { .. } | Event::Cancelled { .. } => true,
            _ => false,
        })
    });
    let flow = alice.machine.request_to_device("@bob:example.org", &["PHONE".into()], now()).expect("Bob has a device");
    let ended = alice.run(|m, event| match event {
        Event::Ready { .. } => m.start_sas(&flow, now()).is_err(),
        Event::Sas { emoji: Some(emoji), .. } => {
            let shown: Vec<&str> = emoji.iter().map(|e| e.symbol).collect();
            println!("Alice compares: {}", shown.join(" "));
            m.confirm(&flow, now()).is_err()
        }
        Event::Done { .. } | Event::Cancelled { .. } => true,
        _ => false,
    });
    let bob_ended = bob_thread.join().expect("Bob's thread");
    for (who, event) in [("Alice", &ended), ("Bob", &bob_ended)] {
        match event {
            Event::Done { user_id, device_id, .. } => println!("{who} verified {user_id} ({device_id})"),
            other => panic!("{who}'s verification did not end well: {other:?}"),
        }
    }
}
