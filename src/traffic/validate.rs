//! A local check of everything Akto would reject or silently drop, so a bad record is caught
//! (and quarantined by the caller) before it leaves the process instead of vanishing in Akto.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::record::{AktoRecord, MAX_STRING_BYTES};
use super::runtime::{
    blank_or_open_bracket, dropped_status, health_at, static_extension_dot, STATIC_EXTENSIONS,
    STATUS_HEADER,
};

/// The `source` values Akto's runtime accepts; anything else is dropped silently.
pub const ALLOWED_SOURCES: [&str; 10] = [
    "HAR",
    "PCAP",
    "MIRRORING",
    "SDK",
    "OTHER",
    "POSTMAN",
    "OPEN_API",
    "BURP",
    "IMPERVA",
    "WIZ",
];

/// A record field Akto would reject or drop, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Akto record field `{field}` is invalid: {reason}")]
pub struct ContractViolation {
    /// The Akto field name (e.g. `time`, `requestHeaders`).
    pub field: &'static str,
    /// What is wrong and what Akto expects instead.
    pub reason: String,
}

fn violation(field: &'static str, reason: impl Into<String>) -> ContractViolation {
    ContractViolation {
        field,
        reason: reason.into(),
    }
}

/// Every field but the payloads (held as literals: see [`validate`]).
fn text_fields(r: &AktoRecord) -> [(&'static str, &str); 15] {
    [
        ("path", &r.path),
        ("method", &r.method),
        ("requestHeaders", &r.request_headers),
        ("responseHeaders", &r.response_headers),
        ("ip", &r.ip),
        ("destIp", &r.dest_ip),
        ("time", &r.time),
        ("statusCode", &r.status_code),
        ("status", &r.status),
        ("type", &r.http_type),
        ("akto_account_id", &r.akto_account_id),
        ("akto_vxlan_id", &r.akto_vxlan_id),
        ("is_pending", &r.is_pending),
        ("source", &r.source),
        ("tag", &r.tag),
    ]
}

/// Parse a strictly decimal (digits only) 32-bit integer.
fn parse_i32_digits(s: &str) -> Option<i32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i32>().ok()
}

/// The entries of a JSON object; a value is `None` when it is not a string. Keys and values
/// borrow from the input unless they contain escapes: validating a record allocates little.
type Entries<'a> = Vec<(Cow<'a, str>, Option<Cow<'a, str>>)>;

/// A JSON value read only as deep as validation needs: strings (borrowed when unescaped),
/// objects with their entries, anything else skipped.
enum Shallow<'a> {
    Str(Cow<'a, str>),
    Object(Entries<'a>),
    Other,
}

impl<'de> Deserialize<'de> for Shallow<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shallow<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Shallow::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Shallow::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Shallow::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Shallow::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Shallow::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Shallow::Other)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Shallow::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Shallow::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(a.size_hint().unwrap_or(8));
                while let Some(key) = a.next_key::<Shallow<'de>>()? {
                    let key = match key {
                        Shallow::Str(k) => k,
                        _ => Cow::Borrowed(""),
                    };
                    let value = match a.next_value::<Shallow<'de>>()? {
                        Shallow::Str(v) => Some(v),
                        _ => None,
                    };
                    out.push((key, value));
                }
                Ok(Shallow::Object(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parse `s` as a JSON object whose values are all strings (headers, tag).
fn string_object<'a>(field: &'static str, s: &'a str) -> Result<Entries<'a>, ContractViolation> {
    let parsed: Shallow<'a> = serde_json::from_str(s).map_err(|e| {
        violation(
            field,
            format!("must be a JSON object encoded as a string, but does not parse: {e}"),
        )
    })?;
    let Shallow::Object(entries) = parsed else {
        return Err(violation(
            field,
            "must be a JSON object encoded as a string, but is another JSON value",
        ));
    };
    if let Some((k, _)) = entries.iter().find(|(_, v)| v.is_none()) {
        return Err(violation(
            field,
            format!("value of key {k:?} must be a string"),
        ));
    }
    Ok(entries)
}

fn headers<'a>(field: &'static str, s: &'a str) -> Result<Entries<'a>, ContractViolation> {
    let map = string_object(field, s)?;
    if let Some((k, _)) = map
        .iter()
        .find(|(k, _)| k.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return Err(violation(
            field,
            format!("header key {k:?} must be lowercase (Akto matches header names in lowercase)"),
        ));
    }
    if let Some((k, _)) = map.iter().find(|(k, _)| k.is_empty()) {
        return Err(violation(
            field,
            format!("header key {k:?} must not be empty"),
        ));
    }
    Ok(map)
}

