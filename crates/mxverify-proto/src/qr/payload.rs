//! The binary payload carried by a verification QR code.
//!
//! Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
//!
//! Byte layout (all offsets in bytes, `L` = flow id length):
//!
//! | offset | content |
//! | --- | --- |
//! | 0..6 | ASCII `MATRIX` |
//! | 6 | version, `0x02` |
//! | 7 | mode ([`QrMode`]) |
//! | 8..10 | `L`, big-endian `u16` |
//! | 10..10+L | flow id, UTF-8 |
//! | 10+L..42+L | first key (see [`QrPayload::key1`]) |
//! | 42+L..74+L | second key (see [`QrPayload::key2`]) |
//! | 74+L.. | shared secret, everything that remains |

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD_INDIFFERENT;
use curve25519_dalek::edwards::CompressedEdwardsY;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// The six ASCII bytes every Matrix QR payload starts with (`MATRIX`).
///
/// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
pub const QR_PREFIX: &[u8; 6] = b"MATRIX";

/// The only payload version defined for key verification (`0x02`).
///
/// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
pub const QR_VERSION: u8 = 0x02;

/// Smallest shared secret a decoder accepts, in bytes.
///
/// The spec suggests "about 8 bytes"; matrix-rust-sdk and Element Android reject
/// shorter secrets when scanning, and so does [`QrPayload::decode`].
/// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
pub const QR_MIN_SECRET_LEN: usize = 8;

/// Length of a secret made by [`QrSecret::generate`], in bytes (as matrix-rust-sdk and
/// mautrix-go do).
///
/// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
pub const QR_GENERATED_SECRET_LEN: usize = 16;

/// Length of each key in the payload: a raw Ed25519 public key.
///
/// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
pub const QR_KEY_LEN: usize = 32;

/// Size of the fixed header: prefix, version, mode and the flow id length.
const HEADER_LEN: usize = 10;

/// Unpadded standard base64 when encoding; padded or unpadded accepted when decoding.
const B64: base64::engine::GeneralPurpose = STANDARD_NO_PAD_INDIFFERENT;

/// What the QR code is for, and therefore what its two keys mean (payload byte 7).
///
/// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
/// Modes `0x03` and `0x04` share the `MATRIX\x02` prefix but belong to the QR login
/// proposal (MSC4108), not to key verification; they are rejected with
/// [`QrDecodeError::LoginMode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QrMode {
    /// `0x00`: verifying another user with cross-signing.
    OtherUser,
    /// `0x01`: self-verification where the displaying device trusts the master key.
    SelfTrusted,
    /// `0x02`: self-verification where the displaying device does not yet trust the
    /// master key.
    SelfUntrusted,
}

impl QrMode {
    /// The mode byte written at offset 7 of the payload.
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    #[must_use]
    pub const fn as_byte(self) -> u8 {
        match self {
            QrMode::OtherUser => 0x00,
            QrMode::SelfTrusted => 0x01,
            QrMode::SelfUntrusted => 0x02,
        }
    }

    /// The mode for a payload byte, or `None` if the byte is not a verification mode.
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    #[must_use]
    pub const fn from_byte(byte: u8) -> Option<QrMode> {
        match byte {
            0x00 => Some(QrMode::OtherUser),
            0x01 => Some(QrMode::SelfTrusted),
            0x02 => Some(QrMode::SelfUntrusted),
            _ => None,
        }
    }
}

/// The random shared secret at the end of a QR payload.
///
/// The scanner sends it back, as unpadded base64, in the `secret` field of its
/// `m.key.verification.start` with `method: m.reciprocate.v1`; the displayer compares it
/// with the one it showed.
///
/// The bytes are zeroized on drop, compared in constant time by `==`, and never shown by
/// `Debug`.
/// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format),
/// [`m.key.verification.start` `m.reciprocate.v1`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationstartmreciprocatev1).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct QrSecret(Vec<u8>);

impl QrSecret {
    /// Wraps secret bytes as they are (no length check; see [`QR_MIN_SECRET_LEN`]).
    #[must_use]
    pub fn from_bytes(bytes: Vec<u8>) -> QrSecret {
        QrSecret(bytes)
    }

