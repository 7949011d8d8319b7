//! The vocabulary shared by the machine and its callers: flow keys, identities, inputs and outputs
//! ([spec: key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::cancel::CancelInfo;
use crate::crypto::{KeyAgreement, MacMethod};
use crate::emoji::Emoji;
use crate::keys::Ed25519PublicKey;
use crate::wire::Method;

/// Milliseconds since the Unix epoch, as given by the caller's clock (the unit of the request's
/// `timestamp` and of `origin_server_ts`).
///
/// Spec: [`m.key.verification.request`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationrequest).
pub type Millis = u64;

/// Identifies one verification flow: a to-device `transaction_id` together with the other user,
/// or the event ID of an in-room request together with its room.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
///
/// ```
/// use mxverify_proto::FlowKey;
///
/// let key = FlowKey::Room { room_id: "!dm:example.org".into(), event_id: "$request".into() };
/// assert_eq!(key.flow_id(), "$request"); // what the SAS info strings and QR codes use
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FlowKey {
    /// A to-device flow.
    ToDevice {
        /// The other user.
        user_id: String,
        /// The flow's `transaction_id`.
        transaction_id: String,
    },
    /// An in-room flow.
    Room {
        /// The room.
        room_id: String,
        /// The request event's ID, which is the flow id.
        event_id: String,
    },
}

impl FlowKey {
    /// The flow id as the SAS info strings and QR codes use it: the `transaction_id`, or in a room
    /// the request's event ID.
    #[must_use]
    pub fn flow_id(&self) -> &str {
        match self {
            Self::ToDevice { transaction_id, .. } => transaction_id,
            Self::Room { event_id, .. } => event_id,
        }
    }
}

/// This device: who we are and which keys we vouch for in our MACs.
///
/// Spec: [MAC calculation](https://spec.matrix.org/v1.19/client-server-api/#mac-calculation), [cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnIdentity {
    /// Our user ID.
    pub user_id: String,
    /// Our device ID.
    pub device_id: String,
    /// Our device's Ed25519 key.
    pub ed25519: Ed25519PublicKey,
    /// Our master cross-signing key, if we have one.
    pub master_key: Option<Ed25519PublicKey>,
    /// Whether this device trusts that master key; only then is it included in our MAC.
    pub trusts_master_key: bool,
}

/// What the caller knows of a user's keys, checked by the caller (signatures) before it is given:
/// the result of [`/keys/query`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysquery) for one user.
///
/// Spec: [key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserKeys {
    /// Device ID → Ed25519 key.
    pub devices: BTreeMap<String, Ed25519PublicKey>,
    /// The master cross-signing key.
    pub master_key: Option<Ed25519PublicKey>,
    /// The self-signing and user-signing keys, used only to refuse a user with a device ID equal
    /// to one of their cross-signing keys.
    pub other_cross_signing_keys: Vec<Ed25519PublicKey>,
}

/// Timeouts and windows; the defaults are the spec's.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework), [error and exception handling](https://spec.matrix.org/v1.19/client-server-api/#error-and-exception-handling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// An outgoing request with no answer, and a whole flow, end after this long: 10 min.
    pub flow: Millis,
    /// An incoming request's prompt closes this long after it was received: 2 min.
    pub prompt_after_receipt: Millis,
    /// …or this long after its timestamp, whichever comes first: 10 min.
    pub prompt_after_timestamp: Millis,
    /// Requests older than this are ignored: 10 min.
    pub max_age: Millis,
    /// Requests further in the future than this are ignored: 5 min.
    pub max_future: Millis,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            flow: 10 * 60_000,
            prompt_after_receipt: 2 * 60_000,
            prompt_after_timestamp: 10 * 60_000,
            max_age: 10 * 60_000,
            max_future: 5 * 60_000,
        }
    }
}

/// Which SAS parameters this device offers and accepts, best first.
///
/// Spec: [SAS](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasParams {
    /// Key agreement protocols.
    pub key_agreements: Vec<KeyAgreement>,
    /// MAC methods; keep the legacy `hkdf-hmac-sha256` after `.v2` so that it is never chosen
    /// when both support `.v2`.
    pub macs: Vec<MacMethod>,
    /// Whether emoji may be shown.
    pub emoji: bool,
    /// Whether decimals may be shown.
    pub decimal: bool,
}

