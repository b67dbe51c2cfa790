//! Turning one execution into Akto records: the execution itself, then one record per tool call.
//!
//! Choices made here (the contract leaves them open):
//! - `statusCode`: the row's `status_code` when it is 100..=999. When it is missing or out of
//!   range, `200` if a response (or a logging error code explaining its absence) exists, else
//!   `500`; the response header `x-databricks-status-code` then says `missing` or the raw value.
//! - A NULL payload is `""`, or, when `logging_error_codes` is non-empty (Databricks did not log
//!   it), a JSON note `{"databricks_shield_note":"payload not logged by Databricks",
//!   "logging_error_codes":[...]}`; the codes are also in the response header
//!   `x-databricks-logging-error-codes` (comma separated).
//! - `content-type` is `application/json` when the payload starts like JSON (or is NULL), else
//!   `text/plain`: non-JSON payloads are still sent, verbatim, as text. A request body that
//!   starts like JSON but, as sent, does not end like it (it was cut, or a newline follows it) is
//!   `text/plain` too: Akto drops a JSON request it takes for incomplete.
//! - `time` is clamped to 1..=i32::MAX epoch seconds (Akto parses it as a positive 32-bit int).
//! - Legacy `request_metadata` entries become request headers `x-databricks-metadata-<key>`.
//! - Header and tag values are cut at 4096 bytes with the truncation marker; payloads at
//!   `max_string_bytes`. Every cut is counted in [`Mapped::truncated_payloads`].

use super::execution::{AgentContext, Execution};
use super::host::tool_path;
use super::record::{
    fit, fit_literal, fit_pair, fit_text, reason_phrase, settled_content_type, AktoRecord,
    JsonObject, MAX_RECORD_PAYLOAD_BYTES, MAX_STRING_BYTES,
};
use super::tools::{output_says_error, scan};
use crate::json::JsonString;

/// Options of [`map_execution`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapOptions {
    /// Emit one extra record per tool call found in the payloads (default true).
    pub tool_calls: bool,
    /// Longest payload string; longer ones are cut with a visible marker (default 5,242,880).
    pub max_string_bytes: usize,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            tool_calls: true,
            max_string_bytes: MAX_STRING_BYTES,
        }
    }
}

/// The records of one execution.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mapped {
    /// The execution record first, then one record per tool call.
    pub records: Vec<AktoRecord>,
    /// How many strings were cut to fit the limits.
    pub truncated_payloads: u32,
    /// How many tool-call records were emitted.
    pub tool_calls: u32,
}

const JSON: &str = "application/json";
const TEXT: &str = "text/plain";

fn content_type(payload: Option<&str>) -> &'static str {
    content_type_of(payload.map(|p| p.trim_start().chars().next()))
}

/// [`content_type`] of a payload held as a literal (not decoded).
fn literal_content_type(payload: Option<&JsonString>) -> &'static str {
    content_type_of(payload.map(JsonString::first_non_whitespace))
}

/// `application/json` for a missing payload or one whose first non-space character opens JSON.
fn content_type_of(first: Option<Option<char>>) -> &'static str {
    match first {
        None | Some(Some('{' | '[')) => JSON,
        Some(_) => TEXT,
    }
}

fn not_logged_note(codes: &[String]) -> String {
    serde_json::json!({
        "databricks_shield_note": "payload not logged by Databricks",
        "logging_error_codes": codes,
    })
    .to_string()
}

fn header_key_slug(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        let c = c.to_ascii_lowercase();
        let m = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if m == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(m);
    }
    let out = out.trim_end_matches('-');
    let out = if out.is_empty() { "unnamed" } else { out };
    out.chars().take(64).collect()
}

/// `(statusCode, status, note for x-databricks-status-code)`.
fn status_of(exec: &Execution, has_response: bool) -> (i64, Option<String>) {
    match exec.status_code {
        Some(c) if (100..=999).contains(&c) => (c, None),
        other => {
            let default = if has_response || !exec.logging_error_codes.is_empty() {
                200
            } else {
                500
            };
            let note = match other {
                Some(c) => c.to_string(),
                None => "missing".to_string(),
            };
            (default, Some(note))
        }
    }
}

/// Common fields of every record of an execution.
struct Base<'a> {
    ctx: &'a AgentContext<'a>,
    time: String,
    tag_agent: String,
}