    /// A fresh [`QR_GENERATED_SECRET_LEN`]-byte secret; `fill` must overwrite the whole
    /// slice with cryptographically secure random bytes (the core has no RNG of its own).
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format)
    /// ("a random shared secret").
    pub fn generate(fill: impl FnOnce(&mut [u8])) -> QrSecret {
        let mut bytes = vec![0u8; QR_GENERATED_SECRET_LEN];
        fill(&mut bytes);
        QrSecret(bytes)
    }

    /// The secret bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Number of secret bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret has no bytes at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Unpadded standard base64, the value of the `secret` field of an
    /// `m.reciprocate.v1` start.
    ///
    /// Spec: [`m.key.verification.start` `m.reciprocate.v1`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationstartmreciprocatev1),
    /// [Unpadded Base64](https://spec.matrix.org/v1.19/appendices/#unpadded-base64).
    #[must_use]
    pub fn to_base64(&self) -> String {
        B64.encode(&self.0)
    }

    /// Parses the `secret` field of an `m.reciprocate.v1` start; standard alphabet, with
    /// or without `=` padding.
    ///
    /// Spec: [Unpadded Base64](https://spec.matrix.org/v1.19/appendices/#unpadded-base64)
    /// (decoders should accept both forms).
    pub fn from_base64(encoded: &str) -> Result<QrSecret, QrSecretDecodeError> {
        B64.decode(encoded).map(QrSecret).map_err(|_| QrSecretDecodeError)
    }
}

impl ConstantTimeEq for QrSecret {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        // `subtle` compares slices of different lengths as unequal right away; the
        // length of the secret is not itself secret.
        self.0.as_slice().ct_eq(other.0.as_slice())
    }
}

impl PartialEq for QrSecret {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for QrSecret {}

impl std::fmt::Debug for QrSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QrSecret").field("len", &self.0.len()).finish_non_exhaustive()
    }
}

/// The `secret` of an `m.reciprocate.v1` start is not valid base64.
///
/// Spec: [Unpadded Base64](https://spec.matrix.org/v1.19/appendices/#unpadded-base64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the QR code shared secret is not valid base64")]
pub struct QrSecretDecodeError;

/// Which of the two keys of a payload a [`QrDecodeError::InvalidKey`] is about.
///
/// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QrKeyPosition {
    /// The first key (offset `10+L`).
    First,
    /// The second key (offset `42+L`).
    Second,
}

impl std::fmt::Display for QrKeyPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QrKeyPosition::First => "first",
            QrKeyPosition::Second => "second",
        })
    }
}

/// Why a byte string is not an acceptable verification QR payload, or why a
/// [`QrPayload`] cannot be built.
///
/// Checks run in this order, so the error names the first problem found: prefix,
/// version, mode, each truncation (header, flow id, keys), flow id UTF-8, secret length,
/// then the two keys.
/// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QrDecodeError {
    /// The payload does not start with ASCII `MATRIX`.
    #[error("not a Matrix QR code: the payload does not start with \"MATRIX\"")]
    WrongPrefix,
    /// Byte 6 is not `0x02` (checked before the mode).
    #[error("unsupported Matrix QR code version {0:#04x} (only 0x02 is supported)")]
    UnsupportedVersion(u8),
    /// Byte 7 is `0x03` or `0x04`: a QR *login* code (MSC4108), not key verification.
    #[error("this is a Matrix QR login code (mode {0:#04x}), not a key verification code")]
    LoginMode(u8),
    /// Byte 7 is not a known mode.
    #[error("unknown Matrix QR code mode {0:#04x} (expected 0x00, 0x01 or 0x02)")]
    UnknownMode(u8),
    /// The payload ends inside the 10-byte header (prefix, version, mode, flow id length).
    #[error("QR payload truncated: {len} bytes, the header alone needs 10")]
    TruncatedHeader {
        /// Total payload length.
        len: usize,
    },
    /// The flow id length field announces more bytes than remain.
    #[error("QR payload truncated in the flow id: it announces {declared} bytes but only {available} remain")]
    TruncatedFlowId {
        /// Length announced at bytes 8–9.
        declared: usize,
        /// Bytes left after the header.
        available: usize,
    },
    /// Fewer than 64 bytes remain after the flow id for the two keys.
    #[error("QR payload truncated in the keys: {available} bytes after the flow id, the two keys need 64")]
    TruncatedKeys {
        /// Bytes left after the flow id.
        available: usize,
    },
    /// The flow id is not valid UTF-8.
    #[error("the flow id in the QR payload is not valid UTF-8")]
    FlowIdNotUtf8,
    /// The shared secret is shorter than [`QR_MIN_SECRET_LEN`].
    #[error("the QR code shared secret is {len} bytes, fewer than the minimum of 8")]
    SecretTooShort {
        /// Length of the secret found.
        len: usize,
    },
    /// A key is not the encoding of a point on the Ed25519 curve.
    #[error("the {0} key in the QR payload is not a valid Ed25519 public key")]
    InvalidKey(QrKeyPosition),
    /// The flow id does not fit the payload's 16-bit length field (building a payload).
    #[error("the flow id is {len} bytes, more than the 65535 a QR payload can carry")]
    FlowIdTooLong {
        /// Length of the flow id in bytes.
        len: usize,
    },
}