impl SasParams {
    /// The SAS methods as named on the wire.
    #[must_use]
    pub fn sas_methods(&self) -> Vec<&'static str> {
        [("decimal", self.decimal), ("emoji", self.emoji)].into_iter().filter(|(_, on)| *on).map(|(m, _)| m).collect()
    }
}

impl Default for SasParams {
    fn default() -> Self {
        Self { key_agreements: KeyAgreement::ALL.to_vec(), macs: MacMethod::ALL.to_vec(), emoji: true, decimal: true }
    }
}

/// What this device can do, and its timing.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The methods we advertise in `request` and `ready`.
    pub methods: Vec<Method>,
    /// SAS parameters.
    pub sas: SasParams,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// The most flows the machine remembers at once (in progress, and ended ones kept to
    /// recognise late messages): a bound on its memory, about 400 bytes a flow, whatever the
    /// network sends. A request or legacy start from another user while the machine is full makes
    /// it forget the flow that ended first; with none ended, the newcomer is dropped
    /// ([`DropReason::MachineFull`]) and nothing is forgotten. Our own requests are never refused
    /// (they may take the machine past the bound; a peer's request then needs that many more
    /// ended flows). 0 refuses every peer's. Default 2^20.
    pub max_flows: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            methods: vec![Method::SasV1],
            sas: SasParams::default(),
            timeouts: Timeouts::default(),
            max_flows: 1 << 20,
        }
    }
}

/// A source of secret random bytes, supplied by the caller: the core has no RNG of its own. It
/// makes transaction IDs, the SAS ephemeral keys and the QR secrets.
///
/// Spec: [SAS](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification), [QR code format](https://spec.matrix.org/v1.19/client-server-api/#qr-code-format).
pub trait Entropy {
    /// Fills `buf` with cryptographically secure random bytes.
    fn fill(&mut self, buf: &mut [u8]);
}

/// In-room context of an incoming event.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq)]
pub struct RoomContext {
    /// The room.
    pub room_id: String,
    /// This event's ID.
    pub event_id: String,
    /// The server timestamp (the in-room request's time, checked against the request window).
    pub origin_server_ts: Millis,
    /// `m.relates_to` from the cleartext wrapper of an encrypted event, where the spec asks
    /// senders to put it.
    pub relates_to_fallback: Option<Value>,
}

/// An event received from the homeserver (decrypted, if it was encrypted).
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingEvent {
    /// The event's `sender`.
    pub sender: String,
    /// The event type.
    pub event_type: String,
    /// The (decrypted) content.
    pub content: Value,
    /// `None` for to-device events.
    pub room: Option<RoomContext>,
}

/// Where an outgoing message goes.
///
/// Spec: [send-to-device messaging](https://spec.matrix.org/v1.19/client-server-api/#send-to-device-messaging), [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Destination {
    /// `PUT /sendToDevice` to these devices of this user (`*` = all of them).
    ToDevice {
        /// The user.
        user_id: String,
        /// The devices.
        device_ids: Vec<String>,
    },
    /// `PUT /rooms/{room_id}/send` in this room.
    Room {
        /// The room.
        room_id: String,
    },
}

/// A message for the caller to send.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Outgoing {
    /// Identifies this message; for an in-room request, report its event ID with
    /// [`crate::Machine::room_event_sent`]. Also usable as the transaction id of the send.
    pub id: u64,
    /// The flow it belongs to, if it has one yet.
    pub flow: Option<FlowKey>,
    /// Where to send it.
    pub destination: Destination,
    /// The event type.
    pub event_type: &'static str,
    /// The content, as JSON text.
    pub content: Content,
}

/// The content of an [`Outgoing`] message as JSON text, written once by the machine: send it as
/// it is. The machine's own messages are canonical JSON (keys sorted, no whitespace; their only
/// number, a request's `timestamp`, is the clock's, well inside canonical JSON's range).
///
/// ```
/// use mxverify_proto::Content;
/// let mut content = Content::from(serde_json::json!({"b": 1, "a": "x"}));
/// assert_eq!(content.as_str(), r#"{"a":"x","b":1}"#);
/// content.edit(|v| v["b"] = 2.into());
/// assert_eq!(content.to_value()["b"], 2);
/// ```
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework),
/// [canonical JSON](https://spec.matrix.org/v1.19/appendices/#canonical-json).
#[derive(Clone, PartialEq, Eq)]
pub struct Content(String);

