//! The commands that use a real homeserver: `login`, `request`, `listen`, `devices`, `trust`,
//! `cross-signing bootstrap`. Human mode asks questions on the terminal; `--json` prints one
//! event per line and reads commands as JSON lines on standard input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mxverify_client::{Device, DeviceError, HttpError, StateLock, now_ms};
use mxverify_proto::wire::Method;
use mxverify_proto::{CancelCode, Config, Event, FlowKey};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::output::{self, Ending};
use crate::qr_image;

/// Where the state lives: `--state-dir`, `MXVERIFY_STATE_DIR`, or the platform's data directory.
pub fn state_dir(arg: Option<PathBuf>) -> PathBuf {
    if let Some(d) = arg {
        return d;
    }
    if let Some(d) = std::env::var_os("MXVERIFY_STATE_DIR") {
        return d.into();
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("mxverify")
}

/// The machine configuration for a method choice: what this device can actually do.
///
/// For tests, `MXVERIFY_FLOW_TIMEOUT_MS` and `MXVERIFY_PROMPT_TIMEOUT_MS` shorten the spec's
/// 10-minute flow timeout and 2-minute prompt timeout.
pub fn config_for(method: &str) -> Config {
    let mut methods = vec![Method::SasV1];
    if method == "qr" {
        // We can draw a code, and read one from a picture or a pasted payload.
        methods.extend([Method::QrShowV1, Method::QrScanV1, Method::ReciprocateV1]);
    }
    let mut config = Config { methods, ..Config::default() };
    let env_ms = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = env_ms("MXVERIFY_FLOW_TIMEOUT_MS") {
        config.timeouts.flow = ms;
    }
    if let Some(ms) = env_ms("MXVERIFY_PROMPT_TIMEOUT_MS") {
        config.timeouts.prompt_after_receipt = ms;
    }
    config
}

/// The exit code for a failure outside the protocol.
pub fn ending_for(e: &DeviceError) -> Ending {
    match e {
        DeviceError::Http(HttpError::Unreachable { .. }) => Ending::Unreachable,
        DeviceError::Http(HttpError::Matrix { errcode, .. })
            if errcode == "M_FORBIDDEN" || errcode == "M_USER_DEACTIVATED" =>
        {
            Ending::LoginFailed
        }
        DeviceError::Http(HttpError::Matrix { errcode, .. }) if errcode == "M_UNKNOWN_TOKEN" => Ending::NotLoggedIn,
        DeviceError::NotLoggedIn(_) => Ending::NotLoggedIn,
        DeviceError::UnknownUser(_) | DeviceError::UnknownDevice { .. } => Ending::UnknownUserOrDevice,
        _ => Ending::Error,
    }
}

/// A plain sentence for a failure, with what to do.
pub fn explain_error(e: &DeviceError) -> String {
    match e {
        DeviceError::Http(HttpError::Matrix { errcode, .. }) if errcode == "M_FORBIDDEN" => {
            "the homeserver refused the user name or password (M_FORBIDDEN); check them and try again".into()
        }
        DeviceError::Http(HttpError::Matrix { errcode, .. }) if errcode == "M_UNKNOWN_TOKEN" => {
            "the homeserver no longer accepts this device's login (M_UNKNOWN_TOKEN); log in again with `mxverify login`"
                .into()
        }
        DeviceError::Http(HttpError::Unreachable { url, .. }) => {
            format!("cannot reach a homeserver at {url}; check the URL and that the server is running")
        }
        other => other.to_string(),
    }
}

/// Output for people or programs.
pub struct Ui<'a> {
    /// `--json`.
    pub json: bool,
    /// Where to write.
    pub out: &'a mut dyn Write,
    /// Where to also put a drawn QR code.
    pub qr_png: Option<PathBuf>,
}

impl Ui<'_> {
    fn say(&mut self, text: &str) {
        if !self.json {
            let _ = writeln!(self.out, "{text}");
            let _ = self.out.flush();
        }
    }

    fn line(&mut self, v: Value) {
        if self.json {
            let _ = writeln!(self.out, "{v}");
            let _ = self.out.flush();
        }
    }

    fn notices(&mut self, device: &mut Device) {
        for n in std::mem::take(&mut device.notices) {
            self.say(&format!("  ({})", n.message));
            let mut line = json!({"event": "notice", "kind": n.kind, "message": n.message});
            if let Some(room) = n.room {
                line["room"] = json!(room);
            }
            self.line(line);
        }
    }
}

