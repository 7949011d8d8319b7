//! The cross-signing keys: making them, signing with them, and getting them to every device the
//! user trusts — secret storage with the recovery key, and secret sharing right after a
//! self-verification ([spec: cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing),
//! [secrets](https://spec.matrix.org/v1.19/client-server-api/#secrets)).

use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::{Device, DeviceError, Inner, Notice, OsEntropy, now_ms, random_bytes, random_hex, refresh_own_identity};
use crate::cross_signing::{self, CrossSigningKeys, MASTER, SECRET_NAMES, SELF_SIGNING};
use crate::keys;
use crate::megolm::OlmSender;
use crate::secret_storage::{self, KeyDescription, SecretStorageKey};
use crate::secrets::{self, Asker, OpenRequest, RequestAction};
use mxverify_proto::Entropy;

/// How long a command stays after a verification with our own device, for secret sharing.
pub(crate) const SECRET_LINGER_MS: u64 = 15_000;
/// How long it stays after it last sent a secret (the other device asks for them together).
const SECRET_QUIET_MS: u64 = 2_000;

/// What `cross-signing bootstrap` did.
///
/// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing),
/// [Secret storage](https://spec.matrix.org/v1.19/client-server-api/#secret-storage),
/// [Cryptographic key representation](https://spec.matrix.org/v1.19/appendices/#cryptographic-key-representation).
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

impl Device {
    /// Creates master, self-signing and user-signing keys, uploads them (with password
    /// user-interactive auth if the server asks) and signs this device with the self-signing key;
    /// then keeps them in new secret storage and returns its recovery key, shown once. Keys that
    /// this device already holds and published are kept. Refuses to replace published keys it does
    /// not hold, and leaves existing secret storage alone, unless `replace`.
    ///
    /// Spec: [Cross-signing](https://spec.matrix.org/v1.19/client-server-api/#cross-signing),
    /// [`POST /keys/device_signing/upload`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysdevice_signingupload),
    /// [User-interactive authentication API](https://spec.matrix.org/v1.19/client-server-api/#user-interactive-authentication-api),
    /// [Secret storage](https://spec.matrix.org/v1.19/client-server-api/#secret-storage).
    pub async fn bootstrap_cross_signing(
        &self,
        password: Option<&str>,
        replace: bool,
    ) -> Result<Bootstrap, DeviceError> {
        let inner = &self.inner;
        let me = inner.user_id.clone();
        inner.query_keys(std::slice::from_ref(&me)).await?;
        let published = inner.lock().known.get(&me).and_then(|k| k.master_key.clone());
        {
            // Keys made by a bootstrap that stopped after the upload: the server has them, so do we.
            let mut st = inner.lock();
            let pending =
                st.store.get("cross_signing_pending")?.and_then(|j| CrossSigningKeys::from_json(&Zeroizing::new(j)));
            if let Some(pending) = pending {
                if published.is_some() && pending.public(MASTER) == published {
                    st.store.set("cross_signing", &pending.to_json())?;
                    st.cross = pending;
                }
                st.store.delete("cross_signing_pending")?;
            }
        }
        let created = match (&published, replace) {
            (Some(msk), false) => {
                if inner.lock().cross.public(MASTER).as_ref() != Some(msk) {
                    return Err(DeviceError::Corrupt(format!(
                        "this account already has a master key ({msk}) that this device does not hold; restore it with `mxverify cross-signing recover`, verify with a device that has it, or pass --replace to make new ones"
                    )));
                }
                false
            }
            _ => {
                let cross = CrossSigningKeys::generate();
                let body = {
                    let st = inner.lock();
                    let mut body = cross.upload_body(&me).expect("three new keys");
                    let message = keys::signable(&body["master_key"]).expect("our own object");
                    let sig = st.olm.sign(message.as_bytes());
                    keys::add_signature(&mut body["master_key"], &me, &format!("ed25519:{}", inner.device_id), &sig);
                    // Saved before the upload, adopted after it: no published key is ever lost.
                    st.store.set("cross_signing_pending", &cross.to_json())?;
                    body
                };
                inner.hs.upload_cross_signing(&body, &me, password).await?;
                {
                    let mut st = inner.lock();
                    st.store.set("cross_signing", &cross.to_json())?;
                    st.store.delete("cross_signing_pending")?;
                    st.cross = cross;
                }
                inner.sign_own_device().await?;
                true
            }
        };
        let master_key = inner.lock().cross.public(MASTER).expect("held");
        let default = inner.hs.account_data(&me, secret_storage::DEFAULT_KEY_EVENT_TYPE).await?;
        let complete = inner.lock().cross.is_complete();
        let (secret_storage, recovery_key) = if default.as_ref().is_some_and(|d| d["key"].is_string()) && !replace {
            ("existing", None)
        } else if !complete {
            ("incomplete", None)
        } else {
            let key = inner.create_secret_storage().await?;
            (if default.is_some() { "replaced" } else { "created" }, Some(key.to_recovery_key()))
        };
        {
            let mut st = inner.lock();
            refresh_own_identity(&mut st, &inner.user_id, &inner.device_id);
        }
        inner.query_keys(std::slice::from_ref(&me)).await?;
        Ok(Bootstrap { master_key, created, secret_storage, recovery_key })
    }

