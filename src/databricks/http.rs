//! The HTTP layer: authenticated JSON requests with the official SDKs' retry rules.
//!
//! Retried: 429, 503, bodies whose `error_code` is `RESOURCE_EXHAUSTED`, `REQUEST_LIMIT_EXCEEDED`
//! or `TEMPORARILY_UNAVAILABLE`, and connection errors (refused, reset, timeout). `Retry-After`
//! is honoured; otherwise capped exponential backoff with full jitter; all within a bounded total
//! time. Other errors are returned at once. A 401 makes the token source forget its token and the
//! request is re-sent once with a fresh one.
//!
//! A request that is not idempotent ([`Replay::OnlyUnsent`]: `POST /api/2.0/sql/statements`,
//! which starts a statement each time it arrives) is sent again only when it cannot have reached
//! the workspace: the connection could not be made (refused, connect timeout), or the workspace
//! answered 429/503 (or a retriable `error_code`) or 401, i.e. refused it without acting. A
//! connection that breaks after the request was written (reset, dropped, read timeout, a body
//! cut short) is returned as an error instead: the warehouse may already be running the
//! statement, and a second one would run beside it, billed too. Its caller reads the table again
//! next cycle. Databricks gives a statement no client-chosen id, so this is the only safe choice.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng as _;
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::auth::TokenSource;
use super::error::{status_and_code, ConnectKind, DatabricksError};

/// How hard to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Give up retrying after this long in total.
    pub max_elapsed: Duration,
    /// First backoff.
    pub base_delay: Duration,
    /// Largest single backoff (and largest honoured Retry-After).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_elapsed: Duration::from_secs(300),
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)))
            .min(self.max_delay);
        // Full jitter, but never less than a tenth of the step, so retries do not hammer.
        let ms = exp.as_millis().max(1) as u64;
        let jittered = Duration::from_millis(rand::rng().random_range(ms / 10..=ms));
        match retry_after {
            // The server's wait, capped; never shorter than the backoff (`Retry-After: 0` from a
            // server that keeps refusing would otherwise be a busy loop).
            Some(ra) => ra.min(self.max_delay).max(jittered),
            None => jittered,
        }
    }
}

/// Requests made, by route and HTTP status ("error" for transport failures). Read by metrics.
/// Also counts the client's background work (statement starts in flight, which cancel their
/// statement when their caller left; cancels of abandoned statements), so that a process can let
/// it finish before it exits.
#[derive(Default)]
pub struct ApiStats {
    counts: Mutex<BTreeMap<(String, String), u64>>,
    retries: std::sync::atomic::AtomicU64,
    /// The waits chosen before those retries, in milliseconds (what `Retry-After` asked counts).
    retry_wait_ms: std::sync::atomic::AtomicU64,
    background: std::sync::atomic::AtomicU64,
    background_idle: tokio::sync::Notify,
}

/// One piece of background work, counted while it lives (also when its task is dropped).
pub(crate) struct Background(Arc<ApiStats>);

impl Background {
    pub(crate) fn start(stats: &Arc<ApiStats>) -> Background {
        stats
            .background
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Background(stats.clone())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.0
            .background
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.background_idle.notify_waiters();
    }
}

impl ApiStats {
    pub(crate) fn record(&self, route: &str, status: &str) {
        if let Ok(mut m) = self.counts.lock() {
            *m.entry((route.to_string(), status.to_string()))
                .or_default() += 1;
        }
    }
    /// A copy of the counters: ((route, status), count).
    pub fn snapshot(&self) -> Vec<((String, String), u64)> {
        self.counts
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }
    /// Total requests made.
    pub fn total(&self) -> u64 {
        self.snapshot().iter().map(|(_, n)| n).sum()
    }
    /// Retries performed.
    pub fn retries(&self) -> u64 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// The waits chosen before retries, added up: the backoffs and the honoured `Retry-After`
    /// delays (not the time they took, which the scheduler may stretch).
    pub fn retry_wait(&self) -> Duration {
        Duration::from_millis(
            self.retry_wait_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }
    /// Background work in flight: statement starts, cancels of abandoned statements.
    pub fn background(&self) -> u64 {
        self.background.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Waits until no background work is in flight, or `limit` passed; returns what is left.
    pub async fn settle_background(&self, limit: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.background_idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let left = self.background();
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.background();
            }
        }
    }
}