/// `mxverify login`.
pub async fn login(
    dir: &Path,
    homeserver: &str,
    user: &str,
    password: &str,
    device_id: Option<&str>,
    ui: &mut Ui<'_>,
) -> Result<Ending, DeviceError> {
    let device = Device::login(dir, homeserver, user, password, device_id, Config::default()).await?;
    ui.line(
        json!({"event": "logged_in", "user": device.user_id, "device": device.device_id, "ed25519": device.ed25519(),
                   "state_dir": dir.display().to_string()}),
    );
    ui.say(&format!(
        "Logged in as {} on device {} (Ed25519 key {}). State kept in {}.",
        device.user_id,
        device.device_id,
        device.ed25519(),
        dir.display()
    ));
    Ok(Ending::Verified)
}

/// `mxverify cross-signing bootstrap`.
pub async fn bootstrap(
    dir: &Path,
    password: Option<&str>,
    replace: bool,
    ui: &mut Ui<'_>,
) -> Result<Ending, DeviceError> {
    let _lock = StateLock::take(dir)?;
    let mut device = Device::open(dir, Config::default())?;
    let b = device.bootstrap_cross_signing(password, replace).await?;
    let mut line = json!({"event": "cross_signing", "master_key": b.master_key, "device": device.device_id,
                          "created": b.created, "secret_storage": b.secret_storage});
    if let Some(rk) = &b.recovery_key {
        line["recovery_key"] = json!(rk.as_str());
    }
    ui.line(line);
    ui.say(&format!(
        "Cross-signing is set up: master key {}; this device is signed by it{}.",
        b.master_key,
        if b.created { "" } else { " (the keys this device already had were kept)" }
    ));
    match (&b.recovery_key, b.secret_storage) {
        (Some(rk), _) => ui.say(&format!(
            "The private keys are in secret storage on the server. Your recovery key, shown only this once — write it down:\n\n    {}\n\nWith it, `mxverify cross-signing recover` (or Element) restores the keys on a new device.",
            rk.as_str()
        )),
        (None, "existing") => ui.say("This account already has secret storage; it was left as it is (--replace makes a new one)."),
        (None, _) => ui.say("This device does not hold all three private keys, so no secret storage was made."),
    }
    Ok(Ending::Verified)
}

/// `mxverify cross-signing recover`: the private keys from secret storage.
pub async fn recover(
    dir: &Path,
    recovery_key: Option<&str>,
    passphrase: Option<&str>,
    ui: &mut Ui<'_>,
) -> Result<Ending, DeviceError> {
    let _lock = StateLock::take(dir)?;
    let mut device = Device::open(dir, Config::default())?;
    let msk = device.recover_cross_signing(recovery_key, passphrase).await?;
    ui.line(json!({"event": "cross_signing", "master_key": msk, "device": device.device_id, "restored": true,
                   "held": device.cross_signing_keys_held()}));
    ui.say(&format!(
        "Restored the cross-signing keys from secret storage (master key {msk}); this device is signed by its self-signing key."
    ));
    Ok(Ending::Verified)
}

/// `mxverify cross-signing status`: which private keys this device holds.
pub async fn cross_signing_status(dir: &Path, ui: &mut Ui<'_>) -> Result<Ending, DeviceError> {
    let mut device = Device::open(dir, Config::default())?;
    let me = device.user_id.clone();
    device.query_keys(std::slice::from_ref(&me)).await?;
    let published = device.known(&me).and_then(|k| k.master_key.clone());
    let held = device.cross_signing_keys_held();
    let secret_storage =
        device.hs.account_data(&me, "m.secret_storage.default_key").await?.is_some_and(|d| d["key"].is_string());
    ui.line(json!({"event": "cross_signing_status", "master_key": published, "held": held,
                   "held_master_matches": device.master_key().is_some() && device.master_key() == published,
                   "secret_storage": secret_storage}));
    ui.say(&format!(
        "Published master key: {}\nPrivate keys on this device: {}\nSecret storage: {}",
        published.as_deref().unwrap_or("none"),
        if held.is_empty() { "none".to_owned() } else { held.join(", ") },
        if secret_storage { "yes" } else { "no" }
    ));
    Ok(Ending::Verified)
}

