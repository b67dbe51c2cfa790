//! SQL warehouses and the Statement Execution API: how table rows are read.
//!
//! A statement is submitted with a short `wait_timeout`; if it outlasts that, it is polled until it
//! ends or the connector's own statement timeout passes, in which case it is cancelled (and the
//! caller retries next cycle).
//!
//! With `on_wait_timeout: CONTINUE` a statement runs on (and is billed) until it ends, whoever
//! still waits for it, so every statement this client started and did not see end (`SUCCEEDED`,
//! `FAILED`, `CANCELED`, `CLOSED`) is cancelled (`POST .../{id}/cancel`, best effort): after our
//! statement timeout, after a poll failed for good, after an unknown state, and when the future
//! of [`DatabricksClient::execute`] is dropped (a reader aborted, shutdown, a cycle time limit),
//! by a drop guard that spawns the cancel on the current tokio runtime. The start request itself
//! runs in its own task, so a caller that leaves while it is in flight (it waits up to the
//! `wait_timeout`) still has the statement cancelled once its id arrives. An error path waits for
//! its cancel at most [`CANCEL_INLINE_WAIT`]; the rest runs in the background, bounded by
//! [`CANCEL_BUDGET`] ([`ApiStats::settle_background`](super::ApiStats::settle_background) lets a
//! process finish it before it exits).
//!
//! The start request is never re-sent after its connection broke once sent
//! (`http::Replay::OnlyUnsent`): the warehouse may already be running it, and a second statement
//! would run beside it. Connect failures, 429 and 503 are retried as for every request. A
//! statement whose start answer was lost that way cannot be cancelled (its id never arrived): it
//! runs once, to its end, and the table is read again next cycle.
//!
//! Results are INLINE JSON_ARRAY chunks, fetched one at a time so a large result is never held
//! whole: callers page with their queries and stream chunks.
//!
//! Every statement carries a `byte_limit`; a result larger than that comes back `truncated` (its
//! first rows only). A cut result is never taken for a whole one: [`Rows::collect_all`] refuses
//! it with an error, and readers that can continue (keyset pages) use [`Rows::collect_prefix`],
//! which says it was cut.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::http::{Background, Replay};
use super::{DatabricksClient, DatabricksError};
use crate::json::JsonString;

/// The longest an error path waits for the cancel of its statement before leaving it to a
/// background task.
pub const CANCEL_INLINE_WAIT: Duration = Duration::from_secs(2);
/// The longest a cancel may take in all, its retries included.
pub const CANCEL_BUDGET: Duration = Duration::from_secs(30);

/// A state after which the statement no longer runs.
fn is_terminal(state: &str) -> bool {
    matches!(state, "SUCCEEDED" | "FAILED" | "CANCELED" | "CLOSED")
}

/// Cancels `statement_id` on a background task of the current runtime (if there is one: never
/// panics, also in `Drop`), bounded by [`CANCEL_BUDGET`].
fn cancel_in_background(client: DatabricksClient, statement_id: String) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            let counted = Background::start(&client.api.stats);
            drop(rt.spawn(async move {
                client.cancel(&statement_id).await;
                drop(counted);
            }));
        }
        Err(_) => tracing::warn!(
            "statement {statement_id} was abandoned outside a tokio runtime and could not be \
             cancelled: it runs on the warehouse until it ends (cancel it in SQL > Query History)"
        ),
    }
}

/// A statement this client started and has not seen end: cancelled when dropped while armed.
/// Carries only what the cancel needs.
struct Unfinished {
    client: Option<DatabricksClient>,
    statement_id: String,
}

impl Unfinished {
    fn new(client: &DatabricksClient, statement_id: &str, state: &str) -> Self {
        Unfinished {
            client: (!is_terminal(state)).then(|| client.clone()),
            statement_id: statement_id.to_string(),
        }
    }

    /// It ended (or the warehouse no longer knows it): nothing to cancel.
    fn ended(&mut self) {
        self.client = None;
    }

