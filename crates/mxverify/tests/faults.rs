//! Faults between `mxverify` and Synapse, injected by the proxy of `tests/common/proxy.rs`. The
//! device under test logs in with `--homeserver <proxy>`, so everything it does goes through the
//! proxy; its peers talk to Synapse directly. Each scenario checks that nothing crashed, stalled
//! or was lost, and ends with a verification through the same device that completes:
//!
//! * the homeserver gone for 60 s while `listen` waits;
//! * bursts of 5xx on `/sync`, `/keys/query` and `/sendToDevice` (nothing delivered twice);
//! * 429s asking for several seconds, with each hint (nothing sent early, measured at the proxy);
//! * an invite followed by a ban beside one that works (reported, never retried after a restart);
//! * a room where we may not send (a 403 after `accept` ends that flow alone);
//! * `kill -9` of `listen` after `request`, `ready`, `sas`, its MAC and its `done`, then a restart;
//! * every HTTP request hanging while the protocol's deadlines fall due;
//! * an invalid token, injected and after a real logout (exit 8);
//! * 50 peers requesting at once (memory bounded, still responsive, every request answered);
//! * `/sync` answers with a 1 MB event, non-object content, very deep nesting (also a real event
//!   that Synapse passes on), non-JSON, and no `next_batch`.
//!
//! Run with `cargo test -p mxverify --features test-hooks --test faults` (about two minutes, one
//! of them the outage).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::proxy::{Down, FaultProxy, Logged, RetryHint};
use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// The device under test: logged in through `proxy`, which it then uses for everything.
fn device_via(proxy: &FaultProxy, user: &str, label: &str) -> (PathBuf, String) {
    let dir = state_dir(label);
    let url = proxy.url();
    let (code, lines, err) = run(&dir, &["login", "--homeserver", &url, "--user", user, "--password", PASSWORD]);
    assert_eq!(code, 0, "login through the proxy failed: {err}");
    (dir, lines[0]["device"].as_str().unwrap().to_owned())
}

/// Someone who verifies with the device under test, straight through Synapse.
struct Peer {
    user: String,
    dir: PathBuf,
}

fn peer(label: &str) -> Peer {
    let user = user(label);
    let (dir, _) = device(&user, label, None);
    Peer { user, dir }
}

/// The next `event` line for which `pred` holds (the others are kept in `seen`).
fn expect_where(p: &mut Proc, event: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + timeout;
    loop {
        let v = p.expect_within(event, end.saturating_duration_since(Instant::now()));
        if pred(&v) {
            return v;
        }
    }
}

fn flow_id(v: &Value) -> String {
    v["flow_id"].as_str().unwrap_or_else(|| panic!("no flow_id in {v}")).to_owned()
}

/// `peer` asks the device under test (`user`'s `device`) to verify, to-device.
fn request_from(peer: &Peer, user: &str, device: &str) -> Proc {
    Proc::spawn(&format!("requester {}", peer.user), &peer.dir, &["request", user, "--device", device])
}

/// The listener takes `requester`'s request and both go to `done`; returns the flow ID.
fn finish(listener: &mut Proc, requester: &mut Proc, peer: &Peer) -> String {
    let req = expect_where(listener, "request", MINUTE, |v| v["user"] == peer.user.as_str());
    let flow = flow_id(&req);
    accept_and_compare(requester, listener, &flow);
    let (theirs, ours) = confirm_both(requester, listener, &flow, MINUTE);
    assert_eq!(ours["verified_user"], peer.user.as_str());
    assert!(theirs["verified_device"].is_string());
    assert_eq!(requester.wait(), 0, "the requester ends verified");
    flow
}

/// A whole verification of the device under test by `peer`: the proof that it still works.
fn verify_with(listener: &mut Proc, peer: &Peer, user: &str, device: &str) -> String {
    let mut requester = request_from(peer, user, device);
    finish(listener, &mut requester, peer)
}

/// The to-device messages of `event_type` that the device under test sent through the proxy.
fn sends(proxy: &FaultProxy, event_type: &str) -> Vec<Logged> {
    let needle = format!("/sendToDevice/{event_type}/");
    proxy.log().into_iter().filter(|e| e.method == "PUT" && e.path.contains(&needle)).collect()
}

/// How many `event_type` messages upstream accepted (retries under the same transaction ID
/// included: each one is a delivery attempt that reached the homeserver).
fn delivered(proxy: &FaultProxy, event_type: &str) -> usize {
    sends(proxy, event_type).iter().filter(|e| e.status == Some(200) && !e.injected).count()
}

/// Waits until the device's `/sync` long poll is waiting at the homeserver.
fn wait_for_long_poll(proxy: &FaultProxy) {
    let end = Instant::now() + Duration::from_secs(30);
    while !proxy.log().iter().any(|e| e.path.contains("/sync?") && e.answered.is_none()) {
        assert!(Instant::now() < end, "no /sync in flight: {:#?}", proxy.log());
        sleep_ms(20);
    }
    // Forwarded by now (the proxy passes a request on as soon as it has read it).
    sleep_ms(200);
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        sleep_ms(20);
    }
}

