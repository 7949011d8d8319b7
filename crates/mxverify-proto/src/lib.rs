//! Sans-IO Matrix key verification.
pub mod b64;
pub mod cancel;
pub mod canonical;
pub mod crypto;
pub mod emoji;
pub mod qr;
pub mod wire;
