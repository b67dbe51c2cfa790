//! SQL statement execution and lifecycle: binding named parameters, running translated SQL on
//! a read-only SQLite connection (on a blocking thread), rendering every value as Databricks
//! does (JSON strings, NULL as null), chunking, and the PENDING/RUNNING/SUCCEEDED/FAILED/CANCELED
//! state machine the Statement Execution API exposes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::Connection;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::layout::SparkType;
use crate::sql::{SqlError, Translated};
use crate::store::{fmt_ts, format_double, parse_date, parse_ts};

/// The Databricks inline result limit.
pub(crate) const INLINE_LIMIT_BYTES: usize = 25 * 1024 * 1024;
/// Statements whose results are kept; older ones are forgotten (404).
const KEEP_STATEMENTS: usize = 512;
/// Result bytes kept across statements before the oldest results are dropped.
const KEEP_RESULT_BYTES: usize = 512 * 1024 * 1024;
/// Fully served results are dropped once results exceed this many bytes.
const KEEP_SERVED_BYTES: usize = 32 * 1024 * 1024;

/// One `parameters[]` entry of a statement request.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ParamIn {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default, rename = "type")]
    pub ty: Option<String>,
}

/// A finished result set.
#[derive(Debug)]
pub(crate) struct ResultSet {
    pub columns: Vec<(String, SparkType)>,
    pub rows: Vec<Vec<Option<String>>>,
    pub truncated: bool,
    pub bytes: usize,
}

/// Why a run did not produce a result.
#[derive(Debug)]
pub(crate) enum RunError {
    Sql(SqlError),
    Canceled,
}

impl From<SqlError> for RunError {
    fn from(e: SqlError) -> Self {
        RunError::Sql(e)
    }
}

/// Convert a typed parameter to the stored canonical representation.
pub(crate) fn bind_value(p: &ParamIn) -> Result<SqlValue, SqlError> {
    let ty =
        p.ty.as_deref()
            .unwrap_or("STRING")
            .trim()
            .to_ascii_uppercase();
    let Some(v) = &p.value else {
        return Ok(SqlValue::Null);
    };
    let bad = |what: &str| {
        SqlError::bad(
            "INVALID_PARAMETER_VALUE",
            format!(
                "Parameter `{}` of type {ty} has an invalid value '{v}': expected {what}",
                p.name
            ),
        )
    };
    let base = ty.split('(').next().unwrap_or("").trim();
    Ok(match base {
        "STRING" | "VARCHAR" | "CHAR" => SqlValue::Text(v.clone()),
        "INT" | "INTEGER" | "BIGINT" | "LONG" | "SMALLINT" | "TINYINT" | "SHORT" | "BYTE" => {
            SqlValue::Integer(v.trim().parse().map_err(|_| bad("an integer"))?)
        }
        "DOUBLE" | "FLOAT" | "DECIMAL" => SqlValue::Real(v.trim().parse().map_err(|_| bad("a number"))?),
        "BOOLEAN" => match v.trim().to_ascii_lowercase().as_str() {
            "true" => SqlValue::Integer(1),
            "false" => SqlValue::Integer(0),
            _ => return Err(bad("true or false")),
        },
        "TIMESTAMP" | "TIMESTAMP_NTZ" | "TIMESTAMP_LTZ" => {
            SqlValue::Text(fmt_ts(parse_ts(v).ok_or_else(|| bad("an ISO-8601 timestamp like 2026-11-29T08:33:00Z"))?))
        }
        "DATE" => SqlValue::Text(parse_date(v).ok_or_else(|| bad("a date like 2026-11-29"))?),
        _ => {
            return Err(SqlError::bad(
                "INVALID_PARAMETER_VALUE",
                format!(
                    "Parameter `{}` has unsupported type {ty}; use STRING, TIMESTAMP, DATE, INT, BIGINT, DOUBLE or BOOLEAN",
                    p.name
                ),
            ))
        }
    })
}

