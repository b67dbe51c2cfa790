//! The Akto traffic record: the wire contract with Akto's Data Ingestion Service.
//!
//! Field names and the all-strings rule come from Akto's ingestion code (see
//! `shared/reference/akto-ingestion.md`); a wrong name or type makes Akto drop the record
//! silently, so this type is the one place they are spelled.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub(crate) use crate::json::write_json_str;
use crate::json::JsonString;

/// Akto's limit for any one string of a record (and our default truncation limit).
pub const MAX_STRING_BYTES: usize = 5_242_880;

/// Longest header (or tag) value we emit; longer values are cut with the truncation marker.
pub(crate) const MAX_HEADER_VALUE_BYTES: usize = 4096;

/// One HTTP exchange as Akto ingests it. Every field is a string; headers and tag are JSON
/// objects encoded as strings with lowercase keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AktoRecord {
    /// Request path, e.g. `/serving-endpoints/<name>/invocations`.
    pub path: String,
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Request headers: a JSON object as a string.
    #[serde(rename = "requestHeaders")]
    pub request_headers: String,
    /// Response headers: a JSON object as a string.
    #[serde(rename = "responseHeaders")]
    pub response_headers: String,
    /// Request body, held as the JSON literal it is written as (see [`JsonString`]).
    #[serde(rename = "requestPayload")]
    pub request_payload: JsonString,
    /// Response body, like `request_payload`.
    #[serde(rename = "responsePayload")]
    pub response_payload: JsonString,
    /// Client IP (`10.0.0.1`: unknown).
    pub ip: String,
    /// Destination IP (empty).
    #[serde(rename = "destIp")]
    pub dest_ip: String,
    /// Epoch seconds as a decimal string.
    pub time: String,
    /// Numeric status code as a string.
    #[serde(rename = "statusCode")]
    pub status_code: String,
    /// Reason phrase.
    pub status: String,
    /// `HTTP/1.1`.
    #[serde(rename = "type")]
    pub http_type: String,
    /// Akto account id, e.g. `1000000`.
    pub akto_account_id: String,
    /// `0`.
    pub akto_vxlan_id: String,
    /// `false`.
    pub is_pending: String,
    /// `MIRRORING`.
    pub source: String,
    /// Tag object as a string: `{"gen-ai":"Gen AI","ai-agent":"<agent>"}`.
    pub tag: String,
}

/// Serialize one record as one JSON object (no trailing newline), written directly. The payloads
/// are most of a record: they are written as the literals they are held as, verbatim (a payload
/// read from a result page is never decoded and escaped again). The result is the document
/// `serde_json::to_string(record)` writes: the same bytes when every payload was escaped by
/// serde_json's rules (all built here are), else the same texts escaped otherwise.
pub fn encode(record: &AktoRecord) -> String {
    let fields: [(&str, &str, bool); 17] = [
        ("path", &record.path, false),
        ("method", &record.method, false),
        ("requestHeaders", &record.request_headers, false),
        ("responseHeaders", &record.response_headers, false),
        ("requestPayload", record.request_payload.literal(), true),
        ("responsePayload", record.response_payload.literal(), true),
        ("ip", &record.ip, false),
        ("destIp", &record.dest_ip, false),
        ("time", &record.time, false),
        ("statusCode", &record.status_code, false),
        ("status", &record.status, false),
        ("type", &record.http_type, false),
        ("akto_account_id", &record.akto_account_id, false),
        ("akto_vxlan_id", &record.akto_vxlan_id, false),
        ("is_pending", &record.is_pending, false),
        ("source", &record.source, false),
        ("tag", &record.tag, false),
    ];
    let len: usize = fields.iter().map(|(k, v, _)| k.len() + v.len() + 4).sum();
    let mut out = String::with_capacity(len + len / 8 + 2);
    out.push('{');
    for (i, (key, value, literal)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(key);
        out.push_str("\":");
        if *literal {
            out.push_str(value);
        } else {
            write_json_str(&mut out, value);
        }
    }
    out.push('}');
    out
}

/// The marker appended to a cut string.
pub(crate) fn truncation_marker(original_len: usize) -> String {
    format!("{MARKER_PREFIX}{original_len} bytes]")
}

/// The start of every cut marker.
const MARKER_PREFIX: &str = "...[truncated by databricks-shield: original ";

