//! A Matrix device that verifies and is verified, and runs itself
//! ([spec: key verification](https://spec.matrix.org/v1.19/client-server-api/#device-verification)).
//!
//! [`Device`] is a handle: clone it, move it into tasks, call it from anywhere. Once
//! [`Device::start`]ed it syncs, decrypts, answers the homeserver, fires the protocol's deadlines
//! and sends what the verification machine asks by itself; the program reads what happens with
//! [`Device::next_event`] and acts with [`Device::accept`], [`Device::start_sas`],
//! [`Device::confirm`] and the rest, which send by themselves too.
//!
//! Inside, four kinds of work run side by side so that none waits for another: the `/sync` long
//! poll, the handling of each batch (item by item: one bad item is reported and skipped), one
//! sender that delivers the machine's messages in order, and a timer that fires the machine's
//! deadlines on time — also while a request to the homeserver is in flight. State lives behind one
//! lock that is never held across a network call.
//!
//! ```no_run
//! use mxverify_client::{Device, DeviceEvent};
//! use mxverify_proto::{Config, Event};
//!
//! # async fn bot() -> Result<(), mxverify_client::DeviceError> {
//! let device = Device::open(std::path::Path::new("/var/lib/bot"), Config::default())?;
//! device.start().await?;
//! while let Some(event) = device.next_event().await {
//!     if let DeviceEvent::Verification(Event::IncomingRequest { flow, .. }) = event {
//!         device.accept(&flow).await?;
//!     }
//! }
//! # Ok(()) }
//! ```

mod crypto;
mod incoming;
mod sharing;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mxverify_proto::{
    ActionError, Config, Destination, DropReason, Entropy, Event, FlowInfo, FlowKey, IncomingEvent, KeyKind, Machine,
    Outgoing, OwnIdentity, RoomContext,
};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use zeroize::Zeroizing;

use crate::cross_signing::{CrossSigningKeys, MASTER, SECRET_NAMES};
use crate::http::{Homeserver, HttpError};
use crate::keys::{self, UserKeyInfo};
use crate::megolm::{MegolmError, RoomEncryption};
use crate::olm::{Olm, OlmError};
use crate::secrets::OpenRequest;
use crate::store::{ActiveFlow, PendingRequest, Store, StoreError, TrustRecord};

pub use sharing::Bootstrap;

/// The wall clock in milliseconds, for the machine.
///
/// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)
/// (the clock the flows' timeouts run on).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Randomness from the operating system.
///
/// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) and
/// [SAS verification](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification)
/// (every key and random value comes from it).
#[derive(Debug, Default, Clone, Copy)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        // Without a working OS RNG no key may be made at all; stopping is the only safe answer.
        getrandom::fill(buf).expect("the operating system's random number generator failed");
    }
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    OsEntropy.fill(&mut b);
    b
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    OsEntropy.fill(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// What can go wrong with the device.
///
/// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)
/// and [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (what a
/// verifying device can fail at).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    Action(#[from] ActionError),
    /// Another mxverify process is using this state directory.
    #[error("another mxverify process is using the state directory {0}; one process per device")]
    Busy(String),
    /// End-to-end encryption failed for something we send.
    #[error("encryption: {0}")]
    Encryption(String),
    /// Secret storage refused: no storage, a wrong recovery key, a secret that does not match.
    #[error("{0}")]
    Secrets(String),
    /// The request cannot be made this way.
    #[error("{0}")]
    Refused(String),
    /// The homeserver refused the user name or password (or the account is deactivated).
    #[error("the homeserver refused the user name or password ({0}); check them and try again")]
    LoginRefused(String),
    /// The homeserver no longer accepts this device's login.
    #[error("{0}")]
    LoggedOut(String),
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
///
/// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) and
/// [Direct messaging](https://spec.matrix.org/v1.19/client-server-api/#direct-messaging) (what the device did about
/// rooms, keys and encrypted events).
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
    pub(crate) fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), room: None }
    }

    pub(crate) fn in_room(kind: &'static str, room: &str, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), room: Some(room.to_owned()) }
    }
}

/// Whether the homeserver can be reached.
///
/// Serves: [Syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing) (the state of the long poll).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Connection {
    /// `/sync` works.
    Online,
    /// `/sync` fails; the device keeps trying.
    Unreachable {
        /// Why the last attempt failed.
        reason: String,
        /// When the next attempt is made (ms since the epoch).
        retry_at: u64,
    },
}

/// What the device tells the program.
///
/// Spec: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// A verification event from the machine ([`mxverify_proto::Event`]).
    Verification(Event),
    /// Something the device did or refused by itself.
    Notice(Notice),
    /// The homeserver became unreachable, or reachable again.
    Connection(Connection),
    /// A request we made could not be sent (the room refused us, the other user never joined).
    RequestFailed {
        /// The flow, if it existed yet.
        flow: Option<FlowKey>,
        /// Who we wanted to verify.
        user_id: String,
        /// Why.
        reason: String,
        /// Whether it was because time ran out.
        timed_out: bool,
    },
    /// The device stopped for good: its login is no longer valid (log in again).
    LoggedOut(String),
}

/// How long an encrypted room event waits for its room key: as long as a flow may take.
pub(crate) const HOLD_FOR_ROOM_KEY_MS: u64 = 10 * 60 * 1000;
/// How soon the same user's keys are asked for again when nothing says they changed: a peer
/// that names new devices of theirs over and over cannot keep us querying.
const REQUERY_KEYS_MS: u64 = 10_000;
/// How many messages may be on their way to the homeserver at once (from different flows).
const SENDS_IN_FLIGHT: usize = 8;
/// How long a to-device flow whose `done` we sent is remembered across restarts.
const FINISHED_KEPT_MS: u64 = 10 * 60 * 1000;

/// Our `done` for this flow is about to leave, and the other side may finish with it: a restart
/// must neither cancel the flow nor answer its last messages as unknown.
fn record_finished(store: &Store, flow: &FlowKey) -> Result<(), StoreError> {
    store.remove_active(flow.flow_id())?;
    if let FlowKey::ToDevice { user_id, transaction_id } = flow {
        let now = now_ms();
        let mut list = finished_flows(store);
        list.retain(|(_, _, at)| now.saturating_sub(*at) < FINISHED_KEPT_MS);
        list.push((user_id.clone(), transaction_id.clone(), now));
        let excess = list.len().saturating_sub(256);
        list.drain(..excess);
        store.set("finished_flows", &json!(list).to_string())?;
    }
    Ok(())
}

/// The to-device flows we sent `done` for lately: (other user, transaction ID, when).
fn finished_flows(store: &Store) -> Vec<(String, String, u64)> {
    store.get("finished_flows").ok().flatten().and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default()
}

/// Held while a process drives this device: two processes syncing and answering for one device
/// would race for the same events and the same store.
///
/// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)
/// (one process answers the device's verification messages).
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] std::fs::File);

impl StateLock {
    /// Takes the lock of a state directory, or fails at once if another process holds it.
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)
    /// (one process answers the device's verification messages).
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

/// `MXVERIFY_TEST_FAULT`, read only in builds with the `test-hooks` feature.
fn test_fault() -> Option<String> {
    if cfg!(feature = "test-hooks") {
        std::env::var("MXVERIFY_TEST_FAULT").ok().filter(|f| !f.is_empty())
    } else {
        None
    }
}

/// The demo's attacker (and, in test builds, `MXVERIFY_TEST_FAULT`): alters an outgoing message so that
/// a peer's answer to a wrong `commitment` (`"commitment"`), a wrong `mac` (`"mac"`) or an unknown
/// start method (`"unknown_method"`) can be seen. Returns whether it changed anything.
///
/// Serves: [SAS error and exception handling](https://spec.matrix.org/v1.19/client-server-api/#error-and-exception-handling)
/// (it shows how a peer cancels a bad message).
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