fn seen<'a>(p: &'a Proc, event: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    p.seen.iter().filter(move |v| v["event"] == event)
}

fn no_errors(p: &Proc) {
    let errors: Vec<&Value> = seen(p, "error").collect();
    assert!(errors.is_empty(), "{}: {errors:#?}", p.name);
}

/// A string from the device's key-value store (the access token, for a real logout).
fn kv(dir: &Path, key: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT value FROM kv WHERE key = ?', (sys.argv[2],)).fetchone()[0])",
        ])
        .arg(dir.join("mxverify.sqlite3"))
        .arg(key)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The process ID of the `mxverify … listen` running on `dir`.
fn listener_pid(dir: &Path) -> u32 {
    let needle = dir.to_str().unwrap().as_bytes();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.contains(&needle) && args.contains(&&b"listen"[..]) {
            return pid;
        }
    }
    panic!("no listener on {}", dir.display())
}

/// Peak resident memory (`VmHWM`) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn create_room(token: &str, body: Value) -> String {
    let v = api(Some(token), "POST", "/_matrix/client/v3/createRoom", Some(body));
    v["room_id"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn listen_rides_out_a_60_s_outage() {
    let proxy = FaultProxy::start(&homeserver());
    let me = user("outage");
    let (dir, dev) = device_via(&proxy, &me, "outage");
    let peer = peer("outage_peer");
    let mut listener = Proc::spawn("listener", &dir, &["listen", "--once"]);
    listener.expect("listening");
    wait_for_long_poll(&proxy);

    proxy.set_down(Down::Refuse);
    let down_at = Instant::now();
    let first = listener.expect_within("connection", Duration::from_secs(10));
    assert_eq!(first["state"], "unreachable", "{first}");
    assert!(first["reason"].is_string() && first["retry_at_ms"].is_u64(), "{first}");
    // Halfway through, someone asks; the request waits at the homeserver.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(down_at.elapsed()));
    let mut requester = request_from(&peer, &me, &dev);
    requester.expect("request");
    std::thread::sleep(MINUTE.saturating_sub(down_at.elapsed()));
    proxy.set_up();
    let up_at = Instant::now();

    expect_where(&mut listener, "connection", Duration::from_secs(30), |v| v["state"] == "online");
    // The pauses between attempts are capped: the listener is back within a few seconds.
    assert!(up_at.elapsed() < Duration::from_secs(10), "online only {:?} after the outage", up_at.elapsed());
    let unreachable = seen(&listener, "connection").filter(|v| v["state"] == "unreachable").count();
    assert!((3..=60).contains(&unreachable), "one line per attempt, not a flood: {unreachable}");
    // The request made during the outage was not lost.
    finish(&mut listener, &mut requester, &peer);
    assert_eq!(listener.wait(), 0);
    no_errors(&listener);
}

#[test]
fn bursts_of_5xx_are_retried_and_nothing_is_delivered_twice() {
    let proxy = FaultProxy::start(&homeserver());
    let me = user("fivexx");
    let (dir, dev) = device_via(&proxy, &me, "fivexx");
    let peer = peer("fivexx_peer");
    let mut listener = Proc::spawn("listener", &dir, &["listen", "--once"]);
    listener.expect("listening");
    wait_for_long_poll(&proxy);

    // A burst on /sync: the long poll is cut, and the next three answers are 500, 502, 503.
    for status in [500, 502, 503] {
        proxy.fail_next(1, status, Some("/sync"));
    }
    proxy.cut_connections();
    expect_where(&mut listener, "connection", Duration::from_secs(30), |v| v["state"] == "unreachable");
    expect_where(&mut listener, "connection", MINUTE, |v| v["state"] == "online");

    // Bursts on the keys of the requester and on every message the listener sends.
    proxy.fail_next(2, 500, Some("/keys/query"));
    let mut requester = request_from(&peer, &me, &dev);
    let flow = flow_id(&expect_where(&mut listener, "request", MINUTE, |v| v["user"] == peer.user.as_str()));
    proxy.fail_next(1, 502, Some("/sendToDevice/"));
    proxy.fail_next(1, 503, Some("/sendToDevice/"));
    accept_and_compare(&mut requester, &mut listener, &flow);
    proxy.fail_next(2, 500, Some("/sendToDevice/"));
    confirm_both(&mut requester, &mut listener, &flow, MINUTE);
    assert_eq!(requester.wait(), 0);
    assert_eq!(listener.wait(), 0);

    assert_eq!(proxy.counters().injected, 3 + 2 + 2 + 2, "{:#?}", proxy.log());
    for ty in ["ready", "accept", "key", "mac", "done"] {
        let ty = format!("m.key.verification.{ty}");
        let attempts = sends(&proxy, &ty);
        let txns: BTreeSet<&str> = attempts.iter().map(|e| e.path.rsplit('/').next().unwrap()).collect();
        assert_eq!(txns.len(), 1, "{ty}: one transaction ID across retries: {attempts:#?}");
        assert_eq!(delivered(&proxy, &ty), 1, "{ty}: delivered once: {attempts:#?}");
    }
    assert!(sends(&proxy, "m.key.verification.ready").len() == 3, "the ready was retried twice");
    assert!(sends(&proxy, "m.key.verification.cancel").is_empty());
    no_errors(&listener);
}

#[test]
fn rate_limits_are_honoured_in_full() {
    let proxy = FaultProxy::start(&homeserver());
    let me = user("limited");
    let (dir, dev) = device_via(&proxy, &me, "limited");
    let peer = peer("limited_peer");
    let mut listener = Proc::spawn("listener", &dir, &["listen", "--once"]);
    listener.expect("listening");
    wait_for_long_poll(&proxy);

    // /sync rate limited twice in a row: 3 s in the body, then 2 s in a Retry-After header.
    proxy.rate_limit_next(1, 3000, RetryHint::BodyMs, Some("/sync"));
    proxy.rate_limit_next(1, 2000, RetryHint::Header, Some("/sync"));
    proxy.cut_connections();
    expect_where(&mut listener, "connection", MINUTE, |v| v["state"] == "online");

    // The ready (both hints: 4 s) and the MAC (2.5 s in the body) are held back as asked.
    let mut requester = request_from(&peer, &me, &dev);
    let flow = flow_id(&expect_where(&mut listener, "request", MINUTE, |v| v["user"] == peer.user.as_str()));
    proxy.rate_limit_next(1, 4000, RetryHint::Both, Some("/sendToDevice/"));
    let accepted = Instant::now();
    accept_and_compare(&mut requester, &mut listener, &flow);
    assert!(accepted.elapsed() >= Duration::from_secs(4), "the ready came {:?} after accept", accepted.elapsed());
    proxy.rate_limit_next(1, 2500, RetryHint::BodyMs, Some("/sendToDevice/"));
    confirm_both(&mut requester, &mut listener, &flow, MINUTE);
    assert_eq!(requester.wait(), 0);
    assert_eq!(listener.wait(), 0);

    assert_eq!(proxy.retry_gaps(None).len(), 4, "{:#?}", proxy.log());
    for path in ["/sync", "/sendToDevice/"] {
        let gaps = proxy.retry_gaps(Some(path));
        assert_eq!(gaps.len(), 2, "{path}: {gaps:#?}");
        assert_eq!(proxy.earliest_violation(Some(path)), None, "{path}: {gaps:#?}");
        for g in &gaps {
            let waited = g.waited.expect("the client came back");
            assert!(waited >= g.asked, "{path}: {g:?}");
            // Honoured exactly: not much longer than asked either.
            assert!(waited < g.asked + Duration::from_secs(2), "{path}: {g:?}");
        }
    }
    assert_eq!(delivered(&proxy, "m.key.verification.ready"), 1);
    assert_eq!(delivered(&proxy, "m.key.verification.mac"), 1);
    no_errors(&listener);
}

#[test]
fn an_invite_followed_by_a_ban_is_reported_once_and_the_rest_goes_on() {
    let proxy = FaultProxy::start(&homeserver());
    let me = user("banned");
    let (dir, dev) = device_via(&proxy, &me, "banned");
    let peer = peer("ban_peer");
    let inviter = user("inviter");
    let token = raw_login(&inviter);
    let banned = create_room(&token, json!({"preset": "private_chat", "name": "bans"}));
    let fine = create_room(&token, json!({"preset": "private_chat", "name": "welcomes"}));
    let mut listener = Proc::spawn("listener", &dir, &["listen"]);
    listener.expect("listening");
    wait_for_long_poll(&proxy);

    // Both invites come back in the long poll, which the proxy holds; the ban happens meanwhile,
    // so the listener's join meets it.
    proxy.set_down(Down::Hang);
    for room in [&banned, &fine] {
        api(
            Some(&token),
            "POST",
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(room)),
            Some(json!({"user_id": me})),
        );
    }
    sleep_ms(2000);
    api(
        Some(&token),
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/ban", enc(&banned)),
        Some(json!({"user_id": me, "reason": "fault test"})),
    );
    proxy.set_up();

    let failed = expect_where(&mut listener, "notice", MINUTE, |v| v["kind"] == "join_failed");
    assert_eq!(failed["room"], banned.as_str(), "{failed}");
    assert!(failed["message"].as_str().unwrap().contains("(HTTP 403)"), "{failed}");
    expect_where(&mut listener, "notice", MINUTE, |v| v["kind"] == "joined" && v["room"] == fine.as_str());
    let joins = |proxy: &FaultProxy, room: &str| proxy.count(&format!("/join/{}", enc(room)));
    assert_eq!(joins(&proxy, &banned), 1, "asked once, not retried: {:#?}", proxy.log());

    // After a restart the batch is not handled again: no second try at the banned room.
    listener.kill();
    proxy.clear_log();
    let mut listener = Proc::spawn("listener again", &dir, &["listen", "--once"]);
    listener.expect("listening");
    wait_for_long_poll(&proxy);
    verify_with(&mut listener, &peer, &me, &dev);
    assert_eq!(listener.wait(), 0);
    assert_eq!(joins(&proxy, &banned), 0, "{:#?}", proxy.log());
    assert_eq!(proxy.count("/join/"), 0);
}

