//! The device's state in one SQLite file (bundled SQLite), created owner-only: session, keys,
//! sync token, known devices, trust records and requests still waiting for an answer.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

/// A store failure.
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
}

/// One trusted key, and how it came to be trusted.
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
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
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
";

/// A flow in progress (past `ready`), remembered so that after a restart the other side can be
/// told it was lost.
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
    /// Opens (or creates, owner-only) `dir/mxverify.sqlite3`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
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
        Ok(Store { conn, path })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A value.
    pub fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.conn.query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0)).optional()?)
    }

    /// Sets a value.
    pub fn set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
            [key, value],
        )?;
        Ok(())
    }

    /// Removes a value.
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM kv WHERE key = ?1", [key])?;
        Ok(())
    }

    /// Replaces what we know of a user's keys (already checked).
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
    pub fn add_trust(&self, r: &TrustRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO trust (user_id, key_id, key, kind, device_id, method, flow_id, verified_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![r.user_id, r.key_id, r.key, r.kind, r.device_id, r.method, r.flow_id, r.verified_at as i64],
        )?;
        Ok(())
    }

    /// Every trust record (optionally of one user), oldest first.
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
    pub fn is_trusted(&self, user: &str, key: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM trust WHERE user_id = ?1 AND key = ?2", [user, key], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Remembers a request waiting for our answer.
    pub fn add_pending(&self, p: &PendingRequest) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO pending (flow_id, event, received_at) VALUES (?1, ?2, ?3)",
            params![p.flow_id, p.event, p.received_at as i64],
        )?;
        Ok(())
    }

    /// Forgets a request (answered, cancelled or expired).
    pub fn remove_pending(&self, flow_id: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM pending WHERE flow_id = ?1", [flow_id])?;
        Ok(())
    }

    /// Remembers a flow in progress.
    pub fn add_active(&self, f: &ActiveFlow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO active (flow_id, room_id, other_user, other_device) VALUES (?1, ?2, ?3, ?4)",
            params![f.flow_id, f.room_id, f.other_user, f.other_device],
        )?;
        Ok(())
    }

    /// Forgets a flow that ended.
    pub fn remove_active(&self, flow_id: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM active WHERE flow_id = ?1", [flow_id])?;
        Ok(())
    }

    /// Flows that were in progress.
    pub fn active(&self) -> Result<Vec<ActiveFlow>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT flow_id, room_id, other_user, other_device FROM active")?;
        let rows = stmt.query_map([], |r| {
            Ok(ActiveFlow { flow_id: r.get(0)?, room_id: r.get(1)?, other_user: r.get(2)?, other_device: r.get(3)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Requests still waiting, oldest first.
    pub fn pending(&self) -> Result<Vec<PendingRequest>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT flow_id, event, received_at FROM pending ORDER BY received_at")?;
        let rows = stmt.query_map([], |r| {
            Ok(PendingRequest { flow_id: r.get(0)?, event: r.get(1)?, received_at: r.get::<_, i64>(2)? as u64 })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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
