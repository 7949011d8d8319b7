//! A real Matrix device around the verification machine: it logs in, publishes signed device
//! keys, keeps cross-signing keys, feeds `/sync` into the machine, sends what the machine asks,
//! fetches and checks keys when the machine needs them, and records and cross-signs what was
//! verified.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use mxverify_proto::{
    Config, Destination, Entropy, Event, FlowKey, IncomingEvent, KeyKind, Machine, OwnIdentity, RoomContext,
};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::cross_signing::{self, CrossSigningKeys, MASTER, SECRET_NAMES, SELF_SIGNING, USER_SIGNING};
use crate::http::{Homeserver, HttpError};
use crate::keys::{self, DeviceKeys, UserKeyInfo};
use crate::megolm::{self, MegolmError, OlmSender, Outbound, RoomEncryption, RoomKeyOutcome};
use crate::olm::{MEGOLM_ALGORITHM, Olm, OlmError, OlmPlaintext, SIGNED_CURVE25519};
use crate::secret_storage::{self, KeyDescription, SecretStorageKey};
use crate::secrets::{self, Asker, OpenRequest, RequestAction};
use crate::store::{ActiveFlow, HeldRoomEvent, HeldSelection, PendingRequest, Store, StoreError, TrustRecord};

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
    /// End-to-end encryption failed for something we send.
    #[error("encryption: {0}")]
    Encryption(String),
    /// Secret storage refused: no storage, a wrong recovery key, a secret that does not match.
    #[error("{0}")]
    Secrets(String),
}

/// What `cross-signing bootstrap` did.
#[derive(Debug)]
pub struct Bootstrap {
    /// The master key.
    pub master_key: String,
    /// Whether new keys were made (otherwise the ones this device held were kept).
    pub created: bool,
    /// `created`, `replaced`, `existing` (left alone) or `incomplete` (this device lacks a key).
    pub secret_storage: &'static str,
    /// The recovery key of new secret storage: shown once, never stored by us.
    pub recovery_key: Option<Zeroizing<String>>,
}

impl From<OlmError> for DeviceError {
    fn from(e: OlmError) -> Self {
        Self::Encryption(e.to_string())
    }
}

impl From<MegolmError> for DeviceError {
    fn from(e: MegolmError) -> Self {
        Self::Encryption(e.to_string())
    }
}

/// Something the device did or refused on its own, for the person or program watching: rooms
/// joined, signatures uploaded, encrypted events held or dropped and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Notice {
    /// What kind of thing happened (a stable, short name: `joined`, `dm_created`,
    /// `waiting_for_join`, `signatures`, `held`, `dropped`, `keys`, `rotated`, `no_olm_session`, ...).
    pub kind: &'static str,
    /// One sentence for a person.
    pub message: String,
    /// The room concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
}

impl Notice {
    fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), room: None }
    }

    fn in_room(kind: &'static str, room: &str, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), room: Some(room.to_owned()) }
    }
}

/// How long an encrypted room event waits for its room key: as long as a flow may take.
const HOLD_FOR_ROOM_KEY_MS: u64 = 10 * 60 * 1000;
/// Events held for room keys, per sender: one sender cannot crowd out everyone else's.
const HELD_PER_SENDER: usize = 32;
/// Events held for room keys in all: the store stays small whatever the rooms bring.
const HELD_IN_ALL: u64 = 1024;
/// How soon a broken Olm session with one device may be replaced again (the spec's hour).
const UNWEDGE_INTERVAL_MS: u64 = 60 * 60 * 1000;
/// How long a command stays after a verification with our own device, for secret sharing.
const SECRET_LINGER_MS: u64 = 15_000;
/// How long it stays after it last sent a secret (the other device asks for them together).
const SECRET_QUIET_MS: u64 = 2_000;

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

