//! MLflow routes: experiments search, traces search (filter on `trace.timestamp_ms`, order,
//! pagination), and span download through `credentials-for-data-download`, whose signed URI is
//! served by the emulator itself and, like cloud storage, rejects the Databricks auth header.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad_param, err, ok, page, Principal};
use crate::layout::Experiment;
use crate::payload::{self, PayloadSpec, Rng};
use crate::state::Shared;
use crate::Privilege;

const TRACES_PER_EXPERIMENT: usize = 12;

/// One synthetic trace.
struct Trace {
    id: String,
    experiment: String,
    agent: usize,
    ts_ms: i64,
    duration_ms: i64,
    ok: bool,
    /// Still running: `IN_PROGRESS`.
    in_progress: bool,
    seed: u64,
    client_request_id: String,
    /// The inference row whose execution this trace describes (same payload seed, time and
    /// client request id), if any.
    mirrors: Option<String>,
}

fn traces_of(shared: &Shared, exp: &Experiment) -> Vec<Trace> {
    let mut rng = Rng::new(shared.cfg.seed ^ (exp.agent as u64).wrapping_mul(0x7F4A_7C15) ^ 0x7ACE);
    let extra: Vec<(i64, u64)> = crate::state::lock(&shared.extra_traces).clone();
    let running = crate::state::lock(&shared.traces_in_progress).clone();
    let finished = crate::state::lock(&shared.traces_finished).clone();
    let mut out: Vec<Trace> = (0..TRACES_PER_EXPERIMENT)
        .map(|k| Trace {
            id: format!("tr-{}", rng.hex(32)),
            experiment: exp.id.clone(),
            agent: exp.agent,
            ts_ms: shared.started_ms - 3_600_000 + (k as i64) * 290_000 + rng.below(60_000) as i64,
            duration_ms: 200 + rng.below(5000) as i64,
            ok: rng.chance(900),
            in_progress: false,
            seed: rng.next_u64(),
            client_request_id: format!("cr-{}", rng.hex(12)),
            mirrors: None,
        })
        .collect();
    // Some successful traces describe executions that the agent's inference table also holds:
    // the same tool call then appears in the row's response and in the trace's TOOL span
    // (`gen_ai.tool.call.id`), as when an agent logs both. Failed traces are left alone.
    let mut slots = out.iter_mut().filter(|t| t.ok);
    for row in shared.store.mirrored(exp.agent) {
        let Some(t) = slots.next() else { break };
        t.seed = row.seed;
        t.ts_ms = row.t_us.div_euclid(1000);
        if let Some(c) = &row.client_request_id {
            t.client_request_id = c.clone();
        }
        t.mirrors = Some(row.request_id.clone());
    }
    for (ts_ms, seed) in extra {
        let mut r = Rng::new(seed ^ (exp.agent as u64).wrapping_mul(0x9E37_79B9));
        out.push(Trace {
            id: format!("tr-{}", r.hex(32)),
            experiment: exp.id.clone(),
            agent: exp.agent,
            ts_ms,
            // Drawn in any case: the trace's other values stay the same once it has ended.
            duration_ms: {
                let drawn = 200 + r.below(5000) as i64;
                finished
                    .get(&seed)
                    .map_or(drawn, |end| (end - ts_ms).max(0))
            },
            ok: r.chance(900),
            in_progress: running.contains(&seed),
            seed: r.next_u64(),
            client_request_id: format!("cr-{}", r.hex(12)),
            mirrors: None,
        });
    }
    out
}

/// Tool calls described both by an inference row and by an MLflow trace (ground truth for
/// deduplication tests).
pub(crate) fn mirrored_tool_calls(shared: &Shared) -> Vec<crate::MirroredToolCall> {
    let mut out = Vec::new();
    for exp in &shared.layout.experiments {
        for t in traces_of(shared, exp) {
            let Some(request_id) = &t.mirrors else {
                continue;
            };
            if let Some((call_id, tool, _, _)) = payload::tool_call(&spec(shared, &t)) {
                out.push(crate::MirroredToolCall {
                    agent: shared.layout.agents[t.agent].name.clone(),
                    experiment_id: t.experiment.clone(),
                    trace_id: t.id.clone(),
                    databricks_request_id: request_id.clone(),
                    tool_call_id: call_id,
                    tool,
                });
            }
        }
    }
    out
}

