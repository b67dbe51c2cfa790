//! SQL warehouses and the Statement Execution API: how table rows are read.
//!
//! A statement is submitted with a short `wait_timeout`; if it outlasts that, it is polled until it
//! ends or the connector's own statement timeout passes, in which case it is cancelled (and the
//! caller retries next cycle). Results are INLINE JSON_ARRAY chunks, fetched one at a time so a
//! large result is never held whole: callers page with their queries and stream chunks.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::{DatabricksClient, DatabricksError};
use crate::json::JsonString;

/// A SQL warehouse.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Warehouse {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub warehouse_type: Option<String>,
    #[serde(default)]
    pub enable_serverless_compute: Option<bool>,
}

#[derive(Deserialize)]
struct WarehouseList {
    #[serde(default)]
    warehouses: Vec<Warehouse>,
}

/// A named parameter marker value (`:name` in the statement).
#[derive(Debug, Clone, Serialize)]
pub struct Param {
    pub name: String,
    pub value: Option<String>,
    #[serde(rename = "type")]
    pub type_name: &'static str,
}

impl Param {
    pub fn new(name: impl Into<String>, value: impl Into<String>, type_name: &'static str) -> Self {
        Param {
            name: name.into(),
            value: Some(value.into()),
            type_name,
        }
    }
}

/// One statement to run.
#[derive(Debug, Clone)]
pub struct Statement {
    pub warehouse_id: String,
    pub statement: String,
    pub parameters: Vec<Param>,
    /// The table it reads, for error messages and GRANT fixes.
    pub table: String,
    /// Give up (and cancel) after this long.
    pub timeout: Duration,
}

/// A result cell: every non-null value is a string; SQL NULL is `None`. A string is kept as the
/// JSON literal the result page held ([`JsonString`]): a payload goes into its Akto record
/// without being decoded and escaped again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell(pub Option<JsonString>);

impl Cell {
    /// The decoded text (borrowed when it has no escapes), `None` for NULL.
    pub fn text(&self) -> Option<Cow<'_, str>> {
        self.0.as_ref().map(JsonString::text)
    }

    /// The decoded text, moved out (the cell is NULL afterwards).
    pub fn take_text(&mut self) -> Option<String> {
        self.0.take().map(JsonString::into_text)
    }

    /// The literal, moved out (the cell is NULL afterwards).
    pub fn take_literal(&mut self) -> Option<JsonString> {
        self.0.take()
    }

    /// Bytes of the value as the page held it (escaped, without quotes); 4 for NULL.
    pub fn wire_len(&self) -> usize {
        self.0.as_ref().map_or(4, JsonString::escaped_len)
    }
}

impl<'de> Deserialize<'de> for Cell {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::json::deserialize_literal(d).map(Cell)
    }
}

pub type Row = Vec<Cell>;

#[derive(Debug, Clone, Deserialize)]
pub struct ResultColumn {
    pub name: String,
    #[serde(default)]
    pub type_name: Option<String>,
    #[serde(default)]
    pub position: Option<usize>,
}

#[derive(Deserialize, Default)]
struct ResultSchema {
    #[serde(default)]
    columns: Vec<ResultColumn>,
}

#[derive(Deserialize, Default)]
struct Manifest {
    #[serde(default)]
    schema: ResultSchema,
    #[serde(default)]
    truncated: Option<bool>,
}

#[derive(Deserialize, Default)]
struct ChunkData {
    #[serde(default)]
    data_array: Vec<Row>,
    #[serde(default)]
    next_chunk_index: Option<i64>,
    #[serde(default)]
    next_chunk_internal_link: Option<String>,
}

#[derive(Deserialize, Default)]
struct StatusError {
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize, Default)]
struct StatementStatus {
    #[serde(default)]
    state: String,
    #[serde(default)]
    error: Option<StatusError>,
}

#[derive(Deserialize)]
struct StatementResponse {
    statement_id: String,
    #[serde(default)]
    status: StatementStatus,
    #[serde(default)]
    manifest: Option<Manifest>,
    #[serde(default)]
    result: Option<ChunkData>,
}

/// `byte_limit` of every statement: below the 25 MiB cap of INLINE results.
pub const INLINE_BYTE_LIMIT: usize = 20 << 20;

