//! Against a real homeserver (the local Synapse of `scripts/synapse`): two users verify each other
//! in a room, two devices of one user verify each other to-device, the result is cross-signed for
//! everyone to see, and bad input at the edges gets a clear message and a distinct exit code.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

#[test]
fn two_users_verify_in_a_room_and_the_signatures_are_published() {
    let (alice, bob) = (user("alice"), user("bob"));
    let (da, _) = device(&alice, "alice", Some("ALICEDEV"));
    let (db, bob_dev) = device(&bob, "bob", None);
    bootstrap(&da);
    bootstrap(&db);
    let mut listener = Proc::spawn("bob", &db, &["listen", "--once"]);
    listener.expect("listening");
    let mut requester = Proc::spawn("alice", &da, &["request", &bob, "--dm"]);
    let (done_a, done_b) = sas(&mut requester, &mut listener);
    assert_eq!(done_a["transport"], "room");
    assert_eq!(done_a["verified_user"], bob.as_str());
    assert_eq!(done_a["verified_device"], bob_dev.as_str());
    let kinds = |d: &Value| {
        let mut k: Vec<String> =
            d["keys"].as_array().unwrap().iter().map(|k| k["kind"].as_str().unwrap().to_owned()).collect();
        k.sort();
        k
    };
    assert_eq!(kinds(&done_a), ["device", "master_key"]);
    assert_eq!(kinds(&done_b), ["device", "master_key"]);
    assert_eq!(requester.wait(), 0);
    assert_eq!(listener.wait(), 0);

    // The direct chat was created encrypted, and every verification event of both sides
    // travelled Megolm-encrypted, with its relation in the clear.
    let room = done_a["room"].as_str().unwrap();
    let token = raw_login(&bob);
    let msgs =
        api(Some(&token), "GET", &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(room)), None);
    let events: Vec<&Value> = msgs["chunk"].as_array().unwrap().iter().filter(|e| e["state_key"].is_null()).collect();
    assert!(events.len() >= 10, "request, ready, start, accept, key ×2, mac ×2, done ×2: {events:#?}");
    for e in &events {
        assert_eq!(e["type"], "m.room.encrypted", "{e:#}");
        assert_eq!(e["content"]["algorithm"], "m.megolm.v1.aes-sha2");
    }
    let related = events.iter().filter(|e| e["content"]["m.relates_to"]["rel_type"] == "m.reference").count();
    assert_eq!(related, events.len() - 1, "all but the request relate to it in the clear");
    let encryption =
        api(Some(&token), "GET", &format!("/_matrix/client/v3/rooms/{}/state/m.room.encryption/", enc(room)), None);
    assert_eq!(encryption["algorithm"], "m.megolm.v1.aes-sha2");

    // A new login of each sees its user-signing signature on the other's master key.
    assert!(master_key_signed_by(&alice, &bob), "Bob's master key carries Alice's user-signing signature");
    assert!(master_key_signed_by(&bob, &alice), "Alice's master key carries Bob's user-signing signature");

    // Both trust stores recorded the other's keys, and `devices` shows Bob's device as verified.
    let (code, trusted, _) = run(&da, &["trust"]);
    assert_eq!(code, 0);
    assert_eq!(trusted.len(), 2);
    let (_, devices, _) = run(&da, &["devices", &bob]);
    assert_eq!(devices[0]["state"], "verified");
}

#[test]
fn two_devices_of_one_user_verify_to_device() {
    let carol = user("carol");
    let (d1, _) = device(&carol, "carol1", Some("CAROLONE"));
    bootstrap(&d1);
    let (d2, _) = device(&carol, "carol2", Some("CAROLTWO"));
    let mut listener = Proc::spawn("carol2", &d2, &["listen", "--once"]);
    listener.expect("listening");
    let mut requester = Proc::spawn("carol1", &d1, &["request", &carol]);
    let (done_1, done_2) = sas(&mut requester, &mut listener);
    assert_eq!(done_1["transport"], "to_device");
    assert_eq!(done_1["verified_device"], "CAROLTWO");
    assert_eq!(done_2["verified_device"], "CAROLONE");
    // The new device had no trust in the master key yet: it learns it from the verification.
    assert!(done_2["keys"].as_array().unwrap().iter().any(|k| k["kind"] == "master_key"));
    assert_eq!(requester.wait(), 0);
    assert_eq!(listener.wait(), 0);
    // CAROLONE holds the self-signing key and signed CAROLTWO: a third login sees it cross-signed.
    let (dir3, _) = device(&carol, "carol3", Some("CAROLTHREE"));
    let (_, devices, _) = run(&dir3, &["devices"]);
    let two = devices.iter().find(|d| d["device"] == "CAROLTWO").unwrap();
    assert_eq!(two["cross_signed"], true, "{devices:#?}");
}

