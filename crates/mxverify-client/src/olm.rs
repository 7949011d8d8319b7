//! Olm: encrypted to-device messages between two devices
//! ([spec: `m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2)).
//!
//! vodozemac runs the double ratchet. This module is the glue around it: it keeps the account
//! and the sessions in the store, chooses a session to send with, builds the plaintext payload,
//! makes every check the spec names on a decrypted payload
//! ([validation](https://spec.matrix.org/v1.19/client-server-api/#validation-of-incoming-decrypted-events)),
//! and keeps a supply of signed one-time and fallback keys
//! ([one-time and fallback keys](https://spec.matrix.org/v1.19/client-server-api/#one-time-and-fallback-keys)).

use std::collections::HashMap;

use serde_json::{Map, Value, json};
use vodozemac::olm::{Account, AccountPickle, OlmMessage, Session, SessionConfig, SessionPickle};
use vodozemac::{Curve25519PublicKey, Ed25519Signature};
use zeroize::Zeroizing;

use crate::keys;
use crate::store::{Store, StoreError, StoredOlmSession};

/// The Olm algorithm name.
///
/// Spec: [Messaging algorithm names](https://spec.matrix.org/v1.19/client-server-api/#messaging-algorithm-names).
pub const OLM_ALGORITHM: &str = "m.olm.v1.curve25519-aes-sha2";
/// The Megolm algorithm name.
///
/// Spec: [Messaging algorithm names](https://spec.matrix.org/v1.19/client-server-api/#messaging-algorithm-names).
pub const MEGOLM_ALGORITHM: &str = "m.megolm.v1.aes-sha2";
/// The one-time key algorithm.
///
/// Spec: [Key algorithms](https://spec.matrix.org/v1.19/client-server-api/#key-algorithms),
/// [One-time and fallback keys](https://spec.matrix.org/v1.19/client-server-api/#one-time-and-fallback-keys).
pub const SIGNED_CURVE25519: &str = "signed_curve25519";
/// How many one-time keys we keep on the server (vodozemac's maximum for one upload).
const ONE_TIME_KEY_TARGET: u64 = 50;
/// Sessions kept per other device: the spec allows expiring the least recently used ones as
/// long as a few remain, and a peer must not make us keep an unbounded number.
const SESSIONS_PER_DEVICE: usize = 8;

/// Why an Olm message was not accepted. Each is reported and the message dropped.
///
/// Spec: [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2),
/// [Validation of incoming decrypted events](https://spec.matrix.org/v1.19/client-server-api/#validation-of-incoming-decrypted-events).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OlmError {
    /// Not a well-formed Olm `m.room.encrypted` content.
    #[error("not a well-formed Olm message: {0}")]
    Malformed(String),
    /// The message carries no ciphertext for this device's key.
    #[error("the message has no ciphertext for this device")]
    NotForThisDevice,
    /// No session could decrypt it (the sender's session with us is broken, or it is a replay).
    #[error("no Olm session with {sender_key} could decrypt it: {detail}")]
    Undecryptable {
        /// The sender's Curve25519 key.
        sender_key: String,
        /// What vodozemac said.
        detail: String,
    },
    /// The decrypted payload failed one of the spec's checks.
    #[error("the decrypted payload was refused: {0}")]
    BadPayload(String),
    /// We have no session with that device (claim a one-time key first).
    #[error("no Olm session with the device whose key is {0}")]
    NoSession(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
}

