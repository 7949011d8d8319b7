//! One message model for all verification events over both transports, and its codec
//! ([spec: key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)).
//!
//! The transport shows only at the edge: to-device contents carry `transaction_id`, in-room
//! contents carry `m.relates_to` (and the in-room request is an `m.room.message`). Parsing is
//! strict about required fields and their types and tolerant of unknown extra fields, methods and
//! cancel codes, which are kept verbatim.
//!
//! ```
//! use mxverify_proto::wire::{self, Envelope, Msg, MsgKind};
//! use serde_json::json;
//!
//! let content = json!({"transaction_id": "t1", "key": "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyMTI"});
//! let parsed = wire::parse("m.key.verification.key", &content, false, None).unwrap();
//! assert_eq!((parsed.kind, parsed.flow_id.as_deref()), (MsgKind::Key, Some("t1")));
//! let msg = parsed.msg.unwrap();
//! // The same message in a room carries the relation instead of the transaction id.
//! let (event_type, room) = wire::encode(&msg, &Envelope::Room(Some("$request".into())));
//! assert_eq!(event_type, "m.key.verification.key");
//! assert_eq!(room.to_value()["m.relates_to"], json!({"rel_type": "m.reference", "event_id": "$request"}));
//! // It is canonical JSON text, ready to send.
//! assert_eq!(room.as_str(), r#"{"key":"Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyMTI","m.relates_to":{"event_id":"$request","rel_type":"m.reference"}}"#);
//! assert!(matches!(msg, Msg::Key(_)));
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::types::Content;
use crate::{b64, canonical};

/// A cancel code. Unknown codes, including custom ones in Java package naming, are kept as
/// [`CancelCode::Custom`] and round-trip unchanged; a receiver treats them as a cancellation too.
///
/// Spec: [`m.key.verification.cancel`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationcancel).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
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
    #[must_use]
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
    #[must_use]
    pub fn from_wire(s: &str) -> Self {
        Self::SPEC.into_iter().find(|c| c.as_str() == s).unwrap_or_else(|| Self::Custom(s.to_owned()))
    }

    /// The short, fixed reason we put on the wire with this code (the `reason` field).
    #[must_use]
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
    #[must_use]
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

/// The eight kinds of verification event.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MsgKind {
    /// `m.key.verification.request` (or the in-room `m.room.message` form).
    Request,
    /// `m.key.verification.ready`.
    Ready,
    /// `m.key.verification.start`.
    Start,
    /// `m.key.verification.accept`.
    Accept,
    /// `m.key.verification.key`.
    Key,
    /// `m.key.verification.mac`.
    Mac,
    /// `m.key.verification.done`.
    Done,
    /// `m.key.verification.cancel`.
    Cancel,
}

impl MsgKind {
    const ALL: [MsgKind; 8] =
        [Self::Request, Self::Ready, Self::Start, Self::Accept, Self::Key, Self::Mac, Self::Done, Self::Cancel];

    /// The `m.key.verification.*` event type.
    #[must_use]
    pub fn event_type(self) -> &'static str {
        match self {
            Self::Request => "m.key.verification.request",
            Self::Ready => "m.key.verification.ready",
            Self::Start => "m.key.verification.start",
            Self::Accept => "m.key.verification.accept",
            Self::Key => "m.key.verification.key",
            Self::Mac => "m.key.verification.mac",
            Self::Done => "m.key.verification.done",
            Self::Cancel => "m.key.verification.cancel",
        }
    }

    /// The kind for an `m.key.verification.*` event type.
    #[must_use]
    pub fn from_event_type(event_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.event_type() == event_type)
    }
}

/// A verification method name. Unknown names are kept.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework), [SAS](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification),
/// [QR codes](https://spec.matrix.org/v1.19/client-server-api/#qr-codes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Method {
    /// `m.sas.v1`.
    SasV1,
    /// `m.qr_code.show.v1`: can show a QR code.
    QrShowV1,
    /// `m.qr_code.scan.v1`: can scan a QR code.
    QrScanV1,
    /// `m.reciprocate.v1`: the QR reciprocation.
    ReciprocateV1,
    /// Anything else, verbatim.
    Custom(String),
}