/// The keys of a payload by role, as the displaying device states them.
///
/// "Displayer" is the device showing the QR code, "scanner" the device reading it.
/// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum QrKeys<'a> {
    /// Mode `0x00`.
    OtherUser {
        /// First key: the displaying user's own master signing key.
        displayer_master_key: &'a [u8; 32],
        /// Second key: what the displayer believes is the scanning user's master key.
        scanner_master_key: &'a [u8; 32],
    },
    /// Mode `0x01` (both devices belong to one user).
    SelfTrusted {
        /// First key: the user's master signing key, which the displayer trusts.
        master_key: &'a [u8; 32],
        /// Second key: what the displayer believes is the scanning device's Ed25519 key.
        scanner_device_key: &'a [u8; 32],
    },
    /// Mode `0x02` (both devices belong to one user).
    SelfUntrusted {
        /// First key: the displaying device's own Ed25519 device key.
        displayer_device_key: &'a [u8; 32],
        /// Second key: what the displayer believes is the user's master signing key.
        master_key: &'a [u8; 32],
    },
}

/// A decoded (or to-be-encoded) verification QR payload.
///
/// Every `QrPayload` built by [`QrPayload::new`] (or the per-mode constructors) or by
/// [`QrPayload::decode`] has a flow id of at most 65535 bytes, two valid Ed25519 keys
/// and a secret of at least [`QR_MIN_SECRET_LEN`] bytes, so `decode(encode(p)) == p`.
/// Only [`QrPayload::decode_unchecked`] can produce one with invalid keys or a short
/// secret.
/// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
///
/// ```
/// use mxverify_proto::qr::{QrMode, QrPayload, QrSecret};
///
/// // Two Ed25519 public keys (here the curve's base point, for brevity).
/// let mut key = [0x66u8; 32];
/// key[0] = 0x58;
/// let secret = QrSecret::generate(|buf| buf.fill(7)); // use real random bytes
/// let payload = QrPayload::other_user("$request:example.org", key, key, secret).unwrap();
/// let bytes = payload.encode();
/// assert!(bytes.starts_with(b"MATRIX\x02\x00"));
/// let read = QrPayload::decode(&bytes).unwrap();
/// assert_eq!((read.mode(), read.flow_id()), (QrMode::OtherUser, "$request:example.org"));
/// assert_eq!(read, payload);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QrPayload {
    mode: QrMode,
    flow_id: String,
    key1: [u8; 32],
    key2: [u8; 32],
    secret: QrSecret,
}

