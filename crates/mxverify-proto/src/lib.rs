#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
//! Sans-IO Matrix key verification: the `m.key.verification.*` framework (request, ready, start,
//! accept, key, mac, done, cancel), SAS (`m.sas.v1`, emoji and decimal) and QR codes
//! (`m.qr_code.show.v1`, `m.qr_code.scan.v1`, `m.reciprocate.v1`), as specified in
//! [Matrix v1.19, key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
//!
//! The crate does no I/O, reads no clock and has no random number generator of its own. A
//! [`Machine`] holds every verification flow of one device. The caller feeds it what happens —
//! events from `/sync` ([`Machine::receive`]), the user's decisions ([`Machine::accept`],
//! [`Machine::start_sas`], [`Machine::scan_qr`], [`Machine::confirm`], [`Machine::mismatch`],
//! [`Machine::cancel`]), the keys it fetched and checked ([`Machine::update_user_keys`]) and the
//! time ([`Machine::handle_timeout`]) — and drains what the machine wants: events for the user
//! ([`Machine::poll_event`]) and messages to send ([`Machine::poll_outgoing`]), **events first**:
//! a client that keeps trust records persists one on [`Event::DoneSent`] before the `done`
//! queued with it goes out. [`Machine::next_deadline`] says when to call back.
//! [`Machine::flow`] shows where a flow is ([`FlowPhase`]) and what the user may do now
//! ([`Action`]).
//!
//! Modules: [`wire`] (one message model for both transports), [`cancel`] (codes and causes),
//! [`crypto`] (SAS maths), [`qr`] (the QR payload codec), [`keys`] (typed public keys),
//! [`emoji`] (the spec's emoji table and its translations), [`types`] (the machine's inputs and
//! outputs), [`b64`] and [`canonical`] (the spec's encodings). With the `loopback` feature,
//! `loopback` wires two machines together in memory; with `seeded-entropy`, `SeededEntropy`
//! makes runs reproducible (tests and demos only).
//!
//! A complete SAS verification between two machines, with a stand-in for the homeserver:
//!
//! ```
//! use mxverify_proto::*;
//!
//! /// Bytes for this example only: a real client gives the machine its OS's secure random source.
//! struct ExampleEntropy(u8);
//! impl Entropy for ExampleEntropy {
//!     fn fill(&mut self, buf: &mut [u8]) {
//!         for b in buf {
//!             self.0 = self.0.wrapping_mul(167).wrapping_add(13);
//!             *b = self.0;
//!         }
//!     }
//! }
//!
//! let now = 1_700_000_000_000;
//! let key = |b: u8| Ed25519PublicKey::from_bytes([b; 32]);
//! let device = |user: &str, device: &str, k: u8| OwnIdentity {
//!     user_id: user.into(),
//!     device_id: device.into(),
//!     ed25519: key(k),
//!     master_key: None,
//!     trusts_master_key: false,
//! };
//! let (a, b) = ("@alice:example.org", "@bob:example.org");
//! let mut alice = Machine::new(device(a, "ALICE", 1), Config::default(), Box::new(ExampleEntropy(1)));
//! let mut bob = Machine::new(device(b, "BOB", 2), Config::default(), Box::new(ExampleEntropy(2)));
//! // Each knows the other's device key (a client fetches it with /keys/query and checks it).
//! let keys = |d: &str, k: u8| UserKeys { devices: [(d.to_owned(), key(k))].into(), ..UserKeys::default() };
//! alice.update_user_keys(b, keys("BOB", 2), now);
//! bob.update_user_keys(a, keys("ALICE", 1), now);
//!
//! // The homeserver: each side's to-device messages reach the other; the events of both sides
//! // are returned (a client handles events before it sends the messages queued with them).
//! fn exchange(alice: &mut Machine, bob: &mut Machine, now: u64) -> Vec<Event> {
//!     let mut events = Vec::new();
//!     loop {
//!         events.extend(std::iter::from_fn(|| alice.poll_event()));
//!         events.extend(std::iter::from_fn(|| bob.poll_event()));
//!         let to_bob: Vec<Outgoing> = std::iter::from_fn(|| alice.poll_outgoing()).collect();
//!         let to_alice: Vec<Outgoing> = std::iter::from_fn(|| bob.poll_outgoing()).collect();
//!         if to_bob.is_empty() && to_alice.is_empty() {
//!             return events;
//!         }
//!         let as_event = |sender: &str, out: Outgoing| IncomingEvent {
//!             sender: sender.into(),
//!             event_type: out.event_type.into(),
//!             content: out.content.to_value(),
//!             room: None,
//!         };
//!         to_bob.into_iter().for_each(|out| bob.receive(as_event("@alice:example.org", out), now));
//!         to_alice.into_iter().for_each(|out| alice.receive(as_event("@bob:example.org", out), now));
//!     }
//! }
//!
//! let alice_flow = alice.request_to_device(b, &["BOB".into()], now)?;
//! let events = exchange(&mut alice, &mut bob, now);
//! // Bob's user sees the request and accepts it; Alice starts SAS once Bob is ready.
//! let bob_flow = events.iter().find_map(|e| match e {
//!     Event::IncomingRequest { flow, .. } => Some(flow.clone()),
//!     _ => None,
//! });
//! let bob_flow = bob_flow.expect("Bob was asked");
//! bob.accept(&bob_flow, now)?;
//! exchange(&mut alice, &mut bob, now);
//! assert!(alice.flow(&alice_flow).unwrap().can(Action::StartSas));
//! alice.start_sas(&alice_flow, now)?;
//! let events = exchange(&mut alice, &mut bob, now);
//! // Both show the same emoji; both users compare them and confirm.
//! let shown: Vec<Vec<emoji::Emoji>> = events
//!     .iter()
//!     .filter_map(|e| match e {
//!         Event::Sas { emoji, .. } => emoji.clone(),
//!         _ => None,
//!     })
//!     .collect();
//! assert!(shown.len() == 2 && shown[0] == shown[1]);
//! alice.confirm(&alice_flow, now)?;
//! bob.confirm(&bob_flow, now)?;
//! let events = exchange(&mut alice, &mut bob, now);
//! let verified: Vec<_> = events.iter().filter(|e| matches!(e, Event::Done { .. })).collect();
//! assert_eq!(verified.len(), 2);
//! # Ok::<(), ActionError>(())
//! ```
pub mod b64;
pub mod cancel;
pub mod canonical;
pub mod crypto;
pub mod emoji;
mod flow;
pub mod keys;
#[cfg(feature = "loopback")]
#[cfg_attr(docsrs, doc(cfg(feature = "loopback")))]
pub mod loopback;
mod machine;
pub mod qr;
pub mod types;
pub mod wire;

pub use cancel::{CancelCode, CancelInfo, LocalCause};
pub use keys::{Ed25519PublicKey, KeyDecodeError};
pub use machine::Machine;
pub use types::*;

// Embedders move the machine and its outputs across threads (a tokio task, a worker pool): checked
// at compile time. `Machine` is `Send` but not `Sync` (its entropy source need not be `Sync`, and
// every input takes `&mut self`); what it hands out is both.
const _: () = {
    const fn send<T: Send>() {}
    const fn send_sync<T: Send + Sync>() {}
    send::<Machine>();
    send_sync::<Event>();
    send_sync::<FlowKey>();
    send_sync::<FlowInfo>();
    send_sync::<FlowPhase>();
    send_sync::<Outgoing>();
    send_sync::<IncomingEvent>();
    send_sync::<CancelInfo>();
    send_sync::<ActionError>();
    send_sync::<Config>();
    send_sync::<OwnIdentity>();
    send_sync::<UserKeys>();
    send_sync::<VerifiedKey>();
    send_sync::<Ed25519PublicKey>();
    send_sync::<qr::QrPayload>();
    send_sync::<wire::Msg>();
    send_sync::<emoji::Emoji>();
};
