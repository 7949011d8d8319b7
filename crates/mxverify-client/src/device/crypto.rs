//! The device's end-to-end encryption glue: Olm to devices, Megolm in rooms, in both directions
//! ([spec: end-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption)).

use std::collections::{BTreeMap, BTreeSet};

use mxverify_proto::{IncomingEvent, RoomContext};
use serde_json::{Value, json};

use super::{DeviceError, HOLD_FOR_ROOM_KEY_MS, Inner, Notice, State, now_ms};
use crate::http::HttpError;
use crate::keys::{self, DeviceKeys};
use crate::megolm::{self, MegolmError, OlmSender, Outbound, RoomEncryption, RoomKeyOutcome};
use crate::olm::{OlmError, OlmPlaintext, SIGNED_CURVE25519};
use crate::store::{HeldRoomEvent, HeldSelection};
use crate::sync::RoomEvent;

/// Events held for room keys, per sender: one sender cannot crowd out everyone else's.
const HELD_PER_SENDER: usize = 32;
/// Events held for room keys in all: the store stays small whatever the rooms bring.
const HELD_IN_ALL: u64 = 1024;
/// How soon a broken Olm session with one device may be replaced again (the spec's hour).
const UNWEDGE_INTERVAL_MS: u64 = 60 * 60 * 1000;

/// The one-time key a `/keys/claim` answer gives for a device, if its signature by the device's
/// Ed25519 key is valid ([claiming keys](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysclaim)).
fn claimed_one_time_key(claimed: &Value, user: &str, device: &DeviceKeys) -> Option<String> {
    let keys = claimed["one_time_keys"][user][&device.device_id].as_object()?;
    keys.iter()
        .find(|(id, obj)| {
            id.starts_with("signed_curve25519:")
                && keys::has_valid_signature(obj, user, &device.device_id, &device.ed25519)
        })
        .and_then(|(_, obj)| obj["key"].as_str().map(str::to_owned))
}

impl Inner {
    pub(crate) fn own_sender(&self, st: &State) -> OlmSender {
        OlmSender {
            user_id: self.user_id.clone(),
            device_id: self.device_id.clone(),
            curve25519: st.olm.curve25519(),
            ed25519: st.olm.ed25519(),
        }
    }

    /// Whether a room is encrypted, and how ([`m.room.encryption`](https://spec.matrix.org/v1.19/client-server-api/#mroomencryption)).
    /// Asked of the homeserver once per room; `/sync` keeps it up to date after that.
    pub(crate) async fn room_encryption(&self, room_id: &str) -> Result<Option<RoomEncryption>, DeviceError> {
        if let Some(known) = self.lock().room_encryption.get(room_id) {
            return Ok(*known);
        }
        let settings = match self.hs.room_state(room_id, "m.room.encryption", "").await {
            Ok(content) => RoomEncryption::from_content(&content),
            Err(HttpError::Matrix { status: 404, .. }) => None,
            Err(e) => return Err(e.into()),
        };
        self.lock().room_encryption.insert(room_id.to_owned(), settings);
        Ok(settings)
    }