/// The rows of a finished statement, read chunk by chunk.
pub struct Rows {
    client: DatabricksClient,
    /// The table the statement reads, for errors.
    table: String,
    pub statement_id: String,
    pub columns: Vec<ResultColumn>,
    pub truncated: bool,
    pending: Option<Vec<Row>>,
    next_link: Option<String>,
}

impl Rows {
    /// The index of a column by name (case-insensitive), if the result has it.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(name))
    }

    /// The next chunk of rows, or None at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<Row>>, DatabricksError> {
        if let Some(rows) = self.pending.take() {
            return Ok(Some(rows));
        }
        let Some(link) = self.next_link.take() else {
            return Ok(None);
        };
        let chunk: ChunkData = self
            .client
            .api
            .request(
                Method::GET,
                "GET /api/2.0/sql/statements/{id}/result/chunks/{n}",
                &link,
                &[],
                None,
            )
            .await
            .map_err(|e| vanished(e, &self.table, &self.statement_id))?;
        self.next_link = next_link(&self.statement_id, &chunk);
        Ok(Some(chunk.data_array))
    }

    /// Reads every remaining chunk (for small results).
    pub async fn collect_all(mut self) -> Result<Vec<Row>, DatabricksError> {
        let mut out = Vec::new();
        while let Some(mut chunk) = self.next_chunk().await? {
            out.append(&mut chunk);
        }
        Ok(out)
    }
}

/// A statement the warehouse no longer knows (results expired, warehouse or workspace restarted
/// while it ran) is not a configuration problem: the table is read again next cycle.
fn vanished(e: DatabricksError, table: &str, statement_id: &str) -> DatabricksError {
    match e {
        DatabricksError::NotFound {
            error_code,
            message,
            ..
        } => DatabricksError::Statement {
            table: table.to_string(),
            state: "GONE".into(),
            error_code,
            message: format!(
                "statement {statement_id} disappeared while its results were read ({message}); \
                 the table is read again next cycle"
            ),
            retriable: true,
        },
        other => other,
    }
}

fn next_link(statement_id: &str, chunk: &ChunkData) -> Option<String> {
    chunk.next_chunk_internal_link.clone().or_else(|| {
        chunk
            .next_chunk_index
            .map(|n| format!("/api/2.0/sql/statements/{statement_id}/result/chunks/{n}"))
    })
}

impl DatabricksClient {
    /// All SQL warehouses.
    pub async fn list_warehouses(&self) -> Result<Vec<Warehouse>, DatabricksError> {
        let list: WarehouseList = self
            .api
            .request(
                Method::GET,
                "GET /api/2.0/sql/warehouses",
                "/api/2.0/sql/warehouses",
                &[],
                None,
            )
            .await?;
        Ok(list.warehouses)
    }

    /// Picks the warehouse to use: the configured one, else a running one (serverless first),
    /// else any serverless one, else the first. Returns it with the reason, for the log.
    pub async fn choose_warehouse(
        &self,
        configured: Option<&str>,
    ) -> Result<(Warehouse, String), DatabricksError> {
        let all = self.list_warehouses().await.map_err(|e| match e {
            DatabricksError::PermissionDenied { detail, .. } => DatabricksError::PermissionDenied {
                object: "SQL warehouses".into(),
                detail,
                fix: "give the service principal CAN USE on a SQL warehouse and set DATABRICKS_WAREHOUSE_ID to its id".into(),
            },
            other => other,
        })?;
        if let Some(id) = configured {
            return all
                .into_iter()
                .find(|w| w.id == id)
                .map(|w| (w, "set by DATABRICKS_WAREHOUSE_ID".to_string()))
                .ok_or_else(|| {
                    DatabricksError::NoWarehouse(format!(
                        "DATABRICKS_WAREHOUSE_ID={id} is not a SQL warehouse this service principal can see; \
                         list them in the workspace (SQL > SQL Warehouses) and grant CAN USE"
                    ))
                });
        }
        let running = |w: &Warehouse| w.state.as_deref() == Some("RUNNING");
        let serverless = |w: &Warehouse| w.enable_serverless_compute == Some(true);
        let pick = all
            .iter()
            .find(|w| running(w) && serverless(w))
            .map(|w| (w, "running, serverless"))
            .or_else(|| all.iter().find(|w| running(w)).map(|w| (w, "running")))
            .or_else(|| {
                all.iter()
                    .find(|w| serverless(w))
                    .map(|w| (w, "serverless, will start on first query"))
            })
            .or_else(|| {
                all.first()
                    .map(|w| (w, "the only kind available, will start on first query"))
            });
        match pick {
            Some((w, why)) => Ok((w.clone(), why.to_string())),
            None => Err(DatabricksError::NoWarehouse(
                "the workspace has no SQL warehouse this service principal can use: create one (a small \
                 serverless warehouse is enough) and grant the service principal CAN USE on it"
                    .into(),
            )),
        }
    }

