//! Credentials for the workspace: OAuth M2M for a service principal, or a personal access token.
//!
//! The OAuth token is cached and refreshed early (stale at `min(TTL/2, 20 min)` before expiry,
//! as the official SDKs do). One refresh at a time: concurrent requests wait on the same lock and
//! share the new token. A 401 from an API call invalidates the cached token so the next request
//! re-authenticates once.
//!
//! A secret read from a file (`DATABRICKS_CLIENT_SECRET_FILE`, `DATABRICKS_TOKEN_FILE`) is read
//! again when it is needed next (an OAuth token fetch; a PAT at most every
//! [`PAT_RECHECK`], and at once after a 401), so a rotated secret is picked up without a restart.

use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::error::{status_and_code, ConnectKind, DatabricksError};
use super::http::{classify_transport_error, ApiErrorBody};
use crate::secret_file::SecretFile;

/// How the connector proves who it is.
pub enum Credentials {
    /// A service principal's OAuth client id and secret (machine-to-machine).
    OAuth {
        client_id: String,
        client_secret: SecretString,
    },
    /// A personal access token.
    Pat(SecretString),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::OAuth { client_id, .. } => f
                .debug_struct("OAuth")
                .field("client_id", client_id)
                .field("client_secret", &"[redacted]")
                .finish(),
            Credentials::Pat(_) => f.write_str("Pat([redacted])"),
        }
    }
}

impl Credentials {
    /// The principal named in GRANT statements: the client id, or a placeholder for a PAT.
    pub fn principal(&self) -> String {
        match self {
            Credentials::OAuth { client_id, .. } => client_id.clone(),
            Credentials::Pat(_) => "<the token's user or service principal>".to_string(),
        }
    }
}

struct Cached {
    token: SecretString,
    /// When a new token is fetched (well before expiry).
    stale_at: Instant,
    /// When the workspace stops accepting this one.
    expires_at: Instant,
}

/// After a failed refresh, how long a still valid token is used before the next attempt: the
/// requests queued behind the failed one do not each repeat it.
const REFRESH_RETRY: Duration = Duration::from_secs(30);

/// The token request's route in the API request counters.
const TOKEN_ROUTE: &str = "POST /oidc/v1/token";

/// How often a personal access token read from a file is looked at again.
pub const PAT_RECHECK: Duration = Duration::from_secs(30);

/// The longest a token is taken to live, whatever `expires_in` says (Databricks issues them for
/// an hour): a huge value from a broken endpoint must not overflow the clock.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// When a token fetched at `started` with `expires_in` (seconds; an hour when absent) is
/// refreshed, and when it expires. The lifetime is capped at [`MAX_TOKEN_TTL`].
fn token_times(started: Instant, expires_in: Option<u64>) -> (Instant, Instant) {
    let ttl = Duration::from_secs(expires_in.unwrap_or(3600)).min(MAX_TOKEN_TTL);
    let early = (ttl / 2).min(Duration::from_secs(20 * 60));
    let expires_at = started.checked_add(ttl).unwrap_or(started);
    let stale_at = started
        .checked_add(ttl.saturating_sub(early))
        .unwrap_or(started);
    (stale_at, expires_at)
}

/// `text` with every occurrence of a secret replaced, for an error message (an answer echoing
/// the request must not carry it into a log).
pub(crate) fn redact(text: &str, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|s| s.len() >= 4)
        .fold(text.to_string(), |t, s| t.replace(s, "[redacted]"))
}

/// Hands out bearer tokens, fetching and caching them as needed.
pub struct TokenSource {
    credentials: Credentials,
    token_url: String,
    cached: Mutex<Option<Cached>>,
    /// Held by the one caller fetching a new token; the cache is never locked across a fetch.
    refreshing: Mutex<()>,
    secret_file: Option<SecretFile>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize, Default)]
struct TokenError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl TokenSource {
    pub fn new(credentials: Credentials, host: &url::Url) -> Self {
        let base = host.as_str().trim_end_matches('/');
        TokenSource {
            credentials,
            token_url: format!("{base}/oidc/v1/token"),
            cached: Mutex::new(None),
            refreshing: Mutex::new(()),
            secret_file: None,
        }
    }

