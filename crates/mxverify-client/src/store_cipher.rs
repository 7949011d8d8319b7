//! Secrets at rest: the values of [`SECRET_KEYS`] in the store's `kv` table, encrypted under a
//! random data key that is itself kept in the store, encrypted under a key derived from the store
//! passphrase (`$MXVERIFY_STORE_PASSPHRASE`).
//!
//! # Formats
//!
//! The key record is the `kv` row [`CIPHER_KV_KEY`], a JSON object:
//!
//! ```json
//! {"version": 1, "kdf": "pbkdf2-hmac-sha512", "iterations": 200000,
//!  "salt": "<32 bytes>", "iv": "<16 bytes>", "key": "<32 bytes>", "mac": "<32 bytes>"}
//! ```
//!
//! (byte strings in unpadded base64). PBKDF2-HMAC-SHA-512 of the passphrase's UTF-8 bytes with
//! `salt` and `iterations` gives 64 bytes: an AES-256 key and an HMAC-SHA-256 key. `key` is the
//! 32-byte data key encrypted with AES-256-CTR under `iv`; `mac` is HMAC-SHA-256 over
//! `"mxverify store key v1" ‖ 0x00 ‖ version (u32 BE) ‖ iterations (u32 BE) ‖ salt ‖ iv ‖ key`.
//! The MAC is the key-check value: a wrong passphrase (or a damaged record) fails it, so it is
//! reported as [`CipherError::WrongPassphrase`] and never yields a wrong data key. Iteration
//! counts outside `1..=`[`MAX_ITERATIONS`] are refused before any work is done.
//!
//! An encrypted value is the text [`VALUE_PREFIX`] followed by the unpadded base64 of
//! `iv (16) ‖ ciphertext ‖ tag (32)`. HKDF-SHA-256 (no salt, info `"mxverify store value keys v1"`)
//! of the data key gives an AES-256 key and an HMAC-SHA-256 key; the ciphertext is AES-256-CTR of
//! the value's UTF-8 bytes under a fresh random `iv`; the tag is HMAC-SHA-256 over
//! `"mxverify store value v1" ‖ 0x00 ‖ len(name) (u32 BE) ‖ name ‖ iv ‖ ciphertext`, checked in
//! constant time before anything is decrypted. The name is in the tag, so a value moved to
//! another name is refused like a tampered one.
//!
//! What is not in [`SECRET_KEYS`] stays in the clear: user and device IDs, the homeserver URL,
//! the sync token, known devices, trust records, pending requests. The Olm account, Olm sessions
//! and Megolm sessions are pickles encrypted with the pickle key, so they are protected through it.
//!
//! Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security):
//! the cross-signing private keys (and the access token and pickle key) are kept encrypted at rest.

use aes::Aes256;
use ctr::cipher::{KeyIvInit, StreamCipher};
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use mxverify_proto::b64;
use serde::{Deserialize, Serialize};
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

type Aes256Ctr = ctr::Ctr128BE<Aes256>;
type HmacSha256 = Hmac<Sha256>;

/// The environment variable the program reads the store passphrase from.
///
/// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
/// (private keys kept encrypted at rest).
pub const PASSPHRASE_ENV: &str = "MXVERIFY_STORE_PASSPHRASE";

/// The `kv` names whose values are secrets, encrypted when the store has a passphrase: the
/// session's access token, the cross-signing private keys (adopted, and saved before an upload),
/// and the key the Olm/Megolm pickles are encrypted with.
///
/// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
/// (private keys kept encrypted at rest).
pub const SECRET_KEYS: [&str; 4] = ["access_token", "cross_signing", "cross_signing_pending", "pickle_key"];

/// The `kv` name of the key record (reserved: never set or delete it through the store).
///
/// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
/// (private keys kept encrypted at rest).
pub const CIPHER_KV_KEY: &str = "store_cipher";

/// PBKDF2 iterations for a new key record.
///
/// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
/// (private keys kept encrypted at rest).
pub const DEFAULT_ITERATIONS: u32 = 200_000;

/// The most PBKDF2 iterations a key record may ask for (a few seconds at most), so that a damaged
/// or hostile file cannot hang the program.
///
/// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
/// (private keys kept encrypted at rest).
pub const MAX_ITERATIONS: u32 = 2_000_000;