/// Sync filter: only what verification needs (to-device messages; verification, message and
/// encrypted events in room timelines; memberships, to see invites, joins and leaves; and each
/// room's encryption settings).
///
/// Spec: [Filtering](https://spec.matrix.org/v1.19/client-server-api/#filtering),
/// [Syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing).
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

/// A request waiting for the other user to join the direct chat.
#[derive(Debug, Clone)]
pub(crate) struct AwaitingJoin {
    pub(crate) room_id: String,
    pub(crate) user: String,
    pub(crate) deadline: u64,
}

/// Everything the device knows, behind one lock (never held across a network call).
pub(crate) struct State {
    pub(crate) store: Store,
    pub(crate) machine: Machine,
    pub(crate) olm: Olm,
    pub(crate) cross: CrossSigningKeys,
    pub(crate) known: HashMap<String, UserKeyInfo>,
    pub(crate) methods: HashMap<FlowKey, String>,
    pub(crate) room_encryption: HashMap<String, Option<RoomEncryption>>,
    pub(crate) room_members: HashMap<String, Vec<String>>,
    pub(crate) open_secret_requests: Vec<OpenRequest>,
    pub(crate) secret_linger_until: Option<u64>,
    pub(crate) awaiting_join: Vec<AwaitingJoin>,
    /// Joins seen for requests that wait for them.
    pub(crate) joined: HashSet<(String, String)>,
    pub(crate) flow_timeout: u64,
    pub(crate) keys_asked_at: HashMap<String, u64>,
    pub(crate) keys_in_flight: HashSet<String>,
    pub(crate) encrypt_to_device: bool,
    pub(crate) next_txn: u64,
}

pub(crate) struct Inner {
    me: std::sync::Weak<Inner>,
    pub(crate) hs: Homeserver,
    pub(crate) user_id: String,
    pub(crate) device_id: String,
    st: Mutex<State>,
    pub(crate) events: mpsc::UnboundedSender<DeviceEvent>,
    outbox: mpsc::UnboundedSender<Outgoing>,
    outbox_rx: Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
    wake: Notify,
    upload_wake: Notify,
    txn_prefix: String,
    test_fault: Option<String>,
    started: std::sync::atomic::AtomicBool,
    /// Messages queued for the sender and not yet delivered (or given up on).
    unsent: std::sync::atomic::AtomicUsize,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A logged-in device (a cheap handle: clone it freely; all clones drive the same device).
///
/// Spec: [Device verification](https://spec.matrix.org/v1.19/client-server-api/#device-verification),
/// [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework),
/// [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption).
#[derive(Clone)]
pub struct Device {
    pub(crate) inner: Arc<Inner>,
    events: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<DeviceEvent>>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("user_id", &self.inner.user_id)
            .field("device_id", &self.inner.device_id)
            .finish_non_exhaustive()
    }
}

// A device is meant to be moved into tasks of a multi-threaded runtime.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Device>();
};

/// How a device is opened: what the machine supports, the store passphrase, and whether plain
/// `http://` may be used for a homeserver on another machine.
///
/// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)
/// (the machine's configuration),
/// [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security) (the store
/// passphrase) and [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards) (HTTPS).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Options {
    /// The verification machine's configuration (methods, timeouts).
    pub config: Config,
    /// Encrypts the secrets at rest (access token, cross-signing keys, Olm pickle key); an
    /// existing store is encrypted in place the first time it is given.
    pub store_passphrase: Option<Zeroizing<String>>,
    /// Allow `http://` for a homeserver that is not on this machine (never by default).
    pub allow_insecure_http: bool,
}

impl Options {
    /// With this machine configuration.
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)
    /// (the machine's configuration).
    pub fn new(config: Config) -> Self {
        Self { config, ..Self::default() }
    }

    /// With a store passphrase.
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
    /// (private keys kept encrypted at rest).
    pub fn with_store_passphrase(mut self, passphrase: Option<&str>) -> Self {
        self.store_passphrase = passphrase.map(|p| Zeroizing::new(p.to_owned()));
        self
    }

    /// Allowing plain `http://` to another machine.
    ///
    /// Spec: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards) (HTTPS recommended, plain
    /// HTTP for tests).
    pub fn allow_insecure_http(mut self, allow: bool) -> Self {
        self.allow_insecure_http = allow;
        self
    }
}

impl From<Config> for Options {
    fn from(config: Config) -> Self {
        Self::new(config)
    }
}

/// How to log in.
///
/// Spec: [Login](https://spec.matrix.org/v1.19/client-server-api/#login),
/// [`POST /login`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3login),
/// [`GET /account/whoami`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3accountwhoami).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Credentials {
    /// User name (or full user ID) and password.
    Password {
        /// The user.
        user: String,
        /// The password.
        password: String,
        /// Reuse or choose this device ID.
        device_id: Option<String>,
    },
    /// An access token from an existing login (its user and device are asked of the server).
    AccessToken(String),
}