#[test]
fn cancel_and_mismatch_end_with_the_right_code_on_both_sides() {
    let (dave, erin) = (user("dave"), user("erin"));
    let (dd, _) = device(&dave, "dave", None);
    let (de, erin_dev) = device(&erin, "erin", None);
    // Mismatch, to-device to a named device.
    let mut listener = Proc::spawn("erin", &de, &["listen", "--once"]);
    listener.expect("listening");
    let mut requester = Proc::spawn("dave", &dd, &["request", &erin, "--device", &erin_dev]);
    let req = listener.expect("request");
    let flow = req["flow_id"].as_str().unwrap().to_owned();
    listener.cmd("accept", &flow);
    requester.expect("ready");
    requester.cmd("start_sas", &flow);
    listener.expect("sas");
    listener.cmd("mismatch", &flow);
    let (ca, cb) = (requester.expect("cancelled"), listener.expect("cancelled"));
    assert_eq!((ca["code"].as_str(), ca["by"].as_str()), (Some("m.mismatched_sas"), Some("them")));
    assert_eq!((cb["code"].as_str(), cb["by"].as_str()), (Some("m.mismatched_sas"), Some("us")));
    assert_eq!(requester.wait(), 3);
    assert_eq!(listener.wait(), 3);
    // Declined request.
    let mut listener = Proc::spawn("erin", &de, &["listen", "--once"]);
    listener.expect("listening");
    let mut requester = Proc::spawn("dave", &dd, &["request", &erin, "--dm"]);
    let req = listener.expect("request");
    listener.cmd("cancel", req["flow_id"].as_str().unwrap());
    assert_eq!(requester.expect("cancelled")["code"], "m.user");
    assert_eq!(requester.wait(), 3);
    assert_eq!(listener.wait(), 3);
}

