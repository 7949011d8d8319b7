//! The Client-Server API calls a verifying device needs, over a transport that lives with an open
//! network:
//!
//! * **Retries by idempotency.** Every call says whether sending it twice is harmless
//!   ([`Idempotency`]). Idempotent calls (GETs, PUTs with a transaction ID, and the POSTs the spec
//!   makes safe to repeat) are retried after connection errors, timeouts, 5xx and 429. The others
//!   (`/login`, `/createRoom`, any POST without a transaction ID) are retried only when the server
//!   certainly did not act on them: the connection never opened, or the server answered 429 or
//!   503. A failure after the request may have been sent is [`HttpError::OutcomeUnknown`].
//! * **Rate limits honoured exactly.** A 429 (or 503) waits for the longer of the body's
//!   `retry_after_ms` and the `Retry-After` header (seconds or an HTTP date), uncapped by
//!   [`Retry::max`]; a wait longer than [`Homeserver::with_max_server_wait`] (10 minutes by
//!   default) is returned as the error instead, so the caller can decide. The next attempt is
//!   never sent early.
//! * **Outages.** [`Retry::forever`] never gives up; [`Homeserver::sync_resilient`] and
//!   [`Homeserver::call_resilient`] never give up either and report [`Connectivity`] changes so a
//!   listener can show "homeserver unreachable, retrying".
//! * **Tokens.** An invalid token is never retried ([`HttpError::is_unknown_token`]), a refused
//!   login is told apart from other refusals ([`HttpError::is_login_refused`]), `Debug` never shows
//!   the token, and [`Homeserver::new_checked`] refuses plain `http://` to anything but loopback.
//! * **Discovery** of the homeserver from a server name ([`discover`]) and `whoami` for logging in
//!   with an access token.
//!
//! Spec: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards),
//! [Standard error response](https://spec.matrix.org/v1.19/client-server-api/#standard-error-response),
//! [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting),
//! [Transaction identifiers](https://spec.matrix.org/v1.19/client-server-api/#transaction-identifiers),
//! [Well-known URIs](https://spec.matrix.org/v1.19/client-server-api/#well-known-uris); each call links its endpoint.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The HTTP method of a call ([`Homeserver::call`]), re-exported from `reqwest`.
///
/// Spec: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards).
pub use reqwest::Method;
use reqwest::header::RETRY_AFTER;
use reqwest::{StatusCode, Url};
use serde_json::{Value, json};

/// The longest wait a homeserver may ask for (429/503) that is waited out by default; a longer
/// one is returned as the error. See [`Homeserver::with_max_server_wait`].
///
/// Spec: [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting).
pub const DEFAULT_MAX_SERVER_WAIT: Duration = Duration::from_secs(600);

/// The largest answer body read from a homeserver (a `/sync` of a busy account fits easily).
const MAX_BODY: usize = 64 << 20;

/// The largest `.well-known/matrix/client` body read during discovery.
const MAX_WELL_KNOWN: usize = 64 << 10;

/// Longest `errcode`/`error` text kept from an error answer.
const MAX_ERROR_TEXT: usize = 500;

const LOGIN_PATH: &str = "/_matrix/client/v3/login";

/// How deep an answer is built ([`parse_json`]); what lies deeper is replaced by [`TOO_DEEP`].
/// Every structure of the Client-Server API lies far above it; serde_json refuses a whole
/// document nested deeper than 128 levels.
///
/// Serves: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards) (every answer is a JSON
/// object; this bounds how deep one is read).
pub const MAX_DEPTH: usize = 64;

/// What stands in for a value nested deeper than [`MAX_DEPTH`] in a parsed answer. Whoever reads
/// an item that contains it (an event, a key) refuses that item alone.
///
/// Serves: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards) (every answer is a JSON
/// object; this bounds how deep one is read).
pub const TOO_DEEP: &str = "(nested too deep: left out by mxverify)";

/// A failure talking to the homeserver.
///
/// Spec: [Standard error response](https://spec.matrix.org/v1.19/client-server-api/#standard-error-response),
/// [Common error codes](https://spec.matrix.org/v1.19/client-server-api/#common-error-codes),
/// [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting),
/// [Well-known URIs](https://spec.matrix.org/v1.19/client-server-api/#well-known-uris).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The homeserver could not be reached (after retries): no usable answer came back.
    #[error("cannot reach the homeserver at {url}: {source}")]
    Unreachable {
        /// The base URL.
        url: String,
        /// The call, as `METHOD /path` (no query string).
        endpoint: Box<str>,
        /// The last transport error.
        source: reqwest::Error,
    },
    /// A call that is not safe to repeat ([`Idempotency::NotIdempotent`]) failed after the request
    /// may have reached the homeserver (a timeout, a connection reset): whether it took effect is
    /// unknown, and it was not retried.
    #[error(
        "the connection to the homeserver at {url} failed after {endpoint} was sent; whether it took effect is unknown: {source}"
    )]
    OutcomeUnknown {
        /// The base URL.
        url: String,
        /// The call, as `METHOD /path` (no query string).
        endpoint: Box<str>,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The homeserver answered with a Matrix error.
    #[error("the homeserver refused {endpoint}: {errcode}: {error} (HTTP {status})")]
    Matrix {
        /// HTTP status.
        status: u16,
        /// `errcode`, e.g. `M_FORBIDDEN` (`M_UNKNOWN` if the answer had none); control characters
        /// removed.
        errcode: String,
        /// `error` text (or the start of a non-JSON body); control characters removed.
        error: String,
        /// The whole body (UIA flows live here).
        body: Value,
        /// The call, as `METHOD /path` (no query string), e.g. `POST /_matrix/client/v3/login`.
        endpoint: Box<str>,
        /// For a 429/503: the wait the homeserver asked for (the longer of `retry_after_ms` and
        /// `Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    /// The answer was not the JSON we expected.
    #[error("unexpected answer from the homeserver: {0}")]
    Malformed(String),
    /// A homeserver URL that cannot be used: not a URL, not `http(s)`, or with a query, fragment or
    /// credentials.
    #[error("not a usable homeserver URL: {url}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
    /// Plain `http://` to a homeserver that is not on this machine, without the caller allowing it.
    #[error(
        "refusing plain http:// to {url}: the access token and password would cross the network unencrypted; use https://"
    )]
    Insecure {
        /// The URL as given.
        url: String,
    },
    /// Homeserver discovery failed (see [`discover`]).
    #[error("cannot find the homeserver of {server_name}: {reason}")]
    Discovery {
        /// The server name discovery started from.
        server_name: String,
        /// What the spec says to do next.
        failure: DiscoveryFailure,
        /// Why.
        reason: String,
    },
}

impl HttpError {
    /// The Matrix `errcode`, if any.
    ///
    /// Spec: [Standard error response](https://spec.matrix.org/v1.19/client-server-api/#standard-error-response).
    pub fn errcode(&self) -> Option<&str> {
        match self {
            Self::Matrix { errcode, .. } => Some(errcode),
            _ => None,
        }
    }

    /// The HTTP status of an error answer, if there was one.
    ///
    /// Spec: [Standard error response](https://spec.matrix.org/v1.19/client-server-api/#standard-error-response).
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Matrix { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The call that failed, as `METHOD /path`, if the failure belongs to one.
    ///
    /// Serves: [Standard error response](https://spec.matrix.org/v1.19/client-server-api/#standard-error-response) (it
    /// says which call an error answer belongs to).
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            Self::Unreachable { endpoint, .. }
            | Self::OutcomeUnknown { endpoint, .. }
            | Self::Matrix { endpoint, .. } => Some(endpoint),
            _ => None,
        }
    }

    /// The access token is not (or no longer) accepted, or none was sent: `M_UNKNOWN_TOKEN` or
    /// `M_MISSING_TOKEN`. Never retried; the device must log in again (exit code 8).
    ///
    /// Spec: [Using access tokens](https://spec.matrix.org/v1.19/client-server-api/#using-access-tokens),
    /// [Common error codes](https://spec.matrix.org/v1.19/client-server-api/#common-error-codes).
    pub fn is_unknown_token(&self) -> bool {
        matches!(self.errcode(), Some("M_UNKNOWN_TOKEN" | "M_MISSING_TOKEN"))
    }

    /// `M_UNKNOWN_TOKEN` with `soft_logout: true`: logging in again with the same device ID keeps
    /// the device's keys usable.
    ///
    /// Spec: [Soft logout](https://spec.matrix.org/v1.19/client-server-api/#soft-logout).
    pub fn is_soft_logout(&self) -> bool {
        match self {
            Self::Matrix { errcode, body, .. } => errcode == "M_UNKNOWN_TOKEN" && body["soft_logout"] == json!(true),
            _ => false,
        }
    }

    /// `POST /login` refused the credentials (`M_FORBIDDEN`): a wrong user name or password. An
    /// `M_FORBIDDEN` from any other call (a room refusing a message, a wrong password in
    /// user-interactive auth) is not this.
    ///
    /// Spec: [`POST /login`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3login).
    pub fn is_login_refused(&self) -> bool {
        match self {
            Self::Matrix { errcode, endpoint, .. } => {
                errcode == "M_FORBIDDEN" && endpoint.strip_prefix("POST ") == Some(LOGIN_PATH)
            }
            _ => false,
        }
    }

    /// Rate limited (HTTP 429 or `M_LIMIT_EXCEEDED`); see [`HttpError::retry_after`].
    ///
    /// Spec: [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting).
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, Self::Matrix { status: 429, .. }) || self.errcode() == Some("M_LIMIT_EXCEEDED")
    }

    /// The wait the homeserver asked for, if it answered 429/503 with one.
    ///
    /// Spec: [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Matrix { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// No answer came back from the homeserver ([`HttpError::Unreachable`]).
    ///
    /// Serves: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards) (a call that got no
    /// answer at all).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }

    /// A non-idempotent call may or may not have taken effect ([`HttpError::OutcomeUnknown`]).
    ///
    /// Serves: [Transaction identifiers](https://spec.matrix.org/v1.19/client-server-api/#transaction-identifiers) (a
    /// call without a transaction ID cannot be repeated safely).
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Self::OutcomeUnknown { .. })
    }
}