impl From<StoreError> for OlmError {
    fn from(e: StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

/// A decrypted to-device payload that passed the checks on `sender`, `recipient`,
/// `recipient_keys` and `sender_device_keys`. The check of `keys.ed25519` against the sending
/// device's published keys is [`OlmPlaintext::attribute`], once those keys are known.
///
/// Spec: [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2),
/// [Validation of incoming decrypted events](https://spec.matrix.org/v1.19/client-server-api/#validation-of-incoming-decrypted-events).
#[derive(Debug, Clone, PartialEq)]
pub struct OlmPlaintext {
    /// The event's sender.
    pub sender: String,
    /// The sending device's Curve25519 key (the Olm session's).
    pub sender_key: String,
    /// The inner event type.
    pub event_type: String,
    /// The inner content.
    pub content: Value,
    /// The sending device's Ed25519 key, as the payload claims it (`keys.ed25519`).
    pub claimed_ed25519: String,
    /// `sender_device_keys`, when present and valid.
    pub sender_device_keys: Option<keys::DeviceKeys>,
}

impl OlmPlaintext {
    /// Finds the device that sent this among `devices` (the sender's published, signature-checked
    /// devices) or the valid `sender_device_keys`: the one whose Curve25519 key is the session's.
    /// Its Ed25519 key must be the payload's `keys.ed25519`. Returns the device.
    ///
    /// Spec: [Verification of the sending user for incoming events](https://spec.matrix.org/v1.19/client-server-api/#verification-of-the-sending-user-for-incoming-events).
    pub fn attribute<'a>(
        &'a self,
        devices: impl IntoIterator<Item = &'a keys::DeviceKeys>,
    ) -> Result<&'a keys::DeviceKeys, OlmError> {
        let device = devices
            .into_iter()
            .find(|d| d.curve25519.as_deref() == Some(self.sender_key.as_str()))
            .or(self.sender_device_keys.as_ref())
            .ok_or_else(|| {
                OlmError::BadPayload(format!(
                    "{} has no device with the Curve25519 key {} that sent it",
                    self.sender, self.sender_key
                ))
            })?;
        if device.ed25519 != self.claimed_ed25519 {
            return Err(OlmError::BadPayload(format!(
                "keys.ed25519 is {}, but device {} of {} has the Ed25519 key {}",
                self.claimed_ed25519, device.device_id, self.sender, device.ed25519
            )));
        }
        Ok(device)
    }
}

struct Entry {
    session: Session,
    created_at: u64,
    last_received: u64,
}

impl Entry {
    /// What the store keeps of this session (with the other device's key).
    fn stored(&self, sender_key: &str, pickle_key: &[u8; 32]) -> StoredOlmSession {
        StoredOlmSession {
            sender_key: sender_key.to_owned(),
            session_id: self.session.session_id(),
            pickle: self.session.pickle().encrypt(pickle_key),
            created_at: self.created_at,
            last_received: self.last_received,
        }
    }

    /// The session that most recently received a message is preferred; one that never
    /// received counts from its creation.
    fn recency(&self) -> u64 {
        self.last_received.max(self.created_at)
    }
}

/// The device's Olm account and sessions.
///
/// ```
/// use mxverify_client::{Store, keys, olm::Olm};
///
/// let mut store = Store::open_in_memory()?;
/// // A real device keeps a random pickle key; zeros do for an example.
/// let olm = Olm::load(&mut store, "@alice:example.org", "DESK", [0; 32])?;
/// // The device keys we publish carry our own signature.
/// let published = olm.device_keys();
/// assert!(keys::has_valid_signature(&published, "@alice:example.org", "DESK", &olm.ed25519()));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Spec: [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2),
/// [One-time and fallback keys](https://spec.matrix.org/v1.19/client-server-api/#one-time-and-fallback-keys).
pub struct Olm {
    user_id: String,
    device_id: String,
    account: Account,
    pickle_key: Zeroizing<[u8; 32]>,
    sessions: HashMap<String, Vec<Entry>>,
}

impl std::fmt::Debug for Olm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Olm")
            .field("device_id", &self.device_id)
            .field("curve25519", &self.curve25519())
            .field("sessions", &self.sessions.values().map(Vec::len).sum::<usize>())
            .finish_non_exhaustive()
    }
}

impl Olm {
    /// Loads the account (or makes and saves a new one) and every session from the store.
    ///
    /// Serves: [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2)
    /// (the account and sessions survive a restart).
    pub fn load(store: &mut Store, user_id: &str, device_id: &str, pickle_key: [u8; 32]) -> Result<Olm, OlmError> {
        let account = match store.get("account")? {
            Some(p) => Account::from_pickle(
                AccountPickle::from_encrypted(&p, &pickle_key)
                    .map_err(|e| OlmError::Store(format!("the device keys cannot be read: {e}")))?,
            ),
            None => {
                let a = Account::new();
                store.save_olm(Some(&a.pickle().encrypt(&pickle_key)), &[])?;
                a
            }
        };
        let mut sessions: HashMap<String, Vec<Entry>> = HashMap::new();
        for s in store.olm_sessions()? {
            // A session that cannot be read is skipped: the peer's next message will unwedge it.
            let Ok(pickle) = SessionPickle::from_encrypted(&s.pickle, &pickle_key) else { continue };
            sessions.entry(s.sender_key).or_default().push(Entry {
                session: Session::from_pickle(pickle),
                created_at: s.created_at,
                last_received: s.last_received,
            });
        }
        Ok(Olm {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            account,
            pickle_key: Zeroizing::new(pickle_key),
            sessions,
        })
    }