impl Method {
    /// The name on the wire.
    #[must_use]
    pub fn as_str(&self) -> &str {
        match self {
            Self::SasV1 => "m.sas.v1",
            Self::QrShowV1 => "m.qr_code.show.v1",
            Self::QrScanV1 => "m.qr_code.scan.v1",
            Self::ReciprocateV1 => "m.reciprocate.v1",
            Self::Custom(s) => s,
        }
    }

    /// Parses a wire name; never fails.
    #[must_use]
    pub fn from_wire(s: &str) -> Self {
        match s {
            "m.sas.v1" => Self::SasV1,
            "m.qr_code.show.v1" => Self::QrShowV1,
            "m.qr_code.scan.v1" => Self::QrScanV1,
            "m.reciprocate.v1" => Self::ReciprocateV1,
            other => Self::Custom(other.to_owned()),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares with a method's wire name.
impl PartialEq<str> for Method {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Method {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The methods a peer offered, as a flow keeps them until it is forgotten. The usual list (at most
/// five methods this crate knows) is packed into one integer, so that a waiting request holds no
/// allocation for it: with a million flows each allocation is a cache miss when it is read or
/// freed. Any other list (a custom method, more entries) is kept as it came. Either way the list
/// reads back exactly as offered, order and repeats included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Methods {
    /// Up to five known methods in their order, three bits each (codes 1–4; 0 ends the list).
    Packed(u16),
    /// Any other list, verbatim.
    Listed(Box<[Method]>),
}

impl Methods {
    const KNOWN: [Method; 4] = [Method::SasV1, Method::QrShowV1, Method::QrScanV1, Method::ReciprocateV1];

    fn code(method: &Method) -> Option<u16> {
        Self::KNOWN.iter().position(|k| k == method).map(|i| i as u16 + 1)
    }

    /// The packed codes, in order.
    fn codes(packed: u16) -> impl Iterator<Item = u16> {
        (0..5).map(move |i| (packed >> (3 * i)) & 7).take_while(|c| *c != 0)
    }

    pub(crate) fn contains(&self, method: &Method) -> bool {
        match self {
            Self::Packed(packed) => Self::code(method).is_some_and(|c| Self::codes(*packed).any(|x| x == c)),
            Self::Listed(list) => list.contains(method),
        }
    }

    /// The list as offered.
    pub(crate) fn to_vec(&self) -> Vec<Method> {
        match self {
            Self::Packed(packed) => Self::codes(*packed).map(|c| Self::KNOWN[usize::from(c) - 1].clone()).collect(),
            Self::Listed(list) => list.to_vec(),
        }
    }
}

impl From<Vec<Method>> for Methods {
    fn from(list: Vec<Method>) -> Self {
        let packed = (list.len() <= 5)
            .then(|| list.iter().enumerate().try_fold(0, |acc, (i, m)| Some(acc | Self::code(m)? << (3 * i))))
            .flatten();
        match packed {
            Some(packed) => Self::Packed(packed),
            None => Self::Listed(list.into_boxed_slice()),
        }
    }
}

impl serde::Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `m.key.verification.request` content, to-device or in a room (`m.room.message` with that
/// `msgtype`).
///
/// Spec: [`m.key.verification.request`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationrequest),
/// [`m.room.message` with `msgtype: m.key.verification.request`](https://spec.matrix.org/v1.19/client-server-api/#mroommessagemkeyverificationrequest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The requesting device.
    pub from_device: String,
    /// The methods the requester supports.
    pub methods: Vec<Method>,
    /// To-device only: when the request was made (POSIX milliseconds).
    pub timestamp: Option<u64>,
    /// In-room only: the user the request is for.
    pub to: Option<String>,
}

/// `m.key.verification.ready` content.
///
/// Spec: [`m.key.verification.ready`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationready).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The accepting device.
    pub from_device: String,
    /// Its methods.
    pub methods: Vec<Method>,
}

/// The offer of an `m.sas.v1` start. Lists are kept verbatim, unknown entries included.
///
/// Spec: [`m.key.verification.start` with `m.sas.v1`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationstartmsasv1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasOffer {
    /// `key_agreement_protocols`.
    pub key_agreement_protocols: Vec<String>,
    /// `hashes`.
    pub hashes: Vec<String>,
    /// `message_authentication_codes`.
    pub message_authentication_codes: Vec<String>,
    /// `short_authentication_string`.
    pub short_authentication_string: Vec<String>,
}

/// What a start asks for.
///
/// Spec: [`m.key.verification.start`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationstart).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartMethod {
    /// `m.sas.v1` with its offer.
    Sas(SasOffer),
    /// `m.reciprocate.v1` with the QR secret (unpadded base64).
    Reciprocate {
        /// The shared secret read from the QR code.
        secret: String,
    },
    /// A method this implementation does not know (answered with `m.unknown_method`).
    Other(String),
}

/// `m.key.verification.start` content.
///
/// Spec: [`m.key.verification.start`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationstart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The starting device.
    pub from_device: String,
    /// The method and its parameters.
    pub method: StartMethod,
}

/// `m.key.verification.accept` content. `method` is not required from others: the spec's schema
/// lists it as required but no longer defines it.
///
/// Spec: [`m.key.verification.accept`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationaccept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// The chosen key agreement protocol.
    pub key_agreement_protocol: String,
    /// The chosen hash.
    pub hash: String,
    /// The chosen MAC method.
    pub message_authentication_code: String,
    /// The SAS methods both sides understand.
    pub short_authentication_string: Vec<String>,
    /// The commitment (unpadded base64 SHA-256).
    pub commitment: String,
}

