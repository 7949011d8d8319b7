//! Megolm: encrypted room events
//! ([spec: `m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2)).
//!
//! vodozemac runs the ratchets and checks signatures and MACs. This module is the glue: room keys
//! are accepted only from an Olm sender and stay bound to that device; room events are decrypted
//! with them, checked (room, sender, replayed index) and given back with the cleartext
//! `m.relates_to`; our own events are encrypted with one outbound session per room, rotated as the
//! room's `m.room.encryption` settings say.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use vodozemac::megolm::{
    GroupSession, GroupSessionPickle, InboundGroupSession, InboundGroupSessionPickle, MegolmMessage, SessionConfig,
    SessionKey,
};

use crate::olm::MEGOLM_ALGORITHM;
use crate::store::{Store, StoreError, StoredOutboundSession, StoredRoomKey};

/// A device that sent us something over Olm, attributed after every check.
///
/// Spec: [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2),
/// [Verification of the sending user for incoming events](https://spec.matrix.org/v1.19/client-server-api/#verification-of-the-sending-user-for-incoming-events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OlmSender {
    /// Its owner.
    pub user_id: String,
    /// The device.
    pub device_id: String,
    /// Its Curve25519 key (the Olm session's).
    pub curve25519: String,
    /// Its Ed25519 key.
    pub ed25519: String,
}

/// Why a room key or a room event was not used.
///
/// Spec: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MegolmError {
    /// Not a well-formed Megolm event or room key.
    #[error("not a well-formed Megolm message: {0}")]
    Malformed(String),
    /// We do not have the room key (yet): the event waits for it.
    #[error("the room key {session_id} has not arrived (yet)")]
    MissingKey {
        /// The Megolm session.
        session_id: String,
    },
    /// We have the room key, but only from a later index (a better copy may still arrive).
    #[error("the room key we have starts at index {first_known}; this message has index {index}")]
    UnknownIndex {
        /// The first index our copy can decrypt.
        first_known: u32,
        /// The message's index.
        index: u32,
    },
    /// A check failed: the event or key is refused for good.
    #[error("{0}")]
    Refused(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
}

impl MegolmError {
    /// Whether the event should wait for a (better) room key rather than be dropped.
    ///
    /// Spec: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2).
    pub fn is_waiting_for_key(&self) -> bool {
        matches!(self, Self::MissingKey { .. } | Self::UnknownIndex { .. })
    }
}

