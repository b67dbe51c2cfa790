//! The one error type of the Databricks boundary.
//!
//! Every failure talking to the workspace ends up here, classified two ways: whether a later
//! attempt may succeed (`is_retriable`), and which of the seed documentation's troubleshooting
//! cases it is, with the fix spelled out in the message. No variant ever carries a secret: the
//! HTTP layer builds them from status codes and response bodies only.

use std::fmt;

/// Why a connection to the workspace could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectKind {
    /// The host name does not resolve.
    Dns,
    /// The TCP connection was refused or reset.
    Refused,
    /// TLS failed (certificate not trusted, wrong name, handshake).
    Tls,
    /// No answer in time.
    Timeout,
    /// Anything else on the way (proxy, broken body).
    Other,
}

impl fmt::Display for ConnectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectKind::Dns => "DNS lookup failed",
            ConnectKind::Refused => "connection refused or reset",
            ConnectKind::Tls => "TLS handshake failed",
            ConnectKind::Timeout => "timed out",
            ConnectKind::Other => "network error",
        })
    }
}

/// An error from the Databricks REST API or the way to it.
#[derive(Debug, thiserror::Error)]
pub enum DatabricksError {
    /// Troubleshooting case 1.
    #[error(
        "Failed to connect to Databricks workspace {host} ({kind}): {}. Fix: check that \
         DATABRICKS_HOST is your workspace URL (https://<workspace>.cloud.databricks.com), that its \
         name resolves (DNS), that a firewall or proxy lets this machine reach it on {} \
         (HTTPS_PROXY/NO_PROXY are honoured), and that its TLS certificate is trusted (behind a \
         TLS-inspecting proxy, set DATABRICKS_CA_BUNDLE to the PEM file of its CA)",
        sentence(.detail),
        port_of(.host)
    )]
    Connect {
        host: String,
        kind: ConnectKind,
        detail: String,
    },
    /// Troubleshooting case 2. `fix` depends on the kind of credential (OAuth secret or personal
    /// access token) and on how it was refused: built by the token source
    /// ([`super::auth::TokenSource`]), which knows both.
    #[error("Authentication failed: {}. Fix: {fix}", sentence(.detail))]
    Auth { detail: String, fix: String },
    /// Troubleshooting case 3.
    #[error("Access denied to {object}: {}. Fix: {fix}", sentence(.detail))]
    PermissionDenied {
        object: String,
        detail: String,
        fix: String,
    },
    /// The catalog, schema, table or endpoint does not exist.
    #[error("Not found: {object} ({error_code}: {message}). Fix: {fix}")]
    NotFound {
        object: String,
        error_code: String,
        message: String,
        fix: String,
    },
    /// Rate limited or unavailable, still so when the retry budget ran out.
    #[error(
        "Databricks kept answering {} for {route} after {attempts} attempts over {elapsed_s}s: {message}",
        status_and_code(*.status, .error_code)
    )]
    Exhausted {
        route: String,
        status: u16,
        error_code: String,
        message: String,
        attempts: u32,
        elapsed_s: u64,
    },
    /// Any other API error.
    #[error(
        "Databricks API error on {route}: HTTP {}: {message}",
        status_and_code(*.status, .error_code)
    )]
    Api {
        route: String,
        status: u16,
        error_code: String,
        message: String,
    },
    /// The workspace answered something this connector cannot read.
    #[error("Unexpected response from Databricks on {route}: {detail}")]
    Decode { route: String, detail: String },
    /// A SQL statement ended FAILED or CANCELED, or timed out.
    #[error("SQL statement on {table} {state}: {error_code}: {message}")]
    Statement {
        table: String,
        state: String,
        error_code: String,
        message: String,
        retriable: bool,
    },
    /// No SQL warehouse can run the statements.
    #[error("No usable SQL warehouse: {0}")]
    NoWarehouse(String),
}

impl DatabricksError {
    /// Whether the same request may succeed later (next attempt or next cycle).
    pub fn is_retriable(&self) -> bool {
        match self {
            DatabricksError::Connect { .. } | DatabricksError::Exhausted { .. } => true,
            DatabricksError::Api { status, .. } => *status >= 500 || *status == 429,
            DatabricksError::Statement { retriable, .. } => *retriable,
            DatabricksError::Decode { .. } => false,
            DatabricksError::Auth { .. }
            | DatabricksError::PermissionDenied { .. }
            | DatabricksError::NotFound { .. }
            | DatabricksError::NoWarehouse(_) => false,
        }
    }

    /// A listing refused for good but not for the credentials (403, 404, a decode error): a
    /// listing that only adds to the inventory (serving endpoints, UC functions and models)
    /// costs a WARN then, instead of the cycle. An outage or a refused login stops it.
    pub fn is_listing_refused(&self) -> bool {
        !self.is_retriable() && !matches!(self, DatabricksError::Auth { .. })
    }

    /// A short stable name for metrics and the cycle summary.
    pub fn kind(&self) -> &'static str {
        match self {
            DatabricksError::Connect { .. } => "connect",
            DatabricksError::Auth { .. } => "auth",
            DatabricksError::PermissionDenied { .. } => "permission_denied",
            DatabricksError::NotFound { .. } => "not_found",
            DatabricksError::Exhausted { .. } => "exhausted",
            DatabricksError::Api { .. } => "api",
            DatabricksError::Decode { .. } => "decode",
            DatabricksError::Statement { .. } => "statement",
            DatabricksError::NoWarehouse(_) => "no_warehouse",
        }
    }
}