#[test]
fn bad_input_at_the_edges() {
    let hs = homeserver();
    let frank = user("frank");
    // Wrong password: 5.
    let dir = state_dir("badpw");
    let (code, lines, err) = run(&dir, &["login", "--homeserver", &hs, "--user", &frank, "--password", "wrong"]);
    assert_eq!(code, 5, "{err}");
    assert_eq!(lines[0]["event"], "error");
    assert!(err.contains("password"), "{err}");
    // Unreachable homeserver: 6 (a closed loopback port).
    let (code, _, err) =
        run(&dir, &["login", "--homeserver", "http://127.0.0.1:9", "--user", &frank, "--password", PASSWORD]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    // Not logged in: 8.
    let (code, _, err) = run(&state_dir("nologin"), &["devices"]);
    assert_eq!(code, 8, "{err}");
    // Unknown user and unknown device: 7.
    let (df, _) = device(&frank, "frank", None);
    let (code, _, err) = run(&df, &["request", "@nobody-here:localhost"]);
    assert_eq!(code, 7, "{err}");
    let (code, _, err) = run(&df, &["request", &frank, "--device", "NOSUCHDEVICE"]);
    assert_eq!(code, 7, "{err}");
    // Our own devices verify to-device: a room for them is refused at once (it could never end).
    let (code, _, err) = run(&df, &["request", &frank, "--room", "!any:localhost"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("to-device"), "{err}");
    // A second process on the same device is refused, whatever the command, while one runs.
    let mut l = Proc::spawn("frank", &df, &["listen"]);
    l.expect("listening");
    for args in [&["devices"][..], &["cross-signing", "status"], &["join", "!x:localhost"]] {
        let (code, _, err) = run(&df, args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("another mxverify process"), "{args:?}: {err}");
    }
    l.kill();
    // Nothing panicked anywhere.
    assert!(!err.contains("panicked"));
}

#[test]
fn malformed_events_from_the_server_do_not_disturb_a_listener() {
    let (gina, hank) = (user("gina"), user("hank"));
    let (dg, gina_dev) = device(&gina, "gina", None);
    let (dh, _) = device(&hank, "hank", None);
    let mut listener = Proc::spawn("gina", &dg, &["listen", "--once"]);
    listener.expect("listening");
    // Hank sends garbage to Gina's device: wrong types, missing fields, unknown transactions.
    let token = raw_login(&hank);
    let junk = [
        ("m.key.verification.request", json!({"from_device": 7, "methods": "m.sas.v1"})),
        ("m.key.verification.start", json!({"transaction_id": "junk", "method": ["x"]})),
        ("m.key.verification.mac", json!({"transaction_id": "junk2", "mac": "nope"})),
        ("m.key.verification.cancel", json!({"transaction_id": "junk3"})),
        ("m.key.verification.key", json!({"transaction_id": 5, "key": 5})),
        // Keys and secrets that are only ever accepted over Olm, and Olm that is not Olm.
        ("m.secret.send", json!({"request_id": "r", "secret": "AAAA"})),
        (
            "m.secret.request",
            json!({"action": "request", "name": "m.cross_signing.master", "request_id": "r",
                                    "requesting_device_id": "EVIL"}),
        ),
        (
            "m.room_key",
            json!({"algorithm": "m.megolm.v1.aes-sha2", "room_id": "!r:localhost", "session_id": "x", "session_key": "y"}),
        ),
        (
            "m.room.encrypted",
            json!({"algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": "junk", "ciphertext": {}}),
        ),
        (
            "m.room.encrypted",
            json!({"algorithm": "m.olm.v1.curve25519-aes-sha2", "sender_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                                    "ciphertext": "not an object"}),
        ),
    ];
    for (i, (ty, content)) in junk.iter().enumerate() {
        api(
            Some(&token),
            "PUT",
            &format!("/_matrix/client/v3/sendToDevice/{ty}/junk{i}"),
            Some(json!({"messages": {gina.clone(): {gina_dev.clone(): content}}})),
        );
    }
    // Then a real request still works.
    let mut requester = Proc::spawn("hank", &dh, &["request", &gina, "--device", &gina_dev]);
    let (done_h, _) = sas(&mut requester, &mut listener);
    assert_eq!(done_h["verified_device"], gina_dev.as_str());
    assert_eq!(listener.wait(), 0);
    // The junk got at most the replies the rules allow (an unknown transaction, once each).
    assert!(listener.seen.iter().all(|e| e["event"] != "error"), "{:#?}", listener.seen);
    // What came in the clear or did not decrypt was dropped, each with its reason.
    let dropped: Vec<&str> = listener
        .seen
        .iter()
        .filter(|e| e["event"] == "notice" && e["kind"] == "dropped")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(dropped.iter().any(|m| m.contains("m.room_key") && m.contains("unencrypted")), "{dropped:#?}");
    assert!(dropped.iter().any(|m| m.contains("m.secret.send") && m.contains("unencrypted")), "{dropped:#?}");
    let refused = listener.seen.iter().filter(|e| e["kind"] == "secret_refused").count();
    assert_eq!(refused, 1, "another user's secret request is refused: {:#?}", listener.seen);
    assert_eq!(dropped.iter().filter(|m| m.contains("encrypted message from")).count(), 2, "{dropped:#?}");
}

#[test]
fn test_faults_meet_the_right_cancel_codes() {
    // MXVERIFY_TEST_FAULT (test only) on one side; the other mxverify answers with the right code.
    for (fault, faulty_is_listener, code) in [
        ("commitment", true, "m.mismatched_commitment"),
        ("mac", true, "m.key_mismatch"),
        ("unknown_method", false, "m.unknown_method"),
    ] {
        let (olga, pete) = (user("olga"), user("pete"));
        let (dol, _) = device(&olga, "olga", None);
        let (dp, pete_dev) = device(&pete, "pete", None);
        let env: Vec<(&str, &str)> = vec![("MXVERIFY_TEST_FAULT", fault)];
        let (lenv, renv) = if faulty_is_listener { (env.clone(), vec![]) } else { (vec![], env) };
        let mut listener = Proc::spawn_env("pete", &dp, &["listen", "--once"], &lenv);
        listener.expect("listening");
        let mut requester = Proc::spawn_env("olga", &dol, &["request", &pete, "--device", &pete_dev], &renv);
        let flow = listener.expect("request")["flow_id"].as_str().unwrap().to_owned();
        listener.cmd("accept", &flow);
        requester.expect("ready");
        requester.cmd("start_sas", &flow);
        if fault == "mac" {
            requester.expect("sas");
            listener.expect("sas");
            listener.cmd("confirm", &flow);
            requester.cmd("confirm", &flow);
        }
        let (ca, cb) = (requester.expect("cancelled"), listener.expect("cancelled"));
        assert_eq!(ca["code"], code, "{fault}");
        assert_eq!(cb["code"], code, "{fault}");
        let honest = if faulty_is_listener { &ca } else { &cb };
        assert_eq!(honest["by"], "us", "{fault}: the honest side cancels");
        assert!(requester.seen.iter().chain(&listener.seen).all(|e| e["event"] != "done"), "nothing trusted");
        assert_eq!(requester.wait(), 3);
        assert_eq!(listener.wait(), 3);
    }
}

#[test]
fn bad_commands_on_stdin_get_an_error_line_and_change_nothing() {
    let (quin, rosa) = (user("quin"), user("rosa"));
    let (dq, _) = device(&quin, "quin", None);
    let (dr, rosa_dev) = device(&rosa, "rosa", None);
    let mut listener = Proc::spawn("rosa", &dr, &["listen", "--once"]);
    listener.expect("listening");
    let mut requester = Proc::spawn("quin", &dq, &["request", &rosa, "--device", &rosa_dev]);
    let flow = listener.expect("request")["flow_id"].as_str().unwrap().to_owned();
    for (bad, says) in [
        (json!("not an object"), "a command needs"),
        (json!({"command": "dance", "flow_id": flow}), "unknown command"),
        (json!({"command": "confirm", "flow_id": flow}), "cannot confirm"),
        (json!({"command": "accept", "flow_id": "no-such-flow"}), "no active verification"),
        (json!({"command": "scan", "flow_id": flow}), "payload"),
        (json!({"command": "accept", "flow_id": flow, "flow": "the attacker's"}), "unknown field"),
        (json!({"command": "accept", "flow_id": 7}), "flow_id is a string"),
    ] {
        listener.send(bad.clone());
        let e = listener.expect("error");
        assert!(e["message"].as_str().unwrap().contains(says), "{bad} → {e}");
    }
    // The flow is untouched and goes on to the end.
    accept_and_compare(&mut requester, &mut listener, &flow);
    let (done_q, _) = confirm_both(&mut requester, &mut listener, &flow, Duration::from_secs(60));
    assert_eq!(done_q["verified_device"], rosa_dev.as_str());
    assert_eq!(listener.wait(), 0);
    assert_eq!(requester.wait(), 0);
}

#[test]
fn human_mode_asks_and_understands_y_and_n() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let (sam, tia) = (user("sam"), user("tia"));
    let (ds, _) = device(&sam, "sam", None);
    let (dt, tia_dev) = device(&tia, "tia", None);
    let mut child = Command::new(exe())
        .arg("--state-dir")
        .arg(&dt)
        .args(["listen", "--once"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut seen = String::new();
    let mut wait_for = |what: &str| loop {
        let l = lines
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no {what:?} in:\n{seen}"));
        seen.push_str(&l);
        seen.push('\n');
        if l.contains(what) {
            return seen.clone();
        }
    };
    wait_for("Listening for verification requests");
    let mut requester = Proc::spawn("sam", &ds, &["request", &tia, "--device", &tia_dev]);
    wait_for("Accept? [y/n]");
    writeln!(stdin, "maybe").unwrap(); // not an answer: asked again, nothing changes
    wait_for("please answer y or n");
    writeln!(stdin, "y").unwrap();
    let flow = requester.expect("ready")["flow_id"].as_str().unwrap().to_owned();
    requester.cmd("start_sas", &flow);
    let sas = requester.expect("sas");
    let shown = wait_for("Do they match? [y/n]");
    // The person sees the same emoji names and numbers as the other device.
    for e in sas["emoji"].as_array().unwrap() {
        assert!(shown.contains(e["name"].as_str().unwrap()), "{shown}");
    }
    let d = &sas["decimals"];
    assert!(shown.contains(&format!("{}-{}-{}", d[0], d[1], d[2])), "{shown}");
    writeln!(stdin, "y").unwrap();
    requester.cmd("confirm", &flow);
    let out = wait_for("✔ Verified");
    assert!(out.contains(&sam), "{out}");
    assert!(requester.expect("done")["verified_device"].is_string());
    drop(stdin);
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
