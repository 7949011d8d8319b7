//! The device's state in one SQLite file (bundled SQLite), created owner-only: session, keys,
//! sync token, known devices, trust records and requests still waiting for an answer.
//!
//! With a passphrase ([`Store::open_with_passphrase`]) the secrets among the `kv` values
//! ([`SECRET_KEYS`]) are encrypted at rest by a [`StoreCipher`]; see [`crate::store_cipher`].
//!
//! Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (device
//! keys, Olm and Megolm sessions),
//! [Device verification](https://spec.matrix.org/v1.19/client-server-api/#device-verification) (trust records) and
//! [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework) (requests
//! and flows that outlive a restart).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use zeroize::Zeroizing;

use crate::store_cipher::{self, CIPHER_KV_KEY, CipherError, DEFAULT_ITERATIONS, SECRET_KEYS, StoreCipher};

/// A store failure.
///
/// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (the store
/// keeps the device's keys and Olm/Megolm sessions).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file or directory could not be created.
    #[error("store at {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store is encrypted and was opened without a passphrase.
    #[error("the store is encrypted: give its passphrase in $MXVERIFY_STORE_PASSPHRASE")]
    PassphraseNeeded,
    /// The passphrase does not open the store.
    #[error("wrong store passphrase")]
    WrongPassphrase,
    /// The store's encryption refused something: an empty passphrase, a damaged key record, a
    /// secret that was altered, moved from another name or written in the clear.
    #[error("store: {0}")]
    Cipher(CipherError),
    /// [`Store::get_secret`] or [`Store::set_secret`] of a name not in [`SECRET_KEYS`].
    #[error("store: {0:?} is not a secret name")]
    NotSecret(String),
    /// [`Store::change_passphrase`] of a store without one.
    #[error("the store is not encrypted (open it with a passphrase to encrypt it)")]
    NotEncrypted,
}

impl From<CipherError> for StoreError {
    fn from(e: CipherError) -> Self {
        match e {
            CipherError::WrongPassphrase => StoreError::WrongPassphrase,
            e => StoreError::Cipher(e),
        }
    }
}

/// One trusted key, and how it came to be trusted.
///
/// Serves: [Device verification](https://spec.matrix.org/v1.19/client-server-api/#device-verification) (what a
/// verification established).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TrustRecord {
    /// Whose key.
    pub user_id: String,
    /// The key ID (`ed25519:DEVICE` or `ed25519:<master key>`).
    pub key_id: String,
    /// The key.
    pub key: String,
    /// `device` or `master_key`.
    pub kind: String,
    /// The device it was verified with.
    pub device_id: String,
    /// `m.sas.v1` or `m.reciprocate.v1`.
    pub method: String,
    /// The flow.
    pub flow_id: String,
    /// When (ms since the epoch).
    pub verified_at: u64,
}

/// A request received and not yet answered.
///
/// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework) (a
/// request outlives a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRequest {
    /// The flow id.
    pub flow_id: String,
    /// The event as received (JSON with sender, type, content, room).
    pub event: String,
    /// When we received it.
    pub received_at: u64,
}

/// The store.
///
/// ```
/// use mxverify_client::{Store, TrustRecord};
///
/// let store = Store::open_in_memory()?;
/// store.add_trust(&TrustRecord {
///     user_id: "@bob:example.org".into(),
///     key_id: "ed25519:PHONE".into(),
///     key: "the device's Ed25519 key".into(),
///     kind: "device".into(),
///     device_id: "PHONE".into(),
///     method: "m.sas.v1".into(),
///     flow_id: "t1".into(),
///     verified_at: 0,
/// })?;
/// assert!(store.is_trusted("@bob:example.org", "the device's Ed25519 key")?);
/// assert!(!store.is_trusted("@bob:example.org", "another key")?);
/// # Ok::<(), mxverify_client::StoreError>(())
/// ```
///
/// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (device
/// keys, Olm and Megolm sessions) and
/// [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework) (trust
/// records, requests).
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// The data key, for an encrypted store.
    cipher: Option<StoreCipher>,
    /// PBKDF2 iterations for a key record written by this handle.
    iterations: u32,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).field("encrypted", &self.is_encrypted()).finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    user_id TEXT NOT NULL, device_id TEXT NOT NULL, ed25519 TEXT NOT NULL,
    cross_signed INTEGER NOT NULL, json TEXT NOT NULL, PRIMARY KEY (user_id, device_id));
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY, master_key TEXT, self_signing_key TEXT, user_signing_key TEXT, master_json TEXT);
CREATE TABLE IF NOT EXISTS trust (
    user_id TEXT NOT NULL, key_id TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL, device_id TEXT NOT NULL,
    method TEXT NOT NULL, flow_id TEXT NOT NULL, verified_at INTEGER NOT NULL, PRIMARY KEY (user_id, key_id, key));