/// `m.key.verification.mac` content.
///
/// Spec: [`m.key.verification.mac`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationmac).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacMsg {
    /// Key ID → MAC.
    pub mac: BTreeMap<String, String>,
    /// MAC of the sorted, comma-joined key IDs.
    pub keys: String,
}

/// `m.key.verification.cancel` content.
///
/// Spec: [`m.key.verification.cancel`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationcancel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancel {
    /// The code (unknown codes kept).
    pub code: CancelCode,
    /// The human-readable reason.
    pub reason: String,
}

/// A verification message, independent of transport.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Msg {
    /// `m.key.verification.request`.
    Request(Request),
    /// `m.key.verification.ready`.
    Ready(Ready),
    /// `m.key.verification.start`.
    Start(Start),
    /// `m.key.verification.accept`.
    Accept(Accept),
    /// `m.key.verification.key`: the sender's ephemeral public key, unpadded base64.
    Key(String),
    /// `m.key.verification.mac`.
    Mac(MacMsg),
    /// `m.key.verification.done`.
    Done,
    /// `m.key.verification.cancel`.
    Cancel(Cancel),
}

impl Msg {
    /// The device a `ready` or `start` says it comes from (`from_device`).
    pub(crate) fn named_device(&self) -> Option<&str> {
        match self {
            Self::Ready(r) => Some(&r.from_device),
            Self::Start(s) => Some(&s.from_device),
            _ => None,
        }
    }

    /// The kind of this message.
    #[must_use]
    pub fn kind(&self) -> MsgKind {
        match self {
            Self::Request(_) => MsgKind::Request,
            Self::Ready(_) => MsgKind::Ready,
            Self::Start(_) => MsgKind::Start,
            Self::Accept(_) => MsgKind::Accept,
            Self::Key(_) => MsgKind::Key,
            Self::Mac(_) => MsgKind::Mac,
            Self::Done => MsgKind::Done,
            Self::Cancel(_) => MsgKind::Cancel,
        }
    }
}

/// Where a message's flow id lives: a to-device `transaction_id`, or in a room the request's
/// event ID in `m.relates_to`.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Envelope {
    /// To-device: `transaction_id` in the content.
    ToDevice(String),
    /// In-room: `m.relates_to` pointing at the request event (absent only on the request itself).
    Room(Option<String>),
}

/// What was wrong with a field.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework) (the event schemas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The field is required but absent.
    Missing,
    /// The field has the wrong JSON type; the text names the expected one.
    WrongType(&'static str),
    /// The field's value is not acceptable; the text says why.
    Invalid(&'static str),
}

/// A malformed message: which field, and what was wrong (answered with `m.invalid_message`).
///
/// Spec: [`m.key.verification.cancel`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationcancel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub struct WireError {
    /// The content field (dotted path).
    pub field: &'static str,
    /// The problem.
    pub problem: Problem,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problem {
            Problem::Missing => write!(f, "required field `{}` is missing", self.field),
            Problem::WrongType(t) => write!(f, "field `{}` must be {t}", self.field),
            Problem::Invalid(why) => write!(f, "field `{}` is invalid: {why}", self.field),
        }
    }
}

