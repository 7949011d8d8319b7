//! A fault-injecting HTTP/1.1 proxy for integration tests: it sits between `mxverify` (or any
//! HTTP client) and an upstream homeserver and lets a test break the connection in chosen ways.
//!
//! The proxy runs inside the test process on a thread of its own with its own tokio runtime, so
//! it works the same from plain `#[test]`s and from async tests. It listens on `127.0.0.1` and
//! forwards every request to the upstream base URL with the same method, path and query, headers
//! (including `Authorization`) and body. Faults are set through the [`FaultProxy`] handle:
//!
//! - [`FaultProxy::set_down`] / [`FaultProxy::set_up`]: the port refuses connections
//!   ([`Down::Refuse`]) or accepts them and never answers ([`Down::Hang`]);
//! - [`FaultProxy::fail_next`]: the next n matching requests get an error status;
//! - [`FaultProxy::rate_limit_next`]: the next n matching requests get a 429, and
//!   [`FaultProxy::earliest_violation`] tells whether the client came back too early;
//! - [`FaultProxy::respond`]: a fixed answer for matching requests until [`FaultProxy::clear`];
//! - [`FaultProxy::rewrite_next_response`], [`FaultProxy::rewrite_next_response_raw`] and
//!   [`FaultProxy::replace_next_response_body`]: edit what upstream answered;
//! - [`FaultProxy::log`] / [`FaultProxy::counters`]: what went through, with timestamps.
//!
//! Bodies are buffered whole in both directions before being passed on (the Client-Server API has
//! no streaming endpoints; a chunked or long-polling upstream answer is passed on once complete,
//! with a `Content-Length`). The proxy asks upstream for `Accept-Encoding: identity` so that
//! bodies can be read and edited. Only `http://` upstreams are supported.
//!
//! Dropping the handle stops the proxy: every connection is cut, the port is freed and the
//! proxy's thread has ended when `drop` returns.
//!
//! `mxverify login --homeserver URL` stores the URL, so a device logged in through the proxy keeps
//! using it: keep the handle alive for as long as the device is used (or start a new proxy on the
//! same port with [`FaultProxy::start_on`]). While refusing, the port is not held: in principle
//! another socket could take it before [`FaultProxy::set_up`], which then panics after 5 s.
//! HTTP/1.1 only (what reqwest speaks to an `http://` URL).
//!
//! ```ignore
//! let proxy = FaultProxy::start(&common::homeserver());
//! // mxverify talks to proxy.url() instead of the homeserver …
//! proxy.rate_limit_next(1, 1500, RetryHint::Both, Some("/sendToDevice/"));
//! // … run the flow …
//! assert_eq!(proxy.earliest_violation(Some("/sendToDevice/")), None, "{:#?}", proxy.log());
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// How the proxy is down (see [`FaultProxy::set_down`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Down {
    /// The port refuses connections: the proxy stops listening and cuts every open connection,
    /// including requests in flight (a long-polling `/sync` gets its connection closed).
    Refuse,
    /// Connections are accepted and requests read, but nothing is answered until
    /// [`FaultProxy::set_up`]; then the held requests are forwarded as usual. Answers that come
    /// back from upstream while hanging are held too.
    Hang,
}

/// Where a rate-limited answer (429) says how long to wait (see [`FaultProxy::rate_limit_next`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryHint {
    /// `"retry_after_ms"` in the JSON body only.
    BodyMs,
    /// A `Retry-After` header only (whole seconds, rounded up).
    Header,
    /// Both the body field and the header.
    Both,
}

