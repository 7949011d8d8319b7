//! Public keys as a verification sees them: a device's Ed25519 signing key, and a user's
//! cross-signing keys, all Ed25519
//! ([spec: cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing)).
//!
//! The Client-Server API writes them as unpadded base64; this type holds the 32 bytes, so two
//! spellings of one key (padded or not) compare equal, and what goes into a MAC or a QR code is
//! always the canonical form.

use std::fmt;
use std::str::FromStr;

use crate::b64;

/// An Ed25519 public key: a device key (`ed25519:<device ID>`) or a cross-signing key
/// (`ed25519:<the key itself>`), as listed by
/// [`/keys/query`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysquery).
///
/// It is 32 bytes; [`Ed25519PublicKey::from_base64`] accepts the
/// [unpadded base64](https://spec.matrix.org/v1.19/appendices/#unpadded-base64) of the API
/// (padding tolerated), and [`Display`](fmt::Display) writes it back unpadded. Whether the
/// bytes are a point of the curve is not checked here (a QR code refuses keys that are not).
///
/// ```
/// use mxverify_proto::Ed25519PublicKey;
///
/// let key: Ed25519PublicKey = "wBVr3qRU5IE3pWFnDDCnAqzZMJBHPRTuuEbeD1AXJXM".parse().unwrap();
/// assert_eq!(key.to_string(), "wBVr3qRU5IE3pWFnDDCnAqzZMJBHPRTuuEbeD1AXJXM");
/// assert_eq!(key, "wBVr3qRU5IE3pWFnDDCnAqzZMJBHPRTuuEbeD1AXJXM");
/// assert!(Ed25519PublicKey::from_base64("too short").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ed25519PublicKey([u8; 32]);

/// Text that is not an Ed25519 public key: not base64, or not 32 bytes.
///
/// Spec: [unpadded base64](https://spec.matrix.org/v1.19/appendices/#unpadded-base64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an Ed25519 public key: expected 32 bytes of base64")]
pub struct KeyDecodeError;

impl Ed25519PublicKey {
    /// The key with these bytes.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses the base64 form the Client-Server API uses (unpadded; padding tolerated).
    pub fn from_base64(text: &str) -> Result<Self, KeyDecodeError> {
        b64::decode32(text).map(Self).ok_or(KeyDecodeError)
    }

    /// The 32 bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The unpadded base64 form: what a MAC is computed over and what a key ID names.
    #[must_use]
    pub fn to_base64(&self) -> String {
        b64::encode(self.0)
    }
}

impl From<[u8; 32]> for Ed25519PublicKey {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl FromStr for Ed25519PublicKey {
    type Err = KeyDecodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

impl fmt::Display for Ed25519PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for Ed25519PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ed25519PublicKey({self})")
    }
}

impl serde::Serialize for Ed25519PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

/// Compares with the base64 text of a key (padded or not); text that is no key is unequal.
impl PartialEq<str> for Ed25519PublicKey {
    fn eq(&self, other: &str) -> bool {
        b64::decode32(other).is_some_and(|b| b == self.0)
    }
}

impl PartialEq<&str> for Ed25519PublicKey {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl PartialEq<String> for Ed25519PublicKey {
    fn eq(&self, other: &String) -> bool {
        *self == *other.as_str()
    }
}

impl PartialEq<Ed25519PublicKey> for String {
    fn eq(&self, other: &Ed25519PublicKey) -> bool {
        other == self
    }
}

impl PartialEq<Ed25519PublicKey> for str {
    fn eq(&self, other: &Ed25519PublicKey) -> bool {
        other == self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_comparisons() {
        let key = Ed25519PublicKey::from_bytes([7; 32]);
        let text = key.to_base64();
        assert_eq!(text.len(), 43);
        assert_eq!(Ed25519PublicKey::from_base64(&text), Ok(key.clone()));
        assert_eq!(format!("{text}="), key, "padding is tolerated");
        assert_eq!(text.parse::<Ed25519PublicKey>(), Ok(key.clone()));
        assert_eq!(format!("{key:?}"), format!("Ed25519PublicKey({text})"));
        assert_eq!(serde_json::to_value(&key).unwrap(), serde_json::json!(text));
        assert_ne!(key, "not a key");
        assert_eq!(Ed25519PublicKey::from_base64("AAAA"), Err(KeyDecodeError));
    }
}
