//! Cancellation ([spec: `m.key.verification.cancel`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationcancel)):
//! the codes, the reasons sent on the wire, and the local causes shown to people. Whether a cancel
//! goes on the wire at all is decided inside the machine by one rule: never answer a cancel, send
//! nothing after a flow ended (or after our `done`), answer an unknown to-device flow at most once
//! and never for a `request` or `start`, never answer in-room events of flows that are not ours.
//!
//! ```
//! use mxverify_proto::{CancelCode, CancelInfo, LocalCause};
//!
//! let info = CancelInfo {
//!     by_us: true,
//!     code: CancelCode::MismatchedSas,
//!     reason: CancelCode::MismatchedSas.default_reason().to_owned(),
//!     cause: Some(LocalCause::UserSaidMismatch),
//!     sent: true,
//! };
//! assert!(info.explain().starts_with("This device cancelled the verification (m.mismatched_sas)"));
//! assert_eq!(CancelCode::from_wire("org.example.busy"), CancelCode::Custom("org.example.busy".into()));
//! ```

use std::fmt;

pub use crate::wire::CancelCode;

/// Which local check or event led to a cancellation. This is for people and logs; only the
/// [`CancelCode`] and a short reason go on the wire.
///
/// Spec: [error and exception handling](https://spec.matrix.org/v1.19/client-server-api/#error-and-exception-handling).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalCause {
    /// The user cancelled.
    UserCancelled,
    /// The user said the emoji or numbers differ.
    UserSaidMismatch,
    /// A deadline passed; the text says which.
    TimedOut(&'static str),
    /// No common key agreement, hash, MAC or SAS method; the text names which.
    NoCommonMethod(&'static str),
    /// The other side started a method we do not support.
    UnsupportedMethod(String),
    /// The other side's accept chose something we did not offer; the text names the field.
    AcceptNotOffered(&'static str),
    /// A message arrived in a state where it is not allowed.
    Unexpected {
        /// The event type received.
        message: &'static str,
        /// The state the flow was in.
        state: &'static str,
    },
    /// A field was missing or malformed.
    Malformed(crate::wire::WireError),
    /// Both sides sent `start` with different methods.
    StartCollision,
    /// The accepter's key does not hash to its commitment.
    CommitmentMismatch,
    /// The ephemeral key was a low-order point: the shared secret would not depend on ours.
    NonContributoryKey,
    /// The `keys` MAC over the key list did not verify.
    KeyListMacMismatch,
    /// The MAC of this key ID did not verify.
    KeyMacMismatch(String),
    /// No key in the MAC message could be verified.
    NothingVerified,
    /// The other device's or user's keys changed during the flow.
    KeysChanged,
    /// The other device's or user's keys changed after we sent `done`: nothing is verified, and
    /// no cancel went on the wire after our `done`.
    KeysChangedAfterDone,
    /// The other user has a device whose ID equals a cross-signing key: the spec requires
    /// refusing to verify them ([key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)).
    DeviceIdClashesWithCrossSigningKey(String),
    /// The other device's keys are not known, so it cannot be verified.
    DeviceKeysUnknown(String),
    /// A second attempt by the same device while one was in progress.
    MultipleAttempts,
    /// Another of the other user's devices answered our request first.
    OtherDeviceAnswered,
    /// One of our own devices answered the request.
    AnsweredByOwnDevice,
    /// This device lost the flow's state (it restarted in the middle) and ended it.
    Abandoned,
    /// The QR code did not match what we expected; the text says which part.
    QrMismatch(String),
}

impl fmt::Display for LocalCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UserCancelled => f.write_str("you cancelled"),
            Self::UserSaidMismatch => f.write_str("you said the emoji or numbers do not match"),
            Self::TimedOut(what) => f.write_str(what),
            Self::NoCommonMethod(what) => write!(f, "no {what} in common"),
            Self::UnsupportedMethod(m) => {
                write!(f, "the other side started the unsupported method {m:?}")
            }
            Self::AcceptNotOffered(field) => {
                write!(f, "the accept chose a {field} we did not offer")
            }
            Self::Unexpected { message, state } => write!(f, "received {message} while {state}"),
            Self::Malformed(e) => write!(f, "malformed message: {e}"),
            Self::StartCollision => f.write_str("both sides started different methods at once"),
            Self::CommitmentMismatch => f.write_str("the other side's key does not match its commitment"),
            Self::NonContributoryKey => f.write_str("the other side sent a low-order ephemeral key"),
            Self::KeyListMacMismatch => f.write_str("the MAC of the key list did not verify"),
            Self::KeyMacMismatch(id) => write!(f, "the MAC of key {id} did not verify"),
            Self::NothingVerified => f.write_str("the MAC message contained no key we could verify"),
            Self::KeysChanged => f.write_str("the other side's keys changed during the verification"),
            Self::KeysChangedAfterDone => {
                f.write_str("the other side's keys changed after this device finished; nothing was verified")
            }
            Self::DeviceIdClashesWithCrossSigningKey(d) => {
                write!(f, "the other user has a device ID {d:?} equal to a cross-signing key")
            }
            Self::DeviceKeysUnknown(d) => write!(f, "the keys of device {d} are not known"),
            Self::MultipleAttempts => f.write_str("the other device started a second verification at the same time"),
            Self::OtherDeviceAnswered => f.write_str("another of their devices answered first"),
            Self::AnsweredByOwnDevice => f.write_str("another of your devices answered the request"),
            Self::Abandoned => {
                f.write_str("this device restarted in the middle of the verification and lost its state")
            }
            Self::QrMismatch(what) => write!(f, "the QR code did not match: {what}"),
        }
    }
}