/// One request that reached the proxy, in order of arrival.
#[derive(Clone, Debug)]
pub struct Logged {
    /// Numbers the requests in order of arrival, from 0 (not reset by [`FaultProxy::clear_log`]).
    pub seq: u64,
    /// When the request head had arrived.
    pub at: Instant,
    /// When the answer was handed to the connection; `None` while in flight, and for ever if the
    /// request was never answered (cut by [`Down::Refuse`] or [`FaultProxy::cut_connections`], or
    /// the client gave up).
    pub answered: Option<Instant>,
    /// `GET`, `PUT`, …
    pub method: String,
    /// Path and query, as the client sent them (`/_matrix/client/v3/sync?timeout=30000`).
    pub path: String,
    /// Status of the answer; `None` if not answered (see `answered`).
    pub status: Option<u16>,
    /// The proxy answered by itself (fail, rate limit, fixed answer); upstream never saw it.
    pub injected: bool,
    /// Upstream's answer was edited or replaced before being passed on.
    pub rewritten: bool,
    /// For an injected 429: the wait it asked for (the shortest of the hints given).
    pub retry_after: Option<Duration>,
    /// Why the proxy answered with an error of its own (upstream unreachable, a rewrite panicked).
    pub error: Option<String>,
}

/// Totals over [`FaultProxy::log`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests that arrived.
    pub requests: usize,
    /// Requests whose answer came from upstream (possibly rewritten).
    pub forwarded: usize,
    /// Requests the proxy answered itself.
    pub injected: usize,
    /// Upstream answers that were edited or replaced.
    pub rewritten: usize,
    /// Requests not (yet) answered.
    pub unanswered: usize,
    /// Requests answered with an error of the proxy's own (upstream could not be reached or
    /// read, a rewrite panicked).
    pub upstream_errors: usize,
    /// Client connections accepted (not in the log: not reset by [`FaultProxy::clear_log`]).
    pub connections: usize,
}

/// One rate-limited answer and what the client did next (see [`FaultProxy::retry_gaps`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryGap {
    /// When the 429 was handed to the connection.
    pub answered: Instant,
    /// The wait it asked for.
    pub asked: Duration,
    /// How long after the 429 the next matching request arrived; `None` if none did (yet).
    pub waited: Option<Duration>,
}