impl Inner {
    /// This device, for work that outlives the call (spawned tasks).
    pub(crate) fn arc(&self) -> Arc<Inner> {
        self.me.upgrade().expect("an Inner is only ever reached through its Arc")
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held left the state as it was at that point; carry on.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn notice(&self, n: Notice) {
        let _ = self.events.send(DeviceEvent::Notice(n));
    }

    pub(crate) fn emit(&self, e: DeviceEvent) {
        let _ = self.events.send(e);
    }

    pub(crate) fn next_txn(&self, st: &mut State, what: &str) -> String {
        st.next_txn += 1;
        format!("mxv{}-{what}{}", self.txn_prefix, st.next_txn)
    }
}

impl Device {
    /// Logs in and sets the device up: a fresh (or, for the same device, the stored) identity,
    /// signed device keys and one-time keys uploaded, a sync filter. A state directory holds one
    /// account: logging in as another user there is refused unless `replace`, which starts afresh.
    ///
    /// Spec: [Client authentication](https://spec.matrix.org/v1.19/client-server-api/#client-authentication),
    /// [`POST /login`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3login),
    /// [Device keys](https://spec.matrix.org/v1.19/client-server-api/#device-keys),
    /// [One-time and fallback keys](https://spec.matrix.org/v1.19/client-server-api/#one-time-and-fallback-keys).
    pub async fn login(
        dir: &Path,
        homeserver: &str,
        credentials: Credentials,
        replace: bool,
        options: impl Into<Options>,
    ) -> Result<Device, DeviceError> {
        let options = options.into();
        let store = Store::open_with_passphrase(dir, options.store_passphrase.as_deref().map(String::as_str))?;
        // A wrong URL should fail fast; later calls get the patient default policy.
        let mut hs = Homeserver::new_checked(homeserver, None, options.allow_insecure_http)?;
        let probe = hs.clone().with_retry(crate::http::Retry {
            attempts: 3,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(1),
        });
        probe.versions().await?;
        let (user_id, device_id, token) = match credentials {
            Credentials::Password { user, password, device_id } => {
                match hs.login(&user, &password, device_id.as_deref()).await {
                    Ok(v) => v,
                    Err(e) if e.is_login_refused() || e.errcode() == Some("M_USER_DEACTIVATED") => {
                        return Err(DeviceError::LoginRefused(e.errcode().unwrap_or("M_FORBIDDEN").to_owned()));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Credentials::AccessToken(token) => {
                hs.set_token(token.clone());
                let (user_id, device_id) = hs.whoami().await?;
                let device_id = device_id.ok_or_else(|| {
                    DeviceError::Refused("this access token belongs to no device (the server names none)".into())
                })?;
                (user_id, device_id, token)
            }
        };
        hs.set_token(token.clone());
        let stored_user = store.get("user_id")?;
        if let Some(previous) = &stored_user
            && *previous != user_id
            && !replace
        {
            return Err(DeviceError::Refused(format!(
                "this state directory belongs to {previous}; use another --state-dir, or pass --replace to forget that account here"
            )));
        }
        let same_device =
            stored_user.as_deref() == Some(&user_id) && store.get("device_id")?.as_deref() == Some(&device_id);
        if !same_device {
            // A new device (or account): nothing of the previous one is kept.
            store.reset()?;
        }
        store.set("homeserver", homeserver)?;
        store.set("user_id", &user_id)?;
        store.set("device_id", &device_id)?;
        store.set("access_token", &token)?;
        drop(store);
        let device = Device::open(dir, options)?;
        // A logout deletes the device and its keys on the server: logging in again as the same
        // device must publish them again, or no one can verify it.
        if same_device && !device.keys_published().await? {
            device.inner.lock().store.delete("keys_uploaded")?;
        }
        device.upload_device_keys().await?;
        device.filter_id().await?;
        Ok(device)
    }

    /// Whether the homeserver holds this device's Ed25519 key as we made it.
    async fn keys_published(&self) -> Result<bool, DeviceError> {
        let (me, device) = (&self.inner.user_id, &self.inner.device_id);
        let resp = self.inner.hs.keys_query(&[me.as_str()]).await?;
        let key = &resp["device_keys"][me][device]["keys"][format!("ed25519:{device}")];
        Ok(key.as_str() == Some(self.ed25519().as_str()))
    }

    /// Opens the stored session (no network).
    ///
    /// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (the
    /// device's keys and sessions come back from the store).
    pub fn open(dir: &Path, options: impl Into<Options>) -> Result<Device, DeviceError> {
        let Options { config, store_passphrase, .. } = options.into();
        let mut store = Store::open_with_passphrase(dir, store_passphrase.as_deref().map(String::as_str))?;
        let need = |store: &Store, k: &str| -> Result<String, DeviceError> {
            store.get(k)?.ok_or_else(|| DeviceError::NotLoggedIn(dir.display().to_string()))
        };
        let homeserver = need(&store, "homeserver")?;
        let user_id = need(&store, "user_id")?;
        let device_id = need(&store, "device_id")?;
        let token = Zeroizing::new(need(&store, "access_token")?);
        let pickle_key = match store.get("pickle_key")?.and_then(|k| mxverify_proto::b64::decode32(&k)) {
            Some(k) => k,
            None => {
                let k = random_bytes::<32>();
                store.set("pickle_key", &mxverify_proto::b64::encode(k))?;
                k
            }
        };
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
            ed25519: olm.ed25519().parse().map_err(|_| DeviceError::Corrupt("the device key".into()))?,
            master_key: cross.public(MASTER).and_then(|k| k.parse().ok()),
            trusts_master_key: cross.get(MASTER).is_some(),
        };
        let config_flow_timeout = config.timeouts.flow;
        let machine = Machine::new(own, config, Box::new(OsEntropy));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
        let state = State {
            store,
            machine,
            olm,
            cross,
            known: HashMap::new(),
            methods: HashMap::new(),
            room_encryption: HashMap::new(),
            room_members: HashMap::new(),
            open_secret_requests,
            secret_linger_until: None,
            awaiting_join: Vec::new(),
            joined: HashSet::new(),
            flow_timeout: config_flow_timeout,
            keys_asked_at: HashMap::new(),
            keys_in_flight: HashSet::new(),
            encrypt_to_device: false,
            next_txn: 0,
        };
        let inner = |me: &std::sync::Weak<Inner>| Inner {
            me: me.clone(),
            hs: Homeserver::new(&homeserver, Some(token.to_string())),
            user_id,
            device_id,
            st: Mutex::new(state),
            events: events_tx,
            outbox: outbox_tx,
            outbox_rx: Mutex::new(Some(outbox_rx)),
            wake: Notify::new(),
            upload_wake: Notify::new(),
            txn_prefix: random_hex(6),
            test_fault: test_fault(),
            started: std::sync::atomic::AtomicBool::new(false),
            unsent: std::sync::atomic::AtomicUsize::new(0),
            tasks: Mutex::new(Vec::new()),
        };
        Ok(Device { inner: Arc::new_cyclic(inner), events: Arc::new(tokio::sync::Mutex::new(events_rx)) })
    }

    /// Our user ID.
    ///
    /// Spec: [User identifiers](https://spec.matrix.org/v1.19/appendices/#user-identifiers).
    pub fn user_id(&self) -> &str {
        &self.inner.user_id
    }

    /// Our device ID.
    ///
    /// Spec: [Relationship between access tokens and devices](https://spec.matrix.org/v1.19/client-server-api/#relationship-between-access-tokens-and-devices).
    pub fn device_id(&self) -> &str {
        &self.inner.device_id
    }

    /// The homeserver's base URL.
    ///
    /// Spec: [Well-known URIs](https://spec.matrix.org/v1.19/client-server-api/#well-known-uris) (the homeserver base
    /// URL).
    pub fn homeserver(&self) -> &str {
        self.inner.hs.base()
    }

    /// Our Ed25519 device key.
    ///
    /// Spec: [Device keys](https://spec.matrix.org/v1.19/client-server-api/#device-keys).
    pub fn ed25519(&self) -> String {
        self.inner.lock().olm.ed25519()
    }

    /// Our Curve25519 identity key.
    ///
    /// Spec: [Device keys](https://spec.matrix.org/v1.19/client-server-api/#device-keys).
    pub fn curve25519(&self) -> String {
        self.inner.lock().olm.curve25519()
    }

    /// Our master key, if this device holds its private part.
    ///
    /// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
    pub fn master_key(&self) -> Option<String> {
        self.inner.lock().cross.public(MASTER)
    }

    /// The secret names of the cross-signing private keys this device holds.
    ///
    /// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing),
    /// [Secrets](https://spec.matrix.org/v1.19/client-server-api/#secrets).
    pub fn cross_signing_keys_held(&self) -> Vec<&'static str> {
        let st = self.inner.lock();
        SECRET_NAMES.into_iter().filter(|n| st.cross.get(n).is_some()).collect()
    }

    /// Whether to-device verification messages we send are Olm-encrypted (default: no, as
    /// matrix-js-sdk and matrix-rust-sdk send them; encrypted ones are always understood).
    ///
    /// Spec: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework),
    /// [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2).
    pub fn set_encrypt_to_device(&self, on: bool) {
        self.inner.lock().encrypt_to_device = on;
    }

    /// What we know of a user's keys (after [`Device::query_keys`]).
    ///
    /// Spec: [`POST /keys/query`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysquery),
    /// [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
    pub fn known(&self, user: &str) -> Option<UserKeyInfo> {
        self.inner.lock().known.get(user).cloned()
    }

    /// What this device verified (the trust records), optionally of one user.
    ///
    /// Serves: [Device verification](https://spec.matrix.org/v1.19/client-server-api/#device-verification) (what this
    /// device verified).
    pub fn trust(&self, user: Option<&str>) -> Result<Vec<TrustRecord>, DeviceError> {
        Ok(self.inner.lock().store.trust(user)?)
    }

    /// Whether this exact key of this user was verified by this device.
    ///
    /// Serves: [Device verification](https://spec.matrix.org/v1.19/client-server-api/#device-verification) (what this
    /// device verified).
    pub fn is_trusted(&self, user: &str, key: &str) -> bool {
        self.inner.lock().store.is_trusted(user, key).unwrap_or(false)
    }

    /// A view of one flow.
    ///
    /// Spec: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
    pub fn flow(&self, key: &FlowKey) -> Option<FlowInfo> {
        self.inner.lock().machine.flow(key)
    }

    /// Every flow the device remembers that has not ended.
    ///
    /// Spec: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
    pub fn active_flows(&self) -> Vec<FlowInfo> {
        let st = self.inner.lock();
        st.machine.flows().filter_map(|k| st.machine.flow(k)).filter(|f| f.cancel.is_none() && !f.verified).collect()
    }

    /// `/keys/upload` of our signed device keys (once per device) with a first supply of signed
    /// one-time keys and a fallback key.
    ///
    /// Spec: [`POST /keys/upload`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysupload),
    /// [Device keys](https://spec.matrix.org/v1.19/client-server-api/#device-keys),
    /// [One-time and fallback keys](https://spec.matrix.org/v1.19/client-server-api/#one-time-and-fallback-keys).
    pub async fn upload_device_keys(&self) -> Result<(), DeviceError> {
        let body = {
            let mut st = self.inner.lock();
            let st = &mut *st;
            if st.store.get("keys_uploaded")?.as_deref() == Some(&self.inner.device_id) {
                return Ok(());
            }
            let mut body = st.olm.keys_to_upload(&mut st.store, 0, Some(false))?.unwrap_or_else(|| json!({}));
            body["device_keys"] = st.olm.device_keys();
            body
        };
        self.inner.hs.keys_upload(&body).await?;
        let mut st = self.inner.lock();
        let st = &mut *st;
        st.olm.mark_keys_published(&mut st.store)?;
        st.store.set("keys_uploaded", &self.inner.device_id)?;
        Ok(())
    }

    /// The sync filter id (created again whenever the filter changed).
    ///
    /// Spec: [Filtering](https://spec.matrix.org/v1.19/client-server-api/#filtering),
    /// [`POST /user/{userId}/filter`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3useruseridfilter).
    pub async fn filter_id(&self) -> Result<String, DeviceError> {
        let wanted = sync_filter().to_string();
        {
            let st = self.inner.lock();
            if let (Some(f), Some(stored)) = (st.store.get("filter_id")?, st.store.get("filter")?)
                && stored == wanted
            {
                return Ok(f);
            }
        }
        let f = self.inner.hs.create_filter(&self.inner.user_id, &sync_filter()).await?;
        let st = self.inner.lock();
        st.store.set("filter_id", &f)?;
        st.store.set("filter", &wanted)?;
        Ok(f)
    }

    /// `/keys/query` with every signature checked; the result goes to the store and the machine.
    ///
    /// Spec: [`POST /keys/query`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysquery),
    /// [Tracking the device list for a user](https://spec.matrix.org/v1.19/client-server-api/#tracking-the-device-list-for-a-user),
    /// [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
    pub async fn query_keys(&self, users: &[String]) -> Result<(), DeviceError> {
        self.inner.query_keys(users).await
    }

    /// The devices of `user` we could verify (other than this one).
    ///
    /// Spec: [`POST /keys/query`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysquery),
    /// [Device keys](https://spec.matrix.org/v1.19/client-server-api/#device-keys).
    pub async fn devices_of(&self, user: &str) -> Result<Vec<String>, DeviceError> {
        self.query_keys(&[user.to_owned()]).await?;
        let st = self.inner.lock();
        let devices: Vec<String> = st
            .known
            .get(user)
            .map(|k| {
                k.devices
                    .keys()
                    .filter(|d| !(user == self.inner.user_id && **d == self.inner.device_id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if devices.is_empty() {
            return Err(DeviceError::UnknownUser(user.to_owned()));
        }
        Ok(devices)
    }

    /// Joins a room we were invited to.
    ///
    /// Spec: [Joining rooms](https://spec.matrix.org/v1.19/client-server-api/#joining-rooms),
    /// [`POST /join/{roomIdOrAlias}`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3joinroomidoralias).
    pub async fn join(&self, room: &str) -> Result<(), DeviceError> {
        Ok(self.inner.hs.join(room).await?)
    }

    /// Starts the device: flows lost by an earlier run are ended (the other side is told), requests
    /// that waited while we were stopped are replayed (expired ones reported), and syncing
    /// begins. Needs a tokio runtime with the time and I/O drivers.
    ///
    /// Spec: [Syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing),
    /// [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
    pub async fn start(&self) -> Result<(), DeviceError> {
        if self.inner.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let me = self.inner.user_id.clone();
        if let Err(e) = self.query_keys(std::slice::from_ref(&me)).await {
            self.inner.notice(Notice::new("keys", format!("could not fetch our own keys yet: {e}")));
        }
        let filter = self.filter_id().await?;
        self.inner.abandon_lost_flows();
        self.inner.restore_pending();
        let rx = self.inner.outbox_rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut tasks = Vec::new();
        if let Some(rx) = rx {
            tasks.push(tokio::spawn(Inner::sender(self.inner.clone(), rx)));
        }
        tasks.push(tokio::spawn(Inner::timer(self.inner.clone())));
        tasks.push(tokio::spawn(Inner::uploader(self.inner.clone())));
        tasks.push(tokio::spawn(Inner::syncer(self.inner.clone(), filter)));
        self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()).extend(tasks);
        self.inner.flush();
        Ok(())
    }

    /// Stops after delivering what is already queued (a last cancel or `done`, the signatures of
    /// a verification: they must not wait for the next start): waits up to 10 s, then stops
    /// everything. Signatures not uploaded by then stay queued for the next start.
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)
    /// (a last `cancel` or `done` still reaches the other side).
    pub async fn shutdown(&self) {
        let end = now_ms() + 10_000;
        let busy = || {
            self.inner.unsent.load(std::sync::atomic::Ordering::SeqCst) > 0
                || self.inner.lock().store.queued_uploads().is_ok_and(|q| !q.is_empty())
        };
        while busy() && now_ms() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop();
    }

    /// Stops syncing, sending and the timer at once (queued messages may be lost: see
    /// [`Device::shutdown`]).
    ///
    /// Serves: [Syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing) (the long poll stops).
    pub fn stop(&self) {
        for t in self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
    }

    /// The next thing that happened; `None` once every handle is gone.
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)
    /// (the events a person answers).
    pub async fn next_event(&self) -> Option<DeviceEvent> {
        self.events.lock().await.recv().await
    }

    /// The next event if one is waiting, without waiting.
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)
    /// (the events a person answers).
    pub fn try_next_event(&self) -> Option<DeviceEvent> {
        self.events.try_lock().ok()?.try_recv().ok()
    }

    fn act(&self, f: impl FnOnce(&mut Machine, u64) -> Result<(), ActionError>) -> Result<(), DeviceError> {
        {
            let mut st = self.inner.lock();
            // The machine ends whatever is due at `now` before it acts.
            f(&mut st.machine, now_ms())?;
        }
        self.inner.flush();
        Ok(())
    }

    /// Accepts an incoming request (sends `ready`) or a legacy start.
    ///
    /// Spec: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework),
    /// [`m.key.verification.ready`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationready).
    pub async fn accept(&self, flow: &FlowKey) -> Result<(), DeviceError> {
        self.act(|m, now| m.accept(flow, now))
    }

    /// Starts SAS in a ready flow.
    ///
    /// Spec: [SAS verification](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification),
    /// [`m.key.verification.start` with `m.sas.v1`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationstartmsasv1).
    pub async fn start_sas(&self, flow: &FlowKey) -> Result<(), DeviceError> {
        let result = self.act(|m, now| m.start_sas(flow, now));
        if let Err(DeviceError::Action(ActionError::KeysUnknown { user_id, .. })) = &result {
            let user = user_id.clone();
            self.query_keys(std::slice::from_ref(&user)).await?;
            return self.act(|m, now| m.start_sas(flow, now));
        }
        result
    }

    /// The person says the emoji or numbers match (or that the other device showed success).
    ///
    /// Spec: [SAS verification](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification),
    /// [QR codes](https://spec.matrix.org/v1.19/client-server-api/#qr-codes).
    pub async fn confirm(&self, flow: &FlowKey) -> Result<(), DeviceError> {
        self.act(|m, now| m.confirm(flow, now))
    }

    /// The person says they differ.
    ///
    /// Spec: [SAS verification](https://spec.matrix.org/v1.19/client-server-api/#short-authentication-string-sas-verification),
    /// [SAS error and exception handling](https://spec.matrix.org/v1.19/client-server-api/#error-and-exception-handling).
    pub async fn mismatch(&self, flow: &FlowKey) -> Result<(), DeviceError> {
        self.act(|m, now| m.mismatch(flow, now))
    }

    /// Cancels (or declines) a flow.
    ///
    /// Spec: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework),
    /// [`m.key.verification.cancel`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationcancel).
    pub async fn cancel(&self, flow: &FlowKey) -> Result<(), DeviceError> {
        self.act(|m, now| m.cancel(flow, now))
    }

    /// Scans the other device's QR code (its raw payload).
    ///
    /// Spec: [QR codes](https://spec.matrix.org/v1.19/client-server-api/#qr-codes).
    pub async fn scan_qr(&self, flow: &FlowKey, payload: &[u8]) -> Result<(), DeviceError> {
        self.act(|m, now| m.scan_qr(flow, payload, now))
    }

    /// Asks `user` to verify, to-device: the named devices, or all of theirs (other than this one).
    /// Returns the flow.
    ///
    /// Spec: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework),
    /// [`m.key.verification.request`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationrequest).
    pub async fn request_to_device(&self, user: &str, devices: Option<&[String]>) -> Result<FlowKey, DeviceError> {
        let all = self.devices_of(user).await?;
        let devices = match devices {
            Some(named) => {
                if let Some(d) = named.iter().find(|d| !all.contains(d)) {
                    return Err(DeviceError::UnknownDevice { user: user.into(), device: d.clone() });
                }
                named.to_vec()
            }
            None => all,
        };
        let key = {
            let mut st = self.inner.lock();
            st.machine.request_to_device(user, &devices, now_ms())?
        };
        self.inner.flush();
        Ok(key)
    }

    /// Asks `user` to verify in a room. In-room verification is for another user: our own
    /// devices verify to-device. The flow appears with the `RequestSent` event once the
    /// homeserver gave the request its event ID.
    ///
    /// Spec: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework),
    /// [`m.room.message` with `msgtype: m.key.verification.request`](https://spec.matrix.org/v1.19/client-server-api/#mroommessagemkeyverificationrequest).
    pub async fn request_in_room(&self, user: &str, room_id: &str) -> Result<(), DeviceError> {
        if user == self.inner.user_id {
            return Err(DeviceError::Refused(
                "your own devices verify each other to-device, not in a room: leave out --room".into(),
            ));
        }
        self.devices_of(user).await?;
        self.inner.send_room_request(room_id, user);
        Ok(())
    }

    /// Asks `user` to verify in our direct chat with them ([`Device::dm_room`]): at once if they
    /// are in it, otherwise as soon as they join (within the flow timeout; a
    /// [`DeviceEvent::RequestFailed`] says if they never do).
    ///
    /// Spec: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework),
    /// [`m.room.message` with `msgtype: m.key.verification.request`](https://spec.matrix.org/v1.19/client-server-api/#mroommessagemkeyverificationrequest),
    /// [Direct messaging](https://spec.matrix.org/v1.19/client-server-api/#direct-messaging).
    pub async fn request_in_dm(&self, user: &str) -> Result<DirectRoom, DeviceError> {
        if user == self.inner.user_id {
            return Err(DeviceError::Refused("your own devices verify each other to-device".into()));
        }
        // Someone with no device to verify gets no room made for nothing.
        self.devices_of(user).await?;
        let dm = self.dm_room(user).await?;
        if dm.other_joined {
            self.inner.send_room_request(&dm.room_id, user);
        } else {
            let mut st = self.inner.lock();
            let deadline = now_ms() + st.flow_timeout;
            st.awaiting_join.push(AwaitingJoin { room_id: dm.room_id.clone(), user: user.to_owned(), deadline });
            drop(st);
            self.inner.notice(Notice::in_room(
                "waiting_for_join",
                &dm.room_id,
                format!("waiting for {user} to join {} before asking", dm.room_id),
            ));
            self.inner.wake.notify_one();
        }
        Ok(dm)
    }

    /// When the device has something due that a command waiting for its end should stay for
    /// (secret sharing right after a verification with our own device); `None` if nothing.
    ///
    /// Serves: [Secrets › Sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing) (secrets shared right
    /// after a self-verification).
    pub fn busy_until(&self) -> Option<u64> {
        let now = now_ms();
        let st = self.inner.lock();
        let waiting =
            st.open_secret_requests.iter().map(|r| r.created_at + sharing::SECRET_LINGER_MS).filter(|t| *t > now).max();
        st.secret_linger_until.filter(|t| *t > now).max(waiting)
    }
}

/// The direct chat a verification with another user happens in.
///
/// Spec: [Direct messaging](https://spec.matrix.org/v1.19/client-server-api/#direct-messaging).
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

impl Inner {
    /// The machine's in-room request to `user` in `room_id`, handed to the sender.
    pub(crate) fn send_room_request(&self, room_id: &str, user: &str) {
        self.lock().machine.request_in_room(room_id, user, now_ms());
        self.flush();
    }

