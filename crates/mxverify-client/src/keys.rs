//! Signed JSON (device keys, cross-signing keys): signing, and checking every signature of a
//! `/keys/query` answer before any key is used ([spec: cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing)).

use std::collections::BTreeMap;

use mxverify_proto::canonical;
use serde_json::{Value, json};
use vodozemac::{Ed25519PublicKey, Ed25519SecretKey, Ed25519Signature};

/// The canonical JSON that a signature covers: the object without `signatures` and `unsigned`.
///
/// Spec: [Signing JSON](https://spec.matrix.org/v1.19/appendices/#signing-json).
pub fn signable(obj: &Value) -> Option<String> {
    let mut o = obj.as_object()?.clone();
    o.remove("signatures");
    o.remove("unsigned");
    canonical::to_string(&Value::Object(o)).ok()
}

/// Adds `signature` by `signer`'s `key_id` to a signed-JSON object.
///
/// Spec: [Signing JSON](https://spec.matrix.org/v1.19/appendices/#signing-json).
pub fn add_signature(obj: &mut Value, signer: &str, key_id: &str, signature: &Ed25519Signature) {
    let Some(obj) = obj.as_object_mut() else { return };
    let sigs = obj.entry("signatures").or_insert_with(|| json!({}));
    if !sigs.is_object() {
        *sigs = json!({});
    }
    if !sigs[signer].is_object() {
        sigs[signer] = json!({});
    }
    sigs[signer][key_id] = json!(signature.to_base64());
}

/// Signs an object with a secret key, under `ed25519:<key_id>`. Fails (signing nothing) if the
/// object has no canonical JSON form — a float, or an integer beyond ±2^53, in a key someone
/// else published.
///
/// Spec: [Signing JSON](https://spec.matrix.org/v1.19/appendices/#signing-json).
pub fn sign_with(obj: &mut Value, signer: &str, key_id: &str, key: &Ed25519SecretKey) -> Result<(), String> {
    let message = signable(obj).ok_or("the object has no canonical JSON form, so it cannot be signed")?;
    let sig = key.sign(message.as_bytes());
    add_signature(obj, signer, &format!("ed25519:{key_id}"), &sig);
    Ok(())
}

/// Whether `obj` carries a valid signature by `signer`'s `ed25519:<key_id>` = `public_b64`.
///
/// Spec: [Checking for a signature](https://spec.matrix.org/v1.19/appendices/#checking-for-a-signature).
pub fn has_valid_signature(obj: &Value, signer: &str, key_id: &str, public_b64: &str) -> bool {
    let (Some(sig), Ok(public), Some(message)) = (
        obj.pointer(&format!("/signatures/{}/ed25519:{}", escape(signer), escape(key_id))).and_then(Value::as_str),
        Ed25519PublicKey::from_base64(public_b64),
        signable(obj),
    ) else {
        return false;
    };
    Ed25519Signature::from_base64(sig).is_ok_and(|s| public.verify(message.as_bytes(), &s).is_ok())
}

fn escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// One device of a user, with a valid self-signature.
///
/// Spec: [Device keys](https://spec.matrix.org/v1.19/client-server-api/#device-keys),
/// [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeys {
    /// Device ID.
    pub device_id: String,
    /// Ed25519 key (unpadded base64).
    pub ed25519: String,
    /// Curve25519 key, if published.
    pub curve25519: Option<String>,
    /// Display name, if any.
    pub display_name: Option<String>,
    /// Whether the owner's self-signing key signed it (validly).
    pub cross_signed: bool,
    /// The signed JSON as published (needed to add our signature).
    pub json: Value,
}

/// What `/keys/query` says of one user, after every check.
///
/// Spec: [`POST /keys/query`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysquery),
/// [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserKeyInfo {
    /// Devices with a valid self-signature.
    pub devices: BTreeMap<String, DeviceKeys>,
    /// The master key.
    pub master_key: Option<String>,
    /// Its signed JSON.
    pub master_json: Option<Value>,
    /// The self-signing key, if validly signed by the master key.
    pub self_signing_key: Option<String>,
    /// The user-signing key (own user only), if validly signed by the master key.
    pub user_signing_key: Option<String>,
    /// What was rejected and why (for diagnostics).
    pub rejected: Vec<String>,
}