/// A logged-in device.
pub struct Device {
    /// The homeserver.
    pub hs: Homeserver,
    /// The store.
    pub store: Store,
    /// The verification machine.
    pub machine: Machine,
    olm: Olm,
    cross: CrossSigningKeys,
    /// Our user ID.
    pub user_id: String,
    /// Our device ID.
    pub device_id: String,
    txn_prefix: String,
    methods: HashMap<FlowKey, String>,
    known: HashMap<String, UserKeyInfo>,
    /// Notes for the user about side effects (signatures uploaded, problems).
    pub notices: Vec<Notice>,
    /// Rooms whose encryption state we know: `None` = not encrypted.
    room_encryption: HashMap<String, Option<RoomEncryption>>,
    /// Joined members of encrypted rooms we send in, until a membership change is seen.
    room_members: HashMap<String, Vec<String>>,
    /// Our requests for cross-signing keys that are not answered yet.
    open_secret_requests: Vec<OpenRequest>,
    /// After a verification with one of our own devices, secrets may be asked of us or sent to
    /// us for a little while: a command that would end stays until then.
    secret_linger_until: Option<u64>,
    /// Send to-device verification messages Olm-encrypted (off by default, as other SDKs do).
    encrypt_to_device: bool,
    next_txn: u64,
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

fn random_iv() -> [u8; 16] {
    let mut iv = [0u8; 16];
    OsEntropy.fill(&mut iv);
    iv
}

/// Sync filter: only what verification needs (to-device messages; verification, message and
/// encrypted events in room timelines; memberships, to see invites, joins and leaves; and each
/// room's encryption settings).
pub fn sync_filter() -> Value {
    json!({
        "presence": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
        "room": {
            "timeline": {"limit": 50, "types": ["m.room.message", "m.key.verification.*", "m.room.encrypted",
                                                 "m.room.member", "m.room.encryption"]},
            "state": {"types": ["m.room.member", "m.room.encryption"]},
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
            for k in ["account", "pickle_key", "since", "filter_id", "filter", "keys_uploaded"] {
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
        device.filter_id().await?;
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
        let mut store = store;
        let olm =
            Olm::load(&mut store, &user_id, &device_id, pickle_key).map_err(|e| DeviceError::Corrupt(e.to_string()))?;
        let cross = match store.get("cross_signing")? {
            Some(j) => CrossSigningKeys::from_json(&Zeroizing::new(j))
                .ok_or_else(|| DeviceError::Corrupt("cross-signing keys".into()))?,
            None => CrossSigningKeys::default(),
        };
        let open_secret_requests = store
            .get("secret_requests")?
            .and_then(|j| serde_json::from_str::<Vec<OpenRequest>>(&j).ok())
            .unwrap_or_default();
        let own = OwnIdentity {
            user_id: user_id.clone(),
            device_id: device_id.clone(),
            ed25519: olm.ed25519(),
            master_key: cross.public(MASTER),
            trusts_master_key: cross.get(MASTER).is_some(),
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
            olm,
            cross,
            user_id,
            device_id,
            txn_prefix: prefix.iter().map(|b| format!("{b:02x}")).collect(),
            methods: HashMap::new(),
            known: HashMap::new(),
            notices: Vec::new(),
            room_encryption: HashMap::new(),
            room_members: HashMap::new(),
            open_secret_requests,
            secret_linger_until: None,
            encrypt_to_device: false,
            next_txn: 0,
            test_fault: std::env::var("MXVERIFY_TEST_FAULT").ok().filter(|f| !f.is_empty()),
        })
    }

    /// Whether to-device verification messages we send are Olm-encrypted (default: no, as
    /// matrix-js-sdk and matrix-rust-sdk send them; encrypted ones are always understood).
    pub fn set_encrypt_to_device(&mut self, on: bool) {
        self.encrypt_to_device = on;
    }

    /// Our Curve25519 identity key.
    pub fn curve25519(&self) -> String {
        self.olm.curve25519()
    }

    /// Our Ed25519 device key.
    pub fn ed25519(&self) -> String {
        self.olm.ed25519()
    }

    /// Our master key, if this device holds its private part.
    pub fn master_key(&self) -> Option<String> {
        self.cross.public(MASTER)
    }

    /// The secret names of the cross-signing private keys this device holds.
    pub fn cross_signing_keys_held(&self) -> Vec<&'static str> {
        SECRET_NAMES.into_iter().filter(|n| self.cross.get(n).is_some()).collect()
    }

    /// The signed device keys object we publish.
    fn device_keys_json(&self) -> Value {
        self.olm.device_keys()
    }

    /// `/keys/upload` of our signed device keys (once per device) with a first supply of signed
    /// one-time keys and a fallback key.
    pub async fn upload_device_keys(&mut self) -> Result<(), DeviceError> {
        if self.store.get("keys_uploaded")?.as_deref() == Some(&self.device_id) {
            return Ok(());
        }
        let mut body = self.olm.keys_to_upload(&mut self.store, 0, Some(false))?.unwrap_or_else(|| json!({}));
        body["device_keys"] = self.device_keys_json();
        self.hs.keys_upload(&body).await?;
        self.olm.mark_keys_published(&mut self.store)?;
        self.store.set("keys_uploaded", &self.device_id)?;
        Ok(())
    }

    /// Tops up the one-time keys the server holds for us, and replaces a fallback key that was
    /// used ([one-time and fallback keys](https://spec.matrix.org/v1.19/client-server-api/#one-time-and-fallback-keys)).
    pub async fn top_up_keys(&mut self, server_count: u64, fallback_unused: Option<bool>) -> Result<(), DeviceError> {
        let Some(body) = self.olm.keys_to_upload(&mut self.store, server_count, fallback_unused)? else {
            return Ok(());
        };
        self.hs.keys_upload(&body).await?;
        self.olm.mark_keys_published(&mut self.store)?;
        Ok(())
    }

    /// Creates master, self-signing and user-signing keys, uploads them (with password
    /// user-interactive auth if the server asks) and signs this device with the self-signing key;
    /// then keeps them in new secret storage and returns its recovery key, shown once. Keys that
    /// this device already holds and published are kept. Refuses to replace published keys it does
    /// not hold, and leaves existing secret storage alone, unless `replace`.
    pub async fn bootstrap_cross_signing(
        &mut self,
        password: Option<&str>,
        replace: bool,
    ) -> Result<Bootstrap, DeviceError> {
        let me = self.user_id.clone();
        self.query_keys(std::slice::from_ref(&me)).await?;
        let published = self.known.get(&self.user_id).and_then(|k| k.master_key.clone());
        // Keys made by a bootstrap that stopped after the upload: the server has them, so do we.
        if let Some(pending) =
            self.store.get("cross_signing_pending")?.and_then(|j| CrossSigningKeys::from_json(&Zeroizing::new(j)))
        {
            if published.is_some() && pending.public(MASTER) == published {
                self.store.set("cross_signing", &pending.to_json())?;
                self.cross = pending;
            }
            self.store.delete("cross_signing_pending")?;
        }
        let created = match (&published, replace) {
            (Some(msk), false) => {
                if self.master_key().as_ref() != Some(msk) {
                    return Err(DeviceError::Corrupt(format!(
                        "this account already has a master key ({msk}) that this device does not hold; restore it with `mxverify cross-signing recover`, verify with a device that has it, or pass --replace to make new ones"
                    )));
                }
                false
            }
            _ => {
                let cross = CrossSigningKeys::generate();
                let mut body = cross.upload_body(&self.user_id).expect("three new keys");
                let master_sig = self.olm.sign(keys::signable(&body["master_key"]).expect("our own object").as_bytes());
                keys::add_signature(&mut body["master_key"], &me, &format!("ed25519:{}", self.device_id), &master_sig);
                // Saved before the upload, adopted after it: no published key is ever lost.
                self.store.set("cross_signing_pending", &cross.to_json())?;
                self.hs.upload_cross_signing(&body, &me, password).await?;
                self.store.set("cross_signing", &cross.to_json())?;
                self.store.delete("cross_signing_pending")?;
                self.cross = cross;
                self.sign_own_device().await?;
                true
            }
        };
        let master_key = self.master_key().expect("held");
        let default = self.hs.account_data(&me, secret_storage::DEFAULT_KEY_EVENT_TYPE).await?;
        let (secret_storage, recovery_key) = if default.as_ref().is_some_and(|d| d["key"].is_string()) && !replace {
            ("existing", None)
        } else if !self.cross.is_complete() {
            ("incomplete", None)
        } else {
            let key = self.create_secret_storage().await?;
            (if default.is_some() { "replaced" } else { "created" }, Some(key.to_recovery_key()))
        };
        self.refresh_own_identity();
        self.query_keys(std::slice::from_ref(&me)).await?;
        Ok(Bootstrap { master_key, created, secret_storage, recovery_key })
    }

    /// Signs this device with our self-signing key and uploads the signature.
    async fn sign_own_device(&mut self) -> Result<(), DeviceError> {
        let Some(ssk) = self.cross.get(SELF_SIGNING) else { return Ok(()) };
        let mut dev = self.device_keys_json();
        let ssk_pub = ssk.public_key().to_base64();
        keys::sign_with(&mut dev, &self.user_id, &ssk_pub, ssk).map_err(DeviceError::Corrupt)?;
        self.hs.upload_signatures(&json!({ self.user_id.clone(): { self.device_id.clone(): dev } })).await?;
        Ok(())
    }

    /// New default secret storage holding the three private keys
    /// ([secret storage](https://spec.matrix.org/v1.19/client-server-api/#secret-storage)): the key's
    /// description, each secret, and last the default-key pointer, so that a run that stops
    /// half-way leaves no default key without its secrets.
    async fn create_secret_storage(&mut self) -> Result<SecretStorageKey, DeviceError> {
        let key = SecretStorageKey::from_bytes(random_key());
        let key_id: String = {
            const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            let mut raw = [0u8; 32];
            OsEntropy.fill(&mut raw);
            raw.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
        };
        let description = KeyDescription::new(&key, random_iv(), None, None);
        let me = self.user_id.clone();
        self.hs.set_account_data(&me, &secret_storage::key_event_type(&key_id), &json!(description)).await?;
        for name in SECRET_NAMES {
            let secret = self.cross.secret(name).expect("all three held");
            let encrypted = secret_storage::encrypt_secret(&key, name, &secret, random_iv());
            self.hs.set_account_data(&me, name, &encrypted.into_content(&key_id)).await?;
        }
        self.hs.set_account_data(&me, secret_storage::DEFAULT_KEY_EVENT_TYPE, &json!({"key": key_id})).await?;
        Ok(key)
    }

    /// Restores the three private keys from the account's default secret storage with a recovery
    /// key (or the passphrase it was made from), checks each against the published public key,
    /// stores them and signs this device ([secret storage](https://spec.matrix.org/v1.19/client-server-api/#secret-storage)).
    /// Nothing is stored unless every check passes.
    pub async fn recover_cross_signing(
        &mut self,
        recovery_key: Option<&str>,
        passphrase: Option<&str>,
    ) -> Result<String, DeviceError> {
        let me = self.user_id.clone();
        let refused = |m: String| DeviceError::Secrets(m);
        let default = self.hs.account_data(&me, secret_storage::DEFAULT_KEY_EVENT_TYPE).await?;
        let key_id = default
            .as_ref()
            .and_then(|d| d["key"].as_str())
            .ok_or_else(|| refused("this account has no secret storage (no default secret-storage key)".into()))?
            .to_owned();
        let description = self
            .hs
            .account_data(&me, &secret_storage::key_event_type(&key_id))
            .await?
            .ok_or_else(|| refused(format!("the default secret-storage key {key_id} has no description")))
            .and_then(|c| KeyDescription::from_content(&c).map_err(|e| refused(e.to_string())))?;
        let from_passphrase = |p: &str| -> Result<SecretStorageKey, DeviceError> {
            let info = description.passphrase.as_ref().ok_or_else(|| {
                refused("this secret-storage key was not made from a passphrase: give the recovery key".into())
            })?;
            info.derive_key(p).map_err(|e| refused(e.to_string()))
        };
        let key = match (recovery_key, passphrase) {
            (Some(rk), _) => match SecretStorageKey::from_recovery_key(rk) {
                Ok(k) => k,
                // A key made from a passphrase may be given as the passphrase itself.
                Err(_) if description.passphrase.is_some() => from_passphrase(rk)?,
                Err(e) => return Err(refused(format!("that is not a recovery key: {e}"))),
            },
            (None, Some(p)) => from_passphrase(p)?,
            (None, None) => return Err(refused("give the recovery key (or the passphrase)".into())),
        };
        description.check_key(&key).map_err(|e| match e {
            secret_storage::Error::WrongKey => {
                refused("the recovery key does not open this account's secret storage; nothing was changed".into())
            }
            other => refused(other.to_string()),
        })?;
        self.query_keys(std::slice::from_ref(&me)).await?;
        let info = self.known.get(&me).cloned().unwrap_or_default();
        let mut restored = CrossSigningKeys::default();
        for name in SECRET_NAMES {
            let content = self.hs.account_data(&me, name).await?.unwrap_or(Value::Null);
            let secret = secret_storage::decrypt_stored_secret(&key, name, &key_id, &content)
                .map_err(|e| refused(format!("{name}: {e}")))?
                .ok_or_else(|| refused(format!("secret storage holds no {name} for this key")))?;
            let private = cross_signing::key_matching(name, &secret, cross_signing::published_key(&info, name))
                .map_err(refused)?;
            restored.set(name, private);
        }
        self.store.set("cross_signing", &restored.to_json())?;
        self.cross = restored;
        self.sign_own_device().await?;
        self.refresh_own_identity();
        self.query_keys(std::slice::from_ref(&me)).await?;
        Ok(self.master_key().expect("restored"))
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
                self.notices.push(Notice::new("keys", format!("ignored a key of {user}: {r}")));
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

    /// The sync filter id (created again whenever the filter changed).
    pub async fn filter_id(&mut self) -> Result<String, DeviceError> {
        let wanted = sync_filter().to_string();
        if let (Some(f), Some(stored)) = (self.store.get("filter_id")?, self.store.get("filter")?)
            && stored == wanted
        {
            return Ok(f);
        }
        let f = self.hs.create_filter(&self.user_id, &sync_filter()).await?;
        self.store.set("filter_id", &f)?;
        self.store.set("filter", &wanted)?;
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
                Destination::ToDevice { user_id, device_ids } if self.encrypt_to_device => {
                    let per_device = self.olm_encrypt_for(user_id, device_ids, out.event_type, &out.content).await?;
                    if !per_device.is_empty() {
                        let messages = json!({ user_id.clone(): per_device });
                        self.hs.send_to_device("m.room.encrypted", &txn, &messages).await?;
                    }
                }
                Destination::ToDevice { user_id, device_ids } => {
                    let per_device: serde_json::Map<String, Value> =
                        device_ids.iter().map(|d| (d.clone(), out.content.clone())).collect();
                    self.hs.send_to_device(out.event_type, &txn, &json!({ user_id.clone(): per_device })).await?;
                }
                Destination::Room { room_id } => {
                    let event_id = match self.room_encryption(room_id).await? {
                        Some(settings) => {
                            let content = self.megolm_encrypt(room_id, &settings, out.event_type, &out.content).await?;
                            self.hs.room_send(room_id, "m.room.encrypted", &txn, &content).await?
                        }
                        None => self.hs.room_send(room_id, out.event_type, &txn, &out.content).await?,
                    };
                    if out.flow.is_none() && out.event_type == "m.room.message" {
                        self.machine.room_event_sent(out.id, &event_id, now_ms())?;
                    }
                }
            }
        }
        Ok(())
    }

    fn own_sender(&self) -> OlmSender {
        OlmSender {
            user_id: self.user_id.clone(),
            device_id: self.device_id.clone(),
            curve25519: self.olm.curve25519(),
            ed25519: self.olm.ed25519(),
        }
    }

    fn next_txn(&mut self, what: &str) -> String {
        self.next_txn += 1;
        format!("mxv{}-{what}{}", self.txn_prefix, self.next_txn)
    }

    /// Whether a room is encrypted, and how ([`m.room.encryption`](https://spec.matrix.org/v1.19/client-server-api/#mroomencryption)).
    /// Asked of the homeserver once per room; `/sync` keeps it up to date after that.
    pub async fn room_encryption(&mut self, room_id: &str) -> Result<Option<RoomEncryption>, DeviceError> {
        if let Some(known) = self.room_encryption.get(room_id) {
            return Ok(*known);
        }
        let settings = match self.hs.room_state(room_id, "m.room.encryption", "").await {
            Ok(content) => RoomEncryption::from_content(&content),
            Err(HttpError::Matrix { status: 404, .. }) => None,
            Err(e) => return Err(e.into()),
        };
        self.room_encryption.insert(room_id.to_owned(), settings);
        Ok(settings)
    }

    /// Makes sure we have an Olm session with each of these devices, claiming one-time keys for
    /// those we have none with ([`/keys/claim`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysclaim)).
    /// Each claimed key's signature is checked with the device's Ed25519 key. Devices that end
    /// up without a session are returned (and reported).
    async fn ensure_olm_sessions(
        &mut self,
        devices: &[(String, DeviceKeys)],
    ) -> Result<Vec<(String, String)>, DeviceError> {
        let mut wanted: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        for (user, d) in devices {
            if let Some(curve) = &d.curve25519
                && !self.olm.has_session(curve)
            {
                wanted.entry(user.clone()).or_default().insert(d.device_id.clone(), json!(SIGNED_CURVE25519));
            }
        }
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let claimed = self.hs.keys_claim(&json!(wanted)).await?;
        let now = now_ms();
        let mut without = Vec::new();
        for (user, d) in devices {
            let Some(curve) = &d.curve25519 else { continue };
            if !wanted.get(user).is_some_and(|m| m.contains_key(&d.device_id)) {
                continue;
            }
            let key = claimed["one_time_keys"][user][&d.device_id].as_object().and_then(|m| {
                m.iter().find(|(id, obj)| {
                    id.starts_with("signed_curve25519:")
                        && keys::has_valid_signature(obj, user, &d.device_id, &d.ed25519)
                })
            });
            let created = match key.and_then(|(_, obj)| obj["key"].as_str()) {
                Some(otk) => self.olm.create_outbound(&mut self.store, curve, otk, now).map_err(|e| e.to_string()),
                None => Err("it has no signed one-time key left on the server (or its signature is wrong)".into()),
            };
            if let Err(why) = created {
                self.notices.push(Notice::new(
                    "no_olm_session",
                    format!("cannot open an encrypted channel to device {} of {user}: {why}", d.device_id),
                ));
                without.push((user.clone(), d.device_id.clone()));
            }
        }
        Ok(without)
    }

    /// Olm-encrypts one event for some devices of a user: the per-device contents of an
    /// `m.room.encrypted` to-device message. Devices we cannot reach are reported and skipped.
    async fn olm_encrypt_for(
        &mut self,
        user: &str,
        device_ids: &[String],
        event_type: &str,
        content: &Value,
    ) -> Result<serde_json::Map<String, Value>, DeviceError> {
        if !self.known.get(user).is_some_and(|k| device_ids.iter().all(|d| k.devices.contains_key(d))) {
            self.query_keys(&[user.to_owned()]).await?;
        }
        let targets: Vec<(String, DeviceKeys)> = device_ids
            .iter()
            .filter_map(|d| self.known.get(user).and_then(|k| k.devices.get(d)).cloned())
            .map(|d| (user.to_owned(), d))
            .collect();
        self.ensure_olm_sessions(&targets).await?;
        let mut per_device = serde_json::Map::new();
        for (_, d) in &targets {
            match self.olm.encrypt(&mut self.store, user, d, event_type, content) {
                Ok(c) => {
                    per_device.insert(d.device_id.clone(), c);
                }
                Err(OlmError::NoSession(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(per_device)
    }

    /// Megolm-encrypts an event for a room ([sending encrypted room events](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2)):
    /// the outbound session is rotated when its settings or a departure say so, and its key
    /// is first shared over Olm with every device of every joined member that lacks it,
    /// unverified devices included, so that nobody is kept from a verification by encryption.
    async fn megolm_encrypt(
        &mut self,
        room_id: &str,
        settings: &RoomEncryption,
        event_type: &str,
        content: &Value,
    ) -> Result<Value, DeviceError> {
        // Members and their keys are asked for once; `/sync` says when they change (membership
        // events, device-list changes), so a message costs no extra round trip.
        let members = match self.room_members.get(room_id) {
            Some(m) => m.clone(),
            None => {
                let m = self.hs.joined_members(room_id).await?;
                self.room_members.insert(room_id.to_owned(), m.clone());
                m
            }
        };
        let unknown: Vec<String> = members.iter().filter(|u| !self.known.contains_key(*u)).cloned().collect();
        if !unknown.is_empty() {
            self.query_keys(&unknown).await?;
        }
        let mut targets: BTreeMap<String, (String, DeviceKeys)> = BTreeMap::new();
        for user in &members {
            for d in self.known.get(user).map(|k| k.devices.values()).into_iter().flatten() {
                let Some(curve) = &d.curve25519 else { continue };
                if *user == self.user_id && d.device_id == self.device_id {
                    continue;
                }
                targets.insert(megolm::recipient_id(user, &d.device_id, curve), (user.clone(), d.clone()));
            }
        }
        let recipients: BTreeSet<String> = targets.keys().cloned().collect();
        let now = now_ms();
        let own = self.own_sender();
        let pickle_key = *self.olm.pickle_key();
        let mut out = match Outbound::load(&self.store, &pickle_key, room_id)? {
            Some(o) => match o.rotation_reason(settings, now, &recipients) {
                None => o,
                Some(why) => {
                    self.notices.push(Notice::in_room(
                        "rotated",
                        room_id,
                        format!("new room key: the previous one {why}"),
                    ));
                    Outbound::create(&self.store, &pickle_key, room_id, &own, now)?
                }
            },
            None => Outbound::create(&self.store, &pickle_key, room_id, &own, now)?,
        };
        let missing: Vec<(String, DeviceKeys)> =
            out.missing(&recipients).into_iter().map(|r| targets[r].clone()).collect();
        if !missing.is_empty() {
            self.ensure_olm_sessions(&missing).await?;
            let room_key = out.room_key_content();
            let mut messages: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
            let mut shared = Vec::new();
            for (user, d) in &missing {
                match self.olm.encrypt(&mut self.store, user, d, "m.room_key", &room_key) {
                    Ok(c) => {
                        messages.entry(user.clone()).or_default().insert(d.device_id.clone(), c);
                        let curve = d.curve25519.as_deref().unwrap_or_default();
                        shared.push(megolm::recipient_id(user, &d.device_id, curve));
                    }
                    Err(OlmError::NoSession(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if !messages.is_empty() {
                let txn = self.next_txn("k");
                self.hs.send_to_device("m.room.encrypted", &txn, &json!(messages)).await?;
                out.mark_shared(&self.store, shared)?;
            }
        }
        Ok(out.encrypt(&self.store, &pickle_key, &own, event_type, content)?)
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
                    self.after_own_verification(device_id).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Sign what was verified so that every client sees it
    /// ([cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing)): another
    /// device of ours with our self-signing key, another user's master key with our user-signing
    /// key. A key with no canonical JSON form is reported, not signed.
    async fn cross_sign_verified(
        &mut self,
        user: &str,
        verified: &[mxverify_proto::VerifiedKey],
    ) -> Result<(), DeviceError> {
        let own = user == self.user_id;
        let (name, what) = if own { (SELF_SIGNING, "self-signing") } else { (USER_SIGNING, "user-signing") };
        let Some(signer) = self.cross.get(name) else {
            self.notices.push(Notice::new(
                "signatures",
                format!("this device does not hold our {what} key, so the verification was not signed (run `mxverify cross-signing bootstrap` or `recover`)"),
            ));
            return Ok(());
        };
        let signer_pub = signer.public_key().to_base64();
        let mut body = serde_json::Map::new();
        for k in verified {
            let (object, key) = match (own, &k.kind) {
                (true, KeyKind::Device) => {
                    let device = k.key_id.trim_start_matches("ed25519:");
                    match self.known.get(user).and_then(|i| i.devices.get(device)) {
                        Some(info) if info.ed25519 == k.key => (info.json.clone(), device.to_owned()),
                        _ => continue,
                    }
                }
                (false, KeyKind::MasterKey) => {
                    match self.known.get(user).and_then(|i| i.master_json.clone().zip(i.master_key.clone())) {
                        Some((obj, msk)) if msk == k.key => (obj, k.key.clone()),
                        _ => continue,
                    }
                }
                _ => continue,
            };
            let mut object = object;
            if let Some(o) = object.as_object_mut() {
                o.remove("signatures");
            }
            match keys::sign_with(&mut object, &self.user_id, &signer_pub, signer) {
                Ok(()) => {
                    body.entry(user.to_owned()).or_insert_with(|| json!({}))[key.as_str()] = object;
                }
                Err(why) => self.notices.push(Notice::new("signatures", format!("did not sign {}: {why}", k.key_id))),
            }
        }
        if !body.is_empty() {
            self.hs.upload_signatures(&Value::Object(body)).await?;
            self.notices.push(Notice::new("signatures", format!("uploaded cross-signing signatures for {user}")));
        }
        Ok(())
    }

    // ----- secret sharing ------------------------------------------------------------------------

    /// Whether one of our devices is trusted: verified by this device, or cross-signed by our
    /// self-signing key while we trust our master key.
    fn own_device_verified(&self, device_id: &str) -> bool {
        let Some(info) = self.known.get(&self.user_id) else { return false };
        let Some(device) = info.devices.get(device_id) else { return false };
        if self.store.is_trusted(&self.user_id, &device.ed25519).unwrap_or(false) {
            return true;
        }
        let master_trusted = info.master_key.as_ref().is_some_and(|k| {
            self.master_key().as_ref() == Some(k) || self.store.is_trusted(&self.user_id, k).unwrap_or(false)
        });
        device.cross_signed && master_trusted
    }

    fn save_secret_requests(&mut self) -> Result<(), DeviceError> {
        let json = serde_json::to_string(&self.open_secret_requests).expect("plain data");
        self.store.set("secret_requests", &json)?;
        Ok(())
    }

    /// After a verification with one of our own devices: ask it for the cross-signing keys this
    /// device lacks, and stay a moment for the keys to come, or for it to ask for ours
    /// ([sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing)).
    async fn after_own_verification(&mut self, device_id: &str) -> Result<(), DeviceError> {
        let now = now_ms();
        // Only a device with keys to give waits to be asked for them.
        if !self.cross.is_empty() {
            self.secret_linger_until = Some(now + SECRET_LINGER_MS);
        }
        self.open_secret_requests.retain(|r| r.created_at + secrets::REQUEST_LIFETIME_MS > now);
        let missing = self.cross.missing();
        for name in &missing {
            let request_id = {
                let mut raw = [0u8; 16];
                OsEntropy.fill(&mut raw);
                raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
            };
            let content = json!({"action": "request", "name": name, "request_id": request_id,
                                 "requesting_device_id": self.device_id});
            let txn = self.next_txn("s");
            let messages = json!({self.user_id.clone(): {device_id: content}});
            self.hs.send_to_device("m.secret.request", &txn, &messages).await?;
            self.open_secret_requests.push(OpenRequest {
                request_id,
                name: (*name).to_owned(),
                device_id: device_id.to_owned(),
                created_at: now,
            });
        }
        if !missing.is_empty() {
            self.save_secret_requests()?;
            self.notices.push(Notice::new(
                "secret_requested",
                format!(
                    "asked device {device_id} for the cross-signing keys this device lacks ({})",
                    missing.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// An `m.secret.send` that came over Olm from `from`: believed only from our own verified
    /// device, for a request still open, and only if the key is the published one. Then it is
    /// kept, and a self-signing key at once signs this device.
    async fn receive_secret(&mut self, from: &OlmSender, content: &Value) -> Result<(), DeviceError> {
        if !self.known.get(&self.user_id).is_some_and(|k| k.devices.contains_key(&from.device_id)) {
            let me = self.user_id.clone();
            let _ = self.query_keys(std::slice::from_ref(&me)).await;
        }
        let asker = Asker {
            user_id: &from.user_id,
            device_id: &from.device_id,
            verified: self.own_device_verified(&from.device_id),
        };
        let request = match secrets::judge_send(&self.user_id, true, &asker, content, &self.open_secret_requests) {
            Ok(r) => r.clone(),
            Err(why) => {
                self.notices.push(Notice::new(
                    "secret_refused",
                    format!("refused a secret from device {} of {}: {why}", from.device_id, from.user_id),
                ));
                return Ok(());
            }
        };
        let me = self.user_id.clone();
        self.query_keys(std::slice::from_ref(&me)).await?;
        let info = self.known.get(&me).cloned().unwrap_or_default();
        let secret = Zeroizing::new(content["secret"].as_str().unwrap_or_default().to_owned());
        let key = match cross_signing::key_matching(
            &request.name,
            &secret,
            cross_signing::published_key(&info, &request.name),
        ) {
            Ok(k) => k,
            Err(why) => {
                self.notices.push(Notice::new(
                    "secret_refused",
                    format!("refused {} from device {}: {why}", request.name, from.device_id),
                ));
                return Ok(());
            }
        };
        self.cross.set(&request.name, key);
        self.store.set("cross_signing", &self.cross.to_json())?;
        self.open_secret_requests.retain(|r| r.request_id != request.request_id);
        self.save_secret_requests()?;
        self.notices
            .push(Notice::new("secret_received", format!("received {} from device {}", request.name, from.device_id)));
        if request.name == SELF_SIGNING {
            self.sign_own_device().await?;
            self.notices.push(Notice::new("signatures", "signed this device with the self-signing key"));
        }
        if request.name == MASTER {
            self.refresh_own_identity();
        }
        Ok(())
    }

    /// An `m.secret.request` from one of our devices: a cross-signing key we hold goes, Olm
    /// encrypted, to our own verified devices only ([sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing)).
    async fn receive_secret_request(&mut self, sender: &str, content: &Value) -> Result<(), DeviceError> {
        let device_id = content["requesting_device_id"].as_str().unwrap_or_default().to_owned();
        if sender == self.user_id
            && !device_id.is_empty()
            && !self.known.get(sender).is_some_and(|k| k.devices.contains_key(&device_id))
        {
            let _ = self.query_keys(&[sender.to_owned()]).await;
        }
        let verified = sender == self.user_id && self.own_device_verified(&device_id);
        let asker = Asker { user_id: sender, device_id: &device_id, verified };
        match secrets::judge_request(&self.user_id, &self.device_id, &asker, content) {
            Ok(RequestAction::Send { request_id, name, device_id }) => {
                let Some(secret) = self.cross.secret(&name) else {
                    self.notices.push(Notice::new(
                        "secret_request",
                        format!("device {device_id} asked for {name}, which this device does not hold"),
                    ));
                    return Ok(());
                };
                let body = json!({"request_id": request_id, "secret": *secret});
                let me = self.user_id.clone();
                let per_device =
                    self.olm_encrypt_for(&me, std::slice::from_ref(&device_id), "m.secret.send", &body).await?;
                if per_device.is_empty() {
                    self.notices.push(Notice::new(
                        "secret_request",
                        format!("cannot send {name} to device {device_id}: no encrypted channel to it"),
                    ));
                    return Ok(());
                }
                let txn = self.next_txn("s");
                self.hs.send_to_device("m.room.encrypted", &txn, &json!({me: per_device})).await?;
                self.notices
                    .push(Notice::new("secret_sent", format!("sent {name} to our verified device {device_id}")));
                // The other device asks for the keys together: once answered, a short wait is enough.
                self.secret_linger_until = Some(now_ms() + SECRET_QUIET_MS);
            }
            // Requests are answered at once, so nothing waits to be cancelled.
            Ok(RequestAction::Cancel { .. }) => {}
            Err(why) => {
                let name = content["name"].as_str().unwrap_or("a secret");
                self.notices.push(Notice::new(
                    "secret_refused",
                    format!("did not give {name} to {sender} (device {device_id}): {why}"),
                ));
            }
        }
        Ok(())
    }

    /// Until when secret sharing may still need this process (an open request of ours, or the
    /// moment after a verification with our own device); `None` when nothing is pending.
    pub fn secrets_pending_until(&self, now: u64) -> Option<u64> {
        let linger = self.secret_linger_until.filter(|t| *t > now);
        let waiting =
            self.open_secret_requests.iter().map(|r| r.created_at + SECRET_LINGER_MS).filter(|t| *t > now).max();
        linger.max(waiting)
    }

    /// Feeds one `/sync` answer to the machine: key counts first, then to-device events (Olm
    /// decrypted where encrypted, room keys stored), then room timelines (Megolm decrypted, or
    /// held until their room key arrives); joins rooms we are invited to (recording direct
    /// chats in `m.direct`); refreshes keys of users whose devices changed. Requests that now
    /// wait for an answer are remembered in the store.
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
        // Counts are acted on only when the server gave them: a missing field must not make us
        // upload keys again and again.
        if let Some(counts) = resp.get("device_one_time_keys_count").and_then(Value::as_object) {
            let count = counts.get(SIGNED_CURVE25519).and_then(Value::as_u64).unwrap_or(0);
            let fallback_unused = resp
                .get("device_unused_fallback_key_types")
                .and_then(Value::as_array)
                .map(|types| types.iter().any(|t| t == SIGNED_CURVE25519));
            if let Err(e) = self.top_up_keys(count, fallback_unused).await {
                self.notices.push(Notice::new("keys", format!("could not upload one-time keys: {e}")));
            }
        }
        for ev in resp.pointer("/to_device/events").and_then(Value::as_array).into_iter().flatten() {
            let (Some(sender), Some(ty)) = (ev["sender"].as_str(), ev["type"].as_str()) else { continue };
            match ty {
                "m.room.encrypted" => self.receive_olm(sender, &ev["content"], now, &mut events).await?,
                "m.secret.request" => self.receive_secret_request(sender, &ev["content"]).await?,
                "m.room_key" | "m.forwarded_room_key" | "m.secret.send" | "m.room_key_bundle" => {
                    self.notices.push(Notice::new(
                        "dropped",
                        format!("ignored {ty} from {sender}: it arrived unencrypted, and it is accepted only over Olm"),
                    ));
                }
                _ => {
                    let incoming = IncomingEvent {
                        sender: sender.into(),
                        event_type: ty.into(),
                        content: ev["content"].clone(),
                        room: None,
                    };
                    self.feed(incoming, now, &mut events).await?;
                }
            }
        }
        if let Some(rooms) = resp.pointer("/rooms/join").and_then(Value::as_object) {
            for (room_id, room) in rooms {
                let state = room.pointer("/state/events").and_then(Value::as_array).into_iter().flatten();
                let timeline = room.pointer("/timeline/events").and_then(Value::as_array).into_iter().flatten();
                for ev in state.chain(timeline.clone()) {
                    self.track_room_state(room_id, ev);
                }
                for ev in timeline {
                    let (Some(sender), Some(ty), Some(event_id)) =
                        (ev["sender"].as_str(), ev["type"].as_str(), ev["event_id"].as_str())
                    else {
                        continue;
                    };
                    if ty == "m.room.encrypted" {
                        self.receive_megolm(room_id, ev, now, true, &mut events).await?;
                        continue;
                    }
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
            for (room_id, invite) in invites {
                self.accept_invite(room_id, invite).await;
            }
        }
        self.expire_held(now)?;
        Ok(events)
    }

    /// Encryption settings and departures seen in a room's state or timeline.
    fn track_room_state(&mut self, room_id: &str, ev: &Value) {
        match (ev["type"].as_str(), ev["state_key"].as_str()) {
            (Some("m.room.encryption"), Some("")) => {
                if let Some(settings) = RoomEncryption::from_content(&ev["content"]) {
                    self.room_encryption.insert(room_id.to_owned(), Some(settings));
                }
            }
            (Some("m.room.member"), Some(_)) => {
                self.room_members.remove(room_id);
                // Anyone leaving may hold the current room key: the next message gets a new one.
                let membership = ev["content"]["membership"].as_str();
                if matches!(membership, Some("leave" | "ban")) {
                    let _ = self.store.delete_outbound_session(room_id);
                }
            }
            _ => {}
        }
    }

    /// Joins a room we were invited to; a direct chat (`is_direct` on our invite) is recorded in
    /// `m.direct` under the inviter, as Element does. A room that refuses us is reported and
    /// skipped.
    async fn accept_invite(&mut self, room_id: &str, invite: &Value) {
        let own_member = invite.pointer("/invite_state/events").and_then(Value::as_array).and_then(|events| {
            events.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == self.user_id.as_str())
        });
        let direct_from = own_member
            .filter(|m| m["content"]["is_direct"] == true)
            .and_then(|m| m["sender"].as_str())
            .map(str::to_owned);
        if let Err(e) = self.hs.join(room_id).await {
            self.notices.push(Notice::in_room("join_failed", room_id, format!("could not join {room_id}: {e}")));
            return;
        }
        self.notices.push(Notice::in_room("joined", room_id, format!("joined {room_id}")));
        if let Some(inviter) = direct_from
            && let Err(e) = self.add_direct_room(&inviter, room_id).await
        {
            self.notices.push(Notice::in_room(
                "dm",
                room_id,
                format!("could not record {room_id} as a direct chat with {inviter}: {e}"),
            ));
        }
    }

    /// A to-device `m.room.encrypted`: decrypted with Olm, checked, attributed to one device of
    /// the sender, then handled like a clear event (verification), stored (room key) or ignored.
    async fn receive_olm(
        &mut self,
        sender: &str,
        content: &Value,
        now: u64,
        events: &mut Vec<Event>,
    ) -> Result<(), DeviceError> {
        let plain = match self.olm.decrypt(&mut self.store, sender, content, now) {
            Ok(p) => p,
            Err(OlmError::Undecryptable { sender_key, detail }) => {
                self.notices.push(Notice::new(
                    "dropped",
                    format!("an encrypted message from {sender} could not be decrypted ({detail})"),
                ));
                self.unwedge(sender, &sender_key, now).await;
                return Ok(());
            }
            Err(OlmError::Store(e)) => return Err(DeviceError::Corrupt(e)),
            Err(e) => {
                self.notices.push(Notice::new("dropped", format!("dropped an encrypted message from {sender}: {e}")));
                return Ok(());
            }
        };
        let from = match self.attribute(&plain).await {
            Ok(from) => from,
            Err(e) => {
                self.notices.push(Notice::new(
                    "dropped",
                    format!("dropped an encrypted {} from {sender}: {e}", plain.event_type),
                ));
                return Ok(());
            }
        };
        match plain.event_type.as_str() {
            "m.room_key" => {
                let pickle_key = *self.olm.pickle_key();
                match megolm::accept_room_key(&self.store, &pickle_key, &from, &plain.content) {
                    Ok(RoomKeyOutcome::Stored { room_id, session_id }) => {
                        self.retry_held(&room_id, &session_id, events).await?;
                    }
                    Ok(RoomKeyOutcome::AlreadyKnown) => {}
                    Err(MegolmError::Store(e)) => return Err(DeviceError::Corrupt(e)),
                    Err(e) => self.notices.push(Notice::new(
                        "dropped",
                        format!("refused a room key from device {} of {sender}: {e}", from.device_id),
                    )),
                }
            }
            ty if ty.starts_with("m.key.verification.") => {
                let incoming =
                    IncomingEvent { sender: sender.into(), event_type: ty.into(), content: plain.content, room: None };
                self.feed(incoming, now, events).await?;
            }
            "m.secret.send" => self.receive_secret(&from, &plain.content).await?,
            "m.secret.request" => self.receive_secret_request(sender, &plain.content).await?,
            // `m.dummy` only opens a session; everything else is not ours to handle.
            _ => {}
        }
        Ok(())
    }

    /// The device that sent a decrypted payload: the sender's device with the session's
    /// Curve25519 key and the payload's Ed25519 key (keys are fetched if that device is new).
    async fn attribute(&mut self, plain: &OlmPlaintext) -> Result<OlmSender, OlmError> {
        let known = self
            .known
            .get(&plain.sender)
            .is_some_and(|k| k.devices.values().any(|d| d.curve25519.as_deref() == Some(plain.sender_key.as_str())));
        if !known && let Err(e) = self.query_keys(std::slice::from_ref(&plain.sender)).await {
            self.notices.push(Notice::new("keys", format!("could not fetch the keys of {}: {e}", plain.sender)));
        }
        let devices = self.known.get(&plain.sender).map(|k| k.devices.values().collect::<Vec<_>>()).unwrap_or_default();
        let device = plain.attribute(devices)?;
        Ok(OlmSender {
            user_id: plain.sender.clone(),
            device_id: device.device_id.clone(),
            curve25519: plain.sender_key.clone(),
            ed25519: device.ed25519.clone(),
        })
    }

    /// An Olm message from this device did not decrypt: its session with us is broken. Open a
    /// new one and announce it with an encrypted `m.dummy`, at most once an hour per device
    /// ([recovering from undecryptable messages](https://spec.matrix.org/v1.19/client-server-api/#recovering-from-undecryptable-messages)).
    async fn unwedge(&mut self, sender: &str, sender_key: &str, now: u64) {
        if self.olm.newest_session_created(sender_key).is_some_and(|t| now.saturating_sub(t) < UNWEDGE_INTERVAL_MS) {
            return;
        }
        if !self.known.contains_key(sender) {
            let _ = self.query_keys(&[sender.to_owned()]).await;
        }
        let Some(device) = self
            .known
            .get(sender)
            .and_then(|k| k.devices.values().find(|d| d.curve25519.as_deref() == Some(sender_key)))
            .cloned()
        else {
            return;
        };
        let Some(curve) = device.curve25519.clone() else { return };
        // A fresh session even if we have one: that one is the broken one.
        let claimed = match self.hs.keys_claim(&json!({sender: {&device.device_id: SIGNED_CURVE25519}})).await {
            Ok(c) => c,
            Err(e) => {
                self.notices
                    .push(Notice::new("no_olm_session", format!("could not repair the channel to {sender}: {e}")));
                return;
            }
        };
        let otk = claimed["one_time_keys"][sender][&device.device_id].as_object().and_then(|m| {
            m.iter()
                .find(|(_, obj)| keys::has_valid_signature(obj, sender, &device.device_id, &device.ed25519))
                .and_then(|(_, obj)| obj["key"].as_str().map(str::to_owned))
        });
        let Some(otk) = otk else { return };
        if self.olm.create_outbound(&mut self.store, &curve, &otk, now).is_err() {
            return;
        }
        let Ok(content) = self.olm.encrypt(&mut self.store, sender, &device, "m.dummy", &json!({})) else { return };
        let txn = self.next_txn("d");
        let messages = json!({sender: {&device.device_id: content}});
        match self.hs.send_to_device("m.room.encrypted", &txn, &messages).await {
            Ok(()) => self.notices.push(Notice::new(
                "olm_repaired",
                format!("opened a new encrypted channel to device {} of {sender}", device.device_id),
            )),
            Err(e) => self
                .notices
                .push(Notice::new("no_olm_session", format!("could not repair the channel to {sender}: {e}"))),
        }
    }

    /// A room `m.room.encrypted`: decrypted with its room key and handled like a clear event,
    /// or held (in the store, across restarts) until the key arrives. `first_time` is false
    /// when a held event is retried.
    async fn receive_megolm(
        &mut self,
        room_id: &str,
        ev: &Value,
        now: u64,
        first_time: bool,
        events: &mut Vec<Event>,
    ) -> Result<bool, DeviceError> {
        let sender = ev["sender"].as_str().unwrap_or_default().to_owned();
        let event_id = ev["event_id"].as_str().unwrap_or_default().to_owned();
        let pickle_key = *self.olm.pickle_key();
        match megolm::decrypt_room_event(&self.store, &pickle_key, room_id, ev) {
            Ok(d) => {
                let room = RoomContext {
                    room_id: room_id.to_owned(),
                    event_id,
                    origin_server_ts: ev["origin_server_ts"].as_u64().unwrap_or(0),
                    relates_to_fallback: d.relates_to,
                };
                let incoming = IncomingEvent { sender, event_type: d.event_type, content: d.content, room: Some(room) };
                self.feed(incoming, now, events).await?;
                Ok(true)
            }
            Err(MegolmError::Store(e)) => Err(DeviceError::Corrupt(e)),
            Err(e) if e.is_waiting_for_key() => {
                if first_time {
                    self.hold(room_id, ev, &sender, &event_id, now)?;
                }
                Ok(false)
            }
            Err(e) => {
                self.notices.push(Notice::in_room(
                    "dropped",
                    room_id,
                    format!("dropped encrypted event {event_id} from {sender}: {e}"),
                ));
                Ok(true)
            }
        }
    }

    /// Keeps an encrypted room event until its key arrives (principle: never drop a request for
    /// lack of keys). One sender holds at most a few dozen, and all together at most a
    /// thousand; the oldest goes first, reported.
    fn hold(&mut self, room_id: &str, ev: &Value, sender: &str, event_id: &str, now: u64) -> Result<(), DeviceError> {
        let Some(session_id) = megolm::session_id_of(&ev["content"]) else { return Ok(()) };
        let theirs = self.store.held_room_events(HeldSelection::Sender(sender))?;
        let evict = if theirs.len() >= HELD_PER_SENDER {
            theirs.into_iter().next()
        } else if self.store.held_count()? >= HELD_IN_ALL {
            self.store.held_room_events(HeldSelection::All)?.into_iter().next()
        } else {
            None
        };
        if let Some(old) = evict {
            self.store.release_room_event(&old.event_id)?;
            self.notices.push(Notice::in_room(
                "dropped",
                &old.room_id,
                format!(
                    "gave up on encrypted event {} from {}: too many events wait for room keys",
                    old.event_id, old.sender
                ),
            ));
        }
        self.store.hold_room_event(&HeldRoomEvent {
            event_id: event_id.to_owned(),
            room_id: room_id.to_owned(),
            session_id: session_id.to_owned(),
            sender: sender.to_owned(),
            event: ev.to_string(),
            received_at: now,
            until: now + HOLD_FOR_ROOM_KEY_MS,
        })?;
        self.notices.push(Notice::in_room(
            "held",
            room_id,
            format!("encrypted event {event_id} from {sender} waits for its room key {session_id}"),
        ));
        Ok(())
    }

    /// A room key arrived: the events that waited for it are decrypted and handled, in order.
    async fn retry_held(
        &mut self,
        room_id: &str,
        session_id: &str,
        events: &mut Vec<Event>,
    ) -> Result<(), DeviceError> {
        let now = now_ms();
        for h in self.store.held_room_events(HeldSelection::Key { room_id, session_id })? {
            let Ok(ev) = serde_json::from_str::<Value>(&h.event) else {
                self.store.release_room_event(&h.event_id)?;
                continue;
            };
            if self.receive_megolm(room_id, &ev, now, false, events).await? {
                self.store.release_room_event(&h.event_id)?;
            }
        }
        Ok(())
    }

    /// Held events whose time is up are given up on, and reported.
    fn expire_held(&mut self, now: u64) -> Result<(), DeviceError> {
        for h in self.store.held_room_events(HeldSelection::DueBy(now))? {
            self.store.release_room_event(&h.event_id)?;
            self.notices.push(Notice::in_room(
                "dropped",
                &h.room_id,
                format!("gave up on encrypted event {}: its room key {} never arrived", h.event_id, h.session_id),
            ));
        }
        Ok(())
    }

    /// When something is due: the machine's next deadline, or a held event's.
    pub fn next_deadline(&self) -> Option<u64> {
        let held = self.store.held_next_due().ok().flatten();
        [self.machine.next_deadline(), held].into_iter().flatten().min()
    }

    /// Ends what is due: the machine's timeouts, and held events whose room key never came.
    pub fn handle_timeout(&mut self, now: u64) -> Result<(), DeviceError> {
        self.machine.handle_timeout(now);
        self.expire_held(now)
    }

    async fn feed(&mut self, incoming: IncomingEvent, now: u64, events: &mut Vec<Event>) -> Result<(), DeviceError> {
        let raw = json!({"sender": incoming.sender, "type": incoming.event_type, "content": incoming.content,
            "room": incoming.room.as_ref().map(|r| json!({"room_id": r.room_id, "event_id": r.event_id,
                "origin_server_ts": r.origin_server_ts, "relates_to_fallback": r.relates_to_fallback}))});
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
                relates_to_fallback: r.get("relates_to_fallback").filter(|v| v.is_object()).cloned(),
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

    /// The direct chat with `user` to verify in ([direct messaging](https://spec.matrix.org/v1.19/client-server-api/#direct-messaging)):
    /// a room listed under them in our `m.direct` that we are in and they have joined (or, else,
    /// are invited to); failing that, a new encrypted one, created as Element does and recorded
    /// in `m.direct`.
    pub async fn dm_room(&mut self, user: &str) -> Result<DirectRoom, DeviceError> {
        let direct = self.hs.account_data(&self.user_id, "m.direct").await?.unwrap_or_else(|| json!({}));
        let candidates: Vec<String> =
            direct[user].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect();
        if !candidates.is_empty() {
            let joined = self.hs.joined_rooms().await?;
            let mut invited = None;
            for room in candidates.iter().filter(|r| joined.contains(r)) {
                match self.membership(room, user).await?.as_deref() {
                    Some("join") => {
                        return Ok(DirectRoom { room_id: room.clone(), created: false, other_joined: true });
                    }
                    Some("invite") if invited.is_none() => invited = Some(room.clone()),
                    _ => {}
                }
            }
            if let Some(room_id) = invited {
                return Ok(DirectRoom { room_id, created: false, other_joined: false });
            }
        }
        let room_id = self.hs.create_dm(user).await?;
        self.room_encryption
            .insert(room_id.clone(), RoomEncryption::from_content(&json!({"algorithm": MEGOLM_ALGORITHM})));
        self.notices.push(Notice::in_room(
            "dm_created",
            &room_id,
            format!("created an encrypted direct chat {room_id} with {user}"),
        ));
        if let Err(e) = self.add_direct_room(user, &room_id).await {
            self.notices.push(Notice::in_room("dm", &room_id, format!("could not record {room_id} in m.direct: {e}")));
        }
        Ok(DirectRoom { room_id, created: true, other_joined: false })
    }

    /// A user's membership in a room (`join`, `invite`, `leave`, ...), if any.
    pub async fn membership(&self, room_id: &str, user: &str) -> Result<Option<String>, DeviceError> {
        match self.hs.room_state(room_id, "m.room.member", user).await {
            Ok(c) => Ok(c["membership"].as_str().map(str::to_owned)),
            Err(HttpError::Matrix { status: 404, .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Adds a room to our `m.direct` under `user` (read, change, write back).
    pub async fn add_direct_room(&self, user: &str, room_id: &str) -> Result<(), DeviceError> {
        let mut direct = self.hs.account_data(&self.user_id, "m.direct").await?.unwrap_or_else(|| json!({}));
        if !direct.is_object() {
            direct = json!({});
        }
        let rooms = direct.as_object_mut().expect("an object").entry(user.to_owned()).or_insert_with(|| json!([]));
        if !rooms.is_array() {
            *rooms = json!([]);
        }
        let list = rooms.as_array_mut().expect("an array");
        if !list.iter().any(|r| r == room_id) {
            list.push(json!(room_id));
            self.hs.set_account_data(&self.user_id, "m.direct", &direct).await?;
        }
        Ok(())
    }
}

/// The direct chat a verification with another user happens in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectRoom {
    /// The room.
    pub room_id: String,
    /// Whether we just created it.
    pub created: bool,
    /// Whether the other user has joined (a request sent before they join may never be seen
    /// by clients that fetch a new member's keys after reading the room).
    pub other_joined: bool,
}