impl Base<'_> {
    fn record(
        &self,
        path: String,
        (request_headers, response_headers): (String, String),
        (request_payload, response_payload): (JsonString, JsonString),
        code: i64,
        tag: String,
    ) -> AktoRecord {
        AktoRecord {
            path,
            method: "POST".to_string(),
            request_headers,
            response_headers,
            request_payload,
            response_payload,
            ip: "10.0.0.1".to_string(),
            dest_ip: String::new(),
            time: self.time.clone(),
            status_code: code.to_string(),
            status: reason_phrase(code).to_string(),
            http_type: "HTTP/1.1".to_string(),
            akto_account_id: self.ctx.account_id.to_string(),
            akto_vxlan_id: "0".to_string(),
            is_pending: "false".to_string(),
            source: "MIRRORING".to_string(),
            tag,
        }
    }
}

/// Map one execution to its Akto records (pure: no I/O, never panics).
pub fn map_execution(ctx: &AgentContext, exec: &Execution, opts: &MapOptions) -> Mapped {
    map_payloads(ctx, exec, exec.request.clone(), exec.response.clone(), opts)
}

/// [`map_execution`] that moves the payloads out of `exec` (leaving `None`) into the records
/// instead of copying them: the same records, one payload copy less per execution.
pub fn map_execution_taking(ctx: &AgentContext, exec: &mut Execution, opts: &MapOptions) -> Mapped {
    let request = exec.request.take();
    let response = exec.response.take();
    map_payloads(ctx, exec, request, response, opts)
}

