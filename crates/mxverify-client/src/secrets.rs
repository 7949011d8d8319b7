//! Secret sharing between a user's own devices: who may ask for the cross-signing keys, whose
//! answer is believed ([spec: sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing)).
//!
//! The rules are pure functions of what the device knows, so that each can be tested on its own;
//! the device does the sending and storing.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cross_signing::SECRET_NAMES;

/// A request for a secret that we sent and that is still open.
///
/// Spec: [`m.secret.request`](https://spec.matrix.org/v1.19/client-server-api/#msecretrequest),
/// [Secrets › Sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// `request_id`.
    pub request_id: String,
    /// The secret's name.
    pub name: String,
    /// The device we asked.
    pub device_id: String,
    /// When we asked (ms).
    pub created_at: u64,
}

/// How long a request for a secret stays open.
///
/// Serves: [Secrets › Sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing) (the spec sets no lifetime;
/// this one is ours).
pub const REQUEST_LIFETIME_MS: u64 = 10 * 60 * 1000;

/// What we know of the device an `m.secret.send` or `m.secret.request` came from.
///
/// Spec: [Secrets › Sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asker<'a> {
    /// The event's sender.
    pub user_id: &'a str,
    /// The device (for a send: the Olm sender's; for a request: `requesting_device_id`).
    pub device_id: &'a str,
    /// Whether the device is one of our own that we trust: verified by us, or cross-signed by
    /// our trusted self-signing key.
    pub verified: bool,
}

/// Whether an `m.secret.send` is to be believed; the secret's name if so. The key itself is then
/// checked against the published public key ([`crate::cross_signing::key_matching`]).
///
/// Spec: [`m.secret.send`](https://spec.matrix.org/v1.19/client-server-api/#msecretsend),
/// [Secrets › Sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing).
pub fn judge_send<'r>(
    own_user: &str,
    over_olm: bool,
    from: &Asker<'_>,
    content: &Value,
    open: &'r [OpenRequest],
) -> Result<&'r OpenRequest, String> {
    if !over_olm {
        return Err("it arrived unencrypted; secrets are accepted only over Olm".into());
    }
    if from.user_id != own_user {
        return Err(format!("it came from another user, {}", from.user_id));
    }
    if !from.verified {
        return Err(format!("it came from our device {}, which is not verified", from.device_id));
    }
    let Some(request_id) = content["request_id"].as_str() else {
        return Err("it has no request_id".into());
    };
    let Some(request) = open.iter().find(|r| r.request_id == request_id) else {
        return Err(format!("we have no open request {request_id}"));
    };
    if request.device_id != from.device_id {
        return Err(format!("we asked device {} for it, not {}", request.device_id, from.device_id));
    }
    if !content["secret"].is_string() {
        return Err("it has no secret".into());
    }
    Ok(request)
}

/// What to do with an `m.secret.request`.
///
/// Spec: [`m.secret.request`](https://spec.matrix.org/v1.19/client-server-api/#msecretrequest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestAction {
    /// Send this secret to that device.
    Send {
        /// `request_id`.
        request_id: String,
        /// The secret's name.
        name: String,
        /// The requesting device.
        device_id: String,
    },
    /// Forget a request we were asked earlier.
    Cancel {
        /// `request_id`.
        request_id: String,
        /// The requesting device.
        device_id: String,
    },
}