    /// Our Ed25519 key.
    ///
    /// Spec: [Device keys](https://spec.matrix.org/v1.19/client-server-api/#device-keys).
    pub fn ed25519(&self) -> String {
        self.account.ed25519_key().to_base64()
    }

    /// Our Curve25519 identity key.
    ///
    /// Spec: [Device keys](https://spec.matrix.org/v1.19/client-server-api/#device-keys).
    pub fn curve25519(&self) -> String {
        self.account.curve25519_key().to_base64()
    }

    /// Signs bytes with the device's Ed25519 key.
    ///
    /// Spec: [Signing JSON](https://spec.matrix.org/v1.19/appendices/#signing-json),
    /// [Device keys](https://spec.matrix.org/v1.19/client-server-api/#device-keys).
    pub fn sign(&self, message: &[u8]) -> Ed25519Signature {
        self.account.sign(message)
    }

    /// The key the pickles are encrypted with.
    pub(crate) fn pickle_key(&self) -> &[u8; 32] {
        &self.pickle_key
    }

    /// The signed device keys object we publish
    /// ([device keys](https://spec.matrix.org/v1.19/client-server-api/#device-keys)).
    pub fn device_keys(&self) -> Value {
        let (u, d) = (&self.user_id, &self.device_id);
        let mut obj = json!({
            "user_id": u,
            "device_id": d,
            "algorithms": [OLM_ALGORITHM, MEGOLM_ALGORITHM],
            "keys": {
                format!("curve25519:{d}"): self.curve25519(),
                format!("ed25519:{d}"): self.ed25519(),
            },
        });
        self.sign_json(&mut obj);
        obj
    }

    fn sign_json(&self, obj: &mut Value) {
        let message = keys::signable(obj).expect("our own objects have a canonical form");
        let sig = self.account.sign(message.as_bytes());
        keys::add_signature(obj, &self.user_id, &format!("ed25519:{}", self.device_id), &sig);
    }

    fn save_account(&self, store: &mut Store) -> Result<(), OlmError> {
        store.save_olm(Some(&self.account.pickle().encrypt(&self.pickle_key)), &[])?;
        Ok(())
    }

    /// The one-time and fallback keys to upload, given the server's count of unclaimed one-time
    /// keys and whether it still has an unused fallback key (`None`: it did not say). New keys
    /// are generated and the account saved *before* the upload, so a key the server hands out is
    /// never one we lost. Returns `None` when nothing needs uploading.
    ///
    /// Spec: [One-time and fallback keys](https://spec.matrix.org/v1.19/client-server-api/#one-time-and-fallback-keys),
    /// [`POST /keys/upload`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysupload).
    pub fn keys_to_upload(
        &mut self,
        store: &mut Store,
        server_count: u64,
        fallback_unused: Option<bool>,
    ) -> Result<Option<Value>, OlmError> {
        let unpublished = self.account.one_time_keys().len() as u64;
        let wanted = ONE_TIME_KEY_TARGET.saturating_sub(server_count + unpublished);
        let mut changed = false;
        if wanted > 0 && server_count < ONE_TIME_KEY_TARGET / 2 {
            self.account.generate_one_time_keys(wanted as usize);
            changed = true;
        }
        if fallback_unused == Some(false) && self.account.fallback_key().is_empty() {
            self.account.generate_fallback_key();
            changed = true;
        }
        if changed {
            self.save_account(store)?;
        }
        let otks = self.account.one_time_keys();
        let fallback = self.account.fallback_key();
        if otks.is_empty() && fallback.is_empty() {
            return Ok(None);
        }
        let signed = |key: Curve25519PublicKey, fallback: bool| {
            let mut obj = if fallback {
                json!({"key": key.to_base64(), "fallback": true})
            } else {
                json!({"key": key.to_base64()})
            };
            self.sign_json(&mut obj);
            obj
        };
        let mut body = Map::new();
        if !otks.is_empty() {
            let map: Map<String, Value> = otks
                .into_iter()
                .map(|(id, k)| (format!("{SIGNED_CURVE25519}:{}", id.to_base64()), signed(k, false)))
                .collect();
            body.insert("one_time_keys".into(), Value::Object(map));
        }
        if !fallback.is_empty() {
            let map: Map<String, Value> = fallback
                .into_iter()
                .map(|(id, k)| (format!("{SIGNED_CURVE25519}:{}", id.to_base64()), signed(k, true)))
                .collect();
            body.insert("fallback_keys".into(), Value::Object(map));
        }
        Ok(Some(Value::Object(body)))
    }