fn err(field: &'static str, problem: Problem) -> WireError {
    WireError { field, problem }
}

/// A parsed incoming event: its kind, its flow id if it has a usable one, and the message or the
/// reason it is malformed. A message without a usable flow id cannot be attributed to any flow and
/// is dropped without an answer.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The kind of event.
    pub kind: MsgKind,
    /// The flow id (to-device `transaction_id` or in-room related event id); `None` for an in-room
    /// request (its flow id is its own event id) or when missing/malformed.
    pub flow_id: Option<String>,
    /// The message, or what is wrong with it.
    pub msg: Result<Msg, WireError>,
}

/// The `msgtype` of the in-room request.
///
/// Spec: [`m.room.message` with `msgtype: m.key.verification.request`](https://spec.matrix.org/v1.19/client-server-api/#mroommessagemkeyverificationrequest).
pub const ROOM_REQUEST_MSGTYPE: &str = "m.key.verification.request";

/// Parses an event's content. `in_room` selects the transport; `relates_to_fallback` is the
/// `m.relates_to` of an encrypted event's cleartext wrapper (where the spec asks senders to put
/// it). Returns `None` for events that are not verification events at all.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
pub fn parse(event_type: &str, content: &Value, in_room: bool, relates_to_fallback: Option<&Value>) -> Option<Parsed> {
    let room_request = in_room
        && event_type == "m.room.message"
        && content.get("msgtype").and_then(Value::as_str) == Some(ROOM_REQUEST_MSGTYPE);
    let kind = if room_request {
        MsgKind::Request
    } else {
        let kind = MsgKind::from_event_type(event_type)?;
        // EV-RQ-02: the `m.key.verification.request` event type exists only as to-device.
        if in_room && kind == MsgKind::Request {
            return None;
        }
        kind
    };
    let Some(obj) = content.as_object() else {
        return Some(Parsed { kind, flow_id: None, msg: Err(err("content", Problem::WrongType("an object"))) });
    };
    let flow_id = if room_request {
        None
    } else if in_room {
        relation(obj.get("m.relates_to").or(relates_to_fallback))
    } else {
        obj.get("transaction_id").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
    };
    let msg = parse_body(kind, obj, in_room);
    Some(Parsed { kind, flow_id, msg })
}

