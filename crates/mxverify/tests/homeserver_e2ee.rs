//! Olm-encrypted to-device verification between two mxverify devices through the local Synapse,
//! and the repair of a broken Olm session (a new session announced with `m.dummy`).

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn olm_encrypted_to_device_verification_and_a_broken_session_repaired() {
    let carol = user("olm");
    let (d1, _) = device(&carol, "olm1", Some("OLMONE"));
    bootstrap(&d1);
    let (d2, _) = device(&carol, "olm2", Some("OLMTWO"));

    // Both sides send Olm-encrypted; each decrypted the other's messages.
    let mut listener = Proc::spawn("two", &d2, &["listen", "--once", "--encrypt-to-device"]);
    listener.expect("listening");
    let mut requester = Proc::spawn("one", &d1, &["request", &carol, "--device", "OLMTWO", "--encrypt-to-device"]);
    sas(&mut requester, &mut listener);
    assert_eq!(requester.wait(), 0);
    assert_eq!(listener.wait(), 0);
    for d in [&d1, &d2] {
        assert_eq!(sql(d, "SELECT COUNT(*) FROM olm_sessions WHERE last_received > 0"), 1, "{}", d.display());
    }

    // OLMTWO loses its session: OLMONE's next message cannot be decrypted. OLMTWO reports it,
    // opens a new session and announces it with m.dummy; OLMONE's next request goes through.
    sql(&d2, "DELETE FROM olm_sessions");
    let mut listener = Proc::spawn("two", &d2, &["listen", "--once", "--encrypt-to-device"]);
    listener.expect("listening");
    let mut wedged = Proc::spawn("one", &d1, &["request", &carol, "--device", "OLMTWO", "--encrypt-to-device"]);
    wedged.expect("request");
    let repaired = loop {
        let n = listener.expect("notice");
        if n["kind"] == "olm_repaired" {
            break n;
        }
    };
    assert!(repaired["message"].as_str().unwrap().contains("OLMONE"), "{repaired}");
    assert!(
        listener
            .seen
            .iter()
            .any(|e| e["kind"] == "dropped" && e["message"].as_str().unwrap().contains("could not be decrypted")),
        "{:#?}",
        listener.seen
    );
    let end = Instant::now() + Duration::from_secs(30);
    while sql(&d1, "SELECT COUNT(*) FROM olm_sessions") < 2 {
        assert!(Instant::now() < end, "OLMONE never received the m.dummy");
        std::thread::sleep(Duration::from_millis(100));
    }
    wedged.kill();
    let mut requester = Proc::spawn("one", &d1, &["request", &carol, "--device", "OLMTWO", "--encrypt-to-device"]);
    sas(&mut requester, &mut listener);
    assert_eq!(requester.wait(), 0);
    assert_eq!(listener.wait(), 0);
}