#[test]
fn a_room_that_refuses_our_messages_ends_that_flow_alone() {
    let proxy = FaultProxy::start(&homeserver());
    let me = user("muted");
    let (dir, dev) = device_via(&proxy, &me, "muted");
    let owner = peer("room_owner");
    let token = raw_login(&owner.user);
    // Anyone invited may join; only the owner (its creator) may speak.
    let room = create_room(
        &token,
        json!({"preset": "private_chat", "invite": [me], "power_level_content_override": {"events_default": 50}}),
    );
    let mut listener = Proc::spawn("listener", &dir, &["listen", "--once"]);
    listener.expect("listening");
    expect_where(&mut listener, "notice", MINUTE, |v| v["kind"] == "joined" && v["room"] == room.as_str());

    let mut requester = Proc::spawn("owner requests", &owner.dir, &["request", &me, "--room", &room]);
    let req = expect_where(&mut listener, "request", MINUTE, |v| v["transport"] == "room");
    let flow = flow_id(&req);
    listener.cmd("accept", &flow);
    let refused = expect_where(&mut listener, "error", MINUTE, |v| v["flow_id"] == flow.as_str());
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("m.key.verification.ready") && message.contains("M_FORBIDDEN"), "{refused}");
    assert!(!message.to_lowercase().contains("password"), "{refused}");
    assert!(refused["code"].is_null(), "the listener does not stop: {refused}");
    let ended = expect_where(&mut listener, "cancelled", MINUTE, |v| v["flow_id"] == flow.as_str());
    assert_eq!(ended["code"], "m.user", "{ended}");
    requester.kill();

    // The listener goes on: a to-device verification completes and `--once` ends with 0, not 5.
    let other = peer("after_mute");
    verify_with(&mut listener, &other, &me, &dev);
    assert_eq!(listener.wait(), 0);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Right after `listen` printed the request.
    Request,
    /// Right after its `ready` reached the requester.
    Ready,
    /// With the SAS on screen.
    Sas,
    /// After it confirmed and its MAC went out (the requester has not confirmed).
    Mac,
    /// After its MAC and `done` went out, before the requester's `done` came in.
    Done,
}