/// `s` itself when it fits in `max` bytes; otherwise a prefix cut at a UTF-8 boundary followed
/// by the truncation marker, at most `max` bytes in total (when `max` is smaller than the marker,
/// only the cut prefix is kept). `truncated` is incremented when a cut happened.
pub(crate) fn fit(s: &str, max: usize, truncated: &mut u32) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    *truncated = truncated.saturating_add(1);
    cut(s, max, s.len())
}

/// [`fit`] for a payload: the literal of `s`, or of its cut.
pub(crate) fn fit_text(s: &str, max: usize, truncated: &mut u32) -> JsonString {
    if s.len() <= max {
        return JsonString::encode(s);
    }
    JsonString::encode(&fit(s, max, truncated))
}

/// [`fit`] for a payload held as a literal: kept as is when its text fits (decoded only when the
/// escaped bytes alone exceed `max`).
pub(crate) fn fit_literal(p: JsonString, max: usize, truncated: &mut u32) -> JsonString {
    if p.escaped_len() <= max || p.text_len() <= max {
        return p;
    }
    JsonString::encode(&fit(&p.text(), max, truncated))
}

/// A prefix of `s` and the marker naming `original_len`, at most `max` bytes.
fn cut(s: &str, max: usize, original_len: usize) -> String {
    let marker = truncation_marker(original_len);
    let (keep, marker) = if marker.len() <= max {
        (max - marker.len(), marker.as_str())
    } else {
        (max, "")
    };
    let mut end = keep.min(s.len());
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + marker.len());
    out.push_str(&s[..end]);
    out.push_str(marker);
    out
}

/// Akto's request body limit (10 MiB, `sink::MAX_BODY_BYTES`) less 64 KiB for a record's other
/// fields: what the two payloads of one record may take together once JSON-escaped, so that every
/// record fits alone in one request.
pub const MAX_RECORD_PAYLOAD_BYTES: usize = 10_485_760 - (64 << 10);

/// The two payloads of one record (each already cut to the per-string limit), cut further until
/// together they take at most `budget` escaped bytes. The budget is shared by water-filling: a
/// payload within half of it stays whole and the other gets the rest; when both are larger, each
/// gets half. So a short prompt next to a huge response is never cut. The markers name each
/// payload's original length (`a_orig`, `b_orig`: bytes of its text); a payload cut for the first
/// time here increments `truncated`.
pub(crate) fn fit_pair(
    (a, a_orig): (JsonString, usize),
    (b, b_orig): (JsonString, usize),
    budget: usize,
    truncated: &mut u32,
) -> (JsonString, JsonString) {
    // A literal's escaped size is known without a scan: the common case costs nothing.
    if a.escaped_len() + b.escaped_len() <= budget {
        return (a, b);
    }
    // Rare: measured as serde_json writes them (a literal read from a page may use longer
    // escapes, e.g. `\u00e9`, which would otherwise count against it).
    let (mut a, mut b) = (a.canonical(), b.canonical());
    for _ in 0..4 {
        let (la, lb) = (a.escaped_len(), b.escaped_len());
        if la + lb <= budget {
            break;
        }
        let half = budget / 2;
        let (max_a, max_b) = if la <= half {
            (la, budget - la)
        } else if lb <= half {
            (budget - lb, lb)
        } else {
            (half, budget - half)
        };
        for (s, orig, max_escaped) in [(&mut a, a_orig, max_a), (&mut b, b_orig, max_b)] {
            let escaped = s.escaped_len();
            if escaped <= max_escaped {
                continue;
            }
            let text = s.text();
            // Escaped bytes to text bytes at this payload's own escape density; 2 % below
            // absorbs the marker and uneven escaping (another round corrects the rest).
            let max = (text.len() as f64 * (max_escaped as f64 / escaped as f64) * 0.98) as usize;
            if text.len() == orig {
                *truncated = truncated.saturating_add(1);
            }
            let c = cut(&text, max, orig);
            *s = JsonString::encode(&c);
        }
    }
    (a, b)
}

/// The original length a cut marker at the end of `text` names, if it ends with one.
fn marked_original(text: &str) -> Option<usize> {
    let rest = text.strip_suffix(" bytes]")?;
    let at = rest.rfind(MARKER_PREFIX)?;
    rest[at + MARKER_PREFIX.len()..].parse().ok()
}