    /// Restores the three private keys from the account's default secret storage with a recovery
    /// key (or the passphrase it was made from), checks each against the published public key,
    /// stores them and signs this device ([secret storage](https://spec.matrix.org/v1.19/client-server-api/#secret-storage)).
    /// Nothing is stored unless every check passes.
    pub async fn recover_cross_signing(
        &self,
        recovery_key: Option<&str>,
        passphrase: Option<&str>,
    ) -> Result<String, DeviceError> {
        let inner = &self.inner;
        let me = inner.user_id.clone();
        let refused = DeviceError::Secrets;
        let default = inner.hs.account_data(&me, secret_storage::DEFAULT_KEY_EVENT_TYPE).await?;
        let key_id = default
            .as_ref()
            .and_then(|d| d["key"].as_str())
            .ok_or_else(|| refused("this account has no secret storage (no default secret-storage key)".into()))?
            .to_owned();
        let description = inner
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
        inner.query_keys(std::slice::from_ref(&me)).await?;
        let info = inner.lock().known.get(&me).cloned().unwrap_or_default();
        let mut restored = CrossSigningKeys::default();
        for name in SECRET_NAMES {
            let content = inner.hs.account_data(&me, name).await?.unwrap_or(Value::Null);
            let secret = secret_storage::decrypt_stored_secret(&key, name, &key_id, &content)
                .map_err(|e| refused(format!("{name}: {e}")))?
                .ok_or_else(|| refused(format!("secret storage holds no {name} for this key")))?;
            let private = cross_signing::key_matching(name, &secret, cross_signing::published_key(&info, name))
                .map_err(refused)?;
            restored.set(name, private);
        }
        {
            let mut st = inner.lock();
            st.store.set("cross_signing", &restored.to_json())?;
            st.cross = restored;
        }
        inner.sign_own_device().await?;
        {
            let mut st = inner.lock();
            refresh_own_identity(&mut st, &inner.user_id, &inner.device_id);
        }
        inner.query_keys(std::slice::from_ref(&me)).await?;
        Ok(inner.lock().cross.public(MASTER).expect("restored"))
    }
}

impl Device {
    /// Whether the account has default secret storage.
    ///
    /// Spec: [Key storage](https://spec.matrix.org/v1.19/client-server-api/#key-storage)
    /// (`m.secret_storage.default_key`).
    pub async fn has_secret_storage(&self) -> Result<bool, DeviceError> {
        let me = &self.inner.user_id;
        let default = self.inner.hs.account_data(me, secret_storage::DEFAULT_KEY_EVENT_TYPE).await?;
        Ok(default.is_some_and(|d| d["key"].is_string()))
    }
}

impl Inner {
    /// Signs this device with our self-signing key and uploads the signature.
    async fn sign_own_device(&self) -> Result<(), DeviceError> {
        let dev = {
            let st = self.lock();
            let Some(ssk) = st.cross.get(SELF_SIGNING) else { return Ok(()) };
            let mut dev = st.olm.device_keys();
            let ssk_pub = ssk.public_key().to_base64();
            keys::sign_with(&mut dev, &self.user_id, &ssk_pub, ssk).map_err(DeviceError::Corrupt)?;
            dev
        };
        self.hs.upload_signatures(&json!({ self.user_id.clone(): { self.device_id.clone(): dev } })).await?;
        Ok(())
    }