const FLOW_MESSAGES: [&str; 6] = ["ready", "start", "accept", "key", "mac", "done"];

#[test]
fn kill_9_of_listen_at_each_stage_then_restart() {
    let proxy = FaultProxy::start(&homeserver());
    let me = user("killed");
    let (dir, dev) = device_via(&proxy, &me, "killed");
    let peer = peer("kill_peer");
    for stage in [Stage::Request, Stage::Ready, Stage::Sas, Stage::Mac, Stage::Done] {
        let mut listener = Proc::spawn(&format!("listener ({stage:?})"), &dir, &["listen", "--once"]);
        listener.expect("listening");
        let mut requester = request_from(&peer, &me, &dev);
        let flow = flow_id(&expect_where(&mut listener, "request", MINUTE, |v| v["user"] == peer.user.as_str()));
        match stage {
            Stage::Request => {}
            Stage::Ready => {
                listener.cmd("accept", &flow);
                requester.expect("ready");
            }
            Stage::Sas => {
                accept_and_compare(&mut requester, &mut listener, &flow);
            }
            Stage::Mac => {
                accept_and_compare(&mut requester, &mut listener, &flow);
                listener.cmd("confirm", &flow);
                wait_until("the MAC", MINUTE, || delivered(&proxy, "m.key.verification.mac") == 1);
            }
            Stage::Done => {
                accept_and_compare(&mut requester, &mut listener, &flow);
                requester.cmd("confirm", &flow);
                // The listener receives the requester's MAC, then nothing more from /sync.
                sleep_ms(1500);
                proxy.respond("/sync", Some("GET"), 503, json!({"errcode": "M_UNKNOWN", "error": "held"}));
                proxy.cut_connections();
                listener.cmd("confirm", &flow);
                wait_until("the done", MINUTE, || delivered(&proxy, "m.key.verification.done") == 1);
                assert_eq!(requester.expect("done")["flow_id"], flow.as_str());
                assert_eq!(requester.wait(), 0);
            }
        }
        listener.kill();
        proxy.clear();
        proxy.clear_log();

        let mut again = Proc::spawn(&format!("listener restarted ({stage:?})"), &dir, &["listen", "--once"]);
        again.expect("listening");
        match stage {
            Stage::Request => {
                // The request comes back once, and is answered once.
                let back = again.expect("request");
                assert_eq!(back["flow_id"], flow.as_str());
                accept_and_compare(&mut requester, &mut again, &flow);
                confirm_both(&mut requester, &mut again, &flow, MINUTE);
                assert_eq!(requester.wait(), 0);
                assert_eq!(again.wait(), 0);
                assert_eq!(seen(&again, "request").count(), 1, "{:#?}", again.seen);
                assert_eq!(delivered(&proxy, "m.key.verification.ready"), 1);
            }
            Stage::Done => {
                // A flow whose `done` we sent is never cancelled: the other side saw it verified.
                wait_for_long_poll(&proxy);
                sleep_ms(1000);
                assert!(seen(&again, "cancelled").all(|c| c["flow_id"] != flow.as_str()), "{:#?}", again.seen);
                // What reached the requester's device after its `done`.
                let inbox = api(Some(&kv(&peer.dir, "access_token")), "GET", "/_matrix/client/v3/sync?timeout=0", None);
                let cancels: Vec<&Value> = inbox["to_device"]["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|e| {
                        e["type"] == "m.key.verification.cancel" && e["content"]["transaction_id"] == flow.as_str()
                    })
                    .collect();
                assert!(cancels.is_empty(), "{cancels:#?}");
                // And what we verified was recorded before our `done` left: the trust record is
                // there although the other side's `done` never reached us.
                let trusted = sql(&dir, &format!("SELECT COUNT(*) FROM trust WHERE flow_id = '{flow}'"));
                assert!(trusted >= 1, "no trust record for the flow whose done we sent");
                verify_with(&mut again, &peer, &me, &dev);
                assert_eq!(again.wait(), 0);
            }
            Stage::Ready | Stage::Sas | Stage::Mac => {
                // The lost flow is ended at once, with a clear m.user on both sides.
                let ours = again.expect("cancelled");
                assert_eq!(ours["flow_id"], flow.as_str());
                assert_eq!((ours["code"].as_str(), ours["by"].as_str()), (Some("m.user"), Some("us")), "{ours}");
                assert_eq!(ours["sent"], true);
                assert!(ours["cause"].as_str().unwrap().contains("restarted"), "{ours}");
                let theirs = requester.expect_within("cancelled", Duration::from_secs(20));
                assert_eq!((theirs["code"].as_str(), theirs["by"].as_str()), (Some("m.user"), Some("them")));
                assert_eq!(requester.wait(), 3);
                // Nothing but that cancel went out: the request was not answered again.
                for ty in FLOW_MESSAGES {
                    assert!(sends(&proxy, &format!("m.key.verification.{ty}")).is_empty(), "{stage:?}: {ty}");
                }
                assert_eq!(delivered(&proxy, "m.key.verification.cancel"), 1, "{:#?}", proxy.log());
                verify_with(&mut again, &peer, &me, &dev);
                assert_eq!(again.wait(), 0);
            }
        }
        no_errors(&again);
    }
}