/// The key-derivation function of the key record.
///
/// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
/// (private keys kept encrypted at rest).
pub const KDF_ALGORITHM: &str = "pbkdf2-hmac-sha512";

/// What an encrypted value starts with.
///
/// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
/// (private keys kept encrypted at rest).
pub const VALUE_PREFIX: &str = "mxverify-enc-v1:";

const RECORD_VERSION: u32 = 1;
const WRAP_CONTEXT: &[u8] = b"mxverify store key v1";
const VALUE_CONTEXT: &[u8] = b"mxverify store value v1";
const VALUE_KEYS_INFO: &[u8] = b"mxverify store value keys v1";
const IV_LEN: usize = 16;
const TAG_LEN: usize = 32;
const SALT_LEN: usize = 32;

/// Whether `name` is one of [`SECRET_KEYS`].
///
/// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
/// (private keys kept encrypted at rest).
pub fn is_secret(name: &str) -> bool {
    SECRET_KEYS.contains(&name)
}

/// A failure of the store cipher.
///
/// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
/// (private keys kept encrypted at rest).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CipherError {
    /// The passphrase does not open the key record (or the record was damaged).
    #[error("wrong store passphrase")]
    WrongPassphrase,
    /// An empty passphrase protects nothing.
    #[error("the store passphrase is empty")]
    EmptyPassphrase,
    /// The key record cannot be read.
    #[error("the store key record is damaged: {0}")]
    BadKeyRecord(String),
    /// The key record asks for an iteration count out of bounds.
    #[error("the store key record asks for {0} PBKDF2 iterations (accepted: 1 to {max})", max = MAX_ITERATIONS)]
    Iterations(u64),
    /// A secret is in the clear although the store is encrypted.
    #[error("{0} is stored in the clear in an encrypted store (refused)")]
    NotEncrypted(String),
    /// An encrypted value failed its check: damaged, altered, or moved from another name.
    #[error("the encrypted value of {0} is damaged, was altered or belongs to another name (refused)")]
    BadValue(String),
}

/// The key record as stored (see the module documentation).
#[derive(Serialize, Deserialize)]
struct KeyRecord {
    version: u32,
    kdf: String,
    iterations: u64,
    salt: String,
    iv: String,
    key: String,
    mac: String,
}

/// The store's data key, and the value keys derived from it.
///
/// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
/// (private keys kept encrypted at rest).
pub struct StoreCipher {
    data_key: Zeroizing<[u8; 32]>,
    /// AES-256 key, then HMAC-SHA-256 key.
    value_keys: Zeroizing<[u8; 64]>,
}

impl std::fmt::Debug for StoreCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCipher { .. }")
    }
}

fn random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random number generator failed");
}

fn hmac(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key size")
}

fn ctr(key: &[u8], iv: &[u8], data: &mut [u8]) {
    Aes256Ctr::new_from_slices(key, iv).expect("32-byte key, 16-byte IV").apply_keystream(data);
}

/// PBKDF2-HMAC-SHA-512: the AES-256 key and the HMAC-SHA-256 key of the key record.
fn wrapping_keys(passphrase: &str, salt: &[u8], iterations: u32) -> Zeroizing<[u8; 64]> {
    let mut keys = Zeroizing::new([0; 64]);
    pbkdf2::pbkdf2_hmac::<Sha512>(passphrase.as_bytes(), salt, iterations, &mut keys[..]);
    keys
}

fn wrap_mac(mac_key: &[u8], iterations: u32, salt: &[u8], iv: &[u8], wrapped: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = hmac(mac_key);
    mac.update(WRAP_CONTEXT);
    mac.update(&[0]);
    mac.update(&RECORD_VERSION.to_be_bytes());
    mac.update(&iterations.to_be_bytes());
    mac.update(salt);
    mac.update(iv);
    mac.update(wrapped);
    mac.finalize().into_bytes().into()
}

fn check_iterations(iterations: u64) -> Result<u32, CipherError> {
    match u32::try_from(iterations) {
        Ok(n) if (1..=MAX_ITERATIONS).contains(&n) => Ok(n),
        _ => Err(CipherError::Iterations(iterations)),
    }
}