fn map_sqlite_error(e: &rusqlite::Error, suggest: &[String]) -> SqlError {
    let msg = match e {
        rusqlite::Error::SqliteFailure(_, Some(m)) => m.clone(),
        other => other.to_string(),
    };
    if let Some(col) = msg.strip_prefix("no such column: ") {
        return SqlError::bad(
            "UNRESOLVED_COLUMN.WITH_SUGGESTION",
            format!(
                "A column, variable, or function parameter with name `{col}` cannot be resolved. Did you mean one of the following? [{}]",
                suggest.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            ),
        );
    }
    if let Some(f) = msg.strip_prefix("no such function: ") {
        return SqlError::bad("UNRESOLVED_ROUTINE", format!("Cannot resolve routine `{f}` on search path [`system`.`builtin`, `system`.`session`]."));
    }
    if let Some(t) = msg.strip_prefix("no such table: ") {
        return SqlError::bad(
            "TABLE_OR_VIEW_NOT_FOUND",
            format!("The table or view `{t}` cannot be found."),
        );
    }
    if msg.starts_with("ambiguous column name") {
        return SqlError::bad("AMBIGUOUS_REFERENCE", msg);
    }
    if msg.starts_with("wrong number of arguments") {
        return SqlError::bad("WRONG_NUM_ARGS", msg);
    }
    if msg.contains("interrupted") {
        return SqlError::bad("OPERATION_CANCELED", "The statement was canceled");
    }
    if msg.starts_with('[') {
        return SqlError {
            code: "BAD_REQUEST",
            message: msg,
        };
    }
    SqlError::bad("PARSE_SYNTAX_ERROR", format!("Syntax error: {msg}"))
}

fn render(v: ValueRefOwned, ty: SparkType) -> Option<String> {
    match v {
        ValueRefOwned::Null => None,
        ValueRefOwned::Int(i) => Some(match ty {
            SparkType::Boolean => (i != 0).to_string(),
            SparkType::Double => format_double(i as f64),
            _ => i.to_string(),
        }),
        ValueRefOwned::Real(f) => Some(format_double(f)),
        ValueRefOwned::Text(t) => Some(t),
        ValueRefOwned::Blob(b) => {
            use base64::Engine;
            Some(base64::engine::general_purpose::STANDARD.encode(b))
        }
    }
}

/// `row_limit` / `byte_limit` of a statement request.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Limits {
    pub rows: Option<usize>,
    pub bytes: Option<usize>,
}