#[test]
fn deadlines_fire_on_time_while_every_request_hangs() {
    const PROMPT_MS: u64 = 5000;
    const FLOW_MS: u64 = 12_000;
    let proxy = FaultProxy::start(&homeserver());
    let me = user("hung");
    let (dir, dev) = device_via(&proxy, &me, "hung");
    let peer = peer("hung_peer");
    let env = [("MXVERIFY_PROMPT_TIMEOUT_MS", "5000"), ("MXVERIFY_FLOW_TIMEOUT_MS", "12000")];
    let mut listener = Proc::spawn_env("listener", &dir, &["listen"], &env);
    listener.expect("listening");
    let on_time = |what: &str, deadline: u64, at: u64| {
        assert!(at + 50 >= deadline, "{what} {} ms early", deadline - at);
        assert!(at <= deadline + 1000, "{what} {} ms late", at - deadline);
    };

    // An unanswered prompt closes at its deadline, silently, while the proxy answers nothing.
    let mut first = request_from(&peer, &me, &dev);
    let req = expect_where(&mut listener, "request", MINUTE, |v| v["user"] == peer.user.as_str());
    let prompt_deadline = req["deadline_ms"].as_u64().unwrap();
    proxy.set_down(Down::Hang);
    let closed = expect_where(&mut listener, "cancelled", MINUTE, |v| v["flow_id"] == req["flow_id"]);
    on_time("the prompt's end", prompt_deadline, now_ms());
    assert_eq!((closed["code"].as_str(), closed["sent"].as_bool()), (Some("m.timeout"), Some(false)), "{closed}");
    proxy.set_up();
    first.kill();

    // A flow showing its SAS times out with m.timeout at its deadline; its cancel leaves once the
    // homeserver answers again.
    let mut second = request_from(&peer, &me, &dev);
    let req = expect_where(&mut listener, "request", MINUTE, |v| v["user"] == peer.user.as_str());
    let flow = flow_id(&req);
    let flow_deadline = req["deadline_ms"].as_u64().unwrap() - PROMPT_MS + FLOW_MS;
    accept_and_compare(&mut second, &mut listener, &flow);
    proxy.set_down(Down::Hang);
    let hung_at = Instant::now();
    let timed_out = expect_where(&mut listener, "cancelled", MINUTE, |v| v["flow_id"] == flow.as_str());
    on_time("the flow's end", flow_deadline, now_ms());
    assert_eq!((timed_out["code"].as_str(), timed_out["by"].as_str()), (Some("m.timeout"), Some("us")));
    wait_until("the cancel to reach the proxy", Duration::from_secs(5), || {
        !sends(&proxy, "m.key.verification.cancel").is_empty()
    });
    let held = sends(&proxy, "m.key.verification.cancel");
    assert!(held.iter().all(|e| e.answered.is_none()), "still hanging: {held:#?}");
    assert!(hung_at.elapsed() >= Duration::from_secs(2), "the deadline fell while HTTP hung");
    proxy.set_up();
    let theirs = second.expect_within("cancelled", MINUTE);
    assert_eq!((theirs["code"].as_str(), theirs["by"].as_str()), (Some("m.timeout"), Some("them")));
    assert_eq!(second.wait(), 4);

    verify_with(&mut listener, &peer, &me, &dev);
    no_errors(&listener);
}

