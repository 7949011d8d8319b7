//! Nothing is lost to a fault: signatures the homeserver did not take are uploaded at the next
//! start; a cross-signing upload that failed leaves nothing half-made; a state directory holds
//! one account. Through the fault-injecting proxy where a fault is needed.

mod common;

use std::time::Duration;

use common::proxy::FaultProxy;
use common::*;
use serde_json::json;

#[test]
fn a_state_directory_holds_one_account_unless_replaced() {
    let (a, b) = (user("onea"), user("oneb"));
    let (dir, _) = device(&a, "one", None);
    bootstrap(&dir);
    let hs = homeserver();
    let (code, _, err) = run(&dir, &["login", "--homeserver", &hs, "--user", &b, "--password", PASSWORD]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("belongs to") && err.contains("--replace"), "{err}");
    // Nothing of the first account was touched.
    let (code, lines, _) = run(&dir, &["cross-signing", "status"]);
    assert_eq!(code, 0);
    assert_eq!(lines[0]["held"].as_array().map(Vec::len), Some(3));
    // With --replace, the new account starts from nothing: no keys, no trust, no session.
    let (code, _, err) = run(&dir, &["login", "--homeserver", &hs, "--user", &b, "--password", PASSWORD, "--replace"]);
    assert_eq!(code, 0, "{err}");
    let (_, lines, _) = run(&dir, &["cross-signing", "status"]);
    assert_eq!(lines[0]["held"], json!([]));
    let (_, trust, _) = run(&dir, &["trust"]);
    assert!(trust.is_empty());
    assert_eq!(sql(&dir, "SELECT COUNT(*) FROM olm_sessions"), 0);
}

#[test]
fn signatures_refused_by_a_failing_homeserver_are_uploaded_at_the_next_start() {
    let proxy = FaultProxy::start(&homeserver());
    let (a, b) = (user("siga"), user("sigb"));
    let dir_a = state_dir("siga");
    let (code, _, err) = run(&dir_a, &["login", "--homeserver", &proxy.url(), "--user", &a, "--password", PASSWORD]);
    assert_eq!(code, 0, "{err}");
    bootstrap(&dir_a);
    let (dir_b, _) = device(&b, "sigb", None);
    bootstrap(&dir_b);
    // Every signature upload fails while A verifies B.
    proxy.fail_next(10_000, 502, Some("/keys/signatures/upload"));
    let mut listener = Proc::spawn("b", &dir_b, &["listen", "--once"]);
    listener.expect("listening");
    let mut requester = Proc::spawn("a", &dir_a, &["request", &b]);
    let flow = listener.expect("request")["flow_id"].as_str().unwrap().to_owned();
    accept_and_compare(&mut requester, &mut listener, &flow);
    confirm_both(&mut requester, &mut listener, &flow, Duration::from_secs(60));
    assert_eq!(requester.wait(), 0, "the verification itself succeeded");
    assert_eq!(sql(&dir_a, "SELECT COUNT(*) FROM pending_uploads"), 1, "the signatures wait in the store");
    let token = raw_login(&a);
    let query =
        || api(Some(&token), "POST", "/_matrix/client/v3/keys/query", Some(json!({"device_keys": {b.clone(): []}})));
    let signed = |q: &serde_json::Value| q["master_keys"][&b]["signatures"].get(&a).is_some();
    assert!(!signed(&query()), "not on the server yet");
    // The homeserver works again; the next start uploads them.
    proxy.clear();
    let mut l = Proc::spawn("a-again", &dir_a, &["listen"]);
    l.expect("listening");
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while !signed(&query()) {
        assert!(std::time::Instant::now() < end, "the queued signatures never reached the server");
        std::thread::sleep(Duration::from_millis(200));
    }
    l.kill();
    assert_eq!(sql(&dir_a, "SELECT COUNT(*) FROM pending_uploads"), 0);
}

#[test]
fn a_failed_cross_signing_upload_leaves_nothing_half_made() {
    let proxy = FaultProxy::start(&homeserver());
    let u = user("xsfail");
    let dir = state_dir("xsfail");
    let (code, _, err) = run(&dir, &["login", "--homeserver", &proxy.url(), "--user", &u, "--password", PASSWORD]);
    assert_eq!(code, 0, "{err}");
    proxy.respond(
        "/keys/device_signing/upload",
        Some("POST"),
        400,
        json!({"errcode": "M_INVALID_PARAM", "error": "no"}),
    );
    let (code, _, err) = run(&dir, &["cross-signing", "bootstrap", "--password", PASSWORD]);
    assert_eq!(code, 1, "{err}");
    let (_, lines, _) = run(&dir, &["cross-signing", "status"]);
    assert_eq!((lines[0]["held"].clone(), lines[0]["master_key"].clone()), (json!([]), json!(null)));
    proxy.clear();
    let (code, lines, err) = run(&dir, &["cross-signing", "bootstrap", "--password", PASSWORD]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines[0]["created"], true);
    let (_, status, _) = run(&dir, &["cross-signing", "status"]);
    assert_eq!(status[0]["held_master_matches"], true);
}

#[test]
fn a_store_passphrase_encrypts_the_secrets_at_rest() {
    let u = user("pp");
    let dir = state_dir("pp");
    let hs = homeserver();
    let env = [("MXVERIFY_STORE_PASSPHRASE", "open sesame")];
    let login = |env: &[(&str, &str)]| {
        let mut p =
            Proc::spawn_env("login", &dir, &["login", "--homeserver", &hs, "--user", &u, "--password", PASSWORD], env);
        let v = p.expect("logged_in");
        assert_eq!(p.wait(), 0);
        v
    };
    login(&env);
    let mut b = Proc::spawn_env("bootstrap", &dir, &["cross-signing", "bootstrap", "--password", PASSWORD], &env);
    b.expect("cross_signing");
    assert_eq!(b.wait(), 0);
    // No secret is in the file in the clear.
    let token = sql_text(&dir, "SELECT value FROM kv WHERE key = 'access_token'");
    assert!(token.starts_with("mxverify-enc-v1:"), "{token}");
    let db = std::fs::read(dir.join("mxverify.sqlite3")).unwrap();
    assert!(!db.windows(4).any(|w| w == b"syt_"), "no access token in the clear");
    // Without the passphrase, or with a wrong one: a clear refusal (exit 2), nothing changed.
    let (code, _, err) = run(&dir, &["cross-signing", "status"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("MXVERIFY_STORE_PASSPHRASE"), "{err}");
    let mut wrong =
        Proc::spawn_env("wrong", &dir, &["cross-signing", "status"], &[("MXVERIFY_STORE_PASSPHRASE", "nope")]);
    assert_eq!(wrong.wait(), 2);
    let mut right = Proc::spawn_env("right", &dir, &["cross-signing", "status"], &env);
    assert_eq!(right.expect("cross_signing_status")["held"].as_array().map(Vec::len), Some(3));
    assert_eq!(right.wait(), 0);
}
