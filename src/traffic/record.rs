//! The Akto traffic record: the wire contract with Akto's Data Ingestion Service.
//!
//! Field names and the all-strings rule come from Akto's ingestion code (see
//! `shared/reference/akto-ingestion.md`); a wrong name or type makes Akto drop the record
//! silently, so this type is the one place they are spelled.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    /// Request body.
    #[serde(rename = "requestPayload")]
    pub request_payload: String,
    /// Response body.
    #[serde(rename = "responsePayload")]
    pub response_payload: String,
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

/// Serialize one record as one JSON object (no trailing newline).
pub fn encode(record: &AktoRecord) -> String {
    let cap = record.request_payload.len()
        + record.response_payload.len()
        + record.request_headers.len()
        + record.response_headers.len()
        + record.tag.len()
        + record.path.len()
        + 512;
    let mut buf = Vec::with_capacity(cap + cap / 8);
    if serde_json::to_writer(&mut buf, record).is_err() {
        // Unreachable for a struct of strings; never panic regardless.
        return String::from("{}");
    }
    String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The marker appended to a cut string.
pub(crate) fn truncation_marker(original_len: usize) -> String {
    format!("...[truncated by databricks-shield: original {original_len} bytes]")
}

/// `s` itself when it fits in `max` bytes; otherwise a prefix cut at a UTF-8 boundary followed
/// by the truncation marker, at most `max` bytes in total (when `max` is smaller than the marker,
/// only the cut prefix is kept). `truncated` is incremented when a cut happened.
pub(crate) fn fit(s: &str, max: usize, truncated: &mut u32) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    *truncated = truncated.saturating_add(1);
    let marker = truncation_marker(s.len());
    let (keep, marker) = if marker.len() <= max {
        (max - marker.len(), marker.as_str())
    } else {
        (max, "")
    };
    let mut cut = keep.min(s.len());
    while cut > 0 && !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut + marker.len());
    out.push_str(&s[..cut]);
    out.push_str(marker);
    out
}

/// Builder for a JSON object of string values (headers, tag) with lowercase keys.
#[derive(Debug, Default)]
pub(crate) struct JsonObject {
    entries: BTreeMap<String, String>,
}

impl JsonObject {
    /// Set `key` (lowercased) to `value` cut to [`MAX_HEADER_VALUE_BYTES`].
    pub(crate) fn set(&mut self, key: &str, value: &str, truncated: &mut u32) -> &mut Self {
        self.entries.insert(
            key.to_ascii_lowercase(),
            fit(value, MAX_HEADER_VALUE_BYTES, truncated),
        );
        self
    }

    /// Encode as a JSON object string.
    pub(crate) fn encode(&self) -> String {
        serde_json::to_string(&self.entries).unwrap_or_else(|_| String::from("{}"))
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