    /// Runs a statement to completion and returns its rows as a chunk stream.
    pub async fn execute(&self, st: &Statement) -> Result<Rows, DatabricksError> {
        let started = Instant::now();
        let body = serde_json::json!({
            "warehouse_id": st.warehouse_id,
            "statement": st.statement,
            "parameters": st.parameters,
            "wait_timeout": "10s",
            "on_wait_timeout": "CONTINUE",
            "disposition": "INLINE",
            "format": "JSON_ARRAY",
            // Under the 25 MiB INLINE cap: a page of large rows comes back `truncated` (and is
            // continued from its last row) instead of failing the statement.
            "byte_limit": INLINE_BYTE_LIMIT,
        });
        let mut resp: StatementResponse = self
            .api
            .request(
                Method::POST,
                "POST /api/2.0/sql/statements",
                "/api/2.0/sql/statements",
                &[],
                Some(&body),
            )
            .await?;
        let mut delay = Duration::from_millis(100);
        loop {
            match resp.status.state.as_str() {
                "SUCCEEDED" => break,
                "PENDING" | "RUNNING" => {
                    if started.elapsed() + delay > st.timeout {
                        self.cancel(&resp.statement_id).await;
                        return Err(DatabricksError::Statement {
                            table: st.table.clone(),
                            state: "TIMED OUT".into(),
                            error_code: "STATEMENT_TIMEOUT".into(),
                            message: format!(
                                "still {} after {}s (STATEMENT_TIMEOUT_SECONDS); cancelled, retried next cycle. \
                                 A larger or running warehouse makes this faster",
                                resp.status.state,
                                st.timeout.as_secs()
                            ),
                            retriable: true,
                        });
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    resp = self
                        .api
                        .request(
                            Method::GET,
                            "GET /api/2.0/sql/statements/{id}",
                            &format!("/api/2.0/sql/statements/{}", resp.statement_id),
                            &[],
                            None,
                        )
                        .await
                        .map_err(|e| vanished(e, &st.table, &resp.statement_id))?;
                }
                state => return Err(self.statement_error(st, state, resp.status.error)),
            }
        }
        let manifest = resp.manifest.unwrap_or_default();
        let first = resp.result.unwrap_or_default();
        let next_link = next_link(&resp.statement_id, &first);
        Ok(Rows {
            client: self.clone(),
            table: st.table.clone(),
            statement_id: resp.statement_id,
            columns: manifest.schema.columns,
            truncated: manifest.truncated.unwrap_or(false),
            pending: Some(first.data_array),
            next_link,
        })
    }

    fn statement_error(
        &self,
        st: &Statement,
        state: &str,
        error: Option<StatusError>,
    ) -> DatabricksError {
        let error = error.unwrap_or_default();
        let code = error.error_code.unwrap_or_default();
        let message = error.message.unwrap_or_default();
        let lower = message.to_lowercase();
        if code == "PERMISSION_DENIED"
            || lower.contains("permission")
            || lower.contains("insufficient_permissions")
        {
            return DatabricksError::PermissionDenied {
                object: format!("table {}", st.table),
                detail: format!("{code}: {message}"),
                fix: format!(
                    "`GRANT SELECT ON TABLE {} TO `{}`;` (or SELECT on its schema), and CAN USE on the SQL warehouse",
                    st.table,
                    self.principal()
                ),
            };
        }
        DatabricksError::Statement {
            table: st.table.clone(),
            state: state.to_string(),
            error_code: code,
            message,
            // A cancelled or closed statement can be run again; bad SQL cannot.
            retriable: state != "FAILED",
        }
    }

    /// Best-effort cancel of a running statement.
    pub async fn cancel(&self, statement_id: &str) {
        let r: Result<String, _> = self
            .api
            .request_text(
                Method::POST,
                "POST /api/2.0/sql/statements/{id}/cancel",
                &format!("/api/2.0/sql/statements/{statement_id}/cancel"),
                &[],
                None,
            )
            .await;
        if let Err(e) = r {
            tracing::warn!("could not cancel statement {statement_id}: {e}");
        }
    }
}
