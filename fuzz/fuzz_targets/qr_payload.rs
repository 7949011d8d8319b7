//! Any bytes as a scanned QR code: decoding never panics, and what decodes re-encodes exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxverify_proto::qr::QrPayload;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = QrPayload::decode(data) {
        assert_eq!(p.encode(), data);
    }
});
