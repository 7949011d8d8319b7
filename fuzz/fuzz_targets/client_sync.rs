//! Anything a homeserver may answer to `/sync` or `/keys/query`, through what the client does
//! with it before any network call: the boundary checks of a sync batch, the signature checks of
//! every user's keys, Olm decryption of every to-device event and Megolm decryption of every room
//! event (against a real device's account and store in memory). Nothing may panic.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use mxverify_client::olm::Olm;
use mxverify_client::store::Store;
use mxverify_client::{keys, megolm, sync};

struct Local {
    store: Store,
    olm: Olm,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new({
        let mut store = Store::open_in_memory().expect("a store in memory");
        let olm = Olm::load(&mut store, "@me:x", "ME", [7; 32]).expect("an account");
        Local { store, olm }
    });
}

fuzz_target!(|data: &[u8]| {
    let Ok(resp) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let batch = sync::parse(&resp, "@me:x");
    // The same bytes as a /keys/query answer, for every user they name.
    let mut users: Vec<String> = batch.device_lists_changed.clone();
    if let Some(map) = resp.get("device_keys").and_then(|d| d.as_object()) {
        users.extend(map.keys().take(16).cloned());
    }
    for u in &users {
        let info = keys::check_user(&resp, u);
        let _ = info.for_machine();
    }
    LOCAL.with(|local| {
        let mut local = local.borrow_mut();
        let Local { store, olm } = &mut *local;
        for ev in batch.to_device.iter().take(16) {
            if let Ok(plain) = olm.decrypt(store, &ev.sender, &ev.content, 0) {
                let _ = plain.attribute([]);
            }
        }
        for room in batch.rooms.iter().take(4) {
            for ev in room.timeline.iter().take(16) {
                let _ = megolm::decrypt_room_event(store, &[7; 32], &room.room_id, &ev.raw);
            }
        }
    });
});