    /// New default secret storage holding the three private keys
    /// ([secret storage](https://spec.matrix.org/v1.19/client-server-api/#secret-storage)): the key's
    /// description, each secret, and last the default-key pointer, so that a run that stops
    /// half-way leaves no default key without its secrets.
    async fn create_secret_storage(&self) -> Result<SecretStorageKey, DeviceError> {
        let key = SecretStorageKey::from_bytes(random_bytes::<32>());
        let key_id: String = {
            const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            let mut raw = [0u8; 32];
            OsEntropy.fill(&mut raw);
            raw.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
        };
        let description = KeyDescription::new(&key, random_bytes::<16>(), None, None);
        let me = self.user_id.clone();
        self.hs.set_account_data(&me, &secret_storage::key_event_type(&key_id), &json!(description)).await?;
        for name in SECRET_NAMES {
            let secret = self.lock().cross.secret(name).expect("all three held");
            let encrypted = secret_storage::encrypt_secret(&key, name, &secret, random_bytes::<16>());
            self.hs.set_account_data(&me, name, &encrypted.into_content(&key_id)).await?;
        }
        self.hs.set_account_data(&me, secret_storage::DEFAULT_KEY_EVENT_TYPE, &json!({"key": key_id})).await?;
        Ok(key)
    }

    /// Uploads the queued signatures; each stays queued until the homeserver acknowledges it
    /// (or refuses it for good, reported). Returns whether any is still waiting.
    pub(crate) async fn upload_queued(&self) -> bool {
        let queued = self.lock().store.queued_uploads().unwrap_or_default();
        let mut waiting = false;
        for (id, what, body) in queued {
            match self.hs.upload_signatures(&body).await {
                Ok(()) => {
                    let _ = self.lock().store.remove_upload(id);
                    self.notice(Notice::new("signatures", format!("uploaded cross-signing signatures for {what}")));
                }
                // The server looked at it and said no: retrying changes nothing.
                Err(
                    e @ (crate::http::HttpError::Malformed(_)
                    | crate::http::HttpError::Matrix { status: 400..=499, .. }),
                ) if !e.is_rate_limited() && !e.is_unknown_token() => {
                    let _ = self.lock().store.remove_upload(id);
                    self.notice(Notice::new(
                        "signatures",
                        format!("the homeserver refused the signatures for {what}: {e}"),
                    ));
                }
                Err(e) => {
                    waiting = true;
                    self.notice(Notice::new(
                        "signatures",
                        format!("could not upload the signatures for {what} yet ({e}); will retry"),
                    ));
                }
            }
        }
        waiting
    }

    /// Whether one of our devices is trusted: verified by this device, or cross-signed by our
    /// self-signing key while we trust our master key.
    fn own_device_verified(&self, device_id: &str) -> bool {
        let st = self.lock();
        let Some(info) = st.known.get(&self.user_id) else { return false };
        let Some(device) = info.devices.get(device_id) else { return false };
        if st.store.is_trusted(&self.user_id, &device.ed25519).unwrap_or(false) {
            return true;
        }
        let master_trusted = info.master_key.as_ref().is_some_and(|k| {
            st.cross.public(MASTER).as_ref() == Some(k) || st.store.is_trusted(&self.user_id, k).unwrap_or(false)
        });
        device.cross_signed && master_trusted
    }

    fn save_secret_requests(&self, open: &[OpenRequest]) -> Result<(), DeviceError> {
        let json = serde_json::to_string(open).expect("plain data");
        self.lock().store.set("secret_requests", &json)?;
        Ok(())
    }

    /// After a verification with one of our own devices: ask it for the cross-signing keys this
    /// device lacks, and stay a moment for the keys to come, or for it to ask for ours
    /// ([sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing)).
    pub(crate) async fn after_own_verification(&self, device_id: &str) -> Result<(), DeviceError> {
        let now = now_ms();
        let missing = {
            let mut st = self.lock();
            // Only a device with keys to give waits to be asked for them.
            if !st.cross.is_empty() {
                st.secret_linger_until = Some(now + SECRET_LINGER_MS);
            }
            st.open_secret_requests.retain(|r| r.created_at + secrets::REQUEST_LIFETIME_MS > now);
            st.cross.missing()
        };
        for name in &missing {
            let request_id = random_hex(16);
            let content = json!({"action": "request", "name": name, "request_id": request_id,
                                 "requesting_device_id": self.device_id});
            let txn = {
                let mut st = self.lock();
                st.open_secret_requests.push(OpenRequest {
                    request_id,
                    name: (*name).to_owned(),
                    device_id: device_id.to_owned(),
                    created_at: now,
                });
                self.next_txn(&mut st, "s")
            };
            let messages = json!({self.user_id.clone(): {device_id: content}});
            self.hs.send_to_device("m.secret.request", &txn, &messages).await?;
        }
        if !missing.is_empty() {
            let open = self.lock().open_secret_requests.clone();
            self.save_secret_requests(&open)?;
            self.notice(Notice::new(
                "secret_requested",
                format!(
                    "asked device {device_id} for the cross-signing keys this device lacks ({})",
                    missing.join(", ")
                ),
            ));
        }
        self.wake.notify_one();
        Ok(())
    }

