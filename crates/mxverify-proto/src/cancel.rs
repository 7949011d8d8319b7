//! Cancellation: the codes, the reasons sent on the wire, the local causes shown to people, and the
//! error-loop rule ([spec: `m.key.verification.cancel`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationcancel)).

use std::fmt;

/// A cancel code (CX-02). Unknown codes, including custom ones in Java package naming, are kept
/// as [`CancelCode::Custom`] and round-trip unchanged (FW-09, EV-CN-02).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CancelCode {
    /// `m.user`: the user cancelled or rejected.
    User,
    /// `m.timeout`: the verification timed out.
    Timeout,
    /// `m.unknown_transaction`: an event for a flow the device does not know.
    UnknownTransaction,
    /// `m.unknown_method`: the device cannot handle the method, or there is nothing in common.
    UnknownMethod,
    /// `m.unexpected_message`: a message out of sequence, or colliding starts of different methods.
    UnexpectedMessage,
    /// `m.key_mismatch`: a key was not verified.
    KeyMismatch,
    /// `m.user_mismatch`: the user verified was not the expected one.
    UserMismatch,
    /// `m.invalid_message`: a malformed or invalid message.
    InvalidMessage,
    /// `m.accepted`: another device accepted the request.
    Accepted,
    /// `m.mismatched_commitment`: the SAS commitment did not match.
    MismatchedCommitment,
    /// `m.mismatched_sas`: the user says the short authentication strings differ.
    MismatchedSas,
    /// Any other code (kept verbatim).
    Custom(String),
}

impl CancelCode {
    /// The eleven codes the spec defines.
    pub const SPEC: [CancelCode; 11] = [
        Self::User,
        Self::Timeout,
        Self::UnknownTransaction,
        Self::UnknownMethod,
        Self::UnexpectedMessage,
        Self::KeyMismatch,
        Self::UserMismatch,
        Self::InvalidMessage,
        Self::Accepted,
        Self::MismatchedCommitment,
        Self::MismatchedSas,
    ];

    /// The code on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Self::User => "m.user",
            Self::Timeout => "m.timeout",
            Self::UnknownTransaction => "m.unknown_transaction",
            Self::UnknownMethod => "m.unknown_method",
            Self::UnexpectedMessage => "m.unexpected_message",
            Self::KeyMismatch => "m.key_mismatch",
            Self::UserMismatch => "m.user_mismatch",
            Self::InvalidMessage => "m.invalid_message",
            Self::Accepted => "m.accepted",
            Self::MismatchedCommitment => "m.mismatched_commitment",
            Self::MismatchedSas => "m.mismatched_sas",
            Self::Custom(s) => s,
        }
    }

    /// Parses a wire code; never fails.
    pub fn from_wire(s: &str) -> Self {
        Self::SPEC.into_iter().find(|c| c.as_str() == s).unwrap_or_else(|| Self::Custom(s.to_owned()))
    }

    /// The short, fixed reason we put on the wire with this code (EV-CN-01).
    pub fn default_reason(&self) -> &'static str {
        match self {
            Self::User => "The user cancelled the verification.",
            Self::Timeout => "The verification timed out.",
            Self::UnknownTransaction => "The device does not know this verification.",
            Self::UnknownMethod => "The device cannot handle the requested method.",
            Self::UnexpectedMessage => "The device received an unexpected message.",
            Self::KeyMismatch => "The key was not verified.",
            Self::UserMismatch => "The expected user did not match the user verified.",
            Self::InvalidMessage => "The message received was invalid.",
            Self::Accepted => "The request was accepted by another device.",
            Self::MismatchedCommitment => "The hash commitment did not match.",
            Self::MismatchedSas => "The short authentication strings did not match.",
            Self::Custom(_) => "The verification was cancelled.",
        }
    }

    /// What a person should hear about this code, whoever sent it.
    pub fn explanation(&self) -> &'static str {
        match self {
            Self::User => "the verification was declined or cancelled by a person",
            Self::Timeout => "nobody finished the verification in time",
            Self::UnknownTransaction => "the other device did not recognise this verification",
            Self::UnknownMethod => "the two devices have no verification method in common",
            Self::UnexpectedMessage => "a message arrived out of order",
            Self::KeyMismatch => "a key could not be verified",
            Self::UserMismatch => "a message came from a different user than the one being verified",
            Self::InvalidMessage => "a message was malformed",
            Self::Accepted => "another device answered the request",
            Self::MismatchedCommitment => "the other device's key did not match its commitment",
            Self::MismatchedSas => "the emoji or numbers did not match",
            Self::Custom(_) => "the other side gave a reason this program does not know",
        }
    }
}