/// Whether a failed request may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// Idempotent (reads, cancels): retried on every transient failure.
    Always,
    /// Not idempotent (starts something): retried only when it cannot have reached the server.
    OnlyUnsent,
}

/// The documented error body (`error_code` + `message`; older APIs use `error`). Some answers
/// carry the HTTP status as a number in `error_code` (`{"error_code": 403, "message": "Invalid
/// access token."}`): it is read as text.
#[derive(Deserialize, Default)]
pub(crate) struct ApiErrorBody {
    #[serde(default, deserialize_with = "code_text")]
    pub error_code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub error: Option<serde_json::Value>,
}

/// `error_code` as a string, or a number written as text; anything else is no code.
fn code_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    })
}

/// Whether a 403 refuses the token itself (invalid, expired or about to expire), as the
/// workspace answers for a bad PAT or an expired OAuth token: `Invalid access token.`,
/// `JWT has expired`, `Token is expiring within 30 seconds. (token expired)`. Such a 403 is an
/// authentication failure, not a missing grant.
pub(crate) fn refuses_token(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("invalid access token")
        || m.contains("token expired")
        || m.contains("jwt has expired")
        || m.contains("token is expiring")
        || m.contains("invalid token")
}

impl ApiErrorBody {
    pub(crate) fn parse(body: &str) -> (String, String) {
        let parsed: ApiErrorBody = serde_json::from_str(body).unwrap_or_default();
        let code = parsed
            .error_code
            .or_else(|| match &parsed.error {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let mut message = parsed.message.unwrap_or_default();
        if message.is_empty() {
            message = body.chars().take(300).collect();
        }
        (code, message)
    }
}

/// Sorts a transport error into one of the "cannot connect" kinds, with a readable detail.
pub(crate) fn classify_transport_error(e: &reqwest::Error) -> (ConnectKind, String) {
    let mut chain = e.to_string();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        src = s.source();
    }
    // Sorted on the error's own words, not on its URL (a schema named `dns_logs` or a page
    // token holding "tls" must not make a dropped connection a DNS or TLS failure).
    let mut lower = chain.to_lowercase();
    if let Some(url) = e.url() {
        lower = lower.replace(&url.as_str().to_lowercase(), "<url>");
    }
    let closed = [
        "connection reset",
        "close_notify",
        "broken pipe",
        "unexpected eof",
        "connection closed",
        "connection aborted",
        "incompletemessage",
        "incomplete message",
    ];
    let kind = if e.is_timeout() {
        ConnectKind::Timeout
    } else if closed.iter().any(|w| lower.contains(w)) {
        // A connection the peer closed (an idle keep-alive dropped by a load balancer, which
        // rustls reports as a missing close_notify): transient, whatever layer noticed it.
        ConnectKind::Refused
    } else if lower.contains("dns error") || lower.contains("failed to lookup address") {
        ConnectKind::Dns
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        ConnectKind::Tls
    } else if lower.contains("refused") || lower.contains("reset") || e.is_connect() {
        ConnectKind::Refused
    } else {
        ConnectKind::Other
    };
    (kind, chain)
}

/// A request reqwest could not build (`is_builder()`): permanent. Almost always the credential:
/// a token holding a character not allowed in an HTTP header (a line break inside it).
pub(crate) fn request_not_built(route: &str, e: &reqwest::Error) -> DatabricksError {
    let (_, chain) = classify_transport_error(e);
    if chain.to_lowercase().contains("header") {
        DatabricksError::Auth {
            detail: format!(
                "the request {route} could not be built ({chain}): the token or secret holds a \
                 character not allowed in an HTTP header (e.g. a line break inside it), so \
                 nothing was sent"
            ),
            fix: "set DATABRICKS_TOKEN / DATABRICKS_CLIENT_SECRET (or their _FILE) to the \
                  secret alone, on one line"
                .into(),
        }
    } else {
        DatabricksError::Api {
            route: route.to_string(),
            status: 0,
            error_code: "REQUEST_NOT_BUILT".into(),
            message: format!("the request could not be built, nothing was sent: {chain}"),
        }
    }
}

fn is_retriable_code(code: &str) -> bool {
    matches!(
        code,
        "RESOURCE_EXHAUSTED" | "REQUEST_LIMIT_EXCEEDED" | "TEMPORARILY_UNAVAILABLE"
    )
}

/// `Retry-After` in seconds, or as an HTTP date (RFC 9110: `Wed, 21 Oct 2026 07:28:00 GMT`).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let wait = at.signed_duration_since(chrono::Utc::now());
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// The authenticated HTTP client every Databricks API module uses.
pub struct ApiClient {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) tokens: TokenSource,
    pub(crate) retry: RetryPolicy,
    pub(crate) stats: Arc<ApiStats>,
}