/// The mapping, with the payloads given apart from `exec` (whose own are not read).
fn map_payloads(
    ctx: &AgentContext,
    exec: &Execution,
    request: Option<JsonString>,
    response: Option<JsonString>,
    opts: &MapOptions,
) -> Mapped {
    let mut truncated = 0u32;
    let max = opts.max_string_bytes;
    let time = exec
        .request_time
        .timestamp()
        .clamp(1, i64::from(i32::MAX))
        .to_string();

    let mut tag = JsonObject::default();
    tag.set("gen-ai", "Gen AI", &mut truncated)
        .set("ai-agent", ctx.agent, &mut truncated);
    let base = Base {
        ctx,
        time,
        tag_agent: ctx.agent.to_string(),
    };

    let scan = if opts.tool_calls {
        // Only a response that starts like an object (or an array: a streamed response's
        // chunks) is decoded, for its tool calls; the request only when an output is missing.
        let response_text = response
            .as_ref()
            .filter(|r| matches!(r.first_non_whitespace(), Some('{' | '[')))
            .map(JsonString::text);
        scan(request.as_ref(), response_text.as_deref())
    } else {
        Default::default()
    };

    // Request headers.
    let mut req_h = JsonObject::default();
    let req_ct = if scan.request_parsed == Some(false) {
        TEXT
    } else {
        literal_content_type(request.as_ref())
    };
    req_h
        .set("host", ctx.host, &mut truncated)
        .set("content-type", req_ct, &mut truncated)
        .set("x-databricks-request-id", &exec.request_id, &mut truncated)
        .set("x-databricks-table", &exec.table, &mut truncated);
    if let Some(v) = &exec.client_request_id {
        req_h.set("x-client-request-id", v, &mut truncated);
    }
    if let Some(v) = &exec.served_entity_id {
        req_h.set("x-databricks-served-entity-id", v, &mut truncated);
    }
    if let Some(v) = &exec.requester {
        req_h.set("x-databricks-requester", v, &mut truncated);
    }
    if let Some(meta) = &exec.request_metadata {
        for (k, v) in meta {
            let key = format!("x-databricks-metadata-{}", header_key_slug(k));
            req_h.set(&key, v, &mut truncated);
        }
    }

    // Response headers.
    let (code, status_note) = status_of(exec, response.is_some());
    let mut resp_h = JsonObject::default();
    let resp_ct = if scan.response_parsed == Some(false) {
        TEXT
    } else {
        literal_content_type(response.as_ref())
    };
    resp_h.set("content-type", resp_ct, &mut truncated);
    if let Some(d) = exec.duration_ms {
        resp_h.set(
            "x-databricks-execution-duration-ms",
            &d.to_string(),
            &mut truncated,
        );
    }
    if !exec.logging_error_codes.is_empty() {
        resp_h.set(
            "x-databricks-logging-error-codes",
            &exec.logging_error_codes.join(","),
            &mut truncated,
        );
    }
    if let Some(note) = &status_note {
        resp_h.set("x-databricks-status-code", note, &mut truncated);
    }

    let payload = |p: Option<JsonString>, truncated: &mut u32| match p {
        Some(p) => fit_literal(p, max, truncated),
        None if exec.logging_error_codes.is_empty() => JsonString::empty(),
        None => fit_text(&not_logged_note(&exec.logging_error_codes), max, truncated),
    };
    // The texts' lengths name the original sizes in cut markers: needed (and decoded) only when
    // a payload is cut, which the escaped sizes rule out in the common case.
    let may_cut = |p: &Option<JsonString>| p.as_ref().map_or(0, JsonString::escaped_len);
    let cut_possible = may_cut(&request).max(may_cut(&response)) > max
        || may_cut(&request) + may_cut(&response) > MAX_RECORD_PAYLOAD_BYTES;
    let orig_len = |p: &Option<JsonString>| match p {
        Some(p) if cut_possible => p.text_len(),
        Some(p) => p.escaped_len(),
        None => 0,
    };
    let (request_len, response_len) = (orig_len(&request), orig_len(&response));
    let request_payload = payload(request, &mut truncated);
    let response_payload = payload(response, &mut truncated);
    // Each record must fit alone in one Akto request (10 MiB): two payloads near Akto's 5 MiB
    // string limit would not, so they are cut further rather than refused.
    let (request_payload, response_payload) = fit_pair(
        (request_payload, request_len),
        (response_payload, response_len),
        MAX_RECORD_PAYLOAD_BYTES,
        &mut truncated,
    );
    // The content-type was chosen from the whole request: a cut one (or JSON that does not end
    // like it) goes out as text, or Akto would drop the record as incomplete JSON.
    let settled_ct = settled_content_type(req_ct, &request_payload);
    if settled_ct != req_ct {
        req_h.set("content-type", settled_ct, &mut truncated);
    }

    let mut records = Vec::with_capacity(1 + scan.calls.len());
    records.push(base.record(
        fit(ctx.path, MAX_STRING_BYTES, &mut truncated),
        (req_h.encode(), resp_h.encode()),
        (request_payload, response_payload),
        code,
        tag.encode(),
    ));

    let mut tool_calls = 0u32;
    for (idx, call) in scan.calls.iter().enumerate() {
        let call_id = match &call.id {
            Some(id) => id.clone(),
            None => format!("{}#{}", exec.request_id, idx),
        };
        let payloads = fit_pair(
            (
                fit_text(&call.arguments, max, &mut truncated),
                call.arguments.len(),
            ),
            (
                call.output
                    .as_deref()
                    .map_or_else(JsonString::empty, |o| fit_text(o, max, &mut truncated)),
                call.output.as_deref().map_or(0, str::len),
            ),
            MAX_RECORD_PAYLOAD_BYTES,
            &mut truncated,
        );
        let mut h = JsonObject::default();
        h.set("host", ctx.host, &mut truncated)
            .set(
                "content-type",
                settled_content_type(content_type(Some(&call.arguments)), &payloads.0),
                &mut truncated,
            )
            .set("x-databricks-request-id", &exec.request_id, &mut truncated)
            .set("x-tool-call-id", &call_id, &mut truncated)
            .set("x-databricks-table", &exec.table, &mut truncated);
        let mut rh = JsonObject::default();
        rh.set(
            "content-type",
            content_type(call.output.as_deref()),
            &mut truncated,
        );
        if call.output.is_none() {
            rh.set("x-tool-output", "missing", &mut truncated);
        }
        let code = match &call.output {
            Some(o) if output_says_error(o) => 500,
            _ => 200,
        };
        let mut t = JsonObject::default();
        t.set("gen-ai", "Gen AI", &mut truncated)
            .set("ai-agent", &base.tag_agent, &mut truncated)
            .set("tool", &call.name, &mut truncated);
        records.push(base.record(
            tool_path(&call.name),
            (h.encode(), rh.encode()),
            payloads,
            code,
            t.encode(),
        ));
        tool_calls += 1;
    }

    Mapped {
        records,
        truncated_payloads: truncated,
        tool_calls,
    }
}
