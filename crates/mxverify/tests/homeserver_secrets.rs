//! The two paths to the cross-signing private keys between mxverify devices, through the local
//! Synapse: secret storage and the recovery key (`bootstrap`, `recover`), and secret sharing right
//! after a self-verification — after which the new device can cross-sign someone it verifies.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn status(dir: &std::path::PathBuf) -> Value {
    let (code, lines, err) = run(dir, &["cross-signing", "status"]);
    assert_eq!(code, 0, "{err}");
    lines.into_iter().find(|l| l["event"] == "cross_signing_status").unwrap()
}

fn bootstrap_with_recovery_key(dir: &std::path::PathBuf) -> (String, String) {
    let (code, lines, err) = run(dir, &["cross-signing", "bootstrap", "--password", PASSWORD]);
    assert_eq!(code, 0, "{err}");
    let line = lines.iter().find(|l| l["event"] == "cross_signing").unwrap();
    assert_eq!(line["secret_storage"], "created", "{line}");
    let rk = line["recovery_key"].as_str().expect("a recovery key on the result").to_owned();
    (line["master_key"].as_str().unwrap().to_owned(), rk)
}

#[test]
fn the_recovery_key_restores_the_keys_on_a_new_device() {
    let u = user("ssss");
    let (a, _) = device(&u, "ssssa", None);
    let (msk, rk) = bootstrap_with_recovery_key(&a);
    let groups: Vec<&str> = rk.split(' ').collect();
    assert_eq!(groups.len(), 12, "{rk}");
    assert!(groups.iter().all(|g| g.len() == 4) && rk.starts_with("Es"), "{rk}");
    // It is never written to disk.
    let db = std::fs::read(a.join("mxverify.sqlite3")).unwrap();
    assert!(!db.windows(rk.len()).any(|w| w == rk.as_bytes()), "the recovery key is not in the store");
    let compact = rk.replace(' ', "");
    assert!(!db.windows(compact.len()).any(|w| w == compact.as_bytes()));
    // A second bootstrap keeps the keys and leaves the storage alone.
    let (code, lines, _) = run(&a, &["cross-signing", "bootstrap", "--password", PASSWORD]);
    assert_eq!(code, 0);
    assert_eq!(lines[0]["secret_storage"], "existing");
    assert_eq!((lines[0]["created"].as_bool(), lines[0]["recovery_key"].as_str()), (Some(false), None));

    let (b, b_dev) = device(&u, "ssssb", None);
    assert_eq!(status(&b)["held"], json!([]));
    // Another account's recovery key, and text that is no recovery key: clear errors, nothing kept.
    let other = user("ssssx");
    let (x, _) = device(&other, "ssssx", None);
    let (_, wrong) = bootstrap_with_recovery_key(&x);
    let (code, lines, err) = run(&b, &["cross-signing", "recover", "--recovery-key", &wrong]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not open this account's secret storage"), "{err}");
    assert!(lines.iter().any(|l| l["event"] == "error"));
    let (code, _, err) = run(&b, &["cross-signing", "recover", "--recovery-key", "EsT not a key"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a recovery key"), "{err}");
    let (code, _, err) = run(&b, &["cross-signing", "recover"]);
    assert_eq!(code, 1);
    assert!(err.contains("recovery key"), "{err}");
    assert_eq!(status(&b)["held"], json!([]));

    // The right key, from the environment (so it is not in the process list).
    let mut p = Proc::spawn_env("recover", &b, &["cross-signing", "recover"], &[("MXVERIFY_RECOVERY_KEY", &rk)]);
    let restored = p.expect("cross_signing");
    assert_eq!((restored["master_key"].as_str(), restored["restored"].as_bool()), (Some(msk.as_str()), Some(true)));
    assert_eq!(p.wait(), 0);
    let st = status(&b);
    assert_eq!(st["held"].as_array().unwrap().len(), 3, "{st}");
    assert_eq!(st["held_master_matches"], true);
    // The new device signed itself with the restored self-signing key.
    let (_, devices, _) = run(&a, &["devices"]);
    let nb = devices.iter().find(|d| d["device"] == b_dev.as_str()).unwrap();
    assert_eq!(nb["cross_signed"], true, "{devices:#?}");
}

#[test]
fn a_new_device_gets_the_keys_from_the_old_one_after_verifying_it_and_uses_them() {
    let u = user("share");
    let (old, _) = device(&u, "shareold", Some("OLDDEV"));
    bootstrap(&old);
    let (new, _) = device(&u, "sharenew", Some("NEWDEV"));
    assert_eq!(status(&new)["held"], json!([]));

    // The old device asks the new one to verify; both confirm; the keys follow by themselves.
    let mut listener = Proc::spawn("new", &new, &["listen", "--once"]);
    listener.expect("listening");
    let mut requester = Proc::spawn("old", &old, &["request", &u, "--device", "NEWDEV"]);
    let flow = listener.expect("request")["flow_id"].as_str().unwrap().to_owned();
    accept_and_compare(&mut requester, &mut listener, &flow);
    confirm_both(&mut requester, &mut listener, &flow, Duration::from_secs(60));
    for _ in 0..3 {
        let n = loop {
            let n = listener.expect_within("notice", Duration::from_secs(30));
            if n["kind"] == "secret_received" {
                break n;
            }
        };
        assert!(n["message"].as_str().unwrap().contains("OLDDEV"), "{n}");
    }
    assert_eq!(listener.wait(), 0);
    for _ in 0..3 {
        while requester.expect_within("notice", Duration::from_secs(30))["kind"] != "secret_sent" {}
    }
    assert_eq!(requester.wait(), 0);
    let st = status(&new);
    assert_eq!(st["held"].as_array().unwrap().len(), 3, "{st}");
    assert_eq!(st["held_master_matches"], true);

    // The new device now verifies another user and its signature is on the server.
    let w = user("sharew");
    let (wd, _) = device(&w, "sharew", None);
    bootstrap(&wd);
    let mut wl = Proc::spawn("w", &wd, &["listen", "--once"]);
    wl.expect("listening");
    let mut nr = Proc::spawn("new", &new, &["request", &w]);
    let flow = wl.expect("request")["flow_id"].as_str().unwrap().to_owned();
    accept_and_compare(&mut nr, &mut wl, &flow);
    confirm_both(&mut nr, &mut wl, &flow, Duration::from_secs(60));
    assert_eq!(nr.wait(), 0);
    assert!(master_key_signed_by(&u, &w), "the new device signed {w}'s master key with the shared user-signing key");
}