/// The handle of a running proxy. All methods take `&self`; share it with `Arc` if needed.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    ctl: mpsc::UnboundedSender<Ctl>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (an `http://host:port` base URL, optionally with a path
    /// prefix) on a free port of 127.0.0.1. Panics if the URL is not `http://` or binding fails.
    pub fn start(upstream: &str) -> FaultProxy {
        Self::start_on(upstream, 0)
    }

    /// Like [`FaultProxy::start`], on a chosen port (0: any free one).
    pub fn start_on(upstream: &str, port: u16) -> FaultProxy {
        let base = upstream.trim_end_matches('/').to_owned();
        let uri: Uri = base.parse().unwrap_or_else(|e| panic!("proxy: bad upstream URL {upstream:?}: {e}"));
        assert_eq!(uri.scheme_str(), Some("http"), "proxy: only http:// upstreams are supported, not {upstream:?}");
        let authority = uri.authority().expect("upstream URL has a host").as_str();
        let host = HeaderValue::from_str(authority).expect("upstream authority is a valid Host header");
        let (mode, _) = watch::channel(Mode::Up);
        let shared = Arc::new(Shared {
            base,
            host,
            mode,
            rules: Mutex::new(Rules::default()),
            log: Mutex::new(Vec::new()),
            next_seq: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
        });
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy:{port}"))
            // Deeply nested JSON built by a rewrite is serialized and dropped recursively on this
            // thread (the runtime is current-thread, so every task runs here).
            .stack_size(256 << 20)
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
                rt.block_on(async move {
                    let listener = match listen(port).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(listener.local_addr().expect("local address")));
                    main_loop(listener, sh, ctl_rx).await;
                });
            })
            .expect("spawn the proxy thread");
        let addr = match ready_rx.recv() {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => panic!("proxy: cannot listen on 127.0.0.1:{port}: {e}"),
            Err(_) => panic!("proxy: thread died while starting"),
        };
        FaultProxy { addr, shared, ctl, thread: Some(thread) }
    }

    /// The base URL to give the client: `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the proxy listens on (the same across [`Down::Refuse`] and [`FaultProxy::set_up`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes the proxy down (see [`Down`]). Returns once it is in effect: with [`Down::Refuse`],
    /// the port no longer listens and every connection has been closed.
    pub fn set_down(&self, how: Down) {
        self.control(|ack| Ctl::Mode(if how == Down::Refuse { Mode::Refuse } else { Mode::Hang }, ack));
    }

    /// Brings the proxy up again: listening on the same port if it was refusing, answering the
    /// held requests if it was hanging. Panics if the port could not be bound again within 5 s.
    pub fn set_up(&self) {
        self.control(|ack| Ctl::Mode(Mode::Up, ack));
    }

    /// Closes every open client connection now (requests in flight get no answer), while
    /// staying up: a quick way to end a long-polling `/sync`.
    pub fn cut_connections(&self) {
        self.control(Ctl::Cut);
    }

    /// The next `n` requests whose path and query contain `path_contains` (any request if
    /// `None`) are answered with `status` and `{"errcode":"M_UNKNOWN","error":"injected"}`,
    /// without reaching upstream.
    pub fn fail_next(&self, n: usize, status: u16, path_contains: Option<&str>) {
        let status = status_code(status);
        self.rules().once.push(Once { left: n, path: path_contains.map(str::to_owned), kind: OnceKind::Fail(status) });
    }

    /// The next `n` matching requests get a 429 with `{"errcode":"M_LIMIT_EXCEEDED",…}`, telling
    /// the client to wait `retry_after_ms` in the body (`"retry_after_ms"`), in a `Retry-After`
    /// header (seconds, rounded up) or both, per `how`. Their upstream never sees them. Each
    /// answer is logged with the wait it asked for (for both hints, the body's shorter one);
    /// see [`FaultProxy::earliest_violation`].
    pub fn rate_limit_next(&self, n: usize, retry_after_ms: u64, how: RetryHint, path_contains: Option<&str>) {
        self.rules().once.push(Once {
            left: n,
            path: path_contains.map(str::to_owned),
            kind: OnceKind::RateLimit { ms: retry_after_ms, how },
        });
    }

    /// Until [`FaultProxy::clear`], requests whose path and query contain `path_contains` (and
    /// whose method is `method`, if given) get `status` with the JSON `body`, without reaching
    /// upstream. One-shot faults ([`FaultProxy::fail_next`], [`FaultProxy::rate_limit_next`])
    /// come first; among fixed answers the first one set wins.
    pub fn respond(&self, path_contains: &str, method: Option<&str>, status: u16, body: Value) {
        let method = method.map(|m| m.parse::<Method>().unwrap_or_else(|e| panic!("proxy: bad method {m:?}: {e}")));
        self.rules().fixed.push(Fixed { path: path_contains.to_owned(), method, status: status_code(status), body });
    }

    /// Removes every fault that is set: pending fails and rate limits, fixed answers and pending
    /// rewrites. Leaves the up/down state and the log alone.
    pub fn clear(&self) {
        *self.rules() = Rules::default();
    }

    /// The next successful (2xx) upstream answer with a JSON body to a request whose path and
    /// query contain `path_contains` is passed through `f` before the client gets it; the
    /// `Content-Length` is fixed up. "Next" counts answers as they come back, so a long poll that
    /// is already in flight is the one edited. Non-JSON answers are passed on and the rewrite
    /// stays pending. If `f` panics the client gets a 500 (see [`Logged::error`]).
    ///
    /// For JSON nested deeper than a parser would accept, splice text with
    /// [`FaultProxy::rewrite_next_response_raw`] instead.
    pub fn rewrite_next_response(&self, path_contains: &str, f: Box<dyn FnOnce(&mut Value) + Send>) {
        self.rules().edits.push(Edit { path: path_contains.to_owned(), kind: EditKind::Json(f) });
    }

    /// Like [`FaultProxy::rewrite_next_response`] for any 2xx body: `f` gets upstream's bytes and
    /// returns the bytes to pass on (which need not be JSON; `Content-Type` is kept).
    pub fn rewrite_next_response_raw(&self, path_contains: &str, f: Box<dyn FnOnce(Bytes) -> Vec<u8> + Send>) {
        self.rules().edits.push(Edit { path: path_contains.to_owned(), kind: EditKind::Raw(f) });
    }

    /// The body of the next matching 2xx upstream answer is replaced by `body` (status and other
    /// headers kept, `Content-Length` fixed up).
    pub fn replace_next_response_body(&self, path_contains: &str, body: impl Into<Vec<u8>>) {
        let body = body.into();
        self.rewrite_next_response_raw(path_contains, Box::new(move |_| body));
    }

    /// Every request so far, in order of arrival.
    pub fn log(&self) -> Vec<Logged> {
        lock(&self.shared.log).clone()
    }

    /// Forgets the log (faults stay set).
    pub fn clear_log(&self) {
        lock(&self.shared.log).clear();
    }

    /// Totals over the log.
    pub fn counters(&self) -> Counters {
        let mut c = Counters { connections: self.shared.connections.load(Ordering::Relaxed), ..Counters::default() };
        for e in lock(&self.shared.log).iter() {
            c.requests += 1;
            match (e.status, e.injected) {
                (None, _) => c.unanswered += 1,
                (Some(_), true) => c.injected += 1,
                (Some(_), false) if e.error.is_some() => c.upstream_errors += 1,
                (Some(_), false) => c.forwarded += 1,
            }
            c.rewritten += usize::from(e.rewritten);
        }
        c
    }

    /// How many requests whose path and query contain `path_contains` have arrived.
    pub fn count(&self, path_contains: &str) -> usize {
        lock(&self.shared.log).iter().filter(|e| e.path.contains(path_contains)).count()
    }

    /// Waits until at least `n` requests matching `path_contains` have arrived; false on timeout.
    pub fn wait_for(&self, path_contains: &str, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.count(path_contains) >= n {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// For every injected 429 to a request matching `path_contains` (all if `None`): the wait it
    /// asked for and how long the client actually waited before its next matching request.
    pub fn retry_gaps(&self, path_contains: Option<&str>) -> Vec<RetryGap> {
        let log = lock(&self.shared.log);
        let matching: Vec<&Logged> = log.iter().filter(|e| path_contains.is_none_or(|p| e.path.contains(p))).collect();
        let mut gaps = Vec::new();
        for e in &matching {
            let (Some(asked), Some(answered)) = (e.retry_after, e.answered) else { continue };
            let next = matching.iter().filter(|f| f.at > answered).map(|f| f.at).min();
            gaps.push(RetryGap { answered, asked, waited: next.map(|t| t - answered) });
        }
        gaps
    }

    /// `None` if, after every injected 429 matching `path_contains`, the client waited at least
    /// as long as asked before its next matching request; otherwise the shortest wait seen (how
    /// soon it came back). Requests sent concurrently to the same path count as "next" too, so
    /// choose `path_contains` to single out one kind of request.
    pub fn earliest_violation(&self, path_contains: Option<&str>) -> Option<Duration> {
        self.retry_gaps(path_contains).into_iter().filter_map(|g| g.waited.filter(|w| *w < g.asked)).min()
    }

    fn rules(&self) -> MutexGuard<'_, Rules> {
        lock(&self.shared.rules)
    }

    fn control(&self, cmd: impl FnOnce(std_mpsc::Sender<Result<(), String>>) -> Ctl) {
        let (tx, rx) = std_mpsc::channel();
        self.ctl.send(cmd(tx)).expect("proxy thread is running");
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("proxy: {e}"),
            Err(e) => panic!("proxy: no answer from the proxy thread ({e})"),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.ctl.send(Ctl::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- inside the proxy thread ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Up,
    Hang,
    Refuse,
}

enum Ctl {
    Mode(Mode, std_mpsc::Sender<Result<(), String>>),
    Cut(std_mpsc::Sender<Result<(), String>>),
    Shutdown,
}

struct Shared {
    /// Upstream base URL without a trailing slash.
    base: String,
    /// Upstream's `host[:port]`, sent as `Host`.
    host: HeaderValue,
    mode: watch::Sender<Mode>,
    rules: Mutex<Rules>,
    log: Mutex<Vec<Logged>>,
    next_seq: AtomicU64,
    connections: AtomicUsize,
}

#[derive(Default)]
struct Rules {
    once: Vec<Once>,
    fixed: Vec<Fixed>,
    edits: Vec<Edit>,
}

struct Once {
    left: usize,
    path: Option<String>,
    kind: OnceKind,
}

#[derive(Clone, Copy)]
enum OnceKind {
    Fail(StatusCode),
    RateLimit { ms: u64, how: RetryHint },
}

struct Fixed {
    path: String,
    method: Option<Method>,
    status: StatusCode,
    body: Value,
}

struct Edit {
    path: String,
    kind: EditKind,
}

enum EditKind {
    Json(Box<dyn FnOnce(&mut Value) + Send>),
    Raw(Box<dyn FnOnce(Bytes) -> Vec<u8> + Send>),
}

type Upstream = Client<HttpConnector, Full<Bytes>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or_else(|e| panic!("proxy: bad status {status}: {e}"))
}

/// Binds 127.0.0.1:`port` with `SO_REUSEADDR`, so that the port can be bound again right after
/// its connections were cut (they linger in TIME_WAIT).
async fn listen(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(1024)
}

/// Listens on `port` again, retrying for a while if something holds it.
async fn relisten(port: u16) -> Result<TcpListener, String> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match listen(port).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() >= end => return Err(format!("cannot listen on 127.0.0.1:{port} again: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn main_loop(listener: TcpListener, shared: Arc<Shared>, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
    let port = listener.local_addr().expect("local address").port();
    let mut listener = Some(listener);
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new()).pool_timer(TokioTimer::new()).build(http);
    let mut conns: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            cmd = ctl.recv() => match cmd {
                None | Some(Ctl::Shutdown) => break,
                Some(Ctl::Cut(ack)) => {
                    cut(&mut conns).await;
                    let _ = ack.send(Ok(()));
                }
                Some(Ctl::Mode(mode, ack)) => {
                    let mut result = Ok(());
                    if mode == Mode::Refuse {
                        listener = None;
                        cut(&mut conns).await;
                    } else if listener.is_none() {
                        match relisten(port).await {
                            Ok(l) => listener = Some(l),
                            Err(e) => result = Err(e),
                        }
                    }
                    if result.is_ok() {
                        shared.mode.send_replace(mode);
                    }
                    let _ = ack.send(result);
                }
            },
            accepted = async { listener.as_ref().expect("guarded by the condition").accept().await }, if listener.is_some() => {
                match accepted {
                    Ok((stream, _)) => {
                        shared.connections.fetch_add(1, Ordering::Relaxed);
                        conns.spawn(serve(stream, shared.clone(), client.clone()));
                    }
                    // E.g. out of file descriptors: not a reason to stop, nor to spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Dropping the listener, the connections (aborted by dropping the set) and, when this thread
    // leaves `block_on`, the runtime with the upstream pool.
    drop(listener);
    cut(&mut conns).await;
}

/// Aborts every client connection and waits until their sockets are closed.
async fn cut(conns: &mut JoinSet<()>) {
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn serve(stream: TcpStream, shared: Arc<Shared>, client: Upstream) {
    let _ = stream.set_nodelay(true);
    let svc = service_fn(move |req| {
        let (shared, client) = (shared.clone(), client.clone());
        async move { Ok::<_, Infallible>(handle(&shared, &client, req).await) }
    });
    // No header-read timeout: an idle keep-alive connection stays open until the client closes it.
    let _ = http1::Builder::new()
        .header_read_timeout(None::<Duration>)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

/// What the proxy did with a request, for the log.
#[derive(Default)]
struct Outcome {
    injected: bool,
    rewritten: bool,
    retry_after: Option<Duration>,
    error: Option<String>,
}

async fn handle(sh: &Shared, client: &Upstream, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let seq = {
        let mut log = lock(&sh.log);
        // Taken under the log's lock, so the log stays sorted by `seq`.
        let seq = sh.next_seq.fetch_add(1, Ordering::Relaxed);
        log.push(Logged {
            seq,
            at: Instant::now(),
            answered: None,
            method: method.to_string(),
            path: path.clone(),
            status: None,
            injected: false,
            rewritten: false,
            retry_after: None,
            error: None,
        });
        seq
    };
    let (resp, outcome) = answer(sh, client, req, &method, &path).await;
    let mut log = lock(&sh.log);
    // The log may have been cleared meanwhile; then this request is not recorded.
    if let Ok(i) = log.binary_search_by_key(&seq, |e| e.seq) {
        let e = &mut log[i];
        e.answered = Some(Instant::now());
        e.status = Some(resp.status().as_u16());
        e.injected = outcome.injected;
        e.rewritten = outcome.rewritten;
        e.retry_after = outcome.retry_after;
        e.error = outcome.error;
    }
    resp
}

async fn answer(
    sh: &Shared,
    client: &Upstream,
    req: Request<Incoming>,
    method: &Method,
    path: &str,
) -> (Response<Full<Bytes>>, Outcome) {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return proxy_error(StatusCode::BAD_REQUEST, format!("reading the request body: {e}")),
    };
    wait_up(sh).await;
    if let Some(injected) = injected_answer(sh, method, path) {
        return injected;
    }

    // Forward.
    let uri: Uri = match format!("{}{path}", sh.base).parse() {
        Ok(u) => u,
        Err(e) => return proxy_error(StatusCode::BAD_REQUEST, format!("bad request target {path:?}: {e}")),
    };
    let had_body = parts.headers.contains_key(header::CONTENT_LENGTH)
        || parts.headers.contains_key(header::TRANSFER_ENCODING)
        || !body.is_empty();
    let mut headers = end_to_end(&parts.headers);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::HOST, sh.host.clone());
    headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    if had_body {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let mut up = Request::new(Full::new(body));
    *up.method_mut() = method.clone();
    *up.uri_mut() = uri;
    *up.headers_mut() = headers;
    let resp = match client.request(up).await {
        Ok(r) => r,
        Err(e) => return proxy_error(StatusCode::BAD_GATEWAY, format!("upstream: {e:?}")),
    };
    let (rparts, rbody) = resp.into_parts();
    let mut rbody = match rbody.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return proxy_error(StatusCode::BAD_GATEWAY, format!("reading upstream's body: {e}")),
    };
    // Hold answers while hanging.
    wait_up(sh).await;

    let mut outcome = Outcome::default();
    if rparts.status.is_success() {
        match edit(sh, path, rbody.clone()) {
            Ok(Some(new)) => {
                rbody = new;
                outcome.rewritten = true;
            }
            Ok(None) => {}
            Err(e) => return proxy_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        }
    }
    let mut headers = end_to_end(&rparts.headers);
    let bodiless = *method == Method::HEAD
        || rparts.status.is_informational()
        || rparts.status == StatusCode::NO_CONTENT
        || rparts.status == StatusCode::NOT_MODIFIED;
    if !bodiless {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(rbody.len()));
    }
    let mut resp = Response::new(Full::new(rbody));
    *resp.status_mut() = rparts.status;
    *resp.headers_mut() = headers;
    (resp, outcome)
}

/// Waits while the proxy hangs. (While refusing, this request's connection is being cut.)
async fn wait_up(sh: &Shared) {
    let mut rx = sh.mode.subscribe();
    let _ = rx.wait_for(|m| *m == Mode::Up).await;
}

/// The proxy's own answer for this request, if a fault says so (taking one from a one-shot).
fn injected_answer(sh: &Shared, method: &Method, path: &str) -> Option<(Response<Full<Bytes>>, Outcome)> {
    let mut rules = lock(&sh.rules);
    if let Some(i) = rules.once.iter().position(|o| o.left > 0 && o.path.as_deref().is_none_or(|p| path.contains(p))) {
        let kind = rules.once[i].kind;
        rules.once[i].left -= 1;
        if rules.once[i].left == 0 {
            rules.once.remove(i);
        }
        drop(rules);
        let outcome = Outcome { injected: true, ..Outcome::default() };
        return Some(match kind {
            OnceKind::Fail(status) => {
                (json_response(status, &json!({"errcode": "M_UNKNOWN", "error": "injected"})), outcome)
            }
            OnceKind::RateLimit { ms, how } => {
                let mut body = json!({"errcode": "M_LIMIT_EXCEEDED", "error": "injected"});
                if how != RetryHint::Header {
                    body["retry_after_ms"] = json!(ms);
                }
                let mut resp = json_response(StatusCode::TOO_MANY_REQUESTS, &body);
                let secs = ms.div_ceil(1000);
                if how != RetryHint::BodyMs {
                    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                let asked = if how == RetryHint::Header { secs * 1000 } else { ms };
                (resp, Outcome { retry_after: Some(Duration::from_millis(asked)), ..outcome })
            }
        });
    }
    let fixed = rules.fixed.iter().find(|f| path.contains(&f.path) && f.method.as_ref().is_none_or(|m| m == method))?;
    let resp = json_response(fixed.status, &fixed.body);
    Some((resp, Outcome { injected: true, ..Outcome::default() }))
}

/// Applies the first pending edit that matches `path` and fits `body`; `Ok(None)` if none does.
fn edit(sh: &Shared, path: &str, body: Bytes) -> Result<Option<Bytes>, String> {
    let mut parsed: Option<Option<Value>> = None;
    let kind = {
        let mut rules = lock(&sh.rules);
        let i = rules.edits.iter().position(|e| {
            path.contains(&e.path)
                && match e.kind {
                    EditKind::Raw(_) => true,
                    EditKind::Json(_) => {
                        parsed.get_or_insert_with(|| serde_json::from_slice::<Value>(&body).ok()).is_some()
                    }
                }
        });
        match i {
            Some(i) => rules.edits.remove(i).kind,
            None => return Ok(None),
        }
    };
    let result = catch_unwind(AssertUnwindSafe(move || match kind {
        EditKind::Raw(f) => Bytes::from(f(body)),
        EditKind::Json(f) => {
            let mut v = parsed.flatten().expect("parsed when matched");
            f(&mut v);
            Bytes::from(serde_json::to_vec(&v).expect("a Value serializes"))
        }
    }));
    result.map(Some).map_err(|_| "the rewrite function panicked".to_owned())
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let body = Bytes::from(serde_json::to_vec(body).expect("a Value serializes"));
    let mut resp = Response::new(Full::new(body.clone()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    resp
}

/// An error the proxy itself ran into, answered as JSON and logged.
fn proxy_error(status: StatusCode, error: String) -> (Response<Full<Bytes>>, Outcome) {
    let resp = json_response(status, &json!({"errcode": "M_UNKNOWN", "error": format!("proxy: {error}")}));
    (resp, Outcome { error: Some(error), ..Outcome::default() })
}

/// `headers` without the hop-by-hop ones (RFC 9110 §7.6.1), which concern one connection only,
/// and without `Content-Length`, which the caller sets for the body it sends.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named_in_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let hop = matches!(
            name.as_str(),
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "content-length"
        ) || named_in_connection.contains(name);
        if !hop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}
