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
        "Failed to connect to Databricks workspace {host} ({kind}): {detail}. Fix: check that \
         DATABRICKS_HOST is your workspace URL (https://<workspace>.cloud.databricks.com), that its \
         name resolves (DNS), that a firewall or proxy lets this machine reach it on port 443 \
         (HTTPS_PROXY/NO_PROXY are honoured), and that its TLS certificate is trusted (behind a \
         TLS-inspecting proxy, set DATABRICKS_CA_BUNDLE to the PEM file of its CA)"
    )]
    Connect {
        host: String,
        kind: ConnectKind,
        detail: String,
    },
    /// Troubleshooting case 2.
    #[error(
        "Authentication failed: {detail}. Fix: check DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET \
         (or DATABRICKS_TOKEN): the service principal must exist and be enabled in this workspace, \
         and its OAuth secret must not be expired (secrets should be rotated every 90 days)"
    )]
    Auth { detail: String },
    /// Troubleshooting case 3.
    #[error("Access denied to {object}: {detail}. Fix: {fix}")]
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
    #[error("Databricks kept answering {status} {error_code} for {route} after {attempts} attempts over {elapsed_s}s: {message}")]
    Exhausted {
        route: String,
        status: u16,
        error_code: String,
        message: String,
        attempts: u32,
        elapsed_s: u64,
    },
    /// Any other API error.
    #[error("Databricks API error on {route}: HTTP {status} {error_code}: {message}")]
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
}