/// Execute a translated statement. `known` maps a column name to its Spark type when SQLite
/// cannot tell (expressions in views); `suggest` feeds UNRESOLVED_COLUMN messages.
pub(crate) fn run(
    conn: &Connection,
    tr: &Translated,
    params: &[ParamIn],
    limits: Limits,
    cancel: &AtomicBool,
    known: &dyn Fn(&str) -> Option<SparkType>,
    suggest: &[String],
) -> Result<ResultSet, RunError> {
    let mut stmt = conn
        .prepare(&tr.sql)
        .map_err(|e| map_sqlite_error(&e, suggest))?;
    for m in &tr.markers {
        let Some(p) = params.iter().find(|p| &p.name == m) else {
            return Err(SqlError::bad(
                "UNBOUND_SQL_PARAMETER",
                format!("Found the unbound parameter: {m}. Please, fix `args` and provide a mapping of the parameter to a SQL literal."),
            )
            .into());
        };
        let v = bind_value(p)?;
        if let Ok(Some(idx)) = stmt.parameter_index(&format!(":{m}")) {
            stmt.raw_bind_parameter(idx, v)
                .map_err(|e| map_sqlite_error(&e, suggest))?;
        }
    }
    let cols: Vec<(String, Option<SparkType>)> = stmt
        .columns()
        .iter()
        .map(|c| {
            let name = c.name().to_string();
            let ty = c
                .decl_type()
                .and_then(SparkType::from_sqlite_decl)
                .or_else(|| known(&name));
            (name, ty)
        })
        .collect();
    let n = cols.len();
    let mut rows_out: Vec<Vec<ValueRefOwned>> = Vec::new();
    let mut bytes = 0usize;
    let mut json_bytes = 0usize;
    let mut truncated = false;
    let mut rows = stmt.raw_query();
    loop {
        if rows_out.len().is_multiple_of(256) && cancel.load(Ordering::Relaxed) {
            return Err(RunError::Canceled);
        }
        let r = match rows.next() {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                if cancel.load(Ordering::Relaxed) {
                    return Err(RunError::Canceled);
                }
                return Err(map_sqlite_error(&e, suggest).into());
            }
        };
        if limits.rows.is_some_and(|l| rows_out.len() >= l) {
            truncated = true;
            break;
        }
        let mut row = Vec::with_capacity(n);
        let mut row_bytes = 2;
        let mut row_json = 2;
        for i in 0..n {
            let v = r.get_ref(i).map_err(|e| map_sqlite_error(&e, suggest))?;
            let owned = ValueRefOwned::from(v);
            row_bytes += owned.len() + 3;
            row_json += owned.json_len() + 1;
            row.push(owned);
        }
        if limits.bytes.is_some_and(|l| bytes + row_bytes > l) {
            truncated = true;
            break;
        }
        bytes += row_bytes;
        json_bytes += row_json;
        if json_bytes > INLINE_LIMIT_BYTES {
            return Err(SqlError::bad(
                "INLINE_RESULT_TOO_LARGE",
                "The result exceeds the 25 MiB limit of the INLINE disposition; page the query (LIMIT / keyset) or use a smaller byte_limit",
            )
            .into());
        }
        rows_out.push(row);
    }
    // Types: declared, known by name, else inferred from the first non-null value.
    let columns: Vec<(String, SparkType)> = cols
        .into_iter()
        .enumerate()
        .map(|(i, (name, ty))| {
            let ty = ty.unwrap_or_else(|| {
                rows_out
                    .iter()
                    .find_map(|r| match &r[i] {
                        ValueRefOwned::Int(_) => Some(SparkType::Bigint),
                        ValueRefOwned::Real(_) => Some(SparkType::Double),
                        ValueRefOwned::Text(_) | ValueRefOwned::Blob(_) => Some(SparkType::String),
                        ValueRefOwned::Null => None,
                    })
                    .unwrap_or(SparkType::String)
            });
            (name, ty)
        })
        .collect();
    let rows = rows_out
        .into_iter()
        .map(|r| {
            r.into_iter()
                .zip(columns.iter())
                .map(|(v, (_, ty))| render(v, *ty))
                .collect()
        })
        .collect();
    Ok(ResultSet {
        columns,
        rows,
        truncated,
        bytes,
    })
}

/// An owned SQLite value (kept until the column types are known).
#[derive(Debug)]
enum ValueRefOwned {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl ValueRefOwned {
    /// Its size in the warehouse's own representation (what `byte_limit` counts).
    fn len(&self) -> usize {
        match self {
            ValueRefOwned::Null => 4,
            ValueRefOwned::Int(_) | ValueRefOwned::Real(_) => 12,
            ValueRefOwned::Text(s) => s.len(),
            ValueRefOwned::Blob(b) => b.len() * 4 / 3,
        }
    }

    /// Its size as a JSON_ARRAY cell, quotes and escapes included (what the 25 MiB INLINE cap
    /// counts: a quote-heavy payload grows when escaped).
    fn json_len(&self) -> usize {
        match self {
            ValueRefOwned::Text(s) => {
                2 + s.len()
                    + s.bytes()
                        .map(|b| match b {
                            b'"' | b'\\' | b'\n' | b'\r' | b'\t' => 1,
                            0..=0x1f => 5,
                            _ => 0,
                        })
                        .sum::<usize>()
            }
            other => other.len() + 2,
        }
    }
}

impl From<ValueRef<'_>> for ValueRefOwned {
    fn from(v: ValueRef<'_>) -> Self {
        match v {
            ValueRef::Null => ValueRefOwned::Null,
            ValueRef::Integer(i) => ValueRefOwned::Int(i),
            ValueRef::Real(f) => ValueRefOwned::Real(f),
            ValueRef::Text(t) => ValueRefOwned::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => ValueRefOwned::Blob(b.to_vec()),
        }
    }
}

/// Where a statement is in its life.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    Running,
    Succeeded(Arc<ResultSet>),
    Failed(SqlError),
    Canceled,
}

/// A statement known to the warehouse.
pub(crate) struct Entry {
    pub phase: Phase,
    /// Polls that still answer PENDING (fault injection).
    pub pending_polls: u32,
    pub cancel: Arc<AtomicBool>,
    pub interrupt: Option<rusqlite::InterruptHandle>,
    /// Every chunk has been sent at least once: the result may be dropped first.
    pub served_all: bool,
}