impl StoreCipher {
    /// A new random data key.
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
    /// (private keys kept encrypted at rest).
    pub fn generate() -> Self {
        let mut data_key = Zeroizing::new([0; 32]);
        random(&mut data_key[..]);
        Self::from_data_key(data_key)
    }

    fn from_data_key(data_key: Zeroizing<[u8; 32]>) -> Self {
        let mut value_keys = Zeroizing::new([0; 64]);
        Hkdf::<Sha256>::new(None, &data_key[..]).expand(VALUE_KEYS_INFO, &mut value_keys[..]).expect("64 <= 255 * 32");
        StoreCipher { data_key, value_keys }
    }

    /// The key record: the data key encrypted under `passphrase` with `iterations` PBKDF2
    /// rounds and a fresh random salt (JSON text for the `kv` row [`CIPHER_KV_KEY`]).
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
    /// (private keys kept encrypted at rest).
    pub fn export(&self, passphrase: &str, iterations: u32) -> Result<String, CipherError> {
        if passphrase.is_empty() {
            return Err(CipherError::EmptyPassphrase);
        }
        let iterations = check_iterations(u64::from(iterations))?;
        let mut salt = [0; SALT_LEN];
        random(&mut salt);
        let mut iv = [0; IV_LEN];
        random(&mut iv);
        let keys = wrapping_keys(passphrase, &salt, iterations);
        let mut wrapped = *self.data_key;
        ctr(&keys[..32], &iv, &mut wrapped);
        let mac = wrap_mac(&keys[32..], iterations, &salt, &iv, &wrapped);
        let record = KeyRecord {
            version: RECORD_VERSION,
            kdf: KDF_ALGORITHM.to_owned(),
            iterations: u64::from(iterations),
            salt: b64::encode(salt),
            iv: b64::encode(iv),
            key: b64::encode(wrapped),
            mac: b64::encode(mac),
        };
        Ok(serde_json::to_string(&record).expect("plain data"))
    }

    /// Opens a key record with `passphrase`. The iteration count is checked against
    /// [`MAX_ITERATIONS`] before any derivation; the record's MAC before any decryption.
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
    /// (private keys kept encrypted at rest).
    pub fn import(passphrase: &str, record: &str) -> Result<Self, CipherError> {
        let bad = |what: &str| CipherError::BadKeyRecord(what.to_owned());
        let record: KeyRecord = serde_json::from_str(record).map_err(|e| bad(&e.to_string()))?;
        if record.version != RECORD_VERSION {
            return Err(bad(&format!("unknown version {}", record.version)));
        }
        if record.kdf != KDF_ALGORITHM {
            return Err(bad(&format!("unknown key derivation {:?}", record.kdf)));
        }
        let iterations = check_iterations(record.iterations)?;
        let field = |text: &str, len: usize, what: &str| {
            b64::decode(text).filter(|b| b.len() == len).ok_or_else(|| bad(&format!("{what} is not {len} bytes")))
        };
        let salt = field(&record.salt, SALT_LEN, "salt")?;
        let iv = field(&record.iv, IV_LEN, "iv")?;
        let wrapped = field(&record.key, 32, "key")?;
        let mac = field(&record.mac, TAG_LEN, "mac")?;
        if passphrase.is_empty() {
            return Err(CipherError::EmptyPassphrase);
        }
        let keys = wrapping_keys(passphrase, &salt, iterations);
        let expected = wrap_mac(&keys[32..], iterations, &salt, &iv, &wrapped);
        if !bool::from(expected[..].ct_eq(&mac[..])) {
            return Err(CipherError::WrongPassphrase);
        }
        let mut data_key = Zeroizing::new([0; 32]);
        data_key.copy_from_slice(&wrapped);
        ctr(&keys[..32], &iv, &mut data_key[..]);
        Ok(Self::from_data_key(data_key))
    }

    fn value_tag(&self, name: &str, iv: &[u8], ciphertext: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = hmac(&self.value_keys[32..]);
        mac.update(VALUE_CONTEXT);
        mac.update(&[0]);
        mac.update(&u32::try_from(name.len()).expect("a short name").to_be_bytes());
        mac.update(name.as_bytes());
        mac.update(iv);
        mac.update(ciphertext);
        mac.finalize().into_bytes().into()
    }

