//! The cross-signing private keys this device holds — all three after `cross-signing bootstrap`,
//! any of them after secret sharing or a restore from secret storage
//! ([spec: cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing)).

use serde_json::{Value, json};
use vodozemac::{Ed25519PublicKey, Ed25519SecretKey};
use zeroize::Zeroizing;

use crate::keys::{self, UserKeyInfo};

/// The secret name of the master key ([spec: secrets](https://spec.matrix.org/v1.19/client-server-api/#secrets)).
pub const MASTER: &str = "m.cross_signing.master";
/// The secret name of the self-signing key.
///
/// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing),
/// [Secrets](https://spec.matrix.org/v1.19/client-server-api/#secrets).
pub const SELF_SIGNING: &str = "m.cross_signing.self_signing";
/// The secret name of the user-signing key.
///
/// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing),
/// [Secrets](https://spec.matrix.org/v1.19/client-server-api/#secrets).
pub const USER_SIGNING: &str = "m.cross_signing.user_signing";
/// The three, in the order they are asked for and stored.
///
/// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing),
/// [Secrets](https://spec.matrix.org/v1.19/client-server-api/#secrets).
pub const SECRET_NAMES: [&str; 3] = [MASTER, SELF_SIGNING, USER_SIGNING];

/// Some or all of the three private keys.
///
/// ```
/// use mxverify_client::cross_signing::{self, CrossSigningKeys, MASTER, SELF_SIGNING};
/// use mxverify_client::keys;
///
/// let held = CrossSigningKeys::generate();
/// assert!(held.is_complete());
///
/// // What `/keys/device_signing/upload` gets: the self-signing key is signed by the master key.
/// let user = "@alice:example.org";
/// let body = held.upload_body(user).unwrap();
/// let master = held.public(MASTER).unwrap();
/// assert!(keys::has_valid_signature(&body["self_signing_key"], user, &master, &master));
///
/// // The stored form keeps every key.
/// let restored = CrossSigningKeys::from_json(&held.to_json()).unwrap();
/// assert_eq!(restored.public(SELF_SIGNING), held.public(SELF_SIGNING));
///
/// // A secret that arrives is used only if it matches the published public key.
/// let secret = held.secret(MASTER).unwrap();
/// assert!(cross_signing::key_matching(MASTER, &secret, Some(&master)).is_ok());
/// assert!(cross_signing::key_matching(MASTER, &secret, held.public(SELF_SIGNING).as_deref()).is_err());
/// ```
///
/// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing),
/// [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security).
#[derive(Default)]
pub struct CrossSigningKeys {
    master: Option<Ed25519SecretKey>,
    self_signing: Option<Ed25519SecretKey>,
    user_signing: Option<Ed25519SecretKey>,
}

impl std::fmt::Debug for CrossSigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrossSigningKeys")
            .field("master", &self.public(MASTER))
            .field("self_signing", &self.public(SELF_SIGNING))
            .field("user_signing", &self.public(USER_SIGNING))
            .finish()
    }
}

/// The short name used in the store and in `usage` for a secret name.
fn usage(name: &str) -> &'static str {
    match name {
        MASTER => "master",
        SELF_SIGNING => "self_signing",
        _ => "user_signing",
    }
}

impl CrossSigningKeys {
    /// Three new keys.
    ///
    /// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
    pub fn generate() -> Self {
        Self {
            master: Some(Ed25519SecretKey::new()),
            self_signing: Some(Ed25519SecretKey::new()),
            user_signing: Some(Ed25519SecretKey::new()),
        }
    }

    fn slot(&self, name: &str) -> Option<&Option<Ed25519SecretKey>> {
        match name {
            MASTER => Some(&self.master),
            SELF_SIGNING => Some(&self.self_signing),
            USER_SIGNING => Some(&self.user_signing),
            _ => None,
        }
    }

    /// One key by its secret name.
    ///
    /// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
    pub fn get(&self, name: &str) -> Option<&Ed25519SecretKey> {
        self.slot(name).and_then(Option::as_ref)
    }

    /// Stores one key by its secret name (an unknown name is ignored).
    ///
    /// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
    pub fn set(&mut self, name: &str, key: Ed25519SecretKey) {
        match name {
            MASTER => self.master = Some(key),
            SELF_SIGNING => self.self_signing = Some(key),
            USER_SIGNING => self.user_signing = Some(key),
            _ => {}
        }
    }

    /// The public key of one of them, if held.
    ///
    /// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
    pub fn public(&self, name: &str) -> Option<String> {
        self.get(name).map(|k| k.public_key().to_base64())
    }

