//! Interoperability with matrix-js-sdk 43 (Element's SDK, with its Rust crypto) through the local
//! Synapse: every combination a person meets — who requests, which transport, who starts SAS,
//! QR in each direction and mode — plus cancels at each stage, mismatches, a timeout, and bad input
//! towards js-sdk. js-sdk runs headless in Node 22 through `interop/driver.mjs`.
//!
//! The scenarios run one at a time: each js-sdk peer is a Node process with its own crypto, and
//! the machine has two cores.

mod common;

use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Node 22 with matrix-js-sdk installed (by `scripts/interop-setup`, idempotent).
fn node() -> String {
    static NODE: OnceLock<String> = OnceLock::new();
    NODE.get_or_init(|| {
        let out = Command::new(repo().join("scripts/interop-setup")).output().expect("scripts/interop-setup runs");
        assert!(out.status.success(), "interop setup failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().last().expect("the node path").trim().to_owned()
    })
    .clone()
}

/// A js-sdk device of `user`, ready once logged in, crypto running and synced.
fn js(name: &str, user: &str, cross_signing: bool) -> Proc {
    js_with(name, user, cross_signing, &[])
}

/// The same, with more driver options (`--encrypt-verification`, `--auto-join`).
fn js_with(name: &str, user: &str, cross_signing: bool, options: &[&str]) -> Proc {
    let hs = homeserver();
    let driver = repo().join("interop/driver.mjs");
    let mut args = vec![driver.to_str().unwrap().to_owned(), "--homeserver".into(), hs, "--user".into(), user.into()];
    args.extend(["--password".into(), PASSWORD.into()]);
    if cross_signing {
        args.push("--cross-signing".into());
    }
    args.extend(options.iter().map(|o| (*o).to_owned()));
    let mut cmd = Command::new(node());
    // js-sdk's own warnings (push rules and the like) would drown the test output.
    cmd.args(&args).env("MXV_DRIVER_LOG", std::env::var("MXV_DRIVER_LOG").unwrap_or_else(|_| "error".into()));
    let mut p = Proc::spawn_command(name, cmd);
    p.expect_within("ready_to_go", Duration::from_secs(60));
    p
}

/// A js-sdk user and an mxverify user, both with cross-signing, sharing an encrypted room (so
/// js-sdk tracks the mxverify user's devices), and a plain direct-message room for in-room flows.
struct Pair {
    js_user: String,
    js: Proc,
    js_device: String,
    mx_user: String,
    mx_dir: std::path::PathBuf,
    mx_device: String,
    dm_room: String,
}

fn pair(label: &str) -> Pair {
    let (js_user, mx_user) = (user(&format!("{label}js")), user(&format!("{label}mx")));
    let (mx_dir, mx_device) = device(&mx_user, &format!("{label}mx"), None);
    bootstrap(&mx_dir);
    let mut js = js(&format!("{label}-js"), &js_user, true);
    let js_device = js.seen.last().unwrap()["device"].as_str().unwrap().to_owned();
    let room = |js: &mut Proc, encrypted: bool| -> String {
        js.send(json!({"command": "create_room", "invite": [mx_user], "encrypted": encrypted, "direct": !encrypted}));
        js.expect("room")["room_id"].as_str().unwrap().to_owned()
    };
    let encrypted = room(&mut js, true);
    let dm_room = room(&mut js, false);
    for r in [&encrypted, &dm_room] {
        let (code, _, err) = run(&mx_dir, &["join", r]);
        assert_eq!(code, 0, "join: {err}");
    }
    sync(&mut js);
    Pair { js_user, js, js_device, mx_user, mx_dir, mx_device, dm_room }
}

fn sync(js: &mut Proc) {
    js.send(json!({"command": "sync"}));
    js.expect("synced");
    js.send(json!({"command": "sync"}));
    js.expect("synced");
}

fn listen(p: &Pair, method: &str, env: &[(&str, &str)]) -> Proc {
    let mut l = Proc::spawn_env("mxverify", &p.mx_dir, &["listen", "--once", "--method", method], env);
    l.expect("listening");
    l
}

fn flow(v: &Value) -> String {
    v["flow_id"].as_str().unwrap().to_owned()
}

/// Both sides compare SAS (they must be equal) and confirm.
fn compare_and_confirm(a: &mut Proc, b: &mut Proc, f: &str) {
    let (sa, sb) = (a.expect("sas"), b.expect("sas"));
    assert_eq!(sa["decimals"], sb["decimals"], "decimals differ");
    let names = |s: &Value| s["emoji"].as_array().map(|e| e.iter().map(|x| x["name"].clone()).collect::<Vec<_>>());
    assert_eq!(names(&sa), names(&sb), "emoji differ");
    a.cmd("confirm", f);
    b.cmd("confirm", f);
}

/// Checks the end state of a successful flow: js-sdk reports the mxverify device (and user) as
/// verified, and mxverify recorded and cross-signed the js-sdk side.
fn check_success(p: &mut Pair, mx: &mut Proc, expect_user_verified: bool) {
    let js_done = p.js.expect("done");
    assert_eq!(js_done["device_verified"], true, "js-sdk trusts our device: {js_done}");
    if expect_user_verified {
        assert_eq!(js_done["user_verified"], true, "js-sdk trusts our user: {js_done}");
    }
    let mx_done = mx.expect("done");
    assert_eq!(mx_done["verified_device"], p.js_device.as_str());
    assert_eq!(mx.wait(), 0);
    let (_, trusted, _) = run(&p.mx_dir, &["trust"]);
    assert!(trusted.iter().any(|t| t["record"]["device_id"] == p.js_device.as_str()), "{trusted:#?}");
    p.js.send(json!({"command": "status", "user": p.mx_user, "device": p.mx_device}));
    let status = p.js.expect("status");
    assert_eq!(status["device_verified"], true, "{status}");
}

#[test]
fn to_device_js_requests_either_side_starts() {
    let _s = serial();
    for mx_starts in [false, true] {
        let mut p = pair(if mx_starts { "tdjm" } else { "tdjj" });
        let mut mx = listen(&p, "sas", &[]);
        p.js.send(json!({"command": "request", "user": p.mx_user, "device": p.mx_device}));
        let req = mx.expect("request");
        let f = flow(&req);
        mx.cmd("accept", &f);
        p.js.expect("ready");
        if mx_starts {
            mx.expect("ready");
            mx.cmd("start_sas", &f);
        } else {
            p.js.cmd("start_sas", &f);
        }
        compare_and_confirm(&mut p.js, &mut mx, &f);
        check_success(&mut p, &mut mx, true);
        // The server shows our user-signing signature on the js-sdk user's master key.
        let token = raw_login(&p.mx_user);
        let q = api(
            Some(&token),
            "POST",
            "/_matrix/client/v3/keys/query",
            Some(json!({"device_keys": {p.js_user.clone(): []}})),
        );
        assert_eq!(
            q["master_keys"][&p.js_user]["signatures"][&p.mx_user].as_object().map(|o| o.len()),
            Some(1),
            "{q:#}"
        );
    }
}

#[test]
fn to_device_olm_encrypted_towards_js_sdk() {
    let _s = serial();
    // mxverify sends its to-device messages Olm-encrypted (js-sdk answers in the clear).
    let mut p = pair("tdoe");
    let mut mx = listen(&p, "sas", &[("MXVERIFY_ENCRYPT_TO_DEVICE", "true")]);
    p.js.send(json!({"command": "request", "user": p.mx_user, "device": p.mx_device}));
    let f = flow(&mx.expect("request"));
    mx.cmd("accept", &f);
    p.js.expect("ready");
    mx.expect("ready");
    mx.cmd("start_sas", &f);
    compare_and_confirm(&mut p.js, &mut mx, &f);
    check_success(&mut p, &mut mx, true);
    assert_eq!(sql(&p.mx_dir, "SELECT COUNT(*) FROM olm_sessions"), 1, "one Olm session, with the js-sdk device");
}

#[test]
fn to_device_mxverify_requests_either_side_starts() {
    let _s = serial();
    for mx_starts in [false, true] {
        let mut p = pair(if mx_starts { "tdmm" } else { "tdmj" });
        let mut mx = Proc::spawn("mxverify", &p.mx_dir, &["request", &p.js_user, "--device", &p.js_device]);
        let req = p.js.expect("request");
        let f = flow(&req);
        p.js.cmd("accept", &f);
        mx.expect("ready");
        if mx_starts {
            mx.cmd("start_sas", &f);
        } else {
            p.js.expect("ready");
            p.js.cmd("start_sas", &f);
        }
        compare_and_confirm(&mut mx, &mut p.js, &f);
        check_success(&mut p, &mut mx, true);
    }
}

#[test]
fn in_room_either_side_requests() {
    let _s = serial();
    for js_requests in [true, false] {
        let mut p = pair(if js_requests { "irj" } else { "irm" });
        let (mut mx, f) = if js_requests {
            let mut mx = listen(&p, "sas", &[]);
            p.js.send(json!({"command": "request", "user": p.mx_user, "room": p.dm_room}));
            let req = mx.expect("request");
            assert_eq!(req["transport"], "room");
            let f = flow(&req);
            mx.cmd("accept", &f);
            (mx, f)
        } else {
            let mx = Proc::spawn("mxverify", &p.mx_dir, &["request", &p.js_user, "--room", &p.dm_room]);
            let req = p.js.expect("request");
            assert_eq!(req["transport"], "room");
            let f = flow(&req);
            p.js.cmd("accept", &f);
            (mx, f)
        };
        mx.expect("ready");
        p.js.expect("ready");
        // The side that did not request starts SAS.
        if js_requests {
            mx.cmd("start_sas", &f);
        } else {
            p.js.cmd("start_sas", &f);
        }
        compare_and_confirm(&mut mx, &mut p.js, &f);
        check_success(&mut p, &mut mx, true);
    }
}

#[test]
fn same_user_to_device() {
    let _s = serial();
    // A second device of the mxverify user, running js-sdk (it does not hold the cross-signing keys).
    let mx_user = user("selfmx");
    let (mx_dir, mx_device) = device(&mx_user, "selfmx", None);
    bootstrap(&mx_dir);
    let mut js = js("self-js", &mx_user, false);
    let js_device = js.seen.last().unwrap()["device"].as_str().unwrap().to_owned();
    sync(&mut js);
    let mut mx = Proc::spawn("mxverify", &mx_dir, &["request", &mx_user, "--device", &js_device]);
    let f = flow(&js.expect("request"));
    js.cmd("accept", &f);
    mx.expect("ready");
    mx.cmd("start_sas", &f);
    compare_and_confirm(&mut mx, &mut js, &f);
    let done = js.expect("done");
    assert_eq!(done["device_verified"], true, "{done}");
    assert_eq!(mx.expect("done")["verified_device"], js_device.as_str());
    assert_eq!(mx.wait(), 0);
    // mxverify holds the self-signing key: the js-sdk device is now cross-signed for everyone.
    let (dir3, _) = device(&mx_user, "selfmx3", None);
    let (_, devices, _) = run(&dir3, &["devices"]);
    let jsd = devices.iter().find(|d| d["device"] == js_device.as_str()).unwrap();
    assert_eq!(jsd["cross_signed"], true, "{devices:#?}");
    let _ = mx_device;
    // The new js-sdk device asked for the private keys right after; mxverify stayed to answer.
    let status = js_cross_signing_status(&mut js, |st| st["master"] == true);
    assert_eq!(
        (status["master"].as_bool(), status["self_signing"].as_bool(), status["user_signing"].as_bool()),
        (Some(true), Some(true), Some(true)),
        "js-sdk caches all three private keys: {status}"
    );
}

/// js-sdk's `cross_signing_status`, asked again (up to 20 s) until `ready` says yes.
fn js_cross_signing_status(js: &mut Proc, ready: impl Fn(&Value) -> bool) -> Value {
    let end = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        js.send(json!({"command": "cross_signing_status"}));
        let st = js.expect("cross_signing_status");
        if ready(&st) || std::time::Instant::now() > end {
            return st;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn mx_status(dir: &std::path::PathBuf) -> Value {
    let (code, lines, err) = run(dir, &["cross-signing", "status"]);
    assert_eq!(code, 0, "{err}");
    lines.into_iter().find(|l| l["event"] == "cross_signing_status").unwrap()
}

#[test]
fn a_new_mxverify_device_gets_the_keys_from_js_sdk_and_uses_them() {
    let _s = serial();
    let u = user("jskeys");
    let mut js = js("keys-js", &u, true);
    let js_device = js.seen.last().unwrap()["device"].as_str().unwrap().to_owned();
    let (mx_dir, mx_device) = device(&u, "jskeysmx", None);
    assert_eq!(mx_status(&mx_dir)["held"], json!([]));
    sync(&mut js);
    let mut mx = Proc::spawn("mxverify", &mx_dir, &["listen", "--once"]);
    mx.expect("listening");
    js.send(json!({"command": "request", "user": u, "device": mx_device}));
    let f = flow(&mx.expect("request"));
    mx.cmd("accept", &f);
    js.expect("ready");
    js.cmd("start_sas", &f);
    compare_and_confirm(&mut js, &mut mx, &f);
    assert_eq!(mx.expect("done")["verified_device"], js_device.as_str());
    for _ in 0..3 {
        while mx.expect_within("notice", Duration::from_secs(30))["kind"] != "secret_received" {}
    }
    assert_eq!(mx.wait(), 0);
    let st = mx_status(&mx_dir);
    assert_eq!(
        (st["held"].as_array().map(Vec::len), st["held_master_matches"].as_bool()),
        (Some(3), Some(true)),
        "{st}"
    );

    // With the user-signing key it got, the new device cross-signs another user it verifies.
    let w = user("jskeysw");
    let (wd, _) = device(&w, "jskeysw", None);
    bootstrap(&wd);
    let mut wl = Proc::spawn("w", &wd, &["listen", "--once"]);
    wl.expect("listening");
    let mut mr = Proc::spawn("mxverify", &mx_dir, &["request", &w]);
    let f = flow(&wl.expect("request"));
    accept_and_compare(&mut mr, &mut wl, &f);
    confirm_both(&mut mr, &mut wl, &f, Duration::from_secs(60));
    assert_eq!(mr.wait(), 0);
    assert!(master_key_signed_by(&u, &w), "the new device signed {w}'s master key");
}

#[test]
fn recovery_keys_work_both_ways_between_js_sdk_and_mxverify() {
    let _s = serial();
    // js-sdk makes secret storage; its recovery key restores the keys into mxverify.
    let u = user("rkjs");
    let mut js1 = js("rk-js", &u, true);
    js1.send(json!({"command": "bootstrap_secret_storage"}));
    let made = js1.expect("secret_storage");
    let rk = made["recovery_key"].as_str().unwrap().to_owned();
    let (mx_dir, mx_device) = device(&u, "rkjsmx", None);
    let (code, lines, err) = run(&mx_dir, &["cross-signing", "recover", "--recovery-key", &rk]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines[0]["restored"], true);
    let st = mx_status(&mx_dir);
    assert_eq!(
        (st["held"].as_array().map(Vec::len), st["held_master_matches"].as_bool()),
        (Some(3), Some(true)),
        "{st}"
    );
    sync(&mut js1);
    js1.send(json!({"command": "status", "user": u, "device": mx_device}));
    assert_eq!(js1.expect("status")["cross_signed"], true, "the restored device signed itself");
    // js-sdk's secret storage is read, never overwritten.
    js1.send(json!({"command": "account_data", "type": "m.secret_storage.default_key"}));
    let before = js1.expect("account_data")["content"].clone();
    let (code, lines, err) = run(&mx_dir, &["cross-signing", "bootstrap", "--password", PASSWORD]);
    assert_eq!(code, 0, "{err}");
    assert_eq!((lines[0]["secret_storage"].as_str(), lines[0]["created"].as_bool()), (Some("existing"), Some(false)));
    js1.send(json!({"command": "account_data", "type": "m.secret_storage.default_key"}));
    assert_eq!(js1.expect("account_data")["content"], before);

    // A key js-sdk made from a passphrase: the passphrase restores the keys too.
    let p = user("rkpp");
    let mut js3 = js("rk-js3", &p, true);
    js3.send(json!({"command": "bootstrap_secret_storage", "passphrase": "correct horse battery staple"}));
    js3.expect("secret_storage");
    let (mx3, _) = device(&p, "rkppmx", None);
    let (code, _, err) = run(&mx3, &["cross-signing", "recover", "--passphrase", "wrong horse"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not open"), "{err}");
    let mut rec = Proc::spawn_env(
        "recover",
        &mx3,
        &["cross-signing", "recover"],
        &[("MXVERIFY_RECOVERY_PASSPHRASE", "correct horse battery staple")],
    );
    assert_eq!(rec.expect("cross_signing")["restored"], true);
    assert_eq!(rec.wait(), 0);

    // mxverify makes secret storage; its recovery key restores the keys into a new js-sdk device.
    let v = user("rkmx");
    let (mx2, _) = device(&v, "rkmx", None);
    let (code, lines, err) = run(&mx2, &["cross-signing", "bootstrap", "--password", PASSWORD]);
    assert_eq!(code, 0, "{err}");
    let rk = lines[0]["recovery_key"].as_str().unwrap().to_owned();
    let master = lines[0]["master_key"].as_str().unwrap().to_owned();
    let mut js2 = js("rk-js2", &v, false);
    js2.send(json!({"command": "restore_secret_storage", "recovery_key": rk}));
    let restored = js2.expect("restored");
    assert_eq!(
        (restored["master"].as_bool(), restored["self_signing"].as_bool(), restored["user_signing"].as_bool()),
        (Some(true), Some(true), Some(true)),
        "{restored}"
    );
    assert_eq!(restored["master_key"], master.as_str());
    let st = js_cross_signing_status(&mut js2, |st| st["master"] == true);
    assert_eq!(st["user_signing"], true, "{st}");
}

#[test]
fn qr_js_shows_mxverify_scans_and_back() {
    let _s = serial();
    for mx_scans in [true, false] {
        let mut p = pair(if mx_scans { "qrms" } else { "qrjs" });
        let mut mx = listen(&p, "qr", &[]);
        p.js.send(json!({"command": "request", "user": p.mx_user, "device": p.mx_device}));
        let f = flow(&mx.expect("request"));
        mx.cmd("accept", &f);
        p.js.expect("ready");
        if mx_scans {
            let code = p.js.expect("qr");
            mx.send(json!({"command": "scan", "flow_id": f, "payload": code["payload"]}));
            p.js.expect("qr_scanned");
            p.js.cmd("confirm", &f);
        } else {
            let code = mx.expect("qr");
            assert_eq!(code["mode"], 0, "verifying another user");
            p.js.send(json!({"command": "scan_qr", "flow_id": f, "payload": code["payload"]}));
            mx.expect("qr_scanned");
            mx.cmd("confirm", &f);
        }
        let js_done = p.js.expect("done");
        assert_eq!(js_done["user_verified"], true, "QR between users verifies the user: {js_done}");
        let mx_done = mx.expect("done");
        assert_eq!(mx_done["keys"][0]["kind"], "master_key");
        assert_eq!(mx.wait(), 0);
    }
}

#[test]
fn qr_self_verification_modes() {
    let _s = serial();
    // mxverify trusts the master key (it made it); the js-sdk device does not yet. mxverify shows
    // mode 0x01 and js-sdk scans it; then, on a fresh js-sdk device, js-sdk shows mode 0x02 and
    // mxverify scans it.
    for mx_shows in [true, false] {
        let mx_user = user(if mx_shows { "qrs1" } else { "qrs2" });
        let (mx_dir, _) = device(&mx_user, "qrself", None);
        bootstrap(&mx_dir);
        let mut js = js("qrself-js", &mx_user, false);
        let js_device = js.seen.last().unwrap()["device"].as_str().unwrap().to_owned();
        sync(&mut js);
        let mut mx = Proc::spawn("mxverify", &mx_dir, &["request", &mx_user, "--device", &js_device, "--method", "qr"]);
        let f = flow(&js.expect("request"));
        js.cmd("accept", &f);
        mx.expect("ready");
        if mx_shows {
            let code = mx.expect("qr");
            assert_eq!(code["mode"], 1);
            js.send(json!({"command": "scan_qr", "flow_id": f, "payload": code["payload"]}));
            mx.expect("qr_scanned");
            mx.cmd("confirm", &f);
            assert_eq!(mx.expect("done")["keys"][0]["kind"], "device", "mode 0x01: the displayer trusts the device");
        } else {
            let code = js.expect("qr");
            mx.send(json!({"command": "scan", "flow_id": f, "payload": code["payload"]}));
            js.expect("qr_scanned");
            js.cmd("confirm", &f);
            assert_eq!(mx.expect("done")["keys"][0]["kind"], "device", "mode 0x02: the scanner trusts the device");
        }
        let done = js.expect("done");
        assert_eq!(done["device_verified"], true, "{done}");
        assert_eq!(mx.wait(), 0);
    }
}

/// Where in the flow a cancel happens.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    Request,
    Ready,
    Started,
    SasShown,
}

#[test]
fn cancel_by_each_side_at_each_stage() {
    let _s = serial();
    for stage in [Stage::Request, Stage::Ready, Stage::Started, Stage::SasShown] {
        for js_cancels in [true, false] {
            let label = format!("c{}{}", stage as u8, if js_cancels { "j" } else { "m" });
            let mut p = pair(&label);
            let mut mx = listen(&p, "sas", &[]);
            p.js.send(json!({"command": "request", "user": p.mx_user, "device": p.mx_device}));
            let f = flow(&mx.expect("request"));
            if stage != Stage::Request {
                mx.cmd("accept", &f);
                p.js.expect("ready");
                mx.expect("ready");
            }
            if matches!(stage, Stage::Started | Stage::SasShown) {
                p.js.cmd("start_sas", &f);
                p.js.expect("started");
                mx.expect("started");
            }
            if stage == Stage::SasShown {
                p.js.expect("sas");
                mx.expect("sas");
            }
            if js_cancels {
                p.js.cmd("cancel", &f);
            } else {
                mx.cmd("cancel", &f);
            }
            let (cj, cm) = (p.js.expect("cancelled"), mx.expect("cancelled"));
            assert_eq!(cj["code"], "m.user", "{stage:?} js: {cj}");
            assert_eq!(cm["code"], "m.user", "{stage:?} mxverify: {cm}");
            assert_eq!(cm["by"], if js_cancels { "them" } else { "us" }, "{stage:?}");
            assert_eq!(mx.wait(), 3);
            assert!(p.js.seen.iter().all(|e| e["event"] != "done"));
        }
    }
}

#[test]
fn mismatch_on_each_side() {
    let _s = serial();
    for js_says_mismatch in [true, false] {
        let mut p = pair(if js_says_mismatch { "mmj" } else { "mmm" });
        let mut mx = listen(&p, "sas", &[]);
        p.js.send(json!({"command": "request", "user": p.mx_user, "device": p.mx_device}));
        let f = flow(&mx.expect("request"));
        mx.cmd("accept", &f);
        p.js.expect("ready");
        p.js.cmd("start_sas", &f);
        p.js.expect("sas");
        mx.expect("sas");
        if js_says_mismatch {
            p.js.cmd("mismatch", &f);
        } else {
            mx.cmd("mismatch", &f);
        }
        let (cj, cm) = (p.js.expect("cancelled"), mx.expect("cancelled"));
        assert_eq!(cj["code"], "m.mismatched_sas");
        assert_eq!(cm["code"], "m.mismatched_sas");
        assert_eq!(cm["by"], if js_says_mismatch { "them" } else { "us" });
        assert_eq!(mx.wait(), 3);
    }
}

#[test]
fn timeout_with_a_short_clock() {
    let _s = serial();
    let mut p = pair("to");
    // mxverify's flow timeout shortened to 4 s; nobody compares the emoji.
    let mut mx = listen(&p, "sas", &[("MXVERIFY_FLOW_TIMEOUT_MS", "4000")]);
    p.js.send(json!({"command": "request", "user": p.mx_user, "device": p.mx_device}));
    let f = flow(&mx.expect("request"));
    mx.cmd("accept", &f);
    p.js.expect("ready");
    p.js.cmd("start_sas", &f);
    mx.expect("sas");
    let cm = mx.expect_within("cancelled", Duration::from_secs(20));
    assert_eq!((cm["code"].as_str(), cm["by"].as_str()), (Some("m.timeout"), Some("us")));
    let cj = p.js.expect("cancelled");
    assert_eq!(cj["code"], "m.timeout", "js-sdk sees our m.timeout: {cj}");
    assert_eq!(mx.wait(), 4);
}

#[test]
fn bad_input_towards_js_sdk() {
    let _s = serial();
    // What js-sdk answers (recorded here as the expected codes), and that mxverify reports it.
    for (fault, js_answer) in
        [("commitment", Some("m.key_mismatch")), ("mac", Some("m.mismatched_sas")), ("unknown_method", None)]
    {
        let mut p = pair(&format!("bad{}", &fault[..3]));
        let env: Vec<(&str, &str)> = vec![("MXVERIFY_TEST_FAULT", fault), ("MXVERIFY_FLOW_TIMEOUT_MS", "8000")];
        let mut mx = listen(&p, "sas", &env);
        p.js.send(json!({"command": "request", "user": p.mx_user, "device": p.mx_device}));
        let f = flow(&mx.expect("request"));
        mx.cmd("accept", &f);
        p.js.expect("ready");
        mx.expect("ready");
        match fault {
            // We accept js-sdk's start with a wrong commitment: js-sdk checks it on our key.
            "commitment" => p.js.cmd("start_sas", &f),
            "mac" => {
                p.js.cmd("start_sas", &f);
                compare_and_confirm(&mut p.js, &mut mx, &f);
            }
            _ => mx.cmd("start_sas", &f),
        }
        let cm = mx.expect_within("cancelled", Duration::from_secs(30));
        match js_answer {
            Some(code) => {
                assert_eq!(cm["code"], code, "{fault}: js-sdk's answer as mxverify reports it: {cm}");
                assert_eq!(cm["by"], "them");
            }
            // js-sdk does not answer an unknown start method; our flow times out and says so.
            None => assert_eq!((cm["code"].as_str(), cm["by"].as_str()), (Some("m.timeout"), Some("us")), "{cm}"),
        }
        assert!(mx.seen.iter().all(|e| e["event"] != "done") && p.js.seen.iter().all(|e| e["event"] != "done"));
    }
}

// ----- encrypted direct chats ------------------------------------------------------------------

/// A js-sdk user and an mxverify user with cross-signing, and an Element-style encrypted DM that
/// js-sdk created and mxverify joined (through `listen`, which records it in `m.direct`).
struct EncryptedDm {
    p: Pair,
    room: String,
}

fn encrypted_dm(label: &str, js_options: &[&str]) -> EncryptedDm {
    let (js_user, mx_user) = (user(&format!("{label}js")), user(&format!("{label}mx")));
    let (mx_dir, mx_device) = device(&mx_user, &format!("{label}mx"), None);
    bootstrap(&mx_dir);
    let mut js = js_with(&format!("{label}-js"), &js_user, true, js_options);
    let js_device = js.seen.last().unwrap()["device"].as_str().unwrap().to_owned();
    js.send(json!({"command": "create_dm", "user": mx_user}));
    let room = js.expect("room")["room_id"].as_str().unwrap().to_owned();
    // A listener joins the invite and records the direct chat, as a bot would.
    let mut l = Proc::spawn("mxverify-join", &mx_dir, &["listen"]);
    l.expect("listening");
    let joined = expect_notice(&mut l, "joined");
    assert_eq!(joined["room"], room.as_str());
    l.kill();
    sync(&mut js);
    let p = Pair { js_user, js, js_device, mx_user, mx_dir, mx_device, dm_room: room.clone() };
    EncryptedDm { p, room }
}

fn expect_notice(p: &mut Proc, kind: &str) -> Value {
    loop {
        let n = p.expect("notice");
        if n["kind"] == kind {
            return n;
        }
    }
}

/// The events of `sender` in the room as the server has them: (type, algorithm) of each
/// verification event (state events and text messages aside).
fn wire_events_of(js: &mut Proc, room: &str, sender: &str) -> Vec<(String, Option<String>)> {
    js.send(json!({"command": "room_events", "room": room}));
    let events = js.expect("room_events");
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["sender"] == sender && e["msgtype"] != "m.text")
        .filter(|e| {
            e["type"] == "m.room.encrypted"
                || e["type"].as_str().unwrap().starts_with("m.key.verification.")
                || e["msgtype"] == "m.key.verification.request"
        })
        .map(|e| (e["type"].as_str().unwrap().to_owned(), e["algorithm"].as_str().map(str::to_owned)))
        .collect()
}

fn assert_all_megolm(events: &[(String, Option<String>)], who: &str) {
    assert!(events.len() >= 4, "{who}: too few verification events on the wire: {events:?}");
    for (ty, alg) in events {
        assert_eq!(
            (ty.as_str(), alg.as_deref()),
            ("m.room.encrypted", Some("m.megolm.v1.aes-sha2")),
            "{who}: {events:?}"
        );
    }
}

/// js-sdk requests in the encrypted DM; mxverify (already listening) answers and starts SAS.
fn js_requests_in_dm(d: &mut EncryptedDm, mx: &mut Proc) {
    d.p.js.send(json!({"command": "request", "user": d.p.mx_user, "room": d.room}));
    js_requests_in_dm_answered(d, mx);
}

#[test]
fn encrypted_dm_js_requests_in_the_clear_and_encrypted() {
    let _s = serial();
    for encrypting in [false, true] {
        let options: &[&str] = if encrypting { &["--encrypt-verification"] } else { &[] };
        let mut d = encrypted_dm(if encrypting { "edje" } else { "edjc" }, options);
        // mxverify recorded the DM in its m.direct under the js-sdk user.
        let direct = api(
            Some(&raw_login(&d.p.mx_user)),
            "GET",
            &format!("/_matrix/client/v3/user/{}/account_data/m.direct", enc(&d.p.mx_user)),
            None,
        );
        assert_eq!(direct[&d.p.js_user], json!([d.room]), "{direct}");
        let mut mx = listen(&d.p, "sas", &[]);
        js_requests_in_dm(&mut d, &mut mx);
        let ours = wire_events_of(&mut d.p.js, &d.room, &d.p.mx_user);
        assert_all_megolm(&ours, "mxverify");
        let theirs = wire_events_of(&mut d.p.js, &d.room, &d.p.js_user);
        if encrypting {
            assert_all_megolm(&theirs, "js-sdk");
        } else {
            assert!(
                theirs.iter().all(|(ty, _)| ty != "m.room.encrypted"),
                "stock js-sdk sends in the clear: {theirs:?}"
            );
        }
    }
}

#[test]
fn mxverify_requests_in_an_existing_and_in_a_new_encrypted_dm() {
    let _s = serial();
    // An existing DM, found through m.direct.
    let mut d = encrypted_dm("edme", &["--encrypt-verification"]);
    let mut mx = Proc::spawn("mxverify", &d.p.mx_dir, &["request", &d.p.js_user]);
    let req = d.p.js.expect("request");
    assert_eq!(req["room"], d.room.as_str(), "the existing DM is used");
    let f = flow(&req);
    d.p.js.cmd("accept", &f);
    mx.expect("ready");
    d.p.js.cmd("start_sas", &f);
    compare_and_confirm(&mut mx, &mut d.p.js, &f);
    check_success(&mut d.p, &mut mx, true);
    assert_all_megolm(&wire_events_of(&mut d.p.js, &d.room, &d.p.mx_user), "mxverify");
    assert_all_megolm(&wire_events_of(&mut d.p.js, &d.room, &d.p.js_user), "js-sdk");

    // No DM yet: mxverify creates an encrypted one, waits for js-sdk to join, then asks.
    let (js_user, mx_user) = (user("ednjs"), user("ednmx"));
    let (mx_dir, mx_device) = device(&mx_user, "ednmx", None);
    bootstrap(&mx_dir);
    let mut js = js_with("edn-js", &js_user, true, &["--auto-join"]);
    let js_device = js.seen.last().unwrap()["device"].as_str().unwrap().to_owned();
    let mut mx = Proc::spawn("mxverify", &mx_dir, &["request", &js_user]);
    let created = expect_notice(&mut mx, "dm_created");
    let room = created["room"].as_str().unwrap().to_owned();
    let waiting = expect_notice(&mut mx, "waiting_for_join");
    assert_eq!(waiting["room"], room.as_str());
    let invited = js.expect("invited");
    assert_eq!((invited["room_id"].as_str(), invited["is_direct"].as_bool()), (Some(room.as_str()), Some(true)));
    let req = js.expect("request");
    assert_eq!(req["room"], room.as_str());
    let f = flow(&req);
    js.cmd("accept", &f);
    mx.expect("ready");
    js.cmd("start_sas", &f);
    compare_and_confirm(&mut mx, &mut js, &f);
    let mut p = Pair { js_user, js, js_device, mx_user, mx_dir, mx_device, dm_room: room.clone() };
    check_success(&mut p, &mut mx, true);
    assert_all_megolm(&wire_events_of(&mut p.js, &room, &p.mx_user), "mxverify");
    let state = api(
        Some(&raw_login(&p.mx_user)),
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/state/m.room.encryption/", enc(&room)),
        None,
    );
    assert_eq!(state["algorithm"], "m.megolm.v1.aes-sha2");
}

#[test]
fn encrypted_requests_survive_a_stopped_listener() {
    let _s = serial();
    // The room key arrives while the listener runs; the request comes while it is stopped.
    let mut d = encrypted_dm("edrk", &["--encrypt-verification"]);
    let mut l = Proc::spawn("mxverify-key", &d.p.mx_dir, &["listen"]);
    l.expect("listening");
    d.p.js.send(json!({"command": "send_text", "room": d.room, "body": "hello"}));
    d.p.js.expect("sent");
    let store = mxverify_client::Store::open(&d.p.mx_dir).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.room_key_count(&d.room).unwrap() == 0 {
        assert!(std::time::Instant::now() < deadline, "the room key never reached the listener");
        std::thread::sleep(Duration::from_millis(100));
    }
    l.kill();
    d.p.js.send(json!({"command": "request", "user": d.p.mx_user, "room": d.room}));
    std::thread::sleep(Duration::from_secs(1));
    let mut mx = listen(&d.p, "sas", &[]);
    js_requests_in_dm_answered(&mut d, &mut mx);
    assert!(mx.seen.iter().all(|e| e["kind"] != "held"), "the stored room key decrypted the request at once");

    // Both the room key and the request arrive while the listener is stopped.
    let mut d = encrypted_dm("edst", &["--encrypt-verification"]);
    d.p.js.send(json!({"command": "request", "user": d.p.mx_user, "room": d.room}));
    std::thread::sleep(Duration::from_secs(1));
    let mut mx = listen(&d.p, "sas", &[]);
    js_requests_in_dm_answered(&mut d, &mut mx);
}

/// The request js-sdk already sent is answered by mxverify, which starts SAS.
fn js_requests_in_dm_answered(d: &mut EncryptedDm, mx: &mut Proc) {
    let req = mx.expect("request");
    assert_eq!((req["transport"].as_str(), req["room"].as_str()), (Some("room"), Some(d.room.as_str())));
    let f = flow(&req);
    mx.cmd("accept", &f);
    mx.expect("ready");
    d.p.js.expect("ready");
    mx.cmd("start_sas", &f);
    compare_and_confirm(mx, &mut d.p.js, &f);
    check_success(&mut d.p, mx, true);
}
