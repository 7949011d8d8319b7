//! The Client-Server API calls a verifying device needs, with retries: connection errors, 5xx
//! and 429 (honouring `retry_after_ms`) are retried with exponential backoff.

use std::time::Duration;

pub use reqwest::Method;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A failure talking to the homeserver.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The homeserver could not be reached (after retries).
    #[error("cannot reach the homeserver at {url}: {source}")]
    Unreachable {
        /// The base URL.
        url: String,
        /// The last transport error.
        source: reqwest::Error,
    },
    /// The homeserver answered with a Matrix error.
    #[error("the homeserver refused: {errcode}: {error} (HTTP {status})")]
    Matrix {
        /// HTTP status.
        status: u16,
        /// `errcode`, e.g. `M_FORBIDDEN`.
        errcode: String,
        /// `error` text.
        error: String,
        /// The whole body (UIA flows live here).
        body: Value,
    },
    /// The answer was not the JSON we expected.
    #[error("unexpected answer from the homeserver: {0}")]
    Malformed(String),
}

impl HttpError {
    /// The Matrix `errcode`, if any.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            Self::Matrix { errcode, .. } => Some(errcode),
            _ => None,
        }
    }
}

/// Retry policy.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// First backoff.
    pub initial: Duration,
    /// Backoff cap.
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self { attempts: 10, initial: Duration::from_millis(250), max: Duration::from_secs(5) }
    }
}

/// A homeserver and (once logged in) an access token.
#[derive(Debug, Clone)]
pub struct Homeserver {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
    retry: Retry,
}

