//! Helpers for tests against the local Synapse (`scripts/synapse`): users, `mxverify` processes
//! driven through `--json`, and raw Client-Server API calls.
#![allow(dead_code)]
pub mod proxy;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const PASSWORD: &str = "correct horse battery staple";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn script(args: &[&str]) -> String {
    let out = Command::new(repo().join("scripts/synapse")).args(args).output().expect("scripts/synapse runs");
    assert!(out.status.success(), "scripts/synapse {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Starts Synapse once per test process (idempotent and quick when it already runs).
pub fn homeserver() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        script(&["start"]);
        script(&["url"])
    })
    .clone()
}

pub fn restart_homeserver() {
    script(&["restart"]);
}

/// A fresh user (unique per run), registered; returns its full user ID.
pub fn user(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    homeserver();
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let local = format!("{name}_{}_{}_{}", std::process::id(), t % 1_000_000_000, N.fetch_add(1, Ordering::Relaxed));
    script(&["register", &local, PASSWORD])
}

/// A fresh state directory.
pub fn state_dir(label: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "mxverify-it-{}-{label}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_mxverify")
}

/// Runs mxverify to completion (at most 90 s: a hung command fails the test instead of the
/// whole run); returns (exit code, stdout JSON lines, stderr).
pub fn run(state: &PathBuf, args: &[&str]) -> (i32, Vec<Value>, String) {
    let mut child = Command::new(exe())
        .arg("--json")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let end = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mxverify {args:?} did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let lines =
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    (status.code().unwrap_or(-1), lines, err)
}

/// Logs a device in (and sets up cross-signing); returns its state directory and device ID.
pub fn device(user: &str, label: &str, device_id: Option<&str>) -> (PathBuf, String) {
    let dir = state_dir(label);
    let mut args =
        vec!["login", "--homeserver", &HS.get_or_init(homeserver)[..], "--user", user, "--password", PASSWORD];
    if let Some(d) = device_id {
        args.extend(["--device-id", d]);
    }
    let (code, lines, err) = run(&dir, &args);
    assert_eq!(code, 0, "login failed: {err}");
    let device = lines[0]["device"].as_str().unwrap().to_owned();
    (dir, device)
}

static HS: OnceLock<String> = OnceLock::new();

pub fn bootstrap(dir: &PathBuf) {
    let (code, _, err) = run(dir, &["cross-signing", "bootstrap", "--password", PASSWORD]);
    assert_eq!(code, 0, "bootstrap failed: {err}");
}

/// A running `mxverify --json …` with its output as JSON lines.
pub struct Proc {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    pub seen: Vec<Value>,
}

impl Proc {
    pub fn spawn(name: &str, state: &PathBuf, args: &[&str]) -> Proc {
        Self::spawn_env(name, state, args, &[])
    }

    pub fn spawn_env(name: &str, state: &PathBuf, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(exe());
        cmd.envs(env.iter().copied()).arg("--json").arg("--state-dir").arg(state).args(args);
        Self::spawn_command(name, cmd)
    }

    /// Any program that speaks JSON lines on stdout and reads commands on stdin.
    pub fn spawn_command(name: &str, mut cmd: Command) -> Proc {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        let label = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{label}: not JSON ({e}): {line}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Proc { name: name.into(), stdin: child.stdin.take(), child, lines: rx, seen: vec![] }
    }

    /// The next event named `event` (others are kept in `seen`).
    pub fn expect(&mut self, event: &str) -> Value {
        self.expect_within(event, Duration::from_secs(60))
    }

    pub fn expect_within(&mut self, event: &str, timeout: Duration) -> Value {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if v["event"] == event {
                        return v;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{}: no {event:?} within {timeout:?}; saw {:#?}", self.name, self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{}: exited before {event:?}; saw {:#?}", self.name, self.seen)
                }
            }
        }
    }

    pub fn send(&mut self, command: Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn cmd(&mut self, command: &str, flow_id: &str) {
        self.send(json!({"command": command, "flow_id": flow_id}));
    }

    /// Waits for the exit code.
    pub fn wait(&mut self) -> i32 {
        self.stdin.take();
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < end, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The listener accepts, the requester starts SAS; both must show the same SAS (returned).
pub fn accept_and_compare(requester: &mut Proc, listener: &mut Proc, flow: &str) -> (Value, Value) {
    listener.cmd("accept", flow);
    requester.expect("ready");
    requester.cmd("start_sas", flow);
    let (sa, sb) = (requester.expect("sas"), listener.expect("sas"));
    assert_eq!(sa["emoji"], sb["emoji"], "both sides show the same emoji");
    assert_eq!(sa["decimals"], sb["decimals"]);
    (sa, sb)
}

/// Both people say the SAS match; returns both `done` events.
pub fn confirm_both(requester: &mut Proc, listener: &mut Proc, flow: &str, timeout: Duration) -> (Value, Value) {
    requester.cmd("confirm", flow);
    listener.cmd("confirm", flow);
    (requester.expect_within("done", timeout), listener.expect_within("done", timeout))
}

/// Raw Client-Server API calls (for checks and for hostile input).
pub fn api(token: Option<&str>, method: &str, path: &str, body: Option<Value>) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let hs = mxverify_client::Homeserver::new(&homeserver(), token.map(str::to_owned));
        let m = reqwest_method(method);
        hs.call(m, path, body.as_ref(), Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    })
}

fn reqwest_method(m: &str) -> mxverify_client::http::Method {
    m.parse().unwrap()
}

/// Logs in with a plain password login; returns the access token.
pub fn raw_login(user: &str) -> String {
    let v = api(
        None,
        "POST",
        "/_matrix/client/v3/login",
        Some(
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": PASSWORD}),
        ),
    );
    v["access_token"].as_str().unwrap().to_owned()
}

/// Percent-encodes a path segment (room and event IDs).
pub fn enc(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One number from the device's SQLite store.
pub fn sql(dir: &std::path::Path, query: &str) -> i64 {
    let v = sql_text(dir, query);
    if v.is_empty() { 0 } else { v.parse().unwrap_or_else(|_| panic!("not a number: {v}")) }
}

/// One text value from the device's SQLite store.
pub fn sql_text(dir: &std::path::Path, query: &str) -> String {
    let db = dir.join("mxverify.sqlite3");
    let out = Command::new("python3")
        .args(["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); r=c.execute(sys.argv[2]).fetchone(); c.commit(); print(r[0] if r else '')"])
        .arg(&db)
        .arg(query)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Drives a SAS verification between a requester and a listener through `--json`, from the
/// listener's `request` to both `done`s (returned: requester's, listener's).
pub fn sas(requester: &mut Proc, listener: &mut Proc) -> (Value, Value) {
    let req = listener.expect("request");
    assert_eq!(req["direction"], "incoming");
    let flow = req["flow_id"].as_str().unwrap().to_owned();
    accept_and_compare(requester, listener, &flow);
    confirm_both(requester, listener, &flow, Duration::from_secs(60))
}

/// Whether `user`'s master key carries a signature of `signer`'s user-signing key, as a new login
/// of `signer` sees it on the server.
pub fn master_key_signed_by(signer: &str, user: &str) -> bool {
    let token = raw_login(signer);
    let q = api(
        Some(&token),
        "POST",
        "/_matrix/client/v3/keys/query",
        Some(json!({"device_keys": {signer: [], user: []}})),
    );
    let Some(usk) =
        q["user_signing_keys"][signer]["keys"].as_object().and_then(|k| k.values().next()).and_then(Value::as_str)
    else {
        return false;
    };
    q["master_keys"][user]["signatures"][signer][format!("ed25519:{usk}")].is_string()
}