impl QrPayload {
    /// Builds a payload from raw fields, with the same checks as [`QrPayload::decode`]
    /// (flow id length, secret length, keys on the curve).
    ///
    /// What `key1` and `key2` must be depends on `mode`: see [`QrPayload::key1`],
    /// [`QrPayload::key2`], or use [`QrPayload::other_user`],
    /// [`QrPayload::self_trusted`] and [`QrPayload::self_untrusted`], which name them.
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    pub fn new(
        mode: QrMode,
        flow_id: impl Into<String>,
        key1: [u8; 32],
        key2: [u8; 32],
        secret: QrSecret,
    ) -> Result<QrPayload, QrDecodeError> {
        let flow_id = flow_id.into();
        if flow_id.len() > usize::from(u16::MAX) {
            return Err(QrDecodeError::FlowIdTooLong { len: flow_id.len() });
        }
        let payload = QrPayload { mode, flow_id, key1, key2, secret };
        payload.validate()?;
        Ok(payload)
    }

    /// Mode `0x00` (verifying another user): `own_master_key` is the displaying user's
    /// master signing key, `other_master_key` what the displayer believes is the other
    /// user's master key.
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    pub fn other_user(
        flow_id: impl Into<String>,
        own_master_key: [u8; 32],
        other_master_key: [u8; 32],
        secret: QrSecret,
    ) -> Result<QrPayload, QrDecodeError> {
        QrPayload::new(QrMode::OtherUser, flow_id, own_master_key, other_master_key, secret)
    }

    /// Mode `0x01` (self-verification, this device trusts the master key): `master_key`
    /// is the user's master signing key, `other_device_key` what the displayer believes
    /// is the other device's Ed25519 key.
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    pub fn self_trusted(
        flow_id: impl Into<String>,
        master_key: [u8; 32],
        other_device_key: [u8; 32],
        secret: QrSecret,
    ) -> Result<QrPayload, QrDecodeError> {
        QrPayload::new(QrMode::SelfTrusted, flow_id, master_key, other_device_key, secret)
    }

    /// Mode `0x02` (self-verification, this device does not trust the master key yet):
    /// `own_device_key` is the displaying device's Ed25519 key (not its Curve25519 key),
    /// `master_key` what the displayer believes is the user's master signing key.
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    pub fn self_untrusted(
        flow_id: impl Into<String>,
        own_device_key: [u8; 32],
        master_key: [u8; 32],
        secret: QrSecret,
    ) -> Result<QrPayload, QrDecodeError> {
        QrPayload::new(QrMode::SelfUntrusted, flow_id, own_device_key, master_key, secret)
    }

    /// The mode (payload byte 7).
    #[must_use]
    pub fn mode(&self) -> QrMode {
        self.mode
    }

    /// The flow id: the `m.key.verification.request` event ID for in-room flows, the
    /// `transaction_id` for to-device flows.
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    #[must_use]
    pub fn flow_id(&self) -> &str {
        &self.flow_id
    }

    /// The first key, raw. Its meaning depends on the mode:
    /// `0x00` and `0x01`: the displaying user's own master signing key;
    /// `0x02`: the displaying device's own Ed25519 device key.
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    #[must_use]
    pub fn key1(&self) -> &[u8; 32] {
        &self.key1
    }

    /// The second key, raw. Its meaning depends on the mode — what the displayer
    /// *believes* is: `0x00`: the other user's master signing key; `0x01`: the other
    /// device's Ed25519 key; `0x02`: the user's master signing key.
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    #[must_use]
    pub fn key2(&self) -> &[u8; 32] {
        &self.key2
    }

    /// The shared secret.
    #[must_use]
    pub fn secret(&self) -> &QrSecret {
        &self.secret
    }