/// Everything known about how a flow was cancelled: by whom, the code and reason (sent or
/// received), our local cause, and whether a cancel went on the wire.
///
/// Spec: [`m.key.verification.cancel`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationcancel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelInfo {
    /// `true` if this device cancelled, `false` if the other side did.
    pub by_us: bool,
    /// The code (sent or received).
    pub code: CancelCode,
    /// The reason (sent or received); received reasons are shown only for unknown codes.
    pub reason: String,
    /// For our own cancels: which check or action caused it.
    pub cause: Option<LocalCause>,
    /// Whether a cancel event went on the wire for this (false for silent endings such as a prompt
    /// that expired, or a request answered by another of our devices).
    pub sent: bool,
}

impl CancelInfo {
    /// One plain sentence: who cancelled, why, and what to do next.
    #[must_use]
    pub fn explain(&self) -> String {
        // RQ-10, RQ-11: another of our devices took the request; nothing went wrong.
        if self.code == CancelCode::Accepted || self.cause == Some(LocalCause::AnsweredByOwnDevice) {
            return "Another of your devices answered this request; it continues there (m.accepted).".to_owned();
        }
        let why = match (&self.cause, self.by_us, &self.code) {
            (Some(cause), true, _) => cause.to_string(),
            // EV-CN-02: the reason is for codes we do not understand.
            (_, false, CancelCode::Custom(_)) if !self.reason.is_empty() => {
                format!("they said “{}”", self.reason)
            }
            _ => self.code.explanation().to_owned(),
        };
        let who = if self.by_us {
            "This device cancelled the verification"
        } else {
            "The other side cancelled the verification"
        };
        let next = match self.code {
            CancelCode::KeyMismatch | CancelCode::MismatchedCommitment | CancelCode::MismatchedSas => {
                "Nothing was verified and this may be an attack: do not trust the other device, check with its owner in person, and try again."
            }
            CancelCode::User => "Nothing was verified; start a new verification if you still want one.",
            CancelCode::Timeout => "Nothing was verified; start again and answer on both devices within a few minutes.",
            _ => "Nothing was verified; try again, and update the other client if it keeps happening.",
        };
        format!("{who} ({}): {why}. {next}", self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in CancelCode::SPEC {
            assert_eq!(CancelCode::from_wire(code.as_str()), code);
        }
        let custom = CancelCode::from_wire("org.example.custom");
        assert_eq!(custom, CancelCode::Custom("org.example.custom".into()));
        assert_eq!(custom.as_str(), "org.example.custom");
    }
}