    /// Cancels it now, waiting at most [`CANCEL_INLINE_WAIT`]; what is left then is finished by
    /// a background task when this is dropped.
    async fn cancel_now(&mut self) {
        let Some(client) = &self.client else { return };
        let attempt =
            tokio::time::timeout(CANCEL_INLINE_WAIT, client.try_cancel(&self.statement_id)).await;
        match attempt {
            Ok(Ok(())) => self.client = None,
            Ok(Err(e)) => {
                self.client = None;
                tracing::warn!("{}", cancel_failed(&self.statement_id, &e.to_string()));
            }
            Err(_) => {} // Still armed: the drop hands it to the background.
        }
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            cancel_in_background(client, std::mem::take(&mut self.statement_id));
        }
    }
}

/// The start request of a statement, running on its own task. Dropped before its answer was
/// taken (the caller left), the statement it started is cancelled: by the task when the answer
/// comes later, by this guard when it is already there.
struct Starting {
    client: DatabricksClient,
    answer: tokio::sync::oneshot::Receiver<Result<StatementResponse, DatabricksError>>,
}

impl Drop for Starting {
    fn drop(&mut self) {
        // From here on the task cannot hand the answer over: it cancels itself. An answer sent
        // before is still here.
        self.answer.close();
        if let Ok(Ok(resp)) = self.answer.try_recv() {
            if !is_terminal(&resp.status.state) {
                cancel_in_background(self.client.clone(), resp.statement_id);
            }
        }
    }
}

fn cancel_failed(statement_id: &str, why: &str) -> String {
    format!(
        "could not cancel SQL statement {statement_id} ({why}); it runs on the warehouse until it \
         ends: if it is long, cancel it in the workspace (SQL > Query History)"
    )
}

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

impl Warehouse {
    /// Being deleted (`DELETING`) or deleted: no statement will run on it. Any other state can
    /// (a stopped warehouse starts on the first statement).
    pub fn is_deleted(&self) -> bool {
        matches!(self.state.as_deref(), Some("DELETING" | "DELETED"))
    }
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

#[derive(Debug, Deserialize, Default)]
struct ResultSchema {
    #[serde(default)]
    columns: Vec<ResultColumn>,
}

#[derive(Debug, Deserialize, Default)]
struct Manifest {
    #[serde(default)]
    schema: ResultSchema,
    #[serde(default)]
    truncated: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
struct ChunkData {
    #[serde(default)]
    data_array: Vec<Row>,
    #[serde(default)]
    next_chunk_index: Option<i64>,
    #[serde(default)]
    next_chunk_internal_link: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct StatusError {
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct StatementStatus {
    #[serde(default)]
    state: String,
    #[serde(default)]
    error: Option<StatusError>,
}

#[derive(Debug, Deserialize)]
struct StatementResponse {
    statement_id: String,
    #[serde(default)]
    status: StatementStatus,
    #[serde(default)]
    manifest: Option<Manifest>,
    #[serde(default)]
    result: Option<ChunkData>,
}

/// `byte_limit` of every statement, so that no INLINE result passes its 25 MiB cap (a statement
/// over it is aborted, with no rows: its table would fail every cycle). The warehouse counts
/// `byte_limit` on its own representation of the rows, the cap on the JSON it sends, where each
/// quote, backslash or line break of a payload takes two bytes: 12 MiB keeps even an all-quote
/// page under the cap.
pub const INLINE_BYTE_LIMIT: usize = 12 << 20;

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

impl std::fmt::Debug for Rows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rows")
            .field("table", &self.table)
            .field("statement_id", &self.statement_id)
            .field("columns", &self.columns.len())
            .field("truncated", &self.truncated)
            .field("more_chunks", &self.next_link.is_some())
            .finish_non_exhaustive()
    }
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
        if self.next_link.as_deref() == Some(link.as_str()) {
            // Reading on would return the same rows forever.
            return Err(DatabricksError::Decode {
                route: self.table.clone(),
                detail: format!(
                    "statement {}: the next result chunk is the one just read",
                    self.statement_id
                ),
            });
        }
        Ok(Some(chunk.data_array))
    }