    /// Both keys, named by role for this payload's mode.
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    #[must_use]
    pub fn keys(&self) -> QrKeys<'_> {
        match self.mode {
            QrMode::OtherUser => QrKeys::OtherUser { displayer_master_key: &self.key1, scanner_master_key: &self.key2 },
            QrMode::SelfTrusted => QrKeys::SelfTrusted { master_key: &self.key1, scanner_device_key: &self.key2 },
            QrMode::SelfUntrusted => QrKeys::SelfUntrusted { displayer_device_key: &self.key1, master_key: &self.key2 },
        }
    }

    /// The displaying user's master signing key as the code states it, in every mode:
    /// the first key for `0x00`/`0x01`, the second for `0x02` (where the displayer does
    /// not trust it yet).
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    #[must_use]
    pub fn displayer_master_key(&self) -> &[u8; 32] {
        match self.mode {
            QrMode::OtherUser | QrMode::SelfTrusted => &self.key1,
            QrMode::SelfUntrusted => &self.key2,
        }
    }

    /// The displaying device's own Ed25519 key; only mode `0x02` carries it (first key).
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    #[must_use]
    pub fn displayer_device_key(&self) -> Option<&[u8; 32]> {
        (self.mode == QrMode::SelfUntrusted).then_some(&self.key1)
    }

    /// What the displayer believes is the scanning user's master key; only mode `0x00`
    /// carries it (second key).
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    #[must_use]
    pub fn scanner_master_key(&self) -> Option<&[u8; 32]> {
        (self.mode == QrMode::OtherUser).then_some(&self.key2)
    }

    /// What the displayer believes is the scanning device's Ed25519 key; only mode
    /// `0x01` carries it (second key).
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    #[must_use]
    pub fn scanner_device_key(&self) -> Option<&[u8; 32]> {
        (self.mode == QrMode::SelfTrusted).then_some(&self.key2)
    }

    /// The payload bytes, to be put in a QR code as a single byte-mode segment.
    ///
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let flow_id = self.flow_id.as_bytes();
        // Guaranteed by every constructor: the length came from, or was checked
        // against, a u16.
        let flow_len = u16::try_from(flow_id.len()).expect("flow id length checked on construction");
        let mut out = Vec::with_capacity(HEADER_LEN + flow_id.len() + 2 * QR_KEY_LEN + self.secret.len());
        out.extend_from_slice(QR_PREFIX);
        out.push(QR_VERSION);
        out.push(self.mode.as_byte());
        out.extend_from_slice(&flow_len.to_be_bytes());
        out.extend_from_slice(flow_id);
        out.extend_from_slice(&self.key1);
        out.extend_from_slice(&self.key2);
        out.extend_from_slice(self.secret.as_bytes());
        out
    }

    /// Parses and validates payload bytes as read from a QR code (the raw bytes of its
    /// byte segment — not a text string re-encoded as UTF-8).
    ///
    /// Rejects, with the first reason found (see [`QrDecodeError`]): wrong prefix,
    /// version other than `0x02`, unknown or login mode, truncation, non-UTF-8 flow id,
    /// a secret shorter than [`QR_MIN_SECRET_LEN`], keys that are not Ed25519 points.
    /// A flow id length that is too *small* cannot be detected here (the secret just gets
    /// longer); the scanner's key comparison catches it.
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    pub fn decode(bytes: &[u8]) -> Result<QrPayload, QrDecodeError> {
        let payload = QrPayload::decode_unchecked(bytes)?;
        payload.validate()?;
        Ok(payload)
    }

    /// Structural parse only: like [`QrPayload::decode`] but without the secret length
    /// and Ed25519 point checks (this is what mautrix-go does).
    ///
    /// For diagnostics and for test vectors whose keys are placeholders; a scanner must
    /// use [`QrPayload::decode`]. A payload from here may hold invalid keys or a short
    /// secret; it still re-encodes to the same bytes.
    /// Spec: [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
    pub fn decode_unchecked(bytes: &[u8]) -> Result<QrPayload, QrDecodeError> {
        // The header is checked field by field, so a short input that is a correct
        // beginning reports truncation while a wrong byte reports what is wrong.
        let prefix_len = bytes.len().min(QR_PREFIX.len());
        if bytes[..prefix_len] != QR_PREFIX[..prefix_len] {
            return Err(QrDecodeError::WrongPrefix);
        }
        let truncated = || QrDecodeError::TruncatedHeader { len: bytes.len() };
        let version = *bytes.get(6).ok_or_else(truncated)?;
        if version != QR_VERSION {
            return Err(QrDecodeError::UnsupportedVersion(version));
        }
        let mode_byte = *bytes.get(7).ok_or_else(truncated)?;
        let mode = match QrMode::from_byte(mode_byte) {
            Some(mode) => mode,
            None if matches!(mode_byte, 0x03 | 0x04) => {
                return Err(QrDecodeError::LoginMode(mode_byte));
            }
            None => return Err(QrDecodeError::UnknownMode(mode_byte)),
        };
        let len_bytes: [u8; 2] = bytes.get(8..HEADER_LEN).ok_or_else(truncated)?.try_into().expect("slice of length 2");
        let flow_len = usize::from(u16::from_be_bytes(len_bytes));

        let rest = &bytes[HEADER_LEN..];
        if rest.len() < flow_len {
            return Err(QrDecodeError::TruncatedFlowId { declared: flow_len, available: rest.len() });
        }
        let (flow_id, rest) = rest.split_at(flow_len);
        if rest.len() < 2 * QR_KEY_LEN {
            return Err(QrDecodeError::TruncatedKeys { available: rest.len() });
        }
        let (key1, rest) = rest.split_at(QR_KEY_LEN);
        let (key2, secret) = rest.split_at(QR_KEY_LEN);
        let flow_id = std::str::from_utf8(flow_id).map_err(|_| QrDecodeError::FlowIdNotUtf8)?;

        Ok(QrPayload {
            mode,
            flow_id: flow_id.to_owned(),
            key1: key1.try_into().expect("32-byte slice"),
            key2: key2.try_into().expect("32-byte slice"),
            secret: QrSecret(secret.to_vec()),
        })
    }

    /// The semantic checks shared by [`QrPayload::new`] and [`QrPayload::decode`].
    fn validate(&self) -> Result<(), QrDecodeError> {
        if self.secret.len() < QR_MIN_SECRET_LEN {
            return Err(QrDecodeError::SecretTooShort { len: self.secret.len() });
        }
        if !is_ed25519_point(&self.key1) {
            return Err(QrDecodeError::InvalidKey(QrKeyPosition::First));
        }
        if !is_ed25519_point(&self.key2) {
            return Err(QrDecodeError::InvalidKey(QrKeyPosition::Second));
        }
        Ok(())
    }
}