    /// Makes sure we have an Olm session with each of these devices, claiming one-time keys for
    /// those we have none with ([`/keys/claim`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysclaim)).
    /// Each claimed key's signature is checked with the device's Ed25519 key. Devices that end
    /// up without a session are reported.
    async fn ensure_olm_sessions(&self, devices: &[(String, DeviceKeys)]) -> Result<(), DeviceError> {
        let mut wanted: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        {
            let st = self.lock();
            for (user, d) in devices {
                if let Some(curve) = &d.curve25519
                    && !st.olm.has_session(curve)
                {
                    wanted.entry(user.clone()).or_default().insert(d.device_id.clone(), json!(SIGNED_CURVE25519));
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let claimed = self.hs.keys_claim(&json!(wanted)).await?;
        let now = now_ms();
        let mut st = self.lock();
        let st = &mut *st;
        for (user, d) in devices {
            let Some(curve) = &d.curve25519 else { continue };
            if !wanted.get(user).is_some_and(|m| m.contains_key(&d.device_id)) {
                continue;
            }
            let created = match claimed_one_time_key(&claimed, user, d) {
                Some(otk) => st.olm.create_outbound(&mut st.store, curve, &otk, now).map_err(|e| e.to_string()),
                None => Err("it has no signed one-time key left on the server (or its signature is wrong)".into()),
            };
            if let Err(why) = created {
                self.notice(Notice::new(
                    "no_olm_session",
                    format!("cannot open an encrypted channel to device {} of {user}: {why}", d.device_id),
                ));
            }
        }
        Ok(())
    }

    /// Olm-encrypts one event for some devices of a user: the per-device contents of an
    /// `m.room.encrypted` to-device message. Devices we cannot reach are reported and skipped.
    pub(crate) async fn olm_encrypt_for(
        &self,
        user: &str,
        device_ids: &[String],
        event_type: &str,
        content: &Value,
    ) -> Result<serde_json::Map<String, Value>, DeviceError> {
        let all_known =
            self.lock().known.get(user).is_some_and(|k| device_ids.iter().all(|d| k.devices.contains_key(d)));
        if !all_known {
            self.query_keys(&[user.to_owned()]).await?;
        }
        let targets: Vec<(String, DeviceKeys)> = {
            let st = self.lock();
            device_ids
                .iter()
                .filter_map(|d| st.known.get(user).and_then(|k| k.devices.get(d)).cloned())
                .map(|d| (user.to_owned(), d))
                .collect()
        };
        self.ensure_olm_sessions(&targets).await?;
        let mut per_device = serde_json::Map::new();
        let mut st = self.lock();
        let st = &mut *st;
        for (_, d) in &targets {
            match st.olm.encrypt(&mut st.store, user, d, event_type, content) {
                Ok(c) => {
                    per_device.insert(d.device_id.clone(), c);
                }
                Err(OlmError::NoSession(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(per_device)
    }

    /// Megolm-encrypts an event for a room ([sending encrypted room events](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2)):
    /// the outbound session is rotated when its settings or a departure say so, and its key
    /// is first shared over Olm with every device of every joined member that lacks it,
    /// unverified devices included, so that nobody is kept from a verification by encryption.
    /// Members and their keys are asked for once; `/sync` says when they change, so a message
    /// costs no extra round trip.
    pub(crate) async fn megolm_encrypt(
        &self,
        room_id: &str,
        settings: &RoomEncryption,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, DeviceError> {
        let cached = self.lock().room_members.get(room_id).cloned();
        let members = match cached {
            Some(m) => m,
            None => {
                let m = self.hs.joined_members(room_id).await?;
                self.lock().room_members.insert(room_id.to_owned(), m.clone());
                m
            }
        };
        let unknown: Vec<String> = {
            let st = self.lock();
            members.iter().filter(|u| !st.known.contains_key(*u)).cloned().collect()
        };
        if !unknown.is_empty() {
            self.query_keys(&unknown).await?;
        }
        let now = now_ms();
        // Held across the round trips below without the lock: a room's messages are sent one
        // after another (one sender lane per room), so nothing else touches this session meanwhile.
        let (mut out, missing) = {
            let st = self.lock();
            let mut targets: BTreeMap<String, (String, DeviceKeys)> = BTreeMap::new();
            for user in &members {
                for d in st.known.get(user).map(|k| k.devices.values()).into_iter().flatten() {
                    let Some(curve) = &d.curve25519 else { continue };
                    if *user == self.user_id && d.device_id == self.device_id {
                        continue;
                    }
                    targets.insert(megolm::recipient_id(user, &d.device_id, curve), (user.clone(), d.clone()));
                }
            }
            let recipients: BTreeSet<String> = targets.keys().cloned().collect();
            let own = self.own_sender(&st);
            let pickle_key = *st.olm.pickle_key();
            let out = match Outbound::load(&st.store, &pickle_key, room_id)? {
                Some(o) => match o.rotation_reason(settings, now, &recipients) {
                    None => o,
                    Some(why) => {
                        self.notice(Notice::in_room(
                            "rotated",
                            room_id,
                            format!("new room key: the previous one {why}"),
                        ));
                        Outbound::create(&st.store, &pickle_key, room_id, &own, now)?
                    }
                },
                None => Outbound::create(&st.store, &pickle_key, room_id, &own, now)?,
            };
            let missing: Vec<(String, DeviceKeys)> =
                out.missing(&recipients).into_iter().map(|r| targets[r].clone()).collect();
            (out, missing)
        };
        if !missing.is_empty() {
            self.ensure_olm_sessions(&missing).await?;
            let room_key = out.room_key_content();
            let (messages, shared, txn) = {
                let mut st = self.lock();
                let st = &mut *st;
                let mut messages: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
                let mut shared = Vec::new();
                for (user, d) in &missing {
                    match st.olm.encrypt(&mut st.store, user, d, "m.room_key", &room_key) {
                        Ok(c) => {
                            messages.entry(user.clone()).or_default().insert(d.device_id.clone(), c);
                            let curve = d.curve25519.as_deref().unwrap_or_default();
                            shared.push(megolm::recipient_id(user, &d.device_id, curve));
                        }
                        Err(OlmError::NoSession(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                (messages, shared, self.next_txn(st, "k"))
            };
            if !messages.is_empty() {
                self.hs.send_to_device("m.room.encrypted", &txn, &json!(messages)).await?;
                out.mark_shared(&self.lock().store, shared)?;
            }
        }
        let st = self.lock();
        let own = self.own_sender(&st);
        let pickle_key = *st.olm.pickle_key();
        Ok(out.encrypt(&st.store, &pickle_key, &own, event_type, content)?)
    }

    /// A to-device `m.room.encrypted`: decrypted with Olm, checked, attributed to one device of
    /// the sender, then handled like a clear event (verification), stored (room key), or given
    /// to secret sharing.
    pub(crate) async fn receive_olm(&self, sender: &str, content: &Value, now: u64) -> Result<(), DeviceError> {
        let decrypted = {
            let mut st = self.lock();
            let st = &mut *st;
            st.olm.decrypt(&mut st.store, sender, content, now)
        };
        let plain = match decrypted {
            Ok(p) => p,
            Err(OlmError::Undecryptable { sender_key, detail }) => {
                self.notice(Notice::new(
                    "dropped",
                    format!("an encrypted message from {sender} could not be decrypted ({detail})"),
                ));
                self.unwedge(sender, &sender_key, now).await;
                return Ok(());
            }
            Err(OlmError::Store(e)) => return Err(DeviceError::Corrupt(e)),
            Err(e) => {
                self.notice(Notice::new("dropped", format!("dropped an encrypted message from {sender}: {e}")));
                return Ok(());
            }
        };
        let from = match self.attribute(&plain).await {
            Ok(from) => from,
            Err(e) => {
                self.notice(Notice::new(
                    "dropped",
                    format!("dropped an encrypted {} from {sender}: {e}", plain.event_type),
                ));
                return Ok(());
            }
        };
        match plain.event_type.as_str() {
            "m.room_key" => {
                let outcome = {
                    let st = self.lock();
                    let pickle_key = *st.olm.pickle_key();
                    megolm::accept_room_key(&st.store, &pickle_key, &from, &plain.content)
                };
                match outcome {
                    Ok(RoomKeyOutcome::Stored { room_id, session_id }) => {
                        self.retry_held(&room_id, &session_id).await?
                    }
                    Ok(RoomKeyOutcome::AlreadyKnown) => {}
                    Err(MegolmError::Store(e)) => return Err(DeviceError::Corrupt(e)),
                    Err(e) => self.notice(Notice::new(
                        "dropped",
                        format!("refused a room key from device {} of {sender}: {e}", from.device_id),
                    )),
                }
            }
            ty if ty.starts_with("m.key.verification.") => {
                let incoming =
                    IncomingEvent { sender: sender.into(), event_type: ty.into(), content: plain.content, room: None };
                self.feed(incoming, now);
            }
            "m.secret.send" => self.receive_secret(&from, &plain.content).await?,
            "m.secret.request" => self.receive_secret_request(sender, &plain.content).await?,
            // `m.dummy` only opens a session; everything else is not ours to handle.
            _ => {}
        }
        Ok(())
    }

    /// The device that sent a decrypted payload: the sender's device with the session's
    /// Curve25519 key and the payload's Ed25519 key (keys are fetched if that device is new).
    async fn attribute(&self, plain: &OlmPlaintext) -> Result<OlmSender, OlmError> {
        let known =
            self.lock().known.get(&plain.sender).is_some_and(|k| {
                k.devices.values().any(|d| d.curve25519.as_deref() == Some(plain.sender_key.as_str()))
            });
        if !known && let Err(e) = self.query_keys(std::slice::from_ref(&plain.sender)).await {
            self.notice(Notice::new("keys", format!("could not fetch the keys of {}: {e}", plain.sender)));
        }
        let st = self.lock();
        let devices = st.known.get(&plain.sender).map(|k| k.devices.values().collect::<Vec<_>>()).unwrap_or_default();
        let device = plain.attribute(devices)?;
        Ok(OlmSender {
            user_id: plain.sender.clone(),
            device_id: device.device_id.clone(),
            curve25519: plain.sender_key.clone(),
            ed25519: device.ed25519.clone(),
        })
    }

    /// An Olm message from this device did not decrypt: its session with us is broken. Open a
    /// new one and announce it with an encrypted `m.dummy`, at most once an hour per device
    /// ([recovering from undecryptable messages](https://spec.matrix.org/v1.19/client-server-api/#recovering-from-undecryptable-messages)).
    async fn unwedge(&self, sender: &str, sender_key: &str, now: u64) {
        if self
            .lock()
            .olm
            .newest_session_created(sender_key)
            .is_some_and(|t| now.saturating_sub(t) < UNWEDGE_INTERVAL_MS)
        {
            return;
        }
        if !self.lock().known.contains_key(sender) {
            let _ = self.query_keys(&[sender.to_owned()]).await;
        }
        let device = self
            .lock()
            .known
            .get(sender)
            .and_then(|k| k.devices.values().find(|d| d.curve25519.as_deref() == Some(sender_key)))
            .cloned();
        let Some(device) = device else { return };
        let Some(curve) = device.curve25519.clone() else { return };
        // A fresh session even if we have one: that one is the broken one.
        let claimed = match self.hs.keys_claim(&json!({sender: {&device.device_id: SIGNED_CURVE25519}})).await {
            Ok(c) => c,
            Err(e) => {
                self.notice(Notice::new("no_olm_session", format!("could not repair the channel to {sender}: {e}")));
                return;
            }
        };
        let Some(otk) = claimed_one_time_key(&claimed, sender, &device) else { return };
        let (content, txn) = {
            let mut st = self.lock();
            let st = &mut *st;
            if st.olm.create_outbound(&mut st.store, &curve, &otk, now).is_err() {
                return;
            }
            let Ok(content) = st.olm.encrypt(&mut st.store, sender, &device, "m.dummy", &json!({})) else { return };
            (content, self.next_txn(st, "d"))
        };
        let messages = json!({sender: {&device.device_id: content}});
        match self.hs.send_to_device("m.room.encrypted", &txn, &messages).await {
            Ok(()) => self.notice(Notice::new(
                "olm_repaired",
                format!("opened a new encrypted channel to device {} of {sender}", device.device_id),
            )),
            Err(e) => {
                self.notice(Notice::new("no_olm_session", format!("could not repair the channel to {sender}: {e}")))
            }
        }
    }

    /// A room `m.room.encrypted`: decrypted with its room key and handled like a clear event,
    /// or held (in the store, across restarts) until the key arrives. `first_time` is false
    /// when a held event is retried. Returns whether the event is finished with.
    pub(crate) fn receive_megolm(&self, room_id: &str, ev: &RoomEvent, now: u64, first_time: bool) -> bool {
        let decrypted = {
            let st = self.lock();
            let pickle_key = *st.olm.pickle_key();
            megolm::decrypt_room_event(&st.store, &pickle_key, room_id, &ev.raw)
        };
        match decrypted {
            Ok(d) => {
                let room = RoomContext {
                    room_id: room_id.to_owned(),
                    event_id: ev.event_id.clone(),
                    origin_server_ts: ev.origin_server_ts,
                    relates_to_fallback: d.relates_to,
                };
                let incoming = IncomingEvent {
                    sender: ev.sender.clone(),
                    event_type: d.event_type,
                    content: d.content,
                    room: Some(room),
                };
                self.feed(incoming, now);
                true
            }
            Err(e) if e.is_waiting_for_key() => {
                if first_time && let Err(e) = self.hold(room_id, ev, now) {
                    self.notice(Notice::in_room("store", room_id, format!("could not hold {}: {e}", ev.event_id)));
                }
                false
            }
            Err(e) => {
                self.notice(Notice::in_room(
                    "dropped",
                    room_id,
                    format!("dropped encrypted event {} from {}: {e}", ev.event_id, ev.sender),
                ));
                true
            }
        }
    }

    /// Keeps an encrypted room event until its key arrives (principle: never drop a request for
    /// lack of keys). One sender holds at most a few dozen, and all together at most a
    /// thousand; the oldest goes first, reported.
    fn hold(&self, room_id: &str, ev: &RoomEvent, now: u64) -> Result<(), DeviceError> {
        let Some(session_id) = megolm::session_id_of(&ev.content) else { return Ok(()) };
        let evicted = {
            let st = self.lock();
            let theirs = st.store.held_room_events(HeldSelection::Sender(&ev.sender))?;
            let evict = if theirs.len() >= HELD_PER_SENDER {
                theirs.into_iter().next()
            } else if st.store.held_count()? >= HELD_IN_ALL {
                st.store.held_room_events(HeldSelection::All)?.into_iter().next()
            } else {
                None
            };
            if let Some(old) = &evict {
                st.store.release_room_event(&old.event_id)?;
            }
            st.store.hold_room_event(&HeldRoomEvent {
                event_id: ev.event_id.clone(),
                room_id: room_id.to_owned(),
                session_id: session_id.to_owned(),
                sender: ev.sender.clone(),
                event: ev.raw.to_string(),
                received_at: now,
                until: now + HOLD_FOR_ROOM_KEY_MS,
            })?;
            evict
        };
        if let Some(old) = evicted {
            self.notice(Notice::in_room(
                "dropped",
                &old.room_id,
                format!(
                    "gave up on encrypted event {} from {}: too many events wait for room keys",
                    old.event_id, old.sender
                ),
            ));
        }
        self.notice(Notice::in_room(
            "held",
            room_id,
            format!("encrypted event {} from {} waits for its room key {session_id}", ev.event_id, ev.sender),
        ));
        self.wake.notify_one();
        Ok(())
    }

    /// A room key arrived: the events that waited for it are decrypted and handled, in order.
    async fn retry_held(&self, room_id: &str, session_id: &str) -> Result<(), DeviceError> {
        let now = now_ms();
        let held = self.lock().store.held_room_events(HeldSelection::Key { room_id, session_id })?;
        for h in held {
            let parsed =
                serde_json::from_str::<Value>(&h.event).ok().and_then(|raw| crate::sync::parse_room_event(&raw));
            let done = match parsed {
                Some(ev) => self.receive_megolm(room_id, &ev, now, false),
                None => true,
            };
            if done {
                self.lock().store.release_room_event(&h.event_id)?;
            }
        }
        Ok(())
    }

    /// Held events whose time is up are given up on, and reported.
    pub(crate) fn expire_held(&self, st: &mut State, now: u64) -> Result<(), DeviceError> {
        for h in st.store.held_room_events(HeldSelection::DueBy(now))? {
            st.store.release_room_event(&h.event_id)?;
            self.notice(Notice::in_room(
                "dropped",
                &h.room_id,
                format!("gave up on encrypted event {}: its room key {} never arrived", h.event_id, h.session_id),
            ));
        }
        Ok(())
    }
}
