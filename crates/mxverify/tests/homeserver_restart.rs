//! Restarts: the homeserver in the middle of a verification, and `mxverify listen` while a request
//! waits for an answer. Kept apart from the other homeserver tests (a restart would disturb them)
//! and run one at a time.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn verification_survives_a_homeserver_restart() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (ivan, judy) = (user("ivan"), user("judy"));
    let (di, _) = device(&ivan, "ivan", None);
    let (dj, _) = device(&judy, "judy", None);
    let mut listener = Proc::spawn("judy", &dj, &["listen", "--once"]);
    listener.expect("listening");
    let mut requester = Proc::spawn("ivan", &di, &["request", &judy, "--dm"]);
    let flow = listener.expect("request")["flow_id"].as_str().unwrap().to_owned();
    accept_and_compare(&mut requester, &mut listener, &flow);
    // The homeserver goes away and comes back while both people compare.
    restart_homeserver();
    confirm_both(&mut requester, &mut listener, &flow, Duration::from_secs(90));
    assert_eq!(requester.wait(), 0);
    assert_eq!(listener.wait(), 0);
}

#[test]
fn a_waiting_request_survives_a_listener_restart() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (kim, leo) = (user("kim"), user("leo"));
    let (dk, _) = device(&kim, "kim", None);
    let (dl, leo_dev) = device(&leo, "leo", None);
    let mut listener = Proc::spawn("leo", &dl, &["listen", "--once"]);
    listener.expect("listening");
    let mut requester = Proc::spawn("kim", &dk, &["request", &leo, "--device", &leo_dev]);
    let flow = listener.expect("request")["flow_id"].as_str().unwrap().to_owned();
    // Killed before anyone answered.
    listener.kill();
    let mut listener = Proc::spawn("leo again", &dl, &["listen", "--once"]);
    let again = listener.expect("request");
    assert_eq!(again["flow_id"], flow.as_str(), "the request is still there after the restart");
    accept_and_compare(&mut requester, &mut listener, &flow);
    confirm_both(&mut requester, &mut listener, &flow, Duration::from_secs(60));
    assert_eq!(listener.wait(), 0);
    assert_eq!(requester.wait(), 0);
}

#[test]
fn a_request_that_expired_while_the_listener_was_down_is_reported() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (max, nia) = (user("max"), user("nia"));
    let (dm, _) = device(&max, "max", None);
    let (dn, nia_dev) = device(&nia, "nia", None);
    let short = [("MXVERIFY_PROMPT_TIMEOUT_MS", "1500")];
    let mut listener = Proc::spawn_env("nia", &dn, &["listen", "--once"], &short);
    listener.expect("listening");
    let _requester = Proc::spawn("max", &dm, &["request", &nia, "--device", &nia_dev]);
    let flow = listener.expect("request")["flow_id"].as_str().unwrap().to_owned();
    listener.kill();
    std::thread::sleep(Duration::from_millis(2500));
    let mut listener = Proc::spawn_env("nia again", &dn, &["listen", "--once"], &short);
    let again = listener.expect("request");
    assert_eq!(again["flow_id"], flow.as_str());
    let expired = listener.expect("cancelled");
    assert_eq!(expired["code"], "m.timeout");
    assert_eq!(expired["sent"], false, "an expired prompt closes silently");
    assert_eq!(listener.wait(), 4);
}

#[test]
fn a_flow_lost_by_a_restart_is_cancelled_not_left_to_time_out() {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (olive, paul) = (user("olive"), user("paul"));
    let (dol, _) = device(&olive, "olive", None);
    let (dp, paul_dev) = device(&paul, "paul", None);
    let mut listener = Proc::spawn("paul", &dp, &["listen", "--once"]);
    listener.expect("listening");
    let mut requester = Proc::spawn("olive", &dol, &["request", &paul, "--device", &paul_dev]);
    let flow = listener.expect("request")["flow_id"].as_str().unwrap().to_owned();
    accept_and_compare(&mut requester, &mut listener, &flow);
    // The listener dies with the SAS on screen; its ephemeral key is gone with it.
    listener.kill();
    // A second process on the same state directory is refused while one runs (it holds the lock
    // once it says it is listening).
    let mut listener = Proc::spawn("paul again", &dp, &["listen", "--once"]);
    listener.expect("listening");
    let (code, _, err) = run(&dp, &["listen", "--once"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("another mxverify process"), "{err}");
    // The restarted listener tells the other side at once.
    let ours = listener.expect("cancelled");
    assert_eq!(
        (ours["code"].as_str(), ours["by"].as_str(), ours["sent"].as_bool()),
        (Some("m.user"), Some("us"), Some(true))
    );
    assert!(ours["cause"].as_str().unwrap().contains("restarted"), "{ours}");
    let theirs = requester.expect_within("cancelled", Duration::from_secs(20));
    assert_eq!((theirs["code"].as_str(), theirs["by"].as_str()), (Some("m.user"), Some("them")));
    assert_eq!(requester.wait(), 3);
    listener.kill();
}