/// Check a record against Akto's ingestion contract.
pub fn validate(record: &AktoRecord) -> Result<(), ContractViolation> {
    let payloads = [
        ("requestPayload", &record.request_payload),
        ("responsePayload", &record.response_payload),
    ];
    let lengths = text_fields(record)
        .into_iter()
        .map(|(field, value)| (field, value.len()))
        // A payload's escaped size bounds its text's: it is decoded only when that is too much.
        .chain(payloads.into_iter().map(|(field, p)| {
            let len = match p.escaped_len() {
                n if n <= MAX_STRING_BYTES => n,
                _ => p.text_len(),
            };
            (field, len)
        }));
    for (field, len) in lengths {
        if len > MAX_STRING_BYTES {
            return Err(violation(
                field,
                format!(
                    "is {len} bytes, over Akto's limit of {MAX_STRING_BYTES} bytes per string; truncate it",
                ),
            ));
        }
    }
    match parse_i32_digits(&record.time) {
        Some(t) if t > 0 => {}
        _ => {
            return Err(violation(
                "time",
                format!(
                    "{:?} must be epoch SECONDS as a positive 32-bit decimal integer",
                    short(&record.time)
                ),
            ))
        }
    }
    if parse_i32_digits(&record.status_code).is_none() {
        return Err(violation(
            "statusCode",
            format!(
                "{:?} must be a numeric string such as \"200\"",
                short(&record.status_code)
            ),
        ));
    }
    if let Some(code) = dropped_status(&record.status_code) {
        return Err(violation(
            "statusCode",
            format!(
                "{code} is dropped silently by Akto's runtime, which keeps only 200-299 and 302 \
                 (HttpResponseParams.validHttpResponseCode); send 200 with the real code in the \
                 response header {STATUS_HEADER} (traffic::for_akto_runtime)"
            ),
        ));
    }
    if !ALLOWED_SOURCES.contains(&record.source.as_str()) {
        return Err(violation(
            "source",
            format!(
                "{:?} is not one of {}; Akto drops such records (use MIRRORING)",
                short(&record.source),
                ALLOWED_SOURCES.join(", ")
            ),
        ));
    }
    if parse_i32_digits(&record.akto_account_id).is_none() {
        return Err(violation(
            "akto_account_id",
            format!(
                "{:?} must be a numeric string such as \"1000000\"",
                short(&record.akto_account_id)
            ),
        ));
    }
    if parse_i32_digits(&record.akto_vxlan_id).is_none() {
        return Err(violation(
            "akto_vxlan_id",
            "must be a numeric string such as \"0\"",
        ));
    }
    if record.is_pending != "true" && record.is_pending != "false" {
        return Err(violation("is_pending", "must be \"true\" or \"false\""));
    }
    if record.method.is_empty() || !record.method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(violation(
            "method",
            "must be an uppercase HTTP method such as \"POST\"",
        ));
    }
    if !record.path.starts_with('/') {
        return Err(violation("path", "must start with '/'"));
    }
    if let Some(i) = health_at(&record.path) {
        return Err(violation(
            "path",
            format!(
                "{:?} contains \"/health\" (any case) at byte {i}: Akto's runtime \
                 (HttpCallParser.filterHttpResponseParams) drops such URLs as health checks; \
                 percent-encode the letter after the slash (traffic::for_akto_runtime)",
                short(&record.path)
            ),
        ));
    }
    if let Some(i) = static_extension_dot(&record.path) {
        return Err(violation(
            "path",
            format!(
                "{:?} ends (or has a query after) a static-file extension at byte {i}: Akto's \
                 runtime drops URLs matching its default redundant-endpoint pattern \
                 .*\\.({})(\\?.*)? (AccountSettings.allowRedundantEndpointsList); encode the dot \
                 as %2E (traffic::for_akto_runtime)",
                short(&record.path),
                STATIC_EXTENSIONS.join("|")
            ),
        ));
    }
    let req = headers("requestHeaders", &record.request_headers)?;
    // A repeated key: the last one counts, as in a JSON parser building a map.
    let host = req
        .iter()
        .rev()
        .find(|(k, _)| k == "host")
        .and_then(|(_, v)| v.as_deref());
    match host {
        None => {
            return Err(violation(
                "requestHeaders",
                "has no \"host\" header; Akto groups MIRRORING traffic into collections by host",
            ))
        }
        Some(h)
            if h.is_empty()
                || !h.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                }) =>
        {
            return Err(violation(
                "requestHeaders",
                format!(
                    "host {:?} must be non-empty and use only [a-z0-9.-]",
                    short(h)
                ),
            ))
        }
        Some(_) => {}
    }
    // Akto's runtime drops, silently, a request whose body starts like JSON but does not end
    // like it when its content-type is `application/json` (a missing one counts as such).
    let content_type = || {
        req.iter()
            .rev()
            .find(|(k, _)| k == "content-type")
            .and_then(|(_, v)| v.as_deref())
    };
    if blank_or_open_bracket(&record.request_payload)
        && matches!(content_type(), None | Some("application/json"))
    {
        return Err(violation(
            "requestPayload",
            "is empty, whitespace only or ends with `[` while the request content-type is \
             application/json or missing: Akto releases up to 018552b4 drop such a record \
             (SampleParser.isPossiblyIncompleteJson); send it with content-type text/plain \
             (traffic::for_akto_runtime)",
        ));
    }
    if record.request_payload.possibly_incomplete_json()
        && matches!(content_type(), None | Some("application/json"))
    {
        return Err(violation(
            "requestPayload",
            "starts like JSON (`{` or `[`) but does not end like it (`}` or `]`) while the \
             request content-type is application/json or missing: Akto drops such a record \
             as possibly incomplete JSON; send it with content-type text/plain",
        ));
    }
    headers("responseHeaders", &record.response_headers)?;
    string_object("tag", &record.tag)?;
    Ok(())
}

/// At most 64 characters of a value, for error messages.
fn short(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
