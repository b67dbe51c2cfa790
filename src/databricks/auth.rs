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

use super::error::{ConnectKind, DatabricksError};
use super::http::classify_transport_error;
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
                let ttl = Duration::from_secs(parsed.expires_in.unwrap_or(3600));
                let early = (ttl / 2).min(Duration::from_secs(20 * 60));
                return Ok(Cached {
                    token: SecretString::from(parsed.access_token),
                    stale_at: started + ttl.saturating_sub(early),
                    expires_at: started + ttl,
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
            let err: TokenError = serde_json::from_str(&body).unwrap_or_default();
            let detail = match status.as_u16() {
                400 | 401 | 403 => format!(
                    "the token endpoint {} answered HTTP {} {}{}",
                    self.token_url,
                    status.as_u16(),
                    if err.error.is_empty() {
                        "error"
                    } else {
                        &err.error
                    },
                    if err.error_description.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", err.error_description)
                    }
                ),
                404 => {
                    return Err(DatabricksError::Connect {
                        host: self.host_label(),
                        kind: ConnectKind::Other,
                        detail: format!(
                            "{} answered 404: this does not look like a Databricks workspace",
                            self.token_url
                        ),
                    })
                }
                code => {
                    return Err(DatabricksError::Api {
                        route: "/oidc/v1/token".into(),
                        status: code,
                        error_code: err.error,
                        message: err.error_description,
                    })
                }
            };
            return Err(DatabricksError::Auth {
                detail: format!("invalid client credentials for client id {client_id}: {detail}"),
            });
        }
    }

    fn host_label(&self) -> String {
        self.token_url
            .trim_end_matches("/oidc/v1/token")
            .to_string()
    }
}