/// `detail` as the first part of a sentence the message goes on after: without the full stop
/// it may end with (`Invalid access token.` would otherwise print `..`).
fn sentence(detail: &str) -> &str {
    detail.trim_end().trim_end_matches('.')
}

/// "port 8443" for the workspace URL `host`, from its explicit port or its scheme's default
/// (443 for https); a host that is no URL gets the https default named.
fn port_of(host: &str) -> String {
    match url::Url::parse(host)
        .ok()
        .and_then(|u| u.port_or_known_default())
    {
        Some(port) => format!("port {port}"),
        None => "its port (443 for https)".to_string(),
    }
}

/// An HTTP status with the answer's `error_code`, the code left out when it is missing or only
/// repeats the status (`{"error_code": 403, ...}`): `403`, `403 PERMISSION_DENIED`.
pub(crate) fn status_and_code(status: u16, code: &str) -> String {
    let code = code.trim();
    if code.is_empty() || code == status.to_string() {
        status.to_string()
    } else {
        format!("{status} {code}")
    }
}

/// One name part (catalog, schema, table or principal) as a SQL identifier: in backticks, a
/// backtick inside doubled. Unity Catalog accepts names such as `prod-agents` that are valid SQL
/// only quoted, so every statement the connector prints for an operator to paste quotes them.
pub fn quote_ident(part: &str) -> String {
    format!("`{}`", part.replace('`', "``"))
}

/// A dotted name (`catalog.schema.table`) with each part quoted by [`quote_ident`].
pub fn quote_name(full_name: &str) -> String {
    full_name
        .split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

/// The `SHOW GRANTS` / `GRANT` statements that give `principal` what the connector needs, every
/// name quoted ([`quote_ident`]) so that they can be pasted as they are.
pub fn grants_fix(catalog: &str, schema: &str, principal: &str) -> String {
    let c = quote_ident(catalog);
    let s = format!("{c}.{}", quote_ident(schema));
    let p = quote_ident(principal);
    format!(
        "the service principal needs USE CATALOG, USE SCHEMA and SELECT. Check with \
         `SHOW GRANTS {p} ON SCHEMA {s};` and grant with \
         `GRANT USE CATALOG ON CATALOG {c} TO {p}; \
         GRANT USE SCHEMA ON SCHEMA {s} TO {p}; \
         GRANT SELECT ON SCHEMA {s} TO {p};` \
         (Unity Catalog must be enabled for the workspace)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_and_backticks_doubled() {
        assert_eq!(quote_ident("prod-agents"), "`prod-agents`");
        assert_eq!(quote_ident("we`ird"), "`we``ird`");
        assert_eq!(
            quote_name("prod-agents.default.t"),
            "`prod-agents`.`default`.`t`"
        );
    }

    #[test]
    fn grants_fix_quotes_a_hyphenated_catalog() {
        let fix = grants_fix("prod-agents", "ai-apps", "sp-1234");
        for statement in [
            "SHOW GRANTS `sp-1234` ON SCHEMA `prod-agents`.`ai-apps`;",
            "GRANT USE CATALOG ON CATALOG `prod-agents` TO `sp-1234`;",
            "GRANT USE SCHEMA ON SCHEMA `prod-agents`.`ai-apps` TO `sp-1234`;",
            "GRANT SELECT ON SCHEMA `prod-agents`.`ai-apps` TO `sp-1234`;",
        ] {
            assert!(fix.contains(statement), "{statement} missing from {fix}");
        }
        // No unquoted name is left for SQL to misread (`prod - agents`).
        assert!(!fix.contains(" prod-agents"), "{fix}");
    }

    /// The connection advice names the port of the workspace URL, its scheme's default when the
    /// URL has none.
    #[test]
    fn connect_advice_names_the_real_port() {
        let text = |host: &str| {
            DatabricksError::Connect {
                host: host.into(),
                kind: ConnectKind::Refused,
                detail: "connection refused".into(),
            }
            .to_string()
        };
        assert!(text("https://ws.example:8443").contains("reach it on port 8443 "));
        assert!(text("https://ws.example/").contains("reach it on port 443 "));
        assert!(text("http://127.0.0.1:1234").contains("reach it on port 1234 "));
        assert!(text("trace storage").contains("reach it on its port (443 for https)"));
    }

    /// A status repeated as the code is said once; a message's full stop is not doubled.
    #[test]
    fn codes_that_repeat_the_status_and_full_stops_are_not_doubled() {
        assert_eq!(status_and_code(403, "403"), "403");
        assert_eq!(status_and_code(403, ""), "403");
        assert_eq!(
            status_and_code(403, "PERMISSION_DENIED"),
            "403 PERMISSION_DENIED"
        );
        let api = DatabricksError::Api {
            route: "GET /x".into(),
            status: 500,
            error_code: "500".into(),
            message: "boom".into(),
        };
        assert_eq!(
            api.to_string(),
            "Databricks API error on GET /x: HTTP 500: boom"
        );
        let auth = DatabricksError::Auth {
            detail: "Invalid access token.".into(),
            fix: "create a new one".into(),
        };
        assert_eq!(
            auth.to_string(),
            "Authentication failed: Invalid access token. Fix: create a new one"
        );
    }
}
