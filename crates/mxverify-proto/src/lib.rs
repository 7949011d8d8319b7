//! Sans-IO Matrix key verification.
pub mod qr;
