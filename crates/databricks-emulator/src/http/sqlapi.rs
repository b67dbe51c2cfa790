//! SQL warehouses and the Statement Execution API: create (with `wait_timeout` semantics),
//! poll, fetch chunks, cancel. Statements run on blocking threads against SQLite.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad_param, err, json_bytes, ok, Principal};
use crate::faults::StatementFaults;
use crate::layout::SparkType;
use crate::sql::{translate, SqlError};
use crate::state::{lock, Shared};
use crate::statements::{self, Entry, ParamIn, Phase, RunError};
use crate::Privilege;

/// (id, name, state, type, serverless)
const WAREHOUSES: &[(&str, &str, &str, &str, bool)] = &[
    (
        "4b9f1c2d3e5a6001",
        "Serverless Starter Warehouse",
        "RUNNING",
        "PRO",
        true,
    ),
    (
        "4b9f1c2d3e5a6002",
        "Classic BI Warehouse",
        "STOPPED",
        "CLASSIC",
        false,
    ),
];

fn warehouse_json(shared: &Shared, w: &(&str, &str, &str, &str, bool)) -> Value {
    json!({
        "id": w.0, "name": w.1, "state": w.2, "warehouse_type": w.3, "enable_serverless_compute": w.4,
        "cluster_size": "2X-Small", "min_num_clusters": 1, "max_num_clusters": 1, "auto_stop_mins": 10,
        "creator_name": "admins@example.com",
        "odbc_params": {"hostname": shared.base_url.trim_start_matches("http://"), "path": format!("/sql/1.0/warehouses/{}", w.0), "protocol": "https", "port": 443},
    })
}

pub(crate) async fn warehouses(State(shared): State<Arc<Shared>>) -> Response {
    ok(
        json!({"warehouses": WAREHOUSES.iter().map(|w| warehouse_json(&shared, w)).collect::<Vec<_>>()}),
    )
}

pub(crate) async fn warehouse(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    match WAREHOUSES.iter().find(|w| w.0 == id) {
        Some(w) => ok(warehouse_json(&shared, w)),
        None => err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Warehouse {id} does not exist."),
        ),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct CreateReq {
    #[serde(default)]
    warehouse_id: Option<String>,
    #[serde(default)]
    statement: Option<String>,
    #[serde(default)]
    catalog: Option<String>,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    parameters: Vec<ParamIn>,
    #[serde(default)]
    wait_timeout: Option<String>,
    #[serde(default)]
    on_wait_timeout: Option<String>,
    #[serde(default)]
    disposition: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    row_limit: Option<i64>,
    #[serde(default)]
    byte_limit: Option<i64>,
}

fn parse_wait(s: Option<&str>) -> Result<Duration, Response> {
    let s = s.unwrap_or("10s").trim();
    let secs = s
        .strip_suffix('s')
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| *n == 0 || (5..=50).contains(n));
    secs.map(Duration::from_secs).ok_or_else(|| {
        bad_param(format!(
            "wait_timeout '{s}' is invalid: use \"0s\" or a value between \"5s\" and \"50s\""
        ))
    })
}

fn new_statement_id() -> String {
    let a = rand::random::<u128>();
    let h = format!("{a:032x}");
    format!(
        "01f0{}-{}-{}-{}-{}",
        &h[0..4],
        &h[4..8],
        &h[8..12],
        &h[12..16],
        &h[16..28]
    )
}

fn known_type(shared: &Shared) -> impl Fn(&str) -> Option<SparkType> + '_ {
    move |name: &str| {
        shared
            .layout
            .tables
            .iter()
            .flat_map(|t| t.columns.iter())
            .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, t, _)| *t)
    }
}

/// Translate, check permissions and faults. Returns the translation or a FAILED error.
fn prepare(
    shared: &Shared,
    who: &str,
    statement: &str,
    catalog: &str,
    schema: &str,
) -> Result<(crate::sql::Translated, StatementFaults, Vec<String>), SqlError> {
    let l = &shared.layout;
    let resolve = |c: &str, s: &str, t: &str| -> Option<String> {
        (c == l.catalog && s == l.schema && l.table_by_name(t).is_some()).then(|| l.full_name(t))
    };
    let tr = translate(statement, catalog, schema, &resolve)?;
    let mut full = Vec::new();
    let mut suggest = Vec::new();
    for (c, s, t) in &tr.tables {
        let denied = |what: &str, on: String| {
            // The Statement Execution API's codes are ServiceErrorCodes (no PERMISSION_DENIED):
            // a missing privilege is a BAD_REQUEST whose message names the Spark condition.
            SqlError {
            code: "BAD_REQUEST",
            message: format!("[INSUFFICIENT_PERMISSIONS] Insufficient privileges: User does not have {what} on {on}."),
        }
        };
        if !shared.allowed(who, &Privilege::UseCatalog) {
            return Err(denied("USE CATALOG", format!("Catalog '{c}'")));
        }
        if !shared.allowed(who, &Privilege::UseSchema) {
            return Err(denied("USE SCHEMA", format!("Schema '{c}.{s}'")));
        }
        let name = format!("{c}.{s}.{t}");
        if !shared.allowed(
            who,
            &Privilege::Select {
                table: name.clone(),
            },
        ) {
            return Err(denied("SELECT", format!("Table '{name}'")));
        }
        if let Some(td) = l.table_by_name(t) {
            suggest.extend(td.columns.iter().map(|c| c.0.to_string()));
        }
        full.push(name);
    }
    let f = lock(&shared.faults).on_statement("/api/2.0/sql/statements", &full);
    if f.fail {
        return Err(SqlError {
            code: "INTERNAL_ERROR",
            message: format!(
                "[EMULATOR_INJECTED_FAULT] Statement failed by an injected fault (tables: {})",
                full.join(", ")
            ),
        });
    }
    Ok((tr, f, suggest))
}

