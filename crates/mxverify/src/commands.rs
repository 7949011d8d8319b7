//! The commands that use a real homeserver: `login`, `request`, `listen`, `devices`, `trust`,
//! `join`, `cross-signing ...`. They are built on [`mxverify_client::Device`] alone: the device
//! runs itself; a command shows what it reports and turns the person's answers (human mode) or
//! JSON commands (`--json`) into its actions.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mxverify_client::{
    Connection, Credentials, Device, DeviceError, DeviceEvent, HttpError, Notice, Options, StateLock, now_ms,
};
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
/// In test builds (feature `test-hooks`), `MXVERIFY_FLOW_TIMEOUT_MS` and
/// `MXVERIFY_PROMPT_TIMEOUT_MS` shorten the spec's 10-minute flow timeout and 2-minute prompt
/// timeout.
pub fn config_for(method: &str) -> Config {
    let mut methods = vec![Method::SasV1];
    if method == "qr" {
        // We can draw a code, and read one from a picture or a pasted payload.
        methods.extend([Method::QrShowV1, Method::QrScanV1, Method::ReciprocateV1]);
    }
    let mut config = Config { methods, ..Config::default() };
    let env_ms =
        |name: &str| cfg!(feature = "test-hooks").then(|| std::env::var(name).ok()?.parse::<u64>().ok()).flatten();
    if let Some(ms) = env_ms("MXVERIFY_FLOW_TIMEOUT_MS") {
        config.timeouts.flow = ms;
    }
    if let Some(ms) = env_ms("MXVERIFY_PROMPT_TIMEOUT_MS") {
        config.timeouts.prompt_after_receipt = ms;
    }
    config
}

/// How the device is opened: the machine configuration, and the store passphrase from
/// `$MXVERIFY_STORE_PASSPHRASE` (which encrypts the secrets at rest).
pub fn options(config: Config) -> Options {
    let passphrase = std::env::var("MXVERIFY_STORE_PASSPHRASE").ok().filter(|p| !p.is_empty());
    Options::new(config).with_store_passphrase(passphrase.as_deref())
}

/// The exit code for a failure outside the protocol. Exit 5 is for a refused login only.
pub fn ending_for(e: &DeviceError) -> Ending {
    match e {
        DeviceError::Http(HttpError::Unreachable { .. }) => Ending::Unreachable,
        DeviceError::LoginRefused(_) => Ending::LoginFailed,
        DeviceError::Http(HttpError::Matrix { errcode, .. })
            if errcode == "M_UNKNOWN_TOKEN" || errcode == "M_MISSING_TOKEN" =>
        {
            Ending::NotLoggedIn
        }
        DeviceError::Http(e) if e.is_unknown_token() => Ending::NotLoggedIn,
        DeviceError::LoggedOut(_) | DeviceError::NotLoggedIn(_) => Ending::NotLoggedIn,
        DeviceError::Store(
            mxverify_client::StoreError::PassphraseNeeded | mxverify_client::StoreError::WrongPassphrase,
        ) => Ending::Usage,
        DeviceError::UnknownUser(_) | DeviceError::UnknownDevice { .. } => Ending::UnknownUserOrDevice,
        DeviceError::Refused(_) => Ending::Usage,
        _ => Ending::Error,
    }
}

/// A plain sentence for a failure, with what to do.
pub fn explain_error(e: &DeviceError) -> String {
    match e {
        DeviceError::Http(HttpError::Matrix { errcode, .. }) if errcode == "M_UNKNOWN_TOKEN" => {
            "the homeserver no longer accepts this device's login (M_UNKNOWN_TOKEN); log in again with `mxverify login`"
                .into()
        }
        DeviceError::Http(HttpError::Unreachable { url, .. }) => {
            format!("cannot reach a homeserver at {url}; check the URL and that the server is running")
        }
        other => clean(&other.to_string()),
    }
}

