//! The library's bot example (`crates/mxverify-client/examples/bot.rs`) against the local Synapse:
//! it answers a request, shows the emoji to its operator, and confirms on their word.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The example's binary, built next to this test's `mxverify` (by `cargo test --all-targets`,
/// or here if it is missing).
fn bot_binary() -> PathBuf {
    let bin = PathBuf::from(exe()).parent().unwrap().join("examples/bot");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "mxverify-client", "--example", "bot"])
            .current_dir(repo())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "the bot example builds");
    }
    bin
}

#[test]
fn the_bot_example_verifies_on_its_operators_word() {
    let (bot_user, human) = (user("bot"), user("human"));
    let (bot_dir, bot_device) = device(&bot_user, "bot", None);
    let (human_dir, _) = device(&human, "human", None);
    let mut bot = Command::new(bot_binary())
        .arg(&bot_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = bot.stdin.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = bot.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let wait_for = |what: &str| loop {
        let l = lines.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("the bot never said {what:?}"));
        if l.contains(what) {
            return l;
        }
    };
    wait_for("is listening");
    let mut requester = Proc::spawn("human", &human_dir, &["request", &bot_user, "--device", &bot_device]);
    let flow = requester.expect("ready")["flow_id"].as_str().unwrap().to_owned();
    requester.cmd("start_sas", &flow);
    let sas = requester.expect("sas");
    let question = wait_for("Does the other device show");
    for e in sas["emoji"].as_array().unwrap() {
        assert!(question.contains(e["name"].as_str().unwrap()), "the bot shows the same emoji: {question}");
    }
    writeln!(stdin, "y").unwrap();
    requester.cmd("confirm", &flow);
    assert_eq!(requester.expect("done")["verified_device"], bot_device.as_str());
    assert!(wait_for("Verified").contains(&human));
    let _ = bot.kill();
    let _ = bot.wait();
}