pub(crate) async fn create(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> Response {
    let req: CreateReq = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return err(
                StatusCode::BAD_REQUEST,
                "MALFORMED_REQUEST",
                format!("Invalid JSON body: {e}"),
            )
        }
    };
    let Some(wh) = req.warehouse_id.as_deref().filter(|w| !w.is_empty()) else {
        return bad_param("warehouse_id is required");
    };
    if !WAREHOUSES.iter().any(|w| w.0 == wh) {
        return err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Warehouse {wh} does not exist; list them with GET /api/2.0/sql/warehouses"),
        );
    }
    let Some(statement) = req.statement.clone().filter(|s| !s.trim().is_empty()) else {
        return bad_param("statement is required");
    };
    let wait = match parse_wait(req.wait_timeout.as_deref()) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let cancel_on_timeout = match req.on_wait_timeout.as_deref().unwrap_or("CONTINUE") {
        "CONTINUE" => false,
        "CANCEL" => true,
        other => {
            return bad_param(format!(
                "on_wait_timeout '{other}' is invalid: use CONTINUE or CANCEL"
            ))
        }
    };
    match req.disposition.as_deref().unwrap_or("INLINE") {
        "INLINE" => {}
        "EXTERNAL_LINKS" => return bad_param("disposition EXTERNAL_LINKS is not supported by the emulator; use INLINE and page the query"),
        other => return bad_param(format!("disposition '{other}' is invalid: use INLINE")),
    }
    match req.format.as_deref().unwrap_or("JSON_ARRAY") {
        "JSON_ARRAY" => {}
        other => {
            return bad_param(format!(
                "format '{other}' is not supported with INLINE by the emulator: use JSON_ARRAY"
            ))
        }
    }
    let limit = |v: Option<i64>, name: &str| -> Result<Option<usize>, Response> {
        match v {
            None => Ok(None),
            Some(n) if n >= 0 => Ok(Some(n as usize)),
            Some(n) => Err(bad_param(format!("{name} must be non-negative, got {n}"))),
        }
    };
    let (row_limit, byte_limit) = match (
        limit(req.row_limit, "row_limit"),
        limit(req.byte_limit, "byte_limit"),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let catalog = req
        .catalog
        .clone()
        .unwrap_or_else(|| shared.layout.catalog.clone());
    let schema = req
        .schema
        .clone()
        .unwrap_or_else(|| shared.layout.schema.clone());
    let id = new_statement_id();
    let chunk_rows = shared.cfg.chunk_rows;
    lock(&shared.stats).statements_executed += 1;
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let cancel = Arc::new(AtomicBool::new(false));
    match prepare(&shared, &p.0, &statement, &catalog, &schema) {
        Err(e) => {
            lock(&shared.stats).statements_failed += 1;
            let phase = Phase::Failed(e);
            let v = json_bytes(&statements::statement_json(
                &id, &phase, false, "RUNNING", chunk_rows,
            ));
            lock(&shared.statements).insert(
                id,
                Entry {
                    phase,
                    pending_polls: 0,
                    cancel,
                    interrupt: None,
                    served_all: true,
                },
            );
            return v;
        }
        Ok((tr, faults, suggest)) => {
            let (polls, slow_ms) = (faults.polls, faults.slow_ms);
            // An injected smaller byte limit: the result comes back `truncated` past it.
            let byte_limit = match (byte_limit, faults.byte_limit) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            lock(&shared.statements).insert(
                id.clone(),
                Entry {
                    phase: Phase::Running,
                    pending_polls: polls,
                    cancel: cancel.clone(),
                    interrupt: None,
                    served_all: false,
                },
            );
            let (s2, id2, params) = (shared.clone(), id.clone(), req.parameters);
            tokio::task::spawn_blocking(move || {
                // An injected slow statement: it runs this long, unless cancelled.
                let slow_until = std::time::Instant::now() + Duration::from_millis(slow_ms);
                while std::time::Instant::now() < slow_until && !cancel.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let result = s2.store.with_reader(|conn| {
                    if let Some(e) = lock(&s2.statements).map.get_mut(&id2) {
                        e.interrupt = Some(conn.get_interrupt_handle());
                    }
                    let known = known_type(&s2);
                    statements::run(
                        conn,
                        &tr,
                        &params,
                        statements::Limits {
                            rows: row_limit,
                            bytes: byte_limit,
                        },
                        &cancel,
                        &known,
                        &suggest,
                    )
                });
                let mut table = lock(&s2.statements);
                if let Some(e) = table.map.get_mut(&id2) {
                    e.interrupt = None;
                    if !matches!(e.phase, Phase::Canceled) {
                        e.phase = match result {
                            Ok(rs) => {
                                lock(&s2.stats).rows_returned += rs.rows.len() as u64;
                                Phase::Succeeded(Arc::new(rs))
                            }
                            Err(RunError::Sql(err)) => {
                                lock(&s2.stats).statements_failed += 1;
                                Phase::Failed(err)
                            }
                            Err(RunError::Canceled) => Phase::Canceled,
                        };
                    }
                }
                table.evict();
                drop(table);
                let _ = done_tx.send(true);
            });
        }
    }
    if wait.is_zero() {
        return ok(json!({"statement_id": id, "status": {"state": "PENDING"}}));
    }
    let finished = tokio::time::timeout(wait, done_rx.wait_for(|d| *d))
        .await
        .is_ok();
    let mut table = lock(&shared.statements);
    let Some(e) = table.map.get_mut(&id) else {
        return err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Statement {id} was evicted"),
        );
    };
    if !finished && cancel_on_timeout {
        e.cancel.store(true, Ordering::Relaxed);
        if let Some(h) = &e.interrupt {
            h.interrupt();
        }
        e.phase = Phase::Canceled;
        e.pending_polls = 0;
        lock(&shared.stats).statements_cancelled += 1;
    }
    let (phase, pending) = (e.phase.clone(), e.pending_polls > 0);
    mark_served(e, pending, chunk_rows);
    drop(table);
    json_bytes(&statements::statement_json(
        &id, &phase, pending, "RUNNING", chunk_rows,
    ))
}

