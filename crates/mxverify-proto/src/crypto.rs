//! SAS mathematics ([spec: SAS](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification)):
//! ephemeral X25519 agreement, HKDF info strings, SAS bytes → decimals/emoji, MACs and the commitment.
//!
//! The primitives are the RustCrypto/dalek crates that vodozemac's `sas` module is built on;
//! vodozemac's `Sas::new()` draws its key from the thread RNG and cannot be seeded, while this core
//! takes all randomness from the caller. The tests cross-check every output against vodozemac.
//!
//! ```
//! use mxverify_proto::crypto::{EphemeralKey, KeyAgreement, Party, decimals};
//!
//! // Both sides' ephemeral keys (the bytes come from the caller's entropy).
//! let (alice, bob) = (EphemeralKey::from_random([1; 32]), EphemeralKey::from_random([2; 32]));
//! let (a_pub, b_pub) = (alice.public_b64(), bob.public_b64());
//! let start = Party { user_id: "@alice:example.org", device_id: "A", ephemeral_key: &a_pub };
//! let accept = Party { user_id: "@bob:example.org", device_id: "B", ephemeral_key: &b_pub };
//! let info = KeyAgreement::Curve25519HkdfSha256.sas_info(&start, &accept, "txn1");
//! // Each side agrees with the other's public key and derives the same SAS.
//! let a = alice.agree(&b_pub).unwrap().sas_bytes(&info);
//! let b = bob.agree(&a_pub).unwrap().sas_bytes(&info);
//! assert_eq!(decimals(&a), decimals(&b));
//! ```

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::{b64, canonical};

/// A failure of the key agreement.
///
/// Spec: [SAS](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The other side's key is not 32 bytes of base64.
    #[error("the ephemeral public key is not 32 bytes of base64")]
    Malformed,
    /// A low-order point: the shared secret would not depend on our key.
    #[error("the ephemeral public key is a low-order point (non-contributory)")]
    NonContributory,
}

/// Our ephemeral Curve25519 key pair for one SAS exchange, fresh for each verification.
///
/// Spec: [SAS](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification).
///
/// It is consumed by [`EphemeralKey::agree`], so the type system forbids reusing it; the secret
/// is zeroized on drop and never printed.
pub struct EphemeralKey {
    secret: StaticSecret,
    public: PublicKey,
}

impl std::fmt::Debug for EphemeralKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EphemeralKey").field("public", &self.public_b64()).finish_non_exhaustive()
    }
}

impl EphemeralKey {
    /// Builds the key pair from 32 secret random bytes supplied by the caller.
    #[must_use]
    pub fn from_random(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// The public key as sent in `m.key.verification.key` (unpadded base64, 43 characters).
    #[must_use]
    pub fn public_b64(&self) -> String {
        b64::encode(self.public.as_bytes())
    }

    /// X25519 with the other side's public key; rejects non-contributory (low-order) keys.
    pub fn agree(self, their_public_b64: &str) -> Result<SharedSecret, KeyError> {
        let theirs = b64::decode32(their_public_b64).ok_or(KeyError::Malformed)?;
        let shared = self.secret.diffie_hellman(&PublicKey::from(theirs));
        if !shared.was_contributory() {
            return Err(KeyError::NonContributory);
        }
        Ok(SharedSecret(shared))
    }
}

/// The established X25519 secret; zeroized on drop, never printed.
///
/// Spec: [SAS HKDF calculation](https://spec.matrix.org/v1.19/client-server-api/#sas-hkdf-calculation), [MAC calculation](https://spec.matrix.org/v1.19/client-server-api/#mac-calculation).
pub struct SharedSecret(x25519_dalek::SharedSecret);

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecret(..)")
    }
}

impl SharedSecret {
    fn hkdf(&self) -> Hkdf<Sha256> {
        // SK-01: no salt.
        Hkdf::<Sha256>::new(None, self.0.as_bytes())
    }

    /// The six SAS bytes for `info` (decimals use the first five, emoji all six).
    #[must_use]
    pub fn sas_bytes(&self, info: &str) -> [u8; 6] {
        let mut out = [0u8; 6];
        self.hkdf().expand(info.as_bytes(), &mut out).expect("6 <= 255 * 32");
        out
    }