fn relation(rel: Option<&Value>) -> Option<String> {
    let rel = rel?.as_object()?;
    // FW-06: `rel_type` can only be `m.reference`; anything else is not a verification relation.
    if rel.get("rel_type")?.as_str()? != "m.reference" {
        return None;
    }
    rel.get("event_id")?.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

fn string(obj: &Map<String, Value>, field: &'static str) -> Result<String, WireError> {
    match obj.get(field) {
        None => Err(err(field, Problem::Missing)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(err(field, Problem::WrongType("a string"))),
    }
}

fn device(obj: &Map<String, Value>) -> Result<String, WireError> {
    let d = string(obj, "from_device")?;
    if d.is_empty() {
        return Err(err("from_device", Problem::Invalid("empty device ID")));
    }
    Ok(d)
}

fn strings(obj: &Map<String, Value>, field: &'static str) -> Result<Vec<String>, WireError> {
    string_list(obj, field, str::to_owned)
}

fn methods(obj: &Map<String, Value>) -> Result<Vec<Method>, WireError> {
    string_list(obj, "methods", Method::from_wire)
}

/// A required array of strings, each read with `read`.
fn string_list<T>(
    obj: &Map<String, Value>,
    field: &'static str,
    read: impl Fn(&str) -> T,
) -> Result<Vec<T>, WireError> {
    match obj.get(field) {
        None => Err(err(field, Problem::Missing)),
        Some(Value::Array(items)) => {
            // Sized once: a waiting request keeps its method list, and memory per flow counts.
            let mut list = Vec::with_capacity(items.len());
            for item in items {
                list.push(read(item.as_str().ok_or(err(field, Problem::WrongType("an array of strings")))?));
            }
            Ok(list)
        }
        Some(_) => Err(err(field, Problem::WrongType("an array of strings"))),
    }
}

fn key32(obj: &Map<String, Value>, field: &'static str) -> Result<String, WireError> {
    let s = string(obj, field)?;
    if b64::decode32(&s).is_none() {
        return Err(err(field, Problem::Invalid("not 32 bytes of base64")));
    }
    Ok(s)
}

fn parse_body(kind: MsgKind, obj: &Map<String, Value>, in_room: bool) -> Result<Msg, WireError> {
    Ok(match kind {
        MsgKind::Request => {
            let from_device = device(obj)?;
            let methods = methods(obj)?;
            if in_room {
                let to = string(obj, "to")?;
                Msg::Request(Request { from_device, methods, timestamp: None, to: Some(to) })
            } else {
                let timestamp = match obj.get("timestamp") {
                    None => return Err(err("timestamp", Problem::Missing)),
                    Some(v) => v.as_u64().ok_or(err("timestamp", Problem::WrongType("a non-negative integer")))?,
                };
                Msg::Request(Request { from_device, methods, timestamp: Some(timestamp), to: None })
            }
        }
        MsgKind::Ready => Msg::Ready(Ready { from_device: device(obj)?, methods: methods(obj)? }),
        MsgKind::Start => {
            let from_device = device(obj)?;
            let method = match string(obj, "method")?.as_str() {
                "m.sas.v1" => StartMethod::Sas(SasOffer {
                    key_agreement_protocols: strings(obj, "key_agreement_protocols")?,
                    hashes: strings(obj, "hashes")?,
                    message_authentication_codes: strings(obj, "message_authentication_codes")?,
                    short_authentication_string: strings(obj, "short_authentication_string")?,
                }),
                "m.reciprocate.v1" => {
                    let secret = string(obj, "secret")?;
                    if b64::decode(&secret).is_none() {
                        return Err(err("secret", Problem::Invalid("not base64")));
                    }
                    StartMethod::Reciprocate { secret }
                }
                other => StartMethod::Other(other.to_owned()),
            };
            Msg::Start(Start { from_device, method })
        }
        MsgKind::Accept => Msg::Accept(Accept {
            key_agreement_protocol: string(obj, "key_agreement_protocol")?,
            hash: string(obj, "hash")?,
            message_authentication_code: string(obj, "message_authentication_code")?,
            short_authentication_string: strings(obj, "short_authentication_string")?,
            commitment: key32(obj, "commitment")?,
        }),
        MsgKind::Key => Msg::Key(key32(obj, "key")?),
        MsgKind::Mac => {
            let mac = match obj.get("mac") {
                None => return Err(err("mac", Problem::Missing)),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| {
                        v.as_str()
                            .map(|v| (k.clone(), v.to_owned()))
                            .ok_or(err("mac", Problem::WrongType("an object of strings")))
                    })
                    .collect::<Result<BTreeMap<_, _>, _>>()?,
                Some(_) => return Err(err("mac", Problem::WrongType("an object of strings"))),
            };
            if mac.is_empty() {
                return Err(err("mac", Problem::Invalid("no keys")));
            }
            Msg::Mac(MacMsg { mac, keys: string(obj, "keys")? })
        }
        MsgKind::Done => Msg::Done,
        // A cancel always ends its flow, however malformed (EV-CN-02, CX-06): missing or mistyped
        // fields are read as an unspecified code and an empty reason.
        MsgKind::Cancel => Msg::Cancel(Cancel {
            code: CancelCode::from_wire(obj.get("code").and_then(Value::as_str).unwrap_or("")),
            reason: obj.get("reason").and_then(Value::as_str).unwrap_or("").to_owned(),
        }),
    })
}

/// Encodes a message for the wire: the event type and the content. For an in-room request the
/// type is `m.room.message`, with a fallback `body` for clients that do not support verification.
/// The content is written straight to canonical JSON text (keys sorted, no whitespace; an integer
/// is written as it is, so a re-encoded peer's timestamp beyond 2^53 − 1 is valid JSON but not
/// canonical): it is what goes on the wire, and for our own `start` the SAS commitment covers the
/// same text, encoding being deterministic (CM-04).
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework),
/// [canonical JSON](https://spec.matrix.org/v1.19/appendices/#canonical-json).
pub fn encode(msg: &Msg, envelope: &Envelope) -> (&'static str, Content) {
    // No `Value` tree: this runs for every message sent, and building a map of owned strings to
    // serialise it right after costs more than the cryptography of some messages.
    let mut c = Fields::default();
    match msg {
        Msg::Request(r) => {
            c.put("from_device", Field::Str(&r.from_device));
            c.put("methods", Field::Methods(&r.methods));
            if let Some(ts) = r.timestamp {
                c.put("timestamp", Field::Int(ts));
            }
            if let Some(to) = &r.to {
                c.put("to", Field::Str(to));
                c.put("msgtype", Field::Str(ROOM_REQUEST_MSGTYPE));
                c.put("body", Field::RequestBody(to));
            }
        }
        Msg::Ready(r) => {
            c.put("from_device", Field::Str(&r.from_device));
            c.put("methods", Field::Methods(&r.methods));
        }
        Msg::Start(s) => {
            c.put("from_device", Field::Str(&s.from_device));
            match &s.method {
                StartMethod::Sas(o) => {
                    c.put("method", Field::Str("m.sas.v1"));
                    c.put("key_agreement_protocols", Field::Strs(&o.key_agreement_protocols));
                    c.put("hashes", Field::Strs(&o.hashes));
                    c.put("message_authentication_codes", Field::Strs(&o.message_authentication_codes));
                    c.put("short_authentication_string", Field::Strs(&o.short_authentication_string));
                }
                StartMethod::Reciprocate { secret } => {
                    c.put("method", Field::Str("m.reciprocate.v1"));
                    c.put("secret", Field::Str(secret));
                }
                StartMethod::Other(m) => c.put("method", Field::Str(m)),
            }
        }
        // `method` is sent because the spec's schema still lists it as required (EV-AC-02);
        // receivers ignore it and we never require it.
        Msg::Accept(a) => {
            c.put("method", Field::Str("m.sas.v1"));
            c.put("key_agreement_protocol", Field::Str(&a.key_agreement_protocol));
            c.put("hash", Field::Str(&a.hash));
            c.put("message_authentication_code", Field::Str(&a.message_authentication_code));
            c.put("short_authentication_string", Field::Strs(&a.short_authentication_string));
            c.put("commitment", Field::Str(&a.commitment));
        }
        Msg::Key(k) => c.put("key", Field::Str(k)),
        Msg::Mac(m) => {
            c.put("mac", Field::Macs(&m.mac));
            c.put("keys", Field::Str(&m.keys));
        }
        Msg::Done => {}
        Msg::Cancel(x) => {
            c.put("code", Field::Str(x.code.as_str()));
            c.put("reason", Field::Str(&x.reason));
        }
    }
    match envelope {
        Envelope::ToDevice(txn) => c.put("transaction_id", Field::Str(txn)),
        Envelope::Room(Some(event_id)) => c.put("m.relates_to", Field::Relation(event_id)),
        Envelope::Room(None) => {}
    }
    let event_type = match (msg, envelope) {
        (Msg::Request(_), Envelope::Room(_)) => "m.room.message",
        _ => msg.kind().event_type(),
    };
    (event_type, c.write())
}