/// Text that came from the network, made safe for a terminal: control characters (escape
/// sequences among them) are shown as `\u{..}` instead of being obeyed.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\n' { format!("\\u{{{:x}}}", c as u32) } else { c.to_string() })
        .collect()
}

/// Output for people or programs.
pub struct Ui<'a> {
    /// `--json`.
    pub json: bool,
    /// Where to write.
    pub out: &'a mut dyn Write,
    /// Where to also put a drawn QR code.
    pub qr_png: Option<PathBuf>,
    /// The language of the emoji names (see [`output::language`]).
    pub lang: Option<String>,
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

    fn notice(&mut self, n: &Notice) {
        self.say(&format!("  ({})", clean(&n.message)));
        let mut line = json!({"event": "notice", "kind": n.kind, "message": n.message});
        if let Some(room) = &n.room {
            line["room"] = json!(room);
        }
        self.line(line);
    }
}

/// `mxverify login`.
pub async fn login(
    dir: &Path,
    homeserver: Option<&str>,
    credentials: Credentials,
    replace: bool,
    allow_insecure_http: bool,
    ui: &mut Ui<'_>,
) -> Result<Ending, DeviceError> {
    let _lock = StateLock::take(dir)?;
    let homeserver = match (homeserver, &credentials) {
        (Some(h), _) => h.to_owned(),
        (None, Credentials::Password { user, .. }) => match user.split_once(':') {
            Some((_, server)) => {
                let found = mxverify_client::http::discover(server).await?;
                ui.say(&format!("Found the homeserver of {server}: {found}"));
                found
            }
            None => {
                return Err(DeviceError::Refused(
                    "give --homeserver, or a full user ID (@name:server) to find it".into(),
                ));
            }
        },
        (None, _) => return Err(DeviceError::Refused("give --homeserver with --access-token".into())),
    };
    let options = options(Config::default()).allow_insecure_http(allow_insecure_http);
    let device = Device::login(dir, &homeserver, credentials, replace, options).await?;
    ui.line(json!({"event": "logged_in", "user": device.user_id(), "device": device.device_id(),
                   "ed25519": device.ed25519(), "state_dir": dir.display().to_string()}));
    ui.say(&format!(
        "Logged in as {} on device {} (Ed25519 key {}). State kept in {}.",
        device.user_id(),
        device.device_id(),
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
    let device = Device::open(dir, options(Config::default()))?;
    let b = device.bootstrap_cross_signing(password, replace).await?;
    let mut line = json!({"event": "cross_signing", "master_key": b.master_key, "device": device.device_id(),
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
        (None, "existing") => {
            ui.say("This account already has secret storage; it was left as it is (--replace makes a new one).")
        }
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
    let device = Device::open(dir, options(Config::default()))?;
    let msk = device.recover_cross_signing(recovery_key, passphrase).await?;
    ui.line(json!({"event": "cross_signing", "master_key": msk, "device": device.device_id(), "restored": true,
                   "held": device.cross_signing_keys_held()}));
    ui.say(&format!(
        "Restored the cross-signing keys from secret storage (master key {msk}); this device is signed by its self-signing key."
    ));
    Ok(Ending::Verified)
}

/// `mxverify cross-signing status`: which private keys this device holds.
pub async fn cross_signing_status(dir: &Path, ui: &mut Ui<'_>) -> Result<Ending, DeviceError> {
    let _lock = StateLock::take(dir)?;
    let device = Device::open(dir, options(Config::default()))?;
    let me = device.user_id().to_owned();
    device.query_keys(std::slice::from_ref(&me)).await?;
    let published = device.known(&me).and_then(|k| k.master_key);
    let held = device.cross_signing_keys_held();
    let secret_storage = device.has_secret_storage().await?;
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
    let _lock = StateLock::take(dir)?;
    let device = Device::open(dir, options(Config::default()))?;
    let me = device.user_id().to_owned();
    let user = user.map(str::to_owned).unwrap_or_else(|| me.clone());
    let mut users = vec![user.clone()];
    if user != me {
        users.push(me.clone());
    }
    device.query_keys(&users).await?;
    let info = device.known(&user).ok_or_else(|| DeviceError::UnknownUser(user.clone()))?;
    if info.devices.is_empty() {
        return Err(DeviceError::UnknownUser(user));
    }
    let msk_trusted = info
        .master_key
        .as_ref()
        .is_some_and(|k| device.is_trusted(&user, k) || device.master_key().as_ref() == Some(k));
    ui.say(&format!(
        "Devices of {} (master key: {}):",
        clean(&user),
        match (&info.master_key, msk_trusted) {
            (Some(k), true) => format!("{k}, verified"),
            (Some(k), false) => format!("{k}, not verified"),
            (None, _) => "none".into(),
        }
    ));
    for d in info.devices.values() {
        let this = user == me && d.device_id == device.device_id();
        let state = if this {
            "this device"
        } else if device.is_trusted(&user, &d.ed25519) {
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
            clean(&d.device_id),
            state,
            d.ed25519,
            clean(d.display_name.as_deref().unwrap_or(""))
        ));
    }
    Ok(Ending::Verified)
}

/// `mxverify trust`: what this device has verified.
pub fn trust(dir: &Path, ui: &mut Ui<'_>) -> Result<Ending, DeviceError> {
    let device = Device::open(dir, options(Config::default()))?;
    let records = device.trust(None)?;
    if records.is_empty() {
        ui.say("Nothing verified yet.");
    }
    for r in records {
        ui.say(&format!(
            "  {} {} ({}) — {} on device {}, flow {}",
            clean(&r.user_id),
            r.key_id,
            r.kind,
            r.method,
            clean(&r.device_id),
            r.flow_id
        ));
        ui.line(json!({"event": "trusted", "record": r}));
    }
    Ok(Ending::Verified)
}

/// `mxverify join ROOM`.
pub async fn join(dir: &Path, room: &str, ui: &mut Ui<'_>) -> Result<Ending, DeviceError> {
    let _lock = StateLock::take(dir)?;
    let device = Device::open(dir, options(Config::default()))?;
    device.join(room).await?;
    ui.line(json!({"event": "joined", "room": room}));
    ui.say(&format!("Joined {room}."));
    Ok(Ending::Verified)
}

/// How `request` reaches the other side.
#[derive(Debug, Clone)]
pub enum Target {
    /// To-device for our own devices, a direct-message room for another user.
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
    let device = Device::open(dir, options(config_for(method)))?;
    device.set_encrypt_to_device(encrypt_to_device);
    let own = device.user_id().to_owned();
    let target = match target {
        Target::Auto if user == own => Target::ToDevice(None),
        Target::Auto => Target::Dm,
        other => other,
    };
    // A request that cannot be made fails before anything starts.
    if matches!(target, Target::Room(_) | Target::Dm) && user == own {
        return Err(DeviceError::Refused(
            "your own devices verify each other to-device, not in a room: leave out --room/--dm".into(),
        ));
    }
    device.start().await?;
    let mut session = Session::new(method, Goal::Flow(None), user);
    let flow = match target {
        Target::Auto => unreachable!("resolved above"),
        Target::ToDevice(named) => {
            let named = named.map(|d| vec![d]);
            Some(device.request_to_device(user, named.as_deref()).await?)
        }
        Target::Dm => {
            let dm = device.request_in_dm(user).await?;
            if !dm.other_joined {
                ui.say(&format!("Waiting for {} to join the direct chat {} …", clean(user), dm.room_id));
            }
            None
        }
        Target::Room(room) => {
            device.request_in_room(user, &room).await?;
            None
        }
    };
    session.goal = Goal::Flow(flow);
    session.run(&device, ui).await
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
    let device = Device::open(dir, options(config_for(method)))?;
    device.set_encrypt_to_device(encrypt_to_device);
    ui.line(json!({"event": "listening", "user": device.user_id(), "device": device.device_id()}));
    ui.say(&format!(
        "Listening for verification requests to {} on device {} (Ctrl-C to stop).",
        device.user_id(),
        device.device_id()
    ));
    let mut session = Session::new(method, if once { Goal::FirstFlow } else { Goal::Forever }, "");
    // Flows lost by a restart are ended first, and do not count for --once.
    session.ignore_abandoned = true;
    device.start().await?;
    session.run(&device, ui).await
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Question {
    Accept,
    Compare,
    ScanConfirm,
    Scan,
}

/// One interactive run: the device's events, the person's answers or JSON commands, reminders.
struct Session {
    method: String,
    goal: Goal,
    /// For a request: whom we asked (a failed request for them ends the run).
    requested_user: String,
    /// Questions for the person, oldest first; the first is the one being answered. Each is
    /// bound to its flow: an answer never goes to a question the person did not see.
    questions: VecDeque<(FlowKey, Question)>,
    ended: Option<Ending>,
    ignore_abandoned: bool,
    /// Short labels for flows, so that the person can tell them apart.
    labels: Vec<FlowKey>,
}

impl Session {
    fn new(method: &str, goal: Goal, requested_user: &str) -> Self {
        Self {
            method: method.to_owned(),
            goal,
            requested_user: requested_user.to_owned(),
            questions: VecDeque::new(),
            ended: None,
            ignore_abandoned: false,
            labels: Vec::new(),
        }
    }

    fn ours(&self, flow: &FlowKey) -> bool {
        match &self.goal {
            Goal::Flow(Some(f)) => f == flow,
            _ => true,
        }
    }

    fn label(&mut self, flow: &FlowKey) -> String {
        let i = match self.labels.iter().position(|f| f == flow) {
            Some(i) => i,
            None => {
                self.labels.push(flow.clone());
                self.labels.len() - 1
            }
        };
        format!("[{}]", i + 1)
    }

    async fn run(&mut self, device: &Device, ui: &mut Ui<'_>) -> Result<Ending, DeviceError> {
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
        let mut lingering = false;
        let result = loop {
            let now = now_ms();
            if let Some(e) = self.ended {
                // Secret sharing may still be under way with our own device we just verified.
                match device.busy_until() {
                    Some(_) if e == Ending::Verified => {
                        if !lingering {
                            lingering = true;
                            ui.say("  (staying a moment for the cross-signing keys to be shared)");
                        }
                    }
                    _ => break Ok(e),
                }
            }
            // While a question waits for the person, remind them of the time left every 30 s.
            let cadence = if !self.questions.is_empty() && !ui.json { 30_000 } else { 60_000 };
            let wait = device.busy_until().map(|t| t.saturating_sub(now)).unwrap_or(cadence).min(cadence).max(1);
            tokio::select! {
                event = device.next_event() => match event {
                    Some(event) => self.handle(device, ui, event).await?,
                    None => break Ok(Ending::Error),
                },
                line = lines.recv(), if stdin_open => match line {
                    Some(line) => self.command(device, ui, &line).await,
                    None => stdin_open = false,
                },
                _ = tokio::time::sleep(Duration::from_millis(wait)) => self.remind(device, ui),
            }
        };
        device.shutdown().await;
        result
    }

    async fn handle(&mut self, device: &Device, ui: &mut Ui<'_>, event: DeviceEvent) -> Result<(), DeviceError> {
        match event {
            DeviceEvent::Verification(event) => {
                if let (Goal::Flow(None), Event::RequestSent { flow }) = (&self.goal, &event) {
                    self.goal = Goal::Flow(Some(flow.clone()));
                }
                if let Some(v) = output::event_json(None, &event, ui.lang.as_deref()) {
                    ui.line(v);
                }
                self.show(device, ui, &event).await;
            }
            DeviceEvent::Notice(n) => ui.notice(&n),
            DeviceEvent::Connection(Connection::Unreachable { reason, retry_at }) => {
                let secs = retry_at.saturating_sub(now_ms()).div_ceil(1000);
                ui.say(&format!("  (homeserver unreachable, retrying in {secs} s: {})", clean(&reason)));
                ui.line(
                    json!({"event": "connection", "state": "unreachable", "reason": reason, "retry_at_ms": retry_at}),
                );
            }
            DeviceEvent::Connection(_) => {
                ui.say("  (homeserver reachable again)");
                ui.line(json!({"event": "connection", "state": "online"}));
            }
            DeviceEvent::RequestFailed { flow, user_id, reason, timed_out } => {
                ui.say(&format!("✘ {}", clean(&reason)));
                ui.line(json!({"event": "error", "message": reason, "user": user_id,
                               "flow_id": flow.as_ref().map(FlowKey::flow_id)}));
                let concerns_goal = match (&self.goal, &flow) {
                    (Goal::Flow(None), None) => user_id == self.requested_user,
                    (Goal::Flow(Some(g)), Some(f)) => g == f,
                    _ => false,
                };
                if concerns_goal {
                    self.ended = Some(if timed_out { Ending::TimedOut } else { Ending::Cancelled });
                }
            }
            DeviceEvent::LoggedOut(message) => return Err(DeviceError::LoggedOut(message)),
            _ => {}
        }
        Ok(())
    }

    async fn show(&mut self, device: &Device, ui: &mut Ui<'_>, event: &Event) {
        let now = now_ms();
        match event {
            Event::RequestSent { flow } if self.ours(flow) => {
                ui.say(&format!("Request sent ({}); waiting for the other device to accept…", describe(flow)));
            }
            Event::IncomingRequest { flow, from_device, common_methods, deadline, legacy, .. } => {
                let who = clean(&other_user(flow, device));
                let label = self.label(flow);
                let from_device = clean(from_device);
                if common_methods.is_empty() {
                    ui.say(&format!("{label} {who} (device {from_device}) wants to verify, but offers no method this program supports."));
                } else {
                    let kind = if *legacy { "started emoji verification" } else { "wants to verify" };
                    ui.say(&format!(
                        "{label} {who} (device {from_device}) {kind} (closes in {}).",
                        countdown(*deadline, now)
                    ));
                }
                self.ask(ui, flow.clone(), Question::Accept);
            }
            Event::Ready { flow, other_device, methods } if self.ours(flow) => {
                let label = self.label(flow);
                let names: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
                ui.say(&format!("{label} Device {} is ready ({}).", clean(other_device), names.join(", ")));
                let we_requested = device.flow(flow).is_some_and(|f| f.we_requested);
                if !ui.json && we_requested && self.method == "sas" && methods.iter().any(|m| m == "m.sas.v1") {
                    if let Err(e) = device.start_sas(flow).await {
                        ui.say(&format!("Cannot start emoji verification: {}", clean(&e.to_string())));
                    }
                } else if !ui.json && self.method == "qr" {
                    self.ask(ui, flow.clone(), Question::Scan);
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
            Event::QrScanned { flow } => self.ask(ui, flow.clone(), Question::ScanConfirm),
            Event::Sas { flow, emoji, decimals } => {
                let label = self.label(flow);
                let who = clean(&other_user(flow, device));
                let mut text = format!("{label} Compare with {who}'s device:\n");
                if let Some(emoji) = emoji {
                    for (i, e) in emoji.iter().enumerate() {
                        let name = output::emoji_name(e, ui.lang.as_deref());
                        text.push_str(&format!("  {}  {}  {}\n", i + 1, e.symbol, name));
                    }
                }
                if let Some(d) = decimals {
                    text.push_str(&format!("  numbers: {}", output::decimals(d)));
                }
                ui.say(text.trim_end());
                self.ask(ui, flow.clone(), Question::Compare);
            }
            Event::IdentityChanged { user_id, old_master_key, new_master_key } => {
                ui.say(&format!(
                    "⚠ {}'s master key changed (was {old_master_key}, now {}): any verification with them in progress was stopped; verify them again.",
                    clean(user_id),
                    new_master_key.as_ref().map(ToString::to_string).unwrap_or_else(|| "none".into())
                ));
            }
            Event::Done { flow, user_id, device_id, keys } => {
                let what = keys.iter().map(|k| k.key_id.as_str()).collect::<Vec<_>>().join(", ");
                let label = self.label(flow);
                ui.say(&format!("{label} ✔ Verified {} (device {}): {what}", clean(user_id), clean(device_id)));
                self.finish(flow, Ending::Verified);
            }
            Event::Cancelled { flow, info } => {
                self.questions.retain(|(f, _)| f != flow);
                let abandoned = matches!(info.cause, Some(mxverify_proto::LocalCause::Abandoned));
                if self.ignore_abandoned && abandoned {
                    ui.say(&format!("✘ {}", clean(&info.explain())));
                    return;
                }
                let label = self.label(flow);
                ui.say(&format!("{label} ✘ {}", clean(&info.explain())));
                let ending = if info.code == CancelCode::Timeout { Ending::TimedOut } else { Ending::Cancelled };
                self.finish(flow, ending);
                self.prompt(ui);
            }
            _ => {}
        }
    }

    /// Queues a question; only the first is asked, with the flow it is about.
    fn ask(&mut self, ui: &mut Ui<'_>, flow: FlowKey, q: Question) {
        self.questions.retain(|(f, _)| *f != flow);
        self.questions.push_back((flow, q));
        if self.questions.len() == 1 {
            self.prompt(ui);
        } else {
            ui.say("  (another verification also waits for your answer; it comes next)");
        }
    }

    fn prompt(&mut self, ui: &mut Ui<'_>) {
        let Some((flow, q)) = self.questions.front().cloned() else { return };
        let label = self.label(&flow);
        let text = match q {
            Question::Accept => "Accept? [y/n]".to_owned(),
            Question::Compare => "Do they match? [y/n]".to_owned(),
            Question::ScanConfirm => {
                "The other device scanned this code. Does it show that the verification succeeded? [y/n]".to_owned()
            }
            Question::Scan => "Scan the code above with the other device, or type the path of a picture of the other device's code (or its payload in base64) to scan it.".to_owned(),
        };
        ui.say(&format!("{label} {text}"));
    }

    /// The countdown: how long the open question has left.
    fn remind(&mut self, device: &Device, ui: &mut Ui<'_>) {
        let Some((flow, _)) = self.questions.front().cloned() else { return };
        let Some(info) = device.flow(&flow) else { return };
        if info.cancel.is_none() && !info.verified {
            let label = self.label(&flow);
            let deadline = info.deadline.unwrap_or_default();
            ui.say(&format!("  {label} (still waiting for your answer: {} left)", countdown(deadline, now_ms())));
        }
    }

    fn finish(&mut self, flow: &FlowKey, ending: Ending) {
        self.questions.retain(|(f, _)| f != flow);
        match &self.goal {
            Goal::Flow(Some(f)) if f == flow => self.ended = Some(ending),
            Goal::FirstFlow => self.ended = Some(ending),
            _ => {}
        }
    }

    /// One line of input: a JSON command, or (human mode) the answer to the current question.
    async fn command(&mut self, device: &Device, ui: &mut Ui<'_>, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        let result = if ui.json { self.json_command(device, line).await } else { self.answer(device, ui, line).await };
        if let Err(message) = result {
            ui.say(&format!("  {message}"));
            ui.line(json!({"event": "error", "input": line, "message": message}));
        }
    }

    async fn json_command(&mut self, device: &Device, line: &str) -> Result<(), String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not a JSON command: {e}"))?;
        let obj = v.as_object().ok_or("a command needs to be a JSON object")?;
        if let Some(unknown) = obj.keys().find(|k| !matches!(k.as_str(), "command" | "flow_id" | "payload")) {
            return Err(format!("unknown field {unknown:?}"));
        }
        let name = v["command"].as_str().ok_or("a command needs a \"command\" field")?;
        let flow = find_flow(device, obj.get("flow_id").map(|f| f.as_str().ok_or("flow_id is a string")).transpose()?)?;
        let r = match name {
            "accept" => device.accept(&flow).await,
            "start_sas" => device.start_sas(&flow).await,
            "confirm" => device.confirm(&flow).await,
            "mismatch" => device.mismatch(&flow).await,
            "cancel" => device.cancel(&flow).await,
            "scan" => {
                let payload = v["payload"]
                    .as_str()
                    .and_then(mxverify_proto::b64::decode)
                    .ok_or("scan needs \"payload\" (base64)")?;
                device.scan_qr(&flow, &payload).await
            }
            other => return Err(format!("unknown command {other:?}")),
        };
        r.map_err(|e| e.to_string())
    }

    async fn answer(&mut self, device: &Device, ui: &mut Ui<'_>, line: &str) -> Result<(), String> {
        let Some((flow, question)) = self.questions.front().cloned() else {
            return Err("nothing to answer right now".into());
        };
        let yes = matches!(line.to_ascii_lowercase().as_str(), "y" | "yes");
        let no = matches!(line.to_ascii_lowercase().as_str(), "n" | "no");
        let r = match (question, yes, no) {
            (Question::Scan, _, _) => {
                let path = Path::new(line);
                let payload = if path.exists() {
                    qr_image::decode_image(path).map_err(|e| e.to_string())?
                } else {
                    mxverify_proto::b64::decode(line).ok_or("neither a picture nor a base64 payload")?
                };
                device.scan_qr(&flow, &payload).await
            }
            (_, false, false) => return Err("please answer y or n".into()),
            (Question::Accept, true, _) => device.accept(&flow).await,
            (Question::Compare | Question::ScanConfirm, true, _) => device.confirm(&flow).await,
            (Question::Accept, _, true) => device.cancel(&flow).await,
            (Question::Compare | Question::ScanConfirm, _, true) => device.mismatch(&flow).await,
        };
        self.questions.pop_front();
        self.prompt(ui);
        r.map_err(|e| e.to_string())
    }
}

fn find_flow(device: &Device, flow_id: Option<&str>) -> Result<FlowKey, String> {
    let active: Vec<FlowKey> = device
        .active_flows()
        .into_iter()
        .map(|f| f.key)
        .filter(|k| flow_id.is_none_or(|id| k.flow_id() == id))
        .collect();
    match (active.len(), flow_id) {
        (1, _) => Ok(active[0].clone()),
        (0, Some(id)) => Err(format!("no active verification with flow_id {id}")),
        (0, None) => Err("no active verification".into()),
        (_, _) => Err("several verifications are active: give \"flow_id\"".into()),
    }
}

fn other_user(flow: &FlowKey, device: &Device) -> String {
    device.flow(flow).map(|f| f.other_user).unwrap_or_default()
}

fn describe(flow: &FlowKey) -> String {
    match flow {
        FlowKey::ToDevice { user_id, transaction_id } => {
            format!("to-device to {}, transaction {}", clean(user_id), clean(transaction_id))
        }
        FlowKey::Room { room_id, event_id } => format!("in room {}, event {}", clean(room_id), clean(event_id)),
        other => clean(other.flow_id()),
    }
}

fn countdown(deadline: u64, now: u64) -> String {
    let s = deadline.saturating_sub(now) / 1000;
    format!("{}:{:02}", s / 60, s % 60)
}