impl Entry {
    /// Not in a terminal state as a client sees it: still executing, or still reported
    /// `PENDING` (fault injection).
    pub(crate) fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Running) || self.pending_polls > 0
    }
}

/// All statements, oldest first, bounded in count and result bytes.
#[derive(Default)]
pub(crate) struct StatementTable {
    pub map: HashMap<String, Entry>,
    order: VecDeque<String>,
}

impl StatementTable {
    /// Statements a client would still see `PENDING` or `RUNNING`.
    pub(crate) fn running(&self) -> usize {
        self.map.values().filter(|e| e.is_running()).count()
    }

    pub(crate) fn insert(&mut self, id: String, e: Entry) {
        self.order.push_back(id.clone());
        self.map.insert(id, e);
        self.evict();
    }

    pub(crate) fn evict(&mut self) {
        let bytes = |e: &Entry| match &e.phase {
            Phase::Succeeded(r) => r.bytes,
            _ => 0,
        };
        let mut total: usize = self.map.values().map(bytes).sum();
        // First forget fully served results, oldest first, while over the soft budget.
        if total > KEEP_SERVED_BYTES {
            let mut keep = VecDeque::with_capacity(self.order.len());
            while let Some(id) = self.order.pop_front() {
                let drop_it = total > KEEP_SERVED_BYTES
                    && self
                        .map
                        .get(&id)
                        .is_some_and(|e| e.served_all && bytes(e) > 0);
                if drop_it {
                    if let Some(e) = self.map.remove(&id) {
                        total -= bytes(&e);
                    }
                } else {
                    keep.push_back(id);
                }
            }
            self.order = keep;
        }
        // Then the hard limits, oldest first whatever their state.
        while self.order.len() > KEEP_STATEMENTS
            || (self.order.len() > 1 && total > KEEP_RESULT_BYTES)
        {
            match self.order.pop_front() {
                Some(old) => {
                    if let Some(e) = self.map.remove(&old) {
                        total -= bytes(&e);
                    }
                }
                None => break,
            }
        }
    }
}

/// One result chunk, serialized straight from the stored rows (no copy into a JSON tree).
#[derive(Debug, serde::Serialize)]
pub(crate) struct Chunk<'a> {
    chunk_index: usize,
    row_offset: usize,
    row_count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_array: Option<&'a [Vec<Option<String>>]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_chunk_index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_chunk_internal_link: Option<String>,
}

/// The `result` object for chunk `idx` of a result set.
pub(crate) fn chunk_json<'a>(
    id: &str,
    rs: &'a ResultSet,
    idx: usize,
    chunk_rows: usize,
) -> Chunk<'a> {
    let cr = chunk_rows.max(1);
    let total = rs.rows.len();
    let start = idx.saturating_mul(cr).min(total);
    let end = idx.saturating_add(1).saturating_mul(cr).min(total);
    let more = end < total;
    Chunk {
        chunk_index: idx,
        row_offset: start,
        row_count: end - start,
        data_array: (end > start).then(|| &rs.rows[start..end]),
        next_chunk_index: more.then_some(idx + 1),
        next_chunk_internal_link: more
            .then(|| format!("/api/2.0/sql/statements/{id}/result/chunks/{}", idx + 1)),
    }
}

pub(crate) fn chunk_count(rs: &ResultSet, chunk_rows: usize) -> usize {
    rs.rows.len().div_ceil(chunk_rows.max(1))
}

/// The manifest of a result set.
pub(crate) fn manifest_json(rs: &ResultSet, chunk_rows: usize) -> Value {
    let cr = chunk_rows.max(1);
    let cols: Vec<Value> = rs
        .columns
        .iter()
        .enumerate()
        .map(|(i, (name, ty))| {
            json!({"name": name, "type_name": ty.type_name(), "type_text": ty.type_text().to_ascii_uppercase(), "position": i})
        })
        .collect();
    let n = chunk_count(rs, chunk_rows);
    let chunks: Vec<Value> = (0..n)
        .map(|k| {
            let start = k * cr;
            json!({"chunk_index": k, "row_offset": start, "row_count": (rs.rows.len() - start).min(cr)})
        })
        .collect();
    json!({
        "format": "JSON_ARRAY",
        "schema": {"column_count": rs.columns.len(), "columns": cols},
        "total_chunk_count": n,
        "chunks": chunks,
        "total_row_count": rs.rows.len(),
        "truncated": rs.truncated,
    })
}

