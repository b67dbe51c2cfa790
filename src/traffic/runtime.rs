//! What Akto's runtime keeps: the last step before a record leaves, so that every record Akto's
//! ingestion service accepts (HTTP 200) also reaches Akto's API inventory.
//!
//! Akto's ingestion service accepts records that its runtime then drops without a trace (read
//! from akto-api-security/akto: `HttpCallParser.filterHttpResponseParams` in mini-runtime,
//! `HttpResponseParams.validHttpResponseCode`, `SampleParser.isPossiblyIncompleteJson`). The
//! mapping keeps the truth of a row (its real status code, its real path); [`for_akto_runtime`]
//! rewrites only what those filters would drop, into an equivalent form they keep:
//!
//! 1. `statusCode` outside `200..=299` and `302` (`validHttpResponseCode`): sent as `200`
//!    (`OK`), the real code in the response header [`STATUS_HEADER`] (a value the mapping
//!    already put there, e.g. `missing`, is kept).
//! 2. A path whose lowercase form contains `/health`, or that matches Akto's default
//!    redundant-endpoint pattern `.*\.(<ext>|...)(\?.*)?` ([`STATIC_EXTENSIONS`]): the letter
//!    after the slash, resp. the dot before the extension, is percent-encoded (`%68`, `%2E`:
//!    RFC 3986 makes the two URLs equivalent), until nothing matches.
//! 3. An empty or whitespace-only request body (or one ending with `[`) under a request
//!    `content-type` of `application/json` or none: Akto releases up to 018552b4 take it for
//!    incomplete JSON; it goes out with `content-type: text/plain`.
//!
//! [`validate`](super::validate()) refuses each of these, so a record that skipped this step is
//! quarantined with the rule named instead of vanishing inside Akto.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::record::AktoRecord;
use crate::json::JsonString;

/// The response header that carries a record's real status code when `statusCode` cannot.
pub const STATUS_HEADER: &str = "x-databricks-status-code";

/// Akto's default `allowRedundantEndpointsList` (`AccountSettings.getAllowRedundantEndpointsList`
/// when an account never set one): the union of the lists of its releases, as the regex
/// alternatives they are (`.` matches any character: `js.map`, and the older `.pptx`, `.json`).
pub const STATIC_EXTENSIONS: [&str; 29] = [
    "htm", "html", "css", "js", "js.map", "jpg", "jpeg", "png", "gif", "svg", "webp", "mp4",
    "webm", "ogg", "ogv", "avi", "mov", "mp3", "wav", "oga", "woff", "woff2", "ttf", "otf", "pptx",
    "json", "ico", ".pptx", ".json",
];

/// Whether Akto's runtime keeps a record with this status code
/// (`HttpResponseParams.validHttpResponseCode`).
pub fn status_code_kept(code: i64) -> bool {
    code >= 200 && (code < 300 || code == 302)
}

/// The status code of `s` when it is numeric (digits only) and Akto's runtime drops it.
pub(crate) fn dropped_status(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: i64 = s.parse().ok()?;
    (!status_code_kept(code)).then_some(code)
}

/// The byte offset of the first `/` followed by `health` (ASCII case-insensitively: no other
/// character lowercases to one of these letters), which Akto's runtime drops the record for.
pub(crate) fn health_at(path: &str) -> Option<usize> {
    path.as_bytes()
        .windows(7)
        .position(|w| w[0] == b'/' && w[1..].eq_ignore_ascii_case(b"health"))
}

/// Bytes `alt` (a regex alternative whose `.` matches any character) takes at the start of `s`,
/// ASCII case-insensitively (a superset of Akto's case-sensitive match: encoding more is
/// harmless).
fn alt_prefix(s: &str, alt: &str) -> Option<usize> {
    let mut used = 0;
    for a in alt.bytes() {
        let c = s[used..].chars().next()?;
        if a != b'.' && !c.eq_ignore_ascii_case(&char::from(a)) {
            return None;
        }
        used += c.len_utf8();
    }
    Some(used)
}

/// The byte offset of a dot that makes `path` match Akto's default redundant-endpoint pattern
/// `.*\.(<STATIC_EXTENSIONS>)(\?.*)?`: one followed by an extension that ends the path or is
/// followed by `?`.
pub(crate) fn static_extension_dot(path: &str) -> Option<usize> {
    path.match_indices('.').map(|(i, _)| i).find(|&i| {
        let rest = &path[i + 1..];
        STATIC_EXTENSIONS.iter().any(|alt| {
            alt_prefix(rest, alt).is_some_and(|n| rest.len() == n || rest[n..].starts_with('?'))
        })
    })
}