/// What the spec's server discovery says to do after a failure (see [`discover`]).
///
/// Spec: [Well-known URIs](https://spec.matrix.org/v1.19/client-server-api/#well-known-uris) (`FAIL_PROMPT`,
/// `FAIL_ERROR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryFailure {
    /// `FAIL_PROMPT`: the server name published no usable discovery data; ask the user for the
    /// homeserver URL.
    Prompt,
    /// `FAIL_ERROR`: valid discovery data points at no usable homeserver; do not go on with this
    /// login and make no further guess.
    Error,
}

/// Whether sending a request twice is harmless, which decides when it may be retried.
///
/// Spec: [Transaction identifiers](https://spec.matrix.org/v1.19/client-server-api/#transaction-identifiers),
/// [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Sending it twice has the effect of sending it once: GETs, PUTs with a transaction ID, and
    /// the POSTs the spec makes safe to repeat (`keys/query`, `keys/upload`, `join`, …). Retried
    /// after connection errors, timeouts, 5xx and 429.
    Idempotent,
    /// A repeat may act twice (`/login` makes another device, `/createRoom` another room). Retried
    /// only when the homeserver certainly did not act on it: the connection could not be opened
    /// (refused, connect timeout), or it answered 429 or 503. Any other transport failure is
    /// [`HttpError::OutcomeUnknown`]; another 5xx is returned as it is.
    NotIdempotent,
}

impl Idempotency {
    /// The default for a method: POST and PATCH are not idempotent, everything else is.
    ///
    /// Serves: [Transaction identifiers](https://spec.matrix.org/v1.19/client-server-api/#transaction-identifiers) (the
    /// default for calls that carry none).
    pub fn of_method(method: &Method) -> Self {
        if *method == Method::POST || *method == Method::PATCH { Self::NotIdempotent } else { Self::Idempotent }
    }
}

/// Retry policy for connection errors, timeouts and 5xx: exponential backoff from `initial`,
/// capped at `max`. A wait the homeserver asks for (429/503) is honoured in full instead, whatever
/// `max` says (up to [`Homeserver::with_max_server_wait`]).
///
/// Spec: [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all (at least 1); [`Retry::FOREVER`] (`u32::MAX`) never gives up.
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

impl Retry {
    /// `attempts` meaning "never give up".
    ///
    /// Serves: [Syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing) (a device keeps syncing through
    /// outages).
    pub const FOREVER: u32 = u32::MAX;

    /// Never gives up on connection errors, timeouts, 5xx and 429 (idempotent calls), backing
    /// off from 250 ms to 30 s. Answers that are errors in themselves (4xx) still end the call.
    ///
    /// Serves: [Syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing) (a device keeps syncing through
    /// outages); waits follow [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting).
    pub fn forever() -> Self {
        Self { attempts: Self::FOREVER, initial: Duration::from_millis(250), max: Duration::from_secs(30) }
    }

    /// This policy never gives up.
    ///
    /// Serves: [Syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing) (a device keeps syncing through
    /// outages).
    pub fn is_forever(&self) -> bool {
        self.attempts == Self::FOREVER
    }
}

/// The reachability of the homeserver during a resilient call ([`Homeserver::sync_resilient`],
/// [`Homeserver::call_resilient`]).
///
/// Serves: [Syncing](https://spec.matrix.org/v1.19/client-server-api/#syncing) (the long poll's view of the
/// homeserver); rate limits are [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connectivity {
    /// An attempt failed (no answer, 5xx, or rate limited): reported before every wait.
    Unreachable {
        /// When the first failure of this outage happened.
        since: SystemTime,
        /// Failed attempts so far in this outage.
        failures: u32,
        /// The wait before the next attempt.
        retry_in: Duration,
        /// What went wrong last, for people (no control characters).
        reason: String,
        /// The last failure was a rate limit (429), not an outage.
        rate_limited: bool,
    },
    /// The homeserver answered again after an outage.
    Back {
        /// When the outage began.
        since: SystemTime,
        /// How long it lasted.
        down_for: Duration,
    },
}

impl fmt::Display for Connectivity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable { since, retry_in, reason, rate_limited, .. } => {
                let down = SystemTime::now().duration_since(*since).unwrap_or_default().as_secs();
                let what = if *rate_limited { "homeserver rate limiting us" } else { "homeserver unreachable" };
                write!(f, "{what} for {down} s ({reason}); retrying in {:.1} s", retry_in.as_secs_f64())
            }
            Self::Back { down_for, .. } => write!(f, "homeserver back after {} s", down_for.as_secs()),
        }
    }
}

/// A homeserver and (once logged in) an access token.
///
/// `Debug` shows the base URL and whether there is a token, never the token itself.
///
/// ```
/// use mxverify_client::{Homeserver, HttpError};
///
/// // https, or plain http to this machine only (nothing is sent here).
/// let hs = Homeserver::new_checked("https://matrix.example.org/", None, false)?;
/// assert_eq!(hs.base(), "https://matrix.example.org");
/// assert!(Homeserver::new_checked("http://127.0.0.1:8008", None, false).is_ok());
/// let insecure = Homeserver::new_checked("http://matrix.example.org", None, false);
/// assert!(matches!(insecure, Err(HttpError::Insecure { .. })));
/// # Ok::<(), HttpError>(())
/// ```
///
/// Spec: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards),
/// [Using access tokens](https://spec.matrix.org/v1.19/client-server-api/#using-access-tokens).
#[derive(Clone)]
pub struct Homeserver {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
    retry: Retry,
    max_server_wait: Duration,
}

impl fmt::Debug for Homeserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Homeserver")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("retry", &self.retry)
            .field("max_server_wait", &self.max_server_wait)
            .finish_non_exhaustive()
    }
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

/// Text from the network, fit to show: no control characters, bounded length.
fn clean(text: &str, max_chars: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max_chars).collect()
}

/// Is this URL host this machine: `localhost`, 127.0.0.0/8, `::1` (or `::ffff:127.x.y.z`)?
fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        Err(_) => false,
    }
}