    /// `/keys/query` with every signature checked; the result goes to the store and the machine.
    /// Users whose server the homeserver could not reach keep their last known keys.
    pub(crate) async fn query_keys(&self, users: &[String]) -> Result<(), DeviceError> {
        if users.is_empty() {
            return Ok(());
        }
        let refs: Vec<&str> = users.iter().map(String::as_str).collect();
        let resp = self.hs.keys_query(&refs).await?;
        self.apply_keys(users, &resp, now_ms())?;
        self.flush();
        Ok(())
    }

    /// A `/keys/query` answer for `users`, checked and taken in. A user whose server did not
    /// answer (listed in `failures`) keeps the keys we knew.
    pub(crate) fn apply_keys(&self, users: &[String], resp: &Value, now: u64) -> Result<(), DeviceError> {
        let failed: BTreeSet<String> =
            resp["failures"].as_object().map(|f| f.keys().cloned().collect()).unwrap_or_default();
        let mut notices = Vec::new();
        {
            let mut st = self.lock();
            for user in users {
                let server = user.split_once(':').map(|(_, s)| s).unwrap_or_default();
                if failed.contains(server) {
                    notices.push(Notice::new(
                        "keys",
                        format!("{server} did not answer for {user}'s keys; keeping what we knew"),
                    ));
                    continue;
                }
                let info = keys::check_user(resp, user);
                for r in &info.rejected {
                    notices.push(Notice::new("keys", format!("ignored a key of {user}: {r}")));
                }
                st.store.save_user_keys(user, &info)?;
                let for_machine = info.for_machine();
                st.keys_asked_at.insert(user.clone(), now);
                st.known.insert(user.clone(), info);
                if *user == self.user_id {
                    // Our identity first: the flows our keys move on (a ready flow that can show a
                    // QR code now) read our master key from it.
                    refresh_own_identity(&mut st, &self.user_id, &self.device_id);
                }
                st.machine.update_user_keys(user, for_machine, now);
            }
        }
        for n in notices {
            self.notice(n);
        }
        Ok(())
    }

