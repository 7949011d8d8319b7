//! Unpadded base64 ([spec appendix](https://spec.matrix.org/v1.19/appendices/#unpadded-base64)):
//! what every key, MAC, commitment and QR secret of a verification is written in.
//!
//! ```
//! use mxverify_proto::b64;
//!
//! assert_eq!(b64::encode(b"foob"), "Zm9vYg");
//! assert_eq!(b64::decode("Zm9vYg==").unwrap(), b"foob"); // padding is accepted when reading
//! ```

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

const ENCODER: GeneralPurpose =
    GeneralPurpose::new(&base64::alphabet::STANDARD, GeneralPurposeConfig::new().with_encode_padding(false));

// B64-02: decoders accept input with or without `=` padding. Non-zero trailing bits are tolerated,
// as ruma does (matrix-spec#838), because some encoders emit them.
const DECODER: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Encodes bytes as unpadded standard base64.
///
/// Spec: [unpadded base64](https://spec.matrix.org/v1.19/appendices/#unpadded-base64).
pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    ENCODER.encode(bytes)
}

/// Decodes standard base64, padded or not, as the spec asks decoders to.
///
/// Spec: [unpadded base64](https://spec.matrix.org/v1.19/appendices/#unpadded-base64).
#[must_use]
pub fn decode(text: &str) -> Option<Vec<u8>> {
    DECODER.decode(text).ok()
}

/// Decodes exactly 32 bytes of base64 (a Curve25519 or Ed25519 public key).
///
/// Spec: [unpadded base64](https://spec.matrix.org/v1.19/appendices/#unpadded-base64).
#[must_use]
pub fn decode32(text: &str) -> Option<[u8; 32]> {
    // Decoded on the stack: keys and MACs are checked on every message.
    let mut buf = [0u8; 33];
    if text.len() > 44 {
        return None;
    }
    match DECODER.decode_slice(text, &mut buf) {
        Ok(32) => Some(buf[..32].try_into().expect("32 bytes")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vectors() {
        // VECTORS.md V1
        for (input, out) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(input), out);
            assert_eq!(decode(out).unwrap(), input.as_bytes());
        }
        assert_eq!(decode("Zg==").unwrap(), b"f");
        assert_eq!(decode("Zm8=").unwrap(), b"fo");
        assert!(decode("Zm9v!").is_none());
        assert!(decode32("Zm9v").is_none());
    }
}
