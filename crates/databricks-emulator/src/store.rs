//! The SQLite store behind the inference tables: compact rows on a temporary on-disk database,
//! one SQL view per Unity Catalog table that synthesizes payloads on read, a writer connection
//! for generation and a small pool of read-only connections for statements.
//!
//! Architecture Invariant: payload bytes are never stored; they are re-created on read by the
//! `emu_payload` application-defined function, so memory stays flat at a million rows.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::{params, Connection};

use crate::error::EmulatorError;
use crate::layout::{Layout, TableKind};
use crate::payload::{self, Format, PayloadSpec, Rng};
use crate::GroundTruthRow;

/// Canonical TIMESTAMP text (fixed width, so text order is time order).
pub(crate) fn fmt_ts(us: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(us) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        None => "1970-01-01T00:00:00.000000Z".to_string(),
    }
}

/// Canonical DATE text.
pub(crate) fn fmt_date(us: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(us) {
        Some(t) => t.format("%Y-%m-%d").to_string(),
        None => "1970-01-01".to_string(),
    }
}

/// Spark's rendering of a DOUBLE (`1.0`, `0.25`, `1.0E-7`).
pub(crate) fn format_double(f: f64) -> String {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{f:.1}")
    } else if f.is_nan() {
        "NaN".to_string()
    } else if f.is_infinite() {
        if f > 0.0 {
            "Infinity".to_string()
        } else {
            "-Infinity".to_string()
        }
    } else {
        let s = format!("{f:?}");
        s.replace('e', "E")
    }
}

pub(crate) fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Parse the timestamp spellings Spark accepts (ISO-8601 with `T` or space, optional fraction,
/// optional `Z`/offset, or a bare date) into epoch microseconds.
pub(crate) fn parse_ts(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    let norm = s.replacen(' ', "T", 1);
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&norm) {
        return Some(t.timestamp_micros());
    }
    let bare = norm.trim_end_matches('Z');
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(bare, f) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    chrono::NaiveDate::parse_from_str(bare, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_micros())
}

/// Parse a DATE (or a timestamp, truncated) into canonical DATE text.
pub(crate) fn parse_date(s: &str) -> Option<String> {
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d") {
        return Some(d.format("%Y-%m-%d").to_string());
    }
    parse_ts(s).map(fmt_date)
}

const READERS: usize = 4;

/// The SQLite-backed row store.
pub(crate) struct Store {
    _dir: tempfile::TempDir,
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    layout: Arc<Layout>,
    payload_bytes: usize,
    /// `EmulatorConfig::otel_output_bytes`.
    otel_output_bytes: usize,
    rng: Mutex<Rng>,
    rows_total: AtomicU64,
    /// Per agent: the first initial rows whose execution MLflow traces mirror (see [`MirroredRow`]).
    mirrored: Vec<Vec<MirroredRow>>,
    /// The end of the initial hour of rows (µs): `EmulatorConfig::anchor_us`.
    anchor_us: i64,
    /// MLflow traces whose span documents cloud storage serves streamed, without a
    /// Content-Length (`Emulator::stream_span_document`): trace id -> padding bytes.
    streamed_span_documents: Mutex<std::collections::HashMap<String, usize>>,
}

/// How many executions of each agent also have an MLflow trace describing them.
pub(crate) const MIRRORED_PER_AGENT: usize = 4;

/// An inference row whose execution an MLflow trace also describes: same payload seed (so the
/// same tool call id), same time and client request id. Only successful rows with a tool call
/// and logged payloads are chosen, so the row's record and the trace's TOOL span describe the
/// same tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MirroredRow {
    pub request_id: String,
    pub client_request_id: Option<String>,
    pub t_us: i64,
    pub seed: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn arg_i64(ctx: &Context<'_>, i: usize) -> Option<i64> {
    ctx.get::<Option<i64>>(i).ok().flatten()
}

fn arg_text(ctx: &Context<'_>, i: usize) -> Option<String> {
    match ctx.get_raw(i) {
        rusqlite::types::ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
        rusqlite::types::ValueRef::Integer(v) => Some(v.to_string()),
        rusqlite::types::ValueRef::Real(v) => Some(v.to_string()),
        _ => None,
    }
}