    /// Whether a background key query for `user` may start now: not while one is in flight, and
    /// not again within a few seconds of the last (unless `/sync` says the keys changed).
    pub(crate) fn claim_key_query(&self, user: &str, now: u64) -> bool {
        let mut st = self.lock();
        let recent = st.keys_asked_at.get(user).is_some_and(|t| now.saturating_sub(*t) < REQUERY_KEYS_MS);
        !recent && st.keys_in_flight.insert(user.to_owned())
    }

    /// Keys the machine asked for: fetched in the background, at most every few seconds per user
    /// unless `/sync` says they changed.
    pub(crate) fn want_keys(&self, user: &str) {
        if !self.claim_key_query(user, now_ms()) {
            return;
        }
        let inner = self.arc();
        let user = user.to_owned();
        tokio::spawn(async move {
            if let Err(e) = inner.query_keys(std::slice::from_ref(&user)).await {
                inner.notice(Notice::new("keys", format!("could not fetch the keys of {user}: {e}")));
            }
            let mut st = inner.lock();
            st.keys_in_flight.remove(&user);
            st.keys_asked_at.insert(user, now_ms());
        });
    }

    /// Takes what the machine produced: events are handled first (what must be remembered is
    /// stored before the message that announces it leaves), then its messages go to the sender,
    /// in order. `raw` is the incoming event being handled, for a request to remember.
    pub(crate) fn flush(&self) {
        self.flush_with(None);
    }