    fn mac_key(&self, info: &str) -> Hmac<Sha256> {
        // MC-01: HKDF-SHA256 to a 32-byte key, then HMAC-SHA256.
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        self.hkdf().expand(info.as_bytes(), key.as_mut()).expect("32 <= 255 * 32");
        <Hmac<Sha256> as KeyInit>::new_from_slice(key.as_ref()).expect("HMAC takes any key size")
    }

    /// The raw 32-byte MAC of `input` under the key derived with `info`.
    #[must_use]
    pub fn mac(&self, input: &str, info: &str) -> [u8; 32] {
        let mut mac = self.mac_key(info);
        mac.update(input.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The MAC of `input` in the wire encoding of `method`.
    #[must_use]
    pub fn mac_encoded(&self, method: MacMethod, input: &str, info: &str) -> String {
        method.encode(&self.mac(input, info))
    }

    /// Checks a received MAC string in constant time.
    #[must_use]
    pub fn verify_mac(&self, method: MacMethod, input: &str, info: &str, received: &str) -> bool {
        match method {
            MacMethod::HkdfHmacSha256V2 | MacMethod::Msc3783 => {
                // Every MAC these methods make is 32 bytes.
                let Some(tag) = b64::decode32(received) else {
                    return false;
                };
                let mut mac = self.mac_key(info);
                mac.update(input.as_bytes());
                mac.verify_slice(&tag).is_ok()
            }
            MacMethod::HkdfHmacSha256Legacy => {
                let expected = method.encode(&self.mac(input, info));
                expected.as_bytes().ct_eq(received.as_bytes()).into()
            }
        }
    }
}

/// Key agreement protocols of `m.sas.v1`.
///
/// Spec: [SAS HKDF calculation](https://spec.matrix.org/v1.19/client-server-api/#sas-hkdf-calculation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyAgreement {
    /// `curve25519-hkdf-sha256`: the current protocol.
    Curve25519HkdfSha256,
    /// `curve25519`: deprecated, with a different HKDF info string.
    Curve25519,
}

impl KeyAgreement {
    /// In order of preference.
    pub const ALL: [KeyAgreement; 2] = [Self::Curve25519HkdfSha256, Self::Curve25519];

    /// The identifier on the wire.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Curve25519HkdfSha256 => "curve25519-hkdf-sha256",
            Self::Curve25519 => "curve25519",
        }
    }

    /// Parses a wire identifier.
    #[must_use]
    pub fn from_wire(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The SAS HKDF info string: the start sender's values always come first, whichever side
    /// computes it.
    #[must_use]
    pub fn sas_info(self, starter: &Party<'_>, accepter: &Party<'_>, flow_id: &str) -> String {
        match self {
            Self::Curve25519HkdfSha256 => [
                "MATRIX_KEY_VERIFICATION_SAS|",
                starter.user_id,
                "|",
                starter.device_id,
                "|",
                starter.ephemeral_key,
                "|",
                accepter.user_id,
                "|",
                accepter.device_id,
                "|",
                accepter.ephemeral_key,
                "|",
                flow_id,
            ]
            .concat(),
            Self::Curve25519 => [
                "MATRIX_KEY_VERIFICATION_SAS",
                starter.user_id,
                starter.device_id,
                accepter.user_id,
                accepter.device_id,
                flow_id,
            ]
            .concat(),
        }
    }
}

/// One side of a SAS exchange, as it enters the HKDF info string.
///
/// Spec: [SAS HKDF calculation](https://spec.matrix.org/v1.19/client-server-api/#sas-hkdf-calculation).
#[derive(Debug, Clone, Copy)]
pub struct Party<'a> {
    /// Matrix user ID.
    pub user_id: &'a str,
    /// Device ID.
    pub device_id: &'a str,
    /// Ephemeral public key, unpadded base64 exactly as sent.
    pub ephemeral_key: &'a str,
}

/// MAC methods.
///
/// Spec: [MAC calculation](https://spec.matrix.org/v1.19/client-server-api/#mac-calculation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MacMethod {
    /// `hkdf-hmac-sha256.v2`.
    HkdfHmacSha256V2,
    /// `org.matrix.msc3783.hkdf-hmac-sha256`: the unstable name of `.v2`, same semantics.
    Msc3783,
    /// `hkdf-hmac-sha256`: deprecated; its MACs are written with libolm's historical in-place
    /// base64, reproduced exactly.
    HkdfHmacSha256Legacy,
}

