//! A real Matrix device around the verification machine: it logs in, publishes signed device
//! keys, keeps cross-signing keys, feeds `/sync` into the machine, sends what the machine asks,
//! fetches and checks keys when the machine needs them, and records and cross-signs what was
//! verified.

use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use mxverify_proto::{
    Config, Destination, Entropy, Event, FlowKey, IncomingEvent, KeyKind, Machine, OwnIdentity, RoomContext,
};
use serde_json::{Value, json};
use vodozemac::Ed25519SecretKey;
use vodozemac::olm::{Account, AccountPickle};

use crate::http::{Homeserver, HttpError};
use crate::keys::{self, UserKeyInfo};
use crate::store::{ActiveFlow, PendingRequest, Store, StoreError, TrustRecord};

/// The wall clock in milliseconds, for the machine.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Randomness from the operating system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        // Without a working OS RNG no key may be made at all; stopping is the only safe answer.
        getrandom::fill(buf).expect("the operating system's random number generator failed");
    }
}

/// What can go wrong with the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Talking to the homeserver failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No session in this state directory.
    #[error("not logged in: run `mxverify login` first (state directory {0})")]
    NotLoggedIn(String),
    /// The stored state cannot be read.
    #[error("the stored state is damaged: {0}")]
    Corrupt(String),
    /// The user has no devices we could verify (unknown user, or no valid device keys).
    #[error("unknown user {0}, or no device of theirs has valid keys")]
    UnknownUser(String),
    /// The device is not one of the user's.
    #[error("{user} has no device {device} with valid keys")]
    UnknownDevice {
        /// The user.
        user: String,
        /// The device.
        device: String,
    },
    /// A user action the machine refused.
    #[error(transparent)]
    Action(#[from] mxverify_proto::ActionError),
    /// Another mxverify process is using this state directory.
    #[error("another mxverify process is using the state directory {0}; one process per device")]
    Busy(String),
}

/// Held while a process drives this device: two processes syncing and answering for one device
/// would race for the same events and the same store.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] std::fs::File);

impl StateLock {
    /// Takes the lock of a state directory, or fails at once if another process holds it.
    pub fn take(dir: &Path) -> Result<StateLock, DeviceError> {
        let io = |source| DeviceError::Store(StoreError::Io { path: dir.to_owned(), source });
        std::fs::create_dir_all(dir).map_err(io)?;
        let file =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock")).map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(StateLock(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(DeviceError::Busy(dir.display().to_string())),
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }
}

/// The three private cross-signing keys.
struct CrossSigning {
    master: Ed25519SecretKey,
    self_signing: Ed25519SecretKey,
    user_signing: Ed25519SecretKey,
}

impl CrossSigning {
    fn to_json(&self) -> Value {
        let b = |k: &Ed25519SecretKey| mxverify_proto::b64::encode(*k.to_bytes());
        json!({"master": b(&self.master), "self_signing": b(&self.self_signing), "user_signing": b(&self.user_signing)})
    }

    fn from_json(v: &Value) -> Option<Self> {
        let k = |name: &str| mxverify_proto::b64::decode32(v[name].as_str()?).map(|b| Ed25519SecretKey::from_slice(&b));
        Some(Self { master: k("master")?, self_signing: k("self_signing")?, user_signing: k("user_signing")? })
    }
}

/// A logged-in device.
pub struct Device {
    /// The homeserver.
    pub hs: Homeserver,
    /// The store.
    pub store: Store,
    /// The verification machine.
    pub machine: Machine,
    account: Account,
    cross: Option<CrossSigning>,
    /// Our user ID.
    pub user_id: String,
    /// Our device ID.
    pub device_id: String,
    txn_prefix: String,
    methods: HashMap<FlowKey, String>,
    known: HashMap<String, UserKeyInfo>,
    /// Notes for the user about side effects (signatures uploaded, problems).
    pub notices: Vec<String>,
    /// Test only: `MXVERIFY_TEST_FAULT` makes this device send one kind of bad message.
    test_fault: Option<String>,
}

