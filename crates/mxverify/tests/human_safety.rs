//! Human mode cannot be tricked by another peer: a second request waits its turn instead of taking
//! the answer meant for the first, every question names its flow, and text from the network is
//! shown without control characters (no escape sequence reaches the terminal).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::*;
use serde_json::json;

struct Human {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Human {
    fn listen(dir: &std::path::Path) -> Human {
        let mut child = Command::new(exe())
            .arg("--state-dir")
            .arg(dir)
            .args(["listen"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let mut l = Vec::new();
                match r.read_until(b'\n', &mut l) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if tx.send(l).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Human { child, stdin, lines, seen: Vec::new() }
    }

    fn wait_for(&mut self, what: &str) -> String {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no {what:?} in:\n{}", String::from_utf8_lossy(&self.seen)));
            self.seen.extend_from_slice(&l);
            if String::from_utf8_lossy(&l).contains(what) {
                return String::from_utf8_lossy(&l).into_owned();
            }
        }
    }

    fn say(&mut self, text: &str) {
        writeln!(self.stdin, "{text}").unwrap();
    }
}

impl Drop for Human {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_second_request_waits_its_turn_and_hostile_text_is_defused() {
    let (sam, tia, eve) = (user("hsam"), user("htia"), user("heve"));
    let (ds, _) = device(&sam, "hsam", None);
    let (dt, tia_dev) = device(&tia, "htia", None);
    let mut tia_h = Human::listen(&dt);
    tia_h.wait_for("Listening for verification requests");

    // Sam asks first: the question names Sam's flow.
    let mut requester = Proc::spawn("sam", &ds, &["request", &tia, "--device", &tia_dev]);
    let first = tia_h.wait_for("wants to verify");
    assert!(first.starts_with("[1]") && first.contains(&sam), "{first}");
    tia_h.wait_for("[1] Accept? [y/n]");

    // Eve's request arrives before Tia answers, with an escape sequence in its device ID.
    let eve_token = raw_login(&eve);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let content = json!({"from_device": "EVIL\u{1b}[2J\u{1b}]0;pwned\u{7}", "methods": ["m.sas.v1"],
                         "timestamp": now, "transaction_id": "eve-txn"});
    api(
        Some(&eve_token),
        "PUT",
        "/_matrix/client/v3/sendToDevice/m.key.verification.request/eve1",
        Some(json!({"messages": {tia.clone(): {tia_dev.clone(): content}}})),
    );
    let second = tia_h.wait_for("wants to verify");
    assert!(second.starts_with("[2]") && second.contains(&eve), "{second}");
    assert!(second.contains("EVIL\\u{1b}[2J"), "the escape is shown, not obeyed: {second:?}");
    tia_h.wait_for("it comes next");

    // Tia's "y" answers the question she saw: Sam's request.
    tia_h.say("y");
    let flow = requester.expect("ready")["flow_id"].as_str().unwrap().to_owned();
    tia_h.wait_for("[2] Accept? [y/n]");
    tia_h.say("n");
    // Sam's flow goes on to the end, untouched.
    requester.cmd("start_sas", &flow);
    requester.expect("sas");
    tia_h.wait_for("[1] Do they match? [y/n]");
    tia_h.say("y");
    requester.cmd("confirm", &flow);
    tia_h.wait_for("[1] ✔ Verified");
    assert!(requester.expect("done")["verified_device"].is_string());
    assert!(!tia_h.seen.contains(&0x1b), "no raw escape byte reached the terminal");
    assert!(!tia_h.seen.contains(&0x07), "no raw bell either");
}