impl ApiClient {
    /// `route` is a low-cardinality label such as `GET /api/2.1/unity-catalog/tables`.
    pub(crate) async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        route: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
    ) -> Result<T, DatabricksError> {
        self.request_with(method, route, path, query, body, Replay::Always)
            .await
    }

    /// [`ApiClient::request`] with an explicit [`Replay`] rule.
    pub(crate) async fn request_with<T: DeserializeOwned>(
        &self,
        method: Method,
        route: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
        replay: Replay,
    ) -> Result<T, DatabricksError> {
        // Parsed from the body bytes: a large statement page is not copied into a String first.
        let raw = self
            .request_raw(method, route, path, query, body, replay)
            .await?;
        serde_json::from_slice(&raw).map_err(|e| DatabricksError::Decode {
            route: route.to_string(),
            detail: format!("response is not the documented JSON: {e}"),
        })
    }

    pub(crate) async fn request_text(
        &self,
        method: Method,
        route: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
    ) -> Result<String, DatabricksError> {
        let raw = self
            .request_raw(method, route, path, query, body, Replay::Always)
            .await?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    async fn request_raw(
        &self,
        method: Method,
        route: &str,
        path: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
        replay: Replay,
    ) -> Result<bytes::Bytes, DatabricksError> {
        let url = format!("{}{}", self.base, path);
        let started = Instant::now();
        let mut attempt: u32 = 0;
        let mut reauthenticated = false;
        loop {
            attempt += 1;
            let token = self.tokens.token(&self.http, &self.stats).await?;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token.expose_secret());
            if !query.is_empty() {
                req = req.query(query);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let (status, text, headers) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let headers = resp.headers().clone();
                    match resp.bytes().await {
                        Ok(t) => (status, t, headers),
                        Err(e) => {
                            self.stats.record(route, "error");
                            // The workspace answered: it received the request.
                            if replay == Replay::OnlyUnsent {
                                return Err(self.not_replayed(route, &e));
                            }
                            if let Some(d) = self.retry_delay(started, attempt, None) {
                                tracing::debug!(
                                    route,
                                    attempt,
                                    "reading the response failed, retrying: {e}"
                                );
                                tokio::time::sleep(d).await;
                                continue;
                            }
                            let (kind, detail) = classify_transport_error(&e);
                            return Err(DatabricksError::Connect {
                                host: self.base.clone(),
                                kind,
                                detail,
                            });
                        }
                    }
                }
                Err(e) if e.is_builder() => {
                    // Never left this process, and the same request cannot be built next time
                    // either: not a network error, not retried.
                    self.stats.record(route, "error");
                    return Err(request_not_built(route, &e));
                }
                Err(e) => {
                    self.stats.record(route, "error");
                    let (kind, detail) = classify_transport_error(&e);
                    let transient = !matches!(kind, ConnectKind::Dns | ConnectKind::Tls);
                    // Only a connection never made is sure not to have carried the request.
                    if transient && replay == Replay::OnlyUnsent && !e.is_connect() {
                        return Err(self.not_replayed(route, &e));
                    }
                    if transient {
                        if let Some(d) = self.retry_delay(started, attempt, None) {
                            tracing::debug!(route, attempt, "{kind}, retrying in {d:?}");
                            tokio::time::sleep(d).await;
                            continue;
                        }
                    }
                    return Err(DatabricksError::Connect {
                        host: self.base.clone(),
                        kind,
                        detail,
                    });
                }
            };
            self.stats.record(route, status.as_str());
            if status.is_success() {
                return Ok(text);
            }
            // The body may echo the request (a proxy's or firewall's error page showing its
            // headers): the token never goes into an error.
            let body =
                super::auth::redact(&String::from_utf8_lossy(&text), &[token.expose_secret()]);
            let (code, message) = ApiErrorBody::parse(&body);
            let token_refused = status == StatusCode::UNAUTHORIZED
                || (status == StatusCode::FORBIDDEN && refuses_token(&message));
            if token_refused && !reauthenticated {
                // The token may have expired or been revoked mid-run: get a new one, once.
                reauthenticated = true;
                self.tokens.invalidate(&token).await;
                tracing::info!(
                    route,
                    "Databricks refused the token (HTTP {}); re-authenticating once",
                    status.as_u16()
                );
                continue;
            }
            let retriable = status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE
                || is_retriable_code(&code);
            if retriable {
                if let Some(d) = self.retry_delay(started, attempt, retry_after(&headers)) {
                    tracing::debug!(
                        route,
                        attempt,
                        status = status.as_u16(),
                        "retrying in {d:?}"
                    );
                    tokio::time::sleep(d).await;
                    continue;
                }
                return Err(DatabricksError::Exhausted {
                    route: route.to_string(),
                    status: status.as_u16(),
                    error_code: code,
                    message,
                    attempts: attempt,
                    elapsed_s: started.elapsed().as_secs(),
                });
            }
            if token_refused {
                let said = message.trim().trim_end_matches('.');
                return Err(self.tokens.refused(&format!(
                    "{route} answered {}{}{said}",
                    status_and_code(status.as_u16(), &code),
                    if said.is_empty() { "" } else { ": " },
                )));
            }
            return Err(match status.as_u16() {
                403 => DatabricksError::PermissionDenied {
                    object: route.to_string(),
                    detail: if status_and_code(403, &code) == "403" {
                        message
                    } else {
                        format!("{code}: {message}")
                    },
                    fix: "grant the service principal access to this API".into(),
                },
                404 => DatabricksError::NotFound {
                    object: route.to_string(),
                    error_code: code,
                    message,
                    fix: "check the configured names".into(),
                },
                s => DatabricksError::Api {
                    route: route.to_string(),
                    status: s,
                    error_code: code,
                    message,
                },
            });
        }
    }

    /// A non-idempotent request whose connection broke after it was sent: not sent again.
    fn not_replayed(&self, route: &str, e: &reqwest::Error) -> DatabricksError {
        let (kind, detail) = classify_transport_error(e);
        DatabricksError::Connect {
            host: self.base.clone(),
            kind,
            detail: format!(
                "{detail}; the connection broke after {route} was sent, so it is not sent again \
                 (the workspace may already be running it, and a second one would run beside \
                 it): the next cycle tries again"
            ),
        }
    }

    /// The delay before the next attempt, or None when the retry budget is spent.
    fn retry_delay(
        &self,
        started: Instant,
        attempt: u32,
        after: Option<Duration>,
    ) -> Option<Duration> {
        let d = self.retry.backoff(attempt, after);
        if started.elapsed() + d > self.retry.max_elapsed {
            return None;
        }
        self.stats
            .retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.retry_wait_ms.fetch_add(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::databricks::{ClientOptions, Credentials, DatabricksClient, DatabricksError};

    /// The workspace refuses a bad PAT or an expired OAuth token with 403 and the status as a
    /// number in `error_code`: both are read, and such a 403 is about the token, not a grant.
    #[test]
    fn a_403_refusing_the_token_is_read_and_told_apart_from_a_missing_grant() {
        let (code, message) = super::ApiErrorBody::parse(
            r#"{"error_code": 403, "message": "Invalid access token."}"#,
        );
        assert_eq!(
            (code.as_str(), message.as_str()),
            ("403", "Invalid access token.")
        );
        assert!(super::refuses_token(&message));
        assert!(super::refuses_token(
            "Token is expiring within 30 seconds. (token expired)"
        ));
        assert!(super::refuses_token("JWT has expired"));
        assert!(!super::refuses_token(
            "User does not have USE CATALOG on Catalog 'main'."
        ));
        let (code, _) =
            super::ApiErrorBody::parse(r#"{"error_code": "PERMISSION_DENIED", "message": "no"}"#);
        assert_eq!(code, "PERMISSION_DENIED");
    }

    /// A token that cannot be a header value fails at once as an authentication problem: no
    /// retry, no "network error" (the host is a closed loopback port: nothing is ever sent).
    #[tokio::test]
    async fn a_request_that_cannot_be_built_is_not_retried() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(9);
        let host = url::Url::parse(&format!("http://127.0.0.1:{closed}")).unwrap();
        let options = ClientOptions {
            retry: super::RetryPolicy {
                max_elapsed: Duration::from_secs(30),
                base_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(5),
            },
            ..ClientOptions::default()
        };
        let client = DatabricksClient::new(
            &host,
            Credentials::Pat("dapi-line\nbreak-secret".to_string().into()),
            options,
        )
        .unwrap();
        let err = client.list_warehouses().await.unwrap_err();
        assert!(matches!(err, DatabricksError::Auth { .. }), "{err}");
        assert!(!err.is_retriable());
        let text = err.to_string();
        assert!(text.contains("not allowed in an HTTP header"), "{text}");
        assert!(!text.contains("break-secret"), "{text}");
        assert_eq!(client.stats().retries(), 0);
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_a_date_and_never_makes_a_busy_loop() {
        let headers = |v: &str| {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::RETRY_AFTER, v.parse().unwrap());
            h
        };
        assert_eq!(
            super::retry_after(&headers("7")),
            Some(Duration::from_secs(7))
        );
        let later = super::retry_after(&headers("Wed, 21 Oct 2099 07:28:00 GMT")).unwrap();
        assert!(later > Duration::from_secs(3600), "{later:?}");
        assert_eq!(
            super::retry_after(&headers("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(super::retry_after(&headers("soon")), None);
        // A Retry-After longer than the backoff is waited exactly (up to the cap).
        let fast = super::RetryPolicy {
            max_elapsed: Duration::from_secs(10),
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(1500),
        };
        for attempt in 1..4 {
            assert_eq!(
                fast.backoff(attempt, Some(Duration::from_secs(1))),
                Duration::from_secs(1)
            );
            assert!(fast.backoff(attempt, None) <= Duration::from_millis(80));
        }
        let policy = super::RetryPolicy::default();
        for attempt in 1..5 {
            // `Retry-After: 0` waits the backoff at least (a tenth of its step at worst)...
            let d = policy.backoff(attempt, Some(Duration::ZERO));
            assert!(d >= Duration::from_millis(50), "{d:?}");
            // ...and a far date is capped.
            assert_eq!(policy.backoff(attempt, Some(later)), policy.max_delay);
        }
    }
}