impl UserKeyInfo {
    /// The machine's view of these keys.
    ///
    /// Serves: [Key verification framework](https://spec.matrix.org/v1.19/client-server-api/#key-verification-framework)
    /// (the keys a verification may confirm).
    pub fn for_machine(&self) -> mxverify_proto::UserKeys {
        // Keys that are not 32 bytes of base64 cannot be verified: the machine does not see them.
        let typed = |k: &String| k.parse::<mxverify_proto::Ed25519PublicKey>().ok();
        mxverify_proto::UserKeys {
            devices: self.devices.iter().filter_map(|(id, d)| Some((id.clone(), typed(&d.ed25519)?))).collect(),
            master_key: self.master_key.as_ref().and_then(typed),
            other_cross_signing_keys: self
                .self_signing_key
                .iter()
                .chain(&self.user_signing_key)
                .filter_map(typed)
                .collect(),
        }
    }
}

/// The single ed25519 key of a cross-signing key object with this usage, checked. A key
/// object must have a canonical JSON form (no floats, no integers beyond ±2^53): we may have to
/// sign it.
fn cross_signing_key(obj: &Value, user: &str, usage: &str) -> Result<String, String> {
    if obj["user_id"] != user {
        return Err(format!("{usage} key: wrong user_id"));
    }
    if signable(obj).is_none() {
        return Err(format!("{usage} key: no canonical JSON form (a float or an integer out of range)"));
    }
    if !obj["usage"].as_array().is_some_and(|u| u.iter().any(|x| x == usage)) {
        return Err(format!("{usage} key: usage does not include {usage}"));
    }
    let keys = obj["keys"].as_object().ok_or(format!("{usage} key: no keys"))?;
    let [(id, key)] = keys.iter().collect::<Vec<_>>()[..] else {
        return Err(format!("{usage} key: not exactly one key"));
    };
    let key = key.as_str().ok_or(format!("{usage} key: not a string"))?;
    if *id != format!("ed25519:{key}") || Ed25519PublicKey::from_base64(key).is_err() {
        return Err(format!("{usage} key: malformed key {id}"));
    }
    Ok(key.to_owned())
}

