//! QR code verification (`m.qr_code.show.v1`, `m.qr_code.scan.v1`, `m.reciprocate.v1`).