/// `mxverify devices [USER]`: each device with its verification state.
pub async fn devices(dir: &Path, user: Option<&str>, ui: &mut Ui<'_>) -> Result<Ending, DeviceError> {
    let mut device = Device::open(dir, Config::default())?;
    let user = user.map(str::to_owned).unwrap_or_else(|| device.user_id.clone());
    let mut users = vec![user.clone()];
    if user != device.user_id {
        users.push(device.user_id.clone());
    }
    device.query_keys(&users).await?;
    let info = device.known(&user).cloned().ok_or_else(|| DeviceError::UnknownUser(user.clone()))?;
    if info.devices.is_empty() {
        return Err(DeviceError::UnknownUser(user));
    }
    let msk_trusted = info
        .master_key
        .as_ref()
        .is_some_and(|k| device.store.is_trusted(&user, k).unwrap_or(false) || device.master_key().as_ref() == Some(k));
    ui.say(&format!(
        "Devices of {user} (master key: {}):",
        match (&info.master_key, msk_trusted) {
            (Some(k), true) => format!("{k}, verified"),
            (Some(k), false) => format!("{k}, not verified"),
            (None, _) => "none".into(),
        }
    ));
    for d in info.devices.values() {
        let this = user == device.user_id && d.device_id == device.device_id;
        let state = if this {
            "this device"
        } else if device.store.is_trusted(&user, &d.ed25519)? {
            "verified"
        } else if d.cross_signed && msk_trusted {
            "verified (cross-signed)"
        } else if d.cross_signed {
            "cross-signed by its owner"
        } else {
            "not verified"
        };
        ui.line(json!({"event": "device", "user": user, "device": d.device_id, "ed25519": d.ed25519,
                       "display_name": d.display_name, "cross_signed": d.cross_signed, "state": state}));
        ui.say(&format!(
            "  {:<14} {:<26} {}  {}",
            d.device_id,
            state,
            d.ed25519,
            d.display_name.as_deref().unwrap_or("")
        ));
    }
    Ok(Ending::Verified)
}

/// `mxverify trust`: what this device has verified.
pub fn trust(dir: &Path, ui: &mut Ui<'_>) -> Result<Ending, DeviceError> {
    let device = Device::open(dir, Config::default())?;
    let records = device.store.trust(None)?;
    if records.is_empty() {
        ui.say("Nothing verified yet.");
    }
    for r in records {
        ui.say(&format!(
            "  {} {} ({}) — {} on device {}, flow {}",
            r.user_id, r.key_id, r.kind, r.method, r.device_id, r.flow_id
        ));
        ui.line(json!({"event": "trusted", "record": r}));
    }
    Ok(Ending::Verified)
}

/// `mxverify join ROOM`.
pub async fn join(dir: &Path, room: &str, ui: &mut Ui<'_>) -> Result<Ending, DeviceError> {
    let device = Device::open(dir, Config::default())?;
    device.hs.join(room).await?;
    ui.line(json!({"event": "joined", "room": room}));
    ui.say(&format!("Joined {room}."));
    Ok(Ending::Verified)
}

/// How `request` reaches the other side.
#[derive(Debug, Clone)]
pub enum Target {
    /// To-device for our own devices, a direct-message room for another user (FW-02).
    Auto,
    /// To-device, to these devices (all of the user's if none named).
    ToDevice(Option<String>),
    /// In a new or existing direct-message room.
    Dm,
    /// In this room.
    Room(String),
}