impl fmt::Display for CancelCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which local check or event led to a cancellation. This is for people and logs; only the
/// [`CancelCode`] and a short reason go on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Both sides sent `start` with different methods (ST-04).
    StartCollision,
    /// The accepter's key does not hash to its commitment (SQ-05).
    CommitmentMismatch,
    /// The ephemeral key was a low-order point (SQ-13).
    NonContributoryKey,
    /// The `keys` MAC over the key list did not verify (MV-01).
    KeyListMacMismatch,
    /// The MAC of this key ID did not verify (MV-02).
    KeyMacMismatch(String),
    /// No key in the MAC message could be verified (TR-04).
    NothingVerified,
    /// The other device's or user's keys changed during the flow (TR-01).
    KeysChanged,
    /// The other user has a device whose ID equals a cross-signing key (TR-02).
    DeviceIdClashesWithCrossSigningKey(String),
    /// The other device's keys are not known, so it cannot be verified.
    DeviceKeysUnknown(String),
    /// A second attempt by the same device while one was in progress (CX-03).
    MultipleAttempts,
    /// Another of the other user's devices answered our request first (RQ-09).
    OtherDeviceAnswered,
    /// One of our own devices answered the request (RQ-10, RQ-11).
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

/// Everything known about how a flow was cancelled (CX-02, EV-CN-02).
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

/// The state of the flow an offending message belongs to, as the error-loop rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlowStatus {
    /// No flow with this id exists (or it was forgotten).
    Unknown,
    /// A flow that has not ended.
    Active,
    /// A flow that ended (done or cancelled, by either side).
    Ended,
}

/// Which transport an incoming message came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    ToDevice,
    Room,
}

/// The error-loop rule (CX-04, CX-06, CX-07, EV-RQI-05), in one place: given a problem with an
/// incoming message, whether to answer with a cancel and which code.
///
/// * never answer a cancel;
/// * never send anything for a flow that has ended;
/// * an unknown to-device flow gets `m.unknown_transaction`, except for messages that may open a
///   flow (`request`, and a `start` of a method that can begin without a request);
/// * never answer in-room events of flows that are not ours;
/// * an active flow is cancelled with `wanted` (the flow then ends, so at most one cancel is sent).
pub(crate) fn verdict(
    incoming: crate::wire::MsgKind,
    may_open_flow: bool,
    via: Via,
    status: FlowStatus,
    wanted: CancelCode,
) -> Option<CancelCode> {
    use crate::wire::MsgKind;
    if incoming == MsgKind::Cancel {
        return None;
    }
    match status {
        FlowStatus::Ended => None,
        // A request, or a start that can open a flow (ST-06), is not an unknown transaction.
        FlowStatus::Unknown if via == Via::Room || may_open_flow => None,
        FlowStatus::Unknown => Some(CancelCode::UnknownTransaction),
        FlowStatus::Active => Some(wanted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MsgKind;

    #[test]
    fn codes_round_trip() {
        for code in CancelCode::SPEC {
            assert_eq!(CancelCode::from_wire(code.as_str()), code);
        }
        let custom = CancelCode::from_wire("org.example.custom");
        assert_eq!(custom, CancelCode::Custom("org.example.custom".into()));
        assert_eq!(custom.as_str(), "org.example.custom");
    }

    #[test]
    fn error_loop_rule() {
        let all = [
            MsgKind::Request,
            MsgKind::Ready,
            MsgKind::Start,
            MsgKind::Accept,
            MsgKind::Key,
            MsgKind::Mac,
            MsgKind::Done,
            MsgKind::Cancel,
        ];
        for kind in all {
            for via in [Via::ToDevice, Via::Room] {
                for status in [FlowStatus::Unknown, FlowStatus::Active, FlowStatus::Ended] {
                    let v = verdict(kind, false, via, status, CancelCode::InvalidMessage);
                    if kind == MsgKind::Cancel || status == FlowStatus::Ended {
                        assert_eq!(v, None, "{kind:?} {via:?} {status:?}");
                    }
                }
                assert_eq!(verdict(kind, true, Via::Room, FlowStatus::Unknown, CancelCode::User), None);
            }
        }
        assert_eq!(
            verdict(MsgKind::Key, false, Via::ToDevice, FlowStatus::Unknown, CancelCode::User),
            Some(CancelCode::UnknownTransaction)
        );
        assert_eq!(verdict(MsgKind::Start, true, Via::ToDevice, FlowStatus::Unknown, CancelCode::User), None);
        // A reciprocation cannot open a flow: for an unknown flow it is an unknown transaction.
        assert_eq!(
            verdict(MsgKind::Start, false, Via::ToDevice, FlowStatus::Unknown, CancelCode::User),
            Some(CancelCode::UnknownTransaction)
        );
        assert_eq!(
            verdict(MsgKind::Mac, false, Via::Room, FlowStatus::Active, CancelCode::KeyMismatch),
            Some(CancelCode::KeyMismatch)
        );
    }
}
