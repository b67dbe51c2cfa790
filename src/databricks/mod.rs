//! The Databricks workspace, as the connector sees it: authentication, HTTP with retries, and one
//! small module per REST API (Unity Catalog, Model Serving, SQL statements).
//!
//! Architecture Invariant: this module knows nothing of Akto, agents or state. It returns the
//! documented shapes (tolerating missing optional fields) and one error type,
//! [`DatabricksError`], that says whether a retry can help and how an operator fixes it.

pub mod auth;
pub mod error;
pub mod http;
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
        let http = reqwest::Client::builder()
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
        self.api.tokens.token(&self.api.http).await.map(|_| ())
    }

    /// Request counters by route and status.
    pub fn stats(&self) -> Arc<ApiStats> {
        self.api.stats.clone()
    }
}