/// Whether 32 bytes are the compressed encoding of a point on the Ed25519 curve (the
/// check an Ed25519 public key parser makes; matrix-rust-sdk rejects QR keys failing it).
fn is_ed25519_point(key: &[u8; 32]) -> bool {
    CompressedEdwardsY(*key).decompress().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_bytes_round_trip() {
        for mode in [QrMode::OtherUser, QrMode::SelfTrusted, QrMode::SelfUntrusted] {
            assert_eq!(QrMode::from_byte(mode.as_byte()), Some(mode));
        }
        for byte in 3..=u8::MAX {
            assert_eq!(QrMode::from_byte(byte), None);
        }
    }

    #[test]
    fn secret_debug_hides_bytes() {
        let secret = QrSecret::from_bytes(b"supersecret!".to_vec());
        let debug = format!("{secret:?}");
        assert!(!debug.contains("supersecret"), "{debug}");
        assert!(!debug.contains("115"), "{debug}"); // b's' as a number
        assert!(debug.contains("len: 12"), "{debug}");
    }

    #[test]
    fn secret_base64_is_unpadded_and_accepts_padding() {
        let secret = QrSecret::from_bytes(b"12345678".to_vec());
        assert_eq!(secret.to_base64(), "MTIzNDU2Nzg");
        assert_eq!(QrSecret::from_base64("MTIzNDU2Nzg").unwrap(), secret);
        assert_eq!(QrSecret::from_base64("MTIzNDU2Nzg=").unwrap(), secret);
        assert_eq!(QrSecret::from_base64("MTIz*DU2Nzg"), Err(QrSecretDecodeError));
    }

    #[test]
    fn secret_equality() {
        let a = QrSecret::from_bytes(vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(a, a.clone());
        assert_ne!(a, QrSecret::from_bytes(vec![1, 2, 3, 4, 5, 6, 7, 9]));
        assert_ne!(a, QrSecret::from_bytes(vec![1, 2, 3, 4, 5, 6, 7]));
    }

    #[test]
    fn generate_uses_the_filler() {
        let secret = QrSecret::generate(|buf| {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = i as u8;
            }
        });
        assert_eq!(secret.len(), QR_GENERATED_SECRET_LEN);
        assert_eq!(secret.as_bytes()[15], 15);
    }
}