impl Content {
    /// Text the caller guarantees to be valid JSON (the wire encoder's output).
    pub(crate) fn from_canonical(json: String) -> Self {
        Self(json)
    }

    /// The JSON text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The JSON text, owned.
    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }

    /// The content parsed into a [`Value`] (to encrypt it, or look into it).
    #[must_use]
    pub fn to_value(&self) -> Value {
        // Every constructor writes valid JSON; `Null` would only show a broken invariant.
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }

    /// Changes the content through its [`Value`] (fault injection and tests).
    pub fn edit(&mut self, change: impl FnOnce(&mut Value)) {
        let mut value = self.to_value();
        change(&mut value);
        *self = Self::from(value);
    }
}

impl From<Value> for Content {
    fn from(value: Value) -> Self {
        Self::from(&value)
    }
}

impl From<&Value> for Content {
    fn from(value: &Value) -> Self {
        // Canonical where it can be (it always is for the machine's own messages); a value
        // without a canonical form (a float, a huge integer) is written as serde_json writes it.
        Self(crate::canonical::to_string(value).unwrap_or_else(|_| value.to_string()))
    }
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for Content {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

/// What a verified key is.
///
/// Spec: [cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KeyKind {
    /// A device's Ed25519 key.
    Device,
    /// A user's master cross-signing key.
    MasterKey,
}

/// A key the other side proved it holds, compared by value with our own copy.
///
/// Spec: [MAC calculation](https://spec.matrix.org/v1.19/client-server-api/#mac-calculation), [QR codes](https://spec.matrix.org/v1.19/client-server-api/#qr-codes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifiedKey {
    /// The key ID, e.g. `ed25519:DEVICEID` or `ed25519:<master key>`.
    pub key_id: String,
    /// The public key.
    pub key: Ed25519PublicKey,
    /// What it is.
    pub kind: KeyKind,
}

impl VerifiedKey {
    /// A device's key, with its key ID `ed25519:<device ID>`.
    #[must_use]
    pub fn device(device_id: &str, key: Ed25519PublicKey) -> Self {
        Self { key_id: ed25519_key_id(device_id), key, kind: KeyKind::Device }
    }

    /// A master cross-signing key, with its key ID `ed25519:<the key>`.
    #[must_use]
    pub fn master_key(key: Ed25519PublicKey) -> Self {
        Self { key_id: ed25519_key_id(&key.to_base64()), key, kind: KeyKind::MasterKey }
    }
}

/// The ID of an Ed25519 key: `ed25519:` and the device ID, or for a cross-signing key the key
/// itself in unpadded base64.
///
/// Spec: [MAC calculation](https://spec.matrix.org/v1.19/client-server-api/#mac-calculation).
pub(crate) fn ed25519_key_id(name: &str) -> String {
    ["ed25519:", name].concat()
}

/// Why an incoming event was dropped without an answer (for logs and diagnostics).
///
/// Spec: [error and exception handling](https://spec.matrix.org/v1.19/client-server-api/#error-and-exception-handling).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DropReason {
    /// It has no usable flow id, so it belongs to no flow.
    NoFlowId,
    /// A malformed request (nothing to cancel yet).
    MalformedRequest(String),
    /// A request more than 10 minutes old or 5 minutes in the future.
    OutsideTimeWindow,
    /// Our own echo or a request from this very device.
    Own,
    /// An in-room event from someone who is not a party to the flow.
    NotAParty,
    /// An in-room request for another user.
    NotForUs,
    /// An event for a flow that ended.
    FlowEnded,
    /// An in-room event for a flow we do not know.
    UnknownRoomFlow,
    /// A cancel for a flow we do not know (never answered).
    UnknownFlow,
    /// An exact duplicate of a message already handled.
    Duplicate,
    /// A message from another of the other user's devices than the one in the flow.
    OtherDevice,
    /// The start of the losing side of a tie-break between two starts.
    LostTieBreak,
    /// An event that waited for keys that never came.
    KeysNeverArrived,
    /// Too many events wait for keys: this one was given up (its sender's oldest, or a newcomer
    /// when everyone together is at the bound).
    HoldLimit,
    /// A request or start from a user with whom the machine already keeps as many flows as it
    /// keeps for one user (64), too few of them ended to make room by forgetting them early: the
    /// verifications in progress are kept, the newcomer is not.
    FlowLimit,
    /// A request or start while the machine remembers as many flows as it may
    /// ([`Config::max_flows`]), none of them ended: the verifications in progress are kept, the
    /// newcomer is not.
    MachineFull,
}