/// Register the emulator's functions (payload synthesis and the Spark built-ins SQLite lacks).
fn register_functions(
    conn: &Connection,
    layout: &Arc<Layout>,
    payload_bytes: usize,
) -> rusqlite::Result<()> {
    let det = FunctionFlags::SQLITE_UTF8
        | FunctionFlags::SQLITE_DETERMINISTIC
        | FunctionFlags::SQLITE_INNOCUOUS;
    let nondet = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_INNOCUOUS;
    let l = layout.clone();
    conn.create_scalar_function("emu_payload", 5, det, move |ctx| {
        let which = arg_i64(ctx, 0).unwrap_or(0);
        let agent = arg_i64(ctx, 1).unwrap_or(-1);
        let seed = arg_i64(ctx, 2).unwrap_or(0) as u64;
        let status = arg_i64(ctx, 3).unwrap_or(200);
        let flags = arg_i64(ctx, 4).unwrap_or(0);
        let (name, tools, format): (&str, &[String], Format) =
            match usize::try_from(agent).ok().and_then(|a| l.agents.get(a)) {
                Some(a) => (a.name.as_str(), a.tools.as_slice(), a.format),
                None => ("legacy_bot", &[], Format::ChatCompletions),
            };
        let spec = PayloadSpec {
            format,
            agent: name,
            tools,
            seed,
            status,
            flags,
            payload_bytes,
        };
        Ok(if which == 0 {
            payload::request_json(&spec)
        } else {
            payload::response_json(&spec)
        })
    })?;
    let l = layout.clone();
    conn.create_scalar_function("emu_meta", 1, det, move |ctx| {
        let agent = arg_i64(ctx, 0).unwrap_or(-1);
        Ok(usize::try_from(agent)
            .ok()
            .and_then(|a| l.agents.get(a))
            .map(|a| {
                serde_json::json!({
                    "endpoint_name": a.endpoint.clone().unwrap_or_default(),
                    "model_name": a.model_full_name.clone().unwrap_or_default(),
                    "model_version": a.model_versions.to_string(),
                })
                .to_string()
            }))
    })?;
    conn.create_scalar_function("emu_current_timestamp", 0, nondet, |_| Ok(fmt_ts(now_us())))?;
    conn.create_scalar_function("emu_now_ns", 0, nondet, |_| {
        Ok(now_us().saturating_mul(1000))
    })?;
    conn.create_scalar_function("emu_current_date", 0, nondet, |_| Ok(fmt_date(now_us())))?;
    conn.create_scalar_function("timestamp_millis", 1, det, |ctx| {
        Ok(arg_i64(ctx, 0).map(|ms| fmt_ts(ms.saturating_mul(1000))))
    })?;
    conn.create_scalar_function("timestamp_micros", 1, det, |ctx| {
        Ok(arg_i64(ctx, 0).map(fmt_ts))
    })?;
    conn.create_scalar_function("unix_millis", 1, det, |ctx| {
        Ok(arg_text(ctx, 0)
            .and_then(|s| parse_ts(&s))
            .map(|us| us.div_euclid(1000)))
    })?;
    conn.create_scalar_function("unix_micros", 1, det, |ctx| {
        Ok(arg_text(ctx, 0).and_then(|s| parse_ts(&s)))
    })?;
    conn.create_scalar_function("to_timestamp", 1, det, |ctx| {
        Ok(arg_text(ctx, 0).and_then(|s| parse_ts(&s)).map(fmt_ts))
    })?;
    conn.create_scalar_function("to_date", 1, det, |ctx| {
        Ok(arg_text(ctx, 0).and_then(|s| parse_date(&s)))
    })?;
    for (name, sign) in [("date_add", 1i64), ("date_sub", -1i64)] {
        conn.create_scalar_function(name, 2, det, move |ctx| {
            let d = arg_text(ctx, 0).and_then(|s| parse_ts(&s));
            let n = arg_i64(ctx, 1);
            Ok(match (d, n) {
                (Some(d), Some(n)) => Some(fmt_date(d + sign * n * 86_400_000_000)),
                _ => None,
            })
        })?;
    }
    conn.create_scalar_function("emu_cast", 2, det, |ctx| {
        use rusqlite::types::Value as V;
        let v: V = ctx.get(0)?;
        let ty = arg_text(ctx, 1).unwrap_or_default();
        let text = |v: &V| match v {
            V::Text(s) => Some(s.clone()),
            V::Integer(i) => Some(i.to_string()),
            V::Real(f) => Some(format_double(*f)),
            _ => None,
        };
        if matches!(v, V::Null) {
            return Ok(V::Null);
        }
        Ok(match ty.as_str() {
            "STRING" | "VARCHAR" | "CHAR" => text(&v).map(V::Text).unwrap_or(V::Null),
            "INT" | "INTEGER" | "BIGINT" | "LONG" | "SMALLINT" | "TINYINT" => match &v {
                V::Integer(i) => V::Integer(*i),
                V::Real(f) => V::Integer(f.trunc() as i64),
                V::Text(s) => s.trim().parse::<i64>().map(V::Integer).unwrap_or(V::Null),
                _ => V::Null,
            },
            "DOUBLE" | "FLOAT" | "REAL" | "DECIMAL" => match &v {
                V::Integer(i) => V::Real(*i as f64),
                V::Real(f) => V::Real(*f),
                V::Text(s) => s.trim().parse::<f64>().map(V::Real).unwrap_or(V::Null),
                _ => V::Null,
            },
            "BOOLEAN" => match &v {
                V::Integer(i) => V::Integer((*i != 0) as i64),
                V::Text(s) if s.eq_ignore_ascii_case("true") => V::Integer(1),
                V::Text(s) if s.eq_ignore_ascii_case("false") => V::Integer(0),
                _ => V::Null,
            },
            "DATE" => text(&v)
                .and_then(|s| parse_date(&s))
                .map(V::Text)
                .unwrap_or(V::Null),
            "TIMESTAMP" | "TIMESTAMP_NTZ" | "TIMESTAMP_LTZ" => match &v {
                V::Text(s) => parse_ts(s).map(|us| V::Text(fmt_ts(us))).unwrap_or(V::Null),
                V::Integer(secs) => V::Text(fmt_ts(secs.saturating_mul(1_000_000))),
                _ => V::Null,
            },
            other => {
                return Err(rusqlite::Error::UserFunctionError(
                    format!(
                        "[UNSUPPORTED_DATATYPE] CAST to {other} is not supported by the emulator"
                    )
                    .into(),
                ))
            }
        })
    })?;
    // Spark's `left(str, len)`: the first `len` characters (none when `len` <= 0).
    conn.create_scalar_function("emu_left", 2, det, |ctx| {
        Ok(match (arg_text(ctx, 0), arg_i64(ctx, 1)) {
            (Some(s), Some(n)) => Some(match usize::try_from(n) {
                Ok(n) => s.chars().take(n).collect::<String>(),
                Err(_) => String::new(),
            }),
            _ => None,
        })
    })?;
    // Spark's `octet_length(str)`: bytes of its UTF-8 form (SQLite's `length` counts characters,
    // as Spark's does).
    conn.create_scalar_function("octet_length", 1, det, |ctx| {
        Ok(arg_text(ctx, 0).map(|s| s.len() as i64))
    })?;
    // MAP<STRING,STRING> columns are kept as JSON object text. `element_at(map, key)`: the value
    // (NULL when the key is absent); `map_keys(map)`: the keys as an ARRAY<STRING> (JSON text).
    conn.create_scalar_function("element_at", 2, det, |ctx| {
        let map = arg_text(ctx, 0).and_then(|m| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&m).ok()
        });
        Ok(match (map, arg_text(ctx, 1)) {
            (Some(m), Some(k)) => m.get(&k).and_then(|v| match v {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            }),
            _ => None,
        })
    })?;
    conn.create_scalar_function("map_keys", 1, det, |ctx| {
        Ok(arg_text(ctx, 0)
            .and_then(|m| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&m).ok()
            })
            .map(|m| serde_json::Value::from(m.keys().cloned().collect::<Vec<_>>()).to_string()))
    })?;
    conn.create_scalar_function("size", 1, det, |ctx| {
        Ok(match arg_text(ctx, 0) {
            Some(s) => match serde_json::from_str::<serde_json::Value>(&s) {
                Ok(serde_json::Value::Array(a)) => a.len() as i64,
                Ok(serde_json::Value::Object(o)) => o.len() as i64,
                _ => -1,
            },
            None => -1,
        })
    })?;
    conn.create_scalar_function("array_contains", 2, det, |ctx| {
        let arr = arg_text(ctx, 0);
        let needle = arg_text(ctx, 1);
        Ok(match (arr, needle) {
            (Some(a), Some(n)) => match serde_json::from_str::<Vec<serde_json::Value>>(&a) {
                Ok(v) => Some(v.iter().any(|x| x.as_str() == Some(n.as_str()) || *x == n)),
                Err(_) => None,
            },
            _ => None,
        })
    })?;
    for (name, want_null) in [("isnull", true), ("isnotnull", false)] {
        conn.create_scalar_function(name, 1, det, move |ctx| {
            let is_null = matches!(ctx.get_raw(0), rusqlite::types::ValueRef::Null);
            Ok(is_null == want_null)
        })?;
    }
    conn.create_scalar_function("nvl", 2, det, |ctx| {
        let a: rusqlite::types::Value = ctx.get(0)?;
        if matches!(a, rusqlite::types::Value::Null) {
            ctx.get::<rusqlite::types::Value>(1)
        } else {
            Ok(a)
        }
    })?;
    for (name, greatest) in [("greatest", true), ("least", false)] {
        conn.create_scalar_function(name, -1, det, move |ctx| {
            let mut best: Option<rusqlite::types::Value> = None;
            for i in 0..ctx.len() {
                let v: rusqlite::types::Value = ctx.get(i)?;
                if matches!(v, rusqlite::types::Value::Null) {
                    continue;
                }
                best = Some(match best {
                    None => v,
                    Some(b) => {
                        let better = match (&v, &b) {
                            (
                                rusqlite::types::Value::Integer(x),
                                rusqlite::types::Value::Integer(y),
                            ) => (x > y) == greatest,
                            (rusqlite::types::Value::Real(x), rusqlite::types::Value::Real(y)) => {
                                (x > y) == greatest
                            }
                            (rusqlite::types::Value::Text(x), rusqlite::types::Value::Text(y)) => {
                                (x > y) == greatest
                            }
                            _ => false,
                        };
                        if better {
                            v
                        } else {
                            b
                        }
                    }
                });
            }
            Ok(best.unwrap_or(rusqlite::types::Value::Null))
        })?;
    }
    Ok(())
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::config::DbConfig;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DQS_DML, false)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DQS_DDL, false)?;
    conn.pragma_update(None, "case_sensitive_like", true)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    Ok(())
}

