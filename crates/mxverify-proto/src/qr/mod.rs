//! QR code verification (`m.qr_code.show.v1`, `m.qr_code.scan.v1`, `m.reciprocate.v1`).
//!
//! Spec: [QR codes](https://spec.matrix.org/v1.19/client-server-api/#qr-codes).
//! This module holds the payload codec ([`QrPayload`]); the flow is driven through
//! [`crate::Machine`] ([`crate::Machine::scan_qr`], [`crate::Event::QrCode`]). Drawing and
//! reading the QR image itself is I/O and lives outside the sans-IO core.

mod payload;

pub use payload::{
    QR_GENERATED_SECRET_LEN, QR_KEY_LEN, QR_MIN_SECRET_LEN, QR_PREFIX, QR_VERSION, QrDecodeError, QrKeyPosition,
    QrKeys, QrMode, QrPayload, QrSecret, QrSecretDecodeError,
};