/// Something the user interface (or a bot) should know about.
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// Someone asks us to verify — or, for a legacy start-first flow, started SAS directly.
    IncomingRequest {
        /// The flow.
        flow: FlowKey,
        /// Their device.
        from_device: String,
        /// Their methods.
        methods: Vec<Method>,
        /// The methods we could use with them (empty: tell the user and let them decline; another
        /// of our devices may support them).
        common_methods: Vec<Method>,
        /// `true` for a start without a request (the deprecated flow).
        legacy: bool,
        /// When the prompt closes by itself.
        deadline: Millis,
    },
    /// Our request went out.
    RequestSent {
        /// The flow.
        flow: FlowKey,
    },
    /// Both sides are ready; a method can be started.
    Ready {
        /// The flow.
        flow: FlowKey,
        /// The other device.
        other_device: String,
        /// The methods both sides support.
        methods: Vec<Method>,
    },
    /// A method was started.
    Started {
        /// The flow.
        flow: FlowKey,
        /// The method.
        method: Method,
        /// Whether we started it (after the tie-break).
        by_us: bool,
    },
    /// Keys exchanged: show these to the user and ask whether they match. Only the negotiated
    /// representations are present.
    Sas {
        /// The flow.
        flow: FlowKey,
        /// The seven emoji, if `emoji` was agreed.
        emoji: Option<Vec<Emoji>>,
        /// The three numbers, if `decimal` was agreed.
        decimals: Option<[u16; 3]>,
    },
    /// We show this QR code (the raw `MATRIX` payload) for the other device to scan.
    QrCode {
        /// The flow.
        flow: FlowKey,
        /// The payload bytes (base64 in JSON).
        #[serde(serialize_with = "ser_b64")]
        payload: Vec<u8>,
        /// The QR mode byte (0, 1 or 2).
        mode: u8,
    },
    /// The other device scanned our code and proved it with the right secret: ask the user to
    /// confirm that the other device shows success, then call [`crate::Machine::confirm`].
    QrScanned {
        /// The flow.
        flow: FlowKey,
    },
    /// We sent our `done`: on our side every check passed, and these are exactly the keys
    /// [`Event::Done`] will report once the other side's `done` arrives. A client that keeps
    /// trust records persists one here, before the `done` queued with this event goes out (see
    /// [`crate::Machine::poll_event`]), and never cancels the flow afterwards. If the flow then
    /// ends with [`Event::Cancelled`] (the keys changed after our `done`), nothing was verified.
    DoneSent {
        /// The flow.
        flow: FlowKey,
        /// The user being verified.
        user_id: String,
        /// The device being verified.
        device_id: String,
        /// The keys that will be verified.
        keys: Vec<VerifiedKey>,
    },
    /// Verified: every check passed and `done` was exchanged. These exact keys are trusted.
    Done {
        /// The flow.
        flow: FlowKey,
        /// The verified user.
        user_id: String,
        /// The verified device.
        device_id: String,
        /// The keys verified.
        keys: Vec<VerifiedKey>,
    },
    /// The flow was cancelled (by either side) or dismissed.
    Cancelled {
        /// The flow.
        flow: FlowKey,
        /// Who, why, and the local cause.
        #[serde(serialize_with = "ser_cancel")]
        info: CancelInfo,
    },
    /// Please fetch this user's keys and pass them to [`crate::Machine::update_user_keys`]; events
    /// that need them are held meanwhile (never dropped for lack of keys).
    KeysNeeded {
        /// The user.
        user_id: String,
    },
    /// A user's master key was replaced by another one, or removed: the spec requires telling the
    /// user before communicating further. Every flow with that user in progress fails.
    IdentityChanged {
        /// The user.
        user_id: String,
        /// The master key we knew.
        old_master_key: Ed25519PublicKey,
        /// The master key now published, if any.
        new_master_key: Option<Ed25519PublicKey>,
    },
    /// An incoming event was ignored; for logs.
    Dropped {
        /// Its sender.
        sender: String,
        /// Its type.
        event_type: String,
        /// Why.
        reason: DropReason,
    },
}

