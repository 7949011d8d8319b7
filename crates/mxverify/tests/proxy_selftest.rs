//! Tests of the fault-injecting proxy (tests/common/proxy.rs) against a small upstream started
//! here, seen through reqwest; and one request through the real Synapse.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::proxy::{Down, FaultProxy, RetryHint};
use http_body_util::channel::Channel;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// A small HTTP upstream on its own thread:
/// - `/slow?ms=N`: answers `{"slept":N}` after N ms (a long poll);
/// - `/chunked`: a JSON body sent in three chunks (`Transfer-Encoding: chunked`);
/// - `/status/N`: status N with `{"errcode":"X_UPSTREAM"}`;
/// - `/text`: `text/plain`;
/// - anything else: 200 with what it received (method, path, some headers, body) as JSON and an
///   `X-Upstream: 1` header.
struct Upstream {
    url: String,
    /// Path and query of every request received.
    seen: Arc<Mutex<Vec<String>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start() -> Upstream {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", std_listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let log = seen.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let log = log.clone();
                            tokio::spawn(async move {
                                let svc = service_fn(move |req| route(req, log.clone()));
                                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                            });
                        }
                    }
                }
            });
        });
        Upstream { url, seen, stop: Some(stop), thread: Some(thread) }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn hits(&self, path_contains: &str) -> usize {
        self.seen().iter().filter(|p| p.contains(path_contains)).count()
    }

    fn authority(&self) -> &str {
        self.url.trim_start_matches("http://")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.thread.take().unwrap().join();
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("x-upstream", "1")
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

async fn route(req: Request<Incoming>, seen: Arc<Mutex<Vec<String>>>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path_and_query().unwrap().as_str().to_owned();
    seen.lock().unwrap().push(path.clone());
    let header = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    if let Some(q) = path.strip_prefix("/slow?ms=") {
        let ms: u64 = q.parse().unwrap();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Ok(full(200, "application/json", json!({"slept": ms}).to_string()));
    }
    if path == "/chunked" {
        let (mut tx, body) = Channel::<Bytes, Infallible>::new(1);
        tokio::spawn(async move {
            for part in [r#"{"parts":["#, "1,2,", "3]}"] {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if tx.send_data(Bytes::from(part)).await.is_err() {
                    return;
                }
            }
        });
        return Ok(Response::builder().header("content-type", "application/json").body(body.boxed()).unwrap());
    }
    if let Some(status) = path.strip_prefix("/status/") {
        return Ok(full(status.parse().unwrap(), "application/json", r#"{"errcode":"X_UPSTREAM"}"#));
    }
    if path == "/text" {
        return Ok(full(200, "text/plain", "plain text"));
    }
    let echo = json!({
        "method": req.method().as_str(),
        "path": path,
        "authorization": header("authorization"),
        "custom": header("x-custom"),
        "host": header("host"),
        "accept_encoding": header("accept-encoding"),
        "content_length": header("content-length"),
        "transfer_encoding": header("transfer-encoding"),
    });
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut echo = echo;
    echo["body"] = json!(String::from_utf8_lossy(&body));
    Ok(full(200, "application/json", echo.to_string()))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn get(c: &reqwest::Client, url: String) -> (u16, reqwest::header::HeaderMap, String) {
    let r = c.get(url).send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Waits (without blocking the test's runtime) until `n` requests matching `path` reached the proxy.
async fn arrived(proxy: &FaultProxy, path: &str, n: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while proxy.count(path) < n {
        assert!(Instant::now() < end, "no {path} at the proxy: {:#?}", proxy.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
}

#[tokio::test]
async fn forwards_method_path_headers_and_body() {
    let up = Upstream::start();
    let proxy = FaultProxy::start(&format!("{}/", up.url));
    assert!(proxy.url().starts_with("http://127.0.0.1:"));
    let c = client();

    let r = c
        .put(format!("{}/echo/x?since=s1&timeout=0", proxy.url()))
        .bearer_auth("secret-token")
        .header("x-custom", "kept")
        .json(&json!({"k": "v"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "1", "upstream's headers are passed on");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path"], "/echo/x?since=s1&timeout=0");
    assert_eq!(v["authorization"], "Bearer secret-token");
    assert_eq!(v["custom"], "kept");
    assert_eq!(v["body"], r#"{"k":"v"}"#);
    assert_eq!(v["content_length"], "9");
    assert_eq!(v["host"], up.authority(), "Host names the upstream");
    assert_eq!(v["accept_encoding"], "identity");

    let (status, _, text) = get(&c, format!("{}/echo/get", proxy.url())).await;
    assert_eq!(status, 200);
    let v = parse(&text);
    assert_eq!((v["method"].as_str(), v["body"].as_str()), (Some("GET"), Some("")));
    assert_eq!(v["authorization"], Value::Null);

    let (status, _, text) = get(&c, format!("{}/status/404", proxy.url())).await;
    assert_eq!((status, text.as_str()), (404, r#"{"errcode":"X_UPSTREAM"}"#), "upstream errors pass unchanged");

    let log = proxy.log();
    let summary: Vec<_> = log.iter().map(|e| (e.method.as_str(), e.path.as_str(), e.status, e.injected)).collect();
    assert_eq!(
        summary,
        [
            ("PUT", "/echo/x?since=s1&timeout=0", Some(200), false),
            ("GET", "/echo/get", Some(200), false),
            ("GET", "/status/404", Some(404), false)
        ]
    );
    assert!(log.iter().all(|e| e.answered.unwrap() >= e.at && !e.rewritten && e.error.is_none()));
    let n = proxy.counters();
    assert_eq!((n.requests, n.forwarded, n.injected, n.unanswered), (3, 3, 0, 0));
    assert_eq!(n.connections, 1, "reqwest kept its connection alive across the three requests");
    assert_eq!(up.seen().len(), 3);
}

#[tokio::test]
async fn chunked_long_polling_and_concurrent_requests() {
    let up = Upstream::start();
    let proxy = FaultProxy::start(&up.url);
    let c = client();

    let r = c.get(format!("{}/chunked", proxy.url())).send().await.unwrap();
    assert_eq!(r.headers().get("transfer-encoding"), None);
    assert_eq!(r.content_length(), Some(17), "a chunked answer is passed on whole with its length");
    assert_eq!(r.text().await.unwrap(), r#"{"parts":[1,2,3]}"#);

    // Two long polls in flight do not hold up other requests on the same client.
    let started = Instant::now();
    let polls: Vec<_> = (0..2)
        .map(|_| {
            let (c, url) = (c.clone(), format!("{}/slow?ms=1500", proxy.url()));
            tokio::spawn(async move { get(&c, url).await })
        })
        .collect();
    arrived(&proxy, "/slow", 2).await;
    let quick: Vec<_> = (0..5)
        .map(|i| {
            let (c, url) = (c.clone(), format!("{}/echo/quick{i}", proxy.url()));
            tokio::spawn(async move { get(&c, url).await })
        })
        .collect();
    for (i, q) in quick.into_iter().enumerate() {
        let (status, _, text) = q.await.unwrap();
        assert_eq!((status, parse(&text)["path"].as_str().unwrap()), (200, &*format!("/echo/quick{i}")));
    }
    assert!(started.elapsed() < Duration::from_millis(1400), "quick requests waited for the long polls");
    for p in polls {
        let (status, _, text) = p.await.unwrap();
        assert_eq!((status, parse(&text)), (200, json!({"slept": 1500})));
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(proxy.counters().forwarded, 8);
}

#[tokio::test]
async fn fail_next_answers_without_reaching_upstream() {
    let up = Upstream::start();
    let proxy = FaultProxy::start(&up.url);
    let c = client();
    let url = |p: &str| format!("{}{p}", proxy.url());

    proxy.fail_next(2, 503, Some("/echo/a"));
    for _ in 0..2 {
        let (status, headers, text) = get(&c, url("/echo/a?x=1")).await;
        assert_eq!(status, 503);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(parse(&text), json!({"errcode": "M_UNKNOWN", "error": "injected"}));
    }
    assert_eq!(get(&c, url("/echo/b")).await.0, 200, "other paths are not affected");
    assert_eq!(get(&c, url("/echo/a")).await.0, 200, "only the next two");
    assert_eq!(up.hits("/echo/a"), 1, "failed requests never reached upstream");

    proxy.fail_next(1, 502, None);
    proxy.fail_next(1, 500, Some("/echo/c"));
    assert_eq!(get(&c, url("/echo/c")).await.0, 502, "faults apply in the order set");
    assert_eq!(get(&c, url("/echo/c")).await.0, 500);
    assert_eq!(get(&c, url("/echo/c")).await.0, 200);

    let injected: Vec<_> = proxy.log().iter().map(|e| (e.status.unwrap(), e.injected)).collect();
    assert_eq!(
        injected,
        [(503, true), (503, true), (200, false), (200, false), (502, true), (500, true), (200, false)]
    );
    let n = proxy.counters();
    assert_eq!((n.requests, n.forwarded, n.injected), (7, 3, 4));
}

#[tokio::test]
async fn rate_limits_with_each_hint_and_timestamps() {
    let up = Upstream::start();
    let proxy = FaultProxy::start(&up.url);
    let c = client();
    let url = |p: &str| format!("{}{p}", proxy.url());

    // Body only; the client comes back at once: a violation.
    proxy.rate_limit_next(1, 400, RetryHint::BodyMs, Some("/rl/body"));
    let (status, headers, text) = get(&c, url("/echo/rl/body")).await;
    assert_eq!(status, 429);
    assert_eq!(headers.get("retry-after"), None);
    assert_eq!(parse(&text), json!({"errcode": "M_LIMIT_EXCEEDED", "error": "injected", "retry_after_ms": 400}));
    assert_eq!(get(&c, url("/echo/rl/body")).await.0, 200);
    let early = proxy.earliest_violation(Some("/rl/body")).expect("came back too early");
    assert!(early < Duration::from_millis(400), "{early:?}");

    // Header only (1200 ms is announced as 2 s); the client waits: no violation.
    proxy.rate_limit_next(1, 1200, RetryHint::Header, Some("/rl/header"));
    let (status, headers, text) = get(&c, url("/echo/rl/header")).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(parse(&text), json!({"errcode": "M_LIMIT_EXCEEDED", "error": "injected"}));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(get(&c, url("/echo/rl/header")).await.0, 200);
    assert_eq!(proxy.earliest_violation(Some("/rl/header")), None);
    let gaps = proxy.retry_gaps(Some("/rl/header"));
    assert_eq!(gaps.len(), 1);
    assert_eq!(gaps[0].asked, Duration::from_secs(2));
    assert!(gaps[0].waited.unwrap() >= Duration::from_secs(2));

    // Both, twice; the client waits the body's 300 ms each time.
    proxy.rate_limit_next(2, 300, RetryHint::Both, Some("/rl/both"));
    for _ in 0..2 {
        let (status, headers, text) = get(&c, url("/echo/rl/both")).await;
        assert_eq!(status, 429);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(parse(&text)["retry_after_ms"], 300);
        tokio::time::sleep(Duration::from_millis(320)).await;
    }
    assert_eq!(get(&c, url("/echo/rl/both")).await.0, 200);
    assert_eq!(proxy.earliest_violation(Some("/rl/both")), None);
    let gaps = proxy.retry_gaps(Some("/rl/both"));
    assert_eq!(gaps.len(), 2);
    assert!(gaps.iter().all(|g| g.asked == Duration::from_millis(300) && g.waited.unwrap() >= g.asked));

    // The log has the timestamps behind all this.
    let limited: Vec<_> = proxy.log().into_iter().filter(|e| e.status == Some(429)).collect();
    assert_eq!(limited.len(), 4);
    assert!(limited.iter().all(|e| e.injected && e.retry_after.is_some() && e.answered.is_some()));
    assert_eq!(proxy.earliest_violation(None), Some(early), "over all paths, the body case");
    assert_eq!(up.hits("/rl/"), 3, "rate-limited requests never reached upstream");
}

#[tokio::test]
async fn fixed_answers_until_cleared() {
    let up = Upstream::start();
    let proxy = FaultProxy::start(&up.url);
    let c = client();
    let send = format!("{}/echo/rooms/!r/send/m.room.message/t1", proxy.url());
    let put = || c.put(&send).json(&json!({"body": "hi"})).send();

    proxy.respond("/send/m.room.message/", Some("PUT"), 403, json!({"errcode": "M_FORBIDDEN", "error": "no"}));
    for _ in 0..2 {
        let r = put().await.unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_FORBIDDEN");
    }
    assert_eq!(get(&c, send.clone()).await.0, 200, "another method is forwarded");

    proxy.fail_next(1, 502, Some("/send/"));
    assert_eq!(put().await.unwrap().status(), 502, "a one-shot fault comes before a fixed answer");
    assert_eq!(put().await.unwrap().status(), 403);

    proxy.respond("/echo/any", None, 500, json!({"errcode": "M_UNKNOWN"}));
    assert_eq!(get(&c, format!("{}/echo/any", proxy.url())).await.0, 500);
    proxy.clear();
    assert_eq!(put().await.unwrap().status(), 200);
    assert_eq!(get(&c, format!("{}/echo/any", proxy.url())).await.0, 200);
    assert_eq!(up.hits("/send/"), 2, "the GET and the PUT after clear()");
}

#[tokio::test]
async fn rewrites_and_replaces_upstream_answers() {
    let up = Upstream::start();
    let proxy = FaultProxy::start(&up.url);
    let c = client();
    let url = |p: &str| format!("{}{p}", proxy.url());

    // A JSON edit: a 1 MB event with non-object content, in the next matching answer only.
    proxy.rewrite_next_response(
        "/echo/sync",
        Box::new(|v| {
            v["to_device"] =
                json!({"events": [{"type": "m.key.verification.request", "content": "x".repeat(1 << 20)}]});
        }),
    );
    let (_, _, text) = get(&c, url("/echo/other")).await;
    assert_eq!(parse(&text).get("to_device"), None, "another path is not edited");
    let r = c.get(url("/echo/sync?since=1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let length = r.content_length().unwrap();
    let text = r.text().await.unwrap();
    assert_eq!(length, text.len() as u64, "Content-Length fits the edited body");
    let v = parse(&text);
    assert_eq!(v["path"], "/echo/sync?since=1", "the rest of upstream's answer is kept");
    assert_eq!(v["to_device"]["events"][0]["content"].as_str().unwrap().len(), 1 << 20);
    let (_, _, text) = get(&c, url("/echo/sync?since=2")).await;
    assert_eq!(parse(&text).get("to_device"), None, "only the next answer");

    // Very deep nesting built as a Value.
    proxy.rewrite_next_response(
        "/echo/deep",
        Box::new(|v| {
            let mut deep = json!(1);
            for _ in 0..20_000 {
                deep = Value::Array(vec![deep]);
            }
            v["deep"] = deep;
        }),
    );
    let (status, _, text) = get(&c, url("/echo/deep")).await;
    assert_eq!(status, 200);
    assert!(text.contains(&format!("\"deep\":{}1{}", "[".repeat(20_000), "]".repeat(20_000))));

    // JSON edits wait for a JSON 2xx answer; error answers are not edited.
    proxy.rewrite_next_response("/", Box::new(|v| v["edited"] = json!(true)));
    assert_eq!(get(&c, url("/text")).await.2, "plain text");
    assert_eq!(get(&c, url("/status/500")).await.2, r#"{"errcode":"X_UPSTREAM"}"#);
    assert_eq!(parse(&get(&c, url("/echo/json")).await.2)["edited"], true);

    // Raw edits and replacements, e.g. nesting deeper than any parser accepts.
    proxy.rewrite_next_response_raw(
        "/echo/raw",
        Box::new(|body| {
            let text = String::from_utf8(body.to_vec()).unwrap();
            text.replacen('{', &format!("{{\"deep\":{}{},", "[".repeat(100_000), "]".repeat(100_000)), 1).into_bytes()
        }),
    );
    let (status, headers, text) = get(&c, url("/echo/raw")).await;
    assert_eq!((status, headers["content-length"].to_str().unwrap()), (200, &*text.len().to_string()));
    assert!(text.starts_with(r#"{"deep":[[[["#) && text.contains(r#"]]],"accept_encoding":"identity""#), "{text:.100}");

    proxy.replace_next_response_body("/echo/replace", "not json {");
    let (status, headers, text) = get(&c, url("/echo/replace")).await;
    assert_eq!((status, text.as_str()), (200, "not json {"));
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["content-length"], "10");

    // A rewrite that panics gives a 500 and a note in the log; the proxy carries on.
    proxy.rewrite_next_response("/echo/panic", Box::new(|_| panic!("test: a rewrite that panics")));
    assert_eq!(get(&c, url("/echo/panic")).await.0, 500);
    assert_eq!(get(&c, url("/echo/panic")).await.0, 200);

    let log = proxy.log();
    let rewritten: Vec<_> = log.iter().filter(|e| e.rewritten).map(|e| e.path.as_str()).collect();
    assert_eq!(rewritten, ["/echo/sync?since=1", "/echo/deep", "/echo/json", "/echo/raw", "/echo/replace"]);
    assert!(log.iter().any(|e| e.path == "/echo/panic" && e.error.as_deref() == Some("the rewrite function panicked")));
}

#[tokio::test]
async fn refuse_cuts_connections_and_up_listens_on_the_same_port() {
    let up = Upstream::start();
    let proxy = FaultProxy::start(&up.url);
    let url = proxy.url();
    let c = client();
    assert_eq!(get(&c, format!("{url}/echo/before")).await.0, 200);

    // A long poll in flight is cut when the proxy goes down.
    let poll = {
        let (c, url) = (c.clone(), format!("{url}/slow?ms=20000"));
        tokio::spawn(async move { c.get(url).send().await })
    };
    arrived(&proxy, "/slow", 1).await;
    let down = Instant::now();
    proxy.set_down(Down::Refuse);
    let cut = poll.await.unwrap();
    assert!(cut.is_err(), "the long poll was cut: {cut:?}");
    assert!(down.elapsed() < Duration::from_secs(5));
    let err = connect(proxy.addr()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let err = c.get(format!("{url}/echo/down")).send().await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");

    proxy.set_up();
    assert_eq!(proxy.url(), url);
    let (status, _, text) = get(&c, format!("{url}/echo/after")).await;
    assert_eq!((status, parse(&text)["path"].as_str()), (200, Some("/echo/after")));

    // Down and up again, twice more, with a keep-alive connection open each time.
    for _ in 0..2 {
        proxy.set_down(Down::Refuse);
        assert!(c.get(format!("{url}/echo/down")).send().await.is_err());
        proxy.set_up();
        assert_eq!(get(&c, format!("{url}/echo/again")).await.0, 200);
    }

    let statuses: Vec<_> = proxy.log().iter().map(|e| (e.path.clone(), e.status)).collect();
    assert_eq!(statuses[1], ("/slow?ms=20000".to_owned(), None), "the cut request has no answer");
    assert_eq!(proxy.count("/echo/down"), 0, "refused requests never reached the proxy");

    // cut_connections() ends a long poll while staying up.
    let poll = {
        let (c, url) = (c.clone(), format!("{url}/slow?ms=20000"));
        tokio::spawn(async move { c.get(url).send().await })
    };
    arrived(&proxy, "/slow", 2).await;
    proxy.cut_connections();
    assert!(poll.await.unwrap().is_err());
    assert_eq!(get(&c, format!("{url}/echo/still-up")).await.0, 200);
}

#[tokio::test]
async fn hang_accepts_and_answers_only_when_up() {
    let up = Upstream::start();
    let proxy = FaultProxy::start(&up.url);
    let c = client();

    proxy.set_down(Down::Hang);
    connect(proxy.addr()).expect("connections are accepted while hanging");
    let held = {
        let (c, url) = (c.clone(), format!("{}/echo/held", proxy.url()));
        tokio::spawn(async move { get(&c, url).await })
    };
    arrived(&proxy, "/echo/held", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "no answer while hanging");
    assert_eq!(up.hits("/echo/held"), 0, "nor is it forwarded");
    assert_eq!(proxy.counters().unanswered, 1);
    proxy.set_up();
    let (status, _, text) = held.await.unwrap();
    assert_eq!((status, parse(&text)["path"].as_str()), (200, Some("/echo/held")));

    // An answer coming back from upstream while hanging is held too.
    let poll = {
        let (c, url) = (c.clone(), format!("{}/slow?ms=300", proxy.url()));
        tokio::spawn(async move { get(&c, url).await })
    };
    arrived(&proxy, "/slow", 1).await;
    proxy.set_down(Down::Hang);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(up.hits("/slow"), 1);
    assert!(!poll.is_finished(), "upstream's answer is held");
    proxy.set_up();
    assert_eq!(poll.await.unwrap().0, 200);

    // Hang then refuse cuts the held requests; up again works.
    proxy.set_down(Down::Hang);
    let held = {
        let (c, url) = (c.clone(), format!("{}/echo/held2", proxy.url()));
        tokio::spawn(async move { c.get(url).send().await })
    };
    arrived(&proxy, "/echo/held2", 1).await;
    proxy.set_down(Down::Refuse);
    assert!(held.await.unwrap().is_err());
    proxy.set_up();
    assert_eq!(get(&c, format!("{}/echo/end", proxy.url())).await.0, 200);
}

#[tokio::test]
async fn dropping_the_handle_frees_the_port() {
    let up = Upstream::start();
    let proxy = FaultProxy::start(&up.url);
    let addr = proxy.addr();
    let c = client();
    assert_eq!(get(&c, format!("{}/echo/x", proxy.url())).await.0, 200);
    proxy.set_down(Down::Hang);
    let held = {
        let (c, url) = (c.clone(), format!("{}/slow?ms=20000", proxy.url()));
        tokio::spawn(async move { c.get(url).send().await })
    };
    arrived(&proxy, "/slow", 1).await;

    let t = Instant::now();
    drop(proxy);
    assert!(t.elapsed() < Duration::from_secs(5), "drop took {:?}", t.elapsed());
    assert!(held.await.unwrap().is_err(), "requests in flight are cut");
    assert_eq!(connect(addr).unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);

    // The same port can be used at once by a new proxy on a chosen port.
    let again = FaultProxy::start_on(&up.url, addr.port());
    assert_eq!(again.addr(), addr);
    assert_eq!(get(&c, format!("{}/echo/y", again.url())).await.0, 200);
    drop(again);
    std::net::TcpListener::bind(addr).expect("port free after drop");
}

#[tokio::test]
async fn upstream_unreachable_is_a_502() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let proxy = FaultProxy::start(&format!("http://{addr}"));
    let (status, _, text) = get(&client(), format!("{}/anything", proxy.url())).await;
    assert_eq!(status, 502);
    assert_eq!(parse(&text)["errcode"], "M_UNKNOWN");
    assert_eq!(proxy.counters().upstream_errors, 1);
    assert!(proxy.log()[0].error.is_some());
}

/// Through the real homeserver (`scripts/synapse`).
#[test]
fn synapse_versions_through_the_proxy() {
    let proxy = FaultProxy::start(&common::homeserver());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = client();
        let url = format!("{}/_matrix/client/versions", proxy.url());
        proxy.fail_next(1, 502, Some("/versions"));
        assert_eq!(get(&c, url.clone()).await.0, 502);
        let (status, _, text) = get(&c, url).await;
        assert_eq!(status, 200);
        let v = parse(&text);
        assert!(v["versions"].as_array().is_some_and(|a| !a.is_empty()), "{v}");
        // An authenticated call is forwarded with its token (Synapse rejects the bad one).
        let r = c
            .get(format!("{}/_matrix/client/v3/account/whoami", proxy.url()))
            .bearer_auth("not-a-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_UNKNOWN_TOKEN");
    });
    let n = proxy.counters();
    assert_eq!((n.injected, n.forwarded), (1, 2));
}