/// One value of an outgoing content, borrowed from the message.
enum Field<'a> {
    Str(&'a str),
    Int(u64),
    Strs(&'a [String]),
    Methods(&'a [Method]),
    /// `{"mac": {key ID: MAC}}`: a `BTreeMap` of `String`s iterates in canonical key order.
    Macs(&'a BTreeMap<String, String>),
    /// `m.relates_to` of an in-room message after the request.
    Relation(&'a str),
    /// The fallback text of an in-room request for this user.
    RequestBody(&'a str),
}

/// The fields of one content (at most eight), written sorted by key.
#[derive(Default)]
struct Fields<'a> {
    items: [Option<(&'static str, Field<'a>)>; 8],
    len: usize,
}

impl<'a> Fields<'a> {
    fn put(&mut self, key: &'static str, value: Field<'a>) {
        self.items[self.len] = Some((key, value));
        self.len += 1;
    }

    fn write(mut self) -> Content {
        let items = &mut self.items[..self.len];
        // Canonical JSON orders keys by code point, which for UTF-8 is byte order.
        items.sort_unstable_by_key(|item| item.as_ref().map(|(key, _)| *key));
        let mut out = String::with_capacity(384);
        infallible(canonical::write_seq(&mut out, '{', '}', items.iter().flatten(), |(key, value), out| {
            canonical::write_key(key, out);
            value.write(out);
            Ok(())
        }));
        Content::from_canonical(out)
    }
}

/// What a [`canonical::write_seq`] whose items cannot fail returns.
fn infallible(written: Result<(), std::convert::Infallible>) {
    let Ok(()) = written;
}

impl Field<'_> {
    fn write(&self, out: &mut String) {
        fn list<'s>(items: impl Iterator<Item = &'s str>, out: &mut String) {
            infallible(canonical::write_seq(out, '[', ']', items, |item, out| {
                canonical::write_string(item, out);
                Ok(())
            }));
        }
        match self {
            Field::Str(s) => canonical::write_string(s, out),
            Field::Int(n) => {
                use fmt::Write;
                let _ = write!(out, "{n}");
            }
            Field::Strs(items) => list(items.iter().map(String::as_str), out),
            Field::Methods(items) => list(items.iter().map(Method::as_str), out),
            Field::Macs(macs) => infallible(canonical::write_seq(out, '{', '}', *macs, |(id, mac), out| {
                canonical::write_key(id, out);
                canonical::write_string(mac, out);
                Ok(())
            })),
            Field::Relation(event_id) => {
                out.push_str(r#"{"event_id":"#);
                canonical::write_string(event_id, out);
                out.push_str(r#","rel_type":"m.reference"}"#);
            }
            Field::RequestBody(to) => canonical::write_string(
                &format!("Key verification request for {to}. Your client does not support in-room key verification."),
                out,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Method lists as peers send them: the known methods and custom ones, in any order, repeats
    /// included, up to eight entries.
    fn method_list() -> impl proptest::strategy::Strategy<Value = Vec<Method>> {
        use proptest::prelude::*;
        let method = prop_oneof![
            4 => (0..4usize).prop_map(|i| Methods::KNOWN[i].clone()),
            1 => "[a-z.]{0,12}".prop_map(|s| Method::from_wire(&s)),
        ];
        proptest::collection::vec(method, 0..8)
    }

    proptest::proptest! {
        /// A flow's copy of the offered methods reads back exactly as offered and answers
        /// `contains` as the list does.
        #[test]
        fn offered_methods_read_back_as_offered(list in method_list()) {
            let kept = Methods::from(list.clone());
            proptest::prop_assert_eq!(kept.to_vec(), list.clone());
            for m in Methods::KNOWN.iter().chain([&Method::Custom("x".into())]) {
                proptest::prop_assert_eq!(kept.contains(m), list.contains(m), "{:?}", m);
            }
        }
    }

    #[test]
    fn usual_method_lists_need_no_allocation() {
        let usual = [
            vec![],
            vec![Method::SasV1],
            vec![Method::SasV1, Method::QrShowV1, Method::QrScanV1, Method::ReciprocateV1],
            vec![Method::ReciprocateV1, Method::SasV1, Method::SasV1, Method::QrScanV1, Method::QrShowV1],
        ];
        for list in usual {
            assert!(matches!(Methods::from(list.clone()), Methods::Packed(_)), "{list:?}");
        }
        let custom = vec![Method::SasV1, Method::Custom("org.example".into())];
        assert!(matches!(Methods::from(custom), Methods::Listed(_)));
        assert!(matches!(Methods::from(vec![Method::SasV1; 6]), Methods::Listed(_)), "six entries do not fit");
        assert_eq!(std::mem::size_of::<Methods>(), 16);
    }

    #[test]
    fn custom_codes_and_methods_round_trip() {
        let content = json!({"code": "org.example.nope", "reason": "x", "transaction_id": "t"});
        let p = parse("m.key.verification.cancel", &content, false, None).unwrap();
        let msg = p.msg.unwrap();
        assert_eq!(encode(&msg, &Envelope::ToDevice("t".into())).1.to_value(), content);
        let ready = json!({"from_device": "D", "methods": ["m.sas.v1", "org.example.method"], "transaction_id": "t"});
        let p = parse("m.key.verification.ready", &ready, false, None).unwrap();
        assert_eq!(encode(&p.msg.unwrap(), &Envelope::ToDevice("t".into())).1.to_value(), ready);
    }

    /// Every kind of message, in both transports, is written as canonical JSON and reads back as
    /// itself; strings that need escaping are escaped.
    #[test]
    fn encoded_content_is_canonical_and_round_trips() {
        let strs = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let offer = SasOffer {
            key_agreement_protocols: strs(&["curve25519-hkdf-sha256"]),
            hashes: strs(&["sha256"]),
            message_authentication_codes: strs(&["hkdf-hmac-sha256.v2", "x\"y"]),
            short_authentication_string: strs(&["emoji", "decimal"]),
        };
        let key = "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyMTI".to_owned();
        let msgs = [
            Msg::Request(Request {
                from_device: "D\n\u{1}".into(),
                methods: vec![Method::SasV1],
                timestamp: Some(7),
                to: None,
            }),
            Msg::Ready(Ready { from_device: "D".into(), methods: vec![Method::SasV1, Method::Custom("o.e".into())] }),
            Msg::Start(Start { from_device: "D".into(), method: StartMethod::Sas(offer) }),
            Msg::Start(Start { from_device: "D".into(), method: StartMethod::Reciprocate { secret: key.clone() } }),
            Msg::Accept(Accept {
                key_agreement_protocol: "curve25519-hkdf-sha256".into(),
                hash: "sha256".into(),
                message_authentication_code: "hkdf-hmac-sha256.v2".into(),
                short_authentication_string: strs(&["emoji"]),
                commitment: key.clone(),
            }),
            Msg::Key(key.clone()),
            Msg::Mac(MacMsg {
                mac: [("ed25519:B".to_owned(), key.clone()), ("ed25519:A".to_owned(), key.clone())].into(),
                keys: key.clone(),
            }),
            Msg::Done,
            Msg::Cancel(Cancel { code: CancelCode::User, reason: "«nope»".into() }),
        ];
        let in_room_request = Msg::Request(Request {
            from_device: "D".into(),
            methods: vec![Method::SasV1],
            timestamp: None,
            to: Some("@b:x".into()),
        });
        let cases = msgs
            .iter()
            .flat_map(|m| [(m, Envelope::ToDevice("t\"1".into())), (m, Envelope::Room(Some("$r".into())))])
            .filter(|(m, e)| !matches!((m, e), (Msg::Request(_), Envelope::Room(_))))
            .chain([(&in_room_request, Envelope::Room(None))]);
        for (msg, envelope) in cases {
            let (event_type, content) = encode(msg, &envelope);
            let value: Value = serde_json::from_str(content.as_str()).unwrap();
            assert_eq!(canonical::to_string(&value).unwrap(), content.as_str(), "{msg:?}");
            let in_room = matches!(envelope, Envelope::Room(_));
            let parsed = parse(event_type, &value, in_room, None).unwrap_or_else(|| panic!("{msg:?}"));
            assert_eq!(parsed.msg.as_ref(), Ok(msg), "{content}");
        }
    }

    #[test]
    fn relation_from_cleartext_wrapper() {
        let rel = json!({"rel_type": "m.reference", "event_id": "$req"});
        let p = parse("m.key.verification.done", &json!({}), true, Some(&rel)).unwrap();
        assert_eq!(p.flow_id.as_deref(), Some("$req"));
        let wrong = json!({"rel_type": "m.annotation", "event_id": "$req"});
        let p = parse("m.key.verification.done", &json!({"m.relates_to": wrong}), true, None).unwrap();
        assert_eq!(p.flow_id, None);
    }

    #[test]
    fn not_verification_events() {
        assert!(parse("m.room.message", &json!({"msgtype": "m.text"}), true, None).is_none());
        assert!(parse("m.key.verification.request", &json!({}), true, None).is_none());
        assert!(parse("m.room_key", &json!({}), false, None).is_none());
    }
}