    pub(crate) fn flush_with(&self, raw: Option<(&Value, u64)>) {
        self.flush_inner(raw);
        // New deadlines may be earlier than the one the timer sleeps for.
        self.wake.notify_one();
    }

    fn flush_inner(&self, raw: Option<(&Value, u64)>) {
        let mut follow = Vec::new();
        let events = {
            let mut st = self.lock();
            let mut events = Vec::new();
            while let Some(event) = st.machine.poll_event() {
                if let Err(e) = self.remember(&mut st, &event, raw) {
                    self.notice(Notice::new("store", format!("could not record {}: {e}", event_name(&event))));
                }
                events.push(event);
            }
            while let Some(out) = st.machine.poll_outgoing() {
                // Once our `done` may be out, the other side can finish: a restart must not cancel
                // the flow. Recorded before the message leaves, as everything else.
                if out.event_type == "m.key.verification.done"
                    && let Some(flow) = &out.flow
                    && let Err(e) = record_finished(&st.store, flow)
                {
                    self.notice(Notice::new("store", format!("could not record a finished flow: {e}")));
                }
                self.unsent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = self.outbox.send(out);
            }
            events
        };
        for event in events {
            match &event {
                Event::KeysNeeded { user_id } => follow.push(Follow::Keys(user_id.clone())),
                Event::DoneSent { .. } => follow.push(Follow::Upload),
                Event::Done { user_id, device_id, .. } if *user_id == self.user_id => {
                    follow.push(Follow::OwnDevice(device_id.clone()));
                }
                Event::Dropped { sender, event_type, reason } => {
                    if let Some(why) = lost_verification(reason) {
                        self.notice(Notice::new("dropped", format!("{event_type} from {sender} was not taken: {why}")));
                    }
                }
                _ => {}
            }
            self.emit(DeviceEvent::Verification(event));
        }
        for f in follow {
            match f {
                Follow::Keys(user) => self.want_keys(&user),
                Follow::Upload => self.upload_wake.notify_one(),
                Follow::OwnDevice(device) => {
                    let inner = self.arc();
                    tokio::spawn(async move {
                        if let Err(e) = inner.after_own_verification(&device).await {
                            inner.notice(Notice::new("secret_request", format!("could not ask for the keys: {e}")));
                        }
                    });
                }
            }
        }
    }