fn ser_b64<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::b64::encode(bytes))
}

fn ser_cancel<S: serde::Serializer>(info: &CancelInfo, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("CancelInfo", 6)?;
    st.serialize_field("by", if info.by_us { "us" } else { "them" })?;
    st.serialize_field("code", info.code.as_str())?;
    st.serialize_field("reason", &info.reason)?;
    st.serialize_field("cause", &info.cause.as_ref().map(ToString::to_string))?;
    st.serialize_field("sent", &info.sent)?;
    st.serialize_field("explanation", &info.explain())?;
    st.end()
}

/// What a flow is doing now, with the data of that moment: a projection of its state for user
/// interfaces (see [`FlowInfo`], which also lists the [`Action`]s legal in it).
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlowPhase {
    /// Our request is out; the other side has not answered yet.
    Requested,
    /// Someone asks us to verify: accept or decline.
    Incoming {
        /// The methods they offered.
        methods: Vec<Method>,
        /// The methods we could use with them (empty: we can only decline).
        common_methods: Vec<Method>,
    },
    /// Both sides are ready: start SAS, scan their code, or let them scan ours.
    Ready {
        /// The methods both sides support.
        methods: Vec<Method>,
        /// The QR code we show (the raw `MATRIX` payload), if any.
        qr_code: Option<Vec<u8>>,
    },
    /// A device started SAS with us without a request (the deprecated start-first flow): accept
    /// or decline.
    SasIncoming,
    /// SAS was started; the devices are exchanging keys.
    SasStarted,
    /// Compare these with the other device, then confirm or report a mismatch.
    SasCompare {
        /// The seven emoji, if `emoji` was agreed.
        emoji: Option<Vec<Emoji>>,
        /// The three numbers, if `decimal` was agreed.
        decimals: Option<[u16; 3]>,
    },
    /// Our user confirmed the SAS; waiting for the other device's.
    SasConfirmed,
    /// We scanned the other device's code before knowing the keys to check it against; it is
    /// checked when they arrive.
    QrScanPending,
    /// We scanned the other device's code and told it so; waiting for it to finish.
    QrReciprocated,
    /// The other device scanned our code: confirm that it shows success, or report a mismatch.
    QrScanned,
    /// Our `done` went out: waiting for the other device's.
    DoneSent {
        /// The keys that will be verified.
        keys: Vec<VerifiedKey>,
    },
    /// Verified.
    Done {
        /// The keys verified.
        keys: Vec<VerifiedKey>,
    },
    /// Ended without verification.
    Cancelled(CancelInfo),
}

/// A user action on a flow, each one a method of [`crate::Machine`].
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Action {
    /// [`crate::Machine::accept`]: answer a request with `ready`, or accept a start-first SAS.
    Accept,
    /// [`crate::Machine::start_sas`].
    StartSas,
    /// [`crate::Machine::scan_qr`].
    ScanQr,
    /// [`crate::Machine::confirm`]: the emoji match, or the other device shows success.
    Confirm,
    /// [`crate::Machine::mismatch`]: they do not.
    Mismatch,
    /// [`crate::Machine::cancel`]: cancel or decline.
    Cancel,
}

/// A read-only view of one flow for user interfaces: where it is ([`FlowPhase`]) and what the
/// user may do now ([`Action`]).
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlowInfo {
    /// The flow.
    pub key: FlowKey,
    /// The other user.
    pub other_user: String,
    /// The other device, once known.
    pub other_device: Option<String>,
    /// Whether we sent the request (or started a start-first SAS).
    pub we_requested: bool,
    /// Where the flow is, with the data of that moment.
    pub phase: FlowPhase,
    /// The actions the user may take now.
    pub actions: Vec<Action>,
    /// A short description of the state, for people.
    pub state: &'static str,
    /// When the flow (or its prompt) ends by itself; `None` once it ended.
    pub deadline: Option<Millis>,
    /// Set once the flow was cancelled.
    pub cancel: Option<CancelInfo>,
    /// Set once the flow is verified.
    pub verified: bool,
}

