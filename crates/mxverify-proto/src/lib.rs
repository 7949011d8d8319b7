#![warn(missing_docs)]
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
//! time ([`Machine::handle_timeout`]) — and drains what the machine wants: messages to send
//! ([`Machine::poll_outgoing`]) and events for the user ([`Machine::poll_event`]).
//! [`Machine::next_deadline`] says when to call back.
//!
//! Layers: [`wire`] (one message model for both transports), [`cancel`] (codes, causes and the
//! error-loop rule), [`crypto`] (SAS maths), [`qr`] (payload codec), the machine (request
//! framework, SAS and QR flows) and [`loopback`] (two machines wired together in memory).
//!
//! A complete SAS verification between two machines:
//!
//! ```
//! use mxverify_proto::loopback::{Loopback, Side};
//! use mxverify_proto::*;
//!
//! let id = |user: &str, device: &str| OwnIdentity {
//!     user_id: user.into(),
//!     device_id: device.into(),
//!     ed25519: Ed25519PublicKey::from_bytes([device.len() as u8; 32]),
//!     master_key: None,
//!     trusts_master_key: false,
//! };
//! let alice = Machine::new(id("@alice:example.org", "A"), Config::default(), Box::new(SeededEntropy::new(1)));
//! let bob = Machine::new(id("@bob:example.org", "BB"), Config::default(), Box::new(SeededEntropy::new(2)));
//! let mut net = Loopback::new(alice, bob, 1_700_000_000_000);
//! net.exchange_device_keys();
//!
//! let flow_a = net.a.request_to_device("@bob:example.org", &["BB".into()], net.now).unwrap();
//! net.run();
//! let flow_b = net.flow_of(Side::B).unwrap();
//! net.b.accept(&flow_b, net.now).unwrap();
//! net.run();
//! net.a.start_sas(&flow_a, net.now).unwrap();
//! net.run();
//! // Both sides now show the same emoji; both users confirm.
//! net.a.confirm(&flow_a, net.now).unwrap();
//! net.b.confirm(&flow_b, net.now).unwrap();
//! net.run();
//! assert!(net.events.iter().any(|(side, e)| *side == Side::A && matches!(e, Event::Done { .. })));
//! assert!(net.events.iter().any(|(side, e)| *side == Side::B && matches!(e, Event::Done { .. })));
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