    /// An `m.secret.send` that came over Olm from `from`: believed only from our own verified
    /// device, for a request still open, and only if the key is the published one. Then it is
    /// kept, and a self-signing key at once signs this device.
    pub(crate) async fn receive_secret(&self, from: &OlmSender, content: &Value) -> Result<(), DeviceError> {
        let me = self.user_id.clone();
        if !self.lock().known.get(&me).is_some_and(|k| k.devices.contains_key(&from.device_id)) {
            let _ = self.query_keys(std::slice::from_ref(&me)).await;
        }
        let verified = self.own_device_verified(&from.device_id);
        let asker = Asker { user_id: &from.user_id, device_id: &from.device_id, verified };
        let open = self.lock().open_secret_requests.clone();
        let request = match secrets::judge_send(&self.user_id, true, &asker, content, &open) {
            Ok(r) => r.clone(),
            Err(why) => {
                self.notice(Notice::new(
                    "secret_refused",
                    format!("refused a secret from device {} of {}: {why}", from.device_id, from.user_id),
                ));
                return Ok(());
            }
        };
        self.query_keys(std::slice::from_ref(&me)).await?;
        let info = self.lock().known.get(&me).cloned().unwrap_or_default();
        let secret = Zeroizing::new(content["secret"].as_str().unwrap_or_default().to_owned());
        let key = match cross_signing::key_matching(
            &request.name,
            &secret,
            cross_signing::published_key(&info, &request.name),
        ) {
            Ok(k) => k,
            Err(why) => {
                self.notice(Notice::new(
                    "secret_refused",
                    format!("refused {} from device {}: {why}", request.name, from.device_id),
                ));
                return Ok(());
            }
        };
        let open = {
            let mut st = self.lock();
            st.cross.set(&request.name, key);
            let json = st.cross.to_json();
            st.store.set("cross_signing", &json)?;
            st.open_secret_requests.retain(|r| r.request_id != request.request_id);
            if request.name == MASTER {
                refresh_own_identity(&mut st, &self.user_id, &self.device_id);
            }
            st.open_secret_requests.clone()
        };
        self.save_secret_requests(&open)?;
        self.notice(Notice::new(
            "secret_received",
            format!("received {} from device {}", request.name, from.device_id),
        ));
        if request.name == SELF_SIGNING {
            self.sign_own_device().await?;
            self.notice(Notice::new("signatures", "signed this device with the self-signing key"));
        }
        self.wake.notify_one();
        Ok(())
    }

    /// An `m.secret.request` from one of our devices: a cross-signing key we hold goes, Olm
    /// encrypted, to our own verified devices only ([sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing)).
    pub(crate) async fn receive_secret_request(&self, sender: &str, content: &Value) -> Result<(), DeviceError> {
        let device_id = content["requesting_device_id"].as_str().unwrap_or_default().to_owned();
        let unknown = !self.lock().known.get(sender).is_some_and(|k| k.devices.contains_key(&device_id));
        if sender == self.user_id && !device_id.is_empty() && unknown {
            let _ = self.query_keys(&[sender.to_owned()]).await;
        }
        let verified = sender == self.user_id && self.own_device_verified(&device_id);
        let asker = Asker { user_id: sender, device_id: &device_id, verified };
        match secrets::judge_request(&self.user_id, &self.device_id, &asker, content) {
            Ok(RequestAction::Send { request_id, name, device_id }) => {
                let Some(secret) = self.lock().cross.secret(&name) else {
                    self.notice(Notice::new(
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
                    self.notice(Notice::new(
                        "secret_request",
                        format!("cannot send {name} to device {device_id}: no encrypted channel to it"),
                    ));
                    return Ok(());
                }
                let txn = self.next_txn(&mut self.lock(), "s");
                self.hs.send_to_device("m.room.encrypted", &txn, &json!({me: per_device})).await?;
                self.notice(Notice::new("secret_sent", format!("sent {name} to our verified device {device_id}")));
                // The other device asks for the keys together: once answered, a short wait is enough.
                self.lock().secret_linger_until = Some(now_ms() + SECRET_QUIET_MS);
                self.wake.notify_one();
            }
            // Requests are answered at once, so nothing waits to be cancelled.
            Ok(RequestAction::Cancel { .. }) => {}
            Err(why) => {
                let name = content["name"].as_str().unwrap_or("a secret");
                self.notice(Notice::new(
                    "secret_refused",
                    format!("did not give {name} to {sender} (device {device_id}): {why}"),
                ));
            }
        }
        Ok(())
    }
}