/// Checks a homeserver base URL and returns it normalised, without a trailing `/`: `https://`, or
/// `http://` to loopback (or anywhere with `allow_insecure`); no query, fragment or credentials.
///
/// Spec: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards) (HTTPS recommended, plain HTTP
/// for tests), [Well-known URIs](https://spec.matrix.org/v1.19/client-server-api/#well-known-uris) (the base URL).
pub fn check_base_url(base: &str, allow_insecure: bool) -> Result<String, HttpError> {
    let bad = |reason: &str| HttpError::BadUrl { url: clean(base, 200), reason: reason.to_owned() };
    let url = Url::parse(base.trim()).map_err(|e| bad(&e.to_string()))?;
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure || is_loopback_host(host) => {}
        "http" => return Err(HttpError::Insecure { url: clean(base, 200) }),
        _ => return Err(bad("the scheme must be https (or http to this machine)")),
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("a base URL has no query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("a base URL carries no credentials"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// `METHOD /path` without the query string, for errors.
fn endpoint_of(method: &Method, path: &str) -> String {
    format!("{method} {}", path.split('?').next().unwrap_or(path))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// An HTTP date (RFC 9110: IMF-fixdate, and the obsolete RFC 850 and asctime forms) as seconds
/// since the epoch. `now` places RFC 850's two-digit years.
fn parse_http_date(text: &str, now: SystemTime) -> Option<i64> {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month_of = |m: &str| MONTHS.iter().position(|x| *x == m).map(|i| i as u32 + 1);
    let num = |s: &str, digits: std::ops::RangeInclusive<usize>| -> Option<i64> {
        (digits.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let (day, month, year, time) = match text.trim().split_once(',') {
        Some((_weekday, rest)) => match rest.split_whitespace().collect::<Vec<_>>()[..] {
            // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
            [d, m, y, t, "GMT"] => (num(d, 2..=2)?, month_of(m)?, num(y, 4..=4)?, t),
            // RFC 850: "Sunday, 06-Nov-94 08:49:37 GMT"
            [dmy, t, "GMT"] => {
                let mut parts = dmy.split('-');
                let (d, m, yy) = (parts.next()?, parts.next()?, parts.next()?);
                if parts.next().is_some() {
                    return None;
                }
                let (d, m, yy) = (num(d, 2..=2)?, month_of(m)?, num(yy, 2..=2)?);
                // The latest year with these two digits that is at most 50 years ahead.
                let limit = now_secs + 50 * 31_556_952;
                let year = [2100, 2000, 1900]
                    .into_iter()
                    .map(|c| c + yy)
                    .find(|y| days_from_civil(*y, m, 1) * 86_400 <= limit)?;
                (d, m, year, t)
            }
            _ => return None,
        },
        // asctime: "Sun Nov  6 08:49:37 1994"
        None => match text.split_whitespace().collect::<Vec<_>>()[..] {
            [_weekday, m, d, t, y] => (num(d, 1..=2)?, month_of(m)?, num(y, 4..=4)?, t),
            _ => return None,
        },
    };
    let mut hms = time.split(':');
    let (h, mi, s) = (num(hms.next()?, 2..=2)?, num(hms.next()?, 2..=2)?, num(hms.next()?, 2..=2)?);
    if hms.next().is_some() || h > 23 || mi > 59 || s > 60 || day < 1 || day > i64::from(days_in_month(year, month)) {
        return None;
    }
    Some(days_from_civil(year, month, day as u32) * 86_400 + h * 3600 + mi * 60 + s)
}

/// The wait a `Retry-After` header asks for, from `now` (a past date asks for none).
fn retry_after_header(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "wait very long".
        return Some(value.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    let at = parse_http_date(value, now)?;
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    Some(Duration::from_secs(at.max(0) as u64).saturating_sub(now))
}

/// The wait an error body's `retry_after_ms` asks for.
fn retry_after_body(body: &Value) -> Option<Duration> {
    let ms = &body["retry_after_ms"];
    if let Some(ms) = ms.as_u64() {
        return Some(Duration::from_millis(ms));
    }
    // Not an integer as the spec says, but clear enough: round up, never early.
    ms.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| Duration::from_secs_f64((f / 1000.0).min(1e12)))
}

/// The longer of the two hints, if any.
fn server_wait(body: Option<Duration>, header: Option<Duration>) -> Option<Duration> {
    match (body, header) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Where a resilient call reports [`Connectivity`].
type Observer<'a> = Option<&'a mut (dyn FnMut(Connectivity) + Send)>;

/// Reports the end of an outage, if there was one.
fn report_back(outage: Option<(SystemTime, Instant)>, on_state: &mut Observer<'_>) {
    if let (Some((since, began)), Some(report)) = (outage, on_state.as_mut()) {
        report(Connectivity::Back { since, down_for: began.elapsed() });
    }
}

/// One request, as [`Homeserver`]'s retry loop sees it.
struct Req<'a> {
    method: Method,
    path: &'a str,
    body: Option<&'a Value>,
    timeout: Duration,
    idempotency: Idempotency,
}

/// An answer, read in full.
struct Answer {
    status: StatusCode,
    header_wait: Option<Duration>,
    body: Vec<u8>,
    too_large: bool,
}

/// Reads a body up to `limit` bytes; `true` if it was longer (the rest is dropped).
async fn read_bounded(resp: &mut reqwest::Response, limit: usize) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if buf.len() + chunk.len() > limit {
            return Ok((buf, true));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf, false))
}

/// Parses a JSON answer as `serde_json::from_slice` would, except that a value nested deeper
/// than [`MAX_DEPTH`] is skipped (without recursion, however deep it goes) and replaced by
/// [`TOO_DEEP`]. Anyone can make the homeserver pass on an event nested a thousand levels deep; a
/// parser that refused the whole `/sync` answer for it would refuse the same answer for ever.
///
/// Serves: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards) (every answer is a JSON
/// object).
pub fn parse_json(bytes: &[u8]) -> serde_json::Result<Value> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Bounded(0).deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// A JSON value at this depth (see [`parse_json`]).
struct Bounded(usize);

impl<'de> serde::de::DeserializeSeed<'de> for Bounded {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        if self.0 >= MAX_DEPTH {
            // serde_json skips a value with a loop, not by recursion.
            <serde::de::IgnoredAny as serde::Deserialize>::deserialize(d)?;
            return Ok(Value::String(TOO_DEEP.into()));
        }
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Bounded {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Bounded(self.0 + 1))? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(Bounded(self.0 + 1))?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

impl Homeserver {
    /// A client for `base` (e.g. `https://matrix.example.org`), taken as it is.
    ///
    /// New code should use [`Homeserver::new_checked`], which refuses plain `http://` to another
    /// machine and URLs that are not homeserver base URLs.
    ///
    /// Spec: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards),
    /// [Using access tokens](https://spec.matrix.org/v1.19/client-server-api/#using-access-tokens).
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self::with_client(base.trim_end_matches('/').to_owned(), token, false)
    }

    /// A client for `base`, checked by [`check_base_url`]: `https://`, or `http://` only to this
    /// machine (`localhost`, 127.0.0.0/8, `::1`) unless `allow_insecure`.
    ///
    /// Spec: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards) (HTTPS recommended, plain
    /// HTTP for tests), [Using access tokens](https://spec.matrix.org/v1.19/client-server-api/#using-access-tokens).
    pub fn new_checked(base: &str, token: Option<String>, allow_insecure: bool) -> Result<Self, HttpError> {
        let base = check_base_url(base, allow_insecure)?;
        // Without allow_insecure an https homeserver cannot redirect us to plain http either.
        let https_only = base.starts_with("https:") && !allow_insecure;
        Ok(Self::with_client(base, token, https_only))
    }

    fn with_client(base: String, token: Option<String>, https_only: bool) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .https_only(https_only)
            .build()
            .expect("a TLS backend is compiled in");
        Self { base, token, client, retry: Retry::default(), max_server_wait: DEFAULT_MAX_SERVER_WAIT }
    }

    /// Changes the retry policy.
    ///
    /// Spec: [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting).
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// The longest wait a homeserver may ask for (429/503) that a call waits out (10 minutes by
    /// default); a longer one ends the call with the error ([`HttpError::retry_after`]). Resilient
    /// calls wait out any.
    ///
    /// Spec: [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting).
    pub fn with_max_server_wait(mut self, max: Duration) -> Self {
        self.max_server_wait = max;
        self
    }

    /// The retry policy.
    ///
    /// Spec: [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting).
    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// The base URL.
    ///
    /// Spec: [Well-known URIs](https://spec.matrix.org/v1.19/client-server-api/#well-known-uris) (the homeserver base
    /// URL).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sets the access token.
    ///
    /// Spec: [Using access tokens](https://spec.matrix.org/v1.19/client-server-api/#using-access-tokens).
    pub fn set_token(&mut self, token: String) {
        self.token = Some(token);
    }

    /// One request with retries. `timeout` bounds each attempt (long polls pass a longer one).
    /// POST (and PATCH) are taken as not idempotent, other methods as idempotent; see
    /// [`Homeserver::call_with`] to say otherwise.
    ///
    /// Spec: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards),
    /// [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting),
    /// [Transaction identifiers](https://spec.matrix.org/v1.19/client-server-api/#transaction-identifiers).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, HttpError> {
        let idempotency = Idempotency::of_method(&method);
        self.call_with(method, path, body, timeout, idempotency).await
    }

    /// One request with retries as its [`Idempotency`] allows.
    ///
    /// Spec: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards),
    /// [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting),
    /// [Transaction identifiers](https://spec.matrix.org/v1.19/client-server-api/#transaction-identifiers).
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        idempotency: Idempotency,
    ) -> Result<Value, HttpError> {
        self.execute(&Req { method, path, body, timeout, idempotency }, self.retry, None).await
    }

    /// One request that never gives up on connection errors, timeouts, 5xx and 429 (for an
    /// idempotent call; a non-idempotent one still stops where [`Idempotency::NotIdempotent`]
    /// says), with the backoff of this client's policy but no limit on attempts nor on the waits a
    /// homeserver asks for. Every failed attempt is reported to `on_state` as
    /// [`Connectivity::Unreachable`] before the wait, and the first answer after one as
    /// [`Connectivity::Back`]. Ends with the result, or with an error answer (4xx, such as
    /// [`HttpError::is_unknown_token`]).
    ///
    /// Spec: [API standards](https://spec.matrix.org/v1.19/client-server-api/#api-standards),
    /// [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting),
    /// [Transaction identifiers](https://spec.matrix.org/v1.19/client-server-api/#transaction-identifiers).
    pub async fn call_resilient(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
        idempotency: Idempotency,
        mut on_state: impl FnMut(Connectivity) + Send,
    ) -> Result<Value, HttpError> {
        let retry = Retry { attempts: Retry::FOREVER, ..self.retry };
        self.execute(&Req { method, path, body, timeout, idempotency }, retry, Some(&mut on_state)).await
    }

    /// The retry loop.
    async fn execute(&self, req: &Req<'_>, retry: Retry, mut on_state: Observer<'_>) -> Result<Value, HttpError> {
        let url = format!("{}{}", self.base, req.path);
        let endpoint: Box<str> = endpoint_of(&req.method, req.path).into();
        let forever = retry.is_forever();
        let mut backoff = retry.initial.min(retry.max);
        let mut attempt: u32 = 0;
        // When the current outage began (wall clock for reports, monotonic for its length).
        let mut outage: Option<(SystemTime, Instant)> = None;
        loop {
            attempt = attempt.saturating_add(1);
            let last = !forever && attempt >= retry.attempts;
            let (wait, reason, rate_limited) = match self.attempt(req, &url).await {
                Err(e) => {
                    // A connect error means nothing was sent; anything later may have reached the
                    // homeserver.
                    if req.idempotency == Idempotency::NotIdempotent && !e.is_connect() {
                        return Err(HttpError::OutcomeUnknown { url: self.base.clone(), endpoint, source: e });
                    }
                    if last {
                        return Err(HttpError::Unreachable { url: self.base.clone(), endpoint, source: e });
                    }
                    (backoff, clean(&e.to_string(), 300), false)
                }
                Ok(answer) => {
                    if answer.too_large {
                        report_back(outage, &mut on_state);
                        return Err(HttpError::Malformed(format!(
                            "{endpoint}: the answer is larger than {MAX_BODY} bytes"
                        )));
                    }
                    let value: Value = if answer.body.is_empty() {
                        json!({})
                    } else {
                        parse_json(&answer.body).unwrap_or(Value::Null)
                    };
                    let status = answer.status;
                    if status.is_success() {
                        report_back(outage, &mut on_state);
                        return if value.is_object() {
                            Ok(value)
                        } else {
                            Err(HttpError::Malformed(format!("{endpoint}: not a JSON object")))
                        };
                    }
                    let asked = matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
                        .then(|| server_wait(retry_after_body(&value), answer.header_wait))
                        .flatten();
                    let text = String::from_utf8_lossy(&answer.body);
                    let error = HttpError::Matrix {
                        status: status.as_u16(),
                        errcode: clean(value["errcode"].as_str().unwrap_or("M_UNKNOWN"), MAX_ERROR_TEXT),
                        error: clean(value["error"].as_str().unwrap_or(&text), MAX_ERROR_TEXT),
                        body: value,
                        endpoint: endpoint.clone(),
                        retry_after: asked,
                    };
                    let retryable = match req.idempotency {
                        Idempotency::Idempotent => status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS,
                        Idempotency::NotIdempotent => {
                            status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
                        }
                    };
                    let too_long = asked.is_some_and(|w| w > self.max_server_wait) && !forever;
                    if !retryable || last || too_long {
                        report_back(outage, &mut on_state);
                        return Err(error);
                    }
                    let rate_limited = status == StatusCode::TOO_MANY_REQUESTS;
                    // Never before the homeserver said; never faster than the backoff either, so
                    // that "retry after 0 ms" cannot make us hammer it.
                    (asked.map_or(backoff, |w| w.max(backoff)), clean(&error.to_string(), 300), rate_limited)
                }
            };
            let (since, _) = *outage.get_or_insert_with(|| (SystemTime::now(), Instant::now()));
            if let Some(report) = on_state.as_mut() {
                report(Connectivity::Unreachable { since, failures: attempt, retry_in: wait, reason, rate_limited });
            }
            tokio::time::sleep(wait).await;
            backoff = backoff.saturating_mul(2).min(retry.max);
        }
    }

    /// One attempt: the request, and the answer read in full.
    async fn attempt(&self, req: &Req<'_>, url: &str) -> Result<Answer, reqwest::Error> {
        let mut builder = self.client.request(req.method.clone(), url).timeout(req.timeout);
        if let Some(t) = &self.token {
            builder = builder.bearer_auth(t);
        }
        if let Some(b) = req.body {
            builder = builder.json(b);
        }
        let mut resp = builder.send().await?;
        let status = resp.status();
        let header_wait = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after_header(v, SystemTime::now()));
        let (body, too_large) = read_bounded(&mut resp, MAX_BODY).await?;
        Ok(Answer { status, header_wait, body, too_large })
    }

    async fn get(&self, path: &str) -> Result<Value, HttpError> {
        self.call_with(Method::GET, path, None, Duration::from_secs(30), Idempotency::Idempotent).await
    }

    /// A POST that is safe to repeat (the spec makes it idempotent, or repeating it is harmless).
    async fn post_idempotent(&self, path: &str, body: &Value) -> Result<Value, HttpError> {
        self.call_with(Method::POST, path, Some(body), Duration::from_secs(30), Idempotency::Idempotent).await
    }

    /// A POST that must not be repeated blindly.
    async fn post_once(&self, path: &str, body: &Value) -> Result<Value, HttpError> {
        self.call_with(Method::POST, path, Some(body), Duration::from_secs(30), Idempotency::NotIdempotent).await
    }

    async fn put(&self, path: &str, body: &Value) -> Result<Value, HttpError> {
        self.call_with(Method::PUT, path, Some(body), Duration::from_secs(30), Idempotency::Idempotent).await
    }

    /// `GET /_matrix/client/versions`: is this a homeserver at all?
    ///
    /// Spec: [`GET /_matrix/client/versions`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientversions).
    pub async fn versions(&self) -> Result<Value, HttpError> {
        self.get("/_matrix/client/versions").await
    }

    /// `POST /login` with a password; returns (user_id, device_id, access_token).
    ///
    /// Not idempotent (each login makes a device): retried only when the request certainly did not
    /// reach the homeserver, or it answered 429/503. Wrong credentials are
    /// [`HttpError::is_login_refused`].
    ///
    /// Spec: [`POST /login`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3login).
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
        let v = self.post_once(LOGIN_PATH, &body).await?;
        let field =
            |k: &str| v[k].as_str().map(str::to_owned).ok_or_else(|| HttpError::Malformed(format!("login: no {k}")));
        Ok((field("user_id")?, field("device_id")?, field("access_token")?))
    }

    /// `GET /account/whoami`: the user (and device, if the token belongs to one) of the access
    /// token, for logging in with an existing token.
    ///
    /// Spec: [`GET /account/whoami`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3accountwhoami).
    pub async fn whoami(&self) -> Result<(String, Option<String>), HttpError> {
        let v = self.get("/_matrix/client/v3/account/whoami").await?;
        let user = v["user_id"]
            .as_str()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| HttpError::Malformed("whoami: no user_id".into()))?;
        Ok((user.to_owned(), v["device_id"].as_str().map(str::to_owned)))
    }

    /// `POST /user/{user}/filter`: returns the filter id. (Repeating it only makes another filter.)
    ///
    /// Spec: [`POST /user/{userId}/filter`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3useruseridfilter).
    pub async fn create_filter(&self, user: &str, filter: &Value) -> Result<String, HttpError> {
        let v = self.post_idempotent(&format!("/_matrix/client/v3/user/{}/filter", enc(user)), filter).await?;
        v["filter_id"].as_str().map(str::to_owned).ok_or_else(|| HttpError::Malformed("filter: no filter_id".into()))
    }

    fn sync_path(since: Option<&str>, filter: &str, timeout_ms: u64) -> String {
        let mut path = format!("/_matrix/client/v3/sync?filter={}&timeout={timeout_ms}", enc(filter));
        if let Some(s) = since {
            path.push_str(&format!("&since={}", enc(s)));
        }
        path
    }

    /// `GET /sync`, long-polling up to `timeout_ms`.
    ///
    /// Spec: [`GET /sync`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3sync).
    pub async fn sync(&self, since: Option<&str>, filter: &str, timeout_ms: u64) -> Result<Value, HttpError> {
        let path = Self::sync_path(since, filter, timeout_ms);
        self.call(Method::GET, &path, None, Duration::from_millis(timeout_ms) + Duration::from_secs(30)).await
    }

    /// `GET /sync` that rides out any outage: never gives up on connection errors, timeouts, 5xx
    /// and 429, and reports each failed attempt and the recovery to `on_state` (see
    /// [`Homeserver::call_resilient`]). Returns the sync, or an error answer such as an unknown
    /// token.
    ///
    /// Spec: [`GET /sync`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3sync),
    /// [Rate limiting](https://spec.matrix.org/v1.19/client-server-api/#rate-limiting).
    pub async fn sync_resilient(
        &self,
        since: Option<&str>,
        filter: &str,
        timeout_ms: u64,
        on_state: impl FnMut(Connectivity) + Send,
    ) -> Result<Value, HttpError> {
        let path = Self::sync_path(since, filter, timeout_ms);
        let timeout = Duration::from_millis(timeout_ms) + Duration::from_secs(30);
        self.call_resilient(Method::GET, &path, None, timeout, Idempotency::Idempotent, on_state).await
    }

    /// `PUT /sendToDevice/{type}/{txn}`: the transaction id makes a retry idempotent.
    ///
    /// Spec: [`PUT /sendToDevice/{eventType}/{txnId}`](https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3sendtodeviceeventtypetxnid),
    /// [Transaction identifiers](https://spec.matrix.org/v1.19/client-server-api/#transaction-identifiers).
    pub async fn send_to_device(&self, event_type: &str, txn: &str, messages: &Value) -> Result<(), HttpError> {
        let path = format!("/_matrix/client/v3/sendToDevice/{}/{}", enc(event_type), enc(txn));
        self.put(&path, &json!({ "messages": messages })).await.map(drop)
    }

    /// `PUT /rooms/{room}/send/{type}/{txn}`; returns the event ID.
    ///
    /// Spec: [`PUT /rooms/{roomId}/send/{eventType}/{txnId}`](https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3roomsroomidsendeventtypetxnid),
    /// [Transaction identifiers](https://spec.matrix.org/v1.19/client-server-api/#transaction-identifiers).
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
    ///
    /// Not idempotent (a repeat makes a second room): see [`Idempotency::NotIdempotent`].
    ///
    /// Spec: [`POST /createRoom`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3createroom),
    /// [Direct messaging](https://spec.matrix.org/v1.19/client-server-api/#direct-messaging).
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
        let v = self.post_once("/_matrix/client/v3/createRoom", &body).await?;
        v["room_id"].as_str().map(str::to_owned).ok_or_else(|| HttpError::Malformed("createRoom: no room_id".into()))
    }

    /// `GET /rooms/{room}/state/{type}/{state_key}`: one state event's content (404 if absent).
    ///
    /// Spec: [`GET /rooms/{roomId}/state/{eventType}/{stateKey}`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3roomsroomidstateeventtypestatekey).
    pub async fn room_state(&self, room: &str, event_type: &str, state_key: &str) -> Result<Value, HttpError> {
        self.get(&format!("/_matrix/client/v3/rooms/{}/state/{}/{}", enc(room), enc(event_type), enc(state_key))).await
    }

    /// `GET /joined_rooms`.
    ///
    /// Spec: [`GET /joined_rooms`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3joined_rooms).
    pub async fn joined_rooms(&self) -> Result<Vec<String>, HttpError> {
        let v = self.get("/_matrix/client/v3/joined_rooms").await?;
        Ok(v["joined_rooms"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect())
    }

    /// `GET /user/{user}/account_data/{type}`; `None` if there is none.
    ///
    /// Spec: [`GET /user/{userId}/account_data/{type}`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3useruseridaccount_datatype).
    pub async fn account_data(&self, user: &str, event_type: &str) -> Result<Option<Value>, HttpError> {
        match self.get(&format!("/_matrix/client/v3/user/{}/account_data/{}", enc(user), enc(event_type))).await {
            Ok(v) => Ok(Some(v)),
            Err(HttpError::Matrix { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `PUT /user/{user}/account_data/{type}`.
    ///
    /// Spec: [`PUT /user/{userId}/account_data/{type}`](https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3useruseridaccount_datatype).
    pub async fn set_account_data(&self, user: &str, event_type: &str, content: &Value) -> Result<(), HttpError> {
        self.put(&format!("/_matrix/client/v3/user/{}/account_data/{}", enc(user), enc(event_type)), content)
            .await
            .map(drop)
    }

    /// `POST /keys/claim` for one-time keys: `wanted` maps user → device → algorithm. (A repeat
    /// claims other keys of the same devices, which is harmless.)
    ///
    /// Spec: [`POST /keys/claim`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysclaim).
    pub async fn keys_claim(&self, wanted: &Value) -> Result<Value, HttpError> {
        self.post_idempotent("/_matrix/client/v3/keys/claim", &json!({"one_time_keys": wanted, "timeout": 10_000}))
            .await
    }

    /// `POST /join/{room}` (joining twice is joining once).
    ///
    /// Spec: [`POST /join/{roomIdOrAlias}`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3joinroomidoralias).
    pub async fn join(&self, room: &str) -> Result<(), HttpError> {
        self.post_idempotent(&format!("/_matrix/client/v3/join/{}", enc(room)), &json!({})).await.map(drop)
    }

    /// `GET /joined_members` of a room.
    ///
    /// Spec: [`GET /rooms/{roomId}/joined_members`](https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3roomsroomidjoined_members).
    pub async fn joined_members(&self, room: &str) -> Result<Vec<String>, HttpError> {
        let v = self.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(room))).await?;
        Ok(v["joined"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default())
    }

    /// `POST /keys/upload` (the same keys under the same IDs are accepted again).
    ///
    /// Spec: [`POST /keys/upload`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysupload).
    pub async fn keys_upload(&self, body: &Value) -> Result<Value, HttpError> {
        self.post_idempotent("/_matrix/client/v3/keys/upload", body).await
    }

    /// `POST /keys/query` for some users (a read).
    ///
    /// Spec: [`POST /keys/query`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysquery).
    pub async fn keys_query(&self, users: &[&str]) -> Result<Value, HttpError> {
        let map: serde_json::Map<String, Value> = users.iter().map(|u| ((*u).to_owned(), json!([]))).collect();
        self.post_idempotent("/_matrix/client/v3/keys/query", &json!({ "device_keys": map })).await
    }

    /// `POST /keys/device_signing/upload`, with user-interactive auth by password if asked.
    ///
    /// Both requests are retried as idempotent: uploading the same keys again changes nothing,
    /// the first request never succeeds without auth (its 401 carries the UIA flows, and is not an
    /// unknown token), and the spec has a homeserver answer a repeat of a completed UIA stage with
    /// the result or a 401, never by acting twice. A wrong password comes back as a 401 with
    /// `M_FORBIDDEN`, which is not [`HttpError::is_login_refused`].
    ///
    /// Spec: [`POST /keys/device_signing/upload`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keysdevice_signingupload),
    /// [User-interactive authentication API](https://spec.matrix.org/v1.19/client-server-api/#user-interactive-authentication-api).
    pub async fn upload_cross_signing(
        &self,
        body: &Value,
        user: &str,
        password: Option<&str>,
    ) -> Result<(), HttpError> {
        let path = "/_matrix/client/v3/keys/device_signing/upload";
        match self.post_idempotent(path, body).await {
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
                self.post_idempotent(path, &body).await.map(drop)
            }
            Err(e) => Err(e),
        }
    }

    /// `POST /keys/signatures/upload`; fails if the server rejected any signature. (The same
    /// signatures again change nothing.)
    ///
    /// Spec: [`POST /keys/signatures/upload`](https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3keyssignaturesupload).
    pub async fn upload_signatures(&self, body: &Value) -> Result<(), HttpError> {
        let v = self.post_idempotent("/_matrix/client/v3/keys/signatures/upload", body).await?;
        match v.get("failures").and_then(Value::as_object) {
            Some(f) if !f.is_empty() => {
                Err(HttpError::Malformed(format!("signatures rejected: {}", Value::Object(f.clone()))))
            }
            _ => Ok(()),
        }
    }
}

/// The server name of a user ID (`@alice:example.org` → `example.org`): everything after the
/// first colon, if the ID looks like one.
///
/// Spec: [User identifiers](https://spec.matrix.org/v1.19/appendices/#user-identifiers),
/// [Server name](https://spec.matrix.org/v1.19/appendices/#server-name),
/// [Well-known URIs](https://spec.matrix.org/v1.19/client-server-api/#well-known-uris) (step 1).
pub fn server_name_of(user_id: &str) -> Option<&str> {
    let (local, server) = user_id.strip_prefix('@')?.split_once(':')?;
    (!local.is_empty() && !server.is_empty()).then_some(server)
}

/// The hostname of a server name (`example.org:8448` → `example.org`, `[::1]:8448` → `[::1]`),
/// checked against the spec's grammar: an IPv4 address or a DNS name (letters, digits, `-`, `.`),
/// or an IPv6 address in brackets, then an optional port of 1 to 5 digits.
///
/// Spec: [Server name](https://spec.matrix.org/v1.19/appendices/#server-name),
/// [Well-known URIs](https://spec.matrix.org/v1.19/client-server-api/#well-known-uris) (step 2).
pub fn hostname_of(server_name: &str) -> Option<&str> {
    let end = if server_name.starts_with('[') {
        let end = server_name.find(']')? + 1;
        server_name[1..end - 1].parse::<Ipv6Addr>().ok()?;
        end
    } else {
        let end = server_name.find(':').unwrap_or(server_name.len());
        let host = &server_name[..end];
        let dns = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'.';
        if host.is_empty() || host.len() > 255 || !host.bytes().all(dns) {
            return None;
        }
        end
    };
    let (host, rest) = server_name.split_at(end);
    match rest.strip_prefix(':') {
        None if rest.is_empty() => Some(host),
        Some(port) if (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit()) => Some(host),
        _ => None,
    }
}

/// Finds the homeserver of a server name (the part of a user ID after the first colon, see
/// [`server_name_of`]) by the spec's server discovery
/// (<https://spec.matrix.org/v1.19/client-server-api/#well-known-uris>), and returns its base URL
/// without a trailing `/`:
///
/// 1. `GET https://{hostname}/.well-known/matrix/client`.
/// 2. A 404 (or no answer at all) means the server name publishes nothing (`IGNORE`): the default
///    `https://{server_name}` is used if it answers `/_matrix/client/versions` as a homeserver;
///    otherwise [`DiscoveryFailure::Prompt`].
/// 3. Another status, an empty or non-JSON body, or no `m.homeserver.base_url` string
///    (`FAIL_PROMPT`): [`DiscoveryFailure::Prompt`], with no guess.
/// 4. A `base_url` that is not a URL, not `https://` (plain `http://` is accepted only to this
///    machine), or that does not answer `/_matrix/client/versions` with a list of versions
///    (`FAIL_ERROR`): [`DiscoveryFailure::Error`], with no guess.
///
/// An `m.identity_server` without a `base_url` is `FAIL_PROMPT` as the spec says, and one whose
/// `base_url` is not a URL `FAIL_ERROR`; the identity server itself is not contacted, since
/// mxverify never uses one.
pub async fn discover(server_name: &str) -> Result<String, HttpError> {
    let host = hostname_of(server_name).ok_or_else(|| HttpError::Discovery {
        server_name: clean(server_name, 200),
        failure: DiscoveryFailure::Prompt,
        reason: "not a server name".into(),
    })?;
    discover_inner(server_name, &format!("https://{host}"), &format!("https://{server_name}"), false).await
}

/// [`discover`] with the well-known file fetched from `origin` (e.g. `http://127.0.0.1:8080`)
/// instead of `https://{hostname}`, and `origin` as the default homeserver when there is no
/// well-known file: for tests, and for a server name whose well-known file is served elsewhere.
/// Plain `http://` is accepted for `origin` and the discovered homeserver if they are on this
/// machine, or anywhere with `allow_insecure`.
///
/// Spec: [Well-known URIs](https://spec.matrix.org/v1.19/client-server-api/#well-known-uris).
pub async fn discover_from(server_name: &str, origin: &str, allow_insecure: bool) -> Result<String, HttpError> {
    let origin = check_base_url(origin, allow_insecure)?;
    discover_inner(server_name, &origin, &origin, allow_insecure).await
}

async fn discover_inner(
    server_name: &str,
    origin: &str,
    default: &str,
    allow_insecure: bool,
) -> Result<String, HttpError> {
    let fail = |failure, reason: String| HttpError::Discovery { server_name: clean(server_name, 200), failure, reason };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .https_only(origin.starts_with("https:") && !allow_insecure)
        .build()
        .expect("a TLS backend is compiled in");
    let well_known = format!("{origin}/.well-known/matrix/client");
    let found = match client.get(&well_known).send().await {
        // Nothing published (or nobody there): IGNORE, then the default.
        Err(e) => Err(clean(&e.to_string(), 300)),
        Ok(resp) if resp.status() == StatusCode::NOT_FOUND => Err(format!("{well_known} answered 404")),
        Ok(resp) if resp.status() != StatusCode::OK => {
            return Err(fail(
                DiscoveryFailure::Prompt,
                format!("{well_known} answered HTTP {}", resp.status().as_u16()),
            ));
        }
        Ok(mut resp) => {
            let body = match read_bounded(&mut resp, MAX_WELL_KNOWN).await {
                Ok((_, true)) => return Err(fail(DiscoveryFailure::Prompt, format!("{well_known} is too large"))),
                Ok((body, false)) => body,
                Err(e) => return Err(fail(DiscoveryFailure::Prompt, clean(&e.to_string(), 300))),
            };
            Ok(body)
        }
    };
    let body = match found {
        Ok(body) => body,
        Err(why) => {
            return match validate_homeserver(default, allow_insecure).await {
                Ok(base) => Ok(base),
                Err(e) => Err(fail(
                    DiscoveryFailure::Prompt,
                    format!("no well-known file ({why}), and {default} is not a homeserver: {e}"),
                )),
            };
        }
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(fail(DiscoveryFailure::Prompt, format!("{well_known} is empty")));
    }
    let value: Value = serde_json::from_slice(&body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| fail(DiscoveryFailure::Prompt, format!("{well_known} is not a JSON object")))?;
    let base_url = value["m.homeserver"]["base_url"]
        .as_str()
        .ok_or_else(|| fail(DiscoveryFailure::Prompt, format!("{well_known} has no m.homeserver.base_url")))?;
    if let Some(identity) = value.get("m.identity_server") {
        let is_url = identity["base_url"]
            .as_str()
            .ok_or_else(|| fail(DiscoveryFailure::Prompt, "m.identity_server has no base_url".into()))?;
        if Url::parse(is_url).is_err() {
            return Err(fail(DiscoveryFailure::Error, "m.identity_server.base_url is not a URL".into()));
        }
    }
    validate_homeserver(base_url, allow_insecure)
        .await
        .map_err(|e| fail(DiscoveryFailure::Error, format!("{}: {e}", clean(base_url, 200))))
}

/// A base URL that answers `GET /_matrix/client/versions` with a list of versions, normalised.
async fn validate_homeserver(base: &str, allow_insecure: bool) -> Result<String, HttpError> {
    let hs = Homeserver::new_checked(base, None, allow_insecure)?.with_retry(Retry {
        attempts: 3,
        initial: Duration::from_millis(250),
        max: Duration::from_secs(1),
    });
    let v = hs.versions().await?;
    match v["versions"].as_array() {
        Some(list) if !list.is_empty() && list.iter().all(Value::is_string) => Ok(hs.base),
        _ => Err(HttpError::Malformed("/_matrix/client/versions has no list of versions".into())),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{MAX_DEPTH, TOO_DEEP, parse_json};

    #[test]
    fn answers_parse_as_serde_json_parses_them() {
        for text in
            [r#"{"a": [1, -2, 3.5, 1e300, 18446744073709551615, true, null, "x\u00e9"], "b": {}}"#, "[]", "\"s\"", "0"]
        {
            assert_eq!(parse_json(text.as_bytes()).unwrap(), serde_json::from_str::<Value>(text).unwrap(), "{text}");
        }
        for bad in ["", "{", "[1,]", "{} x", "<html>", "{\"a\": [[[}"] {
            assert!(parse_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_nested_too_deep_are_left_out_and_the_rest_is_kept() {
        let deep = |levels: usize| format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
        // serde_json itself gives up at 128 levels; the whole answer would be lost.
        let text = format!(
            r#"{{"events": [{{"type": "ok"}}, {{"type": "deep", "content": {}}}], "next": "s2"}}"#,
            deep(1_000_000)
        );
        assert!(serde_json::from_str::<Value>(&text).is_err());
        let v = parse_json(text.as_bytes()).unwrap();
        assert_eq!(v["next"], "s2");
        assert_eq!(v["events"][0], json!({"type": "ok"}));
        let mut inner = &v["events"][1]["content"];
        let mut levels = 3;
        while let Some(a) = inner.as_array() {
            inner = &a[0];
            levels += 1;
        }
        assert_eq!((inner.as_str(), levels), (Some(TOO_DEEP), MAX_DEPTH));
        // Just inside the bound, nothing is replaced.
        let v = parse_json(deep(MAX_DEPTH - 1).as_bytes()).unwrap();
        assert!(!v.to_string().contains(TOO_DEEP));
        // An unclosed deep value is still an error, found without recursion.
        assert!(parse_json("[".repeat(1_000_000).as_bytes()).is_err());
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(super::enc("!room:example.org"), "%21room%3Aexample.org");
        assert_eq!(super::enc("$ev/1+2"), "%24ev%2F1%2B2");
        assert_eq!(super::enc("m.key.verification.start"), "m.key.verification.start");
    }
}

#[cfg(test)]
mod retry_tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// One scripted answer of the fake homeserver.
    #[derive(Clone)]
    struct Reply {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
        /// Read the request, then close the connection without answering.
        hang_up: bool,
    }

    fn reply(status: u16, body: impl Into<String>) -> Reply {
        Reply { status, headers: Vec::new(), body: body.into(), hang_up: false }
    }

    fn hang_up() -> Reply {
        Reply { status: 0, headers: Vec::new(), body: String::new(), hang_up: true }
    }

    impl Reply {
        fn header(mut self, name: &'static str, value: &str) -> Self {
            self.headers.push((name, value.to_owned()));
            self
        }
    }

    /// A request the fake homeserver received.
    #[derive(Clone, Debug)]
    struct Seen {
        /// The request line and headers.
        head: String,
        /// When the whole request had arrived.
        received: Instant,
        /// When the answer had been written (`None` if hung up on).
        answered: Option<Instant>,
    }

    impl Seen {
        fn path(&self) -> &str {
            self.head.split(' ').nth(1).unwrap_or("")
        }
    }

    /// A fake homeserver on 127.0.0.1 answering one connection at a time with the scripted
    /// replies in order (then 500 "unscripted"), logging every request.
    struct Fake {
        url: String,
        log: Arc<Mutex<Vec<Seen>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Reads one HTTP/1.1 request (head and `content-length` body); `None` on EOF.
    async fn read_request(sock: &mut TcpStream) -> Option<String> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let length = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                while buf.len() < end + 4 + length {
                    let n = sock.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                return Some(head);
            }
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    impl Fake {
        async fn new(replies: Vec<Reply>) -> Fake {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            Fake::start(listener, replies)
        }

        /// A fake that starts listening on `addr` only after `delay` (the port refuses until then).
        fn later(addr: SocketAddr, delay: Duration, replies: Vec<Reply>) -> Fake {
            let log = Arc::new(Mutex::new(Vec::new()));
            let task = tokio::spawn(Self::run(None, Some((addr, delay)), replies, log.clone()));
            Fake { url: format!("http://{addr}"), log, task }
        }

        fn start(listener: TcpListener, replies: Vec<Reply>) -> Fake {
            let url = format!("http://{}", listener.local_addr().unwrap());
            let log = Arc::new(Mutex::new(Vec::new()));
            let task = tokio::spawn(Self::run(Some(listener), None, replies, log.clone()));
            Fake { url, log, task }
        }

        async fn run(
            listener: Option<TcpListener>,
            later: Option<(SocketAddr, Duration)>,
            replies: Vec<Reply>,
            log: Arc<Mutex<Vec<Seen>>>,
        ) {
            let listener = match (listener, later) {
                (Some(l), _) => l,
                (None, Some((addr, delay))) => {
                    tokio::time::sleep(delay).await;
                    TcpListener::bind(addr).await.unwrap()
                }
                (None, None) => unreachable!(),
            };
            let mut replies = replies.into_iter();
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let Some(head) = read_request(&mut sock).await else { continue };
                let received = Instant::now();
                let r = replies.next().unwrap_or_else(|| reply(500, r#"{"errcode":"M_UNKNOWN","error":"unscripted"}"#));
                if r.hang_up {
                    drop(sock);
                    log.lock().unwrap().push(Seen { head, received, answered: None });
                    continue;
                }
                let mut text = format!(
                    "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                    r.status,
                    r.body.len()
                );
                for (k, v) in &r.headers {
                    text.push_str(&format!("{k}: {v}\r\n"));
                }
                text.push_str("\r\n");
                text.push_str(&r.body);
                let _ = sock.write_all(text.as_bytes()).await;
                let _ = sock.flush().await;
                log.lock().unwrap().push(Seen { head, received, answered: Some(Instant::now()) });
            }
        }

        fn seen(&self) -> Vec<Seen> {
            self.log.lock().unwrap().clone()
        }
    }

    fn quick(attempts: u32) -> Retry {
        Retry { attempts, initial: Duration::from_millis(10), max: Duration::from_millis(50) }
    }

    /// The time between the answer to request `i` and the arrival of request `i + 1`.
    fn gap(seen: &[Seen], i: usize) -> Duration {
        seen[i + 1].received.duration_since(seen[i].answered.expect("answered"))
    }

    const LOGIN_OK: &str = r#"{"user_id":"@a:x","device_id":"D","access_token":"t"}"#;

    #[tokio::test(flavor = "current_thread")]
    async fn retries_429_honouring_retry_after_and_5xx() {
        let fake = Fake::new(vec![
            reply(429, r#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":300}"#),
            reply(502, "{}"),
            reply(200, r#"{"versions":["v1.11"]}"#),
        ])
        .await;
        let hs = Homeserver::new(&fake.url, None).with_retry(Retry {
            attempts: 5,
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
        });
        let v = hs.versions().await.unwrap();
        assert_eq!(v["versions"][0], "v1.11");
        let seen = fake.seen();
        assert_eq!(seen.len(), 3);
        assert!(gap(&seen, 0) >= Duration::from_millis(300), "retry_after_ms was honoured");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn client_errors_are_not_retried_and_attempts_are_bounded() {
        let fake = Fake::new(vec![reply(403, r#"{"errcode":"M_FORBIDDEN","error":"no"}"#)]).await;
        let hs = Homeserver::new(&fake.url, None);
        let e = hs.versions().await.unwrap_err();
        assert_eq!(e.errcode(), Some("M_FORBIDDEN"));
        assert_eq!(fake.seen().len(), 1);
        let fake = Fake::new(vec![reply(500, "{}"), reply(500, "{}"), reply(500, "{}")]).await;
        let hs = Homeserver::new(&fake.url, None).with_retry(quick(3));
        assert!(matches!(hs.versions().await, Err(HttpError::Matrix { status: 500, .. })));
        assert_eq!(fake.seen().len(), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn retry_after_ms_is_waited_in_full_whatever_the_backoff_cap() {
        // The backoff cap is 50 ms: the homeserver's 1.5 s is honoured anyway.
        let fake = Fake::new(vec![
            reply(429, r#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":1500}"#),
            reply(200, r#"{"versions":["v1.11"]}"#),
        ])
        .await;
        let hs = Homeserver::new(&fake.url, None).with_retry(quick(3));
        hs.versions().await.unwrap();
        let seen = fake.seen();
        assert_eq!(seen.len(), 2);
        assert!(gap(&seen, 0) >= Duration::from_millis(1500), "sent {:?} after the 429", gap(&seen, 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn retry_after_header_is_waited_in_full_and_the_longer_hint_wins() {
        let fake = Fake::new(vec![
            reply(429, r#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":200}"#)
                .header("Retry-After", "2"),
            reply(200, r#"{"versions":["v1.11"]}"#),
        ])
        .await;
        let hs = Homeserver::new(&fake.url, None).with_retry(quick(3));
        hs.versions().await.unwrap();
        let seen = fake.seen();
        assert_eq!(seen.len(), 2);
        assert!(gap(&seen, 0) >= Duration::from_secs(2), "sent {:?} after the 429", gap(&seen, 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_wait_beyond_the_bound_is_returned_to_the_caller() {
        let fake =
            Fake::new(vec![reply(429, r#"{"errcode":"M_LIMIT_EXCEEDED","error":"later","retry_after_ms":1200000}"#)])
                .await;
        let hs = Homeserver::new(&fake.url, None);
        let started = Instant::now();
        let e = hs.versions().await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(e.is_rate_limited());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(1200)));
        assert_eq!(fake.seen().len(), 1);
        // The bound is the caller's; a header counts too.
        let fake = Fake::new(vec![reply(503, "{}").header("Retry-After", "3")]).await;
        let hs = Homeserver::new(&fake.url, None).with_max_server_wait(Duration::from_secs(1));
        let e = hs.versions().await.unwrap_err();
        assert_eq!((e.status(), e.retry_after()), (Some(503), Some(Duration::from_secs(3))));
        assert_eq!(fake.seen().len(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn login_is_not_retried_once_the_request_may_have_arrived() {
        let fake = Fake::new(vec![hang_up(), reply(200, LOGIN_OK)]).await;
        let hs = Homeserver::new(&fake.url, None).with_retry(quick(5));
        let e = hs.login("a", "pw", None).await.unwrap_err();
        assert!(e.is_outcome_unknown(), "{e}");
        assert_eq!(e.endpoint(), Some("POST /_matrix/client/v3/login"));
        assert!(e.to_string().contains("unknown"), "{e}");
        assert_eq!(fake.seen().len(), 1, "not sent again");
        // The same for a room creation; a 5xx other than 503 is not retried either.
        let fake = Fake::new(vec![hang_up()]).await;
        let hs = Homeserver::new(&fake.url, Some("tok".into())).with_retry(quick(5));
        assert!(hs.create_dm("@b:x").await.unwrap_err().is_outcome_unknown());
        assert_eq!(fake.seen().len(), 1);
        let fake = Fake::new(vec![reply(502, "{}"), reply(200, LOGIN_OK)]).await;
        let hs = Homeserver::new(&fake.url, None).with_retry(quick(5));
        assert_eq!(hs.login("a", "pw", None).await.unwrap_err().status(), Some(502));
        assert_eq!(fake.seen().len(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn login_is_retried_when_the_homeserver_says_so() {
        let fake = Fake::new(vec![
            reply(429, r#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":50}"#),
            reply(503, "{}"),
            reply(200, LOGIN_OK),
        ])
        .await;
        let hs = Homeserver::new(&fake.url, None).with_retry(quick(5));
        let (user, device, token) = hs.login("a", "pw", None).await.unwrap();
        assert_eq!((user.as_str(), device.as_str(), token.as_str()), ("@a:x", "D", "t"));
        assert_eq!(fake.seen().len(), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn login_is_retried_after_connection_refused() {
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        // Nobody listens on addr for 150 ms: the first attempts are refused, unsent.
        let fake = Fake::later(addr, Duration::from_millis(150), vec![reply(200, LOGIN_OK)]);
        let hs = Homeserver::new(&fake.url, None).with_retry(Retry {
            attempts: 100,
            initial: Duration::from_millis(10),
            max: Duration::from_millis(20),
        });
        let started = Instant::now();
        let (user, _, _) = hs.login("a", "pw", None).await.unwrap();
        assert_eq!(user, "@a:x");
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(fake.seen().len(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn idempotent_calls_are_retried_after_a_reset() {
        let fake = Fake::new(vec![hang_up(), reply(200, r#"{"event_id":"$e"}"#)]).await;
        let hs = Homeserver::new(&fake.url, Some("tok".into())).with_retry(quick(5));
        assert_eq!(hs.room_send("!r:x", "m.room.message", "txn1", &json!({})).await.unwrap(), "$e");
        let seen = fake.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].path(), seen[1].path(), "the same transaction ID");
        // POSTs marked idempotent are retried too.
        let fake = Fake::new(vec![hang_up(), reply(200, r#"{"device_keys":{}}"#)]).await;
        let hs = Homeserver::new(&fake.url, Some("tok".into())).with_retry(quick(5));
        hs.keys_query(&["@b:x"]).await.unwrap();
        assert_eq!(fake.seen().len(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn call_is_idempotent_by_method_unless_told() {
        let fake = Fake::new(vec![hang_up(), reply(200, "{}")]).await;
        let hs = Homeserver::new(&fake.url, None).with_retry(quick(5));
        let e = hs.call(Method::POST, "/x", Some(&json!({})), Duration::from_secs(5)).await.unwrap_err();
        assert!(e.is_outcome_unknown());
        let fake = Fake::new(vec![hang_up(), reply(200, "{}")]).await;
        let hs = Homeserver::new(&fake.url, None).with_retry(quick(5));
        hs.call_with(Method::POST, "/x", Some(&json!({})), Duration::from_secs(5), Idempotency::Idempotent)
            .await
            .unwrap();
        assert_eq!(fake.seen().len(), 2);
        let fake = Fake::new(vec![hang_up(), reply(200, "{}")]).await;
        let hs = Homeserver::new(&fake.url, None).with_retry(quick(5));
        hs.call(Method::GET, "/x", None, Duration::from_secs(5)).await.unwrap();
        assert_eq!(fake.seen().len(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_unknown_token_is_not_retried_and_is_recognised() {
        for (errcode, soft) in [("M_UNKNOWN_TOKEN", true), ("M_MISSING_TOKEN", false)] {
            let body = format!(r#"{{"errcode":"{errcode}","error":"who?","soft_logout":{soft}}}"#);
            let fake = Fake::new(vec![reply(401, body), reply(200, "{}")]).await;
            let hs = Homeserver::new(&fake.url, Some("tok".into())).with_retry(quick(5));
            let e = hs.joined_rooms().await.unwrap_err();
            assert!(e.is_unknown_token(), "{e}");
            assert_eq!(e.is_soft_logout(), soft);
            assert!(!e.is_login_refused());
            assert_eq!(fake.seen().len(), 1);
        }
        let fake = Fake::new(vec![reply(401, r#"{"errcode":"M_UNKNOWN_TOKEN","error":"x"}"#)]).await;
        let hs = Homeserver::new(&fake.url, Some("tok".into())).with_retry(quick(5));
        let e = hs.sync_resilient(None, "f", 0, |_| {}).await.unwrap_err();
        assert!(e.is_unknown_token());
        assert_eq!(fake.seen().len(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_login_is_told_from_a_refused_send() {
        let forbidden = r#"{"errcode":"M_FORBIDDEN","error":"Invalid username or password"}"#;
        let fake = Fake::new(vec![reply(403, forbidden), reply(403, forbidden)]).await;
        let hs = Homeserver::new(&fake.url, Some("tok".into()));
        let login = hs.login("a", "wrong", None).await.unwrap_err();
        let send = hs.room_send("!r:x", "m.room.message", "t", &json!({})).await.unwrap_err();
        assert_eq!((login.errcode(), send.errcode()), (Some("M_FORBIDDEN"), Some("M_FORBIDDEN")));
        assert!(login.is_login_refused());
        assert!(!send.is_login_refused());
        assert!(send.endpoint().unwrap().starts_with("PUT /_matrix/client/v3/rooms/"), "{send}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn error_text_from_the_network_loses_its_control_characters() {
        let fake =
            Fake::new(vec![reply(400, r#"{"errcode":"M_X\u001b[2J","error":"bad\u0007\nthing\u009b31m"}"#)]).await;
        let e = Homeserver::new(&fake.url, None).versions().await.unwrap_err();
        assert_eq!((e.errcode(), e.to_string().contains("badthing31m")), (Some("M_X[2J"), true), "{e}");
    }

    #[test]
    fn plain_http_is_refused_except_to_this_machine() {
        for url in ["http://matrix.example.org", "http://127.0.0.1.example.org:8008", "http://10.0.0.1"] {
            assert!(matches!(Homeserver::new_checked(url, None, false), Err(HttpError::Insecure { .. })), "{url}");
            assert!(Homeserver::new_checked(url, None, true).is_ok(), "{url} allowed");
        }
        for url in ["http://127.0.0.1:8008", "http://127.1.2.3", "http://localhost:8008/", "http://[::1]:8008"] {
            assert!(Homeserver::new_checked(url, None, false).is_ok(), "{url}");
        }
        let hs = Homeserver::new_checked("HTTPS://Matrix.Example.org/", None, false).unwrap();
        assert_eq!(hs.base(), "https://matrix.example.org");
        assert_eq!(check_base_url("https://example.org/prefix/", false).unwrap(), "https://example.org/prefix");
        for url in
            ["matrix.example.org", "ftp://example.org", "https://u:p@example.org", "https://x.org/?a=b", "https://"]
        {
            assert!(matches!(check_base_url(url, true), Err(HttpError::BadUrl { .. })), "{url}");
        }
    }

    #[test]
    fn the_error_stays_small() {
        // Clippy's result_large_err draws the line at 128 bytes; callers return it everywhere.
        assert!(std::mem::size_of::<HttpError>() < 128, "{}", std::mem::size_of::<HttpError>());
    }

    #[test]
    fn debug_never_shows_the_token() {
        let hs = Homeserver::new("https://example.org", Some("syt_secret_token".into()));
        let text = format!("{hs:?} {hs:#?}");
        assert!(!text.contains("syt_secret_token"), "{text}");
        assert!(text.contains("https://example.org") && text.contains("redacted"), "{text}");
    }

    #[test]
    fn http_dates_and_retry_hints() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for date in ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"] {
            assert_eq!(parse_http_date(date, now), Some(784_111_777), "{date}");
        }
        for bad in ["", "tomorrow", "Sun, 31 Feb 1994 08:49:37 GMT", "Sun, 06 Nov 1994 24:00:00 GMT", "Sun, 6 Nov 94"] {
            assert_eq!(parse_http_date(bad, now), None, "{bad}");
        }
        // A two-digit year more than 50 years ahead (from 2023) is in the past century.
        assert_eq!(parse_http_date("Tuesday, 01-Jan-80 00:00:00 GMT", now), Some(315_532_800));
        assert_eq!(parse_http_date("Saturday, 01-Jan-50 00:00:00 GMT", now), Some(2_524_608_000));
        let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(retry_after_header("Sun, 06 Nov 1994 08:49:37 GMT", at(784_111_774)), Some(Duration::from_secs(3)));
        assert_eq!(retry_after_header("Sun, 06 Nov 1994 08:49:37 GMT", now), Some(Duration::ZERO));
        assert_eq!(retry_after_header(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after_header("99999999999999999999999", now), Some(Duration::MAX));
        assert_eq!(retry_after_header("-1", now), None);
        assert_eq!(retry_after_body(&json!({"retry_after_ms": 1500})), Some(Duration::from_millis(1500)));
        assert_eq!(retry_after_body(&json!({"retry_after_ms": "soon"})), None);
        let (s1, s3) = (Some(Duration::from_secs(1)), Some(Duration::from_secs(3)));
        assert_eq!((server_wait(s3, s1), server_wait(s1, s3), server_wait(None, s1)), (s3, s3, s1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn whoami_names_the_user_and_device_of_the_token() {
        let fake = Fake::new(vec![
            reply(200, r#"{"user_id":"@a:x","device_id":"DEV"}"#),
            reply(200, r#"{"user_id":"@bot:x"}"#),
            reply(200, r#"{}"#),
        ])
        .await;
        let hs = Homeserver::new(&fake.url, Some("tok".into()));
        assert_eq!(hs.whoami().await.unwrap(), ("@a:x".to_owned(), Some("DEV".to_owned())));
        assert_eq!(hs.whoami().await.unwrap(), ("@bot:x".to_owned(), None));
        assert!(matches!(hs.whoami().await, Err(HttpError::Malformed(_))));
        let seen = fake.seen();
        assert_eq!(seen[0].path(), "/_matrix/client/v3/account/whoami");
        assert!(seen[0].head.to_ascii_lowercase().contains("authorization: bearer tok"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn forever_does_not_give_up() {
        let mut replies = vec![reply(502, "{}"); 12];
        replies.push(reply(200, r#"{"versions":["v1.11"]}"#));
        let fake = Fake::new(replies).await;
        let hs = Homeserver::new(&fake.url, None).with_retry(Retry {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
            ..Retry::forever()
        });
        hs.versions().await.unwrap();
        assert_eq!(fake.seen().len(), 13);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn resilient_sync_reports_unreachable_then_back() {
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let fake =
            Fake::later(addr, Duration::from_millis(200), vec![reply(503, "{}"), reply(200, r#"{"next_batch":"s1"}"#)]);
        // One attempt only: the resilient call ignores the limit.
        let hs = Homeserver::new(&fake.url, Some("tok".into())).with_retry(Retry {
            attempts: 1,
            initial: Duration::from_millis(20),
            max: Duration::from_millis(40),
        });
        let mut states = Vec::new();
        let v = hs.sync_resilient(Some("s0"), "f", 0, |s| states.push(s)).await.unwrap();
        assert_eq!(v["next_batch"], "s1");
        assert!(states.len() >= 3, "{states:?}");
        let Connectivity::Unreachable { since, failures: 1, .. } = &states[0] else { panic!("{states:?}") };
        assert!(states[0].to_string().contains("homeserver unreachable"), "{}", states[0]);
        for (i, s) in states[..states.len() - 1].iter().enumerate() {
            let Connectivity::Unreachable { since: same, failures, retry_in, .. } = s else { panic!("{states:?}") };
            assert_eq!((same, *failures as usize), (since, i + 1));
            assert!(*retry_in >= Duration::from_millis(20) && *retry_in <= Duration::from_millis(40));
        }
        let Some(Connectivity::Unreachable { reason, .. }) = states.get(states.len() - 2) else { panic!() };
        assert!(reason.contains("503"), "{reason}");
        let Some(Connectivity::Back { since: back_since, down_for }) = states.last() else { panic!("{states:?}") };
        assert_eq!(back_since, since);
        assert!(*down_for >= Duration::from_millis(200));
        assert!(states.last().unwrap().to_string().contains("back"));
        let seen = fake.seen();
        assert_eq!(seen.len(), 2);
        assert!(seen[1].path().contains("since=s0"));
        // No outage, no reports.
        let fake = Fake::new(vec![reply(200, r#"{"next_batch":"s2"}"#)]).await;
        let hs = Homeserver::new(&fake.url, Some("tok".into()));
        let mut states = Vec::new();
        hs.sync_resilient(None, "f", 0, |s| states.push(s)).await.unwrap();
        assert!(states.is_empty());
    }

    #[test]
    fn server_names_and_hostnames() {
        assert_eq!(server_name_of("@alice:example.org:8448"), Some("example.org:8448"));
        assert_eq!(server_name_of("alice:example.org"), None);
        assert_eq!(server_name_of("@alice"), None);
        assert_eq!(hostname_of("example.org"), Some("example.org"));
        assert_eq!(hostname_of("example.org:8448"), Some("example.org"));
        assert_eq!(hostname_of("1.2.3.4:80"), Some("1.2.3.4"));
        assert_eq!(hostname_of("[::1]:8448"), Some("[::1]"));
        assert_eq!(hostname_of("[::1]"), Some("[::1]"));
        for bad in ["", ":80", "example.org:", "example.org:123456", "evil.org/x", "a@b.org", "[::1", "[x]", "a b"] {
            assert_eq!(hostname_of(bad), None, "{bad}");
        }
    }

    async fn discovery(replies: impl FnOnce(&str) -> Vec<Reply>) -> (Result<String, HttpError>, Vec<String>, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = Fake::start(listener, replies(&url));
        let result = discover_from("example.org", &fake.url, false).await;
        (result, fake.seen().iter().map(|s| s.path().to_owned()).collect(), url)
    }

    fn failure(r: &Result<String, HttpError>) -> Option<DiscoveryFailure> {
        match r {
            Err(HttpError::Discovery { failure, .. }) => Some(*failure),
            _ => None,
        }
    }

    const VERSIONS: &str = r#"{"versions":["v1.11","v1.12"]}"#;
    const WELL_KNOWN: &str = "/.well-known/matrix/client";
    const VERSIONS_PATH: &str = "/_matrix/client/versions";

    #[tokio::test(flavor = "current_thread")]
    async fn discovery_follows_a_valid_well_known_file() {
        let (r, paths, url) = discovery(|url| {
            vec![reply(200, json!({"m.homeserver": {"base_url": format!("{url}/")}}).to_string()), reply(200, VERSIONS)]
        })
        .await;
        assert_eq!(r.unwrap(), url);
        assert_eq!(paths, [WELL_KNOWN, VERSIONS_PATH]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn discovery_fails_with_an_error_on_a_bad_base_url() {
        // Not a URL: FAIL_ERROR, and no guess.
        let (r, paths, _) = discovery(|_| vec![reply(200, r#"{"m.homeserver":{"base_url":"not a url"}}"#)]).await;
        assert_eq!(failure(&r), Some(DiscoveryFailure::Error), "{r:?}");
        assert_eq!(paths, [WELL_KNOWN]);
        // A URL that is no homeserver: FAIL_ERROR.
        let (r, paths, _) = discovery(|url| {
            vec![
                reply(200, json!({"m.homeserver": {"base_url": url}}).to_string()),
                reply(404, "{}"),
                reply(200, VERSIONS),
            ]
        })
        .await;
        assert_eq!(failure(&r), Some(DiscoveryFailure::Error), "{r:?}");
        assert_eq!(paths, [WELL_KNOWN, VERSIONS_PATH]);
        // Versions that are not a list of versions: FAIL_ERROR.
        let (r, _, _) = discovery(|url| {
            vec![reply(200, json!({"m.homeserver": {"base_url": url}}).to_string()), reply(200, r#"{"versions":7}"#)]
        })
        .await;
        assert_eq!(failure(&r), Some(DiscoveryFailure::Error), "{r:?}");
        // Plain http to another machine: FAIL_ERROR, not contacted.
        let (r, paths, _) =
            discovery(|_| vec![reply(200, r#"{"m.homeserver":{"base_url":"http://matrix.example.org"}}"#)]).await;
        assert_eq!(failure(&r), Some(DiscoveryFailure::Error), "{r:?}");
        assert!(r.unwrap_err().to_string().contains("http://"));
        assert_eq!(paths, [WELL_KNOWN]);
        // An identity server whose base_url is not a URL.
        let (r, _, _) = discovery(|url| {
            vec![reply(
                200,
                json!({"m.homeserver": {"base_url": url}, "m.identity_server": {"base_url": "?"}}).to_string(),
            )]
        })
        .await;
        assert_eq!(failure(&r), Some(DiscoveryFailure::Error), "{r:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn discovery_without_a_well_known_file_tries_the_server_name() {
        // 404: IGNORE, then the default, which is a homeserver.
        let (r, paths, url) = discovery(|_| vec![reply(404, "{}"), reply(200, VERSIONS)]).await;
        assert_eq!(r.unwrap(), url);
        assert_eq!(paths, [WELL_KNOWN, VERSIONS_PATH]);
        // The default is not a homeserver: ask the user.
        let (r, paths, _) = discovery(|_| vec![reply(404, "{}"), reply(404, "{}")]).await;
        assert_eq!(failure(&r), Some(DiscoveryFailure::Prompt), "{r:?}");
        assert_eq!(paths, [WELL_KNOWN, VERSIONS_PATH]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn discovery_asks_the_user_on_invalid_data_without_guessing() {
        let cases = [
            reply(500, "{}"),
            reply(200, ""),
            reply(200, "<html>"),
            reply(200, "[1]"),
            reply(200, r#"{"m.homeserver":{}}"#),
            reply(200, r#"{"m.homeserver":{"base_url":7}}"#),
        ];
        for case in cases {
            let body = case.body.clone();
            let (r, paths, _) = discovery(|_| vec![case, reply(200, VERSIONS)]).await;
            assert_eq!(failure(&r), Some(DiscoveryFailure::Prompt), "{body}: {r:?}");
            assert_eq!(paths, [WELL_KNOWN], "{body}: no guess");
        }
        // An identity server without a base_url.
        let (r, _, _) = discovery(|url| {
            vec![reply(200, json!({"m.homeserver": {"base_url": url}, "m.identity_server": {}}).to_string())]
        })
        .await;
        assert_eq!(failure(&r), Some(DiscoveryFailure::Prompt), "{r:?}");
        // Not a server name: no request at all.
        let r = discover("evil.org/x?").await;
        assert_eq!(failure(&r), Some(DiscoveryFailure::Prompt), "{r:?}");
    }
}
