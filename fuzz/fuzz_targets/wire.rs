//! Any JSON content, under any verification event type and either transport: parsing never
//! panics, and whatever parses re-encodes into something that parses to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxverify_proto::wire::{self, Envelope};

const TYPES: [&str; 9] = [
    "m.key.verification.request",
    "m.key.verification.ready",
    "m.key.verification.start",
    "m.key.verification.accept",
    "m.key.verification.key",
    "m.key.verification.mac",
    "m.key.verification.done",
    "m.key.verification.cancel",
    "m.room.message",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(content) = serde_json::from_slice::<serde_json::Value>(rest) else {
        return;
    };
    let event_type = TYPES[usize::from(selector) % TYPES.len()];
    let in_room = selector & 0x80 != 0;
    let Some(parsed) = wire::parse(event_type, &content, in_room, None) else {
        return;
    };
    if let Ok(msg) = parsed.msg {
        let envelope = if in_room {
            Envelope::Room(parsed.flow_id.clone())
        } else {
            Envelope::ToDevice(parsed.flow_id.clone().unwrap_or_default())
        };
        let (ty, encoded) = wire::encode(&msg, &envelope);
        let value: serde_json::Value = serde_json::from_str(encoded.as_str()).expect("our own encoding is JSON");
        // Written canonical (a number beyond canonical JSON's range, as a peer may send in a
        // request's timestamp, has no canonical form to compare with).
        if let Ok(canonical) = mxverify_proto::canonical::to_string(&value) {
            assert_eq!(canonical, encoded.as_str());
        }
        let again = wire::parse(ty, &value, in_room, None).expect("our own encoding is a verification event");
        assert_eq!(again.msg.expect("our own encoding parses"), msg);
    }
});