    /// The secret (the OAuth client secret, or the PAT) came from `path`, the file of setting
    /// `variable`: it is read again when needed, so a rotated secret is picked up.
    pub fn reread_secret_from(&mut self, path: std::path::PathBuf, variable: &'static str) {
        let initial = match &self.credentials {
            Credentials::OAuth { client_secret, .. } => client_secret.clone(),
            Credentials::Pat(token) => token.clone(),
        };
        self.secret_file = Some(SecretFile::new(path, variable, initial));
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The setting the secret came from: `DATABRICKS_TOKEN` or `DATABRICKS_CLIENT_SECRET`, or
    /// the `_FILE` variable of the file it is read from.
    fn secret_setting(&self) -> &'static str {
        match (&self.secret_file, &self.credentials) {
            (Some(f), _) => f.variable(),
            (None, Credentials::Pat(_)) => "DATABRICKS_TOKEN",
            (None, Credentials::OAuth { .. }) => "DATABRICKS_CLIENT_SECRET",
        }
    }

    /// The fix for refused OAuth client credentials; `secret_kind` adds that the secret must be
    /// a Databricks OAuth secret (the usual mistake on Azure).
    fn oauth_fix(&self, secret_kind: bool) -> String {
        let setting = self.secret_setting();
        let mut fix = format!(
            "check DATABRICKS_CLIENT_ID and {setting}: the service principal must exist and be \
             enabled in this workspace, and its OAuth secret must not be expired (secrets should \
             be rotated every 90 days)"
        );
        if secret_kind {
            fix.push_str(&format!(
                "; {setting} must be a Databricks OAuth secret: on Azure an Entra ID client \
                 secret is refused here, generate a Databricks OAuth secret for the service \
                 principal in the account console (service principal > Secrets)"
            ));
        }
        fix
    }

    /// An API call refused the credentials (`answer`: what it answered, e.g. a 401, or a 403
    /// refusing the token): the error and its fix name them by kind, never their value.
    pub(crate) fn refused(&self, answer: &str) -> DatabricksError {
        let setting = self.secret_setting();
        match &self.credentials {
            Credentials::Pat(_) => DatabricksError::Auth {
                detail: format!("{setting} was refused: {answer}"),
                fix: format!(
                    "the token is expired, revoked or not a token of this workspace ({}): create \
                     a new one (in the workspace: Settings > Developer > Access tokens) and set it \
                     in {setting}",
                    self.host_label()
                ),
            },
            Credentials::OAuth { client_id, .. } => DatabricksError::Auth {
                detail: format!("the OAuth token of client id {client_id} was refused: {answer}"),
                fix: self.oauth_fix(false),
            },
        }
    }

    /// A valid bearer token, fetching a new one when the cached one is stale.
    /// Token requests are counted in `stats` (route `POST /oidc/v1/token`) like every API call.
    pub async fn token(
        &self,
        http: &reqwest::Client,
        stats: &super::http::ApiStats,
    ) -> Result<SecretString, DatabricksError> {
        let (client_id, client_secret) = match &self.credentials {
            Credentials::Pat(token) => {
                return Ok(match &self.secret_file {
                    Some(f) => f.current(PAT_RECHECK),
                    None => token.clone(),
                })
            }
            Credentials::OAuth {
                client_id,
                client_secret,
            } => (client_id, client_secret),
        };
        if let Some(t) = self.cached_token(|c| c.stale_at).await {
            return Ok(t);
        }
        // One refresh at a time. While it runs, a token still valid serves the other callers
        // (refreshes start well before expiry); without one, they wait for the refresh.
        let _refresh = match self.refreshing.try_lock() {
            Ok(g) => g,
            Err(_) => {
                if let Some(t) = self.cached_token(|c| c.expires_at).await {
                    return Ok(t);
                }
                self.refreshing.lock().await
            }
        };
        // Another caller may have refreshed while this one waited.
        if let Some(t) = self.cached_token(|c| c.stale_at).await {
            return Ok(t);
        }
        let client_secret = match &self.secret_file {
            Some(f) => f.read().0,
            None => client_secret.clone(),
        };
        let fetched = self.fetch(http, stats, client_id, &client_secret).await;
        let mut cached = self.cached.lock().await;
        match fetched {
            Ok(fresh) => {
                let token = fresh.token.clone();
                *cached = Some(fresh);
                Ok(token)
            }
            // The refresh failed while the token in hand is still valid: go on with it, and
            // try again a little later.
            Err(e) => {
                match cached.as_mut() {
                    Some(c) if Instant::now() < c.expires_at => {
                        tracing::warn!(
                        "refreshing the OAuth token failed ({e}); the current token stays valid \
                         for {}s and is used meanwhile",
                        c.expires_at.saturating_duration_since(Instant::now()).as_secs()
                    );
                        c.stale_at = (Instant::now() + REFRESH_RETRY).min(c.expires_at);
                        Ok(c.token.clone())
                    }
                    _ => Err(e),
                }
            }
        }
    }