    /// The secret names of the keys we lack.
    ///
    /// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
    pub fn missing(&self) -> Vec<&'static str> {
        SECRET_NAMES.into_iter().filter(|n| self.get(n).is_none()).collect()
    }

    /// Whether all three are held.
    ///
    /// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
    pub fn is_complete(&self) -> bool {
        self.missing().is_empty()
    }

    /// Whether none is held.
    ///
    /// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
    pub fn is_empty(&self) -> bool {
        self.missing().len() == SECRET_NAMES.len()
    }

    /// A key as a secret: unpadded base64 of its 32 private bytes.
    ///
    /// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing) (the keys are
    /// base64-encoded as secrets), [Secrets](https://spec.matrix.org/v1.19/client-server-api/#secrets).
    pub fn secret(&self, name: &str) -> Option<Zeroizing<String>> {
        self.get(name).map(|k| Zeroizing::new(mxverify_proto::b64::encode(*k.to_bytes())))
    }

    /// The stored form: `{"master": b64 | null, "self_signing": ..., "user_signing": ...}`.
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
    /// (this form is kept among the store's secrets, see [`crate::store_cipher`]).
    pub fn to_json(&self) -> Zeroizing<String> {
        let b = |k: &Option<Ed25519SecretKey>| k.as_ref().map(|k| mxverify_proto::b64::encode(*k.to_bytes()));
        Zeroizing::new(
            json!({"master": b(&self.master), "self_signing": b(&self.self_signing), "user_signing": b(&self.user_signing)})
                .to_string(),
        )
    }

    /// Reads the stored form; `None` if it is damaged.
    ///
    /// Serves: [Key and signature security](https://spec.matrix.org/v1.19/client-server-api/#key-and-signature-security)
    /// (this form is kept among the store's secrets, see [`crate::store_cipher`]).
    pub fn from_json(text: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(text).ok()?;
        let k = |name: &str| -> Option<Option<Ed25519SecretKey>> {
            match &v[name] {
                Value::Null => Some(None),
                Value::String(s) => mxverify_proto::b64::decode32(s).map(|b| Some(Ed25519SecretKey::from_slice(&b))),
                _ => None,
            }
        };
        Some(Self { master: k("master")?, self_signing: k("self_signing")?, user_signing: k("user_signing")? })
    }

    /// The three public key objects to upload (`/keys/device_signing/upload`): the master key
    /// (to be signed by the device as well, by the caller) and the self- and user-signing keys
    /// signed by the master key. `None` unless all three are held.
    ///
    /// Spec: [`POST /keys/device_signing/upload`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysdevice_signingupload),
    /// [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
    pub fn upload_body(&self, user: &str) -> Option<Value> {
        let (master, ssk, usk) = (self.master.as_ref()?, self.self_signing.as_ref()?, self.user_signing.as_ref()?);
        let public = |k: &Ed25519SecretKey| k.public_key().to_base64();
        let key_obj = |k: &Ed25519SecretKey, usage: &str| json!({"user_id": user, "usage": [usage], "keys": {format!("ed25519:{}", public(k)): public(k)}});
        let mut ssk_obj = key_obj(ssk, "self_signing");
        keys::sign_with(&mut ssk_obj, user, &public(master), master).ok()?;
        let mut usk_obj = key_obj(usk, "user_signing");
        keys::sign_with(&mut usk_obj, user, &public(master), master).ok()?;
        Some(json!({"master_key": key_obj(master, "master"), "self_signing_key": ssk_obj, "user_signing_key": usk_obj}))
    }
}

/// The published public key a cross-signing secret must match (from a checked `/keys/query`).
///
/// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing),
/// [`POST /keys/query`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysquery).
pub fn published_key<'a>(info: &'a UserKeyInfo, name: &str) -> Option<&'a str> {
    match name {
        MASTER => info.master_key.as_deref(),
        SELF_SIGNING => info.self_signing_key.as_deref(),
        USER_SIGNING => info.user_signing_key.as_deref(),
        _ => None,
    }
}

/// A secret received for `name` (base64 of 32 bytes) as a private key, if its public key is the
/// published one: a secret that does not match is refused whoever sent it.
///
/// Spec: [Secrets › Sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing),
/// [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
pub fn key_matching(name: &str, secret: &str, published: Option<&str>) -> Result<Ed25519SecretKey, String> {
    let bytes = crate::secret_storage::decode_cross_signing_secret(secret)
        .map_err(|_| format!("the {} secret is not a 32-byte key", usage(name)))?;
    let key = Ed25519SecretKey::from_slice(&bytes);
    let Some(published) = published else {
        return Err(format!("this account has no published {} key to check it against", usage(name)));
    };
    let matches = Ed25519PublicKey::from_base64(published).is_ok_and(|p| p == key.public_key());
    if !matches {
        return Err(format!(
            "its public key {} is not the published {} key {published}",
            key.public_key().to_base64(),
            usage(name)
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_sets_round_trip_and_the_old_form_reads() {
        let all = CrossSigningKeys::generate();
        assert!(all.is_complete());
        let mut part = CrossSigningKeys::default();
        assert!(part.is_empty());
        part.set(SELF_SIGNING, Ed25519SecretKey::from_slice(&all.get(SELF_SIGNING).unwrap().to_bytes()));
        assert_eq!(part.missing(), vec![MASTER, USER_SIGNING]);
        let back = CrossSigningKeys::from_json(&part.to_json()).unwrap();
        assert_eq!(back.public(SELF_SIGNING), all.public(SELF_SIGNING));
        assert_eq!(back.missing(), vec![MASTER, USER_SIGNING]);
        let back = CrossSigningKeys::from_json(&all.to_json()).unwrap();
        assert!(back.is_complete());
        assert!(CrossSigningKeys::from_json(r#"{"master": 5, "self_signing": null, "user_signing": null}"#).is_none());
        assert!(!format!("{all:?}").contains(&*all.secret(MASTER).unwrap()), "Debug shows public keys only");
    }

    #[test]
    fn a_secret_must_match_the_published_key() {
        let all = CrossSigningKeys::generate();
        let secret = all.secret(MASTER).unwrap();
        let published = all.public(MASTER).unwrap();
        assert!(key_matching(MASTER, &secret, Some(&published)).is_ok());
        let other = all.public(USER_SIGNING).unwrap();
        let Err(why) = key_matching(MASTER, &secret, Some(&other)) else { panic!("another key matched") };
        assert!(why.contains("not the published master key"), "{why}");
        assert!(key_matching(MASTER, &secret, None).is_err());
        assert!(key_matching(MASTER, "c2hvcnQ", Some(&published)).is_err());
    }
}