/// When the scenario traces of an OTel span table land, after the anchor (30 days): tests that
/// set `EmulatorConfig::anchor_us` 30 days back see them land a few seconds after the start.
/// With the anchor at now they land in 30 days: never seen by other tests.
pub(crate) const OTEL_SCENARIO_OFFSET_US: i64 = 30 * 86_400_000_000;

/// A scenario span row: (trace, span, parent, span type, start, end, status, events, landed).
type ScenarioSpan<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    &'a str,
    i64,
    i64,
    String,
    String,
    i64,
);

/// The rows of an OTel span table: one trace per agent (up to 8), each a root AGENT span and a
/// TOOL span, all landed a few minutes before the anchor; then the scenario traces, landing
/// [`OTEL_SCENARIO_OFFSET_US`] after the anchor (+1 s to +4 s, by the clock):
/// - `tr-long-run`: a 3-hour run whose root row lands at its end (+2 s); its TOOL span landed
///   hours before, at its own end.
/// - `tr-late-child`: a 10-second run whose root lands at +1 s and whose failed TOOL span (an
///   `exception` event, no status message) is exported after it, at +4 s.
fn insert_otel_spans(
    tx: &rusqlite::Transaction<'_>,
    phys: &str,
    l: &Layout,
    now: i64,
    rng: &mut Rng,
    otel_output_bytes: usize,
) -> Result<(), EmulatorError> {
    let mut st = tx.prepare(&format!(
        "INSERT INTO {phys} (trace_id, span_id, parent_span_id, name, kind, start_time_unix_nano, \
         end_time_unix_nano, attributes, status, events, landed_ns) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))?;
    // As Databricks' OTel tables hold them: `status` is a struct and `events` an array of
    // structs, which the SQL API returns as JSON text; writers store a root's parent as NULL
    // or as ''.
    let status = |code: &str, message: &str| {
        serde_json::json!({"code": code, "message": message}).to_string()
    };
    let exception = |ty: &str, message: &str, at_ns: i64| {
        serde_json::json!([{"time_unix_nano": at_ns, "name": "exception", "attributes": {
            "exception.type": ty, "exception.message": message}, "dropped_attributes_count": 0}])
        .to_string()
    };
    let agent_attr = serde_json::json!({"mlflow.spanType": "AGENT"}).to_string();
    for (k, agent) in l.agents.iter().enumerate().take(8) {
        let trace = format!("tr-{}", rng.hex(32));
        let root = rng.hex(16);
        // Every root ended minutes ago: a trace is read once its root has settled.
        let start = (now - (k as i64 + 1) * 60_000_000 - 180_000_000) * 1000;
        st.execute(params![
            trace,
            root,
            (k % 2 == 1).then_some(""),
            agent.name,
            "SPAN_KIND_SERVER",
            start,
            start + 900_000_000,
            agent_attr,
            status("STATUS_CODE_OK", ""),
            "[]",
            Option::<i64>::None
        ])?;
        let tool = agent.tools.first().cloned().unwrap_or_default();
        let (tool_status, events) = if k == 2 {
            (
                status("STATUS_CODE_ERROR", "upstream timeout"),
                exception("TimeoutError", "upstream timeout", start + 300_000_000),
            )
        } else {
            (status("STATUS_CODE_OK", ""), "[]".to_string())
        };
        let mut attributes = serde_json::json!({"mlflow.spanType": "TOOL", "mlflow.spanInputs": "{\"query\":\"status\"}"});
        if k == 1 && otel_output_bytes > 0 {
            // A tool that returned a large document (JSON text, quotes escaped once more
            // inside the map's JSON).
            let rows = "{\"line\":\"lorem ipsum dolor\"},".repeat(otel_output_bytes / 29 + 1);
            attributes["mlflow.spanOutputs"] =
                format!("{{\"rows\":[{}]}}", rows.trim_end_matches(',')).into();
        }
        st.execute(params![
            trace,
            rng.hex(16),
            root,
            tool,
            "SPAN_KIND_INTERNAL",
            start + 100_000_000,
            start + 300_000_000,
            attributes.to_string(),
            tool_status,
            events,
            Option::<i64>::None
        ])?;
        // The oldest trace gets a second root span, the newest of all (a follow-up run in the
        // same trace): it is still one trace.
        if k + 1 == l.agents.len().min(8) {
            let again = (now - 180_000_000) * 1000;
            st.execute(params![
                trace,
                rng.hex(16),
                Option::<String>::None,
                agent.name,
                "SPAN_KIND_SERVER",
                again,
                again + 100_000_000,
                agent_attr,
                status("STATUS_CODE_OK", ""),
                "[]",
                Option::<i64>::None
            ])?;
        }
    }
    let Some(agent) = l.agents.first() else {
        return Ok(());
    };
    let tool = agent
        .tools
        .first()
        .cloned()
        .unwrap_or_else(|| "lookup".into());
    let at = (now + OTEL_SCENARIO_OFFSET_US) * 1000;
    let tool_attr = serde_json::json!({"mlflow.spanType": "TOOL", "mlflow.spanInputs": "{\"order_id\":\"42\"}"}).to_string();
    // (trace, span, parent, span type, start, end, status, events, landed)
    let long_start = at - 3 * 3_600_000_000_000;
    let late_start = at - 10_000_000_000;
    let ok = status("STATUS_CODE_OK", "");
    let rows: [ScenarioSpan<'_>; 4] = [
        (
            "tr-long-run",
            "long-root",
            None,
            "AGENT",
            long_start,
            at + 2_000_000_000,
            ok.clone(),
            "[]".into(),
            at + 2_000_000_000,
        ),
        (
            "tr-long-run",
            "long-tool",
            Some("long-root"),
            "TOOL",
            long_start + 1_000_000_000,
            long_start + 61_000_000_000,
            ok.clone(),
            "[]".into(),
            long_start + 61_000_000_000,
        ),
        (
            "tr-late-child",
            "late-root",
            None,
            "AGENT",
            late_start,
            at + 1_000_000_000,
            ok,
            "[]".into(),
            at + 1_000_000_000,
        ),
        (
            "tr-late-child",
            "late-tool",
            Some("late-root"),
            "TOOL",
            late_start + 1_000_000_000,
            late_start + 2_000_000_000,
            status("STATUS_CODE_ERROR", ""),
            exception(
                "ValueError",
                "order 42 not found",
                late_start + 2_000_000_000,
            ),
            at + 4_000_000_000,
        ),
    ];
    for (trace, span, parent, ty, start, end, st_json, events, landed) in rows {
        let (name, attributes) = if ty == "AGENT" {
            (agent.name.as_str(), agent_attr.clone())
        } else {
            (tool.as_str(), tool_attr.clone())
        };
        st.execute(params![
            trace,
            span,
            parent,
            name,
            "SPAN_KIND_INTERNAL",
            start,
            end,
            attributes,
            st_json,
            events,
            landed
        ])?;
    }
    Ok(())
}

fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

impl Store {
    /// Create the database, the schema and the initial rows.
    pub(crate) fn open(
        layout: Arc<Layout>,
        (payload_bytes, otel_output_bytes): (usize, usize),
        seed: u64,
        initial_rows: usize,
        anchor_us: i64,
    ) -> Result<Store, EmulatorError> {
        let dir = tempfile::tempdir().map_err(|e| {
            EmulatorError::Storage(format!("cannot create a temporary directory: {e}"))
        })?;
        let path = dir.path().join("workspace.sqlite");
        let writer = Connection::open(&path)?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        writer.pragma_update(None, "synchronous", "OFF")?;
        writer.pragma_update(None, "cache_size", -131072i64)?;
        configure(&writer)?;
        register_functions(&writer, &layout, payload_bytes)?;
        let store = Store {
            _dir: dir,
            path,
            writer: Mutex::new(writer),
            readers: Vec::new(),
            next_reader: AtomicUsize::new(0),
            layout,
            payload_bytes,
            otel_output_bytes,
            rng: Mutex::new(Rng::new(seed ^ 0xD47A)),
            rows_total: AtomicU64::new(0),
            mirrored: Vec::new(),
            anchor_us,
            streamed_span_documents: Mutex::new(Default::default()),
        };
        store.create_schema()?;
        store.insert_rows(initial_rows, anchor_us - 3_600_000_000, anchor_us)?;
        store.create_indexes()?;
        let mirrored = store.find_mirrored()?;
        // The bulk load is done: a small writer cache is enough from now on.
        lock(&store.writer).pragma_update(None, "cache_size", -16384i64)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let c = Connection::open_with_flags(
                &store.path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            configure(&c)?;
            c.pragma_update(None, "cache_size", -16384i64)?;
            register_functions(&c, &store.layout, store.payload_bytes)?;
            readers.push(Mutex::new(c));
        }
        Ok(Store {
            readers,
            mirrored,
            ..store
        })
    }

    /// The rows of `agent` that MLflow traces mirror (empty for an unknown agent).
    pub(crate) fn mirrored(&self, agent: usize) -> &[MirroredRow] {
        self.mirrored.get(agent).map_or(&[], Vec::as_slice)
    }

    /// Chooses, per agent, the first initial rows (insertion order) that succeeded, logged both
    /// payloads and made a tool call: deterministic for a seed.
    fn find_mirrored(&self) -> Result<Vec<Vec<MirroredRow>>, EmulatorError> {
        let l = &self.layout;
        let w = lock(&self.writer);
        let mut out = Vec::with_capacity(l.agents.len());
        for a in &l.agents {
            let Some(t) = l.tables.get(a.table) else {
                out.push(Vec::new());
                continue;
            };
            let time = if t.kind == TableKind::Legacy {
                "timestamp_ms"
            } else {
                "request_time"
            };
            let mut st = w.prepare(&format!(
                "SELECT databricks_request_id, client_request_id, {time}, status_code, g, f \
                 FROM {} ORDER BY rowid LIMIT 200",
                t.phys
            ))?;
            let mut rows = st.query([])?;
            let mut found = Vec::new();
            while let Some(r) = rows.next()? {
                let (status, seed, flags): (i64, i64, i64) = (r.get(3)?, r.get(4)?, r.get(5)?);
                let t_us = match r.get_ref(2)? {
                    rusqlite::types::ValueRef::Integer(ms) => Some(ms.saturating_mul(1000)),
                    rusqlite::types::ValueRef::Text(s) => parse_ts(&String::from_utf8_lossy(s)),
                    _ => None,
                };
                let spec = PayloadSpec {
                    format: a.format,
                    agent: &a.name,
                    tools: &a.tools,
                    seed: seed as u64,
                    status,
                    flags,
                    payload_bytes: self.payload_bytes,
                };
                let (Some(t_us), true) = (t_us, status == 200 && flags == 0) else {
                    continue;
                };
                if payload::tool_call(&spec).is_none() {
                    continue;
                }
                found.push(MirroredRow {
                    request_id: r.get(0)?,
                    client_request_id: r.get(1)?,
                    t_us,
                    seed: seed as u64,
                });
                if found.len() == MIRRORED_PER_AGENT {
                    break;
                }
            }
            out.push(found);
        }
        Ok(out)
    }

    /// The SQLite name (a view) of a UC table.
    pub(crate) fn view_name(&self, table: &str) -> String {
        self.layout.full_name(table)
    }

    fn create_schema(&self) -> Result<(), EmulatorError> {
        let w = lock(&self.writer);
        let l = &self.layout;
        let customers_phys = l
            .tables
            .iter()
            .find(|t| t.kind == TableKind::Customers)
            .map(|t| t.phys.clone())
            .unwrap_or_default();
        let mut sql = String::new();
        for t in &l.tables {
            let view = q(&self.view_name(&t.name));
            let agent = t.agent.map(|a| a as i64).unwrap_or(-1);
            let p = &t.phys;
            match t.kind {
                TableKind::AiGateway => {
                    sql.push_str(&format!(
                        "CREATE TABLE {p} (databricks_request_id TEXT NOT NULL, request_date DATE_TEXT, client_request_id TEXT, \
                         request_time TIMESTAMP_TEXT, status_code INT, sampling_fraction DOUBLE, execution_duration_ms BIGINT, \
                         logging_error_codes ARRAY_TEXT, served_entity_id TEXT, requester TEXT, g INTEGER, f INTEGER);\n\
                         CREATE VIEW {view} AS SELECT databricks_request_id, request_date, client_request_id, request_time, \
                         status_code, sampling_fraction, execution_duration_ms, emu_payload(0, {agent}, g, status_code, f) AS request, \
                         emu_payload(1, {agent}, g, status_code, f) AS response, logging_error_codes, served_entity_id, requester FROM {p};\n"
                    ));
                }
                TableKind::Legacy => {
                    sql.push_str(&format!(
                        "CREATE TABLE {p} (databricks_request_id TEXT NOT NULL, client_request_id TEXT, date DATE_TEXT, \
                         timestamp_ms BIGINT, status_code INT, execution_time_ms BIGINT, sampling_fraction DOUBLE, g INTEGER, f INTEGER);\n\
                         CREATE VIEW {view} AS SELECT databricks_request_id, client_request_id, date, timestamp_ms, status_code, \
                         execution_time_ms, emu_payload(0, {agent}, g, status_code, f) AS request, \
                         emu_payload(1, {agent}, g, status_code, f) AS response, sampling_fraction, emu_meta({agent}) AS request_metadata FROM {p};\n"
                    ));
                }
                TableKind::Customers => {
                    sql.push_str(&format!(
                        "CREATE TABLE {p} (customer_id BIGINT NOT NULL, name TEXT, email TEXT, created_at TIMESTAMP_TEXT);\n\
                         CREATE VIEW {view} AS SELECT customer_id, name, email, created_at FROM {p};\n"
                    ));
                }
                TableKind::View => {
                    sql.push_str(&format!(
                        "CREATE VIEW {view} AS SELECT customer_id, email FROM {customers_phys} WHERE email IS NOT NULL;\n"
                    ));
                }
                TableKind::OtelSpans => {
                    sql.push_str(&format!(
                        // A span row is visible once it has landed (`landed_ns`, hidden: the
                        // scenario spans of `insert_otel_spans` land at their time, by the clock).
                        "CREATE TABLE {p} (trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_span_id TEXT, name TEXT, kind TEXT, \
                         start_time_unix_nano BIGINT, end_time_unix_nano BIGINT, attributes MAP_TEXT, status TEXT, events EVENTS_TEXT, \
                         landed_ns BIGINT);\n\
                         CREATE VIEW {view} AS SELECT trace_id, span_id, parent_span_id, name, kind, start_time_unix_nano, \
                         end_time_unix_nano, attributes, status, events FROM {p} WHERE landed_ns IS NULL OR landed_ns <= emu_now_ns();\n"
                    ));
                }
            }
        }
        w.execute_batch(&sql)?;
        // Static distractor contents.
        let mut rng = Rng::new(0xC0FFEE);
        let tx = w.unchecked_transaction()?;
        let now = self.anchor_us;
        for t in &l.tables {
            match t.kind {
                TableKind::Customers => {
                    let mut st =
                        tx.prepare(&format!("INSERT INTO {} VALUES (?1, ?2, ?3, ?4)", t.phys))?;
                    for i in 0..25i64 {
                        let first = rng.pick(&["Ana", "Ben", "Chen", "Dara", "Eli", "Fay"]);
                        let email = (i % 5 != 0)
                            .then(|| format!("{}{}@example.com", first.to_lowercase(), i));
                        st.execute(params![
                            1000 + i,
                            first,
                            email,
                            fmt_ts(now - (i + 1) * 86_400_000_000)
                        ])?;
                    }
                }
                TableKind::OtelSpans => {
                    insert_otel_spans(&tx, &t.phys, l, now, &mut rng, self.otel_output_bytes)?;
                }
                TableKind::AiGateway if t.agent.is_none() => {
                    insert_ai_rows(
                        &tx,
                        &t.phys,
                        None,
                        20,
                        now - 3_600_000_000,
                        now,
                        &mut rng,
                        l,
                    )?;
                }
                _ => {}
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn create_indexes(&self) -> Result<(), EmulatorError> {
        let w = lock(&self.writer);
        let mut sql = String::new();
        for t in &self.layout.tables {
            let p = &t.phys;
            match t.kind {
                TableKind::AiGateway => sql.push_str(&format!(
                    "CREATE INDEX IF NOT EXISTS {p}_t ON {p}(request_time, databricks_request_id);\n\
                     CREATE INDEX IF NOT EXISTS {p}_i ON {p}(databricks_request_id);\n"
                )),
                TableKind::Legacy => sql.push_str(&format!(
                    "CREATE INDEX IF NOT EXISTS {p}_t ON {p}(timestamp_ms, databricks_request_id);\n\
                     CREATE INDEX IF NOT EXISTS {p}_i ON {p}(databricks_request_id);\n"
                )),
                _ => {}
            }
        }
        w.execute_batch(&sql)?;
        w.execute_batch("ANALYZE;")?;
        Ok(())
    }

    /// Append `rows` executions with request times uniform in `[from_us, to_us)`.
    pub(crate) fn insert_rows(
        &self,
        rows: usize,
        from_us: i64,
        to_us: i64,
    ) -> Result<(), EmulatorError> {
        let l = &self.layout;
        if rows == 0 || l.agents.is_empty() {
            return Ok(());
        }
        let w = lock(&self.writer);
        let mut rng = lock(&self.rng);
        // Split rows per agent first so each table gets one prepared statement.
        let mut per_agent = vec![0usize; l.agents.len()];
        for _ in 0..rows {
            per_agent[rng.below(l.agents.len() as u64) as usize] += 1;
        }
        let tx = w.unchecked_transaction()?;
        for (a, n) in per_agent.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            let t = &l.tables[l.agents[a].table];
            if t.kind == TableKind::Legacy {
                insert_legacy_rows(&tx, &t.phys, a, *n, from_us, to_us, &mut rng)?;
            } else {
                insert_ai_rows(&tx, &t.phys, Some(a), *n, from_us, to_us, &mut rng, l)?;
            }
        }
        tx.commit()?;
        self.rows_total.fetch_add(rows as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Logs one trace to the OTel span table, ended at `end_us`, its rows visible at once: a root
    /// AGENT span of the first agent and a CHAT_MODEL span of a streamed generation, which
    /// MLflow records chunk by chunk as span events (`mlflow.chunk.item.N`): at least
    /// `event_bytes` of `events`, while its attributes stay small. Returns the trace id.
    pub(crate) fn insert_streamed_generation(
        &self,
        event_bytes: usize,
        end_us: i64,
    ) -> Result<String, EmulatorError> {
        let l = &self.layout;
        let Some(table) = l.tables.iter().find(|t| t.kind == TableKind::OtelSpans) else {
            return Err(EmulatorError::Storage(
                "the workspace has no OTel span table to log a trace to".into(),
            ));
        };
        let agent = l
            .agents
            .first()
            .map_or_else(|| "agent".to_string(), |a| a.name.clone());
        let (trace, root, llm) = {
            let mut rng = lock(&self.rng);
            (format!("tr-{}", rng.hex(32)), rng.hex(16), rng.hex(16))
        };
        let end = end_us.saturating_mul(1000);
        let (start, llm_start, llm_end) =
            (end - 5_000_000_000, end - 4_500_000_000, end - 500_000_000);
        let mut events = Vec::new();
        let mut size = 2usize;
        while size < event_bytes {
            let i = events.len() as i64;
            let chunk =
                serde_json::json!({"choices": [{"delta": {"content": "lorem ipsum dolor "}}]});
            let e = serde_json::json!({"time_unix_nano": llm_start + i * 1_000_000,
                "name": format!("mlflow.chunk.item.{i}"),
                "attributes": {"mlflow.chunk.value": chunk.to_string()},
                "dropped_attributes_count": 0});
            size += e.to_string().len() + 1;
            events.push(e);
        }
        let ok = serde_json::json!({"code": "STATUS_CODE_OK", "message": ""}).to_string();
        let root_attr = serde_json::json!({"mlflow.spanType": "AGENT"}).to_string();
        let llm_attr = serde_json::json!({"mlflow.spanType": "CHAT_MODEL",
            "mlflow.spanInputs": "{\"messages\":[{\"role\":\"user\",\"content\":\"write a poem\"}]}",
            "mlflow.spanOutputs": "\"lorem ipsum dolor\""})
        .to_string();
        let w = lock(&self.writer);
        let tx = w.unchecked_transaction()?;
        {
            let mut st = tx.prepare(&format!(
                "INSERT INTO {} (trace_id, span_id, parent_span_id, name, kind, \
                 start_time_unix_nano, end_time_unix_nano, attributes, status, events, landed_ns) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULL)",
                table.phys
            ))?;
            st.execute(params![
                trace,
                root,
                Option::<String>::None,
                agent,
                "SPAN_KIND_SERVER",
                start,
                end,
                root_attr,
                ok,
                "[]"
            ])?;
            st.execute(params![
                trace,
                llm,
                root,
                "databricks-meta-llama-3-3-70b-instruct",
                "SPAN_KIND_CLIENT",
                llm_start,
                llm_end,
                llm_attr,
                ok,
                serde_json::Value::Array(events).to_string()
            ])?;
        }
        tx.commit()?;
        Ok(trace)
    }

    /// From now on the span document of MLflow trace `trace_id` is served streamed, without a
    /// Content-Length, `pad_bytes` of padding ahead of its spans.
    pub(crate) fn stream_span_document(&self, trace_id: &str, pad_bytes: usize) {
        lock(&self.streamed_span_documents).insert(trace_id.to_string(), pad_bytes);
    }

    /// The padding of a span document served streamed ([`Self::stream_span_document`]); `None`
    /// when it is served whole, with its Content-Length.
    pub(crate) fn streamed_span_document(&self, trace_id: &str) -> Option<usize> {
        lock(&self.streamed_span_documents).get(trace_id).copied()
    }

    pub(crate) fn rows_total(&self) -> u64 {
        self.rows_total.load(Ordering::Relaxed)
    }

    /// Run `f` on a free read-only connection (blocking; call from a blocking thread).
    pub(crate) fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        let n = self.readers.len();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            if let Ok(c) = self.readers[(start + k) % n].try_lock() {
                return f(&c);
            }
        }
        let c = lock(&self.readers[start % n]);
        f(&c)
    }

    /// Every visible row of the agents' inference tables.
    /// The tool call of every visible inference row that made one (successful, response logged),
    /// as its response carries it: ground truth for tool call records.
    pub(crate) fn row_tool_calls(&self) -> Result<Vec<crate::RowToolCall>, EmulatorError> {
        let l = self.layout.clone();
        let payload_bytes = self.payload_bytes;
        self.with_reader(|c| {
            let mut out = Vec::new();
            for t in l.tables.iter().filter(|t| t.ground_truth) {
                let Some(agent) = t.agent.and_then(|a| l.agents.get(a)) else {
                    continue;
                };
                if !matches!(t.kind, TableKind::AiGateway | TableKind::Legacy) {
                    continue;
                }
                let sql = format!(
                    "SELECT databricks_request_id, g, status_code, f FROM {}",
                    t.phys
                );
                let mut st = c.prepare(&sql)?;
                let mut rows = st.query([])?;
                while let Some(r) = rows.next()? {
                    let id: String = r.get(0)?;
                    let spec = PayloadSpec {
                        format: agent.format,
                        agent: &agent.name,
                        tools: &agent.tools,
                        seed: r.get::<_, i64>(1)? as u64,
                        status: r.get::<_, Option<i64>>(2)?.unwrap_or(200),
                        flags: r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                        payload_bytes,
                    };
                    if spec.status >= 400 || spec.flags & payload::FLAG_RESPONSE_TOO_LARGE != 0 {
                        continue;
                    }
                    if let Some((call_id, tool, arguments, _)) = payload::tool_call(&spec) {
                        out.push(crate::RowToolCall {
                            table: l.full_name(&t.name),
                            databricks_request_id: id,
                            tool_call_id: call_id,
                            tool,
                            arguments,
                            streamed: payload::streamed(&spec),
                        });
                    }
                }
            }
            Ok(out)
        })
    }

    pub(crate) fn ground_truth(&self) -> Result<Vec<GroundTruthRow>, EmulatorError> {
        let l = self.layout.clone();
        self.with_reader(|c| {
            let mut out = Vec::new();
            for t in l.tables.iter().filter(|t| t.ground_truth) {
                let table = l.full_name(&t.name);
                let sql = if t.kind == TableKind::Legacy {
                    format!(
                        "SELECT databricks_request_id, timestamp_ms * 1000 FROM {}",
                        t.phys
                    )
                } else {
                    format!("SELECT databricks_request_id, request_time FROM {}", t.phys)
                };
                let mut st = c.prepare(&sql)?;
                let mut rows = st.query([])?;
                while let Some(r) = rows.next()? {
                    let id: String = r.get(0)?;
                    let time = match r.get_ref(1)? {
                        rusqlite::types::ValueRef::Integer(us) => fmt_ts(us),
                        rusqlite::types::ValueRef::Text(s) => {
                            String::from_utf8_lossy(s).into_owned()
                        }
                        _ => String::new(),
                    };
                    out.push(GroundTruthRow {
                        table: table.clone(),
                        databricks_request_id: id,
                        request_time: time,
                    });
                }
            }
            Ok(out)
        })
    }
}

struct RowBase {
    id: String,
    client_request_id: Option<String>,
    t_us: i64,
    status: i64,
    duration: i64,
    flags: i64,
    seed: i64,
}

fn row_base(rng: &mut Rng, from_us: i64, to_us: i64) -> RowBase {
    let span = (to_us - from_us).max(1) as u64;
    let t_us = from_us + rng.below(span) as i64;
    let status = if rng.chance(950) {
        200
    } else {
        [400, 429, 500, 503][rng.below(4) as usize]
    };
    let flags = if rng.chance(10) {
        if rng.chance(500) {
            payload::FLAG_REQUEST_TOO_LARGE
        } else {
            payload::FLAG_RESPONSE_TOO_LARGE
        }
    } else {
        0
    };
    RowBase {
        id: rng.uuid(),
        client_request_id: (!rng.chance(300)).then(|| format!("cr-{}", rng.hex(12))),
        t_us,
        status,
        duration: 40 + rng.below(8000) as i64,
        flags,
        seed: rng.next_u64() as i64,
    }
}

#[allow(clippy::too_many_arguments)]
fn insert_ai_rows(
    tx: &rusqlite::Transaction<'_>,
    phys: &str,
    agent: Option<usize>,
    n: usize,
    from_us: i64,
    to_us: i64,
    rng: &mut Rng,
    l: &Layout,
) -> Result<(), EmulatorError> {
    let mut st = tx.prepare_cached(&format!(
        "INSERT INTO {phys} VALUES (?1, ?2, ?3, ?4, ?5, 1.0, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))?;
    let served = agent
        .and_then(|a| l.agents.get(a))
        .map(|a| a.served_entity_id.clone());
    for _ in 0..n {
        let b = row_base(rng, from_us, to_us);
        let codes = if b.flags & payload::FLAG_REQUEST_TOO_LARGE != 0 {
            "[\"MAX_REQUEST_SIZE_EXCEEDED\"]"
        } else if b.flags & payload::FLAG_RESPONSE_TOO_LARGE != 0 {
            "[\"MAX_RESPONSE_SIZE_EXCEEDED\"]"
        } else {
            "[]"
        };
        let requester = if rng.chance(100) {
            None
        } else {
            Some(format!(
                "{}@example.com",
                rng.pick(&["alice", "bob", "carol", "dave", "svc-agent"])
            ))
        };
        st.execute(params![
            b.id,
            fmt_date(b.t_us),
            b.client_request_id,
            fmt_ts(b.t_us),
            b.status,
            b.duration,
            codes,
            served,
            requester,
            b.seed,
            b.flags
        ])?;
    }
    Ok(())
}

fn insert_legacy_rows(
    tx: &rusqlite::Transaction<'_>,
    phys: &str,
    _agent: usize,
    n: usize,
    from_us: i64,
    to_us: i64,
    rng: &mut Rng,
) -> Result<(), EmulatorError> {
    let mut st = tx.prepare_cached(&format!(
        "INSERT INTO {phys} VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1.0, ?7, ?8)"
    ))?;
    for _ in 0..n {
        let b = row_base(rng, from_us, to_us);
        // Millisecond precision in legacy tables.
        let ms = b.t_us.div_euclid(1000);
        st.execute(params![
            b.id,
            b.client_request_id,
            fmt_date(b.t_us),
            ms,
            b.status,
            b.duration,
            b.seed,
            b.flags
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_sort() {
        let a = parse_ts("2026-11-29T08:33:00Z").unwrap_or(0);
        assert_eq!(fmt_ts(a), "2026-11-29T08:33:00.000000Z");
        assert_eq!(parse_ts("2026-11-29 08:33:00.5"), Some(a + 500_000));
        assert_eq!(parse_ts("2026-11-29T10:33:00+02:00"), Some(a));
        assert_eq!(
            parse_date("2026-11-29T23:59:59Z").as_deref(),
            Some("2026-11-29")
        );
        assert!(parse_ts("yesterday").is_none());
        assert!(fmt_ts(a) < fmt_ts(a + 1));
    }
}
