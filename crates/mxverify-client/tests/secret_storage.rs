//! Secret storage written by matrix-js-sdk (`testdata/js-sdk-secret-storage*.json`, made by
//! `interop/make-ssss-fixture.mjs` against a real homeserver): our reader must open it with the
//! recovery key (and the passphrase), and the cross-signing keys inside must match the published
//! public keys.

use mxverify_client::secret_storage::{
    Error, KeyDescription, SecretStorageKey, decode_cross_signing_secret, decrypt_secret, decrypt_stored_secret,
};
use mxverify_proto::b64;
use serde_json::Value;
use vodozemac::Ed25519SecretKey;

fn fixture(name: &str) -> Value {
    let path = format!("{}/../../testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what} is not a string"))
}

/// The fixture's key, from its recovery key; checks it against the fixture's raw bytes and our
/// own formatting of it.
fn key_from_recovery_key(fx: &Value) -> SecretStorageKey {
    let recovery_key = str_of(&fx["recovery_key"], "recovery_key");
    let key = SecretStorageKey::from_recovery_key(recovery_key).unwrap();
    assert_eq!(key.as_bytes()[..], b64::decode(str_of(&fx["secret_storage_key"], "secret_storage_key")).unwrap());
    assert_eq!(key.to_recovery_key().as_str(), recovery_key, "we format the key as js-sdk does");
    key
}

fn description(fx: &Value) -> KeyDescription {
    let key_id = str_of(&fx["key_id"], "key_id");
    assert_eq!(fx["account_data"]["m.secret_storage.default_key"]["key"], key_id);
    KeyDescription::from_content(&fx["account_data"][format!("m.secret_storage.key.{key_id}")]).unwrap()
}

/// Opens every stored secret with `key` and checks what comes out.
fn open_everything(fx: &Value, key: &SecretStorageKey) {
    let key_id = str_of(&fx["key_id"], "key_id");
    let account_data = &fx["account_data"];
    description(fx).check_key(key).unwrap();

    let secrets = fx["decrypted_secrets"].as_object().unwrap();
    assert_eq!(secrets.len(), 4);
    for (name, plaintext) in secrets {
        let secret = decrypt_stored_secret(key, name, key_id, &account_data[name]).unwrap().unwrap();
        assert_eq!(secret.as_str(), str_of(plaintext, name));
        // The secret name is bound into the key derivation: under any other name the MAC fails.
        for other in secrets.keys().filter(|other| *other != name) {
            let data = &account_data[name]["encrypted"][key_id];
            assert_eq!(decrypt_secret(key, other, data), Err(Error::MacMismatch), "{name} read as {other}");
        }
    }

    for (secret_name, field) in [
        ("m.cross_signing.master", "master_key"),
        ("m.cross_signing.self_signing", "self_signing_key"),
        ("m.cross_signing.user_signing", "user_signing_key"),
    ] {
        let seed = decode_cross_signing_secret(str_of(&secrets[secret_name], secret_name)).unwrap();
        assert_eq!(seed[..], b64::decode(str_of(&fx["private_keys"][field], field)).unwrap());
        let public = Ed25519SecretKey::from_slice(&seed).public_key().to_base64();
        let published = fx["published_keys"][field]["keys"].as_object().unwrap();
        assert_eq!(
            published.get(&format!("ed25519:{public}")).and_then(Value::as_str),
            Some(public.as_str()),
            "{field}"
        );
    }
    let backup = decode_cross_signing_secret(str_of(&secrets["m.megolm_backup.v1"], "backup")).unwrap();
    assert_eq!(backup[..], b64::decode(str_of(&fx["backup"]["key"], "backup key")).unwrap());

    assert_eq!(description(fx).check_key(&SecretStorageKey::from_bytes([0; 32])), Err(Error::WrongKey));
}

#[test]
fn js_sdk_random_key() {
    let fx = fixture("js-sdk-secret-storage.json");
    let key = key_from_recovery_key(&fx);
    assert!(description(&fx).passphrase.is_none());
    open_everything(&fx, &key);
}

#[test]
fn js_sdk_passphrase_key_by_recovery_key() {
    let fx = fixture("js-sdk-secret-storage-passphrase.json");
    let key = key_from_recovery_key(&fx);
    open_everything(&fx, &key);
}

/// 500000 PBKDF2-SHA-512 iterations take well under a second in release but many seconds
/// unoptimized; the unit test of V6 covers the same code with 10 iterations.
#[test]
fn js_sdk_passphrase_key_by_passphrase() {
    let fx = fixture("js-sdk-secret-storage-passphrase.json");
    let info = description(&fx).passphrase.expect("the key description has a passphrase");
    let key = info.derive_key(str_of(&fx["passphrase"], "passphrase")).unwrap();
    assert_eq!(key.as_bytes(), key_from_recovery_key(&fx).as_bytes());
    open_everything(&fx, &key);
}