/// Test only (`MXVERIFY_TEST_FAULT`, and the demo's attacker): alters an outgoing message so that
/// a peer's answer to a wrong `commitment` (`"commitment"`), a wrong `mac` (`"mac"`) or an unknown
/// start method (`"unknown_method"`) can be seen. Returns whether it changed anything.
pub fn apply_fault(fault: &str, event_type: &str, content: &mut Value) -> bool {
    let bogus = || json!(mxverify_proto::b64::encode([0x42u8; 32]));
    match (fault, event_type) {
        ("commitment", "m.key.verification.accept") => content["commitment"] = bogus(),
        ("mac", "m.key.verification.mac") => match content["mac"].as_object_mut() {
            Some(mac) => mac.values_mut().for_each(|v| *v = bogus()),
            None => return false,
        },
        ("unknown_method", "m.key.verification.start") => content["method"] = json!("org.example.unknown.v1"),
        _ => return false,
    }
    true
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    OsEntropy.fill(&mut k);
    k
}

/// Sync filter: only what verification needs (to-device messages, verification and message
/// events in room timelines, memberships to see invites).
pub fn sync_filter() -> Value {
    json!({
        "presence": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
        "room": {
            "timeline": {"limit": 50, "types": ["m.room.message", "m.key.verification.*"]},
            "state": {"types": ["m.room.member"]},
            "ephemeral": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]}
        }
    })
}

impl Device {
    /// Logs in with a password and sets the device up: a fresh (or, for the same device, the
    /// stored) identity key pair, signed device keys uploaded, a sync filter.
    pub async fn login(
        dir: &Path,
        homeserver: &str,
        user: &str,
        password: &str,
        device_id: Option<&str>,
        config: Config,
    ) -> Result<Device, DeviceError> {
        let store = Store::open(dir)?;
        // A wrong URL should fail fast; later calls get the patient default policy.
        let probe = Homeserver::new(homeserver, None).with_retry(crate::http::Retry {
            attempts: 3,
            initial: std::time::Duration::from_millis(200),
            max: std::time::Duration::from_secs(1),
        });
        probe.versions().await?;
        let mut hs = Homeserver::new(homeserver, None);
        let (user_id, device_id, token) = hs.login(user, password, device_id).await?;
        hs.set_token(token.clone());
        let same_device = store.get("user_id")?.as_deref() == Some(&user_id)
            && store.get("device_id")?.as_deref() == Some(&device_id);
        if !same_device {
            // A new device: a new identity, and nothing of the previous one's sync position.
            for k in ["account", "pickle_key", "since", "filter_id", "keys_uploaded"] {
                store.delete(k)?;
            }
        }
        store.set("homeserver", homeserver)?;
        store.set("user_id", &user_id)?;
        store.set("device_id", &device_id)?;
        store.set("access_token", &token)?;
        drop(store);
        let mut device = Device::open(dir, config)?;
        device.upload_device_keys().await?;
        let filter = device.hs.create_filter(&device.user_id, &sync_filter()).await?;
        device.store.set("filter_id", &filter)?;
        Ok(device)
    }