/// A statement response, serialized without copying result rows.
#[derive(Debug, serde::Serialize)]
pub(crate) struct StatementOut<'a> {
    statement_id: &'a str,
    status: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Chunk<'a>>,
}

/// The full statement response for a given reported state.
pub(crate) fn statement_json<'a>(
    id: &'a str,
    phase: &'a Phase,
    report_pending: bool,
    not_done_state: &str,
    chunk_rows: usize,
) -> StatementOut<'a> {
    let out = |status: Value| StatementOut {
        statement_id: id,
        status,
        manifest: None,
        result: None,
    };
    if report_pending {
        return out(json!({"state": "PENDING"}));
    }
    match phase {
        Phase::Running => out(json!({"state": not_done_state})),
        Phase::Canceled => out(json!({"state": "CANCELED"})),
        Phase::Failed(e) => {
            out(json!({"state": "FAILED", "error": {"error_code": e.code, "message": e.message}}))
        }
        Phase::Succeeded(rs) => StatementOut {
            statement_id: id,
            status: json!({"state": "SUCCEEDED"}),
            manifest: Some(manifest_json(rs, chunk_rows)),
            result: Some(chunk_json(id, rs, 0, chunk_rows)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(bytes: usize, served_all: bool) -> Entry {
        let rs = ResultSet {
            columns: vec![],
            rows: vec![],
            truncated: false,
            bytes,
        };
        Entry {
            phase: Phase::Succeeded(Arc::new(rs)),
            pending_polls: 0,
            cancel: Arc::new(AtomicBool::new(false)),
            interrupt: None,
            served_all,
        }
    }

    #[test]
    fn served_results_are_dropped_first() {
        let mut t = StatementTable::default();
        let mb = 1024 * 1024;
        t.insert("a".into(), entry(20 * mb, true));
        t.insert("b".into(), entry(20 * mb, false));
        t.insert("c".into(), entry(20 * mb, true));
        // 60 MiB > 32 MiB soft budget: served "a" goes, then total 40 MiB: served "c" goes.
        assert!(!t.map.contains_key("a"));
        assert!(t.map.contains_key("b"));
        assert!(!t.map.contains_key("c"));
    }

    #[test]
    fn parameters_are_normalized_and_checked() {
        let p = |v: &str, ty: &str| ParamIn {
            name: "x".into(),
            value: Some(v.into()),
            ty: Some(ty.into()),
        };
        assert_eq!(
            bind_value(&p("2026-11-29T08:33:00Z", "TIMESTAMP")).ok(),
            Some(SqlValue::Text("2026-11-29T08:33:00.000000Z".into()))
        );
        assert_eq!(
            bind_value(&p("2026-11-29", "DATE")).ok(),
            Some(SqlValue::Text("2026-11-29".into()))
        );
        assert_eq!(
            bind_value(&p("42", "BIGINT")).ok(),
            Some(SqlValue::Integer(42))
        );
        assert_eq!(
            bind_value(&p("true", "BOOLEAN")).ok(),
            Some(SqlValue::Integer(1))
        );
        assert!(bind_value(&p("4x2", "INT")).is_err());
        assert!(bind_value(&p("a", "GEOGRAPHY")).is_err());
        let none = ParamIn {
            name: "n".into(),
            value: None,
            ty: Some("STRING".into()),
        };
        assert_eq!(bind_value(&none).ok(), Some(SqlValue::Null));
    }

    #[test]
    fn values_render_as_databricks_strings() {
        assert_eq!(
            render(ValueRefOwned::Int(1), SparkType::Boolean).as_deref(),
            Some("true")
        );
        assert_eq!(
            render(ValueRefOwned::Real(1.0), SparkType::Double).as_deref(),
            Some("1.0")
        );
        assert_eq!(
            render(ValueRefOwned::Int(7), SparkType::Bigint).as_deref(),
            Some("7")
        );
        assert_eq!(render(ValueRefOwned::Null, SparkType::String), None);
    }
}
