//! One `/sync` answer, checked at the boundary and turned into typed items
//! ([spec: syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing)).
//!
//! Everything here comes from the homeserver, and through it from any Matrix user: an item that is
//! not what the spec says (a sender that is not a user ID, content that is not an object, an
//! absurdly long event type) is left out and reported, never trusted, and the rest of the batch
//! goes on. No function here panics, whatever the input.

use serde_json::Value;

use crate::http::TOO_DEEP;

/// The longest identifier or event type we accept (the spec's limit for IDs is 255 bytes).
const MAX_ID: usize = 255;

/// A to-device event.
///
/// Spec: [Send-to-Device messaging](https://spec.matrix.org/v1.19/client-server-api/#send-to-device-messaging),
/// [`GET /sync`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3sync).
#[derive(Debug, Clone, PartialEq)]
pub struct ToDevice {
    /// Its sender (a user ID).
    pub sender: String,
    /// Its type.
    pub event_type: String,
    /// Its content (an object).
    pub content: Value,
}

/// A room timeline event.
///
/// Spec: [Room event format](https://spec.matrix.org/v1.19/client-server-api/#room-event-format),
/// [`GET /sync`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3sync).
#[derive(Debug, Clone, PartialEq)]
pub struct RoomEvent {
    /// Its sender.
    pub sender: String,
    /// Its type.
    pub event_type: String,
    /// Its ID.
    pub event_id: String,
    /// Its timestamp (0 if the server gave none).
    pub origin_server_ts: u64,
    /// Its state key, for a state event.
    pub state_key: Option<String>,
    /// Its content (an object).
    pub content: Value,
    /// The whole event, as received (kept for encrypted events that must wait for their key).
    pub raw: Value,
}

/// A room we are in, with what the batch brings.
///
/// Spec: [`GET /sync`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3sync).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JoinedRoom {
    /// The room.
    pub room_id: String,
    /// State events (before the timeline).
    pub state: Vec<RoomEvent>,
    /// Timeline events, in order.
    pub timeline: Vec<RoomEvent>,
}

/// An invite.
///
/// Spec: [`GET /sync`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3sync),
/// [Direct messaging](https://spec.matrix.org/v1.19/client-server-api/#direct-messaging) (`is_direct`).
#[derive(Debug, Clone, PartialEq)]
pub struct Invite {
    /// The room.
    pub room_id: String,
    /// Who invited us, if the invite state says.
    pub inviter: Option<String>,
    /// Whether our invite is marked as a direct chat.
    pub is_direct: bool,
}

/// One `/sync` answer, checked.
///
/// Spec: [`GET /sync`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3sync),
/// [End-to-end encryption extensions to `/sync`](https://spec.matrix.org/v1.19/client-server-api/#e2e-extensions-to-sync).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// The token for the next request.
    pub next_batch: Option<String>,
    /// Users whose devices changed.
    pub device_lists_changed: Vec<String>,
    /// Our unclaimed one-time keys on the server, when the server said.
    pub one_time_key_count: Option<u64>,
    /// Whether our fallback key is still unused, when the server said.
    pub fallback_unused: Option<bool>,
    /// To-device events, in order.
    pub to_device: Vec<ToDevice>,
    /// Joined rooms.
    pub rooms: Vec<JoinedRoom>,
    /// Invites.
    pub invites: Vec<Invite>,
    /// What was left out, and why.
    pub rejected: Vec<String>,
}

fn user_id(v: &Value) -> Option<&str> {
    let s = v.as_str()?;
    (s.len() <= MAX_ID && s.starts_with('@') && s.contains(':') && !s.chars().any(char::is_control)).then_some(s)
}

fn short(v: &Value) -> Option<&str> {
    v.as_str().filter(|s| !s.is_empty() && s.len() <= MAX_ID)
}

/// Whether the parser left out part of this value for being nested too deep
/// ([`crate::http::parse_json`]): the item it belongs to is not what it was sent as.
fn too_deep(v: &Value) -> bool {
    match v {
        Value::String(s) => s == TOO_DEEP,
        Value::Array(a) => a.iter().any(too_deep),
        Value::Object(o) => o.values().any(too_deep),
        _ => false,
    }
}

/// One room event, checked as a batch's are (for an event kept since, e.g. one that waited for
/// its room key); `None` if it is not what the spec says a room event is.
///
/// Spec: [Syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing).
pub fn parse_room_event(ev: &Value) -> Option<RoomEvent> {
    room_event(ev, &mut Vec::new(), "a room")
}