/// Whether a request body is one Akto release 018552b4 takes for incomplete JSON whatever its
/// start: once trimmed (`rawToJsonString` trims it first; Java's `trim`: characters up to
/// U+0020), empty or ending with `[`. Looks at the literal's first and last bytes unless
/// whitespace or an escape there may hide the answer.
pub(crate) fn blank_or_open_bracket(payload: &JsonString) -> bool {
    let lit = payload.literal().as_bytes();
    let inner = &lit[1..lit.len() - 1];
    let Some(&last) = inner.last() else {
        return true;
    };
    // `[` never ends an escape.
    if last == b'[' {
        return true;
    }
    // The last character is plain (not whitespace, not part of an escape: an escape is at most
    // six bytes, `\uXXXX`): the trimmed body ends as the literal does, so it is not empty and
    // does not end with `[`.
    let tail = &inner[inner.len().saturating_sub(6)..];
    if last > b' ' && !tail.contains(&b'\\') {
        return false;
    }
    // Rare: whitespace or an escape at the end.
    let text = payload.text();
    let trimmed = text.trim_matches(|c: char| c <= ' ');
    trimmed.is_empty() || trimmed.ends_with('[')
}

/// Whether the request `content-type` of these headers is `application/json` or missing (which
/// Akto takes for it); `None` when they are not a JSON object of strings (left to `validate`).
fn json_or_no_content_type(headers: &str) -> Option<bool> {
    // The form the builders write, checked without a parse.
    const TEXT: &str = "\"content-type\":\"text/plain\"";
    if headers.contains(TEXT) && headers.matches("\"content-type\"").count() == 1 {
        return Some(false);
    }
    let map: BTreeMap<String, String> = serde_json::from_str(headers).ok()?;
    Some(matches!(
        map.get("content-type").map(String::as_str),
        None | Some("application/json")
    ))
}

/// `path` with every `/health` (any case) and static-file extension percent-encoded, so that
/// neither filter of Akto's runtime matches it; the same URL by RFC 3986.
pub fn akto_kept_path(path: &str) -> Cow<'_, str> {
    if health_at(path).is_none() && static_extension_dot(path).is_none() {
        return Cow::Borrowed(path);
    }
    let mut out = path.to_string();
    // Each round encodes one character; none can create a match (only `/`, `.`, letters are
    // matched, and `%XX` brings none of them), so this ends within the path's length.
    for _ in 0..=path.len() {
        let (at, len) = match (health_at(&out), static_extension_dot(&out)) {
            (Some(i), _) => (i + 1, 1),
            (None, Some(i)) => (i, 1),
            (None, None) => break,
        };
        let encoded = format!("%{:02X}", out.as_bytes()[at]);
        out.replace_range(at..at + len, &encoded);
    }
    Cow::Owned(out)
}

/// `record` as Akto's runtime keeps it (see the module doc): borrowed, at the cost of a few
/// byte checks, when no filter of Akto's runtime would drop it; else a copy with the status,
/// path and request content-type rewritten as needed. A rule whose headers are not a JSON
/// object of strings is left alone, for `validate` to quarantine the record.
pub fn for_akto_runtime(record: &AktoRecord) -> Cow<'_, AktoRecord> {
    let status = dropped_status(&record.status_code);
    let path = health_at(&record.path).is_some() || static_extension_dot(&record.path).is_some();
    let text_body = blank_or_open_bracket(&record.request_payload)
        && json_or_no_content_type(&record.request_headers) == Some(true);
    if status.is_none() && !path && !text_body {
        return Cow::Borrowed(record);
    }
    let mut out = record.clone();
    if let Some(code) = status {
        if let Ok(mut h) = serde_json::from_str::<BTreeMap<String, String>>(&out.response_headers) {
            h.entry(STATUS_HEADER.to_string())
                .or_insert_with(|| code.to_string());
            if let Ok(encoded) = serde_json::to_string(&h) {
                out.response_headers = encoded;
                out.status_code = "200".to_string();
                out.status = "OK".to_string();
            }
        }
    }
    if path {
        out.path = akto_kept_path(&record.path).into_owned();
    }
    if text_body {
        if let Ok(mut h) = serde_json::from_str::<BTreeMap<String, String>>(&out.request_headers) {
            h.insert("content-type".to_string(), "text/plain".to_string());
            if let Ok(encoded) = serde_json::to_string(&h) {
                out.request_headers = encoded;
            }
        }
    }
    Cow::Owned(out)
}
