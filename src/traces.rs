//! Traces: what agents did inside one execution (LLM calls, tool calls, retrievals), read from
//! MLflow experiments and UC OTel span tables and turned into Akto records.
//!
//! Why a module of its own: inference tables show one request and one response per execution;
//! MLflow traces show each step with its own inputs, outputs, timing and errors. Each LLM
//! (`LLM`, `CHAT_MODEL`), `TOOL` and `RETRIEVER` span becomes one record on the agent's host, so
//! it lands in the agent's Akto collection, linked to its trace by `x-mlflow-trace-id`. For an
//! agent with no inference table (an app known only from its traces) the root span is its
//! execution record too.
//!
//! Exactly once, like table rows: one unit per trace (id = trace id, time = trace start; a long
//! run's end, see below) in the state namespace `mlflow:<experiment id>` (OTel tables: the
//! table's full name, time = its newest root span's end). The cursor is the newest delivered
//! `(time, trace id)`; traces appear late (they are exported when they end), so each read also
//! looks `lookback` behind the last complete read and skips ids already delivered.
//!
//! Long runs: MLflow 3 clients log a trace only when its root span ends, already final, with
//! its start as `request_time`, so a run longer than the lookback starts before the window by
//! the time it appears. A second search per experiment takes the runs longer than half the
//! lookback started up to `MAX_RUN_US` before the window that ended in it; such a trace is keyed
//! by its end whichever search finds it (and looked up under its start and its end), so it is
//! kept in state as long as either can find it. OTel span tables list roots by their end (a
//! root's row lands when it ends), and read a trace once its root ended `SETTLE_US` ago (spans
//! exported after their root are not lost).
//!
//! A trace is never committed with less than it has. Its spans not found yet (404: not uploaded,
//! a race with its end) leave it out of the read, for the next cycle's late window; only on its
//! last read before it leaves the window is it sent as its summary (the search's previews).
//! Span data refused (403, or authentication) fails the experiment's source with the fix. A
//! span-table result cut at the statement byte limit is read again in halves, down to one trace
//! paged by span id. The search pages by offset, so a trace is also sent at most once per read
//! (a trace logged while paging shifts the pages). An `IN_PROGRESS` trace is read when it has
//! ended: until then its start holds the experiment's read mark back (`TableStats::hold_from`),
//! so the late window still reaches it however long it runs, up to `MAX_CATCHUP_HOURS`.
//!
//! A TOOL span and an inference row can describe the same tool call (same `x-tool-call-id` on
//! the same agent host): the delivery stage sends it once, and reads these sources before the
//! inference tables so that the trace's record, which has timing and errors, is the one sent
//! (see `run`'s module doc, including the one case where the row's record wins).
//!
//! Architecture Invariant: like `collect`, this module never writes state and never sends; it
//! emits [`Chunk`]s of [`Prepared`] units, oldest first, to the delivery stage.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::collect::{
    format_timestamp, quote_table, Chunk, CollectError, CollectOptions, Prepared, TableStats,
};
use crate::databricks::mlflow::{SpanDownload, TraceInfo, MAX_SPAN_DOCUMENT_BYTES};
use crate::databricks::sql::{Cell, Param, Statement};
use crate::databricks::{DatabricksClient, DatabricksError};
use crate::discovery::{normalize_name, Agent, Inventory};
use crate::state::StateStore;
use crate::traffic::host::{encode_segment, tool_path};
use crate::traffic::record::{
    fit, fit_pair, fit_text, reason_phrase, JsonObject, MAX_RECORD_PAYLOAD_BYTES, MAX_STRING_BYTES,
};
use crate::traffic::AktoRecord;

/// Traces searched per page (and units per chunk).
const PAGE: usize = 100;
/// Concurrent span downloads per experiment.
const DOWNLOADS: usize = 8;

/// The state namespace of an experiment's traces.
pub fn experiment_namespace(experiment_id: &str) -> String {
    format!("mlflow:{experiment_id}")
}

/// One agent's experiment, as the collector needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSource {
    pub experiment_id: String,
    /// The inventory agent name (tag `ai-agent`, per-agent counts).
    pub agent: String,
    /// The agent's Akto host ([`Inventory::agent_host`]: unique among the agents).
    pub host: String,
    /// For agents without an inference table: the path of the execution record built from the
    /// root span. `None` when the table already provides execution records.
    pub execution_path: Option<String>,
}

/// The experiments to read: one per agent that has one, in inventory order. An agent out of
/// this instance's scope (its Unity Catalog anchor is outside catalog.schema and prefix) has
/// none: discovery decides that (`discovery::find_experiments`), so another instance's traces are
/// never read here.
pub fn trace_sources(inv: &Inventory, workspace_host: &str) -> Vec<TraceSource> {
    inv.agents
        .iter()
        .filter_map(|a| {
            let exp = a.experiment_id.clone()?;
            Some(TraceSource {
                experiment_id: exp,
                agent: a.name.clone(),
                host: inv.agent_host(inv.trace_agent(&a.name), workspace_host),
                execution_path: execution_path(a)
                    .filter(|_| !inv.shared_tables.contains_key(&a.name)),
            })
        })
        .collect()
}

/// The path of the execution record built from an agent's root span: `None` when its inference
/// table already provides execution records. The same for MLflow and OTel traces, so one agent's
/// executions land on one API in Akto, the one its endpoint or app is known by.
fn execution_path(a: &Agent) -> Option<String> {
    a.table.is_none().then(|| match (&a.endpoint, &a.app) {
        (Some(e), _) => format!("/serving-endpoints/{}/invocations", encode_segment(e)),
        (None, Some(app)) => format!("/apps/{}/invocations", encode_segment(&app.name)),
        (None, None) => format!("/agents/{}/invocations", encode_segment(&a.name)),
    })
}