impl From<StoreError> for MegolmError {
    fn from(e: StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

/// What a room key did.
///
/// Spec: [`m.room_key`](https://spec.matrix.org/v1.19/client-server-api/#mroom_key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomKeyOutcome {
    /// A new room key (or a better copy of one we had) was stored.
    Stored {
        /// The room.
        room_id: String,
        /// The session.
        session_id: String,
    },
    /// We already had this key from at least as early an index.
    AlreadyKnown,
}

/// Accepts an `m.room_key` that arrived over Olm from `from`
/// ([`m.room_key`](https://spec.matrix.org/v1.19/client-server-api/#mroom_key)): the key's
/// signature is checked, its session ID must match the key, and the stored session is bound to
/// the sending device. A key for a session that another device already gave us is refused, and
/// a stored key is replaced only by a connected copy that starts earlier.
pub fn accept_room_key(
    store: &Store,
    pickle_key: &[u8; 32],
    from: &OlmSender,
    content: &Value,
) -> Result<RoomKeyOutcome, MegolmError> {
    if content["algorithm"] != MEGOLM_ALGORITHM {
        return Err(MegolmError::Malformed(format!("room key algorithm is {}", content["algorithm"])));
    }
    let field = |k: &str| content[k].as_str().ok_or_else(|| MegolmError::Malformed(format!("room key has no {k}")));
    let (room_id, session_id, session_key) = (field("room_id")?, field("session_id")?, field("session_key")?);
    let key = SessionKey::from_base64(session_key).map_err(|e| MegolmError::Malformed(format!("session_key: {e}")))?;
    let mut session = InboundGroupSession::new(&key, SessionConfig::version_1());
    if session.session_id() != session_id {
        return Err(MegolmError::Refused(format!(
            "the room key says session {session_id}, but the key is for session {}",
            session.session_id()
        )));
    }
    if let Some(existing) = store.room_key(room_id, session_id)? {
        if existing.sender_key != from.curve25519 || existing.sender_user != from.user_id {
            return Err(MegolmError::Refused(format!(
                "the room key {session_id} already came from device {} of {}; device {} of {} cannot replace it",
                existing.sender_device, existing.sender_user, from.device_id, from.user_id
            )));
        }
        let mut old = InboundGroupSession::from_pickle(
            InboundGroupSessionPickle::from_encrypted(&existing.pickle, pickle_key)
                .map_err(|e| MegolmError::Store(e.to_string()))?,
        );
        if session.first_known_index() >= existing.first_index || !old.connected(&mut session) {
            return Ok(RoomKeyOutcome::AlreadyKnown);
        }
    }
    store.save_room_key(&StoredRoomKey {
        room_id: room_id.to_owned(),
        session_id: session_id.to_owned(),
        sender_key: from.curve25519.clone(),
        sender_ed25519: from.ed25519.clone(),
        sender_user: from.user_id.clone(),
        sender_device: from.device_id.clone(),
        pickle: session.pickle().encrypt(pickle_key),
        first_index: session.first_known_index(),
    })?;
    Ok(RoomKeyOutcome::Stored { room_id: room_id.to_owned(), session_id: session_id.to_owned() })
}

/// A decrypted room event.
///
/// Spec: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2),
/// [`m.room.encrypted`](https://spec.matrix.org/v1.19/client-server-api/#mroomencrypted).
#[derive(Debug, Clone, PartialEq)]
pub struct DecryptedRoomEvent {
    /// The inner event type.
    pub event_type: String,
    /// The inner content.
    pub content: Value,
    /// `m.relates_to` of the cleartext wrapper, if any.
    pub relates_to: Option<Value>,
    /// The device whose room key decrypted it.
    pub sender_device: String,
}

/// The Megolm session ID an encrypted room event needs, if it is a Megolm event.
///
/// Spec: [`m.room.encrypted`](https://spec.matrix.org/v1.19/client-server-api/#mroomencrypted).
pub fn session_id_of(content: &Value) -> Option<&str> {
    (content["algorithm"] == MEGOLM_ALGORITHM).then(|| content["session_id"].as_str()).flatten()
}

/// Decrypts a room event (`sender`, `event_id` and `content` of an `m.room.encrypted` event in
/// `room_id`) and checks it: the plaintext names this room, the sender owns the device the key
/// came from, and the message index was not used by another event before.
///
/// Spec: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (replay
/// protection by message index).
pub fn decrypt_room_event(
    store: &Store,
    pickle_key: &[u8; 32],
    room_id: &str,
    event: &Value,
) -> Result<DecryptedRoomEvent, MegolmError> {
    let content = &event["content"];
    let (Some(sender), Some(event_id)) = (event["sender"].as_str(), event["event_id"].as_str()) else {
        return Err(MegolmError::Malformed("the event has no sender or event_id".into()));
    };
    let session_id = session_id_of(content).ok_or(MegolmError::Malformed("not a Megolm event".into()))?;
    let ciphertext = content["ciphertext"].as_str().ok_or(MegolmError::Malformed("no ciphertext".into()))?;
    let key = store
        .room_key(room_id, session_id)?
        .ok_or_else(|| MegolmError::MissingKey { session_id: session_id.to_owned() })?;
    let message = MegolmMessage::from_base64(ciphertext).map_err(|e| MegolmError::Malformed(e.to_string()))?;
    let mut session = InboundGroupSession::from_pickle(
        InboundGroupSessionPickle::from_encrypted(&key.pickle, pickle_key)
            .map_err(|e| MegolmError::Store(e.to_string()))?,
    );
    let decrypted = session.decrypt(&message).map_err(|e| match e {
        vodozemac::megolm::DecryptionError::UnknownMessageIndex(first_known, index) => {
            MegolmError::UnknownIndex { first_known, index }
        }
        other => MegolmError::Refused(format!("it does not decrypt with room key {session_id}: {other}")),
    })?;
    if sender != key.sender_user {
        return Err(MegolmError::Refused(format!(
            "{sender} sent it, but its room key belongs to device {} of {}",
            key.sender_device, key.sender_user
        )));
    }
    let Ok(Value::Object(plain)) = serde_json::from_slice::<Value>(&decrypted.plaintext) else {
        return Err(MegolmError::Refused("the plaintext is not a JSON object".into()));
    };
    if plain.get("room_id").and_then(Value::as_str) != Some(room_id) {
        return Err(MegolmError::Refused(format!(
            "the plaintext belongs to room {}, not to {room_id}",
            plain.get("room_id").unwrap_or(&Value::Null)
        )));
    }
    let (Some(event_type), Some(inner)) = (plain.get("type").and_then(Value::as_str), plain.get("content")) else {
        return Err(MegolmError::Refused("the plaintext has no type or content".into()));
    };
    if !inner.is_object() {
        return Err(MegolmError::Refused("the plaintext content is not an object".into()));
    }
    if let Some(first) = store.record_megolm_index(room_id, session_id, decrypted.message_index, event_id)? {
        return Err(MegolmError::Refused(format!(
            "message index {} of room key {session_id} was already used by event {first}: a replay",
            decrypted.message_index
        )));
    }
    Ok(DecryptedRoomEvent {
        event_type: event_type.to_owned(),
        content: inner.clone(),
        relates_to: content.get("m.relates_to").filter(|r| r.is_object()).cloned(),
        sender_device: key.sender_device,
    })
}

/// A room's `m.room.encryption` settings that matter for sending.
///
/// ```
/// use mxverify_client::megolm::RoomEncryption;
/// use serde_json::json;
///
/// // Without values, the spec's recommended defaults: a week, 100 messages.
/// let settings = RoomEncryption::from_content(&json!({"algorithm": "m.megolm.v1.aes-sha2"})).unwrap();
/// assert_eq!(settings, RoomEncryption { rotation_period_ms: 604_800_000, rotation_period_msgs: 100 });
/// assert!(RoomEncryption::from_content(&json!({"algorithm": "org.example.other"})).is_none());
/// ```
///
/// Spec: [`m.room.encryption`](https://spec.matrix.org/v1.19/client-server-api/#mroomencryption),
/// [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (rotation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomEncryption {
    /// Rotate the outbound session after this long.
    pub rotation_period_ms: u64,
    /// Rotate it after this many messages.
    pub rotation_period_msgs: u64,
}