/// `mxverify request USER`.
pub async fn request(
    dir: &Path,
    user: &str,
    target: Target,
    method: &str,
    encrypt_to_device: bool,
    ui: &mut Ui<'_>,
) -> Result<Ending, DeviceError> {
    let _lock = StateLock::take(dir)?;
    let config = config_for(method);
    let mut device = Device::open(dir, config.clone())?;
    device.set_encrypt_to_device(encrypt_to_device);
    let lost = device.abandon_lost_flows().await?;
    let mut session = Session::new(method, Goal::Forever);
    session.handle(&mut device, ui, lost).await?;
    let own = device.user_id.clone();
    device.query_keys(std::slice::from_ref(&own)).await?;
    let devices = device.devices_of(user).await?;
    let now = now_ms();
    let target = match target {
        Target::Auto if user == own => Target::ToDevice(None),
        Target::Auto => Target::Dm,
        other => other,
    };
    let flow = match target {
        Target::Auto => unreachable!("resolved above"),
        Target::ToDevice(named) => {
            let devices = match named {
                Some(d) if devices.contains(&d) => vec![d],
                Some(d) => return Err(DeviceError::UnknownDevice { user: user.into(), device: d }),
                None => devices,
            };
            Some(device.machine.request_to_device(user, &devices, now)?)
        }
        Target::Dm => {
            let dm = device.dm_room(user).await?;
            ui.notices(&mut device);
            if dm.other_joined {
                device.machine.request_in_room(&dm.room_id, user, now);
            } else {
                // Clients that read a new room before fetching its members' keys would never
                // show a request sent before the other user joined: wait for them.
                ui.say(&format!("Waiting for {user} to join the direct chat {} …", dm.room_id));
                ui.line(json!({"event": "notice", "kind": "waiting_for_join", "room": dm.room_id, "user": user,
                               "message": format!("waiting for {user} to join {}", dm.room_id)}));
                session.awaiting_join = Some(AwaitingJoin {
                    room_id: dm.room_id,
                    user: user.to_owned(),
                    deadline: now + config.timeouts.flow,
                });
            }
            None
        }
        Target::Room(room) => {
            device.machine.request_in_room(&room, user, now);
            None
        }
    };
    session.goal = Goal::Flow(flow);
    session.run(&mut device, ui).await
}