/// Cuts a record's payloads (sharing the room as `fit_pair` does) so that its encoded form, now
/// `encoded_len` bytes, takes at most `max` bytes: for a sink whose limit is below the 10 MiB the
/// mapping allows (a Kafka topic's `max.message.bytes`). A payload cut before keeps naming its
/// first original length. Returns false when the rest of the record alone leaves no room for
/// the payloads (the record is then left as it was).
pub fn fit_record(
    record: &mut AktoRecord,
    encoded_len: usize,
    max: usize,
    truncated: &mut u32,
) -> bool {
    if encoded_len <= max {
        return true;
    }
    let payloads = record.request_payload.escaped_len() + record.response_payload.escaped_len();
    let rest = encoded_len.saturating_sub(payloads);
    // At least room for two cut markers.
    let budget = match max.checked_sub(rest) {
        Some(b) if b >= 2 * truncation_marker(usize::MAX).len() => b,
        _ => return false,
    };
    let original = |p: &JsonString| {
        let text = p.text();
        marked_original(&text).unwrap_or(text.len())
    };
    let request = std::mem::take(&mut record.request_payload);
    let response = std::mem::take(&mut record.response_payload);
    let (request_len, response_len) = (original(&request), original(&response));
    let (request, response) = fit_pair(
        (request, request_len),
        (response, response_len),
        budget,
        truncated,
    );
    record.request_payload = request;
    record.response_payload = response;
    // A request body cut here must not go out as JSON: Akto would drop the record.
    settle_request_content_type(record);
    true
}

/// The request `content-type` a record goes out with when its request body is `payload`:
/// `text/plain` instead of `application/json` when the body is possibly incomplete JSON (e.g. a
/// cut one), which Akto would otherwise drop silently (see
/// [`crate::json::possibly_incomplete_json`]); `content_type` otherwise. Looks only at the
/// body's first and last bytes in the common case.
pub(crate) fn settled_content_type(
    content_type: &'static str,
    payload: &JsonString,
) -> &'static str {
    if content_type == "application/json" && payload.possibly_incomplete_json() {
        "text/plain"
    } else {
        content_type
    }
}

/// Makes sure Akto keeps `record`: when its request body is possibly incomplete JSON (a cut
/// one, say) and its request `content-type` is `application/json` or missing (which Akto takes
/// for JSON), the `content-type` becomes `text/plain`. Every builder of a record whose request
/// body may end up cut calls this (or [`settled_content_type`]) once the body is final. Costs a
/// look at the body's first and last bytes unless it has to change the headers. Returns whether
/// it changed them (headers that are not a JSON object of strings are left for `validate`).
pub fn settle_request_content_type(record: &mut AktoRecord) -> bool {
    if !record.request_payload.possibly_incomplete_json() {
        return false;
    }
    let Ok(mut headers) = serde_json::from_str::<BTreeMap<String, String>>(&record.request_headers)
    else {
        return false;
    };
    match headers.get("content-type").map(String::as_str) {
        None | Some("application/json") => {}
        Some(_) => return false,
    }
    headers.insert("content-type".to_string(), "text/plain".to_string());
    match serde_json::to_string(&headers) {
        Ok(h) => {
            record.request_headers = h;
            true
        }
        Err(_) => false,
    }
}

/// Builder for a JSON object of string values (headers, tag) with lowercase keys, encoded with
/// its keys in order (a key set twice keeps its last value).
#[derive(Debug, Default)]
pub(crate) struct JsonObject {
    entries: Vec<(String, String)>,
}

impl JsonObject {
    /// Set `key` (lowercased) to `value` cut to [`MAX_HEADER_VALUE_BYTES`].
    pub(crate) fn set(&mut self, key: &str, value: &str, truncated: &mut u32) -> &mut Self {
        let key = key.to_ascii_lowercase();
        let value = fit(value, MAX_HEADER_VALUE_BYTES, truncated);
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.entries.push((key, value)),
        }
        self
    }

    /// Encode as a JSON object string (the same bytes as serializing a `BTreeMap`).
    pub(crate) fn encode(&self) -> String {
        let mut sorted: Vec<&(String, String)> = self.entries.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let len: usize = sorted.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
        let mut out = String::with_capacity(len + 2);
        out.push('{');
        for (i, (k, v)) in sorted.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_json_str(&mut out, k);
            out.push(':');
            write_json_str(&mut out, v);
        }
        out.push('}');
        out
    }
}

/// The reason phrase of an HTTP status code (`Unknown` for codes without one).
pub(crate) fn reason_phrase(code: i64) -> &'static str {
    match code {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        499 => "Client Closed Request",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}