fn room_event(ev: &Value, rejected: &mut Vec<String>, where_: &str) -> Option<RoomEvent> {
    let why = match (user_id(&ev["sender"]), short(&ev["type"]), short(&ev["event_id"]), ev["content"].is_object()) {
        _ if too_deep(ev) => "nesting too deep to read",
        (Some(sender), Some(event_type), Some(event_id), true) => {
            return Some(RoomEvent {
                sender: sender.to_owned(),
                event_type: event_type.to_owned(),
                event_id: event_id.to_owned(),
                origin_server_ts: ev["origin_server_ts"].as_u64().unwrap_or(0),
                state_key: ev["state_key"].as_str().map(str::to_owned),
                content: ev["content"].clone(),
                raw: ev.clone(),
            });
        }
        (None, ..) => "no valid sender",
        (_, None, ..) => "no valid type",
        (_, _, None, _) => "no valid event_id",
        _ => "content that is not an object",
    };
    rejected.push(format!("an event in {where_} with {why}"));
    None
}

fn events<'a>(v: &'a Value, path: &str) -> impl Iterator<Item = &'a Value> {
    v.pointer(path).and_then(Value::as_array).into_iter().flatten()
}

/// Checks and splits a `/sync` answer. `own_user` finds our own invite among the invite state.
///
/// ```
/// use serde_json::json;
///
/// let answer = json!({
///     "next_batch": "s2",
///     "to_device": {"events": [
///         {"sender": "@bob:example.org", "type": "m.key.verification.request",
///          "content": {"from_device": "PHONE", "transaction_id": "t1", "methods": ["m.sas.v1"]}},
///         {"sender": "not a user ID", "type": "m.dummy", "content": {}},
///     ]},
///     "device_one_time_keys_count": {"signed_curve25519": 20},
/// });
/// let batch = mxverify_client::sync::parse(&answer, "@alice:example.org");
/// assert_eq!(batch.next_batch.as_deref(), Some("s2"));
/// assert_eq!(batch.to_device.len(), 1);
/// assert_eq!(batch.to_device[0].event_type, "m.key.verification.request");
/// assert_eq!(batch.one_time_key_count, Some(20));
/// // The event without a valid sender is left out and reported.
/// assert_eq!(batch.rejected.len(), 1);
/// ```
///
/// Spec: [Syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing),
/// [`GET /sync`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3sync),
/// [End-to-end encryption extensions to `/sync`](https://spec.matrix.org/v1.19/client-server-api/#e2e-extensions-to-sync),
/// [Size limits](https://spec.matrix.org/v1.19/client-server-api/#size-limits).
pub fn parse(resp: &Value, own_user: &str) -> Batch {
    let mut b = Batch { next_batch: short(&resp["next_batch"]).map(str::to_owned), ..Batch::default() };
    b.device_lists_changed = events(resp, "/device_lists/changed").filter_map(user_id).map(str::to_owned).collect();
    if let Some(counts) = resp.get("device_one_time_keys_count").and_then(Value::as_object) {
        b.one_time_key_count = Some(counts.get("signed_curve25519").and_then(Value::as_u64).unwrap_or(0));
    }
    b.fallback_unused = resp
        .get("device_unused_fallback_key_types")
        .and_then(Value::as_array)
        .map(|types| types.iter().any(|t| t == "signed_curve25519"));
    for ev in events(resp, "/to_device/events") {
        match (user_id(&ev["sender"]), short(&ev["type"]), ev["content"].is_object()) {
            _ if too_deep(ev) => b.rejected.push(format!(
                "a to-device event{} with nesting too deep to read",
                user_id(&ev["sender"]).map(|s| format!(" from {s}")).unwrap_or_default()
            )),
            (Some(sender), Some(event_type), true) => b.to_device.push(ToDevice {
                sender: sender.to_owned(),
                event_type: event_type.to_owned(),
                content: ev["content"].clone(),
            }),
            _ => b.rejected.push("a to-device event without a valid sender, type or object content".into()),
        }
    }
    if let Some(rooms) = resp.pointer("/rooms/join").and_then(Value::as_object) {
        for (room_id, room) in rooms {
            if room_id.len() > MAX_ID || !room_id.starts_with('!') {
                b.rejected.push("a joined room with an invalid ID".into());
                continue;
            }
            let mut r = JoinedRoom { room_id: room_id.clone(), ..JoinedRoom::default() };
            let mut rejected = Vec::new();
            r.state = events(room, "/state/events").filter_map(|e| room_event(e, &mut rejected, room_id)).collect();
            r.timeline =
                events(room, "/timeline/events").filter_map(|e| room_event(e, &mut rejected, room_id)).collect();
            b.rejected.extend(rejected);
            b.rooms.push(r);
        }
    }
    if let Some(invites) = resp.pointer("/rooms/invite").and_then(Value::as_object) {
        for (room_id, invite) in invites {
            if room_id.len() > MAX_ID || !room_id.starts_with('!') {
                b.rejected.push("an invite to a room with an invalid ID".into());
                continue;
            }
            let own = events(invite, "/invite_state/events")
                .find(|e| e["type"] == "m.room.member" && e["state_key"] == own_user);
            b.invites.push(Invite {
                room_id: room_id.clone(),
                inviter: own.and_then(|m| user_id(&m["sender"])).map(str::to_owned),
                is_direct: own.is_some_and(|m| m["content"]["is_direct"] == true),
            });
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn good_items_pass_and_bad_ones_are_left_out_with_a_reason() {
        let resp = json!({
            "next_batch": "s1",
            "device_lists": {"changed": ["@a:x", 5, "not a user"]},
            "device_one_time_keys_count": {"signed_curve25519": 7},
            "device_unused_fallback_key_types": [],
            "to_device": {"events": [
                {"sender": "@a:x", "type": "m.key.verification.request", "content": {"transaction_id": "t"}},
                {"sender": "@a:x", "type": "m.key.verification.request", "content": "not an object"},
                {"sender": 17, "type": "x", "content": {}},
                {"type": "x", "content": {}},
            ]},
            "rooms": {
                "join": {
                    "!r:x": {"timeline": {"events": [
                        {"sender": "@a:x", "type": "m.room.message", "event_id": "$1", "content": {"msgtype": "m.text"}, "origin_server_ts": 5},
                        {"sender": "@a:x", "type": "m.room.message", "event_id": "$2", "content": [1, 2]},
                        {"sender": "@a:x", "type": "x".repeat(300), "event_id": "$3", "content": {}},
                    ]}, "state": {"events": [
                        {"sender": "@a:x", "type": "m.room.encryption", "state_key": "", "event_id": "$0", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
                    ]}},
                    "bad room": {},
                },
                "invite": {"!i:x": {"invite_state": {"events": [
                    {"type": "m.room.member", "state_key": "@me:x", "sender": "@a:x", "content": {"membership": "invite", "is_direct": true}}
                ]}}}
            }
        });
        let b = parse(&resp, "@me:x");
        assert_eq!(b.next_batch.as_deref(), Some("s1"));
        assert_eq!(b.device_lists_changed, ["@a:x"]);
        assert_eq!((b.one_time_key_count, b.fallback_unused), (Some(7), Some(false)));
        assert_eq!(b.to_device.len(), 1);
        assert_eq!(b.rooms.len(), 1);
        assert_eq!(b.rooms[0].timeline.len(), 1);
        assert_eq!(b.rooms[0].state[0].state_key.as_deref(), Some(""));
        assert_eq!(b.invites, vec![Invite { room_id: "!i:x".into(), inviter: Some("@a:x".into()), is_direct: true }]);
        assert_eq!(b.rejected.len(), 6, "{:#?}", b.rejected);
    }

    #[test]
    fn an_item_nested_too_deep_is_left_out_alone() {
        let deep = |levels: usize| format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
        let text = format!(
            r#"{{"next_batch": "s2", "to_device": {{"events": [
                {{"sender": "@a:x", "type": "m.key.verification.request", "content": {{"deep": {d}}}}},
                {{"sender": "@a:x", "type": "m.key.verification.request", "content": {{"transaction_id": "t"}}}}
            ]}}, "rooms": {{"join": {{"!r:x": {{"timeline": {{"events": [
                {{"sender": "@a:x", "type": "m.room.message", "event_id": "$1", "content": {{"body": {d}}}}},
                {{"sender": "@a:x", "type": "m.room.message", "event_id": "$2", "content": {{"body": "hi"}}}}
            ]}}}}}}}}}}"#,
            d = deep(500)
        );
        let b = parse(&crate::http::parse_json(text.as_bytes()).unwrap(), "@me:x");
        assert_eq!(b.next_batch.as_deref(), Some("s2"));
        assert_eq!(b.to_device.len(), 1);
        assert_eq!(b.to_device[0].content["transaction_id"], "t");
        assert_eq!(b.rooms[0].timeline.len(), 1);
        assert_eq!(b.rooms[0].timeline[0].event_id, "$2");
        assert_eq!(b.rejected.len(), 2, "{:#?}", b.rejected);
        assert!(b.rejected.iter().all(|r| r.contains("nesting too deep")), "{:#?}", b.rejected);
        assert!(b.rejected[0].contains("from @a:x"), "{:#?}", b.rejected);
    }

    #[test]
    fn anything_at_all_parses_without_panicking() {
        for v in [
            json!(null),
            json!([]),
            json!("x"),
            json!({"rooms": 5}),
            json!({"rooms": {"join": []}}),
            json!({"to_device": {"events": {}}}),
            json!({"device_one_time_keys_count": 3}),
        ] {
            let b = parse(&v, "@me:x");
            assert!(b.to_device.is_empty() && b.rooms.is_empty());
        }
        assert_eq!(parse(&json!({}), "@me:x").one_time_key_count, None, "absent counts are not zero");
    }
}