    /// Reads every remaining chunk of a result that must be whole (for small results): a result
    /// cut at the byte limit (`truncated`) is an error, never a silent prefix. A caller that can
    /// page on (keyset queries) uses [`Rows::collect_prefix`] instead.
    pub async fn collect_all(self) -> Result<Vec<Row>, DatabricksError> {
        if self.truncated {
            return Err(truncated_error(&self.table, &self.statement_id));
        }
        Ok(self.collect_prefix().await?.0)
    }

    /// Reads every remaining chunk and says whether the result was cut at the byte limit: then
    /// the rows are only the first ones of the ordered result, and the caller must read the rest
    /// (page after the last row, or ask for less).
    pub async fn collect_prefix(mut self) -> Result<(Vec<Row>, bool), DatabricksError> {
        let truncated = self.truncated;
        let mut out = Vec::new();
        while let Some(mut chunk) = self.next_chunk().await? {
            out.append(&mut chunk);
        }
        Ok((out, truncated))
    }
}

/// A result that was cut at the statement's byte limit where the caller needs all of it.
fn truncated_error(table: &str, statement_id: &str) -> DatabricksError {
    DatabricksError::Statement {
        table: table.to_string(),
        state: "TRUNCATED".into(),
        error_code: "RESULT_TRUNCATED".into(),
        message: format!(
            "statement {statement_id} returned more than the {} MiB read limit per statement and \
             its result was cut; nothing of it was used. This is a connector bug (the query must \
             be paged): please report it",
            INLINE_BYTE_LIMIT >> 20
        ),
        retriable: false,
    }
}

/// The warehouse to use among `all`: the configured one (an error when it is not listed or is
/// being deleted), else a running one (serverless first), else any serverless one, else the
/// first. Warehouses being deleted are never picked: one would be refused every cycle.
pub fn pick_warehouse(
    all: Vec<Warehouse>,
    configured: Option<&str>,
) -> Result<(Warehouse, String), DatabricksError> {
    if let Some(id) = configured {
        return match all.into_iter().find(|w| w.id == id) {
            Some(w) if w.is_deleted() => Err(DatabricksError::NoWarehouse(format!(
                "DATABRICKS_WAREHOUSE_ID={id} is a SQL warehouse in state {}: no statement can \
                 run on it; set DATABRICKS_WAREHOUSE_ID to another warehouse (SQL > SQL \
                 Warehouses) or leave it unset to let the connector pick one",
                w.state.as_deref().unwrap_or("DELETED")
            ))),
            Some(w) => Ok((w, "set by DATABRICKS_WAREHOUSE_ID".to_string())),
            None => Err(DatabricksError::NoWarehouse(format!(
                "DATABRICKS_WAREHOUSE_ID={id} is not a SQL warehouse this service principal can see; \
                 list them in the workspace (SQL > SQL Warehouses) and grant CAN USE"
            ))),
        };
    }
    let usable: Vec<Warehouse> = all.into_iter().filter(|w| !w.is_deleted()).collect();
    let running = |w: &Warehouse| w.state.as_deref() == Some("RUNNING");
    let serverless = |w: &Warehouse| w.enable_serverless_compute == Some(true);
    let pick = usable
        .iter()
        .find(|w| running(w) && serverless(w))
        .map(|w| (w, "running, serverless"))
        .or_else(|| usable.iter().find(|w| running(w)).map(|w| (w, "running")))
        .or_else(|| {
            usable
                .iter()
                .find(|w| serverless(w))
                .map(|w| (w, "serverless, will start on first query"))
        })
        .or_else(|| {
            usable
                .first()
                .map(|w| (w, "the only kind available, will start on first query"))
        });
    match pick {
        Some((w, why)) => Ok((w.clone(), why.to_string())),
        None => Err(DatabricksError::NoWarehouse(
            "the workspace has no SQL warehouse this service principal can use (none listed, or \
             all being deleted): create one (a small serverless warehouse is enough) and grant \
             the service principal CAN USE on it"
                .into(),
        )),
    }
}

/// A 403 to the request starting a statement: the service principal may see the warehouse (it
/// was listed or configured) but may not use it (no CAN USE). Table grants are not checked at
/// that point (a statement without SELECT fails later, see `statement_error`), so the fix names
/// the warehouse.
fn warehouse_refused(e: DatabricksError, warehouse_id: &str) -> DatabricksError {
    match e {
        DatabricksError::PermissionDenied { detail, .. } => DatabricksError::PermissionDenied {
            object: format!("SQL warehouse {warehouse_id}"),
            detail: format!("POST /api/2.0/sql/statements answered 403: {detail}"),
            fix: format!(
                "give the service principal CAN USE on SQL warehouse {warehouse_id}, or set \
                 DATABRICKS_WAREHOUSE_ID to one it may use"
            ),
        },
        other => other,
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

    /// Picks the warehouse to use ([`pick_warehouse`]) from the listing. Returns it with the
    /// reason, for the log.
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
        pick_warehouse(all, configured)
    }

    /// Runs a statement to completion and returns its rows as a chunk stream. A statement it
    /// started and did not see end is cancelled, also when this future is dropped (module doc).
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
        let resp = self
            .start(st, body)
            .await
            .map_err(|e| warehouse_refused(e, &st.warehouse_id))?;
        let mut open = Unfinished::new(self, &resp.statement_id, &resp.status.state);
        let resp = match self.wait_until_done(st, started, resp, &mut open).await {
            Ok(resp) => resp,
            Err(e) => {
                open.cancel_now().await;
                return Err(e);
            }
        };
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

    /// `POST /api/2.0/sql/statements`, never re-sent once it may have arrived, on a task of its
    /// own so that a caller leaving mid-request still gets the statement cancelled.
    async fn start(
        &self,
        st: &Statement,
        body: serde_json::Value,
    ) -> Result<StatementResponse, DatabricksError> {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return self.post_statement(&body).await;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let client = self.clone();
        let counted = Background::start(&self.api.stats);
        drop(rt.spawn(async move {
            let answer = client.post_statement(&body).await;
            if let Err(Ok(resp)) = tx.send(answer) {
                // The caller left: nobody will poll this statement.
                if !is_terminal(&resp.status.state) {
                    client.cancel(&resp.statement_id).await;
                }
            }
            drop(counted);
        }));
        let mut starting = Starting {
            client: self.clone(),
            answer: rx,
        };
        match (&mut starting.answer).await {
            Ok(answer) => answer,
            Err(_) => Err(DatabricksError::Statement {
                table: st.table.clone(),
                state: "NOT STARTED".into(),
                error_code: "CLIENT_SHUTTING_DOWN".into(),
                message: "the request starting the statement was stopped before it answered \
                          (the process is shutting down); the table is read again next cycle"
                    .into(),
                retriable: true,
            }),
        }
    }

    async fn post_statement(
        &self,
        body: &serde_json::Value,
    ) -> Result<StatementResponse, DatabricksError> {
        self.api
            .request_with(
                Method::POST,
                "POST /api/2.0/sql/statements",
                "/api/2.0/sql/statements",
                &[],
                Some(body),
                Replay::OnlyUnsent,
            )
            .await
    }

    /// Polls until the statement succeeds; `open` is disarmed as soon as it is seen to end.
    async fn wait_until_done(
        &self,
        st: &Statement,
        started: Instant,
        mut resp: StatementResponse,
        open: &mut Unfinished,
    ) -> Result<StatementResponse, DatabricksError> {
        let mut delay = Duration::from_millis(100);
        loop {
            if is_terminal(&resp.status.state) {
                open.ended();
            }
            match resp.status.state.as_str() {
                "SUCCEEDED" => return Ok(resp),
                "PENDING" | "RUNNING" => {
                    let timed_out = |state: &str| {
                        DatabricksError::Statement {
                        table: st.table.clone(),
                        state: "TIMED OUT".into(),
                        error_code: "STATEMENT_TIMEOUT".into(),
                        message: format!(
                            "still {state} after {}s (STATEMENT_TIMEOUT_SECONDS); cancelled, retried next cycle. \
                             A larger or running warehouse makes this faster",
                            st.timeout.as_secs()
                        ),
                        retriable: true,
                    }
                    };
                    if started.elapsed() + delay > st.timeout {
                        return Err(timed_out(&resp.status.state));
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    // A poll that is itself retrying (503s, dropped connections) does not
                    // stretch the statement's time limit either.
                    let left = st.timeout.saturating_sub(started.elapsed());
                    let polled = tokio::time::timeout(
                        left,
                        self.api.request(
                            Method::GET,
                            "GET /api/2.0/sql/statements/{id}",
                            &format!("/api/2.0/sql/statements/{}", resp.statement_id),
                            &[],
                            None,
                        ),
                    )
                    .await
                    .map_err(|_| timed_out(&resp.status.state))?;
                    resp = match polled {
                        Ok(r) => r,
                        Err(e @ DatabricksError::NotFound { .. }) => {
                            // The warehouse no longer knows it: nothing left to cancel.
                            open.ended();
                            return Err(vanished(e, &st.table, &resp.statement_id));
                        }
                        Err(e) => return Err(e),
                    };
                }
                // FAILED, CANCELED, CLOSED; or a state this client does not know (still armed:
                // cancelled, as it may be running).
                state => return Err(self.statement_error(st, state, resp.status.error)),
            }
        }
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
                    "`GRANT SELECT ON TABLE {} TO {};` (or SELECT on its schema), and CAN USE on the SQL warehouse",
                    super::error::quote_name(&st.table),
                    super::error::quote_ident(&self.principal())
                ),
            };
        }
        DatabricksError::Statement {
            table: st.table.clone(),
            state: state.to_string(),
            retriable: state != "FAILED" || failed_transiently(&code),
            error_code: code,
            message,
        }
    }

    /// Best-effort cancel of a statement, bounded by [`CANCEL_BUDGET`]; a failure is logged.
    pub async fn cancel(&self, statement_id: &str) {
        match tokio::time::timeout(CANCEL_BUDGET, self.try_cancel(statement_id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{}", cancel_failed(statement_id, &e.to_string())),
            Err(_) => tracing::warn!(
                "{}",
                cancel_failed(
                    statement_id,
                    &format!("no answer within {}s", CANCEL_BUDGET.as_secs())
                )
            ),
        }
    }

    /// `POST .../{id}/cancel`; a statement the warehouse no longer knows counts as cancelled.
    async fn try_cancel(&self, statement_id: &str) -> Result<(), DatabricksError> {
        let r = self
            .api
            .request_text(
                Method::POST,
                "POST /api/2.0/sql/statements/{id}/cancel",
                &format!("/api/2.0/sql/statements/{statement_id}/cancel"),
                &[],
                None,
            )
            .await;
        match r {
            Ok(_) | Err(DatabricksError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Whether a statement that ended `FAILED` with this `error_code` may succeed when run again: a
/// cancelled or closed statement can, and so can one the warehouse failed for a passing reason
/// (the Statement Execution API's `ServiceErrorCode`s below); bad SQL or a missing table cannot.
fn failed_transiently(code: &str) -> bool {
    matches!(
        code,
        "ABORTED"
            | "CANCELLED"
            | "DEADLINE_EXCEEDED"
            | "INTERNAL_ERROR"
            | "IO_ERROR"
            | "RESOURCE_EXHAUSTED"
            | "SERVICE_UNDER_MAINTENANCE"
            | "TEMPORARILY_UNAVAILABLE"
            | "WORKSPACE_TEMPORARILY_UNAVAILABLE"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service principal that can list a warehouse but has no CAN USE on it gets a 403 to the
    /// statement's start: the error names the warehouse and the two fixes, not "this API".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_statement_refused_with_403_names_the_warehouse_and_the_fix() {
        let emu = databricks_emulator::Emulator::start(databricks_emulator::EmulatorConfig {
            agents: 1,
            rows: 1,
            ..Default::default()
        })
        .await
        .unwrap();
        let cfg = databricks_emulator::EmulatorConfig::default();
        let client = DatabricksClient::new(
            &url::Url::parse(&emu.base_url()).unwrap(),
            crate::databricks::Credentials::OAuth {
                client_id: cfg.client_id.clone(),
                client_secret: cfg.client_secret.clone().into(),
            },
            crate::databricks::ClientOptions::default(),
        )
        .unwrap();
        let warehouse = client.list_warehouses().await.unwrap()[0].id.clone();
        emu.set_faults("route=/api/2.0/sql/statements,method=POST,kind=403,count=1")
            .unwrap();
        let st = Statement {
            warehouse_id: warehouse.clone(),
            statement: "SELECT 1".into(),
            parameters: Vec::new(),
            table: "workspace.default.t".into(),
            timeout: Duration::from_secs(30),
        };
        let err = client.execute(&st).await.expect_err("refused");
        assert!(
            matches!(&err, DatabricksError::PermissionDenied { object, .. }
                if *object == format!("SQL warehouse {warehouse}")),
            "{err:?}"
        );
        let msg = err.to_string();
        for part in [
            format!("give the service principal CAN USE on SQL warehouse {warehouse}"),
            "or set DATABRICKS_WAREHOUSE_ID to one it may use".to_string(),
            "PERMISSION_DENIED".to_string(),
        ] {
            assert!(msg.contains(&part), "{part:?} missing: {msg}");
        }
        assert!(!msg.contains("access to this API"), "{msg}");
        // Other errors pass through unchanged.
        let other = warehouse_refused(
            DatabricksError::Auth {
                detail: "x".into(),
                fix: "y".into(),
            },
            "w",
        );
        assert!(matches!(other, DatabricksError::Auth { .. }), "{other:?}");
        emu.shutdown().await;
    }

    fn wh(id: &str, state: &str, serverless: bool) -> Warehouse {
        Warehouse {
            id: id.into(),
            state: Some(state.into()),
            enable_serverless_compute: Some(serverless),
            ..Warehouse::default()
        }
    }

    /// Warehouses being deleted are never picked, whatever else they are (serverless, first);
    /// a configured one being deleted is an error naming its state and the fix.
    #[test]
    fn warehouses_being_deleted_are_never_picked() {
        let all = vec![
            wh("gone", "DELETED", true),
            wh("going", "DELETING", true),
            wh("stopped", "STOPPED", false),
        ];
        let (w, why) = pick_warehouse(all.clone(), None).unwrap();
        assert_eq!(
            (w.id.as_str(), why.as_str()),
            (
                "stopped",
                "the only kind available, will start on first query"
            )
        );
        let running = vec![wh("going", "DELETING", true), wh("up", "RUNNING", false)];
        assert_eq!(pick_warehouse(running, None).unwrap().0.id, "up");
        let only_deleted = vec![wh("gone", "DELETED", false), wh("going", "DELETING", true)];
        let err = pick_warehouse(only_deleted, None).unwrap_err();
        assert!(matches!(err, DatabricksError::NoWarehouse(_)), "{err:?}");
        assert!(err.to_string().contains("all being deleted"), "{err}");
        let err = pick_warehouse(all.clone(), Some("going")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, DatabricksError::NoWarehouse(_)), "{err:?}");
        assert!(
            text.contains("DATABRICKS_WAREHOUSE_ID=going is a SQL warehouse in state DELETING"),
            "{text}"
        );
        // A configured one that is usable is taken even when stopped and not serverless.
        let (w, why) = pick_warehouse(all, Some("stopped")).unwrap();
        assert_eq!(
            (w.id.as_str(), why.as_str()),
            ("stopped", "set by DATABRICKS_WAREHOUSE_ID")
        );
    }

    #[test]
    fn a_running_serverless_warehouse_comes_first() {
        let all = vec![
            wh("a", "STOPPED", true),
            wh("b", "RUNNING", false),
            wh("c", "RUNNING", true),
        ];
        let (w, why) = pick_warehouse(all.clone(), None).unwrap();
        assert_eq!((w.id.as_str(), why.as_str()), ("c", "running, serverless"));
        let (w, _) = pick_warehouse(all[..2].to_vec(), None).unwrap();
        assert_eq!(w.id, "b");
        let (w, why) = pick_warehouse(all[..1].to_vec(), None).unwrap();
        assert_eq!(
            (w.id.as_str(), why.as_str()),
            ("a", "serverless, will start on first query")
        );
        let err = pick_warehouse(vec![], Some("x")).unwrap_err();
        assert!(err
            .to_string()
            .contains("is not a SQL warehouse this service principal can see"));
    }
}