CREATE TABLE IF NOT EXISTS pending (
    flow_id TEXT PRIMARY KEY, event TEXT NOT NULL, received_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS active (
    flow_id TEXT PRIMARY KEY, room_id TEXT, other_user TEXT NOT NULL, other_device TEXT);
CREATE TABLE IF NOT EXISTS olm_sessions (
    sender_key TEXT NOT NULL, session_id TEXT NOT NULL, pickle TEXT NOT NULL, created_at INTEGER NOT NULL,
    last_received INTEGER NOT NULL, PRIMARY KEY (sender_key, session_id));
CREATE TABLE IF NOT EXISTS inbound_group_sessions (
    room_id TEXT NOT NULL, session_id TEXT NOT NULL, sender_key TEXT NOT NULL, sender_ed25519 TEXT NOT NULL,
    sender_user TEXT NOT NULL, sender_device TEXT NOT NULL, pickle TEXT NOT NULL, first_index INTEGER NOT NULL,
    PRIMARY KEY (room_id, session_id));
CREATE TABLE IF NOT EXISTS megolm_indices (
    room_id TEXT NOT NULL, session_id TEXT NOT NULL, message_index INTEGER NOT NULL, event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, session_id, message_index));
CREATE TABLE IF NOT EXISTS outbound_group_sessions (
    room_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, pickle TEXT NOT NULL, created_at INTEGER NOT NULL,
    messages INTEGER NOT NULL, shared_with TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending_uploads (
    id INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT NOT NULL, body TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS held_room_events (
    event_id TEXT PRIMARY KEY, room_id TEXT NOT NULL, session_id TEXT NOT NULL, sender TEXT NOT NULL,
    event TEXT NOT NULL, received_at INTEGER NOT NULL, until INTEGER NOT NULL);
";

/// A flow in progress (past `ready`), remembered so that after a restart the other side can be
/// told it was lost.
///
/// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework) (a
/// flow lost in a restart is cancelled, see
/// [`m.key.verification.cancel`](https://spec.matrix.org/v1.19/client-server-api/#mkeyverificationcancel)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveFlow {
    /// The flow id (transaction id or request event id).
    pub flow_id: String,
    /// The room, for an in-room flow.
    pub room_id: Option<String>,
    /// The other user.
    pub other_user: String,
    /// The other device.
    pub other_device: Option<String>,
}

impl Store {
    /// Opens (or creates, owner-only) `dir/mxverify.sqlite3`, without a passphrase:
    /// [`Store::open_with_passphrase`] with `None`.
    ///
    /// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (the
    /// device's keys and sessions live here).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Self::open_with_passphrase(dir, None)
    }

    /// Opens (or creates, owner-only) `dir/mxverify.sqlite3`, with the store passphrase if one
    /// is given (`$MXVERIFY_STORE_PASSPHRASE`):
    ///
    /// - no passphrase, a store without one: as always, nothing encrypted;
    /// - a passphrase, a new store: encrypted from the start;
    /// - a passphrase, an existing store without one: its secrets ([`SECRET_KEYS`]) are
    ///   encrypted in place in one transaction, then the file is rewritten (`VACUUM`) and the WAL
    ///   emptied, so that no old plaintext is left in free pages or in the log;
    /// - an encrypted store without a passphrase: [`StoreError::PassphraseNeeded`];
    /// - a wrong passphrase: [`StoreError::WrongPassphrase`]; an empty one:
    ///   [`CipherError::EmptyPassphrase`].
    ///
    /// Each open with a passphrase costs one PBKDF2 derivation ([`DEFAULT_ITERATIONS`] rounds
    /// for a new record; an existing record's own count, at most
    /// [`store_cipher::MAX_ITERATIONS`]).
    ///
    /// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (the
    /// device's keys and sessions live here) and
    /// [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security).
    pub fn open_with_passphrase(dir: &Path, passphrase: Option<&str>) -> Result<Store, StoreError> {
        Self::open_with_kdf(dir, passphrase, DEFAULT_ITERATIONS)
    }

    /// [`Store::open_with_passphrase`], writing any new key record with `iterations` PBKDF2
    /// rounds (tests use a few).
    pub(crate) fn open_with_kdf(dir: &Path, passphrase: Option<&str>, iterations: u32) -> Result<Store, StoreError> {
        let mut store = Self::open_plain(dir)?;
        store.iterations = iterations;
        let record = store.raw_get(CIPHER_KV_KEY)?;
        if record.is_none() {
            // Without its key record, encrypted secrets would pass for plaintext.
            for name in SECRET_KEYS {
                if store.raw_get(name)?.is_some_and(|v| v.starts_with(store_cipher::VALUE_PREFIX)) {
                    return Err(CipherError::BadKeyRecord(format!("missing, though {name} is encrypted")).into());
                }
            }
        }
        match (record, passphrase) {
            (None, None) => {}
            (Some(_), None) => return Err(StoreError::PassphraseNeeded),
            (Some(record), Some(passphrase)) => store.cipher = Some(StoreCipher::import(passphrase, &record)?),
            (None, Some(passphrase)) => store.encrypt_in_place(passphrase)?,
        }
        Ok(store)
    }

    fn open_plain(dir: &Path) -> Result<Store, StoreError> {
        let io = |source| StoreError::Io { path: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("mxverify.sqlite3");
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
            // Create the file ourselves so it is never readable by others, even for a moment.
            std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path).map_err(io)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        let conn = Connection::open(&path)?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000;")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store { conn, path, cipher: None, iterations: DEFAULT_ITERATIONS })
    }

    /// Gives a store without a passphrase one: a new data key; every secret read, encrypted and
    /// written back together with the key record, in one transaction; then [`Store::scrub`].
    fn encrypt_in_place(&mut self, passphrase: &str) -> Result<(), StoreError> {
        let cipher = StoreCipher::generate();
        let record = cipher.export(passphrase, self.iterations)?;
        // Old cells are zeroed as they are replaced.
        self.conn.execute_batch("PRAGMA secure_delete = ON;")?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let get = |name: &str| -> Result<Option<Zeroizing<String>>, StoreError> {
            let v: Option<String> =
                tx.query_row("SELECT value FROM kv WHERE key = ?1", [name], |r| r.get(0)).optional()?;
            Ok(v.map(Zeroizing::new))
        };
        // Another process may have done it meanwhile.
        if let Some(theirs) = get(CIPHER_KV_KEY)? {
            drop(tx);
            self.cipher = Some(StoreCipher::import(passphrase, &theirs)?);
            return Ok(());
        }
        for name in SECRET_KEYS {
            if let Some(plain) = get(name)? {
                tx.execute("UPDATE kv SET value = ?2 WHERE key = ?1", [name, &cipher.encrypt(name, plain.as_bytes())])?;
            }
        }
        tx.execute("INSERT INTO kv (key, value) VALUES (?1, ?2)", [CIPHER_KV_KEY, &record])?;
        tx.commit()?;
        self.cipher = Some(cipher);
        self.scrub()
    }

    /// Rewrites the whole file (`VACUUM`: no free page or free space keeps an old value) and
    /// empties the WAL, which holds old page images until then. The WAL can only be emptied when
    /// no other connection is reading; otherwise SQLite reuses it from the start later.
    fn scrub(&self) -> Result<(), StoreError> {
        self.conn.execute_batch("VACUUM;")?;
        self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Whether the secrets are encrypted (the store was opened with its passphrase).
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security).
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// Changes the store passphrase: `old` is checked against the key record again, then a new
    /// data key replaces the old one, every secret is re-encrypted with it and the key record
    /// replaced, in one transaction; then the file is scrubbed as after a migration. (A new data
    /// key, so that a copy of the file taken before cannot be opened with the new passphrase,
    /// nor this file with the old one.)
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security).
    pub fn change_passphrase(&mut self, old: &str, new: &str) -> Result<(), StoreError> {
        let Some(current) = &self.cipher else { return Err(StoreError::NotEncrypted) };
        let record = self
            .raw_get(CIPHER_KV_KEY)?
            .ok_or_else(|| StoreError::Cipher(CipherError::BadKeyRecord("missing".into())))?;
        StoreCipher::import(old, &record)?;
        let fresh = StoreCipher::generate();
        let new_record = fresh.export(new, self.iterations)?;
        self.conn.execute_batch("PRAGMA secure_delete = ON;")?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for name in SECRET_KEYS {
            let v: Option<String> =
                tx.query_row("SELECT value FROM kv WHERE key = ?1", [name], |r| r.get(0)).optional()?;
            if let Some(v) = v {
                let plain = current.decrypt(name, &v)?;
                tx.execute("UPDATE kv SET value = ?2 WHERE key = ?1", [name, &fresh.encrypt(name, &plain)])?;
            }
        }
        tx.execute("UPDATE kv SET value = ?2 WHERE key = ?1", [CIPHER_KV_KEY, &new_record])?;
        tx.commit()?;
        self.cipher = Some(fresh);
        self.scrub()
    }

    /// A secret ([`SECRET_KEYS`] only): decrypted (and checked) in an encrypted store, as
    /// stored otherwise. An altered value, one moved from another name, or one written in the
    /// clear into an encrypted store is an error, never returned.
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security).
    pub fn get_secret(&self, name: &str) -> Result<Option<Zeroizing<String>>, StoreError> {
        if !store_cipher::is_secret(name) {
            return Err(StoreError::NotSecret(name.to_owned()));
        }
        let Some(stored) = self.raw_get(name)? else { return Ok(None) };
        match &self.cipher {
            Some(cipher) => Ok(Some(cipher.decrypt_string(name, &stored)?)),
            None => Ok(Some(Zeroizing::new(stored))),
        }
    }

    /// Sets a secret ([`SECRET_KEYS`] only): encrypted in an encrypted store, as given otherwise.
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security).
    pub fn set_secret(&self, name: &str, value: &str) -> Result<(), StoreError> {
        if !store_cipher::is_secret(name) {
            return Err(StoreError::NotSecret(name.to_owned()));
        }
        match &self.cipher {
            Some(cipher) => self.raw_set(name, &cipher.encrypt(name, value.as_bytes())),
            None => self.raw_set(name, value),
        }
    }

    /// A store in memory only (nothing survives it): for tests, fuzzing and short-lived tools.
    ///
    /// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (the
    /// device's keys and sessions live here).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn,
            path: PathBuf::from(":memory:"),
            cipher: None,
            iterations: crate::store_cipher::DEFAULT_ITERATIONS,
        })
    }

    /// The file.
    ///
    /// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (the
    /// device's keys and sessions live here).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A value. In an encrypted store, a secret name ([`SECRET_KEYS`]) goes through
    /// [`Store::get_secret`]: the decrypted value or an error, never the ciphertext. Prefer
    /// `get_secret`, whose result is wiped from memory when dropped.
    ///
    /// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (the
    /// device's keys and sessions live here).
    pub fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        if self.cipher.is_some() && store_cipher::is_secret(key) {
            return Ok(self.get_secret(key)?.map(|v| String::from(v.as_str())));
        }
        self.raw_get(key)
    }

    /// Sets a value. In an encrypted store, a secret name ([`SECRET_KEYS`]) goes through
    /// [`Store::set_secret`]: it is encrypted, never written in the clear.
    ///
    /// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (the
    /// device's keys and sessions live here).
    pub fn set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        if self.cipher.is_some() && store_cipher::is_secret(key) {
            return self.set_secret(key, value);
        }
        self.raw_set(key, value)
    }

    fn raw_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.conn.query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0)).optional()?)
    }

    fn raw_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
            [key, value],
        )?;
        Ok(())
    }

    /// Removes a value.
    ///
    /// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (the
    /// device's keys and sessions live here).
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM kv WHERE key = ?1", [key])?;
        Ok(())
    }

    /// Forgets everything: a new account or device starts from nothing, so that no key, trust
    /// record or session of the previous one can be mistaken for its own. An encrypted store
    /// stays encrypted, with the same passphrase (its key record is kept).
    ///
    /// Serves: [End-to-end encryption](https://spec.matrix.org/v1.19/client-server-api/#end-to-end-encryption) (a new
    /// device must not inherit another's keys).
    pub fn reset(&self) -> Result<(), StoreError> {
        self.conn.execute_batch(
            "BEGIN;
             DELETE FROM kv WHERE key <> 'store_cipher';
             DELETE FROM devices; DELETE FROM users; DELETE FROM trust; DELETE FROM pending;
             DELETE FROM active; DELETE FROM olm_sessions; DELETE FROM inbound_group_sessions;
             DELETE FROM megolm_indices; DELETE FROM outbound_group_sessions; DELETE FROM held_room_events;
             DELETE FROM pending_uploads;
             COMMIT;",
        )?;
        Ok(())
    }

    /// Replaces what we know of a user's keys (already checked).
    ///
    /// Serves: [Tracking the device list for a user](https://spec.matrix.org/v1.19/client-server-api/#tracking-the-device-list-for-a-user).
    pub fn save_user_keys(&mut self, user: &str, info: &crate::keys::UserKeyInfo) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM devices WHERE user_id = ?1", [user])?;
        for d in info.devices.values() {
            tx.execute(
                "INSERT INTO devices (user_id, device_id, ed25519, cross_signed, json) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![user, d.device_id, d.ed25519, d.cross_signed, d.json.to_string()],
            )?;
        }
        tx.execute(
            "INSERT INTO users (user_id, master_key, self_signing_key, user_signing_key, master_json) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(user_id) DO UPDATE SET master_key = ?2, self_signing_key = ?3, user_signing_key = ?4, master_json = ?5",
            params![
                user,
                info.master_key,
                info.self_signing_key,
                info.user_signing_key,
                info.master_json.as_ref().map(|j| j.to_string())
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records trusted keys.
    ///
    /// Serves: [Device verification](https://spec.matrix.org/v1.19/client-server-api/#device-verification).
    pub fn add_trust(&self, r: &TrustRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO trust (user_id, key_id, key, kind, device_id, method, flow_id, verified_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![r.user_id, r.key_id, r.key, r.kind, r.device_id, r.method, r.flow_id, r.verified_at as i64],
        )?;
        Ok(())
    }

    /// Every trust record (optionally of one user), oldest first.
    ///
    /// Serves: [Device verification](https://spec.matrix.org/v1.19/client-server-api/#device-verification).
    pub fn trust(&self, user: Option<&str>) -> Result<Vec<TrustRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT user_id, key_id, key, kind, device_id, method, flow_id, verified_at FROM trust
             WHERE ?1 IS NULL OR user_id = ?1 ORDER BY verified_at, user_id, key_id",
        )?;
        let rows = stmt.query_map([user], |r| {
            Ok(TrustRecord {
                user_id: r.get(0)?,
                key_id: r.get(1)?,
                key: r.get(2)?,
                kind: r.get(3)?,
                device_id: r.get(4)?,
                method: r.get(5)?,
                flow_id: r.get(6)?,
                verified_at: r.get::<_, i64>(7)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether this exact key of this user is trusted.
    ///
    /// Serves: [Device verification](https://spec.matrix.org/v1.19/client-server-api/#device-verification).
    pub fn is_trusted(&self, user: &str, key: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM trust WHERE user_id = ?1 AND key = ?2", [user, key], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Remembers a request waiting for our answer.
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
    pub fn add_pending(&self, p: &PendingRequest) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO pending (flow_id, event, received_at) VALUES (?1, ?2, ?3)",
            params![p.flow_id, p.event, p.received_at as i64],
        )?;
        Ok(())
    }

    /// Forgets a request (answered, cancelled or expired).
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
    pub fn remove_pending(&self, flow_id: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM pending WHERE flow_id = ?1", [flow_id])?;
        Ok(())
    }

    /// Remembers a flow in progress.
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
    pub fn add_active(&self, f: &ActiveFlow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO active (flow_id, room_id, other_user, other_device) VALUES (?1, ?2, ?3, ?4)",
            params![f.flow_id, f.room_id, f.other_user, f.other_device],
        )?;
        Ok(())
    }

    /// Forgets a flow that ended.
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
    pub fn remove_active(&self, flow_id: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM active WHERE flow_id = ?1", [flow_id])?;
        Ok(())
    }

    /// Flows that were in progress.
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
    pub fn active(&self) -> Result<Vec<ActiveFlow>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT flow_id, room_id, other_user, other_device FROM active")?;
        let rows = stmt.query_map([], |r| {
            Ok(ActiveFlow { flow_id: r.get(0)?, room_id: r.get(1)?, other_user: r.get(2)?, other_device: r.get(3)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Requests still waiting, oldest first.
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework).
    pub fn pending(&self) -> Result<Vec<PendingRequest>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT flow_id, event, received_at FROM pending ORDER BY received_at")?;
        let rows = stmt.query_map([], |r| {
            Ok(PendingRequest { flow_id: r.get(0)?, event: r.get(1)?, received_at: r.get::<_, i64>(2)? as u64 })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// One stored Olm session ([spec: `m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOlmSession {
    /// The other device's Curve25519 identity key.
    pub sender_key: String,
    /// The session ID.
    pub session_id: String,
    /// The encrypted pickle.
    pub pickle: String,
    /// When it was made (ms).
    pub created_at: u64,
    /// When it last decrypted a message (ms; 0 = never).
    pub last_received: u64,
}

/// One stored Megolm room key, bound to the device that sent it over Olm
/// ([spec: `m.room_key`](https://spec.matrix.org/v1.19/client-server-api/#mroom_key)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRoomKey {
    /// The room.
    pub room_id: String,
    /// The Megolm session ID.
    pub session_id: String,
    /// Curve25519 key of the Olm session that delivered it.
    pub sender_key: String,
    /// Ed25519 key of that device (the Olm payload's `keys.ed25519`).
    pub sender_ed25519: String,
    /// The owner of that device.
    pub sender_user: String,
    /// That device.
    pub sender_device: String,
    /// The encrypted pickle.
    pub pickle: String,
    /// The first message index it can decrypt.
    pub first_index: u32,
}

/// Our outbound Megolm session in one room.
///
/// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOutboundSession {
    /// The room.
    pub room_id: String,
    /// The session ID.
    pub session_id: String,
    /// The encrypted pickle.
    pub pickle: String,
    /// When it was made (ms).
    pub created_at: u64,
    /// Messages encrypted with it.
    pub messages: u64,
    /// The devices that have its key, as `user|device|curve25519`.
    pub shared_with: Vec<String>,
}

/// Which held events [`Store::held_room_events`] returns.
///
/// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (events that
/// wait for their room key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldSelection<'a> {
    /// Every one.
    All,
    /// Those that wait for this room key.
    Key {
        /// The room.
        room_id: &'a str,
        /// The Megolm session.
        session_id: &'a str,
    },
    /// Those of one sender.
    Sender(&'a str),
    /// Those whose time is up at this moment (ms).
    DueBy(u64),
}

/// An encrypted room event waiting for its room key.
///
/// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (events that
/// wait for their room key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldRoomEvent {
    /// The event ID.
    pub event_id: String,
    /// The room.
    pub room_id: String,
    /// The Megolm session it needs.
    pub session_id: String,
    /// Who sent it.
    pub sender: String,
    /// The whole event as received (JSON).
    pub event: String,
    /// When it arrived (ms).
    pub received_at: u64,
    /// When we give up on it (ms).
    pub until: u64,
}

impl Store {
    /// Saves the Olm account pickle and changed Olm sessions in one transaction: a new inbound
    /// session and the one-time key it used up are stored together or not at all.
    ///
    /// Serves: [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2),
    /// [One-time and fallback keys](https://spec.matrix.org/v1.19/client-server-api/#one-time-and-fallback-keys).
    pub fn save_olm(&mut self, account: Option<&str>, sessions: &[StoredOlmSession]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        if let Some(a) = account {
            tx.execute(
                "INSERT INTO kv (key, value) VALUES ('account', ?1) ON CONFLICT(key) DO UPDATE SET value = ?1",
                [a],
            )?;
        }
        for s in sessions {
            tx.execute(
                "INSERT OR REPLACE INTO olm_sessions (sender_key, session_id, pickle, created_at, last_received)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![s.sender_key, s.session_id, s.pickle, s.created_at as i64, s.last_received as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every Olm session.
    ///
    /// Serves: [`m.olm.v1.curve25519-aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#molmv1curve25519-aes-sha2).
    pub fn olm_sessions(&self) -> Result<Vec<StoredOlmSession>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT sender_key, session_id, pickle, created_at, last_received FROM olm_sessions")?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredOlmSession {
                sender_key: r.get(0)?,
                session_id: r.get(1)?,
                pickle: r.get(2)?,
                created_at: r.get::<_, i64>(3)? as u64,
                last_received: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Saves (or replaces) a room key.
    ///
    /// Serves: [`m.room_key`](https://spec.matrix.org/v1.19/client-server-api/#mroom_key).
    pub fn save_room_key(&self, k: &StoredRoomKey) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO inbound_group_sessions
             (room_id, session_id, sender_key, sender_ed25519, sender_user, sender_device, pickle, first_index)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                k.room_id,
                k.session_id,
                k.sender_key,
                k.sender_ed25519,
                k.sender_user,
                k.sender_device,
                k.pickle,
                k.first_index
            ],
        )?;
        Ok(())
    }

    /// A room key, if we have it.
    ///
    /// Serves: [`m.room_key`](https://spec.matrix.org/v1.19/client-server-api/#mroom_key).
    pub fn room_key(&self, room_id: &str, session_id: &str) -> Result<Option<StoredRoomKey>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT room_id, session_id, sender_key, sender_ed25519, sender_user, sender_device, pickle, first_index
                 FROM inbound_group_sessions WHERE room_id = ?1 AND session_id = ?2",
                [room_id, session_id],
                |r| {
                    Ok(StoredRoomKey {
                        room_id: r.get(0)?,
                        session_id: r.get(1)?,
                        sender_key: r.get(2)?,
                        sender_ed25519: r.get(3)?,
                        sender_user: r.get(4)?,
                        sender_device: r.get(5)?,
                        pickle: r.get(6)?,
                        first_index: r.get(7)?,
                    })
                },
            )
            .optional()?)
    }

    /// How many room keys we hold for a room.
    ///
    /// Serves: [`m.room_key`](https://spec.matrix.org/v1.19/client-server-api/#mroom_key).
    pub fn room_key_count(&self, room_id: &str) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM inbound_group_sessions WHERE room_id = ?1", [room_id], |r| {
            r.get::<_, i64>(0)
        })? as u64)
    }

    /// Records that `(room, session, index)` decrypted `event_id`; returns the event ID that
    /// index decrypted before, if it was another one: a replayed message index.
    ///
    /// Spec: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (guarding
    /// against replays by message index).
    pub fn record_megolm_index(
        &self,
        room_id: &str,
        session_id: &str,
        index: u32,
        event_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let previous: Option<String> = self
            .conn
            .query_row(
                "SELECT event_id FROM megolm_indices WHERE room_id = ?1 AND session_id = ?2 AND message_index = ?3",
                params![room_id, session_id, index],
                |r| r.get(0),
            )
            .optional()?;
        match previous {
            Some(p) if p != event_id => Ok(Some(p)),
            Some(_) => Ok(None),
            None => {
                self.conn.execute(
                    "INSERT INTO megolm_indices (room_id, session_id, message_index, event_id) VALUES (?1, ?2, ?3, ?4)",
                    params![room_id, session_id, index, event_id],
                )?;
                Ok(None)
            }
        }
    }

    /// Our outbound session in a room, if any.
    ///
    /// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2).
    pub fn outbound_session(&self, room_id: &str) -> Result<Option<StoredOutboundSession>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT room_id, session_id, pickle, created_at, messages, shared_with
                 FROM outbound_group_sessions WHERE room_id = ?1",
                [room_id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                },
            )
            .optional()?;
        Ok(row.map(|(room_id, session_id, pickle, created_at, messages, shared)| StoredOutboundSession {
            room_id,
            session_id,
            pickle,
            created_at: created_at as u64,
            messages: messages as u64,
            shared_with: serde_json::from_str(&shared).unwrap_or_default(),
        }))
    }

    /// Saves our outbound session in a room (replacing the previous one).
    ///
    /// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2).
    pub fn save_outbound_session(&self, s: &StoredOutboundSession) -> Result<(), StoreError> {
        let shared = serde_json::to_string(&s.shared_with).expect("a list of strings");
        self.conn.execute(
            "INSERT OR REPLACE INTO outbound_group_sessions (room_id, session_id, pickle, created_at, messages, shared_with)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![s.room_id, s.session_id, s.pickle, s.created_at as i64, s.messages as i64, shared],
        )?;
        Ok(())
    }

    /// Forgets our outbound session in a room (it must be rotated).
    ///
    /// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (rotation).
    pub fn delete_outbound_session(&self, room_id: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM outbound_group_sessions WHERE room_id = ?1", [room_id])?;
        Ok(())
    }

    /// Holds an encrypted event until its room key arrives.
    ///
    /// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (events
    /// that wait for their room key).
    pub fn hold_room_event(&self, h: &HeldRoomEvent) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO held_room_events (event_id, room_id, session_id, sender, event, received_at, until)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![h.event_id, h.room_id, h.session_id, h.sender, h.event, h.received_at as i64, h.until as i64],
        )?;
        Ok(())
    }

    /// Held events, oldest first: those waiting for one room key (`Key`), those of one sender
    /// (`Sender`), those due by a time (`DueBy`), or all of them.
    ///
    /// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (events
    /// that wait for their room key).
    pub fn held_room_events(&self, which: HeldSelection<'_>) -> Result<Vec<HeldRoomEvent>, StoreError> {
        let (clause, a, b): (&str, Option<String>, Option<String>) = match which {
            HeldSelection::All => ("1", None, None),
            HeldSelection::Key { room_id, session_id } => {
                ("room_id = ?1 AND session_id = ?2", Some(room_id.to_owned()), Some(session_id.to_owned()))
            }
            HeldSelection::Sender(s) => ("sender = ?1 AND ?2 IS NULL", Some(s.to_owned()), None),
            HeldSelection::DueBy(t) => ("until <= CAST(?1 AS INTEGER) AND ?2 IS NULL", Some(t.to_string()), None),
        };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT event_id, room_id, session_id, sender, event, received_at, until FROM held_room_events
             WHERE {clause} ORDER BY received_at, rowid"
        ))?;
        let rows = stmt.query_map(params![a, b], |r| {
            Ok(HeldRoomEvent {
                event_id: r.get(0)?,
                room_id: r.get(1)?,
                session_id: r.get(2)?,
                sender: r.get(3)?,
                event: r.get(4)?,
                received_at: r.get::<_, i64>(5)? as u64,
                until: r.get::<_, i64>(6)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// When the first held event is due, if any is held.
    ///
    /// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (events
    /// that wait for their room key).
    pub fn held_next_due(&self) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = self.conn.query_row("SELECT MIN(until) FROM held_room_events", [], |r| r.get(0))?;
        Ok(v.map(|v| v as u64))
    }

    /// Forgets a held event (decrypted, or given up on).
    ///
    /// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (events
    /// that wait for their room key).
    pub fn release_room_event(&self, event_id: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM held_room_events WHERE event_id = ?1", [event_id])?;
        Ok(())
    }

    /// Queues a signature upload (`POST /keys/signatures/upload` body) until the homeserver
    /// acknowledges it; `what` says what it signs, for reports.
    ///
    /// Serves: [`POST /keys/signatures/upload`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keyssignaturesupload).
    pub fn queue_upload(&self, what: &str, body: &serde_json::Value, now: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO pending_uploads (what, body, created_at) VALUES (?1, ?2, ?3)",
            params![what, body.to_string(), now as i64],
        )?;
        Ok(())
    }

    /// The queued uploads, oldest first: (id, what, body).
    ///
    /// Serves: [`POST /keys/signatures/upload`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keyssignaturesupload).
    pub fn queued_uploads(&self) -> Result<Vec<(i64, String, serde_json::Value)>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT id, what, body FROM pending_uploads ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, what, body) = row?;
            out.push((id, what, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)));
        }
        Ok(out)
    }

    /// The homeserver acknowledged (or refused for good) a queued upload.
    ///
    /// Serves: [`POST /keys/signatures/upload`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keyssignaturesupload).
    pub fn remove_upload(&self, id: i64) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM pending_uploads WHERE id = ?1", [id])?;
        Ok(())
    }

    /// How many events are held.
    ///
    /// Serves: [`m.megolm.v1.aes-sha2`](https://spec.matrix.org/v1.19/client-server-api/#mmegolmv1aes-sha2) (events
    /// that wait for their room key).
    pub fn held_count(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM held_room_events", [], |r| r.get::<_, i64>(0))? as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_only_and_persistent() {
        let dir = std::env::temp_dir().join(format!("mxverify-store-{}", std::process::id()));
        {
            let s = Store::open(&dir).unwrap();
            s.set("since", "s1").unwrap();
            s.set("since", "s2").unwrap();
            s.add_pending(&PendingRequest { flow_id: "f".into(), event: "{}".into(), received_at: 5 }).unwrap();
            let r = TrustRecord {
                user_id: "@u:x".into(),
                key_id: "ed25519:D".into(),
                key: "K".into(),
                kind: "device".into(),
                device_id: "D".into(),
                method: "m.sas.v1".into(),
                flow_id: "f".into(),
                verified_at: 7,
            };
            s.add_trust(&r).unwrap();
        }
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.get("since").unwrap().as_deref(), Some("s2"));
        assert_eq!(s.pending().unwrap().len(), 1);
        assert!(s.is_trusted("@u:x", "K").unwrap());
        assert!(!s.is_trusted("@u:x", "L").unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(s.path()).unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        }
        s.remove_pending("f").unwrap();
        assert!(s.pending().unwrap().is_empty());
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