/// `mxverify listen`.
pub async fn listen(
    dir: &Path,
    method: &str,
    once: bool,
    encrypt_to_device: bool,
    ui: &mut Ui<'_>,
) -> Result<Ending, DeviceError> {
    let _lock = StateLock::take(dir)?;
    let mut device = Device::open(dir, config_for(method))?;
    device.set_encrypt_to_device(encrypt_to_device);
    let own = device.user_id.clone();
    device.query_keys(std::slice::from_ref(&own)).await?;
    ui.line(json!({"event": "listening", "user": device.user_id, "device": device.device_id}));
    ui.say(&format!(
        "Listening for verification requests to {} on device {} (Ctrl-C to stop).",
        device.user_id, device.device_id
    ));
    // Flows lost by a restart are ended first; they do not count for --once.
    let mut session = Session::new(method, Goal::Forever);
    let lost = device.abandon_lost_flows().await?;
    session.handle(&mut device, ui, lost).await?;
    session.goal = if once { Goal::FirstFlow } else { Goal::Forever };
    let restored = device.restore_pending().await?;
    session.handle(&mut device, ui, restored).await?;
    session.run(&mut device, ui).await
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Goal {
    /// Until this flow (or, for an in-room request, the one about to be created) ends.
    Flow(Option<FlowKey>),
    /// Until the first flow ends.
    FirstFlow,
    /// Until stopped.
    Forever,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Question {
    Accept,
    Compare,
    ScanConfirm,
    Scan,
}

/// An in-room request that waits until the other user has joined the direct chat.
#[derive(Debug, Clone)]
struct AwaitingJoin {
    room_id: String,
    user: String,
    deadline: u64,
}

/// One interactive run: the sync loop, user input, deadlines.
struct Session {
    method: String,
    goal: Goal,
    asking: Option<(FlowKey, Question)>,
    ended: Option<Ending>,
    awaiting_join: Option<AwaitingJoin>,
}

impl Session {
    fn new(method: &str, goal: Goal) -> Self {
        Self { method: method.to_owned(), goal, asking: None, ended: None, awaiting_join: None }
    }

    /// Sends the waiting request once the other user is in the room; gives up at the deadline.
    async fn check_join(&mut self, device: &mut Device, ui: &mut Ui<'_>) -> Result<(), DeviceError> {
        let Some(wait) = self.awaiting_join.clone() else { return Ok(()) };
        let now = now_ms();
        if device.membership(&wait.room_id, &wait.user).await?.as_deref() == Some("join") {
            self.awaiting_join = None;
            ui.say(&format!("{} joined; sending the request.", wait.user));
            device.machine.request_in_room(&wait.room_id, &wait.user, now);
            let events = device.pump().await?;
            self.handle(device, ui, events).await?;
        } else if now >= wait.deadline {
            self.awaiting_join = None;
            let message =
                format!("{} did not join the direct chat {} in time; no request was sent", wait.user, wait.room_id);
            ui.say(&format!("✘ {message}"));
            ui.line(json!({"event": "error", "message": message}));
            self.ended = Some(Ending::TimedOut);
        }
        Ok(())
    }

    fn ours(&self, flow: &FlowKey) -> bool {
        match &self.goal {
            Goal::Flow(Some(f)) => f == flow,
            _ => true,
        }
    }

    async fn run(&mut self, device: &mut Device, ui: &mut Ui<'_>) -> Result<Ending, DeviceError> {
        let filter = device.filter_id().await?;
        let since = device.store.get("since")?;
        let (batch_tx, mut batches) = mpsc::channel::<Result<Value, String>>(1);
        let (ack_tx, mut acks) = mpsc::channel::<Option<String>>(1);
        let hs = device.hs.clone();
        let sync_task = tokio::spawn(async move {
            let mut since = since;
            loop {
                match hs.sync(since.as_deref(), &filter, 30_000).await {
                    Ok(resp) => {
                        if batch_tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                        // The token moves on only once the batch was handled and stored.
                        match acks.recv().await {
                            Some(next) => since = next.or(since),
                            None => return,
                        }
                    }
                    Err(e) => {
                        if batch_tx.send(Err(e.to_string())).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        // A plain thread: a blocked read of standard input must not keep the process alive.
        let (line_tx, mut lines) = mpsc::channel::<String>(16);
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { return };
                if line_tx.blocking_send(line).is_err() {
                    return;
                }
            }
        });
        let mut stdin_open = true;
        let events = device.pump().await?;
        self.handle(device, ui, events).await?;
        let mut lingering = false;
        let result = loop {
            if let Some(e) = self.ended {
                // Secret sharing may still be under way with our own device we just verified.
                match device.secrets_pending_until(now_ms()) {
                    Some(_) if e == Ending::Verified => {
                        if !lingering {
                            lingering = true;
                            ui.say("  (staying a moment for the cross-signing keys to be shared)");
                        }
                    }
                    _ => break Ok(e),
                }
            }
            let now = now_ms();
            // While a question waits for the person, remind them of the time left every 30 s.
            let cadence = if self.asking.is_some() && !ui.json { 30_000 } else { 60_000 };
            let deadline = [
                device.next_deadline(),
                self.awaiting_join.as_ref().map(|w| w.deadline),
                device.secrets_pending_until(now),
            ]
            .into_iter()
            .flatten()
            .min();
            let wait = deadline.map(|d| d.saturating_sub(now)).unwrap_or(cadence).min(cadence);
            tokio::select! {
                batch = batches.recv() => match batch {
                    Some(Ok(resp)) => {
                        let events = device.handle_sync(&resp).await?;
                        let next = resp["next_batch"].as_str().map(str::to_owned);
                        if let Some(n) = &next {
                            device.store.set("since", n)?;
                        }
                        let _ = ack_tx.send(next).await;
                        self.handle(device, ui, events).await?;
                        self.check_join(device, ui).await?;
                    }
                    Some(Err(e)) => {
                        ui.say(&format!("  (sync failed, retrying: {e})"));
                        ui.line(json!({"event": "notice", "message": format!("sync failed, retrying: {e}")}));
                    }
                    None => break Err(DeviceError::Corrupt("the sync loop stopped".into())),
                },
                line = lines.recv(), if stdin_open => match line {
                    Some(line) => self.command(device, ui, &line).await?,
                    None => stdin_open = false,
                },
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {
                    device.handle_timeout(now_ms())?;
                    let events = device.pump().await?;
                    self.handle(device, ui, events).await?;
                    self.check_join(device, ui).await?;
                    self.remind(device, ui);
                }
            }
        };
        sync_task.abort();
        result
    }

    /// Shows events and plays the automatic parts.
    async fn handle(&mut self, device: &mut Device, ui: &mut Ui<'_>, events: Vec<Event>) -> Result<(), DeviceError> {
        let mut queue = events;
        while !queue.is_empty() {
            for event in std::mem::take(&mut queue) {
                if let (Goal::Flow(None), Event::RequestSent { flow }) = (&self.goal, &event) {
                    self.goal = Goal::Flow(Some(flow.clone()));
                }
                if let Some(v) = output::event_json(None, &event) {
                    ui.line(v);
                }
                self.show(device, ui, &event);
            }
            ui.notices(device);
            queue = device.pump().await?;
        }
        // Side effects of a sync without verification events (a room joined) are news too.
        ui.notices(device);
        Ok(())
    }

    fn show(&mut self, device: &mut Device, ui: &mut Ui<'_>, event: &Event) {
        let now = now_ms();
        match event {
            Event::RequestSent { flow } if self.ours(flow) => {
                ui.say(&format!("Request sent ({}); waiting for the other device to accept…", describe(flow)));
            }
            Event::IncomingRequest { flow, from_device, common_methods, deadline, legacy, .. } => {
                let who = other_user(flow, device);
                if common_methods.is_empty() {
                    ui.say(&format!("{who} (device {from_device}) wants to verify, but offers no method this program supports. Type `n` to decline."));
                } else {
                    let kind = if *legacy { "started emoji verification" } else { "wants to verify" };
                    ui.say(&format!(
                        "{who} (device {from_device}) {kind}. Accept? [y/n] (closes in {})",
                        countdown(*deadline, now)
                    ));
                }
                self.asking = Some((flow.clone(), Question::Accept));
            }
            Event::Ready { flow, other_device, methods } if self.ours(flow) => {
                ui.say(&format!("Device {other_device} is ready ({}).", methods.join(", ")));
                let we_requested = device.machine.flow(flow).is_some_and(|f| f.we_requested);
                if !ui.json && we_requested && self.method == "sas" && methods.iter().any(|m| m == "m.sas.v1") {
                    if let Err(e) = device.machine.start_sas(flow, now) {
                        ui.say(&format!("Cannot start emoji verification: {e}"));
                    }
                } else if !ui.json && self.method == "qr" {
                    ui.say("Scan the code below with the other device, or type the path of a picture of the other device's code (or its payload in base64) to scan it.");
                    self.asking = Some((flow.clone(), Question::Scan));
                }
            }
            Event::QrCode { payload, .. } => {
                if !ui.json {
                    match qr_image::render_terminal(payload) {
                        Ok(drawn) => ui.say(&drawn),
                        Err(e) => ui.say(&format!("(cannot draw the code: {e})")),
                    }
                }
                if let Some(path) = ui.qr_png.clone() {
                    match qr_image::write_png(payload, &path) {
                        Ok(()) => ui.say(&format!("(the code is also in {})", path.display())),
                        Err(e) => ui.say(&format!("(cannot write {}: {e})", path.display())),
                    }
                }
            }
            Event::QrScanned { flow } => {
                ui.say("The other device scanned this code. Does it show that the verification succeeded? [y/n]");
                self.asking = Some((flow.clone(), Question::ScanConfirm));
            }
            Event::Sas { flow, emoji, decimals } => {
                let deadline = device.machine.flow(flow).map(|f| f.deadline).unwrap_or(now);
                let mut text = String::from("Compare with the other device:\n");
                if let Some(emoji) = emoji {
                    for (i, e) in emoji.iter().enumerate() {
                        text.push_str(&format!("  {}  {}  {}\n", i + 1, e.symbol, e.description));
                    }
                }
                if let Some(d) = decimals {
                    text.push_str(&format!("  numbers: {}\n", output::decimals(d)));
                }
                text.push_str(&format!("Do they match? [y/n] (time left: {})", countdown(deadline, now)));
                ui.say(&text);
                self.asking = Some((flow.clone(), Question::Compare));
            }
            Event::Done { flow, user_id, device_id, keys } => {
                let what = keys.iter().map(|k| k.key_id.as_str()).collect::<Vec<_>>().join(", ");
                ui.say(&format!("✔ Verified {user_id} (device {device_id}): {what}"));
                self.finish(flow, Ending::Verified);
            }
            Event::Cancelled { flow, info } => {
                ui.say(&format!("✘ {}", info.explain()));
                let ending = if info.code == CancelCode::Timeout { Ending::TimedOut } else { Ending::Cancelled };
                self.finish(flow, ending);
            }
            _ => {}
        }
    }

    /// The countdown: how long the open question has left.
    fn remind(&self, device: &Device, ui: &mut Ui<'_>) {
        let Some((flow, _)) = &self.asking else { return };
        let Some(info) = device.machine.flow(flow) else { return };
        if info.cancel.is_none() && !info.verified {
            ui.say(&format!("  (still waiting for your answer: {} left)", countdown(info.deadline, now_ms())));
        }
    }

    fn finish(&mut self, flow: &FlowKey, ending: Ending) {
        if self.asking.as_ref().is_some_and(|(f, _)| f == flow) {
            self.asking = None;
        }
        match &self.goal {
            Goal::Flow(Some(f)) if f == flow => self.ended = Some(ending),
            Goal::FirstFlow => self.ended = Some(ending),
            _ => {}
        }
    }

    /// One line of input: a JSON command, or (human mode) the answer to the current question.
    async fn command(&mut self, device: &mut Device, ui: &mut Ui<'_>, line: &str) -> Result<(), DeviceError> {
        let line = line.trim();
        if line.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let result = if ui.json { self.json_command(device, line, now) } else { self.answer(device, line, now) };
        match result {
            Ok(()) => {}
            Err(message) => {
                ui.say(&format!("  {message}"));
                ui.line(json!({"event": "error", "input": line, "message": message}));
            }
        }
        let events = device.pump().await?;
        self.handle(device, ui, events).await
    }

    fn json_command(&mut self, device: &mut Device, line: &str, now: u64) -> Result<(), String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not a JSON command: {e}"))?;
        let name = v["command"].as_str().ok_or("a command needs a \"command\" field")?;
        let flow = find_flow(device, v["flow_id"].as_str())?;
        let m = &mut device.machine;
        let r = match name {
            "accept" => m.accept(&flow, now),
            "start_sas" => m.start_sas(&flow, now),
            "confirm" => m.confirm(&flow, now),
            "mismatch" => m.mismatch(&flow, now),
            "cancel" => m.cancel(&flow, now),
            "scan" => {
                let payload = v["payload"]
                    .as_str()
                    .and_then(mxverify_proto::b64::decode)
                    .ok_or("scan needs \"payload\" (base64)")?;
                m.scan_qr(&flow, &payload, now)
            }
            other => return Err(format!("unknown command {other:?}")),
        };
        r.map_err(|e| e.to_string())
    }

    fn answer(&mut self, device: &mut Device, line: &str, now: u64) -> Result<(), String> {
        let Some((flow, question)) = self.asking.clone() else {
            return Err("nothing to answer right now".into());
        };
        let yes = matches!(line.to_ascii_lowercase().as_str(), "y" | "yes");
        let no = matches!(line.to_ascii_lowercase().as_str(), "n" | "no");
        let m = &mut device.machine;
        let r = match (question, yes, no) {
            (Question::Scan, _, _) => {
                let path = Path::new(line);
                let payload = if path.exists() {
                    qr_image::decode_image(path).map_err(|e| e.to_string())?
                } else {
                    mxverify_proto::b64::decode(line).ok_or("neither a picture nor a base64 payload")?
                };
                m.scan_qr(&flow, &payload, now)
            }
            (_, false, false) => return Err("please answer y or n".into()),
            (Question::Accept, true, _) => m.accept(&flow, now),
            (Question::Compare | Question::ScanConfirm, true, _) => m.confirm(&flow, now),
            (Question::Accept, _, true) => m.cancel(&flow, now),
            (Question::Compare | Question::ScanConfirm, _, true) => m.mismatch(&flow, now),
        };
        self.asking = None;
        r.map_err(|e| e.to_string())
    }
}

fn find_flow(device: &Device, flow_id: Option<&str>) -> Result<FlowKey, String> {
    let active: Vec<FlowKey> = device
        .machine
        .flows()
        .filter(|k| device.machine.flow(k).is_some_and(|f| f.cancel.is_none() && !f.verified))
        .filter(|k| flow_id.is_none_or(|id| k.flow_id() == id))
        .cloned()
        .collect();
    match (active.len(), flow_id) {
        (1, _) => Ok(active[0].clone()),
        (0, Some(id)) => Err(format!("no active verification with flow_id {id}")),
        (0, None) => Err("no active verification".into()),
        (_, _) => Err("several verifications are active: give \"flow_id\"".into()),
    }
}

fn other_user(flow: &FlowKey, device: &Device) -> String {
    device.machine.flow(flow).map(|f| f.other_user).unwrap_or_default()
}

fn describe(flow: &FlowKey) -> String {
    match flow {
        FlowKey::ToDevice { user_id, transaction_id } => {
            format!("to-device to {user_id}, transaction {transaction_id}")
        }
        FlowKey::Room { room_id, event_id } => format!("in room {room_id}, event {event_id}"),
    }
}

fn countdown(deadline: u64, now: u64) -> String {
    let s = deadline.saturating_sub(now) / 1000;
    format!("{}:{:02}", s / 60, s % 60)
}