impl RoomEncryption {
    /// From an `m.room.encryption` content; `None` if the algorithm is not Megolm. Missing values
    /// take the spec's recommended defaults (a week, 100 messages); absurd ones are brought into
    /// range so that a room cannot make us rotate on every message or never.
    ///
    /// Spec: [`m.room.encryption`](https://spec.matrix.org/v1.19/client-server-api/#mroomencryption).
    pub fn from_content(content: &Value) -> Option<Self> {
        if content["algorithm"] != MEGOLM_ALGORITHM {
            return None;
        }
        let ms = content["rotation_period_ms"].as_u64().unwrap_or(604_800_000).clamp(3_600_000, 604_800_000 * 52);
        let msgs = content["rotation_period_msgs"].as_u64().unwrap_or(100).clamp(1, 10_000);
        Some(Self { rotation_period_ms: ms, rotation_period_msgs: msgs })
    }
}

/// One device a room key goes to, as `user|device|curve25519`.
///
/// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (who holds a
/// session's key decides when it is rotated).
pub fn recipient_id(user: &str, device: &str, curve25519: &str) -> String {
    format!("{user}|{device}|{curve25519}")
}

/// Our outbound session in a room.
///
/// Spec: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2).
pub struct Outbound {
    stored: StoredOutboundSession,
    session: GroupSession,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("room_id", &self.stored.room_id)
            .field("session_id", &self.stored.session_id)
            .field("messages", &self.stored.messages)
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// The stored session of a room, if any (and readable).
    ///
    /// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (the
    /// outbound session survives a restart).
    pub fn load(store: &Store, pickle_key: &[u8; 32], room_id: &str) -> Result<Option<Outbound>, MegolmError> {
        let Some(stored) = store.outbound_session(room_id)? else { return Ok(None) };
        let Ok(pickle) = GroupSessionPickle::from_encrypted(&stored.pickle, pickle_key) else {
            // Unreadable: a new one is made and shared.
            return Ok(None);
        };
        Ok(Some(Outbound { session: GroupSession::from_pickle(pickle), stored }))
    }