impl FlowInfo {
    /// Whether the user may take this action now.
    #[must_use]
    pub fn can(&self, action: Action) -> bool {
        self.actions.contains(&action)
    }
}

/// A user action that cannot be carried out (never a silent no-op).
///
/// Spec: [key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ActionError {
    /// No such flow (or it was forgotten).
    #[error("no verification flow {0:?}")]
    UnknownFlow(FlowKey),
    /// The flow is not in a state where this action is allowed.
    #[error("cannot {action} now: the verification is {state}")]
    WrongState {
        /// The action attempted.
        action: &'static str,
        /// The state the flow is in.
        state: &'static str,
    },
    /// The two sides have no method in common for this action.
    #[error("no common verification method: {0}")]
    NoCommonMethod(&'static str),
    /// The other device's keys are not known yet; a [`Event::KeysNeeded`] was emitted.
    #[error("the keys of {user_id}'s device {device_id} are not known yet")]
    KeysUnknown {
        /// The user.
        user_id: String,
        /// The device.
        device_id: String,
    },
    /// A request needs at least one device.
    #[error("no device to send the request to")]
    NoDevices,
    /// The scanned bytes are not a verification QR code.
    #[error("not a verification QR code: {0}")]
    InvalidQr(crate::qr::QrDecodeError),
    /// The outgoing message id is not a pending in-room request.
    #[error("no pending in-room request with outgoing id {0}")]
    UnknownOutgoing(u64),
}

impl From<crate::qr::QrDecodeError> for ActionError {
    fn from(e: crate::qr::QrDecodeError) -> Self {
        ActionError::InvalidQr(e)
    }
}

#[cfg(feature = "seeded-entropy")]
/// Deterministic [`Entropy`] from a seed (SHA-256 in counter mode), for tests, benchmarks, fuzzing
/// and replays. **Never use it for real verifications**: anyone who knows the seed knows the keys.
/// Only with the `seeded-entropy` feature.
///
/// Spec: [SAS](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification) (the ephemeral keys it would make).
#[derive(Debug, Clone)]
pub struct SeededEntropy {
    seed: [u8; 32],
    counter: u64,
}

#[cfg(feature = "seeded-entropy")]
impl SeededEntropy {
    /// A generator for this seed.
    pub fn new(seed: u64) -> Self {
        let mut s = [0u8; 32];
        s[..8].copy_from_slice(&seed.to_le_bytes());
        Self { seed: s, counter: 0 }
    }
}

#[cfg(feature = "seeded-entropy")]
impl Entropy for SeededEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        use sha2::Digest;
        for chunk in buf.chunks_mut(32) {
            let mut h = sha2::Sha256::new();
            h.update(self.seed);
            h.update(self.counter.to_le_bytes());
            self.counter += 1;
            chunk.copy_from_slice(&h.finalize()[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A value without a canonical form still becomes valid JSON text that reads back as itself;
    /// an edit that breaks nothing keeps the text canonical; serialising embeds the content as
    /// JSON, not as a string.
    #[test]
    fn content_from_any_value_is_json_and_reads_back() {
        let odd = json!({"b": 1.5, "a": u64::MAX, "c": "\u{1}\""});
        let content = Content::from(&odd);
        assert_eq!(content.to_value(), odd);
        let mut canonical = Content::from(json!({"z": 1, "a": [true, null]}));
        assert_eq!(canonical.as_str(), r#"{"a":[true,null],"z":1}"#);
        canonical.edit(|v| v["m"] = json!("x"));
        assert_eq!(canonical.as_str(), r#"{"a":[true,null],"m":"x","z":1}"#);
        assert_eq!(serde_json::to_value(&canonical).unwrap(), json!({"a": [true, null], "m": "x", "z": 1}));
        assert_eq!(format!("{canonical}"), canonical.clone().into_string());
    }
}