impl MacMethod {
    /// In order of preference (the legacy method is never chosen when `.v2` is common).
    pub const ALL: [MacMethod; 3] = [Self::HkdfHmacSha256V2, Self::Msc3783, Self::HkdfHmacSha256Legacy];

    /// The identifier on the wire.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HkdfHmacSha256V2 => "hkdf-hmac-sha256.v2",
            Self::Msc3783 => "org.matrix.msc3783.hkdf-hmac-sha256",
            Self::HkdfHmacSha256Legacy => "hkdf-hmac-sha256",
        }
    }

    /// Parses a wire identifier.
    #[must_use]
    pub fn from_wire(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// Encodes a raw MAC for the wire.
    #[must_use]
    pub fn encode(self, mac: &[u8; 32]) -> String {
        match self {
            Self::HkdfHmacSha256V2 | Self::Msc3783 => b64::encode(mac),
            Self::HkdfHmacSha256Legacy => libolm_inplace_base64(mac),
        }
    }
}

#[cfg(feature = "libolm-base64")]
pub use legacy::libolm_inplace_base64;
#[cfg(not(feature = "libolm-base64"))]
use legacy::libolm_inplace_base64;

mod legacy {
    /// libolm's historical `_olm_encode_base64(mac, 32, mac)`, run in place: later input bytes
    /// are read after earlier output overwrote them. This is the encoding of the deprecated
    /// `hkdf-hmac-sha256` MAC method.
    ///
    /// Spec: [MAC calculation](https://spec.matrix.org/v1.19/client-server-api/#mac-calculation).
    pub fn libolm_inplace_base64(mac: &[u8; 32]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut buf = [0u8; 44];
        buf[..32].copy_from_slice(mac);
        for k in 0..10 {
            let v = [buf[3 * k], buf[3 * k + 1], buf[3 * k + 2]];
            let n = u32::from(v[0]) << 16 | u32::from(v[1]) << 8 | u32::from(v[2]);
            for j in 0..4 {
                buf[4 * k + j] = ALPHABET[((n >> (18 - 6 * j)) & 63) as usize];
            }
        }
        let n = u32::from(buf[30]) << 16 | u32::from(buf[31]) << 8;
        for j in 0..3 {
            buf[40 + j] = ALPHABET[((n >> (18 - 6 * j)) & 63) as usize];
        }
        String::from_utf8(buf[..43].to_vec()).expect("alphabet is ASCII")
    }
}

/// The three SAS numbers, each in 1000..=9191.
///
/// Spec: [SAS method `decimal`](https://spec.matrix.org/v1.19/client-server-api/#sas-method-decimal).
pub fn decimals(bytes: &[u8; 6]) -> [u16; 3] {
    let b: [u16; 5] = [bytes[0], bytes[1], bytes[2], bytes[3], bytes[4]].map(u16::from);
    [
        ((b[0] << 5) | (b[1] >> 3)) + 1000,
        (((b[1] & 0x07) << 10) | (b[2] << 2) | (b[3] >> 6)) + 1000,
        (((b[3] & 0x3F) << 7) | (b[4] >> 1)) + 1000,
    ]
}

/// The seven emoji indices: the first 42 bits as 6-bit groups, most significant first.
///
/// Spec: [SAS method `emoji`](https://spec.matrix.org/v1.19/client-server-api/#sas-method-emoji).
#[must_use]
pub fn emoji_indices(bytes: &[u8; 6]) -> [u8; 7] {
    let n = bytes.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b));
    std::array::from_fn(|i| ((n >> (42 - 6 * i)) & 63) as u8)
}

/// The MAC info string: sender's IDs, receiver's IDs, flow id, then the key ID or `KEY_IDS`.
///
/// Spec: [MAC calculation](https://spec.matrix.org/v1.19/client-server-api/#mac-calculation).
#[must_use]
pub fn mac_info(sender: (&str, &str), receiver: (&str, &str), flow_id: &str, item: &str) -> String {
    let mut info = MacInfo::new(sender, receiver, flow_id);
    info.item(item);
    info.buf
}

/// The MAC info strings of one `mac` message — the same prefix, then each key ID and `KEY_IDS` in
/// turn — written into one buffer: a `mac` makes or checks two or three of them.
///
/// Spec: [MAC calculation](https://spec.matrix.org/v1.19/client-server-api/#mac-calculation).
#[derive(Debug)]
pub struct MacInfo {
    buf: String,
    prefix: usize,
}