    /// The upload of [`Olm::keys_to_upload`] succeeded.
    ///
    /// Spec: [One-time and fallback keys](https://spec.matrix.org/v1.19/client-server-api/#one-time-and-fallback-keys).
    pub fn mark_keys_published(&mut self, store: &mut Store) -> Result<(), OlmError> {
        self.account.mark_keys_as_published();
        self.save_account(store)
    }

    /// Whether we have a session with the device whose Curve25519 key this is.
    ///
    /// Spec: [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2).
    pub fn has_session(&self, their_curve25519: &str) -> bool {
        self.sessions.get(their_curve25519).is_some_and(|s| !s.is_empty())
    }

    /// When we last made a session with that device ourselves (for unwedging's rate limit).
    ///
    /// Spec: [Recovering from undecryptable messages](https://spec.matrix.org/v1.19/client-server-api/#recovering-from-undecryptable-messages).
    pub fn newest_session_created(&self, their_curve25519: &str) -> Option<u64> {
        self.sessions.get(their_curve25519).and_then(|s| s.iter().map(|e| e.created_at).max())
    }

    /// Creates an outbound session with a device from its identity key and a one-time key we
    /// claimed (whose signature the caller checked).
    ///
    /// Spec: [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2),
    /// [`POST /keys/claim`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysclaim).
    pub fn create_outbound(
        &mut self,
        store: &mut Store,
        their_curve25519: &str,
        one_time_key: &str,
        now: u64,
    ) -> Result<(), OlmError> {
        let identity = Curve25519PublicKey::from_base64(their_curve25519)
            .map_err(|e| OlmError::Malformed(format!("identity key: {e}")))?;
        let otk = Curve25519PublicKey::from_base64(one_time_key)
            .map_err(|e| OlmError::Malformed(format!("one-time key: {e}")))?;
        let session = self
            .account
            .create_outbound_session(SessionConfig::version_1(), identity, otk)
            .map_err(|e| OlmError::Malformed(format!("cannot make a session: {e}")))?;
        let entry = Entry { session, created_at: now, last_received: 0 };
        store.save_olm(None, &[entry.stored(their_curve25519, &self.pickle_key)])?;
        self.insert(their_curve25519, entry);
        Ok(())
    }

    fn insert(&mut self, sender_key: &str, entry: Entry) {
        let list = self.sessions.entry(sender_key.to_owned()).or_default();
        list.push(entry);
        if list.len() > SESSIONS_PER_DEVICE {
            list.sort_by_key(|e| std::cmp::Reverse(e.recency()));
            list.truncate(SESSIONS_PER_DEVICE);
        }
    }

