//! The input of the traffic mapping: one inference-table row as the collector read it.
//!
//! It exists so that `traffic` depends on plain data only (no SQL, no HTTP): the collector
//! builds an [`Execution`] from a row, and [`super::map_execution`] turns it into Akto records.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::json::JsonString;

/// Which inference-table schema a row came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFormat {
    /// AI Gateway `_payload` table (`request_time`, `execution_duration_ms`, ...).
    AiGateway,
    /// Legacy auto-capture table (`timestamp_ms`, `execution_time_ms`, `request_metadata`).
    Legacy,
}

/// One agent execution (one row of an inference table). SQL NULLs are `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    /// Full table name `catalog.schema.table` the row was read from.
    pub table: String,
    /// Schema flavour of that table.
    pub format: TableFormat,
    /// `databricks_request_id`.
    pub request_id: String,
    /// `client_request_id`, when the caller set one.
    pub client_request_id: Option<String>,
    /// `request_time` (AI Gateway) or `timestamp_ms` (legacy).
    pub request_time: DateTime<Utc>,
    /// `status_code`.
    pub status_code: Option<i64>,
    /// `execution_duration_ms` (AI Gateway) or `execution_time_ms` (legacy).
    pub duration_ms: Option<i64>,
    /// Raw request text: usually JSON, but may be anything, and may be huge. Kept as the JSON
    /// literal it was read as: it goes into the record without being decoded.
    pub request: Option<JsonString>,
    /// Raw response text, like `request`.
    pub response: Option<JsonString>,
    /// `logging_error_codes`, e.g. `MAX_REQUEST_SIZE_EXCEEDED`.
    pub logging_error_codes: Vec<String>,
    /// `served_entity_id`.
    pub served_entity_id: Option<String>,
    /// `requester` (a user or service principal).
    pub requester: Option<String>,
    /// `request_metadata` of legacy tables (endpoint name, model name and version).
    pub request_metadata: Option<BTreeMap<String, String>>,
}

/// Who an execution belongs to, as the mapping needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentContext<'a> {
    /// Agent name shown in the tag `ai-agent`.
    pub agent: &'a str,
    /// The Akto collection: `crate::discovery::Inventory::agent_host` (unique among the agents).
    pub host: &'a str,
    /// The invocation path: the value of [`super::invocation_path`].
    pub path: &'a str,
    /// `akto_account_id`, e.g. `"1000000"`.
    pub account_id: &'a str,
}