#[test]
fn an_invalid_token_stops_listen_with_exit_8() {
    let proxy = FaultProxy::start(&homeserver());
    let me = user("token");
    let (dir, dev) = device_via(&proxy, &me, "token");
    let peer = peer("token_peer");

    // The homeserver says the token is unknown (injected at the proxy): exit 8 at once, no retry.
    let mut listener = Proc::spawn("listener", &dir, &["listen"]);
    listener.expect("listening");
    wait_for_long_poll(&proxy);
    let unknown = json!({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed.", "soft_logout": false});
    proxy.respond("/sync", Some("GET"), 401, unknown);
    proxy.cut_connections();
    let stop = listener.expect_within("error", Duration::from_secs(30));
    assert_eq!(stop["code"], 8, "{stop}");
    assert!(stop["message"].as_str().unwrap().contains("log in again"), "{stop}");
    assert_eq!(listener.wait(), 8);
    assert_eq!(proxy.log().iter().filter(|e| e.status == Some(401)).count(), 1, "{:#?}", proxy.log());
    proxy.clear();
    // The same device, once the server accepts its token again, verifies.
    let mut listener = Proc::spawn("listener again", &dir, &["listen", "--once"]);
    listener.expect("listening");
    verify_with(&mut listener, &peer, &me, &dev);
    assert_eq!(listener.wait(), 0);

    // A real logout of this device (its own token, from its store).
    let token = kv(&dir, "access_token");
    let mut listener = Proc::spawn("listener logged out", &dir, &["listen"]);
    listener.expect("listening");
    wait_for_long_poll(&proxy);
    api(Some(&token), "POST", "/_matrix/client/v3/logout", Some(json!({})));
    proxy.cut_connections();
    let stop = listener.expect_within("error", Duration::from_secs(30));
    assert_eq!(stop["code"], 8, "{stop}");
    assert!(stop["message"].as_str().unwrap().contains("log in again"), "{stop}");
    assert_eq!(listener.wait(), 8);
    // Logging in again, as the same device, makes it work again.
    let url = proxy.url();
    let (code, lines, err) =
        run(&dir, &["login", "--homeserver", &url, "--user", &me, "--password", PASSWORD, "--device-id", &dev]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines[0]["device"], dev.as_str());
    let mut listener = Proc::spawn("listener logged in again", &dir, &["listen", "--once"]);
    listener.expect("listening");
    verify_with(&mut listener, &peer, &me, &dev);
    assert_eq!(listener.wait(), 0);
}

#[test]
fn fifty_peers_requesting_at_once() {
    const N: usize = 50;
    let proxy = FaultProxy::start(&homeserver());
    let me = user("popular");
    let (dir, dev) = device_via(&proxy, &me, "popular");
    let real = peer("popular_real");
    // Lightweight peers: a user and a device (a plain login) each, no mxverify process.
    let crowd: Vec<(String, String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5)
            .map(|t| {
                s.spawn(move || {
                    (0..N / 5)
                        .map(|i| {
                            let u = user(&format!("crowd{}", t * (N / 5) + i));
                            let login = api(
                                None,
                                "POST",
                                "/_matrix/client/v3/login",
                                Some(json!({"type": "m.login.password", "password": PASSWORD,
                                            "identifier": {"type": "m.id.user", "user": u}})),
                            );
                            let token = login["access_token"].as_str().unwrap().to_owned();
                            let device = login["device_id"].as_str().unwrap().to_owned();
                            (u, token, device)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut listener = Proc::spawn("listener", &dir, &["listen"]);
    listener.expect("listening");
    wait_for_long_poll(&proxy);
    let pid = listener_pid(&dir);
    let idle_kib = peak_rss_kib(pid);

    // All fifty ask at the same moment.
    let barrier = Arc::new(Barrier::new(N));
    let run_id = now_ms();
    let senders: Vec<_> = crowd
        .iter()
        .enumerate()
        .map(|(i, (_, token, device))| {
            let (barrier, token, device, me, dev) =
                (barrier.clone(), token.clone(), device.clone(), me.clone(), dev.clone());
            std::thread::spawn(move || {
                let content = json!({"from_device": device, "methods": ["m.sas.v1"], "timestamp": now_ms(),
                                     "transaction_id": format!("crowd-{run_id}-{i}")});
                barrier.wait();
                api(
                    Some(&token),
                    "PUT",
                    &format!("/_matrix/client/v3/sendToDevice/m.key.verification.request/crowd{run_id}-{i}"),
                    Some(json!({"messages": {me: {dev: content}}})),
                );
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let mut flows: BTreeMap<String, String> = BTreeMap::new();
    while flows.len() < N {
        let req = listener.expect_within("request", MINUTE);
        let user = req["user"].as_str().unwrap().to_owned();
        assert!(crowd.iter().any(|(u, _, _)| *u == user), "{req}");
        assert!(flows.insert(user, flow_id(&req)).is_none(), "one request line per request: {req}");
    }
    let pending_kib = peak_rss_kib(pid);

    // Still responsive: a real verification with one more peer completes meanwhile.
    let started = Instant::now();
    verify_with(&mut listener, &real, &me, &dev);
    let one = started.elapsed();

    // Nothing lost: each of the fifty is answered with `ready`, which reaches its device.
    for flow in flows.values() {
        listener.cmd("accept", flow);
    }
    wait_until("fifty readys", MINUTE, || delivered(&proxy, "m.key.verification.ready") == N + 1);
    for (i, (user, token, _)) in crowd.iter().enumerate() {
        let sync = api(Some(token), "GET", "/_matrix/client/v3/sync?timeout=0", None);
        let got = sync["to_device"]["events"].as_array().into_iter().flatten().any(|e| {
            e["type"] == "m.key.verification.ready" && e["content"]["transaction_id"] == format!("crowd-{run_id}-{i}")
        });
        assert!(got, "{user} got its ready: {sync:#}");
    }
    let peak_kib = peak_rss_kib(pid);
    eprintln!(
        "fifty_peers: peak RSS {idle_kib} KiB idle, {pending_kib} KiB with {N} requests pending, {peak_kib} KiB after \
         answering them; one verification meanwhile took {one:?}"
    );
    assert!(pending_kib < 64 * 1024, "{pending_kib} KiB with {N} pending requests");
    assert!(peak_kib < 64 * 1024, "{peak_kib} KiB");
    assert_eq!(seen(&listener, "request").count(), N + 1);
    no_errors(&listener);
}

/// Adds `events` to the to-device events of a `/sync` answer.
fn add_to_device(sync: &mut Value, events: Vec<Value>) {
    let list = &mut sync["to_device"]["events"];
    if !list.is_array() {
        *list = json!([]);
    }
    list.as_array_mut().unwrap().extend(events);
}

#[test]
fn sync_answers_with_a_1_mb_event_and_content_that_is_no_object() {
    let proxy = FaultProxy::start(&homeserver());
    let me = user("bigsync");
    let (dir, dev) = device_via(&proxy, &me, "bigsync");
    let peer = peer("bigsync_peer");
    let mut listener = Proc::spawn("listener", &dir, &["listen"]);
    listener.expect("listening");
    wait_for_long_poll(&proxy);

    // The answer that brings the peer's request also brings a 1 MB to-device event, a 1 MB room
    // event, and items that are not what the spec says.
    let sender = peer.user.clone();
    proxy.rewrite_next_response(
        "/sync",
        Box::new(move |v| {
            let mega = "x".repeat(1 << 20);
            add_to_device(
                v,
                vec![
                    json!({"sender": sender, "type": "org.example.big", "content": {"pad": mega}}),
                    json!({"sender": sender, "type": "m.key.verification.request", "content": "not an object"}),
                    json!({"sender": sender, "type": "m.key.verification.start", "content": [1, 2, 3]}),
                    json!({"sender": sender, "type": "m.key.verification.cancel", "content": null}),
                    json!({"sender": 42, "type": "m.key.verification.ready", "content": {}}),
                    json!("not an event"),
                ],
            );
            v["rooms"]["join"]["!junk:localhost"] = json!({"timeline": {"events": [
                {"sender": sender, "type": "m.room.message", "event_id": "$mega", "origin_server_ts": 1,
                 "content": {"msgtype": "m.text", "body": mega}},
                {"sender": sender, "type": "m.room.message", "event_id": "$five", "content": 5},
            ]}});
        }),
    );
    let mut requester = request_from(&peer, &me, &dev);
    finish(&mut listener, &mut requester, &peer);
    assert_eq!(proxy.counters().rewritten, 1, "the junk went through");
    let dropped: Vec<&str> =
        seen(&listener, "notice").filter(|n| n["kind"] == "dropped").map(|n| n["message"].as_str().unwrap()).collect();
    assert_eq!(dropped.iter().filter(|m| m.contains("to-device event")).count(), 5, "{dropped:#?}");
    assert_eq!(dropped.iter().filter(|m| m.contains("!junk:localhost")).count(), 1, "{dropped:#?}");
    assert_eq!(seen(&listener, "connection").count(), 0, "nothing was refused as a whole");

    // And it goes on.
    verify_with(&mut listener, &peer, &me, &dev);
    no_errors(&listener);
}

#[test]
fn sync_answers_nested_very_deep_or_not_json() {
    let proxy = FaultProxy::start(&homeserver());
    let me = user("deepsync");
    let (dir, dev) = device_via(&proxy, &me, "deepsync");
    let peer = peer("deepsync_peer");
    let mut listener = Proc::spawn("listener", &dir, &["listen"]);
    listener.expect("listening");
    wait_for_long_poll(&proxy);

    // Anyone can send a to-device event nested 600 deep, and Synapse passes it on: it must not
    // keep the listener from every later event.
    let token = raw_login(&peer.user);
    let mut deep = json!("bottom");
    for _ in 0..600 {
        deep = json!([deep]);
    }
    api(
        Some(&token),
        "PUT",
        &format!("/_matrix/client/v3/sendToDevice/m.key.verification.request/deep{}", now_ms()),
        Some(json!({"messages": {me.clone(): {dev.clone(): {"transaction_id": "deep", "deep": deep}}}})),
    );
    verify_with(&mut listener, &peer, &me, &dev);
    let too_deep = |p: &Proc| {
        seen(p, "notice").filter(|n| n["kind"] == "dropped" && n["message"].as_str().unwrap().contains("deep")).count()
    };
    assert_eq!(too_deep(&listener), 1, "reported: {:#?}", listener.seen);

    // Deeper than any parser would build (100 000 levels), spliced into the answer by the proxy.
    proxy.rewrite_next_response_raw(
        "/sync",
        Box::new(|body| {
            let mut v: Value = serde_json::from_slice(&body).unwrap();
            let event = json!({"sender": "@deep:localhost", "type": "m.key.verification.request",
                               "content": {"transaction_id": "deeper", "deep": "DEEP-HERE"}});
            add_to_device(&mut v, vec![event]);
            let levels = 100_000;
            let nested = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
            serde_json::to_string(&v).unwrap().replace("\"DEEP-HERE\"", &nested).into_bytes()
        }),
    );
    verify_with(&mut listener, &peer, &me, &dev);
    assert_eq!(proxy.counters().rewritten, 1);
    assert_eq!(too_deep(&listener), 2, "reported: {:#?}", listener.seen);

    // Answers that are not JSON, JSON that is not an object, and JSON cut short: each is refused
    // as a whole and asked again; the request they hid is not lost.
    let broken = ["<html><body>502 Bad Gateway</body></html>", "[1, 2]", "{\"next_batch\": \"s9\", \"to_dev"];
    for body in broken {
        proxy.replace_next_response_body("/sync", body);
    }
    verify_with(&mut listener, &peer, &me, &dev);
    assert_eq!(proxy.counters().rewritten, 1 + broken.len());

    // Answers without a next_batch token, for four seconds: asked again after growing pauses,
    // not at once (which would be asking for ever, as fast as the homeserver answers).
    proxy.clear_log();
    proxy.respond("/sync", Some("GET"), 200, json!({}));
    proxy.cut_connections();
    sleep_ms(4000);
    proxy.clear();
    let tokenless = proxy.count("/sync");
    assert!((2..=6).contains(&tokenless), "{tokenless} answers without a token in 4 s");
    verify_with(&mut listener, &peer, &me, &dev);
    let refused = seen(&listener, "connection").filter(|c| c["state"] == "unreachable").count();
    // (One more when the cut long poll is retried.)
    let expected = broken.len() + tokenless;
    assert!(refused == expected || refused == expected + 1, "{refused} ≠ {expected}: {:#?}", listener.seen);
    no_errors(&listener);
}