/// Adds `count` traces timestamped now to every experiment.
pub(crate) fn add_traces(shared: &Shared, count: usize) {
    let now = chrono::Utc::now().timestamp_millis();
    let mut extra = crate::state::lock(&shared.extra_traces);
    for k in 0..count {
        let seed = shared.cfg.seed ^ ((extra.len() as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
        extra.push((now - (count - k) as i64, seed));
    }
}

/// Starts one trace at `ts_ms` in every experiment, `IN_PROGRESS` until its seed (returned) is
/// removed from `traces_in_progress`.
pub(crate) fn start_trace(shared: &Shared, ts_ms: i64) -> u64 {
    let mut extra = crate::state::lock(&shared.extra_traces);
    let seed = shared.cfg.seed ^ ((extra.len() as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    extra.push((ts_ms, seed));
    crate::state::lock(&shared.traces_in_progress).insert(seed);
    seed
}

/// Adds one trace that started at `ts_ms` (e.g. a long run that just ended) to every experiment.
pub(crate) fn add_trace_at(shared: &Shared, ts_ms: i64) {
    let mut extra = crate::state::lock(&shared.extra_traces);
    let seed = shared.cfg.seed ^ ((extra.len() as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    extra.push((ts_ms, seed));
}

/// `GET /api/2.0/mlflow/runs/get?run_id=`: the runs that logged the agents' UC model versions.
/// Runs of agents with an experiment live there; other runs answer 404 (deleted).
/// A run in an experiment the caller may not read answers 403 `PERMISSION_DENIED`.
pub(crate) async fn runs_get(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(run_id) = q.get("run_id").filter(|r| !r.is_empty()) else {
        return bad_param("run_id is required");
    };
    let l = &shared.layout;
    for (i, a) in l.agents.iter().enumerate() {
        let Some(full) = &a.model_full_name else {
            continue;
        };
        for v in 1..=a.model_versions {
            if &super::uc::run_id(full, v) != run_id {
                continue;
            }
            let Some(exp) = l.experiments.iter().find(|e| e.agent == i) else {
                break;
            };
            if !may_read(&shared, &p.0, &exp.id) {
                return read_denied(&p.0, &exp.id);
            }
            let start = shared.started_ms - 86_400_000 * 5 + v as i64 * 3_600_000;
            return ok(json!({"run": {
                "info": {"run_id": run_id, "run_uuid": run_id, "experiment_id": exp.id,
                    "run_name": format!("{}-v{v}", a.name), "user_id": "owner@example.com",
                    "status": "FINISHED", "start_time": start, "end_time": start + 120_000,
                    "artifact_uri": format!("dbfs:/databricks/mlflow-tracking/{}/{run_id}/artifacts", exp.id),
                    "lifecycle_stage": "active"},
                "data": {"params": [{"key": "agent", "value": a.name}],
                    "tags": [{"key": "mlflow.runName", "value": format!("{}-v{v}", a.name)}]},
                "inputs": {},
            }}));
        }
    }
    err(
        StatusCode::NOT_FOUND,
        "RESOURCE_DOES_NOT_EXIST",
        format!("Run '{run_id}' not found."),
    )
}

fn all_traces(shared: &Shared) -> Vec<Trace> {
    shared
        .layout
        .experiments
        .iter()
        .flat_map(|e| traces_of(shared, e))
        .collect()
}

fn spec<'a>(shared: &'a Shared, t: &Trace) -> PayloadSpec<'a> {
    let a = &shared.layout.agents[t.agent];
    PayloadSpec {
        format: a.format,
        agent: &a.name,
        tools: &a.tools,
        seed: t.seed,
        status: if t.ok { 200 } else { 500 },
        flags: 0,
        payload_bytes: 0,
    }
}

fn state_of(t: &Trace) -> &'static str {
    match (t.in_progress, t.ok) {
        (true, _) => "IN_PROGRESS",
        (false, true) => "OK",
        (false, false) => "ERROR",
    }
}

fn preview(s: Option<String>) -> String {
    s.unwrap_or_default().chars().take(1000).collect()
}

fn trace_info(shared: &Shared, t: &Trace) -> Value {
    let sp = spec(shared, t);
    let time = chrono::DateTime::from_timestamp_millis(t.ts_ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    json!({
        "trace_id": t.id,
        "client_request_id": t.client_request_id,
        "trace_location": {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": t.experiment}},
        "request_preview": preview(payload::request_json(&sp)),
        "response_preview": preview(payload::response_json(&sp)),
        "request_time": time,
        "execution_duration": format!("{}.{:03}s", t.duration_ms / 1000, t.duration_ms % 1000),
        "state": state_of(t),
        "trace_metadata": {"mlflow.trace_schema.version": "3", "mlflow.sourceRun": "", "mlflow.modelId": shared.layout.agents[t.agent].model_full_name.clone().unwrap_or_default()},
        "tags": {"mlflow.traceName": shared.layout.agents[t.agent].name, "mlflow.artifactLocation": format!("dbfs:/databricks/mlflow-tracking/{}/traces/{}/artifacts", t.experiment, t.id)},
    })
}

fn experiment_json(shared: &Shared, e: &Experiment) -> Value {
    json!({
        "experiment_id": e.id,
        "name": e.name,
        "artifact_location": format!("dbfs:/databricks/mlflow-tracking/{}", e.id),
        "lifecycle_stage": "active",
        "creation_time": shared.started_ms - 86_400_000 * 10,
        "last_update_time": shared.started_ms,
        "tags": [
            {"key": "mlflow.experimentType", "value": "MLFLOW_EXPERIMENT"},
            {"key": "mlflow.ownerEmail", "value": "owner@example.com"},
        ],
        "trace_location": {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": e.id}},
    })
}

/// Whether `principal` holds CAN READ on the experiment `id`.
fn may_read(shared: &Shared, principal: &str, id: &str) -> bool {
    shared.allowed(
        principal,
        &Privilege::ReadExperiment {
            experiment_id: id.to_string(),
        },
    )
}

/// MLflow's answer to a request on an experiment the caller may not read.
fn read_denied(principal: &str, id: &str) -> Response {
    err(
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
        format!("User '{principal}' does not have permission to 'View' experiment with id '{id}'"),
    )
}

/// Only the experiments the caller may read are listed.
fn experiments_page(shared: &Shared, who: &str, q: &HashMap<String, String>) -> Response {
    let exps: Vec<&Experiment> = shared
        .layout
        .experiments
        .iter()
        .filter(|e| may_read(shared, who, &e.id))
        .collect();
    let (s, e, next) = match page(exps.len(), q, 1000, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut v = json!({"experiments": exps[s..e].iter().map(|x| experiment_json(shared, x)).collect::<Vec<_>>()});
    if let Some(t) = next {
        v["next_page_token"] = json!(t);
    }
    ok(v)
}

fn str_map(v: &Value) -> HashMap<String, String> {
    let mut q = HashMap::new();
    for k in ["max_results", "page_token"] {
        match &v[k] {
            Value::String(s) => {
                q.insert(k.to_string(), s.clone());
            }
            Value::Number(n) => {
                q.insert(k.to_string(), n.to_string());
            }
            _ => {}
        }
    }
    q
}

pub(crate) async fn experiments_search(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> Response {
    let v: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return err(
                    StatusCode::BAD_REQUEST,
                    "MALFORMED_REQUEST",
                    format!("Invalid JSON body: {e}"),
                )
            }
        }
    };
    experiments_page(&shared, &p.0, &str_map(&v))
}

pub(crate) async fn experiments_search_get(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    experiments_page(&shared, &p.0, &q)
}

#[derive(Debug, Deserialize, Default)]
pub(crate) struct TraceSearch {
    #[serde(default)]
    locations: Vec<Value>,
    #[serde(default)]
    experiment_ids: Vec<String>,
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    max_results: Option<i64>,
    #[serde(default)]
    order_by: Vec<String>,
    #[serde(default)]
    page_token: Option<String>,
}

/// A parsed `trace.timestamp_ms OP N` / `trace.execution_time_ms OP N` / `trace.status = 'OK'`
/// clause.
enum Clause {
    Ts(String, i64),
    /// On the execution duration (ms): a trace still `IN_PROGRESS` has none, so it never
    /// matches (as in MLflow, where its `execution_time_ms` is NULL).
    Duration(String, i64),
    State(bool, String),
}

/// `value OP n` for a numeric filter clause.
fn compare(op: &str, value: i64, n: i64) -> bool {
    match op {
        ">" => value > n,
        ">=" => value >= n,
        "<" => value < n,
        "<=" => value <= n,
        "=" => value == n,
        _ => value != n,
    }
}

fn parse_filter(f: &str) -> Result<Vec<Clause>, String> {
    let mut out = Vec::new();
    let upper = f.to_ascii_uppercase();
    let mut parts = Vec::new();
    let mut rest = 0;
    while let Some(i) = upper[rest..].find(" AND ") {
        parts.push(&f[rest..rest + i]);
        rest += i + 5;
    }
    parts.push(&f[rest..]);
    for part in parts {
        let p = part.trim();
        if p.is_empty() {
            continue;
        }
        let ops = [">=", "<=", "!=", ">", "<", "="];
        let Some((op, idx)) = ops.iter().find_map(|op| p.find(op).map(|i| (*op, i))) else {
            return Err(format!("cannot parse filter clause '{p}': expected e.g. trace.timestamp_ms > 1711089570679"));
        };
        let key = p[..idx].trim().to_ascii_lowercase();
        let val = p[idx + op.len()..].trim();
        match key.as_str() {
            "trace.timestamp_ms" | "timestamp_ms" | "trace.timestamp" | "timestamp" => {
                let n = val
                    .parse::<i64>()
                    .map_err(|_| format!("'{val}' is not an integer timestamp in ms"))?;
                out.push(Clause::Ts(op.to_string(), n));
            }
            "trace.execution_time_ms" | "execution_time_ms" | "trace.execution_time"
            | "execution_time" => {
                let n = val
                    .parse::<i64>()
                    .map_err(|_| format!("'{val}' is not an integer duration in ms"))?;
                out.push(Clause::Duration(op.to_string(), n));
            }
            "trace.status" | "status" | "trace.state" | "state" => {
                let v = val.trim_matches(|c| c == '\'' || c == '"').to_string();
                match op {
                    "=" => out.push(Clause::State(true, v)),
                    "!=" => out.push(Clause::State(false, v)),
                    _ => return Err(format!("operator {op} is not supported on {key}")),
                }
            }
            other => {
                return Err(format!(
                "unsupported filter key '{other}' (supported: trace.timestamp_ms, trace.execution_time_ms, trace.status)"
            ))
            }
        }
    }
    Ok(out)
}

pub(crate) async fn traces_search(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> Response {
    let req: TraceSearch = if body.is_empty() {
        TraceSearch::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return err(
                    StatusCode::BAD_REQUEST,
                    "MALFORMED_REQUEST",
                    format!("Invalid JSON body: {e}"),
                )
            }
        }
    };
    let mut exp_ids: Vec<String> = req.experiment_ids.clone();
    for l in &req.locations {
        if let Some(id) = l["mlflow_experiment"]["experiment_id"].as_str() {
            exp_ids.push(id.to_string());
        }
    }
    if exp_ids.is_empty() {
        return bad_param("locations must name at least one MLFLOW_EXPERIMENT experiment_id");
    }
    if let Some(id) = exp_ids.iter().find(|id| !may_read(&shared, &p.0, id)) {
        return read_denied(&p.0, id);
    }
    let clauses = match req.filter.as_deref().map(parse_filter).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => return bad_param(e),
    };
    let mut traces: Vec<Trace> = all_traces(&shared)
        .into_iter()
        .filter(|t| exp_ids.contains(&t.experiment))
        .filter(|t| {
            clauses.iter().all(|c| match c {
                Clause::Ts(op, n) => compare(op, t.ts_ms, *n),
                Clause::Duration(op, n) => !t.in_progress && compare(op, t.duration_ms, *n),
                Clause::State(eq, v) => (state_of(t) == v) == *eq,
            })
        })
        .collect();
    let asc = req
        .order_by
        .first()
        .map(|o| o.to_ascii_uppercase())
        .is_some_and(|o| o.contains("TIMESTAMP") && o.ends_with("ASC"));
    traces.sort_by(|a, b| a.ts_ms.cmp(&b.ts_ms).then(a.id.cmp(&b.id)));
    if !asc {
        traces.reverse();
    }
    let mut q = HashMap::new();
    if let Some(m) = req.max_results {
        q.insert("max_results".to_string(), m.to_string());
    }
    if let Some(t) = req.page_token {
        q.insert("page_token".to_string(), t);
    }
    let (s, e, next) = match page(traces.len(), &q, 100, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut v =
        json!({"traces": traces[s..e].iter().map(|t| trace_info(&shared, t)).collect::<Vec<_>>()});
    if let Some(t) = next {
        v["next_page_token"] = json!(t);
    }
    ok(v)
}

fn signature(shared: &Shared, id: &str, expires: i64) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ shared.sign_key;
    for b in id.bytes().chain(expires.to_string().into_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    Rng::new(h ^ shared.sign_key).hex(40)
}

pub(crate) async fn credentials(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    if !all_traces(&shared).iter().any(|t| t.id == id) {
        return err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Trace with id '{id}' does not exist."),
        );
    }
    let expires = chrono::Utc::now().timestamp() + 900;
    let sig = signature(&shared, &id, expires);
    let storage = crate::state::lock(&shared.storage_url)
        .clone()
        .unwrap_or_else(|| shared.base_url.clone());
    ok(json!({"credential_info": {
        "request_id": id,
        "signed_uri": format!("{storage}/_signed/traces/{id}?X-Amz-Expires={expires}&X-Amz-Signature={sig}"),
        "type": "AWS_PRESIGNED_URL",
        "headers": [],
    }}))
}

pub(crate) fn xml_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/xml")],
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"),
    )
        .into_response()
}

/// A span attribute value as MLflow stores it: the JSON of the value (a JSON text is stored as
/// its parsed value, other text as a JSON string, nothing as `null`).
fn as_attr(v: &str) -> String {
    if v.is_empty() {
        return "null".to_string();
    }
    serde_json::from_str::<Value>(v)
        .unwrap_or_else(|_| json!(v))
        .to_string()
}

fn spans_of(shared: &Shared, t: &Trace) -> Value {
    let sp = spec(shared, t);
    let mut rng = Rng::new(t.seed ^ 0x5BA5);
    let start = t.ts_ms * 1_000_000;
    let end = start + t.duration_ms * 1_000_000;
    let root = rng.hex(16);
    let req = payload::request_json(&sp).unwrap_or_default();
    let resp = payload::response_json(&sp).unwrap_or_default();
    let a = &shared.layout.agents[t.agent];
    let status =
        json!({"code": if t.ok { "STATUS_CODE_OK" } else { "STATUS_CODE_ERROR" }, "message": ""});
    let attr = |kind: &str, inputs: &str, outputs: &str| {
        json!({
            "mlflow.traceRequestId": json!(t.id).to_string(),
            "mlflow.spanType": json!(kind).to_string(),
            "mlflow.spanInputs": as_attr(inputs),
            "mlflow.spanOutputs": as_attr(outputs),
        })
    };
    let mut spans = vec![
        json!({"trace_id": t.id, "span_id": root, "parent_span_id": null, "name": a.name,
            "start_time_unix_nano": start, "end_time_unix_nano": end, "status": status, "attributes": attr("AGENT", &req, &resp), "events": []}),
        json!({"trace_id": t.id, "span_id": rng.hex(16), "parent_span_id": root, "name": "databricks-meta-llama-3-3-70b-instruct",
            "start_time_unix_nano": start + 1_000_000, "end_time_unix_nano": end - 1_000_000, "status": status,
            "attributes": attr("CHAT_MODEL", &req, &resp), "events": []}),
    ];
    // The TOOL span mirrors the execution's tool call (call id in `gen_ai.tool.call.id`); a
    // failed trace fails in its tool, with an exception event as MLflow records it.
    if let Some((call_id, tool, args, out)) = payload::tool_call(&sp) {
        let mut attributes = attr("TOOL", &args, if t.ok { &out } else { "" });
        attributes["gen_ai.tool.call.id"] = json!(json!(call_id).to_string());
        let events = if t.ok {
            json!([])
        } else {
            json!([{"name": "exception", "time_unix_nano": start + 3_000_000, "attributes": {
                "exception.type": "TimeoutError", "exception.message": format!("{tool} timed out after 30s")}}])
        };
        spans.push(json!({"trace_id": t.id, "span_id": rng.hex(16), "parent_span_id": root, "name": tool,
            "start_time_unix_nano": start + 2_000_000, "end_time_unix_nano": start + 3_000_000, "status": status,
            "attributes": attributes, "events": events}));
    }
    if t.agent.is_multiple_of(2) {
        spans.push(json!({"trace_id": t.id, "span_id": rng.hex(16), "parent_span_id": root, "name": "vector_search",
            "start_time_unix_nano": start + 1_500_000, "end_time_unix_nano": start + 1_900_000,
            "status": {"code": "STATUS_CODE_OK", "message": ""},
            "attributes": attr("RETRIEVER", "{\"query\":\"refund policy\"}",
                "[{\"page_content\":\"Refunds within 30 days\",\"metadata\":{\"doc_uri\":\"kb/refunds.md\"}}]"),
            "events": []}));
    }
    json!({"spans": spans})
}

pub(crate) async fn signed_download(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if headers.contains_key(header::AUTHORIZATION) {
        return xml_error(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string parameter or the Authorization header should be specified",
        );
    }
    let expires = q
        .get("X-Amz-Expires")
        .and_then(|e| e.parse::<i64>().ok())
        .unwrap_or(0);
    let sig = q.get("X-Amz-Signature").cloned().unwrap_or_default();
    if sig != signature(&shared, &id, expires) {
        return xml_error(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        );
    }
    if expires < chrono::Utc::now().timestamp() {
        return xml_error(StatusCode::FORBIDDEN, "AccessDenied", "Request has expired");
    }
    match all_traces(&shared).iter().find(|t| t.id == id) {
        Some(t) => match shared.store.streamed_span_document(&id) {
            Some(pad) => streamed(&spans_of(&shared, t), pad),
            None => ok(spans_of(&shared, t)),
        },
        None => xml_error(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        ),
    }
}

/// The largest piece a streamed span document is sent in.
const PIECE_BYTES: usize = 64 << 10;

/// A span document sent piece by piece, its length unknown to the client: `head`, `pad_left`
/// bytes of padding, `tail`.
struct StreamedDocument {
    head: Bytes,
    pad_left: usize,
    filler: Bytes,
    tail: Bytes,
}

impl hyper::body::Body for StreamedDocument {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let piece = if !this.head.is_empty() {
            this.head.split_to(this.head.len().min(PIECE_BYTES))
        } else if this.pad_left > 0 {
            let n = this.pad_left.min(this.filler.len());
            this.pad_left -= n;
            this.filler.slice(..n)
        } else if !this.tail.is_empty() {
            this.tail.split_to(this.tail.len().min(PIECE_BYTES))
        } else {
            return std::task::Poll::Ready(None);
        };
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(piece))))
    }
    // No `size_hint`: the length is unknown, so the answer is chunked, without Content-Length.
}

/// `doc` served streamed (chunked transfer encoding, no Content-Length), with `pad` bytes of
/// padding in a `padding` field ahead of its spans; its small documents still come in several
/// pieces.
fn streamed(doc: &Value, pad: usize) -> Response {
    let text = doc.to_string();
    // `{"padding":"xx…x",` + the document after its `{`.
    let (head, tail) = match text.strip_prefix('{') {
        Some(rest) if pad > 0 => ("{\"padding\":\"".to_string(), format!("\",{rest}")),
        _ => {
            let mid = text.len() / 2;
            let mid = (mid..text.len())
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(text.len());
            (text[..mid].to_string(), text[mid..].to_string())
        }
    };
    let body = StreamedDocument {
        head: Bytes::from(head),
        pad_left: if text.starts_with('{') { pad } else { 0 },
        filler: Bytes::from(vec![b'x'; PIECE_BYTES]),
        tail: Bytes::from(tail),
    };
    let mut resp = Response::new(axum::body::Body::new(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    resp
}
