//! Sans-IO Matrix key verification.
pub mod b64;
pub mod cancel;
pub mod canonical;
pub mod crypto;
pub mod emoji;
pub mod loopback;
mod machine;
pub mod qr;
mod sas;
pub mod types;
pub mod wire;

pub use cancel::{CancelCode, CancelInfo, LocalCause};
pub use machine::{FlowInfo, Machine};
pub use types::*;