    /// Opens the stored session (no network).
    pub fn open(dir: &Path, config: Config) -> Result<Device, DeviceError> {
        let store = Store::open(dir)?;
        let need = |k: &str| -> Result<String, DeviceError> {
            store.get(k)?.ok_or_else(|| DeviceError::NotLoggedIn(dir.display().to_string()))
        };
        let (homeserver, user_id, device_id, token) =
            (need("homeserver")?, need("user_id")?, need("device_id")?, need("access_token")?);
        let pickle_key = match store.get("pickle_key")?.and_then(|k| mxverify_proto::b64::decode32(&k)) {
            Some(k) => k,
            None => {
                let k = random_key();
                store.set("pickle_key", &mxverify_proto::b64::encode(k))?;
                k
            }
        };
        let account = match store.get("account")? {
            Some(p) => Account::from_pickle(
                AccountPickle::from_encrypted(&p, &pickle_key)
                    .map_err(|e| DeviceError::Corrupt(format!("device keys: {e}")))?,
            ),
            None => {
                let a = Account::new();
                store.set("account", &a.pickle().encrypt(&pickle_key))?;
                a
            }
        };
        let cross = match store.get("cross_signing")? {
            Some(j) => Some(
                serde_json::from_str(&j)
                    .ok()
                    .and_then(|v| CrossSigning::from_json(&v))
                    .ok_or_else(|| DeviceError::Corrupt("cross-signing keys".into()))?,
            ),
            None => None,
        };
        let own = OwnIdentity {
            user_id: user_id.clone(),
            device_id: device_id.clone(),
            ed25519: account.ed25519_key().to_base64(),
            master_key: cross.as_ref().map(|c| c.master.public_key().to_base64()),
            trusts_master_key: cross.is_some(),
        };
        let machine = Machine::new(own, config, Box::new(OsEntropy));
        let prefix: [u8; 6] = {
            let mut b = [0u8; 6];
            OsEntropy.fill(&mut b);
            b
        };
        Ok(Device {
            hs: Homeserver::new(&homeserver, Some(token)),
            store,
            machine,
            account,
            cross,
            user_id,
            device_id,
            txn_prefix: prefix.iter().map(|b| format!("{b:02x}")).collect(),
            methods: HashMap::new(),
            known: HashMap::new(),
            notices: Vec::new(),
            test_fault: std::env::var("MXVERIFY_TEST_FAULT").ok().filter(|f| !f.is_empty()),
        })
    }

    /// Our Ed25519 device key.
    pub fn ed25519(&self) -> String {
        self.account.ed25519_key().to_base64()
    }

    /// Our master key, if cross-signing is set up here.
    pub fn master_key(&self) -> Option<String> {
        self.cross.as_ref().map(|c| c.master.public_key().to_base64())
    }