/// Whether to answer an `m.secret.request`: only our own verified devices (never this one, nor
/// another user) get a cross-signing key; other secrets are not ours to give.
///
/// Spec: [`m.secret.request`](https://spec.matrix.org/v1.19/client-server-api/#msecretrequest),
/// [Secrets › Sharing](https://spec.matrix.org/v1.19/client-server-api/#sharing).
pub fn judge_request(
    own_user: &str,
    own_device: &str,
    from: &Asker<'_>,
    content: &Value,
) -> Result<RequestAction, String> {
    let (Some(request_id), Some(device_id)) =
        (content["request_id"].as_str(), content["requesting_device_id"].as_str())
    else {
        return Err("it has no request_id or requesting_device_id".into());
    };
    if from.user_id != own_user {
        return Err(format!("it came from another user, {}", from.user_id));
    }
    if device_id == own_device {
        return Err("it is our own request".into());
    }
    match content["action"].as_str() {
        Some("request_cancellation") => {
            return Ok(RequestAction::Cancel { request_id: request_id.into(), device_id: device_id.into() });
        }
        Some("request") => {}
        other => return Err(format!("unknown action {other:?}")),
    }
    let Some(name) = content["name"].as_str() else {
        return Err("it names no secret".into());
    };
    if !SECRET_NAMES.contains(&name) {
        return Err(format!("{name} is not a secret this device shares"));
    }
    if !from.verified {
        return Err(format!("device {device_id} is not verified"));
    }
    Ok(RequestAction::Send { request_id: request_id.into(), name: name.into(), device_id: device_id.into() })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cross_signing::MASTER;

    const ME: &str = "@me:example.org";

    fn open() -> Vec<OpenRequest> {
        vec![OpenRequest { request_id: "r1".into(), name: MASTER.into(), device_id: "OLD".into(), created_at: 0 }]
    }

    fn asker(user: &'static str, device: &'static str, verified: bool) -> Asker<'static> {
        Asker { user_id: user, device_id: device, verified }
    }

    #[test]
    fn a_secret_is_believed_only_from_our_verified_device_over_olm_for_an_open_request() {
        let open = open();
        let send = json!({"request_id": "r1", "secret": "AAAA"});
        assert_eq!(judge_send(ME, true, &asker(ME, "OLD", true), &send, &open).unwrap().name, MASTER);
        let refused =
            |over_olm, from: Asker<'_>, content: &Value| judge_send(ME, over_olm, &from, content, &open).unwrap_err();
        assert!(refused(false, asker(ME, "OLD", true), &send).contains("unencrypted"));
        assert!(refused(true, asker("@mallory:example.org", "OLD", true), &send).contains("another user"));
        assert!(refused(true, asker(ME, "OLD", false), &send).contains("not verified"));
        assert!(refused(true, asker(ME, "OTHER", true), &send).contains("we asked device OLD"));
        assert!(
            refused(true, asker(ME, "OLD", true), &json!({"request_id": "r2", "secret": "AAAA"}))
                .contains("no open request")
        );
        assert!(refused(true, asker(ME, "OLD", true), &json!({"secret": "AAAA"})).contains("no request_id"));
        assert!(refused(true, asker(ME, "OLD", true), &json!({"request_id": "r1"})).contains("no secret"));
    }

    #[test]
    fn only_our_verified_devices_get_a_cross_signing_key() {
        let req = |name: &str, device: &str| json!({"action": "request", "name": name, "request_id": "q", "requesting_device_id": device});
        assert_eq!(
            judge_request(ME, "THIS", &asker(ME, "NEW", true), &req(MASTER, "NEW")),
            Ok(RequestAction::Send { request_id: "q".into(), name: MASTER.into(), device_id: "NEW".into() })
        );
        assert!(
            judge_request(ME, "THIS", &asker(ME, "NEW", false), &req(MASTER, "NEW"))
                .unwrap_err()
                .contains("not verified")
        );
        assert!(judge_request(ME, "THIS", &asker("@eve:example.org", "NEW", true), &req(MASTER, "NEW")).is_err());
        assert!(judge_request(ME, "THIS", &asker(ME, "THIS", true), &req(MASTER, "THIS")).unwrap_err().contains("own"));
        assert!(judge_request(ME, "THIS", &asker(ME, "NEW", true), &req("m.megolm_backup.v1", "NEW")).is_err());
        let cancel = json!({"action": "request_cancellation", "request_id": "q", "requesting_device_id": "NEW"});
        assert_eq!(
            judge_request(ME, "THIS", &asker(ME, "NEW", false), &cancel),
            Ok(RequestAction::Cancel { request_id: "q".into(), device_id: "NEW".into() })
        );
        assert!(judge_request(ME, "THIS", &asker(ME, "NEW", true), &json!({"action": "steal"})).is_err());
    }
}