    /// Encrypts the value of `name` (a fresh random IV each time).
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
    /// (private keys kept encrypted at rest).
    pub fn encrypt(&self, name: &str, plaintext: &[u8]) -> String {
        let mut iv = [0; IV_LEN];
        random(&mut iv);
        let mut out = Vec::with_capacity(IV_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&iv);
        out.extend_from_slice(plaintext);
        ctr(&self.value_keys[..32], &iv, &mut out[IV_LEN..]);
        let tag = self.value_tag(name, &iv, &out[IV_LEN..]);
        out.extend_from_slice(&tag);
        format!("{VALUE_PREFIX}{}", b64::encode(out))
    }

    /// Decrypts the value of `name`, once its tag is checked (in constant time).
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
    /// (private keys kept encrypted at rest).
    pub fn decrypt(&self, name: &str, stored: &str) -> Result<Zeroizing<Vec<u8>>, CipherError> {
        let Some(body) = stored.strip_prefix(VALUE_PREFIX) else {
            return Err(CipherError::NotEncrypted(name.to_owned()));
        };
        let bad = || CipherError::BadValue(name.to_owned());
        let bytes = b64::decode(body).ok_or_else(bad)?;
        if bytes.len() < IV_LEN + TAG_LEN {
            return Err(bad());
        }
        let (iv, rest) = bytes.split_at(IV_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        if !bool::from(self.value_tag(name, iv, ciphertext)[..].ct_eq(tag)) {
            return Err(bad());
        }
        let mut plaintext = Zeroizing::new(ciphertext.to_vec());
        ctr(&self.value_keys[..32], iv, &mut plaintext[..]);
        Ok(plaintext)
    }

    /// [`StoreCipher::decrypt`] of a text value.
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
    /// (private keys kept encrypted at rest).
    pub fn decrypt_string(&self, name: &str, stored: &str) -> Result<Zeroizing<String>, CipherError> {
        let mut bytes = self.decrypt(name, stored)?;
        match String::from_utf8(std::mem::take(&mut *bytes)) {
            Ok(text) => Ok(Zeroizing::new(text)),
            Err(e) => {
                e.into_bytes().zeroize();
                Err(CipherError::BadValue(name.to_owned()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PendingRequest, Store, StoreError};
    use rusqlite::Connection;
    use std::path::{Path, PathBuf};

    /// Cheap key derivation for tests.
    const TEST_ITERATIONS: u32 = 10;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("mxverify-store-cipher-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn open(dir: &Path, passphrase: Option<&str>) -> Result<Store, StoreError> {
        Store::open_with_kdf(dir, passphrase, TEST_ITERATIONS)
    }

    /// Writes straight into the file, as someone with access to it could.
    fn raw(dir: &Path) -> Connection {
        Connection::open(dir.join("mxverify.sqlite3")).unwrap()
    }

    fn raw_get(dir: &Path, key: &str) -> String {
        raw(dir).query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0)).unwrap()
    }

    fn raw_set(dir: &Path, key: &str, value: &str) {
        raw(dir).execute("UPDATE kv SET value = ?2 WHERE key = ?1", [key, value]).unwrap();
    }

    /// Every byte of the store's files (the database, and its WAL if there is one).
    fn file_bytes(dir: &Path) -> Vec<u8> {
        let mut all = Vec::new();
        for name in ["mxverify.sqlite3", "mxverify.sqlite3-wal", "mxverify.sqlite3-journal"] {
            if let Ok(b) = std::fs::read(dir.join(name)) {
                all.extend(b);
            }
        }
        all
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    fn secret_value(name: &str) -> String {
        format!("{name}-SECRET-PLAINTEXT-4f1d9a")
    }

    #[test]
    fn value_round_trip_and_fresh_iv() {
        let c = StoreCipher::generate();
        let a = c.encrypt("access_token", b"syt_token");
        let b = c.encrypt("access_token", b"syt_token");
        assert_ne!(a, b);
        assert!(a.starts_with(VALUE_PREFIX));
        assert_eq!(c.decrypt_string("access_token", &a).unwrap().as_str(), "syt_token");
        assert_eq!(c.decrypt_string("access_token", &c.encrypt("access_token", b"")).unwrap().as_str(), "");
        // Another data key refuses it.
        assert_eq!(
            StoreCipher::generate().decrypt("access_token", &a),
            Err(CipherError::BadValue("access_token".into()))
        );
    }

    #[test]
    fn key_record_round_trip_and_wrong_passphrase() {
        let c = StoreCipher::generate();
        let record = c.export("correct horse", TEST_ITERATIONS).unwrap();
        let v = c.encrypt("pickle_key", b"k");
        let opened = StoreCipher::import("correct horse", &record).unwrap();
        assert_eq!(opened.decrypt_string("pickle_key", &v).unwrap().as_str(), "k");
        assert_eq!(StoreCipher::import("correct horsf", &record).unwrap_err(), CipherError::WrongPassphrase);
        assert_eq!(StoreCipher::import("", &record).unwrap_err(), CipherError::EmptyPassphrase);
        assert_eq!(c.export("", TEST_ITERATIONS).unwrap_err(), CipherError::EmptyPassphrase);
        // Any changed field fails the check.
        let json: serde_json::Value = serde_json::from_str(&record).unwrap();
        for field in ["salt", "iv", "key", "mac"] {
            let mut bytes = b64::decode(json[field].as_str().unwrap()).unwrap();
            bytes[0] ^= 1;
            let mut changed = json.clone();
            changed[field] = b64::encode(bytes).into();
            assert_eq!(
                StoreCipher::import("correct horse", &changed.to_string()).unwrap_err(),
                CipherError::WrongPassphrase,
                "{field}"
            );
        }
        let mut changed = json.clone();
        changed["iterations"] = (TEST_ITERATIONS + 1).into();
        assert_eq!(
            StoreCipher::import("correct horse", &changed.to_string()).unwrap_err(),
            CipherError::WrongPassphrase
        );
        let mut changed = json.clone();
        changed["version"] = 2.into();
        assert!(matches!(
            StoreCipher::import("correct horse", &changed.to_string()),
            Err(CipherError::BadKeyRecord(_))
        ));
        assert!(matches!(StoreCipher::import("correct horse", "not json"), Err(CipherError::BadKeyRecord(_))));
    }

    #[test]
    fn round_trip_through_the_store() {
        let dir = TempDir::new("round-trip");
        {
            let s = open(&dir.0, Some("pass")).unwrap();
            assert!(s.is_encrypted());
            for name in SECRET_KEYS {
                s.set_secret(name, &secret_value(name)).unwrap();
            }
            s.set("since", "s1").unwrap();
        }
        let s = open(&dir.0, Some("pass")).unwrap();
        assert!(s.is_encrypted());
        for name in SECRET_KEYS {
            assert_eq!(s.get_secret(name).unwrap().unwrap().as_str(), secret_value(name));
            // get() gives the decrypted value too, never the ciphertext.
            assert_eq!(s.get(name).unwrap().unwrap(), secret_value(name));
            assert!(raw_get(&dir.0, name).starts_with(VALUE_PREFIX));
        }
        assert_eq!(s.get("since").unwrap().as_deref(), Some("s1"));
        assert_eq!(raw_get(&dir.0, "since"), "s1");
        // set() of a secret name encrypts as set_secret() does.
        s.set("access_token", "syt_new").unwrap();
        assert!(raw_get(&dir.0, "access_token").starts_with(VALUE_PREFIX));
        assert_eq!(s.get_secret("access_token").unwrap().unwrap().as_str(), "syt_new");
        s.delete("cross_signing_pending").unwrap();
        assert_eq!(s.get_secret("cross_signing_pending").unwrap(), None);
        assert_eq!(s.get("cross_signing_pending").unwrap(), None);
        // The public entry point reads the record's own iteration count.
        drop(s);
        let s = Store::open_with_passphrase(&dir.0, Some("pass")).unwrap();
        assert_eq!(s.get_secret("pickle_key").unwrap().unwrap().as_str(), secret_value("pickle_key"));
    }

    #[test]
    fn plain_store_without_passphrase_as_before() {
        let dir = TempDir::new("plain");
        let s = open(&dir.0, None).unwrap();
        assert!(!s.is_encrypted());
        s.set_secret("access_token", "syt_plain").unwrap();
        assert_eq!(s.get("access_token").unwrap().as_deref(), Some("syt_plain"));
        assert_eq!(s.get_secret("access_token").unwrap().unwrap().as_str(), "syt_plain");
        assert_eq!(raw_get(&dir.0, "access_token"), "syt_plain");
        assert_eq!(s.get(CIPHER_KV_KEY).unwrap(), None);
        drop(s);
        assert!(!Store::open(&dir.0).unwrap().is_encrypted());
    }

    #[test]
    fn wrong_passphrase() {
        let dir = TempDir::new("wrong");
        open(&dir.0, Some("right")).unwrap().set_secret("access_token", "syt").unwrap();
        let e = open(&dir.0, Some("wrong")).unwrap_err();
        assert!(matches!(e, StoreError::WrongPassphrase), "{e:?}");
        assert_eq!(e.to_string(), "wrong store passphrase");
        assert!(matches!(open(&dir.0, Some("")).unwrap_err(), StoreError::Cipher(CipherError::EmptyPassphrase)));
    }

    #[test]
    fn passphrase_needed() {
        let dir = TempDir::new("needed");
        open(&dir.0, Some("right")).unwrap().set_secret("access_token", "syt").unwrap();
        for e in [open(&dir.0, None).unwrap_err(), Store::open(&dir.0).unwrap_err()] {
            assert!(matches!(e, StoreError::PassphraseNeeded), "{e:?}");
            assert!(e.to_string().contains("$MXVERIFY_STORE_PASSPHRASE"), "{e}");
        }
    }

    #[test]
    fn empty_passphrase_does_not_encrypt() {
        let dir = TempDir::new("empty");
        open(&dir.0, None).unwrap().set("access_token", "syt").unwrap();
        assert!(matches!(open(&dir.0, Some("")).unwrap_err(), StoreError::Cipher(CipherError::EmptyPassphrase)));
        let s = open(&dir.0, None).unwrap();
        assert!(!s.is_encrypted());
        assert_eq!(s.get("access_token").unwrap().as_deref(), Some("syt"));
    }

    /// Migrates a plain store, closed first or (`plain_open`) still open elsewhere with its last
    /// writes, a replaced token and a deleted value among them, still in the WAL.
    fn migration(name: &str, plain_open: bool) {
        let dir = TempDir::new(name);
        let old_token = "syt_OLD-TOKEN-PLAINTEXT-77c2e1";
        let pending = "cross_signing_pending-DELETED-PLAINTEXT-0b9e";
        let plain = open(&dir.0, None).unwrap();
        plain.set("access_token", old_token).unwrap();
        plain.set("cross_signing_pending", pending).unwrap();
        plain.delete("cross_signing_pending").unwrap();
        for name in SECRET_KEYS {
            plain.set(name, &secret_value(name)).unwrap();
        }
        plain.set("user_id", "@alice:example.org").unwrap();
        plain.set("since", "s42").unwrap();
        plain.add_pending(&PendingRequest { flow_id: "f".into(), event: "{}".into(), received_at: 5 }).unwrap();
        let plain = if plain_open { Some(plain) } else { None };
        // The test can see plaintext when it is there.
        let before = file_bytes(&dir.0);
        for name in SECRET_KEYS {
            assert!(contains(&before, &secret_value(name)), "{name} not found before the migration");
        }
        if plain_open {
            assert!(contains(&before, old_token) && contains(&before, pending), "old values not in the WAL");
        }

        let s = open(&dir.0, Some("pass")).unwrap();
        assert!(s.is_encrypted());
        let check = |s: &Store| {
            for name in SECRET_KEYS {
                assert_eq!(s.get_secret(name).unwrap().unwrap().as_str(), secret_value(name));
            }
            assert_eq!(s.get("user_id").unwrap().as_deref(), Some("@alice:example.org"));
            assert_eq!(s.get("since").unwrap().as_deref(), Some("s42"));
            assert_eq!(s.pending().unwrap().len(), 1);
        };
        check(&s);
        let no_plaintext = |bytes: &[u8]| {
            for secret in SECRET_KEYS.iter().map(|n| secret_value(n)).chain([old_token.into(), pending.into()]) {
                assert!(!contains(bytes, &secret), "{secret} is still in the file");
            }
            assert!(contains(bytes, "@alice:example.org"), "non-secrets stay readable");
        };
        // While open (the WAL emptied), and after closing.
        no_plaintext(&file_bytes(&dir.0));
        drop(plain);
        no_plaintext(&file_bytes(&dir.0));
        drop(s);
        no_plaintext(&file_bytes(&dir.0));
        for name in SECRET_KEYS {
            assert!(raw_get(&dir.0, name).starts_with(VALUE_PREFIX));
        }
        let s = open(&dir.0, Some("pass")).unwrap();
        check(&s);
        drop(s);
        assert!(matches!(open(&dir.0, None).unwrap_err(), StoreError::PassphraseNeeded));
    }

    #[test]
    fn migration_keeps_values_and_leaves_no_plaintext() {
        migration("migration", false);
    }

    #[test]
    fn migration_leaves_no_plaintext_in_the_wal() {
        migration("migration-wal", true);
    }

    #[test]
    fn migration_of_a_store_without_secrets() {
        let dir = TempDir::new("migration-empty");
        open(&dir.0, None).unwrap().set("since", "s1").unwrap();
        let s = open(&dir.0, Some("pass")).unwrap();
        assert!(s.is_encrypted());
        assert_eq!(s.get_secret("access_token").unwrap(), None);
        assert_eq!(s.get("since").unwrap().as_deref(), Some("s1"));
    }

    #[test]
    fn values_cannot_move_between_names() {
        let dir = TempDir::new("swap");
        {
            let s = open(&dir.0, Some("pass")).unwrap();
            s.set_secret("access_token", "syt_token").unwrap();
            s.set_secret("pickle_key", "pickle").unwrap();
        }
        let token = raw_get(&dir.0, "access_token");
        raw_set(&dir.0, "pickle_key", &token);
        let s = open(&dir.0, Some("pass")).unwrap();
        assert_eq!(s.get_secret("access_token").unwrap().unwrap().as_str(), "syt_token");
        let e = s.get_secret("pickle_key").unwrap_err();
        assert!(matches!(e, StoreError::Cipher(CipherError::BadValue(ref n)) if n == "pickle_key"), "{e:?}");
        assert!(s.get("pickle_key").is_err());
    }

    #[test]
    fn tampered_or_plain_value_is_refused() {
        let dir = TempDir::new("tamper");
        open(&dir.0, Some("pass")).unwrap().set_secret("cross_signing", "{\"master\":\"k\"}").unwrap();
        let stored = raw_get(&dir.0, "cross_signing");
        let mut bytes = b64::decode(&stored[VALUE_PREFIX.len()..]).unwrap();
        for i in [0, IV_LEN, bytes.len() - 1] {
            bytes[i] ^= 0x80;
            raw_set(&dir.0, "cross_signing", &format!("{VALUE_PREFIX}{}", b64::encode(&bytes)));
            bytes[i] ^= 0x80;
            let e = open(&dir.0, Some("pass")).unwrap().get_secret("cross_signing").unwrap_err();
            assert!(matches!(e, StoreError::Cipher(CipherError::BadValue(_))), "byte {i}: {e:?}");
        }
        raw_set(&dir.0, "cross_signing", &format!("{VALUE_PREFIX}AAAA"));
        assert!(open(&dir.0, Some("pass")).unwrap().get_secret("cross_signing").is_err());
        // Plaintext written behind our back is not taken as the value.
        raw_set(&dir.0, "cross_signing", "{\"master\":\"planted\"}");
        let s = open(&dir.0, Some("pass")).unwrap();
        assert!(matches!(s.get_secret("cross_signing").unwrap_err(), StoreError::Cipher(CipherError::NotEncrypted(_))));
        assert!(s.get("cross_signing").is_err());
        // The original still opens.
        raw_set(&dir.0, "cross_signing", &stored);
        assert_eq!(s.get_secret("cross_signing").unwrap().unwrap().as_str(), "{\"master\":\"k\"}");
    }

    #[test]
    fn iterations_are_bounded_on_read() {
        let dir = TempDir::new("iterations");
        open(&dir.0, Some("pass")).unwrap();
        let record: serde_json::Value = serde_json::from_str(&raw_get(&dir.0, CIPHER_KV_KEY)).unwrap();
        assert_eq!(record["iterations"], TEST_ITERATIONS);
        for n in [0, u64::from(MAX_ITERATIONS) + 1, 4_000_000_000, u64::MAX] {
            let mut hostile = record.clone();
            hostile["iterations"] = n.into();
            raw_set(&dir.0, CIPHER_KV_KEY, &hostile.to_string());
            let started = std::time::Instant::now();
            let e = open(&dir.0, Some("pass")).unwrap_err();
            assert!(matches!(e, StoreError::Cipher(CipherError::Iterations(m)) if m == n), "{n}: {e:?}");
            assert!(started.elapsed() < std::time::Duration::from_secs(1));
        }
        assert!(StoreCipher::generate().export("p", MAX_ITERATIONS + 1).is_err());
        assert!(StoreCipher::generate().export("p", 0).is_err());
    }

    #[test]
    fn change_passphrase() {
        let dir = TempDir::new("change");
        let mut s = open(&dir.0, Some("old")).unwrap();
        s.set_secret("access_token", "syt_token").unwrap();
        s.set_secret("pickle_key", "pickle").unwrap();
        let before = raw_get(&dir.0, "access_token");
        assert!(matches!(s.change_passphrase("wrong", "new").unwrap_err(), StoreError::WrongPassphrase));
        assert!(matches!(
            s.change_passphrase("old", "").unwrap_err(),
            StoreError::Cipher(CipherError::EmptyPassphrase)
        ));
        s.change_passphrase("old", "new").unwrap();
        assert_eq!(s.get_secret("access_token").unwrap().unwrap().as_str(), "syt_token");
        // A new data key: the old ciphertexts are gone, and would not open any more.
        let after = raw_get(&dir.0, "access_token");
        assert_ne!(before, after);
        assert!(!contains(&file_bytes(&dir.0), &before[VALUE_PREFIX.len()..]));
        drop(s);
        assert!(matches!(open(&dir.0, Some("old")).unwrap_err(), StoreError::WrongPassphrase));
        let s = open(&dir.0, Some("new")).unwrap();
        assert_eq!(s.get_secret("pickle_key").unwrap().unwrap().as_str(), "pickle");
        drop(s);
        let dir = TempDir::new("change-plain");
        let mut s = open(&dir.0, None).unwrap();
        assert!(matches!(s.change_passphrase("a", "b").unwrap_err(), StoreError::NotEncrypted));
    }

    #[test]
    fn reset_keeps_the_store_encrypted() {
        let dir = TempDir::new("reset");
        let s = open(&dir.0, Some("pass")).unwrap();
        s.set_secret("access_token", "syt_first").unwrap();
        s.set("user_id", "@a:x").unwrap();
        s.reset().unwrap();
        assert_eq!(s.get_secret("access_token").unwrap(), None);
        assert_eq!(s.get("user_id").unwrap(), None);
        s.set_secret("access_token", "syt_second").unwrap();
        drop(s);
        assert!(matches!(open(&dir.0, None).unwrap_err(), StoreError::PassphraseNeeded));
        let s = open(&dir.0, Some("pass")).unwrap();
        assert_eq!(s.get_secret("access_token").unwrap().unwrap().as_str(), "syt_second");
    }

    #[test]
    fn missing_key_record_is_refused() {
        let dir = TempDir::new("no-record");
        open(&dir.0, Some("pass")).unwrap().set_secret("pickle_key", "pickle").unwrap();
        raw(&dir.0).execute("DELETE FROM kv WHERE key = ?1", [CIPHER_KV_KEY]).unwrap();
        for passphrase in [None, Some("pass")] {
            let e = open(&dir.0, passphrase).unwrap_err();
            assert!(matches!(e, StoreError::Cipher(CipherError::BadKeyRecord(_))), "{e:?}");
        }
    }

    #[test]
    fn only_secret_names() {
        let dir = TempDir::new("names");
        for passphrase in [None, Some("pass")] {
            let s = open(&dir.0, passphrase).unwrap();
            assert!(matches!(s.set_secret("since", "x").unwrap_err(), StoreError::NotSecret(_)));
            assert!(matches!(s.get_secret("secret_requests").unwrap_err(), StoreError::NotSecret(_)));
        }
        assert!(SECRET_KEYS.iter().all(|n| is_secret(n)));
        assert!(!is_secret("account") && !is_secret(CIPHER_KV_KEY));
    }
}
