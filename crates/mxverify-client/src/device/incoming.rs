//! What comes from the homeserver: the `/sync` loop, each batch handled item by item, invites,
//! and direct chats ([spec: syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing),
//! [direct messaging](https://spec.matrix.org/v1.19/client-server-api/#direct-messaging)).

use std::sync::Arc;
use std::time::Duration;

use mxverify_proto::{IncomingEvent, RoomContext};
use serde_json::{Value, json};

use super::{Connection, Device, DeviceError, DeviceEvent, DirectRoom, Inner, Notice, now_ms};
use crate::http::{Connectivity, HttpError};
use crate::megolm::RoomEncryption;
use crate::olm::MEGOLM_ALGORITHM;
use crate::sync::{Batch, Invite, JoinedRoom, RoomEvent};

/// The `/sync` long poll (the spec's and Element's 30 s).
const POLL_MS: u64 = 30_000;

impl Inner {
    /// Syncs for ever: through any outage (reported as [`Connection::Unreachable`] and retried
    /// with growing pauses up to a minute), until the login is no longer valid. The token moves
    /// on only after a batch was handled.
    pub(crate) async fn syncer(self: Arc<Self>, filter: String) {
        let mut since = self.lock().store.get("since").ok().flatten();
        let mut pause = Duration::from_millis(500);
        let mut online = true;
        loop {
            let events = self.events.clone();
            let on_state = move |state: Connectivity| {
                let event = match state {
                    Connectivity::Unreachable { retry_in, reason, .. } => {
                        Connection::Unreachable { reason, retry_at: now_ms() + retry_in.as_millis() as u64 }
                    }
                    _ => Connection::Online,
                };
                let _ = events.send(DeviceEvent::Connection(event));
            };
            let answer = self.hs.sync_resilient(since.as_deref(), &filter, POLL_MS, on_state).await.and_then(|resp| {
                let batch = crate::sync::parse(&resp, &self.user_id);
                match batch.next_batch.clone() {
                    Some(next) => Ok((batch, next)),
                    // Not a sync answer. Taken as one, it would be asked for again at once, for ever.
                    None => Err(HttpError::Malformed("GET /_matrix/client/v3/sync: no valid next_batch".into())),
                }
            });
            match answer {
                Ok((batch, next)) => {
                    if !online {
                        online = true;
                        self.emit(DeviceEvent::Connection(Connection::Online));
                    }
                    pause = Duration::from_millis(500);
                    self.handle_batch(batch).await;
                    if let Err(e) = self.lock().store.set("since", &next) {
                        self.notice(Notice::new("store", format!("could not save the sync position: {e}")));
                    }
                    since = Some(next);
                }
                Err(e) if e.is_unknown_token() => {
                    self.emit(DeviceEvent::LoggedOut(format!(
                        "the homeserver no longer accepts this device's login ({e}); log in again"
                    )));
                    return;
                }
                Err(e) => {
                    online = false;
                    let retry_at = now_ms() + pause.as_millis() as u64;
                    self.emit(DeviceEvent::Connection(Connection::Unreachable { reason: e.to_string(), retry_at }));
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// One batch, each item on its own: a failure is reported and the rest goes on.
    pub(crate) async fn handle_batch(&self, batch: Batch) {
        let now = now_ms();
        for why in &batch.rejected {
            self.notice(Notice::new("dropped", format!("the homeserver sent {why}; it was left out")));
        }
        let changed: Vec<String> = {
            let st = self.lock();
            batch.device_lists_changed.iter().filter(|u| st.known.contains_key(*u)).cloned().collect()
        };
        if !changed.is_empty()
            && let Err(e) = self.query_keys(&changed).await
        {
            self.notice(Notice::new("keys", format!("could not refresh changed device keys: {e}")));
        }
        if let Some(count) = batch.one_time_key_count
            && let Err(e) = self.top_up_keys(count, batch.fallback_unused).await
        {
            self.notice(Notice::new("keys", format!("could not upload one-time keys: {e}")));
        }
        for ev in batch.to_device {
            let result = match ev.event_type.as_str() {
                "m.room.encrypted" => self.receive_olm(&ev.sender, &ev.content, now).await,
                "m.secret.request" => self.receive_secret_request(&ev.sender, &ev.content).await,
                "m.room_key" | "m.forwarded_room_key" | "m.secret.send" | "m.room_key_bundle" => {
                    self.notice(Notice::new(
                        "dropped",
                        format!(
                            "ignored {} from {}: it arrived unencrypted, and it is accepted only over Olm",
                            ev.event_type, ev.sender
                        ),
                    ));
                    Ok(())
                }
                _ => {
                    self.feed(
                        IncomingEvent { sender: ev.sender, event_type: ev.event_type, content: ev.content, room: None },
                        now,
                    );
                    Ok(())
                }
            };
            if let Err(e) = result {
                self.notice(Notice::new("dropped", format!("could not handle a to-device event: {e}")));
            }
        }
        for room in batch.rooms {
            self.handle_room(room, now);
        }
        for invite in batch.invites {
            self.accept_invite(&invite).await;
        }
        self.check_joins().await;
        // Held events that expire are the timer's: it wakes for the earliest one.
        self.flush();
    }

    fn handle_room(&self, room: JoinedRoom, now: u64) {
        for ev in room.state.iter().chain(&room.timeline) {
            self.track_room_state(&room.room_id, ev);
        }
        for ev in room.timeline {
            if ev.event_type == "m.room.encrypted" {
                self.receive_megolm(&room.room_id, &ev, now, true);
                continue;
            }
            let context = RoomContext {
                room_id: room.room_id.clone(),
                event_id: ev.event_id,
                origin_server_ts: ev.origin_server_ts,
                relates_to_fallback: None,
            };
            self.feed(
                IncomingEvent {
                    sender: ev.sender,
                    event_type: ev.event_type,
                    content: ev.content,
                    room: Some(context),
                },
                now,
            );
        }
    }

    /// Encryption settings and departures seen in a room's state or timeline.
    fn track_room_state(&self, room_id: &str, ev: &RoomEvent) {
        let mut st = self.lock();
        match (ev.event_type.as_str(), ev.state_key.as_deref()) {
            ("m.room.encryption", Some("")) => {
                if let Some(settings) = RoomEncryption::from_content(&ev.content) {
                    st.room_encryption.insert(room_id.to_owned(), Some(settings));
                }
            }
            ("m.room.member", Some(member)) => {
                st.room_members.remove(room_id);
                // Anyone leaving may hold the current room key: the next message gets a new one.
                let membership = ev.content["membership"].as_str();
                if matches!(membership, Some("leave" | "ban")) {
                    let _ = st.store.delete_outbound_session(room_id);
                }
                if membership == Some("join")
                    && st.awaiting_join.iter().any(|w| w.room_id == room_id && w.user == member)
                {
                    st.joined.insert((room_id.to_owned(), member.to_owned()));
                }
            }
            _ => {}
        }
    }

    /// Requests that waited for the other user to join go out once they have.
    async fn check_joins(&self) {
        let waiting = self.lock().awaiting_join.clone();
        for w in waiting {
            let seen = self.lock().joined.contains(&(w.room_id.clone(), w.user.clone()));
            let joined = seen || matches!(self.membership(&w.room_id, &w.user).await, Ok(Some(m)) if m == "join");
            if !joined {
                continue;
            }
            self.lock().awaiting_join.retain(|x| !(x.room_id == w.room_id && x.user == w.user));
            self.notice(Notice::in_room("joined", &w.room_id, format!("{} joined; sending the request", w.user)));
            self.send_room_request(&w.room_id, &w.user);
        }
    }

    /// Joins a room we were invited to; a direct chat (`is_direct` on our invite) is recorded in
    /// `m.direct` under the inviter, as Element does. A room that refuses us is reported and
    /// skipped.
    async fn accept_invite(&self, invite: &Invite) {
        let room_id = &invite.room_id;
        if let Err(e) = self.hs.join(room_id).await {
            self.notice(Notice::in_room("join_failed", room_id, format!("could not join {room_id}: {e}")));
            return;
        }
        if let (true, Some(inviter)) = (invite.is_direct, &invite.inviter)
            && let Err(e) = self.add_direct_room(inviter, room_id).await
        {
            self.notice(Notice::in_room(
                "dm",
                room_id,
                format!("could not record {room_id} as a direct chat with {inviter}: {e}"),
            ));
        }
        // Said once everything about the invite is done (a direct chat is in m.direct).
        self.notice(Notice::in_room("joined", room_id, format!("joined {room_id}")));
    }

    /// Tops up the one-time keys the server holds for us, and replaces a fallback key that was
    /// used ([one-time and fallback keys](https://spec.matrix.org/v1.19/client-server-api/#one-time-and-fallback-keys)).
    pub(crate) async fn top_up_keys(
        &self,
        server_count: u64,
        fallback_unused: Option<bool>,
    ) -> Result<(), DeviceError> {
        let body = {
            let mut st = self.lock();
            let st = &mut *st;
            st.olm.keys_to_upload(&mut st.store, server_count, fallback_unused)?
        };
        let Some(body) = body else { return Ok(()) };
        self.hs.keys_upload(&body).await?;
        let mut st = self.lock();
        let st = &mut *st;
        st.olm.mark_keys_published(&mut st.store)?;
        Ok(())
    }

    /// A user's membership in a room (`join`, `invite`, `leave`, ...), if any.
    pub(crate) async fn membership(&self, room_id: &str, user: &str) -> Result<Option<String>, DeviceError> {
        match self.hs.room_state(room_id, "m.room.member", user).await {
            Ok(c) => Ok(c["membership"].as_str().map(str::to_owned)),
            Err(HttpError::Matrix { status: 404, .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Adds a room to our `m.direct` under `user` (read, change, write back).
    pub(crate) async fn add_direct_room(&self, user: &str, room_id: &str) -> Result<(), DeviceError> {
        let mut direct = self.hs.account_data(&self.user_id, "m.direct").await?.unwrap_or_else(|| json!({}));
        if !direct.is_object() {
            direct = json!({});
        }
        let Some(map) = direct.as_object_mut() else { return Ok(()) };
        let rooms = map.entry(user.to_owned()).or_insert_with(|| json!([]));
        if !rooms.is_array() {
            *rooms = json!([]);
        }
        let Some(list) = rooms.as_array_mut() else { return Ok(()) };
        if !list.iter().any(|r| r == room_id) {
            list.push(json!(room_id));
            self.hs.set_account_data(&self.user_id, "m.direct", &direct).await?;
        }
        Ok(())
    }
}

impl Device {
    /// The direct chat with `user` to verify in ([direct messaging](https://spec.matrix.org/v1.19/client-server-api/#direct-messaging)):
    /// a room listed under them in our `m.direct` that we are in and they have joined (or, else,
    /// are invited to); failing that, a new encrypted one, created as Element does and recorded
    /// in `m.direct`.
    pub async fn dm_room(&self, user: &str) -> Result<DirectRoom, DeviceError> {
        let inner = &self.inner;
        let direct = inner.hs.account_data(&inner.user_id, "m.direct").await?.unwrap_or_else(|| json!({}));
        let candidates: Vec<String> =
            direct[user].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect();
        if !candidates.is_empty() {
            let joined = inner.hs.joined_rooms().await?;
            let mut invited = None;
            for room in candidates.iter().filter(|r| joined.contains(r)) {
                match inner.membership(room, user).await?.as_deref() {
                    Some("join") => {
                        return Ok(DirectRoom { room_id: room.clone(), created: false, other_joined: true });
                    }
                    Some("invite") if invited.is_none() => invited = Some(room.clone()),
                    _ => {}
                }
            }
            if let Some(room_id) = invited {
                return Ok(DirectRoom { room_id, created: false, other_joined: false });
            }
        }
        let room_id = inner.hs.create_dm(user).await?;
        inner
            .lock()
            .room_encryption
            .insert(room_id.clone(), RoomEncryption::from_content(&json!({"algorithm": MEGOLM_ALGORITHM})));
        inner.notice(Notice::in_room(
            "dm_created",
            &room_id,
            format!("created an encrypted direct chat {room_id} with {user}"),
        ));
        if let Err(e) = inner.add_direct_room(user, &room_id).await {
            inner.notice(Notice::in_room("dm", &room_id, format!("could not record {room_id} in m.direct: {e}")));
        }
        Ok(DirectRoom { room_id, created: true, other_joined: false })
    }

    /// A user's membership in a room (`join`, `invite`, `leave`, ...), if any.
    ///
    /// Spec: [Room membership](https://spec.matrix.org/v1.19/client-server-api/#room-membership),
    /// [`GET /rooms/{roomId}/state/{eventType}/{stateKey}`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3roomsroomidstateeventtypestatekey).
    pub async fn membership(&self, room_id: &str, user: &str) -> Result<Option<String>, DeviceError> {
        self.inner.membership(room_id, user).await
    }
}