    /// What is remembered of a machine event, before anything it leads to is sent.
    fn remember(&self, st: &mut State, event: &Event, raw: Option<(&Value, u64)>) -> Result<(), DeviceError> {
        match event {
            Event::IncomingRequest { flow, .. } => {
                if let Some((raw, received_at)) = raw {
                    st.store.add_pending(&PendingRequest {
                        flow_id: flow.flow_id().to_owned(),
                        event: raw.to_string(),
                        received_at,
                    })?;
                }
            }
            Event::Started { flow, method, .. } => {
                st.methods.insert(flow.clone(), method.to_string());
                st.store.remove_pending(flow.flow_id())?;
            }
            Event::Ready { flow, other_device, .. } => {
                st.store.remove_pending(flow.flow_id())?;
                let other_user = st.machine.flow(flow).map(|f| f.other_user).unwrap_or_default();
                st.store.add_active(&ActiveFlow {
                    flow_id: flow.flow_id().to_owned(),
                    room_id: match flow {
                        FlowKey::Room { room_id, .. } => Some(room_id.clone()),
                        _ => None,
                    },
                    other_user,
                    other_device: Some(other_device.clone()),
                })?;
            }
            Event::Cancelled { flow, .. } => {
                st.store.remove_pending(flow.flow_id())?;
                st.store.remove_active(flow.flow_id())?;
            }
            // The outcome is recorded when our `done` is about to leave, not when theirs arrives: a
            // device stopped in between keeps what it verified (the other side already trusts us).
            Event::DoneSent { flow, user_id, device_id, keys } => {
                st.store.remove_pending(flow.flow_id())?;
                st.store.remove_active(flow.flow_id())?;
                let method = st.methods.get(flow).cloned().unwrap_or_else(|| "m.sas.v1".into());
                for k in keys {
                    st.store.add_trust(&TrustRecord {
                        user_id: user_id.clone(),
                        key_id: k.key_id.clone(),
                        key: k.key.to_string(),
                        kind: match k.kind {
                            KeyKind::Device => "device".into(),
                            _ => "master_key".into(),
                        },
                        device_id: device_id.clone(),
                        method: method.clone(),
                        flow_id: flow.flow_id().to_owned(),
                        verified_at: now_ms(),
                    })?;
                }
                if *user_id == self.user_id {
                    refresh_own_identity(st, &self.user_id, &self.device_id);
                }
                // The signatures that make the result visible everywhere are queued with the trust
                // record, and uploaded until the homeserver has them.
                if let Some(body) = self.signatures_for(st, user_id, keys) {
                    st.store.queue_upload(user_id, &body, now_ms())?;
                }
            }
            Event::Done { flow, user_id, .. } => {
                st.store.remove_pending(flow.flow_id())?;
                st.store.remove_active(flow.flow_id())?;
                if *user_id == self.user_id {
                    refresh_own_identity(st, &self.user_id, &self.device_id);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The cross-signing signatures for what was verified
    /// ([cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing)): another
    /// device of ours with our self-signing key, another user's master key with our user-signing
    /// key. A key with no canonical JSON form is reported, not signed.
    fn signatures_for(&self, st: &State, user: &str, verified: &[mxverify_proto::VerifiedKey]) -> Option<Value> {
        let own = user == self.user_id;
        let (name, what) = if own {
            (crate::cross_signing::SELF_SIGNING, "self-signing")
        } else {
            (crate::cross_signing::USER_SIGNING, "user-signing")
        };
        let Some(signer) = st.cross.get(name) else {
            self.notice(Notice::new(
                "signatures",
                format!("this device does not hold our {what} key, so the verification was not signed (run `mxverify cross-signing bootstrap` or `recover`)"),
            ));
            return None;
        };
        let signer_pub = signer.public_key().to_base64();
        let mut body = serde_json::Map::new();
        for k in verified {
            let (object, key) = match (own, &k.kind) {
                (true, KeyKind::Device) => {
                    let device = k.key_id.trim_start_matches("ed25519:");
                    match st.known.get(user).and_then(|i| i.devices.get(device)) {
                        Some(info) if info.ed25519 == k.key => (info.json.clone(), device.to_owned()),
                        _ => continue,
                    }
                }
                (false, KeyKind::MasterKey) => {
                    match st.known.get(user).and_then(|i| i.master_json.clone().zip(i.master_key.clone())) {
                        Some((obj, msk)) if msk == k.key => (obj, k.key.to_string()),
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
                Err(why) => self.notice(Notice::new("signatures", format!("did not sign {}: {why}", k.key_id))),
            }
        }
        (!body.is_empty()).then_some(Value::Object(body))
    }

    /// Feeds one incoming (decrypted) event to the machine and handles what follows.
    pub(crate) fn feed(&self, incoming: IncomingEvent, now: u64) {
        if self.finished_before_restart(&incoming) {
            return;
        }
        let raw = json!({"sender": incoming.sender, "type": incoming.event_type, "content": incoming.content,
            "room": incoming.room.as_ref().map(|r| json!({"room_id": r.room_id, "event_id": r.event_id,
                "origin_server_ts": r.origin_server_ts, "relates_to_fallback": r.relates_to_fallback}))});
        {
            // The machine ends whatever is due at `now` before it takes the event in.
            self.lock().machine.receive(incoming, now);
        }
        self.flush_with(Some((&raw, now)));
    }

    /// A to-device verification message (the other side's `done`, typically) for a flow we sent
    /// `done` for before a restart: the machine no longer knows the flow and would answer it with
    /// `m.unknown_transaction`. It is ignored instead. (In rooms, unknown flows are never answered.)
    fn finished_before_restart(&self, e: &IncomingEvent) -> bool {
        let id = match e.content["transaction_id"].as_str() {
            Some(id) if e.room.is_none() && e.event_type.starts_with("m.key.verification.") => id,
            _ => return false,
        };
        let st = self.lock();
        let key = FlowKey::ToDevice { user_id: e.sender.clone(), transaction_id: id.to_owned() };
        st.machine.flow(&key).is_none()
            && finished_flows(&st.store).iter().any(|(user, txn, _)| *user == e.sender && txn == id)
    }

    /// Flows that were in progress when the program stopped cannot go on (their keys were in
    /// memory): tell the other side, rather than leaving it to wait for its timeout.
    fn abandon_lost_flows(&self) {
        let now = now_ms();
        {
            let mut st = self.lock();
            let lost = st.store.active().unwrap_or_default();
            for f in lost {
                let key = match &f.room_id {
                    Some(room_id) => FlowKey::Room { room_id: room_id.clone(), event_id: f.flow_id.clone() },
                    None => FlowKey::ToDevice { user_id: f.other_user.clone(), transaction_id: f.flow_id.clone() },
                };
                st.machine.abandon(key, &f.other_user, f.other_device.clone(), now);
                let _ = st.store.remove_active(&f.flow_id);
            }
        }
        self.flush();
    }

    /// Replays requests that were waiting when the program stopped, as received then; those past
    /// their deadline come back as expired (cancelled with `m.timeout`, nothing sent).
    fn restore_pending(&self) {
        let pending = self.lock().store.pending().unwrap_or_default();
        for p in pending {
            let Ok(v) = serde_json::from_str::<Value>(&p.event) else {
                let _ = self.lock().store.remove_pending(&p.flow_id);
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
            self.lock().machine.receive(incoming, p.received_at);
            self.flush();
        }
        self.lock().machine.handle_timeout(now_ms());
        self.flush();
    }

    /// Delivers the machine's messages. Each flow's messages go out one after another, in order,
    /// and so do all of one room's (its encryption ratchet allows nothing else); different flows
    /// are delivered side by side, a few at a time, so that many verifications at once do not
    /// queue behind each other. A message the homeserver refuses ends its flow alone, reported.
    async fn sender(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(SENDS_IN_FLIGHT));
        let mut lanes: HashMap<String, mpsc::UnboundedSender<Outgoing>> = HashMap::new();
        while let Some(out) = rx.recv().await {
            let lane = match (&out.destination, &out.flow) {
                (Destination::Room { room_id }, _) => format!("room {room_id}"),
                (_, Some(flow)) => format!("flow {}", flow.flow_id()),
                _ => format!("message {}", out.id),
            };
            lanes.retain(|_, tx| !tx.is_closed());
            let mut out = Some(out);
            while let Some(o) = out.take() {
                let tx = lanes.entry(lane.clone()).or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(Inner::lane(self.clone(), rx, slots.clone()));
                    tx
                });
                // A lane that just went idle and closed: open it again.
                if let Err(mpsc::error::SendError(o)) = tx.send(o) {
                    lanes.remove(&lane);
                    out = Some(o);
                }
            }
        }
    }

    /// One lane of the sender: its messages in order; it closes after a while without any.
    async fn lane(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Outgoing>, slots: Arc<tokio::sync::Semaphore>) {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
            let Ok(Some(out)) = next else {
                rx.close();
                // Anything that slipped in before the close is still delivered.
                while let Ok(out) = rx.try_recv() {
                    self.deliver(out, &slots).await;
                }
                return;
            };
            self.deliver(out, &slots).await;
        }
    }

    async fn deliver(&self, mut out: Outgoing, slots: &tokio::sync::Semaphore) {
        let _slot = slots.acquire().await;
        if let Some(fault) = &self.test_fault {
            let event_type = out.event_type;
            out.content.edit(|content| {
                apply_fault(fault, event_type, content);
            });
        }
        // The same outgoing id always gives the same transaction id, so a retried request is
        // delivered once.
        let txn = format!("mxv{}-{}", self.txn_prefix, out.id);
        match self.send_one(&out, &txn).await {
            Ok(Some(event_id)) if out.flow.is_none() && out.event_type == "m.room.message" => {
                let sent = self.lock().machine.room_event_sent(out.id, &event_id, now_ms());
                if let Err(e) = sent {
                    self.notice(Notice::new("send", format!("the request's flow could not be opened: {e}")));
                }
                self.flush();
            }
            Ok(_) => {}
            Err(e) => self.send_failed(&out, e),
        }
        self.unsent.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn send_failed(&self, out: &Outgoing, e: DeviceError) {
        let (user, room) = match &out.destination {
            Destination::ToDevice { user_id, .. } => (user_id.clone(), None),
            Destination::Room { room_id } => (String::new(), Some(room_id.clone())),
            _ => (String::new(), None),
        };
        let what = format!(
            "could not send {}{}: {e}",
            out.event_type,
            room.as_deref().map(|r| format!(" in {r}")).unwrap_or_default()
        );
        match &out.flow {
            Some(flow) => {
                let user = self.lock().machine.flow(flow).map(|f| f.other_user).unwrap_or(user);
                // The flow cannot go on without this message; end it here (a cancel would meet the
                // same refusal, so none is sent when the room refused us).
                let ended = {
                    let mut st = self.lock();
                    let active = st.machine.flow(flow).is_some_and(|f| f.cancel.is_none() && !f.verified);
                    if active && out.event_type != "m.key.verification.cancel" {
                        st.machine.abandon(flow.clone(), &user, None, now_ms());
                        true
                    } else {
                        false
                    }
                };
                self.emit(DeviceEvent::RequestFailed {
                    flow: Some(flow.clone()),
                    user_id: user,
                    reason: what,
                    timed_out: false,
                });
                if ended {
                    self.flush();
                }
            }
            None => {
                let user = out.content.to_value()["to"].as_str().map(str::to_owned).unwrap_or(user);
                self.emit(DeviceEvent::RequestFailed { flow: None, user_id: user, reason: what, timed_out: false });
            }
        }
    }

    /// One message: to-device (Olm-encrypted if asked) or in a room (Megolm-encrypted if the
    /// room is). Returns the event ID of a room message.
    async fn send_one(&self, out: &Outgoing, txn: &str) -> Result<Option<String>, DeviceError> {
        // The HTTP layer and the encryption take a `Value` (network-bound; one parse is nothing).
        let content = out.content.to_value();
        match &out.destination {
            Destination::ToDevice { user_id, device_ids } => {
                let encrypt = self.lock().encrypt_to_device;
                if encrypt {
                    let per_device = self.olm_encrypt_for(user_id, device_ids, out.event_type, &content).await?;
                    if !per_device.is_empty() {
                        self.hs
                            .send_to_device("m.room.encrypted", txn, &json!({ user_id.clone(): per_device }))
                            .await?;
                    }
                } else {
                    let per_device: serde_json::Map<String, Value> =
                        device_ids.iter().map(|d| (d.clone(), content.clone())).collect();
                    self.hs.send_to_device(out.event_type, txn, &json!({ user_id.clone(): per_device })).await?;
                }
                Ok(None)
            }
            Destination::Room { room_id } => {
                let event_id = match self.room_encryption(room_id).await? {
                    Some(settings) => {
                        let content = self.megolm_encrypt(room_id, &settings, out.event_type, &content).await?;
                        self.hs.room_send(room_id, "m.room.encrypted", txn, &content).await?
                    }
                    None => self.hs.room_send(room_id, out.event_type, txn, &content).await?,
                };
                Ok(Some(event_id))
            }
            // The core has no other destination; nothing to send for one it may add.
            _ => Ok(None),
        }
    }

    /// Uploads queued signatures (also those left by an earlier run), retrying with growing
    /// pauses until the homeserver has them.
    async fn uploader(self: Arc<Self>) {
        let mut pause = Duration::from_secs(2);
        loop {
            if self.upload_queued().await {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.upload_wake.notified() => {}
                }
                pause = (pause * 2).min(Duration::from_secs(300));
            } else {
                pause = Duration::from_secs(2);
                self.upload_wake.notified().await;
            }
        }
    }

    /// Fires the machine's deadlines on time, whatever else is going on.
    async fn timer(self: Arc<Self>) {
        loop {
            let (deadline, expired_joins) = {
                let mut st = self.lock();
                let now = now_ms();
                st.machine.handle_timeout(now);
                let _ = self.expire_held(&mut st, now);
                let (expired, waiting): (Vec<AwaitingJoin>, Vec<AwaitingJoin>) =
                    std::mem::take(&mut st.awaiting_join).into_iter().partition(|w| w.deadline <= now);
                st.awaiting_join = waiting;
                let held = st.store.held_next_due().ok().flatten();
                let join = st.awaiting_join.iter().map(|w| w.deadline).min();
                let linger = st.secret_linger_until.filter(|t| *t > now);
                ([st.machine.next_deadline(), held, join, linger].into_iter().flatten().min(), expired)
            };
            for w in expired_joins {
                self.emit(DeviceEvent::RequestFailed {
                    flow: None,
                    user_id: w.user.clone(),
                    reason: format!(
                        "{} did not join the direct chat {} in time; no request was sent",
                        w.user, w.room_id
                    ),
                    timed_out: true,
                });
            }
            // Not `flush`: that wakes this timer, which would then never sleep.
            self.flush_inner(None);
            let wait = deadline.map(|d| d.saturating_sub(now_ms())).unwrap_or(60_000).min(60_000);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait.max(1))) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

enum Follow {
    Keys(String),
    Upload,
    OwnDevice(String),
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::IncomingRequest { .. } => "an incoming request",
        Event::Ready { .. } => "a ready flow",
        Event::Done { .. } => "a verification",
        _ => "an event",
    }
}

/// Why the machine gave up a verification message, for the drops worth a notice: a bound it keeps
/// against floods, or keys that never came (the other reasons are routine: duplicates, our own
/// echoes, late messages for ended flows).
fn lost_verification(reason: &DropReason) -> Option<&'static str> {
    match reason {
        DropReason::FlowLimit => {
            Some("its sender already has as many verifications with this device as one user may, all in progress")
        }
        DropReason::MachineFull => {
            Some("this device already holds as many verifications as it may (max_flows), all in progress")
        }
        DropReason::HoldLimit => Some("too many messages already wait for their senders' keys"),
        DropReason::KeysNeverArrived => Some("its sender's keys never arrived"),
        _ => None,
    }
}

/// Our identity for the machine: the published master key, trusted if we hold its private
/// key or verified it.
pub(crate) fn refresh_own_identity(st: &mut State, user_id: &str, device_id: &str) {
    let published = st.known.get(user_id).and_then(|k| k.master_key.clone());
    let held = st.cross.public(MASTER);
    let master_key = published.or_else(|| held.clone());
    let trusts = match &master_key {
        Some(k) => held.as_ref() == Some(k) || st.store.is_trusted(user_id, k).unwrap_or(false),
        None => false,
    };
    let Ok(ed25519) = st.olm.ed25519().parse() else { return };
    st.machine.set_own_identity(OwnIdentity {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        ed25519,
        master_key: master_key.and_then(|k| k.parse().ok()),
        trusts_master_key: trusts,
    });
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use vodozemac::Ed25519SecretKey;

    use super::*;

    /// A device opened from a store that looks logged in (no network is used).
    fn offline_device() -> Device {
        offline_device_with(Config::default())
    }

    fn offline_device_with(config: Config) -> Device {
        let dir = std::env::temp_dir().join(format!("mxverify-offline-{}-{}", std::process::id(), random_hex(4)));
        let store = Store::open(&dir).unwrap();
        for (k, v) in
            [("homeserver", "http://127.0.0.1:9"), ("user_id", "@me:x"), ("device_id", "ME"), ("access_token", "t")]
        {
            store.set(k, v).unwrap();
        }
        drop(store);
        Device::open(&dir, config).unwrap()
    }

    fn keys_answer(user: &str, device: &str, key: &Ed25519SecretKey) -> Value {
        let mut d = json!({"user_id": user, "device_id": device, "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": {format!("ed25519:{device}"): key.public_key().to_base64()}});
        keys::sign_with(&mut d, user, device, key).unwrap();
        json!({"device_keys": {user: {device: d}}})
    }

    #[test]
    fn the_device_and_its_futures_can_move_between_threads() {
        fn send<T: Send>(_: &T) {}
        let device = offline_device();
        // What a program spawns on a multi-threaded runtime: starting, waiting for events, acting.
        send(&device.start());
        send(&device.next_event());
        let flow = FlowKey::ToDevice { user_id: "@a:x".into(), transaction_id: "t".into() };
        send(&device.accept(&flow));
        send(&device.request_in_dm("@a:x"));
        send(&device.bootstrap_cross_signing(None, false));
        let moved = std::thread::spawn(move || device.user_id().to_owned()).join().unwrap();
        assert_eq!(moved, "@me:x");
    }

    /// A request the machine drops for its bound on flows is reported as a `dropped` notice; a
    /// routine drop (a duplicate) is not. (A runtime, since unknown senders' keys are asked for in
    /// the background.)
    #[tokio::test]
    async fn a_request_dropped_for_a_full_machine_is_reported() {
        let device = offline_device_with(Config { max_flows: 2, ..Config::default() });
        let request = |user: &str| IncomingEvent {
            sender: user.into(),
            event_type: "m.key.verification.request".into(),
            content: json!({"from_device": "D", "methods": ["m.sas.v1"], "timestamp": 1_000, "transaction_id": "t"}),
            room: None,
        };
        let dropped = |device: &Device| {
            std::iter::from_fn(|| device.try_next_event())
                .filter_map(|e| match e {
                    DeviceEvent::Notice(n) if n.kind == "dropped" => Some(n.message),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        for user in ["@a:x", "@b:x"] {
            device.inner.feed(request(user), 1_000);
        }
        device.inner.feed(request("@a:x"), 1_000);
        assert!(dropped(&device).is_empty(), "a duplicate is routine");
        device.inner.feed(request("@c:x"), 1_000);
        let notices = dropped(&device);
        assert!(matches!(&notices[..], [m] if m.contains("@c:x") && m.contains("max_flows")), "{notices:?}");
    }

    #[test]
    fn a_server_that_did_not_answer_keeps_the_keys_we_knew() {
        let device = offline_device();
        let users = vec!["@peer:other".to_owned()];
        device.inner.apply_keys(&users, &keys_answer("@peer:other", "P", &Ed25519SecretKey::new()), 1).unwrap();
        assert!(device.known("@peer:other").unwrap().devices.contains_key("P"));
        device.inner.apply_keys(&users, &json!({"failures": {"other": {}}, "device_keys": {}}), 2).unwrap();
        assert!(device.known("@peer:other").unwrap().devices.contains_key("P"), "not wiped by a failure");
        // An answer that does come replaces them.
        device.inner.apply_keys(&users, &json!({"device_keys": {}}), 3).unwrap();
        assert!(device.known("@peer:other").unwrap().devices.is_empty());
    }

    #[test]
    fn background_key_queries_are_one_at_a_time_and_not_too_often() {
        let device = offline_device();
        let inner = &device.inner;
        assert!(inner.claim_key_query("@peer:x", 1_000));
        assert!(!inner.claim_key_query("@peer:x", 1_001), "one in flight");
        assert!(inner.claim_key_query("@other:x", 1_001), "per user");
        {
            let mut st = inner.lock();
            st.keys_in_flight.remove("@peer:x");
            st.keys_asked_at.insert("@peer:x".into(), 2_000);
        }
        assert!(!inner.claim_key_query("@peer:x", 2_000 + REQUERY_KEYS_MS - 1), "not again so soon");
        assert!(inner.claim_key_query("@peer:x", 2_000 + REQUERY_KEYS_MS));
    }
}