    /// Encrypts an event for one device ([sending](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2)):
    /// the content of an `m.room.encrypted` to-device event. Needs a session with the device.
    pub fn encrypt(
        &mut self,
        store: &mut Store,
        recipient: &str,
        recipient_device: &keys::DeviceKeys,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, OlmError> {
        let payload = json!({
            "type": event_type,
            "content": content,
            "sender": self.user_id,
            "sender_device": self.device_id,
            "recipient": recipient,
            "recipient_keys": {"ed25519": recipient_device.ed25519},
            "keys": {"ed25519": self.ed25519()},
            "sender_device_keys": self.device_keys(),
        });
        let curve = recipient_device.curve25519.clone().ok_or_else(|| OlmError::NoSession(String::new()))?;
        self.encrypt_payload(store, &curve, &payload)
    }

    /// Encrypts any payload for the device with this Curve25519 key (tests use it to build
    /// payloads that break the rules).
    ///
    /// Spec: [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2).
    pub fn encrypt_payload(
        &mut self,
        store: &mut Store,
        their_curve25519: &str,
        payload: &Value,
    ) -> Result<Value, OlmError> {
        let entry = self
            .sessions
            .get_mut(their_curve25519)
            .and_then(|list| list.iter_mut().max_by_key(|e| e.recency()))
            .ok_or_else(|| OlmError::NoSession(their_curve25519.to_owned()))?;
        let message = entry
            .session
            .encrypt(payload.to_string())
            .map_err(|e| OlmError::Malformed(format!("cannot encrypt: {e}")))?;
        let (message_type, body) = message.to_parts();
        let stored = entry.stored(their_curve25519, &self.pickle_key);
        // The ratchet moved: save it before the message leaves, so an index is never reused.
        store.save_olm(None, &[stored])?;
        Ok(json!({
            "algorithm": OLM_ALGORITHM,
            "sender_key": self.curve25519(),
            "ciphertext": {their_curve25519: {"type": message_type, "body": mxverify_proto::b64::encode(body)}},
        }))
    }

    /// Decrypts a to-device `m.room.encrypted` content sent by `sender` and checks the payload
    /// (everything but the sending device's Ed25519 key; see [`OlmPlaintext::attribute`]).
    /// A pre-key message from a device makes a new inbound session only if no existing session
    /// matches it; the session and the spent one-time key are saved together.
    ///
    /// Spec: [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2),
    /// [Validation of incoming decrypted events](https://spec.matrix.org/v1.19/client-server-api/#validation-of-incoming-decrypted-events).
    pub fn decrypt(
        &mut self,
        store: &mut Store,
        sender: &str,
        content: &Value,
        now: u64,
    ) -> Result<OlmPlaintext, OlmError> {
        if content["algorithm"] != OLM_ALGORITHM {
            return Err(OlmError::Malformed(format!("algorithm is {}", content["algorithm"])));
        }
        let sender_key = content["sender_key"].as_str().ok_or(OlmError::Malformed("no sender_key".into()))?;
        let their_identity = Curve25519PublicKey::from_base64(sender_key)
            .map_err(|e| OlmError::Malformed(format!("sender_key: {e}")))?;
        let ours = content["ciphertext"].get(self.curve25519()).ok_or(OlmError::NotForThisDevice)?;
        let message_type = ours["type"].as_u64().ok_or(OlmError::Malformed("ciphertext type".into()))?;
        let body = ours["body"]
            .as_str()
            .and_then(mxverify_proto::b64::decode)
            .ok_or(OlmError::Malformed("ciphertext body is not base64".into()))?;
        let message = OlmMessage::from_parts(message_type.min(usize::MAX as u64) as usize, &body)
            .map_err(|e| OlmError::Malformed(e.to_string()))?;
        let undecryptable = |detail: String| OlmError::Undecryptable { sender_key: sender_key.to_owned(), detail };
        let plaintext = match &message {
            OlmMessage::PreKey(pre) => {
                // No map entry is made for an unknown key until a session exists: bogus pre-key
                // messages must not grow the map.
                let existing = self
                    .sessions
                    .get_mut(sender_key)
                    .and_then(|list| list.iter_mut().find(|e| e.session.session_id() == pre.session_id()));
                if let Some(entry) = existing {
                    let plain = entry.session.decrypt(&message).map_err(|e| undecryptable(e.to_string()))?;
                    entry.last_received = now;
                    store.save_olm(None, &[entry.stored(sender_key, &self.pickle_key)])?;
                    plain
                } else {
                    let created = self
                        .account
                        .create_inbound_session(SessionConfig::version_1(), their_identity, pre)
                        .map_err(|e| undecryptable(e.to_string()))?;
                    let entry = Entry { session: created.session, created_at: now, last_received: now };
                    let account = self.account.pickle().encrypt(&self.pickle_key);
                    store.save_olm(Some(&account), &[entry.stored(sender_key, &self.pickle_key)])?;
                    self.insert(sender_key, entry);
                    created.plaintext
                }
            }
            OlmMessage::Normal(_) => {
                let list = self.sessions.get_mut(sender_key).ok_or_else(|| undecryptable("no session".into()))?;
                list.sort_by_key(|e| std::cmp::Reverse(e.recency()));
                let mut result = Err(undecryptable("no session".into()));
                for entry in list.iter_mut() {
                    match entry.session.decrypt(&message) {
                        Ok(plain) => {
                            entry.last_received = now;
                            result = Ok((plain, entry.stored(sender_key, &self.pickle_key)));
                            break;
                        }
                        Err(e) => result = Err(undecryptable(e.to_string())),
                    }
                }
                let (plain, stored) = result?;
                store.save_olm(None, &[stored])?;
                plain
            }
        };
        self.check_payload(sender, sender_key, &plaintext)
    }

    /// The spec's checks on a decrypted payload: `sender`, `recipient`, `recipient_keys.ed25519`,
    /// and, when present, `sender_device_keys`.
    fn check_payload(&self, sender: &str, sender_key: &str, plaintext: &[u8]) -> Result<OlmPlaintext, OlmError> {
        let bad = |m: String| Err(OlmError::BadPayload(m));
        let Ok(Value::Object(p)) = serde_json::from_slice::<Value>(plaintext) else {
            return bad("it is not a JSON object".into());
        };
        let (Some(event_type), Some(content)) = (p.get("type").and_then(Value::as_str), p.get("content")) else {
            return bad("it has no type or content".into());
        };
        if !content.is_object() {
            return bad("its content is not an object".into());
        }
        if p.get("sender").and_then(Value::as_str) != Some(sender) {
            return bad(format!(
                "it names the sender {}, but {sender} sent it",
                p.get("sender").unwrap_or(&Value::Null)
            ));
        }
        if p.get("recipient").and_then(Value::as_str) != Some(self.user_id.as_str()) {
            return bad(format!("it is addressed to {}, not to us", p.get("recipient").unwrap_or(&Value::Null)));
        }
        if p.get("recipient_keys").and_then(|k| k.get("ed25519")).and_then(Value::as_str) != Some(&self.ed25519()) {
            return bad("its recipient_keys.ed25519 is not this device's key".into());
        }
        let Some(claimed) = p.get("keys").and_then(|k| k.get("ed25519")).and_then(Value::as_str) else {
            return bad("it has no keys.ed25519".into());
        };
        let sender_device_keys = match p.get("sender_device_keys") {
            None | Some(Value::Null) => None,
            Some(dk) => Some(check_sender_device_keys(dk, sender, sender_key, claimed).map_err(OlmError::BadPayload)?),
        };
        Ok(OlmPlaintext {
            sender: sender.to_owned(),
            sender_key: sender_key.to_owned(),
            event_type: event_type.to_owned(),
            content: content.clone(),
            claimed_ed25519: claimed.to_owned(),
            sender_device_keys,
        })
    }
}

/// `sender_device_keys` must be the sender's own, name the session's Curve25519 key and the
/// payload's Ed25519 key, and carry a valid self-signature.
fn check_sender_device_keys(
    dk: &Value,
    sender: &str,
    sender_key: &str,
    claimed: &str,
) -> Result<keys::DeviceKeys, String> {
    if dk["user_id"].as_str() != Some(sender) {
        return Err("sender_device_keys belong to another user".into());
    }
    let device = dk["device_id"].as_str().ok_or("sender_device_keys have no device_id")?;
    if dk["keys"][format!("curve25519:{device}")].as_str() != Some(sender_key) {
        return Err("sender_device_keys name another Curve25519 key than the session's".into());
    }
    if dk["keys"][format!("ed25519:{device}")].as_str() != Some(claimed) {
        return Err("sender_device_keys name another Ed25519 key than keys.ed25519".into());
    }
    if !keys::has_valid_signature(dk, sender, device, claimed) {
        return Err("sender_device_keys are not validly self-signed".into());
    }
    Ok(keys::DeviceKeys {
        device_id: device.to_owned(),
        ed25519: claimed.to_owned(),
        curve25519: Some(sender_key.to_owned()),
        display_name: None,
        cross_signed: false,
        json: dk.clone(),
    })
}