impl MacInfo {
    /// The prefix: sender's user and device ID, receiver's, and the flow ID.
    #[must_use]
    pub fn new(sender: (&str, &str), receiver: (&str, &str), flow_id: &str) -> Self {
        const TAG: &str = "MATRIX_KEY_VERIFICATION_MAC";
        let parts = [TAG, sender.0, sender.1, receiver.0, receiver.1, flow_id];
        // Room for the longest item, a master key's ID (8 + 43 bytes).
        let mut buf = String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 64);
        parts.iter().for_each(|p| buf.push_str(p));
        let prefix = buf.len();
        Self { buf, prefix }
    }

    /// The info string for `item` (a key ID, or `KEY_IDS`).
    pub fn item(&mut self, item: &str) -> &str {
        self.buf.truncate(self.prefix);
        self.buf.push_str(item);
        &self.buf
    }
}

/// The `commitment` of an `m.key.verification.accept`: SHA-256 over the accepter's base64
/// ephemeral key followed by the canonical JSON of the start's content.
///
/// Spec: [`m.key.verification.accept`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationaccept).
pub fn commitment(accepter_key_b64: &str, start_content: &Value) -> Result<String, canonical::CanonicalError> {
    Ok(commitment_of_canonical(accepter_key_b64, &canonical::to_string(start_content)?))
}

/// [`commitment`] over start content already in canonical JSON (the machine keeps it as text).
///
/// Spec: [`m.key.verification.accept`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationaccept).
#[must_use]
pub fn commitment_of_canonical(accepter_key_b64: &str, canonical_start_content: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(accepter_key_b64.as_bytes());
    hash.update(canonical_start_content.as_bytes());
    b64::encode(hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One buffer, reused: each item reads exactly as the whole string built at once.
    #[test]
    fn mac_info_buffer_gives_each_item_afresh() {
        let (s, r) = (("@a:x", "A"), ("@b:x", "B"));
        let mut info = MacInfo::new(s, r, "txn");
        for item in ["ed25519:A", "KEY_IDS", "ed25519:0123456789012345678901234567890123456789012", ""] {
            assert_eq!(info.item(item), format!("MATRIX_KEY_VERIFICATION_MAC@a:xA@b:xBtxn{item}"));
            assert_eq!(mac_info(s, r, "txn", item), info.item(item));
        }
    }

    #[test]
    fn legacy_base64_matches_libolm_vector() {
        // VECTORS.md V4
        let mac: [u8; 32] = [
            121, 105, 187, 19, 37, 94, 119, 248, 224, 34, 94, 29, 157, 5, 15, 230, 246, 115, 236, 217, 80, 78, 56, 200,
            80, 200, 82, 158, 168, 179, 10, 230,
        ];
        assert_eq!(libolm_inplace_base64(&mac), "eWm7NyVeVmXgbVhnYlZobllsWm9ibGxzV205aWJHeHo");
        assert_eq!(b64::encode(mac), "eWm7EyVed/jgIl4dnQUP5vZz7NlQTjjIUMhSnqizCuY");
    }

    #[test]
    fn decimal_and_emoji_vectors() {
        // VECTORS.md V3
        type Case = ([u8; 6], [u16; 3], [u8; 7]);
        let cases: [Case; 7] = [
            ([0; 6], [1000, 1000, 1000], [0; 7]),
            ([0xff; 6], [9191, 9191, 9191], [63; 7]),
            ([0x01, 0x23, 0x45, 0x67, 0x89, 0xab], [1036, 4349, 6060], [0, 18, 13, 5, 25, 56, 38]),
            ([0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54], [9155, 5842, 4131], [63, 45, 50, 58, 38, 7, 25]),
            ([0x80, 0, 0, 0, 0, 0], [5096, 1000, 1000], [32, 0, 0, 0, 0, 0, 0]),
            ([0, 0, 0, 0, 0, 1], [1000, 1000, 1000], [0; 7]),
            ([0, 0, 0, 0, 1, 0], [1000, 1000, 1000], [0, 0, 0, 0, 0, 0, 4]),
        ];
        for (bytes, dec, emo) in cases {
            assert_eq!(decimals(&bytes), dec, "{bytes:02x?}");
            assert_eq!(emoji_indices(&bytes), emo, "{bytes:02x?}");
        }
        assert_eq!(decimals(&[0x00, 0x01, 0x02, 0x03, 0x04, 0x99]), [1000, 2032, 1386]);
    }
}