/// Checks one user's part of a `/keys/query` answer: device self-signatures, and the self- and
/// user-signing keys' signatures by the master key. Anything that fails a check is left out.
///
/// ```
/// use mxverify_client::keys;
/// use serde_json::json;
/// use vodozemac::Ed25519SecretKey;
///
/// // A device signs its own keys with its Ed25519 key, `ed25519:<device ID>`.
/// let key = Ed25519SecretKey::new();
/// let public = key.public_key().to_base64();
/// let mut phone = json!({
///     "user_id": "@bob:example.org",
///     "device_id": "PHONE",
///     "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
///     "keys": {"ed25519:PHONE": public},
/// });
/// keys::sign_with(&mut phone, "@bob:example.org", "PHONE", &key).unwrap();
/// // Another device claims the same key without a signature.
/// let copy = json!({"user_id": "@bob:example.org", "device_id": "COPY", "keys": {"ed25519:COPY": public}});
/// let answer = json!({"device_keys": {"@bob:example.org": {"PHONE": phone, "COPY": copy}}});
///
/// let info = keys::check_user(&answer, "@bob:example.org");
/// assert_eq!(info.devices.keys().collect::<Vec<_>>(), ["PHONE"]);
/// assert_eq!(info.rejected.len(), 1);
/// ```
///
/// Spec: [`POST /keys/query`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysquery),
/// [Device keys](https://spec.matrix.org/v1.19/client-server-api/#device-keys),
/// [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing).
pub fn check_user(resp: &Value, user: &str) -> UserKeyInfo {
    let mut info = UserKeyInfo::default();
    if let Some(master) = resp.pointer(&format!("/master_keys/{}", escape(user))) {
        match cross_signing_key(master, user, "master") {
            Ok(k) => {
                info.master_key = Some(k);
                info.master_json = Some(master.clone());
            }
            Err(e) => info.rejected.push(e),
        }
    }
    let signed_by_master = |obj: &Value, usage: &str, info: &mut UserKeyInfo| -> Option<String> {
        let msk = info.master_key.clone()?;
        match cross_signing_key(obj, user, usage) {
            Ok(k) if has_valid_signature(obj, user, &msk, &msk) => Some(k),
            Ok(_) => {
                info.rejected.push(format!("{usage} key: not signed by the master key"));
                None
            }
            Err(e) => {
                info.rejected.push(e);
                None
            }
        }
    };
    if let Some(ssk) = resp.pointer(&format!("/self_signing_keys/{}", escape(user))) {
        info.self_signing_key = signed_by_master(ssk, "self_signing", &mut info);
    }
    if let Some(usk) = resp.pointer(&format!("/user_signing_keys/{}", escape(user))) {
        info.user_signing_key = signed_by_master(usk, "user_signing", &mut info);
    }
    let devices = resp.pointer(&format!("/device_keys/{}", escape(user))).and_then(Value::as_object);
    for (device_id, d) in devices.into_iter().flatten() {
        let ed = d.pointer(&format!("/keys/ed25519:{}", escape(device_id))).and_then(Value::as_str);
        let ok = d["user_id"] == user && d["device_id"] == device_id.as_str();
        match ed {
            Some(ed) if ok && has_valid_signature(d, user, device_id, ed) => {
                let cross_signed =
                    info.self_signing_key.as_ref().is_some_and(|ssk| has_valid_signature(d, user, ssk, ssk));
                info.devices.insert(
                    device_id.clone(),
                    DeviceKeys {
                        device_id: device_id.clone(),
                        ed25519: ed.to_owned(),
                        curve25519: d
                            .pointer(&format!("/keys/curve25519:{}", escape(device_id)))
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        display_name: d
                            .pointer("/unsigned/device_display_name")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        cross_signed,
                        json: d.clone(),
                    },
                );
            }
            _ => info.rejected.push(format!("device {device_id}: missing or invalid self-signature")),
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed_device(user: &str, device: &str, key: &Ed25519SecretKey) -> Value {
        let mut d = json!({"user_id": user, "device_id": device, "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": {format!("ed25519:{device}"): key.public_key().to_base64()}});
        sign_with(&mut d, user, device, key).unwrap();
        d
    }

    fn cs_key(user: &str, usage: &str, key: &Ed25519SecretKey) -> Value {
        let pk = key.public_key().to_base64();
        json!({"user_id": user, "usage": [usage], "keys": {format!("ed25519:{pk}"): pk}})
    }

    #[test]
    fn a_key_without_canonical_json_is_refused_at_the_boundary() {
        let msk = Ed25519SecretKey::new();
        let u = "@u:x";
        for odd in [json!(1.5), json!(1u64 << 60), json!(-(1i64 << 60))] {
            let mut master = cs_key(u, "master", &msk);
            master["extra"] = odd.clone();
            let resp = json!({"master_keys": {u: master}});
            let info = check_user(&resp, u);
            assert_eq!(info.master_key, None, "{odd}");
            assert!(info.rejected[0].contains("canonical"), "{:?}", info.rejected);
        }
        // A device object with one is refused too (its self-signature cannot be checked).
        let dev = Ed25519SecretKey::new();
        let mut d = signed_device(u, "D", &dev);
        d["unsigned"] = json!({"x": 1.5}); // outside the signed part: fine
        d["algorithms"] = json!([1.5]);
        let info = check_user(&json!({"device_keys": {u: {"D": d}}}), u);
        assert!(info.devices.is_empty());
        // And signing one is an error, not a panic.
        let mut obj = json!({"a": 0.5});
        assert!(sign_with(&mut obj, u, "K", &dev).is_err());
    }

    #[test]
    fn checks_every_signature() {
        let (dev, msk, ssk, other) =
            (Ed25519SecretKey::new(), Ed25519SecretKey::new(), Ed25519SecretKey::new(), Ed25519SecretKey::new());
        let u = "@u:x";
        let mut good = signed_device(u, "GOOD", &dev);
        let msk_pub = msk.public_key().to_base64();
        let ssk_pub = ssk.public_key().to_base64();
        sign_with(&mut good, u, &ssk_pub, &ssk).unwrap();
        let mut forged = signed_device(u, "FORGED", &dev);
        forged["keys"]["ed25519:FORGED"] = json!(other.public_key().to_base64()); // signature no longer matches
        let wrong_user = signed_device("@v:x", "WRONGUSER", &dev);
        let mut ssk_obj = cs_key(u, "self_signing", &ssk);
        sign_with(&mut ssk_obj, u, &msk_pub, &msk).unwrap();
        let mut usk_obj = cs_key(u, "user_signing", &other);
        sign_with(&mut usk_obj, u, &ssk_pub, &ssk).unwrap(); // signed by the wrong key
        let resp = json!({
            "device_keys": {u: {"GOOD": good, "FORGED": forged, "WRONGUSER": wrong_user}},
            "master_keys": {u: cs_key(u, "master", &msk)},
            "self_signing_keys": {u: ssk_obj},
            "user_signing_keys": {u: usk_obj},
        });
        let info = check_user(&resp, u);
        assert_eq!(info.devices.keys().collect::<Vec<_>>(), ["GOOD"]);
        assert!(info.devices["GOOD"].cross_signed);
        assert_eq!(info.master_key.as_deref(), Some(msk_pub.as_str()));
        assert_eq!(info.self_signing_key.as_deref(), Some(ssk_pub.as_str()));
        assert_eq!(info.user_signing_key, None);
        assert_eq!(info.rejected.len(), 3, "{:?}", info.rejected);
    }
}