/// A result whose only chunk went out may be dropped first when memory is tight.
fn mark_served(e: &mut Entry, pending: bool, chunk_rows: usize) {
    if let (false, Phase::Succeeded(rs)) = (pending, &e.phase) {
        if statements::chunk_count(rs, chunk_rows) <= 1 {
            e.served_all = true;
        }
    }
}

fn unknown(id: &str) -> Response {
    err(
        StatusCode::NOT_FOUND,
        "RESOURCE_DOES_NOT_EXIST",
        format!("Statement {id} does not exist (or its results expired)"),
    )
}

pub(crate) async fn poll(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let mut table = lock(&shared.statements);
    let Some(e) = table.map.get_mut(&id) else {
        return unknown(&id);
    };
    let pending = e.pending_polls > 0;
    if pending {
        e.pending_polls -= 1;
    }
    let phase = e.phase.clone();
    mark_served(e, pending, shared.cfg.chunk_rows);
    drop(table);
    json_bytes(&statements::statement_json(
        &id,
        &phase,
        pending,
        "RUNNING",
        shared.cfg.chunk_rows,
    ))
}

pub(crate) async fn chunk(
    State(shared): State<Arc<Shared>>,
    Path((id, n)): Path<(String, String)>,
) -> Response {
    let rs = {
        let table = lock(&shared.statements);
        let Some(e) = table.map.get(&id) else {
            return unknown(&id);
        };
        match &e.phase {
            Phase::Succeeded(rs) if e.pending_polls == 0 => rs.clone(),
            _ => {
                return err(
                    StatusCode::BAD_REQUEST,
                    "BAD_REQUEST",
                    format!("Statement {id} has no result: it is not SUCCEEDED"),
                )
            }
        }
    };
    let count = statements::chunk_count(&rs, shared.cfg.chunk_rows);
    let idx = match n.parse::<usize>() {
        Ok(i) if i < count.max(1) => i,
        _ => {
            return bad_param(format!(
                "chunk index '{n}' is out of range: the result has {count} chunk(s)"
            ))
        }
    };
    lock(&shared.stats).chunks_served += 1;
    if idx + 1 >= count {
        if let Some(e) = lock(&shared.statements).map.get_mut(&id) {
            e.served_all = true;
        }
    }
    let cr = shared.cfg.chunk_rows;
    // Serialising a large chunk is CPU work: keep it off the async workers.
    match tokio::task::spawn_blocking(move || {
        json_bytes(&statements::chunk_json(&id, &rs, idx, cr))
    })
    .await
    {
        Ok(v) => v,
        Err(e) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            format!("chunk task failed: {e}"),
        ),
    }
}

pub(crate) async fn cancel(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let mut table = lock(&shared.statements);
    let Some(e) = table.map.get_mut(&id) else {
        return unknown(&id);
    };
    // Still running, or still reported PENDING (fault): it ends CANCELED. A finished statement
    // is left as it is, as Databricks does.
    if e.is_running() {
        e.cancel.store(true, Ordering::Relaxed);
        if let Some(h) = &e.interrupt {
            h.interrupt();
        }
        e.phase = Phase::Canceled;
        e.pending_polls = 0;
        drop(table);
        lock(&shared.stats).statements_cancelled += 1;
    }
    ok(json!({}))
}