    /// The signed device keys object we publish.
    fn device_keys_json(&self) -> Value {
        let (u, d) = (&self.user_id, &self.device_id);
        let mut obj = json!({
            "user_id": u,
            "device_id": d,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{d}"): self.account.curve25519_key().to_base64(),
                format!("ed25519:{d}"): self.ed25519(),
            },
        });
        let sig = self.account.sign(keys::signable(&obj).expect("canonical").as_bytes());
        keys::add_signature(&mut obj, u, &format!("ed25519:{d}"), &sig);
        obj
    }

    /// `/keys/upload` of our signed device keys, once per device.
    pub async fn upload_device_keys(&mut self) -> Result<(), DeviceError> {
        if self.store.get("keys_uploaded")?.as_deref() == Some(&self.device_id) {
            return Ok(());
        }
        self.hs.keys_upload(&json!({ "device_keys": self.device_keys_json() })).await?;
        self.store.set("keys_uploaded", &self.device_id)?;
        Ok(())
    }

    /// Creates master, self-signing and user-signing keys, uploads them (with password
    /// user-interactive auth if the server asks) and signs this device with the self-signing key.
    /// Refuses to replace existing keys unless `replace`.
    pub async fn bootstrap_cross_signing(
        &mut self,
        password: Option<&str>,
        replace: bool,
    ) -> Result<String, DeviceError> {
        let me = self.user_id.clone();
        self.query_keys(std::slice::from_ref(&me)).await?;
        let published = self.known.get(&self.user_id).and_then(|k| k.master_key.clone());
        if let (Some(msk), false) = (&published, replace) {
            if self.master_key().as_ref() == Some(msk) {
                return Ok(msk.clone());
            }
            return Err(DeviceError::Corrupt(format!(
                "this account already has a master key ({msk}) that this device does not hold; pass --replace to make new ones"
            )));
        }
        let cross = CrossSigning {
            master: Ed25519SecretKey::new(),
            self_signing: Ed25519SecretKey::new(),
            user_signing: Ed25519SecretKey::new(),
        };
        let u = self.user_id.clone();
        let public = |k: &Ed25519SecretKey| k.public_key().to_base64();
        let key_obj = |k: &Ed25519SecretKey, usage: &str| json!({"user_id": u, "usage": [usage], "keys": {format!("ed25519:{}", public(k)): public(k)}});
        let mut master = key_obj(&cross.master, "master");
        let sig = self.account.sign(keys::signable(&master).expect("canonical").as_bytes());
        keys::add_signature(&mut master, &u, &format!("ed25519:{}", self.device_id), &sig);
        let mut ssk = key_obj(&cross.self_signing, "self_signing");
        keys::sign_with(&mut ssk, &u, &public(&cross.master), &cross.master);
        let mut usk = key_obj(&cross.user_signing, "user_signing");
        keys::sign_with(&mut usk, &u, &public(&cross.master), &cross.master);
        let body = json!({"master_key": master, "self_signing_key": ssk, "user_signing_key": usk});
        self.hs.upload_cross_signing(&body, &u, password).await?;
        self.store.set("cross_signing", &cross.to_json().to_string())?;
        let msk = public(&cross.master);
        self.cross = Some(cross);
        // Our own device, signed by our self-signing key.
        let mut dev = self.device_keys_json();
        let signer = self.cross.as_ref().expect("just set");
        keys::sign_with(&mut dev, &u, &public(&signer.self_signing), &signer.self_signing);
        self.hs.upload_signatures(&json!({ u.clone(): { self.device_id.clone(): dev } })).await?;
        self.refresh_own_identity();
        let me = self.user_id.clone();
        self.query_keys(std::slice::from_ref(&me)).await?;
        Ok(msk)
    }

    /// What we know of a user's keys (after [`Device::query_keys`]).
    pub fn known(&self, user: &str) -> Option<&UserKeyInfo> {
        self.known.get(user)
    }

    /// `/keys/query` with every signature checked; the result goes to the store and the machine.
    pub async fn query_keys(&mut self, users: &[String]) -> Result<(), DeviceError> {
        let refs: Vec<&str> = users.iter().map(String::as_str).collect();
        let resp = self.hs.keys_query(&refs).await?;
        let now = now_ms();
        for user in users {
            let info = keys::check_user(&resp, user);
            for r in &info.rejected {
                self.notices.push(format!("ignored a key of {user}: {r}"));
            }
            self.store.save_user_keys(user, &info)?;
            self.machine.update_user_keys(user, info.for_machine(), now);
            self.known.insert(user.clone(), info);
        }
        if users.contains(&self.user_id) {
            self.refresh_own_identity();
        }
        Ok(())
    }

    /// Our identity for the machine: the published master key, trusted if we hold its private
    /// key or verified it.
    fn refresh_own_identity(&mut self) {
        let published = self.known.get(&self.user_id).and_then(|k| k.master_key.clone());
        let master_key = published.or_else(|| self.master_key());
        let trusts = match &master_key {
            Some(k) => {
                self.master_key().as_ref() == Some(k) || self.store.is_trusted(&self.user_id, k).unwrap_or(false)
            }
            None => false,
        };
        self.machine.set_own_identity(OwnIdentity {
            user_id: self.user_id.clone(),
            device_id: self.device_id.clone(),
            ed25519: self.ed25519(),
            master_key,
            trusts_master_key: trusts,
        });
    }

    /// The devices of `user` we could verify (other than this one).
    pub async fn devices_of(&mut self, user: &str) -> Result<Vec<String>, DeviceError> {
        self.query_keys(&[user.to_owned()]).await?;
        let devices: Vec<String> = self
            .known
            .get(user)
            .map(|k| k.devices.keys().filter(|d| !(user == self.user_id && **d == self.device_id)).cloned().collect())
            .unwrap_or_default();
        if devices.is_empty() {
            return Err(DeviceError::UnknownUser(user.to_owned()));
        }
        Ok(devices)
    }

    /// The sync filter id (created once).
    pub async fn filter_id(&mut self) -> Result<String, DeviceError> {
        if let Some(f) = self.store.get("filter_id")? {
            return Ok(f);
        }
        let f = self.hs.create_filter(&self.user_id, &sync_filter()).await?;
        self.store.set("filter_id", &f)?;
        Ok(f)
    }

    /// Sends everything the machine wants sent; an in-room request learns its event ID.
    pub async fn send_outgoing(&mut self) -> Result<(), DeviceError> {
        while let Some(mut out) = self.machine.poll_outgoing() {
            if let Some(fault) = &self.test_fault {
                apply_fault(fault, out.event_type, &mut out.content);
            }
            // The same outgoing id always gives the same transaction id, so a retried request is
            // delivered once.
            let txn = format!("mxv{}-{}", self.txn_prefix, out.id);
            match &out.destination {
                Destination::ToDevice { user_id, device_ids } => {
                    let per_device: serde_json::Map<String, Value> =
                        device_ids.iter().map(|d| (d.clone(), out.content.clone())).collect();
                    self.hs.send_to_device(out.event_type, &txn, &json!({ user_id.clone(): per_device })).await?;
                }
                Destination::Room { room_id } => {
                    let event_id = self.hs.room_send(room_id, out.event_type, &txn, &out.content).await?;
                    if out.flow.is_none() && out.event_type == "m.room.message" {
                        self.machine.room_event_sent(out.id, &event_id, now_ms())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends, then takes the machine's events, doing what they ask of the device (keys, trust
    /// records, cross-signing, remembering waiting requests) until the machine is quiet.
    pub async fn pump(&mut self) -> Result<Vec<Event>, DeviceError> {
        let mut out = Vec::new();
        loop {
            self.send_outgoing().await?;
            let Some(event) = self.machine.poll_event() else { break };
            self.side_effects(&event).await?;
            out.push(event);
        }
        Ok(out)
    }

    async fn side_effects(&mut self, event: &Event) -> Result<(), DeviceError> {
        match event {
            Event::KeysNeeded { user_id } => self.query_keys(std::slice::from_ref(user_id)).await?,
            Event::Started { flow, method, .. } => {
                self.methods.insert(flow.clone(), method.clone());
                self.store.remove_pending(flow.flow_id())?;
            }
            Event::Ready { flow, other_device, .. } => {
                self.store.remove_pending(flow.flow_id())?;
                let other_user = self.machine.flow(flow).map(|f| f.other_user).unwrap_or_default();
                self.store.add_active(&ActiveFlow {
                    flow_id: flow.flow_id().to_owned(),
                    room_id: match flow {
                        FlowKey::Room { room_id, .. } => Some(room_id.clone()),
                        FlowKey::ToDevice { .. } => None,
                    },
                    other_user,
                    other_device: Some(other_device.clone()),
                })?;
            }
            Event::Cancelled { flow, .. } => {
                self.store.remove_pending(flow.flow_id())?;
                self.store.remove_active(flow.flow_id())?;
            }
            Event::Done { flow, user_id, device_id, keys } => {
                self.store.remove_pending(flow.flow_id())?;
                self.store.remove_active(flow.flow_id())?;
                let method = self.methods.get(flow).cloned().unwrap_or_else(|| "m.sas.v1".into());
                for k in keys {
                    self.store.add_trust(&TrustRecord {
                        user_id: user_id.clone(),
                        key_id: k.key_id.clone(),
                        key: k.key.clone(),
                        kind: match k.kind {
                            KeyKind::Device => "device".into(),
                            KeyKind::MasterKey => "master_key".into(),
                        },
                        device_id: device_id.clone(),
                        method: method.clone(),
                        flow_id: flow.flow_id().to_owned(),
                        verified_at: now_ms(),
                    })?;
                }
                self.cross_sign_verified(user_id, keys).await?;
                if *user_id == self.user_id {
                    self.refresh_own_identity();
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// TR-05: sign what was verified so that every client sees it — another device of ours with
    /// our self-signing key, another user's master key with our user-signing key.
    async fn cross_sign_verified(
        &mut self,
        user: &str,
        verified: &[mxverify_proto::VerifiedKey],
    ) -> Result<(), DeviceError> {
        let Some(cross) = &self.cross else {
            self.notices.push("cross-signing is not set up on this device, so the verification was not signed (run `mxverify cross-signing bootstrap`)".into());
            return Ok(());
        };
        let mut body = serde_json::Map::new();
        for k in verified {
            match (user == self.user_id, &k.kind) {
                (true, KeyKind::Device) => {
                    let device = k.key_id.trim_start_matches("ed25519:");
                    let Some(info) = self.known.get(user).and_then(|i| i.devices.get(device)) else { continue };
                    if info.ed25519 != k.key {
                        continue;
                    }
                    let mut obj = info.json.clone();
                    let ssk = cross.self_signing.public_key().to_base64();
                    obj.as_object_mut().expect("object").remove("signatures");
                    keys::sign_with(&mut obj, user, &ssk, &cross.self_signing);
                    body.entry(user.to_owned()).or_insert_with(|| json!({}))[device] = obj;
                }
                (false, KeyKind::MasterKey) => {
                    let Some(mut obj) = self.known.get(user).and_then(|i| i.master_json.clone()) else { continue };
                    if self.known.get(user).and_then(|i| i.master_key.as_deref()) != Some(k.key.as_str()) {
                        continue;
                    }
                    obj.as_object_mut().expect("object").remove("signatures");
                    let usk = cross.user_signing.public_key().to_base64();
                    keys::sign_with(&mut obj, &self.user_id, &usk, &cross.user_signing);
                    body.entry(user.to_owned()).or_insert_with(|| json!({}))[&k.key] = obj;
                }
                _ => {}
            }
        }
        if !body.is_empty() {
            self.hs.upload_signatures(&Value::Object(body)).await?;
            self.notices.push(format!("uploaded cross-signing signatures for {user}"));
        }
        Ok(())
    }

    /// Feeds one `/sync` answer to the machine: to-device events, then room timelines; joins
    /// rooms we are invited to; refreshes keys of users whose devices changed. Requests that
    /// now wait for an answer are remembered in the store.
    pub async fn handle_sync(&mut self, resp: &Value) -> Result<Vec<Event>, DeviceError> {
        let now = now_ms();
        let mut events = Vec::new();
        if let Some(changed) = resp.pointer("/device_lists/changed").and_then(Value::as_array) {
            let users: Vec<String> = changed
                .iter()
                .filter_map(Value::as_str)
                .filter(|u| self.known.contains_key(*u))
                .map(str::to_owned)
                .collect();
            if !users.is_empty() {
                self.query_keys(&users).await?;
            }
        }
        for ev in resp.pointer("/to_device/events").and_then(Value::as_array).into_iter().flatten() {
            let (Some(sender), Some(ty)) = (ev["sender"].as_str(), ev["type"].as_str()) else { continue };
            let incoming = IncomingEvent {
                sender: sender.into(),
                event_type: ty.into(),
                content: ev["content"].clone(),
                room: None,
            };
            self.feed(incoming, now, &mut events).await?;
        }
        if let Some(rooms) = resp.pointer("/rooms/join").and_then(Value::as_object) {
            for (room_id, room) in rooms {
                for ev in room.pointer("/timeline/events").and_then(Value::as_array).into_iter().flatten() {
                    let (Some(sender), Some(ty), Some(event_id)) =
                        (ev["sender"].as_str(), ev["type"].as_str(), ev["event_id"].as_str())
                    else {
                        continue;
                    };
                    let room = RoomContext {
                        room_id: room_id.clone(),
                        event_id: event_id.into(),
                        origin_server_ts: ev["origin_server_ts"].as_u64().unwrap_or(0),
                        relates_to_fallback: None,
                    };
                    let incoming = IncomingEvent {
                        sender: sender.into(),
                        event_type: ty.into(),
                        content: ev["content"].clone(),
                        room: Some(room),
                    };
                    self.feed(incoming, now, &mut events).await?;
                }
            }
        }
        if let Some(invites) = resp.pointer("/rooms/invite").and_then(Value::as_object) {
            for room_id in invites.keys() {
                self.hs.join(room_id).await?;
                self.notices.push(format!("joined {room_id}"));
            }
        }
        Ok(events)
    }

    async fn feed(&mut self, incoming: IncomingEvent, now: u64, events: &mut Vec<Event>) -> Result<(), DeviceError> {
        let raw = json!({"sender": incoming.sender, "type": incoming.event_type, "content": incoming.content,
            "room": incoming.room.as_ref().map(|r| json!({"room_id": r.room_id, "event_id": r.event_id, "origin_server_ts": r.origin_server_ts}))});
        self.machine.receive(incoming, now);
        for e in self.pump().await? {
            if let Event::IncomingRequest { flow, .. } = &e {
                self.store.add_pending(&PendingRequest {
                    flow_id: flow.flow_id().to_owned(),
                    event: raw.to_string(),
                    received_at: now,
                })?;
            }
            events.push(e);
        }
        Ok(())
    }

    /// Flows that were in progress when the program stopped cannot go on (their keys were in
    /// memory): tell the other side, rather than leaving it to wait for its timeout.
    pub async fn abandon_lost_flows(&mut self) -> Result<Vec<Event>, DeviceError> {
        let now = now_ms();
        for f in self.store.active()? {
            let key = match &f.room_id {
                Some(room_id) => FlowKey::Room { room_id: room_id.clone(), event_id: f.flow_id.clone() },
                None => FlowKey::ToDevice { user_id: f.other_user.clone(), transaction_id: f.flow_id.clone() },
            };
            self.machine.abandon(key, &f.other_user, f.other_device.clone(), now);
            self.store.remove_active(&f.flow_id)?;
        }
        self.pump().await
    }

    /// Replays requests that were waiting when the program stopped, as received then; those past
    /// their deadline come back as expired (cancelled with `m.timeout`, nothing sent).
    pub async fn restore_pending(&mut self) -> Result<Vec<Event>, DeviceError> {
        let mut events = Vec::new();
        for p in self.store.pending()? {
            let Ok(v) = serde_json::from_str::<Value>(&p.event) else {
                self.store.remove_pending(&p.flow_id)?;
                continue;
            };
            let room = v["room"].as_object().map(|r| RoomContext {
                room_id: r["room_id"].as_str().unwrap_or_default().into(),
                event_id: r["event_id"].as_str().unwrap_or_default().into(),
                origin_server_ts: r["origin_server_ts"].as_u64().unwrap_or(0),
                relates_to_fallback: None,
            });
            let incoming = IncomingEvent {
                sender: v["sender"].as_str().unwrap_or_default().into(),
                event_type: v["type"].as_str().unwrap_or_default().into(),
                content: v["content"].clone(),
                room,
            };
            self.machine.receive(incoming, p.received_at);
            events.extend(self.pump().await?);
        }
        self.machine.handle_timeout(now_ms());
        events.extend(self.pump().await?);
        Ok(events)
    }

    /// Finds a direct-message room shared with `user`, or creates one (unencrypted, so the
    /// verification events are readable without Olm).
    pub async fn dm_room(&mut self, user: &str) -> Result<String, DeviceError> {
        if let Some(room) = self.store.get(&format!("dm:{user}"))? {
            return Ok(room);
        }
        let room = self.hs.create_dm(user).await?;
        self.store.set(&format!("dm:{user}"), &room)?;
        Ok(room)
    }
}