    /// A new session for a room, saved; our own copy of its key is stored too, so that our own
    /// events decrypt when they come back in `/sync`.
    ///
    /// Spec: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2).
    pub fn create(
        store: &Store,
        pickle_key: &[u8; 32],
        room_id: &str,
        own: &OlmSender,
        now: u64,
    ) -> Result<Outbound, MegolmError> {
        let session = GroupSession::new(SessionConfig::version_1());
        let inbound = InboundGroupSession::new(&session.session_key(), SessionConfig::version_1());
        store.save_room_key(&StoredRoomKey {
            room_id: room_id.to_owned(),
            session_id: session.session_id(),
            sender_key: own.curve25519.clone(),
            sender_ed25519: own.ed25519.clone(),
            sender_user: own.user_id.clone(),
            sender_device: own.device_id.clone(),
            pickle: inbound.pickle().encrypt(pickle_key),
            first_index: inbound.first_known_index(),
        })?;
        let out = Outbound {
            stored: StoredOutboundSession {
                room_id: room_id.to_owned(),
                session_id: session.session_id(),
                pickle: session.pickle().encrypt(pickle_key),
                created_at: now,
                messages: 0,
                shared_with: Vec::new(),
            },
            session,
        };
        store.save_outbound_session(&out.stored)?;
        Ok(out)
    }

    /// The session ID.
    ///
    /// Spec: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2).
    pub fn session_id(&self) -> &str {
        &self.stored.session_id
    }

    /// Why this session must be replaced before the next message, if it must
    /// ([rotation](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2)): too
    /// old, used too often, or someone who has its key is no longer in the room (a user who
    /// left, a device that was removed). `recipients` are the devices that should have it now.
    pub fn rotation_reason(
        &self,
        settings: &RoomEncryption,
        now: u64,
        recipients: &BTreeSet<String>,
    ) -> Option<String> {
        if now.saturating_sub(self.stored.created_at) >= settings.rotation_period_ms {
            return Some("it reached the room's rotation period".into());
        }
        if self.stored.messages >= settings.rotation_period_msgs {
            return Some(format!("it encrypted {} messages", self.stored.messages));
        }
        if let Some(gone) = self.stored.shared_with.iter().find(|r| !recipients.contains(*r)) {
            let who = gone.split('|').take(2).collect::<Vec<_>>().join(" device ");
            return Some(format!("{who} had its key and is no longer in the room"));
        }
        None
    }

    /// Of `recipients`, those that do not have the key yet.
    ///
    /// Spec: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2),
    /// [`m.room_key`](https://spec.matrix.org/v1.19/client-server-api/#mroom_key).
    pub fn missing<'a>(&self, recipients: &'a BTreeSet<String>) -> Vec<&'a String> {
        recipients.iter().filter(|r| !self.stored.shared_with.contains(*r)).collect()
    }

    /// The `m.room_key` content for this session at its current index.
    ///
    /// Spec: [`m.room_key`](https://spec.matrix.org/v1.19/client-server-api/#mroom_key).
    pub fn room_key_content(&self) -> Value {
        json!({
            "algorithm": MEGOLM_ALGORITHM,
            "room_id": self.stored.room_id,
            "session_id": self.stored.session_id,
            "session_key": self.session.session_key().to_base64(),
        })
    }

    /// Records (and saves) that these devices received the key.
    ///
    /// Spec: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2),
    /// [`m.room_key`](https://spec.matrix.org/v1.19/client-server-api/#mroom_key).
    pub fn mark_shared(
        &mut self,
        store: &Store,
        recipients: impl IntoIterator<Item = String>,
    ) -> Result<(), MegolmError> {
        for r in recipients {
            if !self.stored.shared_with.contains(&r) {
                self.stored.shared_with.push(r);
            }
        }
        store.save_outbound_session(&self.stored)?;
        Ok(())
    }

    /// Encrypts an event for the room: the `m.room.encrypted` content, with `m.relates_to`
    /// copied into the cleartext so that relations work without the key. The advanced ratchet
    /// is saved before the content is returned, so an index is never used twice.
    ///
    /// Spec: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2),
    /// [`m.room.encrypted`](https://spec.matrix.org/v1.19/client-server-api/#mroomencrypted).
    pub fn encrypt(
        &mut self,
        store: &Store,
        pickle_key: &[u8; 32],
        own: &OlmSender,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, MegolmError> {
        let plaintext = json!({"type": event_type, "content": content, "room_id": self.stored.room_id});
        let message = self.session.encrypt(plaintext.to_string());
        self.stored.messages += 1;
        self.stored.pickle = self.session.pickle().encrypt(pickle_key);
        store.save_outbound_session(&self.stored)?;
        let mut wrapper = json!({
            "algorithm": MEGOLM_ALGORITHM,
            "sender_key": own.curve25519,
            "device_id": own.device_id,
            "session_id": self.stored.session_id,
            "ciphertext": message.to_base64(),
        });
        if let Some(rel) = content.get("m.relates_to") {
            wrapper["m.relates_to"] = rel.clone();
        }
        Ok(wrapper)
    }
}