/// One span, from the MLflow span document or an OTel span table row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub start_ns: Option<i64>,
    pub end_ns: Option<i64>,
    /// `STATUS_CODE_OK`, `STATUS_CODE_ERROR`, `OK`, `ERROR`, ...
    pub status: Option<String>,
    pub status_message: Option<String>,
    /// Attribute values as stored (MLflow: JSON-encoded strings).
    pub attributes: BTreeMap<String, String>,
    /// `(event name, attributes)`.
    pub events: Vec<(String, BTreeMap<String, String>)>,
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A span's events, `(name, attributes)`: an array of `{name, attributes}` (MLflow's span
/// document, or the `events` column of an OTel span table); anything else is none.
fn span_events(v: &Value) -> Vec<(String, BTreeMap<String, String>)> {
    v.as_array()
        .map(|evs| {
            evs.iter()
                .map(|e| {
                    (
                        text_of(&e["name"]).unwrap_or_default(),
                        string_map(&e["attributes"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    let v = match v {
        // OTel tables keep MAP<STRING,STRING> as JSON text.
        Value::String(s) => serde_json::from_str(s).unwrap_or(Value::Null),
        other => other.clone(),
    };
    match v {
        Value::Object(m) => m
            .into_iter()
            .filter_map(|(k, v)| text_of(&v).map(|t| (k, t)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

impl Span {
    /// Reads a span object of the MLflow span document (tolerant of missing fields). Both forms
    /// MLflow writes are read: MLflow 3's OTel form (`span_id`, `parent_span_id`,
    /// `start_time_unix_nano`, `status: {code, message}`) and MLflow 2's `Span.to_dict` form
    /// (`context: {span_id, trace_id}`, `parent_id`, `start_time` and `end_time` in ns,
    /// `status_code`, `status_message`).
    pub fn from_json(v: &Value) -> Span {
        fn first(keys: [&Value; 2]) -> Option<&Value> {
            keys.into_iter().find(|x| !x.is_null())
        }
        let (code, message) = match first([&v["status"], &v["status_code"]]) {
            Some(status @ Value::Object(_)) => {
                (text_of(&status["code"]), text_of(&status["message"]))
            }
            Some(other) => (text_of(other), text_of(&v["status_message"])),
            None => (None, text_of(&v["status_message"])),
        };
        let field =
            |otel: &str, v2: &Value| first([&v[otel], v2]).and_then(text_of).unwrap_or_default();
        Span {
            trace_id: field("trace_id", &v["context"]["trace_id"]),
            span_id: field("span_id", &v["context"]["span_id"]),
            parent_span_id: first([&v["parent_span_id"], &v["parent_id"]])
                .and_then(text_of)
                .filter(|p| !p.is_empty()),
            name: text_of(&v["name"]).unwrap_or_default(),
            start_ns: first([&v["start_time_unix_nano"], &v["start_time"]]).and_then(int_of),
            end_ns: first([&v["end_time_unix_nano"], &v["end_time"]]).and_then(int_of),
            status: code,
            status_message: message.filter(|m| !m.is_empty()),
            attributes: string_map(&v["attributes"]),
            events: span_events(&v["events"]),
        }
    }

    /// An attribute as plain text: MLflow stores values JSON-encoded, so a JSON string is
    /// unwrapped, any other JSON value is kept as its JSON text, and non-JSON text is kept as is.
    pub fn attr(&self, key: &str) -> Option<String> {
        let raw = self.attributes.get(key)?;
        match serde_json::from_str::<Value>(raw) {
            Ok(Value::String(s)) => Some(s),
            Ok(Value::Null) => None,
            Ok(_) | Err(_) => Some(raw.clone()),
        }
    }

    /// `mlflow.spanType` upper-cased.
    pub fn span_type(&self) -> String {
        self.attr("mlflow.spanType")
            .unwrap_or_default()
            .trim()
            .to_ascii_uppercase()
    }

    /// `…ERROR` in any spelling, or OTLP's numeric code 2 (`STATUS_CODE_ERROR`).
    fn is_error(&self) -> bool {
        self.status.as_deref().is_some_and(|s| {
            let s = s.trim();
            s == "2" || s.to_ascii_uppercase().ends_with("ERROR")
        })
    }

    /// The exception MLflow recorded, `(type, message)`, or the status message.
    fn error(&self) -> Option<(String, String)> {
        for (name, a) in &self.events {
            if name == "exception" {
                return Some((
                    a.get("exception.type").cloned().unwrap_or_default(),
                    a.get("exception.message").cloned().unwrap_or_default(),
                ));
            }
        }
        if self.is_error() {
            return Some((
                String::new(),
                self.status_message.clone().unwrap_or_default(),
            ));
        }
        None
    }

    /// The tool call id of a TOOL span: an attribute when the framework recorded one, else
    /// where the span's data reveals it (MLflow's own TOOL spans carry no such attribute):
    /// its outputs as LangChain records them (`str(ToolMessage)`: `... tool_call_id='call_1'`,
    /// or a ToolMessage as JSON: `{"tool_call_id": ...}`, also under `kwargs`), or its inputs
    /// when they are the tool call itself (`{"id": "call_1", "type": "function", ...}`,
    /// LangChain's `{"id", "name", "args", "type": "tool_call"}`, or a `tool_call_id` field).
    pub fn tool_call_id(&self) -> Option<String> {
        ["gen_ai.tool.call.id", "mlflow.toolCallId", "tool_call_id"]
            .iter()
            .find_map(|k| self.attr(k))
            .filter(|s| !s.is_empty())
            .or_else(|| {
                self.attr("mlflow.spanOutputs")
                    .and_then(|o| call_id_in_output(&o))
            })
            .or_else(|| {
                self.attr("mlflow.spanInputs")
                    .and_then(|i| call_id_in_input(&i))
            })
    }
}

/// A call id as it may be used: non-empty, one line, of a sane length.
fn plausible_call_id(id: &str) -> Option<String> {
    let id = id.trim();
    (!id.is_empty() && id.len() <= 256 && !id.contains(['\n', '\r', '\'', '"']))
        .then(|| id.to_string())
}

/// The `tool_call_id` of a tool's output: a ToolMessage as JSON (`{"tool_call_id": ...}`, or
/// LangChain's serialized form with it under `kwargs`), or as Python prints it
/// (`content='...' name='lookup' tool_call_id='call_1'`).
fn call_id_in_output(output: &str) -> Option<String> {
    if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(output) {
        return [&v["tool_call_id"], &v["kwargs"]["tool_call_id"]]
            .into_iter()
            .find_map(|x| x.as_str().and_then(plausible_call_id));
    }
    // `str(ToolMessage)`: the last `tool_call_id=` (the content, printed first, may hold one).
    let at = output.rfind("tool_call_id=")?;
    let rest = &output[at + "tool_call_id=".len()..];
    let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let inner = &rest[1..];
    let end = inner.find(quote)?;
    plausible_call_id(&inner[..end])
}

/// The call id of a tool's inputs when they are the tool call itself: OpenAI's
/// `{"id": "call_1", "type": "function", "function": {...}}`, LangChain's ToolCall
/// `{"id": ..., "name": ..., "args": {...}, "type": "tool_call"}`, or a `tool_call_id` field.
/// Plain arguments (`{"order_id": "1"}`, or an `id` that is an argument) are not.
fn call_id_in_input(input: &str) -> Option<String> {
    let v: Value = serde_json::from_str(input).ok()?;
    if let Some(id) = v["tool_call_id"].as_str().and_then(plausible_call_id) {
        return Some(id);
    }
    let is_call = v["function"].is_object()
        || matches!(v["type"].as_str(), Some("function" | "tool_call"))
        || (v["name"].is_string() && v["args"].is_object());
    if is_call {
        return v["id"].as_str().and_then(plausible_call_id);
    }
    None
}

/// What a span is, for records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Llm,
    Tool,
    Retriever,
    Execution,
}

/// The trace a span belongs to, as its records need it.
#[derive(Debug, Clone, Default)]
pub struct TraceMeta {
    pub trace_id: String,
    pub client_request_id: Option<String>,
    pub time_us: i64,
    /// The namespace (`mlflow:<id>` or the OTel table) for `x-mlflow-location`.
    pub location: String,
}

fn content_type(p: &str) -> &'static str {
    let t = p.trim_start();
    if t.is_empty() || t.starts_with('{') || t.starts_with('[') {
        "application/json"
    } else {
        "text/plain"
    }
}

/// The Akto records of one trace's spans: one per LLM, TOOL and RETRIEVER span (and the root span
/// as the execution when `source.execution_path` is set). Pure; never panics.
pub fn span_records(
    source: &TraceSource,
    account_id: &str,
    meta: &TraceMeta,
    spans: &[Span],
) -> Vec<AktoRecord> {
    let mut out = Vec::new();
    for span in spans {
        let ty = span.span_type();
        let kind = match ty.as_str() {
            "LLM" | "CHAT_MODEL" => Kind::Llm,
            "TOOL" => Kind::Tool,
            "RETRIEVER" => Kind::Retriever,
            _ if span.parent_span_id.is_none() && source.execution_path.is_some() => {
                Kind::Execution
            }
            _ => continue,
        };
        out.push(span_record(source, account_id, meta, span, kind, &ty));
    }
    out
}

fn span_record(
    source: &TraceSource,
    account_id: &str,
    meta: &TraceMeta,
    span: &Span,
    kind: Kind,
    ty: &str,
) -> AktoRecord {
    let mut cut = 0u32;
    let name = if span.name.trim().is_empty() {
        "unknown"
    } else {
        span.name.trim()
    };
    let path = match kind {
        Kind::Tool => tool_path(name),
        Kind::Llm => format!("/llm/{}", encode_segment(name)),
        Kind::Retriever => format!("/retrievers/{}", encode_segment(name)),
        Kind::Execution => source.execution_path.clone().unwrap_or_default(),
    };
    let inputs = span.attr("mlflow.spanInputs").unwrap_or_default();
    let error = span.error();
    let mut outputs = span.attr("mlflow.spanOutputs").unwrap_or_default();
    if outputs.is_empty() {
        if let Some((t, m)) = &error {
            outputs = serde_json::json!({"error": {"type": t, "message": m}}).to_string();
        }
    }
    let code: i64 = if span.is_error()
        || (error.is_some()
            && !span
                .status
                .as_deref()
                .is_some_and(|s| s.to_ascii_uppercase().ends_with("OK")))
    {
        500
    } else {
        200
    };

    let mut h = JsonObject::default();
    h.set("host", &source.host, &mut cut)
        .set("content-type", content_type(&inputs), &mut cut)
        .set("x-mlflow-trace-id", &meta.trace_id, &mut cut)
        .set("x-mlflow-span-id", &span.span_id, &mut cut)
        .set("x-mlflow-span-type", ty, &mut cut)
        .set("x-mlflow-location", &meta.location, &mut cut);
    if let Some(p) = &span.parent_span_id {
        h.set("x-mlflow-parent-span-id", p, &mut cut);
    }
    if let Some(c) = &meta.client_request_id {
        h.set("x-client-request-id", c, &mut cut);
    }
    if kind == Kind::Tool {
        if let Some(id) = span.tool_call_id() {
            h.set("x-tool-call-id", &id, &mut cut);
        }
    }
    let mut rh = JsonObject::default();
    rh.set("content-type", content_type(&outputs), &mut cut);
    if let (Some(s), Some(e)) = (span.start_ns, span.end_ns) {
        if let Some(d) = e.checked_sub(s).filter(|d| *d >= 0) {
            rh.set("x-span-duration-ms", &(d / 1_000_000).to_string(), &mut cut);
        }
    }
    if let Some(s) = span.start_ns {
        rh.set(
            "x-span-start",
            &format_timestamp(s.div_euclid(1000)),
            &mut cut,
        );
    }
    if let Some(s) = &span.status {
        rh.set("x-span-status", s, &mut cut);
    }
    if let Some((t, m)) = &error {
        let e = if t.is_empty() {
            m.clone()
        } else {
            format!("{t}: {m}")
        };
        rh.set("x-span-error", &e, &mut cut);
    }
    let mut tag = JsonObject::default();
    tag.set("gen-ai", "Gen AI", &mut cut)
        .set("ai-agent", &source.agent, &mut cut)
        .set("mlflow-span-type", ty, &mut cut);
    if kind == Kind::Tool {
        tag.set("tool", name, &mut cut);
    }
    let secs = span
        .start_ns
        .map(|n| n.div_euclid(1_000_000_000))
        .unwrap_or(meta.time_us.div_euclid(1_000_000))
        .clamp(1, i64::from(i32::MAX));
    // Each string within Akto's limit, and both payloads together within one request body.
    let (request_payload, response_payload) = fit_pair(
        (fit_text(&inputs, MAX_STRING_BYTES, &mut cut), inputs.len()),
        (
            fit_text(&outputs, MAX_STRING_BYTES, &mut cut),
            outputs.len(),
        ),
        MAX_RECORD_PAYLOAD_BYTES,
        &mut cut,
    );
    let mut record = AktoRecord {
        path: fit(&path, MAX_STRING_BYTES, &mut cut),
        method: "POST".into(),
        request_headers: h.encode(),
        response_headers: rh.encode(),
        request_payload,
        response_payload,
        ip: "10.0.0.1".into(),
        dest_ip: String::new(),
        time: secs.to_string(),
        status_code: code.to_string(),
        status: reason_phrase(code).into(),
        http_type: "HTTP/1.1".into(),
        akto_account_id: account_id.to_string(),
        akto_vxlan_id: "0".into(),
        is_pending: "false".into(),
        source: "MIRRORING".into(),
        tag: tag.encode(),
    };
    // The content-type was chosen from the whole inputs: cut ones go out as text, or Akto would
    // drop the record as incomplete JSON.
    crate::traffic::record::settle_request_content_type(&mut record);
    record
}

/// The call id of a tool-call record (`/tools/<name>` with an `x-tool-call-id` request header),
/// whichever source built it (a trace's TOOL span or an inference row's tool call). The delivery
/// stage sends each `(host, call id)` once (see `run`).
pub fn tool_call_id(record: &AktoRecord) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Headers {
        #[serde(rename = "x-tool-call-id")]
        id: Option<String>,
    }
    if !record.path.starts_with("/tools/") {
        return None;
    }
    serde_json::from_str::<Headers>(&record.request_headers)
        .ok()?
        .id
        .filter(|id| !id.is_empty())
}

/// Tool call ids whose records a unit carries (`x-tool-call-id` of its TOOL span records): the
/// delivery stage drops the inference row's record of the same call (the trace is preferred:
/// it has timing and errors).
pub fn tool_call_ids(unit: &Prepared) -> Vec<String> {
    unit.records.iter().filter_map(tool_call_id).collect()
}

/// Where a read starts and which older keys are still checked against the delivered ids.
struct Window {
    /// Read items with time >= from_us.
    from_us: i64,
    /// `(cursor, late_from)`: items at or before the cursor are read only when newer than
    /// `late_from` (older ones were delivered, or arrived too late to be told apart).
    cursor: Option<(i64, String, i64)>,
}

fn window(
    state: &StateStore,
    ns: &str,
    opts: &CollectOptions,
    now_us: i64,
) -> Result<Window, CollectError> {
    let lookback = opts.lookback.as_micros() as i64;
    let floor = now_us - opts.max_catchup.as_micros() as i64;
    let read_mark = state.read_mark(ns)?;
    let Some(c) = state.cursor(ns)? else {
        // Nothing delivered yet: a lookback before the last complete read (not before now), so
        // a trace exported up to a lookback late, after a read that found none, is still read.
        // Before any complete read, where reading began: failed cycles do not slide it.
        let from = match read_mark {
            Some(m) => m.min(now_us) - lookback,
            None => state.begin_window(ns, now_us.saturating_sub(lookback).max(floor))?,
        };
        return Ok(Window {
            from_us: from.max(floor),
            cursor: None,
        });
    };
    let late_from = crate::collect::late_start(
        c.time_us,
        read_mark,
        state.window_start(ns)?,
        state.pruned_before(ns)?,
        now_us,
        lookback,
        floor,
    );
    if c.time_us < floor {
        tracing::warn!(
            "{ns}: the last delivered trace is from {}, older than MAX_CATCHUP_HOURS: traces before {} are skipped",
            format_timestamp(c.time_us),
            format_timestamp(floor)
        );
    }
    Ok(Window {
        from_us: c.time_us.min(late_from).max(floor),
        cursor: Some((c.time_us, c.id, late_from)),
    })
}

impl Window {
    /// Where the late pass starts: items at or before the cursor are read from here on (no
    /// cursor: the window's start).
    fn late_from(&self) -> i64 {
        self.cursor.as_ref().map_or(self.from_us, |c| c.2)
    }

    /// Whether an item keyed `(t, id)` must be looked at; the bool says it is behind the cursor.
    fn wants(&self, t: i64, id: &str) -> Option<bool> {
        if t < self.from_us {
            return None;
        }
        match &self.cursor {
            Some((ct, cid, late_from)) if (t, id) <= (*ct, cid.as_str()) => {
                (t >= *late_from).then_some(true)
            }
            _ => Some(false),
        }
    }
}

/// Which traces a search pass of [`TraceReader::experiment`] takes.
#[derive(Clone, Copy)]
enum Pass<'a> {
    /// Traces started in the window (`trace.timestamp_ms >= from`), as [`Window::wants`] says.
    Main(&'a Window),
    /// Long runs started before the window that ended in it (`end >= late_from`): MLflow 3
    /// logs a trace only when it has ended, already final, with its start as `request_time`.
    Long { late_from: i64 },
}

/// A trace that ran longer than this (µs) is a long run: searched again by the long-run pass
/// while its start is before the window, and keyed by its end (see [`unit_time`]). Half the
/// lookback: the main pass reads every trace that ran up to a lookback minus its export delay
/// (it is exported when it ends, and read by the first cycle after that while its start is
/// within a lookback of the previous read), so the long-run pass covers any export delay up to
/// half the lookback, and asks only for runs far longer than agents' usual seconds.
fn long_run_us(opts: &CollectOptions) -> i64 {
    (opts.lookback.as_micros() as i64 / 2).max(1_000)
}

/// The time a trace's unit is keyed by in state: its start, or its end for a long run. A long
/// run found by either pass is then kept (pruning counts back from the key) as long as the
/// long-run pass can still find it (its end in the window), so neither pass sends it again. A
/// trace is looked up under both times (state written before keeps every trace by its start;
/// a changed LOOKBACK_MINUTES changes which traces are long runs).
fn unit_time(start_us: i64, end_us: i64, long_us: i64) -> i64 {
    if end_us - start_us > long_us {
        end_us
    } else {
        start_us
    }
}

/// What every trace read of a cycle shares: the counterpart of [`crate::collect::TableReader`]
/// for MLflow experiments ([`TraceReader::experiment`]) and OTel span tables
/// ([`TraceReader::otel_table`]).
#[derive(Clone, Copy)]
pub struct TraceReader<'a> {
    pub client: &'a DatabricksClient,
    pub state: &'a StateStore,
    pub opts: &'a CollectOptions,
    /// The Databricks account id of the records (`akto_account_id`).
    pub account_id: &'a str,
    /// The workspace host: a span table's agents unknown to the inventory are sent on it.
    pub workspace_host: &'a str,
    /// The cycle's start (µs since the epoch): the end of every window.
    pub now_us: i64,
}

impl TraceReader<'_> {
    /// [`TraceReader::experiment_into`] counting into its own [`TableStats`], returned when it
    /// succeeds.
    pub async fn experiment(
        &self,
        source: &TraceSource,
        out: &mpsc::Sender<Chunk>,
    ) -> Result<TableStats, CollectError> {
        let mut stats = TableStats::default();
        self.experiment_into(source, out, &mut stats).await?;
        Ok(stats)
    }

    /// [`TraceReader::otel_table_into`] counting into its own [`TableStats`], returned when it
    /// succeeds.
    pub async fn otel_table(
        &self,
        warehouse_id: &str,
        table: &str,
        inv: &Inventory,
        out: &mpsc::Sender<Chunk>,
    ) -> Result<TableStats, CollectError> {
        let mut stats = TableStats::default();
        self.otel_table_into(warehouse_id, table, inv, out, &mut stats)
            .await?;
        Ok(stats)
    }
}

impl TraceReader<'_> {
    /// Reads one experiment's new traces and sends them as units to `out`: the traces started
    /// in the window, then (a second search) the long runs started up to [`MAX_RUN_US`] before
    /// it that ended in it.
    pub async fn experiment_into(
        &self,
        source: &TraceSource,
        out: &mpsc::Sender<Chunk>,
        stats: &mut TableStats,
    ) -> Result<(), CollectError> {
        let TraceReader {
            client,
            state,
            opts,
            account_id,
            now_us,
            ..
        } = *self;
        let ns = experiment_namespace(&source.experiment_id);
        let w = window(state, &ns, opts, now_us)?;
        let floor = now_us - opts.max_catchup.as_micros() as i64;
        let from_ms = w.from_us.div_euclid(1000);
        let long_us = long_run_us(opts);
        // Trace ids emitted this cycle: the search pages by offset, so a trace logged while paging
        // shifts the results and the last trace of one page comes again on the next, before its
        // unit is committed.
        let mut emitted: HashSet<String> = HashSet::new();
        let mut reader = ExperimentRead {
            client,
            state,
            source,
            opts,
            account_id,
            ns: &ns,
            now_us,
            floor,
            long_us,
            last_read_before: last_read_before(opts, now_us),
            out,
        };
        let main = format!("trace.timestamp_ms > {}", from_ms - 1);
        reader
            .search(&main, Pass::Main(&w), &mut emitted, stats)
            .await?;
        // Long runs logged when they ended: their start is before the window (MLflow 3 clients
        // create the trace only then, already final). Started at most MAX_RUN_US before the
        // window's late edge, and within MAX_CATCHUP_HOURS.
        let late_from = w.late_from();
        let lower_ms = late_from
            .saturating_sub(MAX_RUN_US)
            .max(floor)
            .div_euclid(1000);
        if lower_ms < from_ms {
            let long = format!(
                "trace.timestamp_ms >= {lower_ms} AND trace.timestamp_ms < {from_ms} AND \
             trace.execution_time_ms > {}",
                long_us / 1000
            );
            reader
                .search(&long, Pass::Long { late_from }, &mut emitted, stats)
                .await?;
        }
        Ok(())
    }
}

/// What the passes of one experiment's read share.
struct ExperimentRead<'a> {
    client: &'a DatabricksClient,
    state: &'a StateStore,
    source: &'a TraceSource,
    opts: &'a CollectOptions,
    account_id: &'a str,
    ns: &'a str,
    now_us: i64,
    floor: i64,
    long_us: i64,
    last_read_before: i64,
    out: &'a mpsc::Sender<Chunk>,
}

impl ExperimentRead<'_> {
    /// Pages through the traces matching `filter` and sends the units of those `pass` takes.
    async fn search(
        &mut self,
        filter: &str,
        pass: Pass<'_>,
        emitted: &mut HashSet<String>,
        stats: &mut TableStats,
    ) -> Result<(), CollectError> {
        let (ns, source) = (self.ns, self.source);
        let mut token: Option<String> = None;
        for _ in 0..100_000 {
            // Trace searches are REST calls (counted by the client's ApiStats), not warehouse
            // work: they do not add to statements or rows_returned.
            let page = self
                .client
                .search_traces(&source.experiment_id, filter, PAGE, token.as_deref())
                .await?;
            let mut todo: Vec<Todo> = Vec::new();
            let mut unreadable = Vec::new();
            let mut behind = 0u64;
            // Each trace under its start and its end (a trace without a time is never found:
            // it is quarantined below).
            let delivered = self.state.delivered_at(
                ns,
                page.traces.iter().flat_map(|t| {
                    let s = t.time_us().unwrap_or(i64::MIN);
                    [
                        (s, t.trace_id.as_str()),
                        (trace_end_us(t, s), t.trace_id.as_str()),
                    ]
                }),
            )?;
            for (t, done) in page.traces.into_iter().zip(delivered.chunks(2)) {
                let done = done.iter().any(|d| *d);
                if t.state.as_deref() == Some("IN_PROGRESS") {
                    if matches!(pass, Pass::Main(_)) {
                        self.in_progress(&t, stats);
                    }
                    continue;
                }
                let Some(start) = t.time_us().filter(|_| !t.trace_id.is_empty()) else {
                    unreadable.push((
                        "trace without a trace_id or a readable request_time".to_string(),
                        format!(
                            "{{\"trace_id\":{:?},\"request_time\":{:?}}}",
                            t.trace_id, t.request_time
                        ),
                    ));
                    continue;
                };
                let end = trace_end_us(&t, start);
                let key = unit_time(start, end, self.long_us);
                let is_behind = match pass {
                    Pass::Main(w) => w.wants(start, &t.trace_id),
                    // The main pass took the traces started in the window; this one only the
                    // long runs that ended in it (older ones were read, or were pruned).
                    Pass::Long { late_from } => (key == end && end >= late_from).then_some(true),
                };
                let Some(is_behind) = is_behind else {
                    continue;
                };
                if done || emitted.contains(&t.trace_id) {
                    stats.duplicates_skipped += 1;
                    continue;
                }
                behind += u64::from(is_behind);
                todo.push(Todo {
                    info: t,
                    start_us: start,
                    key_us: key,
                });
            }
            todo.sort_by(|a, b| {
                (a.start_us, &a.info.trace_id).cmp(&(b.start_us, &b.info.trace_id))
            });
            // The same trace twice on one page: once.
            todo.dedup_by(|a, b| a.info.trace_id == b.info.trace_id);
            let units = download_all(
                self.client,
                source,
                self.account_id,
                ns,
                todo,
                self.last_read_before,
                stats,
            )
            .await?;
            emitted.extend(units.iter().map(|u| u.id.clone()));
            stats.late_found += behind;
            stats.executions += units.len() as u64;
            if !units.is_empty() || !unreadable.is_empty() {
                self.out
                    .send(Chunk {
                        table: ns.to_string(),
                        prepared: units,
                        unreadable,
                        ..Default::default()
                    })
                    .await
                    .map_err(|_| CollectError::Closed)?;
            }
            match crate::databricks::next_page(
                "POST /api/3.0/mlflow/traces/search",
                token.as_deref(),
                page.next_page_token,
            ) {
                Some(t) => token = Some(t),
                None => return Ok(()),
            }
        }
        Err(CollectError::Databricks(DatabricksError::Decode {
            route: "POST /api/3.0/mlflow/traces/search".into(),
            detail: "more than 100000 pages: the search never ends".into(),
        }))
    }

    /// A trace still `IN_PROGRESS` (MLflow 2 clients create it at its start) is read when it
    /// has ended: until then the window is held open back to its start, for a run of up to
    /// MAX_RUN_US (and within MAX_CATCHUP_HOURS). A trace left IN_PROGRESS for longer (a client
    /// that died mid-run) stops holding it.
    fn in_progress(&self, t: &TraceInfo, stats: &mut TableStats) {
        let (now_us, ns) = (self.now_us, self.ns);
        match t.time_us() {
            Some(start) if start >= self.floor.max(now_us - MAX_RUN_US) => hold(stats, start),
            Some(start) if start >= now_us - MAX_RUN_US - self.opts.lookback.as_micros() as i64 => {
                tracing::warn!(
                    "{ns}: trace {} has been IN_PROGRESS since {}, longer than {} hours: \
                     no longer waited for (it is still read if it ends within \
                     LOOKBACK_MINUTES)",
                    t.trace_id,
                    format_timestamp(start),
                    MAX_RUN_US / 3_600_000_000
                );
            }
            _ => {}
        }
    }
}

/// A trace to download: its search result, its start and the time its unit is keyed by.
struct Todo {
    info: TraceInfo,
    start_us: i64,
    key_us: i64,
}

/// Runs a span-table statement and returns its rows up to the byte limit, and whether the
/// result was cut there; counted in `stats`.
async fn read_prefix(
    client: &DatabricksClient,
    st: Statement,
    stats: &mut TableStats,
) -> Result<(Vec<crate::databricks::sql::Row>, bool), DatabricksError> {
    stats.statements += 1;
    let (rows, cut) = client.execute(&st).await?.collect_prefix().await?;
    stats.rows_returned += rows.len() as u64;
    Ok((rows, cut))
}

/// The longest agent run whose trace is waited for while `IN_PROGRESS`, and searched for once
/// it was logged at its end (6 hours).
const MAX_RUN_US: i64 = 6 * 3_600_000_000;

/// An OTel trace is read once its root span ended this long ago (2 minutes): its other spans
/// may be written after the root (exported in batches), and a trace is read once.
const SETTLE_US: i64 = 120_000_000;

/// The next read of the source must reach back to `time_us` (a trace not read yet).
fn hold(stats: &mut TableStats, time_us: i64) {
    if stats.hold_from.is_none_or(|h| time_us < h) {
        stats.hold_from = Some(time_us);
    }
}

/// When a trace ended: its start plus its execution duration (its start when unknown).
fn trace_end_us(t: &TraceInfo, start_us: i64) -> i64 {
    start_us.saturating_add(t.duration_ms().unwrap_or(0).max(0).saturating_mul(1000))
}

/// Traces older than this (µs) are read for the last time by a read at `now_us`: the next
/// cycle's late window starts at this read's time minus `lookback` (or later, at the
/// MAX_CATCHUP floor). A minute of margin keeps the two sides of that edge apart.
fn last_read_before(opts: &CollectOptions, now_us: i64) -> i64 {
    let reach = opts.lookback.min(opts.max_catchup).as_micros() as i64;
    let margin = (reach / 2).min(60_000_000);
    now_us - reach + margin
}

/// A span download error as the trace reader reports it: a refusal names the experiment.
fn span_access_error(e: DatabricksError, source: &TraceSource) -> DatabricksError {
    match e {
        DatabricksError::PermissionDenied {
            object,
            detail,
            fix,
        } => DatabricksError::PermissionDenied {
            object: format!(
                "{object} (MLflow experiment {}, agent {})",
                source.experiment_id, source.agent
            ),
            detail,
            fix,
        },
        other => other,
    }
}

/// Downloads the spans of `todo` (a few at a time) and builds one unit per trace, in order.
///
/// A trace whose spans are not found (404: not uploaded yet, a race with its end) is left out,
/// so it is not committed and the next cycle's late window reads it again; only when this is
/// its last read (`time < last_read_before`) is it sent as its summary (the search's previews).
/// Access refused (403) fails the source with the grant to fix: summaries are not committed
/// for traces that could be read with the right permission.
async fn download_all(
    client: &DatabricksClient,
    source: &TraceSource,
    account_id: &str,
    ns: &str,
    todo: Vec<Todo>,
    last_read_before: i64,
    stats: &mut TableStats,
) -> Result<Vec<Prepared>, CollectError> {
    let mut units = Vec::with_capacity(todo.len());
    for group in todo.chunks(DOWNLOADS) {
        let mut set = tokio::task::JoinSet::new();
        for (k, todo) in group.iter().enumerate() {
            let (client, id) = (client.clone(), todo.info.trace_id.clone());
            set.spawn(async move {
                let r = match client.trace_download(&id).await {
                    Ok(dl) => client.download_spans(&id, &dl).await,
                    Err(e) => Err(e),
                };
                (k, r)
            });
        }
        let mut got: Vec<Option<Result<SpanDownload, DatabricksError>>> =
            (0..group.len()).map(|_| None).collect();
        while let Some(j) = set.join_next().await {
            match j {
                Ok((k, r)) => {
                    if let Some(slot) = got.get_mut(k) {
                        *slot = Some(r);
                    }
                }
                Err(e) => {
                    return Err(CollectError::Databricks(DatabricksError::Decode {
                        route: "GET <signed trace data URI>".into(),
                        detail: format!("a span download task failed: {e}"),
                    }))
                }
            }
        }
        for (todo, r) in group.iter().zip(got) {
            let (t, time_us) = (&todo.info, &todo.start_us);
            let meta = TraceMeta {
                trace_id: t.trace_id.clone(),
                client_request_id: t.client_request_id.clone(),
                time_us: *time_us,
                location: ns.to_string(),
            };
            let spans: Vec<Span> = match r {
                Some(Ok(SpanDownload::Spans { spans, bytes })) => {
                    stats.bytes_returned += bytes;
                    spans.iter().map(Span::from_json).collect()
                }
                // Not read (nor held in memory): what the search said, once.
                Some(Ok(SpanDownload::TooLarge { bytes, exact })) => {
                    tracing::warn!(
                        "spans of trace {} ({ns}) not read: the span document is {}{} MiB, over the \
                         {} MiB read per trace: {}",
                        t.trace_id,
                        if exact { "" } else { "over " },
                        bytes >> 20,
                        MAX_SPAN_DOCUMENT_BYTES >> 20,
                        summary_note(source)
                    );
                    vec![summary_span(t, *time_us)]
                }
                Some(Err(e)) if e.is_retriable() => return Err(e.into()),
                // The connector's access, not the trace's data: fail the source with the fix.
                Some(Err(
                    e @ (DatabricksError::PermissionDenied { .. } | DatabricksError::Auth { .. }),
                )) => return Err(span_access_error(e, source).into()),
                // The upload follows the trace's end: waited for up to a lookback after the end
                // (not the start: a long run ends long after it started), the window held open
                // back to its unit's time meanwhile (its start; a long run's end, where the
                // long-run pass finds it again).
                Some(Err(e @ DatabricksError::NotFound { .. }))
                    if trace_end_us(t, *time_us) >= last_read_before =>
                {
                    tracing::info!(
                        "spans of trace {} ({ns}) not found yet (uploaded when the trace ends); it is read again next cycle: {e}",
                        t.trace_id
                    );
                    hold(stats, todo.key_us);
                    continue;
                }
                Some(Err(e @ DatabricksError::NotFound { .. })) => {
                    tracing::warn!(
                        "spans of trace {} ({ns}) still not found a LOOKBACK_MINUTES after the trace ended: {}: {e}",
                        t.trace_id,
                        summary_note(source)
                    );
                    vec![summary_span(t, *time_us)]
                }
                Some(Err(e)) => {
                    // Data gone or unreadable for good: keep what the search said, once.
                    tracing::warn!(
                        "spans of trace {} ({ns}) not readable: {}: {e}",
                        t.trace_id,
                        summary_note(source)
                    );
                    vec![summary_span(t, *time_us)]
                }
                None => return Err(CollectError::Closed),
            };
            units.push(Prepared {
                id: t.trace_id.clone(),
                time_us: todo.key_us,
                agent: source.agent.clone(),
                host: source.host.clone(),
                records: span_records(source, account_id, &meta, &spans),
            });
        }
    }
    Ok(units)
}

/// What happens to a trace whose spans cannot be read: its summary ([`summary_span`], an AGENT
/// root) is a record only for an agent whose executions come from its traces; an agent with an
/// inference table has its execution record there, and gets no record of the trace.
fn summary_note(source: &TraceSource) -> &'static str {
    if source.execution_path.is_some() {
        "sending its summary only (the execution record, from the search's previews)"
    } else {
        "no record is sent for it (its execution record comes from the agent's inference table)"
    }
}

/// A stand-in root span built from the search result (previews), when the span data is gone.
fn summary_span(t: &TraceInfo, time_us: i64) -> Span {
    let start = time_us.saturating_mul(1000);
    let mut attributes = BTreeMap::new();
    attributes.insert("mlflow.spanType".into(), "\"AGENT\"".into());
    if let Some(p) = &t.request_preview {
        attributes.insert(
            "mlflow.spanInputs".into(),
            Value::String(p.clone()).to_string(),
        );
    }
    if let Some(p) = &t.response_preview {
        attributes.insert(
            "mlflow.spanOutputs".into(),
            Value::String(p.clone()).to_string(),
        );
    }
    Span {
        trace_id: t.trace_id.clone(),
        span_id: String::new(),
        parent_span_id: None,
        name: t.tags.get("mlflow.traceName").cloned().unwrap_or_default(),
        start_ns: Some(start),
        end_ns: t
            .duration_ms()
            .and_then(|d| d.checked_mul(1_000_000))
            .and_then(|d| start.checked_add(d)),
        status: t.state.clone(),
        status_message: None,
        attributes,
        events: Vec::new(),
    }
}

impl TraceReader<'_> {
    /// Reads the new traces of a UC OTel span table (`*_otel_spans`) through SQL: a trace is
    /// read once its root span (no parent) ended [`SETTLE_US`] ago (roots listed by their end),
    /// with all its spans (and their `events`, where the table has that column); agents are told
    /// apart by the root span's name (an inventory agent's name, endpoint, app or model), else
    /// the table itself is the agent. State namespace: the table's full name.
    pub async fn otel_table_into(
        &self,
        warehouse_id: &str,
        table: &str,
        inv: &Inventory,
        out: &mpsc::Sender<Chunk>,
        stats: &mut TableStats,
    ) -> Result<(), CollectError> {
        let TraceReader {
            client,
            state,
            opts,
            account_id,
            workspace_host,
            now_us,
        } = *self;
        let w = window(state, table, opts, now_us)?;
        let statement = |sql: String, params: Vec<Param>| Statement {
            warehouse_id: warehouse_id.to_string(),
            statement: sql,
            parameters: params,
            table: table.to_string(),
            timeout: opts.statement_timeout,
        };
        // Agents by every name their root spans may carry.
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        for a in &inv.agents {
            let mut keys = vec![a.name.clone()];
            keys.extend(a.endpoint.clone());
            keys.extend(a.app.as_ref().map(|p| p.name.clone()));
            keys.extend(
                a.models
                    .iter()
                    .map(|m| m.name.rsplit('.').next().unwrap_or(&m.name).to_string()),
            );
            if let Some(s) = crate::discovery::strip_prefix_ci(&a.name, &inv.prefix) {
                keys.push(s.to_string());
            }
            for k in keys {
                names
                    .entry(normalize_name(&k))
                    .or_insert_with(|| a.name.clone());
            }
        }
        let short = table.rsplit('.').next().unwrap_or(table);
        let fallback_agent = short
            .strip_suffix("_otel_spans")
            .unwrap_or(short)
            .to_string();

        // Roots are listed by their end, when their row lands (a root span is written when it
        // ends, so a long run's root arrives hours after its start): the window follows arrival.
        let mut after: (i64, String) = (w.from_us.saturating_mul(1000) - 1, String::new());
        let mut emitted: HashSet<String> = HashSet::new();
        let settled_before = now_us - SETTLE_US;
        for _ in 0..100_000 {
            let sql = format!(
            "SELECT trace_id, start_time_unix_nano, end_time_unix_nano FROM {t} WHERE (parent_span_id IS NULL OR parent_span_id = '') AND \
             (end_time_unix_nano > :after_ns OR (end_time_unix_nano = :after_ns AND trace_id > :after_id)) \
             ORDER BY end_time_unix_nano, trace_id LIMIT {PAGE}",
            t = quote_table(table)
        );
            // A page cut at the byte limit holds fewer than PAGE roots yet more follow: go on after
            // its last root (keyset), never take it for the end.
            let (roots, cut) = read_prefix(
                client,
                statement(
                    sql,
                    vec![
                        Param::new("after_ns", after.0.to_string(), "BIGINT"),
                        Param::new("after_id", after.1.clone(), "STRING"),
                    ],
                ),
                stats,
            )
            .await?;
            let n = roots.len();
            if n == 0 && cut {
                return Err(row_too_large(table, "a root span's trace_id"));
            }
            // (trace id, root start ns, root end ns).
            let keyed: Vec<(String, i64, i64)> = roots
                .iter()
                .filter_map(|r| {
                    let id = r.first()?.text()?.into_owned();
                    let end: i64 = r.get(2)?.text()?.trim().parse().ok()?;
                    let start: i64 = r
                        .get(1)
                        .and_then(Cell::text)
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(end);
                    Some((id, start, end))
                })
                .collect();
            match keyed.last() {
            Some((id, _, ns)) if (*ns, id.as_str()) > (after.0, after.1.as_str()) => {
                after = (*ns, id.clone())
            }
            // A page that cannot move the keyset forward would be read again and again.
            _ if n == PAGE || cut => {
                return Err(CollectError::Databricks(DatabricksError::Decode {
                    route: table.to_string(),
                    detail: "a page of root spans without a readable trace_id or end_time_unix_nano: cannot page further".into(),
                }))
            }
            _ => {}
        }
            // By id: a trace is keyed by a root span's end, but a late second root span would give
            // it another one (the chunk is marked `by_id`); a state written before keyed it by its
            // root's start, also found by id.
            let delivered =
                state.delivered_among(table, keyed.iter().map(|(id, _, _)| id.as_str()))?;
            let mut wanted: Vec<(String, i64, bool)> = Vec::new();
            // Roots are listed by end: once one has not settled, neither has any after it.
            let mut unsettled = false;
            for (id, start_ns, end_ns) in keyed {
                let t = end_ns.div_euclid(1000);
                let Some(behind) = w.wants(t, &id) else {
                    continue;
                };
                // Spans still being written (a child exported after its root): read once the root
                // ended SETTLE_US ago; until then the window is held open back to it.
                if t > settled_before {
                    if !emitted.contains(&id) && !delivered.contains(&id) {
                        hold(stats, t);
                    }
                    unsettled = true;
                    continue;
                }
                // A trace with two root spans is listed twice, in one page or two: one unit, from
                // the first (its spans are all read then). Its delivery is not committed yet when
                // a later page comes, so the state cannot tell.
                if !emitted.insert(id.clone()) {
                    continue;
                }
                if delivered.contains(&id) {
                    stats.duplicates_skipped += 1;
                } else {
                    wanted.push((id, start_ns.div_euclid(1000), behind));
                }
            }
            if !wanted.is_empty() {
                let ids: Vec<String> = wanted.iter().map(|(id, _, _)| id.clone()).collect();
                // Unity Catalog's columns of the table, as discovery listed them this cycle.
                let cols = if inv.otel_events.contains(table) {
                    SPAN_COLUMNS_EVENTS
                } else {
                    SPAN_COLUMNS
                };
                let mut by_trace = fetch_spans(client, &statement, table, cols, ids, stats).await?;
                let mut units = Vec::new();
                let mut behind_n = 0u64;
                for (id, t, behind) in wanted {
                    // Its root span was just listed, and the span read was complete: a trace without
                    // spans now means the table changed in between. Not a unit (it would be
                    // committed with no record): read again next cycle.
                    let Some(spans) = by_trace.remove(&id).filter(|s| !s.is_empty()) else {
                        tracing::warn!(
                        "{table}: trace {id} has a root span but no span was returned for it; it is read again next cycle"
                    );
                        continue;
                    };
                    let root_name = spans
                        .iter()
                        .find(|s| s.parent_span_id.is_none())
                        .map(|s| s.name.clone())
                        .unwrap_or_default();
                    let agent = names
                        .get(&normalize_name(&root_name))
                        .cloned()
                        .unwrap_or_else(|| fallback_agent.clone());
                    let execution_path = match inv.agents.iter().find(|a| a.name == agent) {
                        Some(a) => {
                            execution_path(a).filter(|_| !inv.shared_tables.contains_key(&a.name))
                        }
                        None => Some(format!("/agents/{}/invocations", encode_segment(&agent))),
                    };
                    let source = TraceSource {
                        experiment_id: String::new(),
                        host: inv.agent_host(inv.trace_agent(&agent), workspace_host),
                        execution_path,
                        agent: agent.clone(),
                    };
                    let meta = TraceMeta {
                        trace_id: id.clone(),
                        client_request_id: None,
                        time_us: t,
                        location: table.to_string(),
                    };
                    behind_n += u64::from(behind);
                    // Kept (by id) until its newest root span's end leaves the window: a trace with
                    // a second root later than the first is listed again until then, and must still
                    // be known as delivered.
                    let newest_root = spans
                        .iter()
                        .filter(|s| s.parent_span_id.is_none())
                        .filter_map(|s| s.end_ns.or(s.start_ns))
                        .map(|ns| ns.div_euclid(1000))
                        .fold(t, i64::max);
                    // A second root span still settling: its children may still be landing. Read
                    // the whole trace once it has settled too.
                    if newest_root > settled_before {
                        hold(stats, newest_root);
                        continue;
                    }
                    units.push(Prepared {
                        id,
                        time_us: newest_root,
                        agent,
                        host: source.host.clone(),
                        records: span_records(&source, account_id, &meta, &spans),
                    });
                }
                stats.late_found += behind_n;
                stats.executions += units.len() as u64;
                if !units.is_empty() {
                    out.send(Chunk {
                        table: table.to_string(),
                        prepared: units,
                        by_id: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(|_| CollectError::Closed)?;
                }
            }
            if unsettled {
                return Ok(());
            }
            if n < PAGE && !cut {
                return Ok(());
            }
        }
        Err(CollectError::Databricks(DatabricksError::Decode {
            route: table.to_string(),
            detail: "more than 100000 pages of root spans".into(),
        }))
    }
}

const SPAN_COLUMNS: &str =
    "trace_id, span_id, parent_span_id, name, start_time_unix_nano, end_time_unix_nano, attributes, status";

/// [`SPAN_COLUMNS`] and `events` (`ARRAY<STRUCT<time_unix_nano, name, attributes, ...>>`),
/// where MLflow records a failure as an `exception` event: for tables that have it.
const SPAN_COLUMNS_EVENTS: &str = "trace_id, span_id, parent_span_id, name, start_time_unix_nano, end_time_unix_nano, attributes, status, events";

/// A single row (a span, a root) larger than a statement may return: it can never be read.
fn row_too_large(table: &str, what: &str) -> CollectError {
    CollectError::Databricks(DatabricksError::Statement {
        table: table.to_string(),
        state: "TRUNCATED".into(),
        error_code: "ROW_TOO_LARGE".into(),
        message: format!(
            "a single row ({what}) is larger than the {} MiB read limit per statement; it cannot \
             be read. Fix: make the span smaller (trim its attributes) or remove it from the table",
            crate::databricks::sql::INLINE_BYTE_LIMIT >> 20
        ),
        retriable: false,
    })
}

/// Whether `e` is [`row_too_large`]'s.
fn is_row_too_large(e: &CollectError) -> bool {
    matches!(e, CollectError::Databricks(DatabricksError::Statement { error_code, .. })
        if error_code == "ROW_TOO_LARGE")
}

/// The `status` cell of an OTel span table: a plain code (`STATUS_CODE_ERROR`), or the struct
/// Databricks' OTel tables keep (`STRUCT<code, message>`), which the SQL API returns as JSON
/// text: `{"code":"STATUS_CODE_ERROR","message":"boom"}`. `(code, message)`.
fn otel_status(cell: Option<String>) -> (Option<String>, Option<String>) {
    let Some(text) = cell else {
        return (None, None);
    };
    if text.trim_start().starts_with('{') {
        if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(&text) {
            let message = text_of(&v["message"]).filter(|m| !m.is_empty());
            return (text_of(&v["code"]), message);
        }
    }
    (Some(text), None)
}

/// One span of an OTel span table row (`SPAN_COLUMNS`), or None without a trace id.
fn otel_span(r: &[Cell], stats: &mut TableStats) -> Option<Span> {
    let cell = |i: usize| r.get(i).and_then(Cell::text).map(Cow::into_owned);
    stats.bytes_returned += r.iter().map(|c| c.wire_len() as u64).sum::<u64>();
    let status = otel_status(cell(7));
    Some(Span {
        trace_id: cell(0)?,
        span_id: cell(1).unwrap_or_default(),
        parent_span_id: cell(2).filter(|p| !p.is_empty()),
        name: cell(3).unwrap_or_default(),
        start_ns: cell(4).and_then(|s| s.trim().parse().ok()),
        end_ns: cell(5).and_then(|s| s.trim().parse().ok()),
        status: status.0,
        status_message: status.1,
        attributes: cell(6)
            .map(|a| string_map(&Value::String(a)))
            .unwrap_or_default(),
        // The SQL API returns the array of structs as JSON text.
        events: cell(8)
            .and_then(|e| serde_json::from_str::<Value>(&e).ok())
            .map(|e| span_events(&e))
            .unwrap_or_default(),
    })
}

/// Every span of the traces `ids`, by trace, each trace's spans by start time. One
/// `trace_id IN (...)` statement when the result fits the statement's byte limit; a result cut
/// at that limit is dropped whole and the ids are asked again in halves, down to one trace, whose
/// spans are then paged by `span_id` ([`fetch_trace_spans`]). A trace is never returned cut.
async fn fetch_spans<F>(
    client: &DatabricksClient,
    statement: &F,
    table: &str,
    cols: &'static str,
    ids: Vec<String>,
    stats: &mut TableStats,
) -> Result<BTreeMap<String, Vec<Span>>, CollectError>
where
    F: Fn(String, Vec<Param>) -> Statement,
{
    let mut by_trace: BTreeMap<String, Vec<Span>> = BTreeMap::new();
    // Groups still to read, the next one last.
    let mut groups: Vec<Vec<String>> = vec![ids];
    while let Some(group) = groups.pop() {
        if group.is_empty() {
            continue;
        }
        if group.len() == 1 {
            let id = group.into_iter().next().unwrap_or_default();
            let spans = fetch_trace_spans(client, statement, table, cols, &id, stats).await?;
            by_trace.insert(id, spans);
            continue;
        }
        let mut params = Vec::new();
        let marks: Vec<String> = group
            .iter()
            .enumerate()
            .map(|(i, id)| {
                params.push(Param::new(format!("t{i}"), id.clone(), "STRING"));
                format!(":t{i}")
            })
            .collect();
        let sql = format!(
            "SELECT {cols} FROM {t} WHERE trace_id IN ({m}) ORDER BY trace_id, start_time_unix_nano, span_id",
            t = quote_table(table),
            m = marks.join(", ")
        );
        let (rows, cut) = read_prefix(client, statement(sql, params), stats).await?;
        if cut {
            // The last trace of the result may be cut short: ask again for fewer traces.
            tracing::debug!(
                "{table}: the spans of {} traces exceed one statement's byte limit; reading them in halves",
                group.len()
            );
            let mut first = group;
            let second = first.split_off(first.len() / 2);
            groups.push(second);
            groups.push(first);
            continue;
        }
        for id in &group {
            by_trace.entry(id.clone()).or_default();
        }
        for r in rows {
            if let Some(span) = otel_span(&r, stats) {
                by_trace
                    .entry(span.trace_id.clone())
                    .or_default()
                    .push(span);
            }
        }
    }
    Ok(by_trace)
}

/// An attribute value this long or shorter is never cut by a cut read.
const KEEP_WHOLE_BYTES: usize = 1024;

/// Attributes of one span that a cut read selects one by one, at most.
const MAX_CUT_ATTRIBUTES: usize = 256;

/// The first span of trace `id` after span `after` (in `span_id` order), one larger than a
/// statement may return, read with its attribute values cut to fit: first its span id and
/// attribute keys (`map_keys`), then each value's size, then the span with each value cut
/// (`left(element_at(attributes, key), n)`) to share [`crate::collect`]'s cut budget (halved
/// while the result is still cut), a cut value ending with the marker naming its full size.
/// `None` when no span follows any more.
async fn read_cut_span<F>(
    client: &DatabricksClient,
    statement: &F,
    table: &str,
    with_events: bool,
    id: &str,
    after: Option<&str>,
    stats: &mut TableStats,
) -> Result<Option<Span>, CollectError>
where
    F: Fn(String, Vec<Param>) -> Statement,
{
    let t = quote_table(table);
    // Where the attribute values start in the cut read's row.
    let first_attr = 7 + usize::from(with_events);
    let too_large = || row_too_large(table, &format!("a span of trace {id}"));
    let mut params = vec![Param::new("t0", id.to_string(), "STRING")];
    let keyset = match after {
        Some(a) => {
            params.push(Param::new("after_span", a.to_string(), "STRING"));
            " AND span_id > :after_span"
        }
        None => "",
    };
    let sql = format!(
        "SELECT span_id, map_keys(attributes) AS attribute_keys FROM {t} \
         WHERE trace_id = :t0{keyset} ORDER BY span_id LIMIT 1"
    );
    let (rows, cut) = read_prefix(client, statement(sql, params), stats).await?;
    let Some(row) = rows.first() else {
        return if cut { Err(too_large()) } else { Ok(None) };
    };
    let Some(span_id) = row.first().and_then(Cell::text).map(Cow::into_owned) else {
        return Err(too_large());
    };
    let keys: Vec<String> = row
        .get(1)
        .and_then(Cell::text)
        .and_then(|k| serde_json::from_str(&k).ok())
        .unwrap_or_default();
    if keys.len() > MAX_CUT_ATTRIBUTES {
        return Err(row_too_large(
            table,
            &format!("a span of trace {id} with more than {MAX_CUT_ATTRIBUTES} attributes"),
        ));
    }
    let mut params = vec![
        Param::new("t0", id.to_string(), "STRING"),
        Param::new("s0", span_id.clone(), "STRING"),
    ];
    for (i, k) in keys.iter().enumerate() {
        params.push(Param::new(format!("k{i}"), k.clone(), "STRING"));
    }
    let mut texts = vec![(0usize, 0usize); keys.len()];
    if !keys.is_empty() {
        let cols: Vec<String> = (0..keys.len())
            .map(|i| {
                format!(
                    "length(element_at(attributes, :k{i})) AS c{i}, \
                     octet_length(element_at(attributes, :k{i})) AS b{i}"
                )
            })
            .collect();
        let sql = format!(
            "SELECT {} FROM {t} WHERE trace_id = :t0 AND span_id = :s0",
            cols.join(", ")
        );
        let (rows, cut) = read_prefix(client, statement(sql, params.clone()), stats).await?;
        let Some(row) = rows.first().filter(|_| !cut) else {
            return if cut { Err(too_large()) } else { Ok(None) };
        };
        let num = |i: usize| {
            row.get(i)
                .and_then(Cell::text)
                .and_then(|s| s.trim().parse::<usize>().ok())
                .unwrap_or(0)
        };
        for (i, t) in texts.iter_mut().enumerate() {
            *t = (num(2 * i), num(2 * i + 1));
        }
    }
    // Small values (the span type, ids, model names) are never cut; the large ones share the
    // budget.
    let large: Vec<usize> = (0..texts.len())
        .filter(|&i| texts[i].1 > KEEP_WHOLE_BYTES)
        .collect();
    let large_texts: Vec<(usize, usize)> = large.iter().map(|&i| texts[i]).collect();
    let total: usize = large_texts.iter().map(|t| t.1).sum();
    for budget in crate::collect::cut_budgets(total) {
        let mut caps: Vec<usize> = texts.iter().map(|t| t.0).collect();
        for (&i, cap) in large
            .iter()
            .zip(crate::collect::water_fill(&large_texts, budget))
        {
            caps[i] = cap;
        }
        let cut_cols: String = caps
            .iter()
            .enumerate()
            .map(|(i, c)| format!(", left(element_at(attributes, :k{i}), {c}) AS a{i}"))
            .collect();
        let sql = format!(
            "SELECT trace_id, span_id, parent_span_id, name, start_time_unix_nano, \
             end_time_unix_nano, status{events}{cut_cols} FROM {t} WHERE trace_id = :t0 AND span_id = :s0",
            events = if with_events { ", events" } else { "" },
        );
        let (rows, cut) = read_prefix(client, statement(sql, params.clone()), stats).await?;
        if cut {
            continue;
        }
        let Some(mut r) = rows.into_iter().next() else {
            return Ok(None);
        };
        let mut attributes = serde_json::Map::new();
        let mut n_cut = 0u64;
        for (i, k) in keys.iter().enumerate() {
            let Some(v) = r.get(first_attr + i).and_then(Cell::text) else {
                continue;
            };
            let v = match crate::collect::with_cut_marker(&v, texts[i].1) {
                Some(cut) => {
                    n_cut += 1;
                    cut
                }
                None => v.into_owned(),
            };
            attributes.insert(k.clone(), Value::String(v));
        }
        stats.payloads_cut += n_cut;
        tracing::warn!(
            "{table}: span {span_id} of trace {id} is larger than one statement may return ({} \
             MiB): read with {n_cut} of its {} attribute values cut (a marker names each full \
             size)",
            crate::databricks::sql::INLINE_BYTE_LIMIT >> 20,
            keys.len()
        );
        let mut take = |i: usize| Cell(r.get_mut(i).and_then(Cell::take_literal));
        // The columns of SPAN_COLUMNS (and events), in its order.
        let mut cells = vec![
            take(0),
            take(1),
            take(2),
            take(3),
            take(4),
            take(5),
            Cell(Some(crate::json::JsonString::encode(
                &Value::Object(attributes).to_string(),
            ))),
            take(6),
        ];
        if with_events {
            cells.push(take(7));
        }
        return Ok(otel_span(&cells, stats));
    }
    Err(too_large())
}

/// Every span of one trace, paged by `span_id` when they exceed one statement's byte limit.
async fn fetch_trace_spans<F>(
    client: &DatabricksClient,
    statement: &F,
    table: &str,
    cols: &'static str,
    id: &str,
    stats: &mut TableStats,
) -> Result<Vec<Span>, CollectError>
where
    F: Fn(String, Vec<Param>) -> Statement,
{
    let mut spans = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..100_000 {
        let mut params = vec![Param::new("t0", id.to_string(), "STRING")];
        let keyset = match &after {
            Some(a) => {
                params.push(Param::new("after_span", a.clone(), "STRING"));
                " AND span_id > :after_span"
            }
            None => "",
        };
        let sql = format!(
            "SELECT {cols} FROM {t} WHERE trace_id = :t0{keyset} ORDER BY span_id",
            t = quote_table(table),
        );
        let (rows, cut) = read_prefix(client, statement(sql, params), stats).await?;
        if rows.is_empty() && cut {
            // The next span alone is larger than a statement may return: read it with its
            // attribute values cut, then go on after it.
            let with_events = cols == SPAN_COLUMNS_EVENTS;
            let after_id = after.as_deref();
            let span =
                match read_cut_span(client, statement, table, with_events, id, after_id, stats)
                    .await
                {
                    // Events too may be what makes the span so large (a streamed generation records
                    // each chunk as one): read it without them, its error then from its status.
                    Err(e) if with_events && is_row_too_large(&e) => {
                        let span =
                            read_cut_span(client, statement, table, false, id, after_id, stats)
                                .await?;
                        if let Some(s) = &span {
                            tracing::warn!(
                                "{table}: span {} of trace {id} is too large to read with its \
                                 events (a streamed generation records each chunk as one): read \
                                 without them, its error (if any) from its status",
                                s.span_id
                            );
                        }
                        span
                    }
                    r => r?,
                }
                .ok_or_else(|| row_too_large(table, &format!("a span of trace {id}")))?;
            match &after {
                Some(a) if span.span_id <= *a => {
                    return Err(row_too_large(table, &format!("a span of trace {id}")))
                }
                _ => {}
            }
            after = Some(span.span_id.clone());
            spans.push(span);
            continue;
        }
        let last = rows
            .last()
            .and_then(|r| r.get(1))
            .and_then(Cell::text)
            .map(Cow::into_owned);
        spans.extend(rows.iter().filter_map(|r| otel_span(r, stats)));
        if !cut {
            // The order of the one-statement read: by start time, then span id.
            spans.sort_by(|a: &Span, b: &Span| {
                (a.start_ns, &a.span_id).cmp(&(b.start_ns, &b.span_id))
            });
            return Ok(spans);
        }
        match last {
            Some(l) if after.as_ref().is_none_or(|a| l > *a) => after = Some(l),
            _ => {
                return Err(CollectError::Databricks(DatabricksError::Decode {
                    route: table.to_string(),
                    detail: format!(
                        "the spans of trace {id} exceed one statement's byte limit and a span \
                         without a span_id stops paging them"
                    ),
                }))
            }
        }
    }
    Err(CollectError::Databricks(DatabricksError::Decode {
        route: table.to_string(),
        detail: format!("trace {id}: more than 100000 pages of spans"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(exec: bool) -> TraceSource {
        TraceSource {
            experiment_id: "7".into(),
            agent: "support_bot".into(),
            host: "support-bot.ai-agent.ws".into(),
            execution_path: exec.then(|| "/apps/support-bot/invocations".into()),
        }
    }

    fn spans() -> Vec<Span> {
        let doc = json!([
            {"trace_id": "tr-1", "span_id": "a", "parent_span_id": null, "name": "support_bot",
             "start_time_unix_nano": 1_000_000_000_000_000_000i64, "end_time_unix_nano": 1_000_000_002_000_000_000i64,
             "status": {"code": "STATUS_CODE_OK"}, "attributes": {"mlflow.spanType": "\"AGENT\"",
             "mlflow.spanInputs": "{\"input\":[]}", "mlflow.spanOutputs": "{\"output\":[]}"}},
            {"trace_id": "tr-1", "span_id": "b", "parent_span_id": "a", "name": "llama",
             "start_time_unix_nano": "1000000000100000000", "end_time_unix_nano": "1000000000600000000",
             "status": {"code": "STATUS_CODE_OK"}, "attributes": {"mlflow.spanType": "\"CHAT_MODEL\"",
             "mlflow.spanInputs": "\"plain prompt\"", "mlflow.spanOutputs": "{\"choices\":[]}"}},
            {"trace_id": "tr-1", "span_id": "c", "parent_span_id": "a", "name": "cat__sch__lookup_order",
             "start_time_unix_nano": 1_000_000_001_000_000_000i64, "end_time_unix_nano": 1_000_000_001_500_000_000i64,
             "status": {"code": "STATUS_CODE_ERROR", "message": "boom"},
             "attributes": {"mlflow.spanType": "\"TOOL\"", "mlflow.spanInputs": "{\"order_id\":\"1\"}",
                 "mlflow.spanOutputs": "null", "gen_ai.tool.call.id": "\"call_1\""},
             "events": [{"name": "exception", "attributes": {"exception.type": "TimeoutError", "exception.message": "slow"}}]},
            {"trace_id": "tr-1", "span_id": "d", "parent_span_id": "a", "name": "vs",
             "status": "OK", "attributes": {"mlflow.spanType": "RETRIEVER", "mlflow.spanInputs": "{\"query\":\"q\"}"}},
            {"trace_id": "tr-1", "span_id": "e", "parent_span_id": "a", "name": "parse", "attributes": {"mlflow.spanType": "\"PARSER\""}}
        ]);
        doc.as_array()
            .unwrap()
            .iter()
            .map(Span::from_json)
            .collect()
    }

    fn header(r: &AktoRecord, k: &str) -> Option<String> {
        let h: BTreeMap<String, String> = serde_json::from_str(&r.request_headers).unwrap();
        h.get(k).cloned()
    }

    #[test]
    fn llm_tool_and_retriever_spans_become_records() {
        let meta = TraceMeta {
            trace_id: "tr-1".into(),
            time_us: 1_000_000_000_000_000,
            location: "mlflow:7".into(),
            ..Default::default()
        };
        let recs = span_records(&source(false), "1000000", &meta, &spans());
        let paths: Vec<&str> = recs.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/llm/llama",
                "/tools/cat__sch__lookup_order",
                "/retrievers/vs"
            ]
        );
        for r in &recs {
            crate::traffic::validate(&crate::traffic::for_akto_runtime(r)).unwrap();
            assert_eq!(header(r, "x-mlflow-trace-id").as_deref(), Some("tr-1"));
            assert_eq!(
                header(r, "host").as_deref(),
                Some("support-bot.ai-agent.ws")
            );
            let tag: Value = serde_json::from_str(&r.tag).unwrap();
            assert_eq!(tag["gen-ai"], "Gen AI");
            assert_eq!(tag["ai-agent"], "support_bot");
        }
        assert_eq!(recs[0].request_payload, "plain prompt");
        assert_eq!(recs[0].status_code, "200");
        let tool = &recs[1];
        assert_eq!(tool.status_code, "500");
        assert_eq!(tool.request_payload, "{\"order_id\":\"1\"}");
        assert!(tool.response_payload.text().contains("TimeoutError"));
        assert!(tool
            .response_headers
            .contains("\"x-span-duration-ms\":\"500\""));
        assert_eq!(header(tool, "x-tool-call-id").as_deref(), Some("call_1"));
        assert_eq!(recs[2].request_payload, "{\"query\":\"q\"}");
        let unit = Prepared {
            id: "tr-1".into(),
            time_us: 0,
            agent: "a".into(),
            host: "h".into(),
            records: recs,
        };
        assert_eq!(tool_call_ids(&unit), ["call_1"]);
    }

    #[test]
    fn root_span_is_the_execution_only_without_a_table() {
        let meta = TraceMeta::default();
        let recs = span_records(&source(true), "1", &meta, &spans());
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[0].path, "/apps/support-bot/invocations");
        assert_eq!(recs[0].request_payload, "{\"input\":[]}");
        // Garbage never panics.
        let odd = Span::from_json(&json!({"attributes": "not a map", "events": 3, "status": 7}));
        let recs = span_records(&source(true), "1", &meta, &[odd]);
        assert_eq!(recs.len(), 1);
        crate::traffic::validate(&crate::traffic::for_akto_runtime(&recs[0])).unwrap();
    }

    #[test]
    fn mlflow_2_span_dicts_are_read_like_mlflow_3_spans() {
        // MLflow 2's `Span.to_dict`: context ids, `parent_id`, ns times, `status_code`.
        let v2 = json!([
            {"name": "support_bot", "context": {"span_id": "0x1", "trace_id": "0xt"}, "parent_id": null,
             "start_time": 1_700_000_000_000_000_000i64, "end_time": 1_700_000_002_000_000_000i64,
             "status_code": "OK", "status_message": "", "attributes": {"mlflow.spanType": "\"AGENT\""}},
            {"name": "chain", "context": {"span_id": "0x2", "trace_id": "0xt"}, "parent_id": "0x1",
             "start_time": 1_700_000_000_000_000_000i64, "end_time": 1_700_000_001_000_000_000i64,
             "status_code": "OK", "attributes": {"mlflow.spanType": "\"CHAIN\""}},
            {"name": "lookup", "context": {"span_id": "0x3", "trace_id": "0xt"}, "parent_id": "0x2",
             "start_time": 1_700_000_000_500_000_000i64, "end_time": 1_700_000_000_750_000_000i64,
             "status_code": "ERROR", "status_message": "tool failed",
             "attributes": {"mlflow.spanType": "\"TOOL\""}, "events": []}
        ]);
        let spans: Vec<Span> = v2.as_array().unwrap().iter().map(Span::from_json).collect();
        assert_eq!(spans[2].span_id, "0x3");
        assert_eq!(spans[2].trace_id, "0xt");
        assert_eq!(spans[2].parent_span_id.as_deref(), Some("0x2"));
        assert_eq!(spans[1].start_ns, Some(1_700_000_000_000_000_000));
        let recs = span_records(&source(true), "1", &TraceMeta::default(), &spans);
        // One execution (the root only, not the CHAIN), one tool.
        let paths: Vec<&str> = recs.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/apps/support-bot/invocations", "/tools/lookup"]);
        let tool = &recs[1];
        assert_eq!(tool.status_code, "500");
        assert!(tool.response_payload.text().contains("tool failed"));
        assert!(tool
            .response_headers
            .contains("\"x-span-duration-ms\":\"250\""));
    }

    #[test]
    fn otel_status_structs_and_numeric_codes_mark_failed_spans() {
        assert_eq!(
            otel_status(Some(
                r#"{"code":"STATUS_CODE_ERROR","message":"boom"}"#.into()
            )),
            (Some("STATUS_CODE_ERROR".into()), Some("boom".into()))
        );
        assert_eq!(
            otel_status(Some(r#"{"code":"STATUS_CODE_OK","message":""}"#.into())),
            (Some("STATUS_CODE_OK".into()), None)
        );
        assert_eq!(
            otel_status(Some("ERROR".into())),
            (Some("ERROR".into()), None)
        );
        assert_eq!(otel_status(None), (None, None));
        let tool = |status: &str| {
            let mut s = spans()[2].clone();
            s.events.clear();
            (s.status, s.status_message) = otel_status(Some(status.into()));
            let recs = span_records(&source(false), "1", &TraceMeta::default(), &[s]);
            (
                recs[0].status_code.clone(),
                recs[0].response_payload.text().to_string(),
            )
        };
        let (code, body) = tool(r#"{"code":"STATUS_CODE_ERROR","message":"boom"}"#);
        assert_eq!(code, "500");
        assert!(body.contains("boom"), "{body}");
        assert_eq!(tool(r#"{"code":2}"#).0, "500");
        assert_eq!(tool(r#"{"code":"STATUS_CODE_OK"}"#).0, "200");
    }

    #[test]
    fn an_agents_executions_have_one_path_whichever_trace_store_holds_them() {
        // Used by both the MLflow sources and the OTel span tables.
        let agent = |endpoint: Option<&str>, table: bool| Agent {
            name: "Support Bot".into(),
            endpoint: endpoint.map(str::to_string),
            task: None,
            is_agent: true,
            models: Vec::new(),
            table: table.then(|| crate::discovery::InferenceTable {
                full_name: "c.s.t_payload".into(),
                kind: crate::discovery::TableKind::AiGatewayPayload,
                columns: Vec::new(),
            }),
            table_note: None,
            tags: BTreeMap::new(),
            experiment_id: None,
            app: None,
        };
        assert_eq!(
            execution_path(&agent(Some("ep"), false)).as_deref(),
            Some("/serving-endpoints/ep/invocations")
        );
        assert_eq!(
            execution_path(&agent(None, false)).as_deref(),
            Some("/agents/Support%20Bot/invocations")
        );
        assert_eq!(execution_path(&agent(Some("ep"), true)), None);

        // An endpoint whose table another endpoint reads (its rows are that one's records):
        // its traces send no executions either.
        let mut shared = agent(Some("ep"), false);
        shared.experiment_id = Some("7".into());
        let mut inv = Inventory {
            agents: vec![shared],
            ..Default::default()
        };
        assert!(trace_sources(&inv, "w")[0].execution_path.is_some());
        inv.shared_tables
            .insert("Support Bot".into(), "other".into());
        let src = &trace_sources(&inv, "w")[0];
        assert_eq!(src.execution_path, None);
        // ... and its spans go to the host of the agent reading the table, where that table's
        // rows (and their tool calls) go: one call is sent once.
        assert_eq!(src.host, inv.agent_host("other", "w"));
        assert_ne!(src.host, inv.agent_host("Support Bot", "w"));
    }

    #[test]
    fn extreme_span_times_never_panic() {
        let s = Span::from_json(&json!({"trace_id": "t", "span_id": "s", "name": "x",
            "start_time_unix_nano": "-9223372036854775808", "end_time_unix_nano": "0",
            "attributes": {"mlflow.spanType": "\"TOOL\""}}));
        let recs = span_records(&source(false), "1", &TraceMeta::default(), &[s]);
        assert_eq!(recs.len(), 1);
        assert!(!recs[0].response_headers.contains("x-span-duration-ms"));
        let t = TraceInfo {
            trace_id: "t".into(),
            execution_duration: Some("10000000000000s".into()),
            ..Default::default()
        };
        let root = summary_span(&t, 1_700_000_000_000_000);
        assert_eq!(root.end_ns, None);
    }

    #[test]
    fn the_last_read_of_a_trace_is_the_one_before_it_leaves_the_lookback() {
        let o = |lookback_s: u64, catchup_s: u64| CollectOptions {
            lookback: std::time::Duration::from_secs(lookback_s),
            max_catchup: std::time::Duration::from_secs(catchup_s),
            ..Default::default()
        };
        let now = 10_000_000_000;
        // The next read's late window starts at now - lookback; a minute of margin.
        assert_eq!(last_read_before(&o(3600, 86_400), now), now - 3_540_000_000);
        // A tiny lookback: half of it.
        assert_eq!(last_read_before(&o(60, 86_400), now), now - 30_000_000);
        // MAX_CATCHUP below the lookback bounds the window.
        assert_eq!(last_read_before(&o(7200, 3600), now), now - 3_540_000_000);
    }

    #[test]
    fn without_a_cursor_the_window_starts_a_lookback_before_the_last_read() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::open(dir.path(), false).unwrap();
        let min = 60_000_000i64;
        let opts = CollectOptions {
            lookback: std::time::Duration::from_secs(3600),
            ..CollectOptions::default()
        };
        let now = 1_000 * min;
        assert_eq!(
            window(&state, "mlflow:1", &opts, now).unwrap().from_us,
            now - 60 * min
        );
        // Read (and found nothing) 5 minutes ago: the window reaches back from that read.
        state.set_read_mark("mlflow:1", now - 5 * min).unwrap();
        let w = window(&state, "mlflow:1", &opts, now).unwrap();
        assert_eq!(w.from_us, now - 65 * min);
        assert!(w.cursor.is_none());
    }

    #[test]
    fn a_trace_without_spans_is_a_record_only_for_agents_without_a_table() {
        let t = TraceInfo {
            trace_id: "tr-9".into(),
            request_preview: Some("{\"q\":1}".into()),
            response_preview: Some("ok".into()),
            ..Default::default()
        };
        let summary = summary_span(&t, 1_700_000_000_000_000);
        let meta = TraceMeta::default();
        // What the WARN says is what is sent.
        let with_table = span_records(&source(false), "1", &meta, std::slice::from_ref(&summary));
        assert!(with_table.is_empty());
        assert!(summary_note(&source(false)).starts_with("no record is sent"));
        let without = span_records(&source(true), "1", &meta, &[summary]);
        assert_eq!(without.len(), 1);
        assert_eq!(without[0].request_payload, "{\"q\":1}");
        assert!(summary_note(&source(true)).starts_with("sending its summary only"));
    }

    #[test]
    fn tool_call_ids_are_recovered_from_the_spans_data() {
        let tool = |inputs: &str, outputs: &str| {
            let mut attributes = BTreeMap::new();
            attributes.insert("mlflow.spanType".to_string(), "\"TOOL\"".to_string());
            attributes.insert(
                "mlflow.spanInputs".to_string(),
                Value::String(inputs.into()).to_string(),
            );
            attributes.insert(
                "mlflow.spanOutputs".to_string(),
                Value::String(outputs.into()).to_string(),
            );
            Span {
                name: "lookup".into(),
                attributes,
                ..Default::default()
            }
        };
        // LangChain: the output is str(ToolMessage).
        let lc = tool(
            "{\"order_id\": \"1\"}",
            "content='{\"status\": \"shipped\"}' name='lookup' tool_call_id='call_Ab12'",
        );
        assert_eq!(lc.tool_call_id().as_deref(), Some("call_Ab12"));
        // A ToolMessage as JSON, plain or serialized by LangChain.
        let json_msg = tool("{}", "{\"content\": \"ok\", \"tool_call_id\": \"call_2\"}");
        assert_eq!(json_msg.tool_call_id().as_deref(), Some("call_2"));
        let dumped = tool(
            "{}",
            "{\"lc\": 1, \"type\": \"constructor\", \"kwargs\": {\"tool_call_id\": \"call_3\"}}",
        );
        assert_eq!(dumped.tool_call_id().as_deref(), Some("call_3"));
        // The inputs are the tool call (OpenAI, LangChain ToolCall).
        let openai = tool(
            "{\"id\": \"call_4\", \"type\": \"function\", \"function\": {\"name\": \"lookup\"}}",
            "done",
        );
        assert_eq!(openai.tool_call_id().as_deref(), Some("call_4"));
        let lc_call = tool(
            "{\"id\": \"call_5\", \"name\": \"lookup\", \"args\": {\"q\": 1}, \"type\": \"tool_call\"}",
            "done",
        );
        assert_eq!(lc_call.tool_call_id().as_deref(), Some("call_5"));
        // An attribute wins.
        let mut attr = lc.clone();
        attr.attributes
            .insert("gen_ai.tool.call.id".into(), "\"call_attr\"".into());
        assert_eq!(attr.tool_call_id().as_deref(), Some("call_attr"));
        // Plain arguments and outputs reveal none (an `id` argument is not a call id).
        assert_eq!(
            tool("{\"id\": \"42\"}", "{\"status\": \"ok\"}").tool_call_id(),
            None
        );
        assert_eq!(tool("\"q\"", "tool_call_id=").tool_call_id(), None);
        assert_eq!(tool("", "tool_call_id='a\nb'").tool_call_id(), None);
        // The record carries it, so the delivery stage merges the row's record of the call.
        let recs = span_records(&source(false), "1", &TraceMeta::default(), &[lc]);
        assert_eq!(
            header(&recs[0], "x-tool-call-id").as_deref(),
            Some("call_Ab12")
        );
    }

    #[test]
    fn long_runs_are_keyed_by_their_end() {
        let o = CollectOptions {
            lookback: std::time::Duration::from_secs(3600),
            ..Default::default()
        };
        let long = long_run_us(&o);
        assert_eq!(long, 1_800_000_000);
        assert_eq!(unit_time(100, 100 + long, long), 100);
        assert_eq!(unit_time(100, 101 + long, long), 101 + long);
        let w = Window {
            from_us: 100,
            cursor: Some((500, "m".into(), 300)),
        };
        assert_eq!(w.late_from(), 300);
        let fresh = Window {
            from_us: 100,
            cursor: None,
        };
        assert_eq!(fresh.late_from(), 100);
    }

    #[test]
    fn window_reads_new_and_recent_late_items_only() {
        let w = Window {
            from_us: 100,
            cursor: Some((500, "m".into(), 300)),
        };
        assert_eq!(w.wants(50, "x"), None);
        assert_eq!(w.wants(200, "x"), None);
        assert_eq!(w.wants(400, "x"), Some(true));
        assert_eq!(w.wants(500, "a"), Some(true));
        assert_eq!(w.wants(500, "z"), Some(false));
        assert_eq!(w.wants(900, "a"), Some(false));
    }
}