fn enc(segment: &str) -> String {
    // Path segments: percent-encode everything outside the unreserved set.
    let mut out = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Homeserver {
    /// A client for `base` (e.g. `https://matrix.example.org`).
    pub fn new(base: &str, token: Option<String>) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("a TLS backend is compiled in");
        Self { base: base.trim_end_matches('/').to_owned(), token, client, retry: Retry::default() }
    }

    /// Changes the retry policy.
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sets the access token.
    pub fn set_token(&mut self, token: String) {
        self.token = Some(token);
    }

    /// One request with retries. `timeout` bounds each attempt (long polls pass a longer one).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, HttpError> {
        let url = format!("{}{path}", self.base);
        let mut backoff = self.retry.initial;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.client.request(method.clone(), &url).timeout(timeout);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let last = attempt >= self.retry.attempts;
            match req.send().await {
                Err(e) => {
                    if last {
                        return Err(HttpError::Unreachable { url: self.base.clone(), source: e });
                    }
                }
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    let value: Value =
                        if text.is_empty() { json!({}) } else { serde_json::from_str(&text).unwrap_or(Value::Null) };
                    if status.is_success() {
                        return if value.is_object() {
                            Ok(value)
                        } else {
                            Err(HttpError::Malformed(format!("{path}: not a JSON object")))
                        };
                    }
                    let retryable = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                    if !retryable || last {
                        return Err(HttpError::Matrix {
                            status: status.as_u16(),
                            errcode: value["errcode"].as_str().unwrap_or("M_UNKNOWN").to_owned(),
                            error: value["error"].as_str().unwrap_or(&text).to_owned(),
                            body: value,
                        });
                    }
                    if let Some(ms) = value["retry_after_ms"].as_u64() {
                        backoff = Duration::from_millis(ms).max(backoff);
                    }
                }
            }
            tokio::time::sleep(backoff.min(self.retry.max)).await;
            backoff = (backoff * 2).min(self.retry.max);
        }
    }

    async fn get(&self, path: &str) -> Result<Value, HttpError> {
        self.call(Method::GET, path, None, Duration::from_secs(30)).await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, HttpError> {
        self.call(Method::POST, path, Some(body), Duration::from_secs(30)).await
    }

    async fn put(&self, path: &str, body: &Value) -> Result<Value, HttpError> {
        self.call(Method::PUT, path, Some(body), Duration::from_secs(30)).await
    }

    /// `GET /_matrix/client/versions`: is this a homeserver at all?
    pub async fn versions(&self) -> Result<Value, HttpError> {
        self.get("/_matrix/client/versions").await
    }

    /// `POST /login` with a password; returns (user_id, device_id, access_token).
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        device_id: Option<&str>,
    ) -> Result<(String, String, String), HttpError> {
        let mut body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
            "initial_device_display_name": "mxverify",
        });
        if let Some(d) = device_id {
            body["device_id"] = json!(d);
        }
        let v = self.post("/_matrix/client/v3/login", &body).await?;
        let field =
            |k: &str| v[k].as_str().map(str::to_owned).ok_or_else(|| HttpError::Malformed(format!("login: no {k}")));
        Ok((field("user_id")?, field("device_id")?, field("access_token")?))
    }

    /// `POST /user/{user}/filter`: returns the filter id.
    pub async fn create_filter(&self, user: &str, filter: &Value) -> Result<String, HttpError> {
        let v = self.post(&format!("/_matrix/client/v3/user/{}/filter", enc(user)), filter).await?;
        v["filter_id"].as_str().map(str::to_owned).ok_or_else(|| HttpError::Malformed("filter: no filter_id".into()))
    }

    /// `GET /sync`, long-polling up to `timeout_ms`.
    pub async fn sync(&self, since: Option<&str>, filter: &str, timeout_ms: u64) -> Result<Value, HttpError> {
        let mut path = format!("/_matrix/client/v3/sync?filter={}&timeout={timeout_ms}", enc(filter));
        if let Some(s) = since {
            path.push_str(&format!("&since={}", enc(s)));
        }
        self.call(Method::GET, &path, None, Duration::from_millis(timeout_ms) + Duration::from_secs(30)).await
    }

    /// `PUT /sendToDevice/{type}/{txn}`: the transaction id makes a retry idempotent.
    pub async fn send_to_device(&self, event_type: &str, txn: &str, messages: &Value) -> Result<(), HttpError> {
        let path = format!("/_matrix/client/v3/sendToDevice/{}/{}", enc(event_type), enc(txn));
        self.put(&path, &json!({ "messages": messages })).await.map(drop)
    }

    /// `PUT /rooms/{room}/send/{type}/{txn}`; returns the event ID.
    pub async fn room_send(
        &self,
        room: &str,
        event_type: &str,
        txn: &str,
        content: &Value,
    ) -> Result<String, HttpError> {
        let path = format!("/_matrix/client/v3/rooms/{}/send/{}/{}", enc(room), enc(event_type), enc(txn));
        let v = self.put(&path, content).await?;
        v["event_id"].as_str().map(str::to_owned).ok_or_else(|| HttpError::Malformed("send: no event_id".into()))
    }

    /// `POST /createRoom` for a direct chat with `user`, the way Element makes one: `is_direct`,
    /// the invite, the `trusted_private_chat` preset and Megolm encryption in the initial state,
    /// so the room is encrypted before anyone is invited.
    pub async fn create_dm(&self, user: &str) -> Result<String, HttpError> {
        let body = json!({
            "invite": [user],
            "is_direct": true,
            "preset": "trusted_private_chat",
            "initial_state": [{
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2", "rotation_period_ms": 604_800_000u64,
                            "rotation_period_msgs": 100},
            }],
        });
        let v = self.post("/_matrix/client/v3/createRoom", &body).await?;
        v["room_id"].as_str().map(str::to_owned).ok_or_else(|| HttpError::Malformed("createRoom: no room_id".into()))
    }

    /// `GET /rooms/{room}/state/{type}/{state_key}`: one state event's content (404 if absent).
    pub async fn room_state(&self, room: &str, event_type: &str, state_key: &str) -> Result<Value, HttpError> {
        self.get(&format!("/_matrix/client/v3/rooms/{}/state/{}/{}", enc(room), enc(event_type), enc(state_key))).await
    }

    /// `GET /joined_rooms`.
    pub async fn joined_rooms(&self) -> Result<Vec<String>, HttpError> {
        let v = self.get("/_matrix/client/v3/joined_rooms").await?;
        Ok(v["joined_rooms"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect())
    }

    /// `GET /user/{user}/account_data/{type}`; `None` if there is none.
    pub async fn account_data(&self, user: &str, event_type: &str) -> Result<Option<Value>, HttpError> {
        match self.get(&format!("/_matrix/client/v3/user/{}/account_data/{}", enc(user), enc(event_type))).await {
            Ok(v) => Ok(Some(v)),
            Err(HttpError::Matrix { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `PUT /user/{user}/account_data/{type}`.
    pub async fn set_account_data(&self, user: &str, event_type: &str, content: &Value) -> Result<(), HttpError> {
        self.put(&format!("/_matrix/client/v3/user/{}/account_data/{}", enc(user), enc(event_type)), content)
            .await
            .map(drop)
    }

    /// `POST /keys/claim` for one-time keys: `wanted` maps user → device → algorithm.
    pub async fn keys_claim(&self, wanted: &Value) -> Result<Value, HttpError> {
        self.post("/_matrix/client/v3/keys/claim", &json!({"one_time_keys": wanted, "timeout": 10_000})).await
    }

    /// `POST /join/{room}`.
    pub async fn join(&self, room: &str) -> Result<(), HttpError> {
        self.post(&format!("/_matrix/client/v3/join/{}", enc(room)), &json!({})).await.map(drop)
    }

    /// `GET /joined_members` of a room.
    pub async fn joined_members(&self, room: &str) -> Result<Vec<String>, HttpError> {
        let v = self.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(room))).await?;
        Ok(v["joined"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default())
    }

    /// `POST /keys/upload`.
    pub async fn keys_upload(&self, body: &Value) -> Result<Value, HttpError> {
        self.post("/_matrix/client/v3/keys/upload", body).await
    }

    /// `POST /keys/query` for some users.
    pub async fn keys_query(&self, users: &[&str]) -> Result<Value, HttpError> {
        let map: serde_json::Map<String, Value> = users.iter().map(|u| ((*u).to_owned(), json!([]))).collect();
        self.post("/_matrix/client/v3/keys/query", &json!({ "device_keys": map })).await
    }

    /// `POST /keys/device_signing/upload`, with user-interactive auth by password if asked.
    pub async fn upload_cross_signing(
        &self,
        body: &Value,
        user: &str,
        password: Option<&str>,
    ) -> Result<(), HttpError> {
        let path = "/_matrix/client/v3/keys/device_signing/upload";
        match self.post(path, body).await {
            Ok(_) => Ok(()),
            Err(HttpError::Matrix { status: 401, body: uia, .. }) if uia.get("flows").is_some() => {
                let password = password.ok_or_else(|| {
                    HttpError::Malformed("the homeserver asks for the password to change cross-signing keys".into())
                })?;
                let mut body = body.clone();
                body["auth"] = json!({
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": user},
                    "password": password,
                    "session": uia["session"],
                });
                self.post(path, &body).await.map(drop)
            }
            Err(e) => Err(e),
        }
    }

    /// `POST /keys/signatures/upload`; fails if the server rejected any signature.
    pub async fn upload_signatures(&self, body: &Value) -> Result<(), HttpError> {
        let v = self.post("/_matrix/client/v3/keys/signatures/upload", body).await?;
        match v.get("failures").and_then(Value::as_object) {
            Some(f) if !f.is_empty() => {
                Err(HttpError::Malformed(format!("signatures rejected: {}", Value::Object(f.clone()))))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(super::enc("!room:example.org"), "%21room%3Aexample.org");
        assert_eq!(super::enc("$ev/1+2"), "%24ev%2F1%2B2");
        assert_eq!(super::enc("m.key.verification.start"), "m.key.verification.start");
    }
}

#[cfg(test)]
mod retry_tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A one-connection-at-a-time HTTP server answering with the given responses in order.
    async fn serve(responses: Vec<(u16, &'static str)>) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut served = 0;
            for (status, body) in responses {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let _ = sock.read(&mut buf).await.unwrap();
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(reply.as_bytes()).await.unwrap();
                served += 1;
            }
            served
        });
        (url, task)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn retries_429_honouring_retry_after_and_5xx() {
        let (url, server) = serve(vec![
            (429, r#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":300}"#),
            (502, r#"{}"#),
            (200, r#"{"versions":["v1.11"]}"#),
        ])
        .await;
        let hs = Homeserver::new(&url, None).with_retry(Retry {
            attempts: 5,
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
        });
        let started = Instant::now();
        let v = hs.versions().await.unwrap();
        assert_eq!(v["versions"][0], "v1.11");
        assert!(started.elapsed() >= Duration::from_millis(300), "retry_after_ms was honoured");
        assert_eq!(server.await.unwrap(), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn client_errors_are_not_retried_and_attempts_are_bounded() {
        let (url, server) = serve(vec![(403, r#"{"errcode":"M_FORBIDDEN","error":"no"}"#)]).await;
        let hs = Homeserver::new(&url, None);
        let e = hs.versions().await.unwrap_err();
        assert_eq!(e.errcode(), Some("M_FORBIDDEN"));
        assert_eq!(server.await.unwrap(), 1);
        let (url, _server) = serve(vec![(500, "{}"), (500, "{}"), (500, "{}")]).await;
        let hs = Homeserver::new(&url, None).with_retry(Retry {
            attempts: 3,
            initial: Duration::from_millis(5),
            max: Duration::from_millis(10),
        });
        assert!(matches!(hs.versions().await, Err(HttpError::Matrix { status: 500, .. })));
    }
}
