//! The Akto traffic record: the wire contract with Akto's Data Ingestion Service.
//!
//! Field names and the all-strings rule come from Akto's ingestion code (see
//! `shared/reference/akto-ingestion.md`); a wrong name or type makes Akto drop the record
//! silently, so this type is the one place they are spelled.

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

/// Serialize one record as one JSON object (no trailing newline): the same bytes as
/// `serde_json::to_string(record)` (field order, escapes), written directly. Payloads are most of
/// a record and are JSON themselves, so escaping them is the hot loop of the pipeline
/// (BENCHMARKS.md): [`write_json_str`] skips eight bytes at a time where nothing needs escaping.
pub fn encode(record: &AktoRecord) -> String {
    let fields: [(&str, &str); 17] = [
        ("path", &record.path),
        ("method", &record.method),
        ("requestHeaders", &record.request_headers),
        ("responseHeaders", &record.response_headers),
        ("requestPayload", &record.request_payload),
        ("responsePayload", &record.response_payload),
        ("ip", &record.ip),
        ("destIp", &record.dest_ip),
        ("time", &record.time),
        ("statusCode", &record.status_code),
        ("status", &record.status),
        ("type", &record.http_type),
        ("akto_account_id", &record.akto_account_id),
        ("akto_vxlan_id", &record.akto_vxlan_id),
        ("is_pending", &record.is_pending),
        ("source", &record.source),
        ("tag", &record.tag),
    ];
    let len: usize = fields.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    let mut out = String::with_capacity(len + len / 4 + 2);
    out.push('{');
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(key);
        out.push_str("\":");
        write_json_str(&mut out, value);
    }
    out.push('}');
    out
}

/// Appends `s` as a JSON string literal, escaped exactly as serde_json does: `\"`, `\\`,
/// `\b`, `\f`, `\n`, `\r`, `\t`, other control characters as `\u00XX`, everything else
/// (including non-ASCII) verbatim.
pub(crate) fn write_json_str(out: &mut String, s: &str) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    /// Whether any byte of `w` is `"`, `\\` or below 0x20 (exact; bytes >= 0x80 never match).
    fn needs_escape(w: u64) -> bool {
        let quote = w ^ (ONES * u64::from(b'"'));
        let backslash = w ^ (ONES * u64::from(b'\\'));
        let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v;
        let control = w.wrapping_sub(ONES * 0x20) & !w;
        (zero_byte(quote) | zero_byte(backslash) | control) & HIGHS != 0
    }
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push('"');
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            if !needs_escape(u64::from_le_bytes(word)) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let escape: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x08 => Some("\\b"),
            0x0c => Some("\\f"),
            0x00..=0x1f => None,
            _ => {
                i += 1;
                continue;
            }
        };
        // `start..i` ends before an ASCII byte: a char boundary.
        out.push_str(&s[start..i]);
        match escape {
            Some(e) => out.push_str(e),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        i += 1;
        start = i;
    }
    out.push_str(&s[start..]);
    out.push('"');
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
    cut(s, max, s.len())
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

/// Bytes of `s` once escaped as a JSON string (quotes not counted).
pub(crate) fn escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// The two payloads of one record (each already cut to the per-string limit), cut further, each
/// in proportion to its size, until together they take at most `budget` escaped bytes. The
/// markers name each payload's original length (`a_orig`, `b_orig`); a payload cut for the first
/// time here increments `truncated`.
pub(crate) fn fit_pair(
    (mut a, a_orig): (String, usize),
    (mut b, b_orig): (String, usize),
    budget: usize,
    truncated: &mut u32,
) -> (String, String) {
    // Escaping at most multiplies a length by 6: the common case costs no scan.
    if (a.len() + b.len()).saturating_mul(6) <= budget {
        return (a, b);
    }
    for _ in 0..4 {
        let total = escaped_len(&a) + escaped_len(&b);
        if total <= budget {
            break;
        }
        // 2 % below the proportional share absorbs the markers and uneven escaping.
        let scale = budget as f64 / total as f64 * 0.98;
        for (s, orig) in [(&mut a, a_orig), (&mut b, b_orig)] {
            let max = (s.len() as f64 * scale) as usize;
            if s.len() > max {
                if s.len() == orig {
                    *truncated = truncated.saturating_add(1);
                }
                *s = cut(s, max, orig);
            }
        }
    }
    (a, b)
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