    /// The cached token while `now` is before the instant `until` picks (its refresh time, or
    /// its expiry).
    async fn cached_token(&self, until: impl Fn(&Cached) -> Instant) -> Option<SecretString> {
        let cached = self.cached.lock().await;
        cached
            .as_ref()
            .filter(|c| Instant::now() < until(c))
            .map(|c| c.token.clone())
    }

    /// Forget the cached token (after a 401), unless another request already replaced it.
    pub async fn invalidate(&self, used: &SecretString) {
        if let (Credentials::Pat(_), Some(f)) = (&self.credentials, &self.secret_file) {
            // The PAT itself was refused: read its file again before the retry.
            f.recheck();
        }
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.token.expose_secret() == used.expose_secret() {
                *cached = None;
            }
        }
    }

    async fn fetch(
        &self,
        http: &reqwest::Client,
        stats: &super::http::ApiStats,
        client_id: &str,
        client_secret: &SecretString,
    ) -> Result<Cached, DatabricksError> {
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{client_id}:{}", client_secret.expose_secret()));
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let sent = http
                .post(&self.token_url)
                .header("authorization", format!("Basic {basic}"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body("grant_type=client_credentials&scope=all-apis")
                .send()
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) if e.is_builder() => {
                    return Err(super::http::request_not_built("POST /oidc/v1/token", &e))
                }
                Err(e) => {
                    stats.record(TOKEN_ROUTE, "error");
                    let (kind, detail) = classify_transport_error(&e);
                    if attempt < 4 && kind != ConnectKind::Dns && kind != ConnectKind::Tls {
                        tokio::time::sleep(Duration::from_millis(250 * 2u64.pow(attempt))).await;
                        continue;
                    }
                    return Err(DatabricksError::Connect {
                        host: self.host_label(),
                        kind,
                        detail,
                    });
                }
            };
            let status = resp.status();
            stats.record(TOKEN_ROUTE, status.as_str());
            let server_wait = super::http::retry_after(resp.headers());
            let backoff = Duration::from_millis(250 * 2u64.pow(attempt));
            let body = match resp.text().await {
                Ok(b) => b,
                // The answer was cut off: a network failure, retried like one.
                Err(e) if attempt < 4 => {
                    tracing::debug!("token response cut off ({e}), retrying");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                Err(e) => {
                    return Err(DatabricksError::Connect {
                        host: self.host_label(),
                        kind: ConnectKind::Other,
                        detail: format!("the token response was cut off: {e}"),
                    })
                }
            };
            if status.is_success() {
                let parsed: TokenResponse =
                    serde_json::from_str(&body).map_err(|e| DatabricksError::Decode {
                        route: "/oidc/v1/token".into(),
                        detail: format!("token response is not the documented JSON: {e}"),
                    })?;
                let (stale_at, expires_at) = token_times(started, parsed.expires_in);
                return Ok(Cached {
                    token: SecretString::from(parsed.access_token),
                    stale_at,
                    expires_at,
                });
            }
            let retriable = status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE;
            if retriable && attempt < 5 && started.elapsed() < Duration::from_secs(60) {
                // The server's Retry-After (capped at 30 s), never shorter than the backoff.
                let wait =
                    server_wait.map_or(backoff, |w| w.min(Duration::from_secs(30)).max(backoff));
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(self.token_refused(status, &body, client_id, client_secret));
        }
    }

    /// The error for a token request answered `status` (not a success, retries done): the
    /// answer's own words (an OAuth `error` or a Databricks `error_code`/`message`, else the start
    /// of the body), and a fix that fits it. "Invalid client credentials" only for an OAuth
    /// `invalid_client`/`unauthorized_client` or a 401.
    fn token_refused(
        &self,
        status: StatusCode,
        body: &str,
        client_id: &str,
        client_secret: &SecretString,
    ) -> DatabricksError {
        // The whole body redacted first: a secret echoed across the cut of a long body would
        // leave a part of it otherwise.
        let secret = client_secret.expose_secret();
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("{client_id}:{secret}"));
        let body = redact(body, &[secret, &basic]);
        let oauth: TokenError = serde_json::from_str(&body).unwrap_or_default();
        let oauth_named = !oauth.error.is_empty();
        let (code, message) = if oauth_named {
            (oauth.error, oauth.error_description)
        } else {
            ApiErrorBody::parse(&body)
        };
        // Again once decoded: JSON may have written an echoed secret with escapes (`\/`).
        let message = redact(message.trim(), &[secret, &basic]);
        let code = redact(&code, &[secret, &basic]);
        let answered = format!(
            "the token endpoint {} answered HTTP {}{}",
            self.token_url,
            status_and_code(status.as_u16(), &code),
            if message.is_empty() {
                String::new()
            } else {
                format!(": {}", message.trim_end_matches('.'))
            }
        );
        match status.as_u16() {
            404 => DatabricksError::Connect {
                host: self.host_label(),
                kind: ConnectKind::Other,
                detail: format!(
                    "{} answered 404: this does not look like a Databricks workspace",
                    self.token_url
                ),
            },
            400 | 401 | 403 => {
                let bad_client = matches!(code.as_str(), "invalid_client" | "unauthorized_client")
                    || status == StatusCode::UNAUTHORIZED;
                if bad_client {
                    DatabricksError::Auth {
                        detail: format!(
                            "invalid client credentials for client id {client_id}: {answered}"
                        ),
                        fix: self.oauth_fix(true),
                    }
                } else if status == StatusCode::FORBIDDEN && !oauth_named {
                    // Not an OAuth answer: refused before the credentials were looked at.
                    DatabricksError::Auth {
                        detail: format!(
                            "the token request for client id {client_id} was refused: {answered}"
                        ),
                        fix: format!(
                            "a 403 that is not an OAuth answer is most often given before the \
                             credentials are checked: by an IP access list of the workspace that \
                             does not allow this machine's address, or by a proxy or firewall on \
                             the way (HTTPS_PROXY/NO_PROXY are honoured); if neither applies, {}",
                            self.oauth_fix(false)
                        ),
                    }
                } else {
                    DatabricksError::Auth {
                        detail: format!(
                            "the token request for client id {client_id} was refused: {answered}"
                        ),
                        fix: self.oauth_fix(false),
                    }
                }
            }
            code_num => DatabricksError::Api {
                route: "/oidc/v1/token".into(),
                status: code_num,
                error_code: code,
                message,
            },
        }
    }

    fn host_label(&self) -> String {
        self.token_url
            .trim_end_matches("/oidc/v1/token")
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{token_times, Credentials, TokenSource, MAX_TOKEN_TTL};
    use crate::databricks::{ApiStats, DatabricksError};

    const SECRET: &str = "the-client-secret-4711";

    /// A token endpoint on 127.0.0.1 that answers every request `status` with `body`.
    async fn token_endpoint(status: u16, body: &'static str) -> url::Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    // Read the request's head and its (short) body, then answer and close.
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !String::from_utf8_lossy(&seen).contains("grant_type") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        url::Url::parse(&format!("http://{addr}")).unwrap()
    }

    /// Asks `host` for a token with the OAuth test credentials.
    async fn fetch(host: &url::Url) -> Result<(), DatabricksError> {
        let source = TokenSource::new(
            Credentials::OAuth {
                client_id: "sp-1234".into(),
                client_secret: SECRET.to_string().into(),
            },
            host,
        );
        source
            .token(&reqwest::Client::new(), &ApiStats::default())
            .await
            .map(|_| ())
    }

    #[test]
    fn a_huge_expires_in_is_capped_instead_of_overflowing_the_clock() {
        let now = Instant::now();
        let (stale, expires) = token_times(now, Some(u64::MAX));
        assert_eq!(expires - now, MAX_TOKEN_TTL);
        assert!(stale < expires && stale > now);
        // The usual hour: refreshed 20 minutes early; a missing expires_in is taken as an hour.
        let (stale, expires) = token_times(now, Some(3600));
        assert_eq!(
            (stale - now, expires - now),
            (Duration::from_secs(2400), Duration::from_secs(3600))
        );
        assert_eq!(token_times(now, None), token_times(now, Some(3600)));
    }

    #[tokio::test]
    async fn a_token_answer_with_a_huge_expires_in_is_used() {
        let host = token_endpoint(
            200,
            r#"{"access_token":"tok","token_type":"Bearer","expires_in":18446744073709551615}"#,
        )
        .await;
        fetch(&host).await.unwrap();
    }

    #[tokio::test]
    async fn invalid_client_is_called_so_and_names_the_databricks_oauth_secret() {
        let host = token_endpoint(
            401,
            r#"{"error":"invalid_client","error_description":"Client authentication failed."}"#,
        )
        .await;
        let err = fetch(&host).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DatabricksError::Auth { .. }), "{msg}");
        assert!(
            msg.contains("invalid client credentials for client id sp-1234")
                && msg.contains("HTTP 401 invalid_client: Client authentication failed. Fix:"),
            "{msg}"
        );
        assert!(
            msg.contains("Databricks OAuth secret") && msg.contains("Entra ID"),
            "{msg}"
        );
    }

    /// A 400 the OAuth server names (not a client error) keeps its name and is not called a wrong
    /// secret.
    #[tokio::test]
    async fn another_oauth_refusal_is_not_called_invalid_credentials() {
        let host = token_endpoint(
            400,
            r#"{"error":"invalid_scope","error_description":"scope all-apis is not allowed"}"#,
        )
        .await;
        let msg = fetch(&host).await.unwrap_err().to_string();
        assert!(
            msg.contains("HTTP 400 invalid_scope: scope all-apis is not allowed"),
            "{msg}"
        );
        assert!(!msg.contains("invalid client credentials"), "{msg}");
    }

    /// A 403 page that is no JSON (a proxy's): its start is kept, the secret it echoes is not,
    /// and the fix names IP access lists and proxies.
    #[tokio::test]
    async fn a_403_that_is_not_oauth_keeps_the_body_start_and_names_ip_access_lists() {
        let host = token_endpoint(
            403,
            "<html>Blocked by proxy policy for the-client-secret-4711</html>",
        )
        .await;
        let err = fetch(&host).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("HTTP 403: <html>Blocked by proxy policy"),
            "{msg}"
        );
        assert!(
            msg.contains("IP access list") && msg.contains("proxy"),
            "{msg}"
        );
        assert!(!msg.contains("invalid client credentials"), "{msg}");
        assert!(!msg.contains(SECRET) && !format!("{err:?}").contains(SECRET));
    }

    /// A server error (not retried by the token fetch) keeps the Databricks error body's words.
    #[tokio::test]
    async fn a_server_error_keeps_the_databricks_message() {
        let host = token_endpoint(
            500,
            r#"{"error_code":"INTERNAL_ERROR","message":"token service is down"}"#,
        )
        .await;
        let err = fetch(&host).await.unwrap_err();
        assert!(err.is_retriable(), "{err}");
        let DatabricksError::Api {
            status,
            error_code,
            message,
            ..
        } = &err
        else {
            panic!("an API error expected: {err:?}")
        };
        assert_eq!(
            (*status, error_code.as_str(), message.as_str()),
            (500, "INTERNAL_ERROR", "token service is down")
        );
    }

    /// A refused personal access token names DATABRICKS_TOKEN (or its file), never the OAuth
    /// settings.
    #[test]
    fn a_refused_pat_is_named_by_its_setting() {
        let host = url::Url::parse("https://ws.example").unwrap();
        let mut source = TokenSource::new(Credentials::Pat("dapi-x".to_string().into()), &host);
        let msg = source
            .refused("GET /x answered 403: Invalid access token")
            .to_string();
        assert!(
            msg.starts_with("Authentication failed: DATABRICKS_TOKEN was refused: GET /x"),
            "{msg}"
        );
        assert!(!msg.contains("DATABRICKS_CLIENT"), "{msg}");
        source.reread_secret_from("/nonexistent/token".into(), "DATABRICKS_TOKEN_FILE");
        let msg = source.refused("GET /x answered 401").to_string();
        assert!(msg.contains("set it in DATABRICKS_TOKEN_FILE"), "{msg}");
    }
}
