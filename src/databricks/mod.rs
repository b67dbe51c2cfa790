//! The Databricks workspace, as the connector sees it: authentication, HTTP with retries, and one
//! small module per REST API (Unity Catalog, Model Serving, SQL statements).
//!
//! Architecture Invariant: this module knows nothing of Akto, agents or state. It returns the
//! documented shapes (tolerating missing optional fields) and one error type,
//! [`DatabricksError`], that says whether a retry can help and how an operator fixes it.

pub mod apps;
pub mod auth;
pub mod error;
pub mod http;
pub mod mlflow;
pub mod serving;
pub mod sql;
pub mod unity_catalog;

use std::sync::Arc;
use std::time::Duration;

pub use auth::Credentials;
pub use error::{grants_fix, ConnectKind, DatabricksError};
pub use http::{ApiStats, RetryPolicy};

use auth::TokenSource;
use http::ApiClient;

/// Settings of the client that tests and operators may tune.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
        }
    }
}

/// The certificates of a PEM bundle; an error (naming the fix) when it holds none.
pub fn parse_ca_bundle(pem: &[u8]) -> Result<Vec<reqwest::Certificate>, String> {
    match reqwest::Certificate::from_pem_bundle(pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(
            "no PEM certificate in the file: give a CA bundle (-----BEGIN CERTIFICATE-----)".into(),
        ),
        Err(e) => Err(format!("not a PEM certificate bundle ({e})")),
    }
}

/// A cheap-to-clone handle on one workspace.
#[derive(Clone)]
pub struct DatabricksClient {
    pub(crate) api: Arc<ApiClient>,
}

impl DatabricksClient {
    /// Builds the client. Makes no request.
    pub fn new(
        host: &url::Url,
        credentials: Credentials,
        options: ClientOptions,
    ) -> Result<Self, DatabricksError> {
        Self::with_ca_bundle(host, credentials, options, None)
    }

    /// Builds the client, also trusting the CA certificates of a PEM bundle (`DATABRICKS_CA_BUNDLE`,
    /// e.g. a corporate TLS-inspecting proxy's). Certificates are always verified; proxies come
    /// from `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` (reqwest's system proxy). Makes no request.
    pub fn with_ca_bundle(
        host: &url::Url,
        credentials: Credentials,
        options: ClientOptions,
        ca_bundle: Option<&std::path::Path>,
    ) -> Result<Self, DatabricksError> {
        let mut builder = reqwest::Client::builder();
        if let Some(path) = ca_bundle {
            let pem = std::fs::read(path).map_err(|e| DatabricksError::Connect {
                host: host.to_string(),
                kind: ConnectKind::Tls,
                detail: format!(
                    "DATABRICKS_CA_BUNDLE {}: cannot be read ({e}); set it to a readable PEM file",
                    path.display()
                ),
            })?;
            let certs = parse_ca_bundle(&pem).map_err(|detail| DatabricksError::Connect {
                host: host.to_string(),
                kind: ConnectKind::Tls,
                detail: format!("DATABRICKS_CA_BUNDLE {}: {detail}", path.display()),
            })?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .https_only(host.scheme() == "https")
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            .user_agent(concat!("databricks-shield/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DatabricksError::Connect {
                host: host.to_string(),
                kind: ConnectKind::Other,
                detail: format!("cannot build the HTTP client: {e}"),
            })?;
        let base = host.as_str().trim_end_matches('/').to_string();
        Ok(DatabricksClient {
            api: Arc::new(ApiClient {
                http,
                tokens: TokenSource::new(credentials, host),
                base,
                retry: options.retry,
                stats: Arc::new(ApiStats::default()),
            }),
        })
    }

    /// The secret of the credentials (OAuth client secret or PAT) came from `path`, the file of
    /// setting `variable`: read it again when a secret is needed, so that a rotated secret is
    /// picked up without a restart. Call before the client is shared.
    pub fn reread_secret_from(mut self, path: std::path::PathBuf, variable: &'static str) -> Self {
        match Arc::get_mut(&mut self.api) {
            Some(api) => api.tokens.reread_secret_from(path, variable),
            None => tracing::warn!(
                "{variable}: the client is already shared, the file will not be read again"
            ),
        }
        self
    }

    /// The workspace base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.api.base
    }

    /// Who the connector is, as named in GRANT statements.
    pub fn principal(&self) -> String {
        self.api.tokens.credentials().principal()
    }

    /// Fetches a token now (OAuth) so that bad credentials fail early and clearly.
    pub async fn authenticate(&self) -> Result<(), DatabricksError> {
        self.api
            .tokens
            .token(&self.api.http, &self.api.stats)
            .await
            .map(|_| ())
    }

    /// Request counters by route and status.
    pub fn stats(&self) -> Arc<ApiStats> {
        self.api.stats.clone()
    }
}

/// The token of a listing's next page: `None` at its end (no token, or an empty one). A token
/// equal to the one just used also ends it, with a WARN: some Databricks list APIs have handed
/// back the last page's token again, and asking on would return that page forever.
pub(crate) fn next_page(route: &str, used: Option<&str>, next: Option<String>) -> Option<String> {
    match next.filter(|t| !t.is_empty()) {
        Some(t) if used == Some(t.as_str()) => {
            tracing::warn!(
                "{route}: the next page token is the one just used; taking the listing as \
                 complete (asking on would return the same page forever)"
            );
            None
        }
        next => next,
    }
}

#[cfg(test)]
mod page_tests {
    use super::next_page;

    #[test]
    fn a_listing_ends_at_no_token_and_at_a_repeated_one() {
        assert_eq!(next_page("r", None, None), None);
        assert_eq!(next_page("r", Some("a"), Some(String::new())), None);
        assert_eq!(
            next_page("r", Some("a"), Some("b".into())).as_deref(),
            Some("b")
        );
        // A repeated token ends the listing (its page is already taken).
        assert_eq!(next_page("GET /x", Some("a"), Some("a".into())), None);
    }

    #[test]
    fn an_unreadable_ca_bundle_is_named_as_such() {
        let Err(e) = super::DatabricksClient::with_ca_bundle(
            &url::Url::parse("https://ws.example").unwrap(),
            super::Credentials::Pat("t".to_string().into()),
            Default::default(),
            Some(std::path::Path::new("/nonexistent/ca.pem")),
        ) else {
            panic!("an unreadable bundle is an error")
        };
        let text = e.to_string();
        assert!(
            text.contains("DATABRICKS_CA_BUNDLE /nonexistent/ca.pem"),
            "{text}"
        );
        assert!(text.contains("cannot be read"), "{text}");
    }
}
