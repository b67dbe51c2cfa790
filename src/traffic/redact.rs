//! Opt-in redaction of sensitive values before any record leaves the process
//! (`REDACT_SENSITIVE_DATA=true`, narrowed by `REDACT_KINDS`).
//!
//! Off by default: Akto's own sensitive-data detection needs the raw values. When on, every
//! match is replaced by `[REDACTED:<kind>]`.
//!
//! Kinds: `email`, `phone`, `card` (13-19 digits, Luhn-checked), `ssn` (US, `ddd-dd-dddd`),
//! `iban` (mod-97 checked), and the secrets `aws_key` (`AKIA...`), `databricks_token`
//! (`dapi...`), `jwt`, `private_key` (PEM blocks), `password` (`api_key=`, `password: ...`,
//! `"client_secret": "..."` style assignments, also inside JSON-encoded strings). In
//! `REDACT_KINDS`, `secret`/`secrets` selects all five secret kinds.
//!
//! JSON stays valid: a payload that starts with `{`, `[` or `"` (or is a short JSON scalar) is
//! scanned as JSON. Inside strings a
//! match never starts or ends inside an escape sequence and the replacement has no character
//! that needs escaping; outside strings (a card number written as a JSON number) the replacement
//! is quoted. Redaction is a single pass over the bytes that only looks closer at token starts
//! and at `@`, `:`, `=` and `-----BEGIN`, so it costs a fraction of a JSON parse.
//!
//! Not redacted: the `host` header (it names the Akto collection), ids (request, tool call, and
//! the `x-mlflow-*` / `x-span-*` headers linking a span record to its trace), table names,
//! content types, the tag and the path — they are structural, not user data.

use std::fmt;
use std::str::FromStr;

use super::map::Mapped;
use super::record::{fit_text, AktoRecord};

/// A kind of sensitive value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RedactKind {
    /// Email address.
    Email,
    /// Phone number (grouped digits, or `+` and 10-15 digits).
    Phone,
    /// Payment card number (Luhn-checked).
    Card,
    /// US social security number.
    Ssn,
    /// International bank account number (mod-97 checked).
    Iban,
    /// AWS access key id.
    AwsKey,
    /// Databricks personal access token.
    DatabricksToken,
    /// JSON web token.
    Jwt,
    /// PEM private key block.
    PrivateKey,
    /// Value of a `password=` / `api_key:` / `"secret": "..."` style assignment.
    Password,
}

const KINDS: usize = 10;

impl RedactKind {
    /// Every kind.
    pub const ALL: [RedactKind; KINDS] = [
        RedactKind::Email,
        RedactKind::Phone,
        RedactKind::Card,
        RedactKind::Ssn,
        RedactKind::Iban,
        RedactKind::AwsKey,
        RedactKind::DatabricksToken,
        RedactKind::Jwt,
        RedactKind::PrivateKey,
        RedactKind::Password,
    ];

    /// The secret kinds (`secret` in `REDACT_KINDS`).
    pub const SECRETS: [RedactKind; 5] = [
        RedactKind::AwsKey,
        RedactKind::DatabricksToken,
        RedactKind::Jwt,
        RedactKind::PrivateKey,
        RedactKind::Password,
    ];

    /// The name used in `REDACT_KINDS`, the replacement and the counts.
    pub fn as_str(self) -> &'static str {
        match self {
            RedactKind::Email => "email",
            RedactKind::Phone => "phone",
            RedactKind::Card => "card",
            RedactKind::Ssn => "ssn",
            RedactKind::Iban => "iban",
            RedactKind::AwsKey => "aws_key",
            RedactKind::DatabricksToken => "databricks_token",
            RedactKind::Jwt => "jwt",
            RedactKind::PrivateKey => "private_key",
            RedactKind::Password => "password",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn replacement(self) -> &'static str {
        match self {
            RedactKind::Email => "[REDACTED:email]",
            RedactKind::Phone => "[REDACTED:phone]",
            RedactKind::Card => "[REDACTED:card]",
            RedactKind::Ssn => "[REDACTED:ssn]",
            RedactKind::Iban => "[REDACTED:iban]",
            RedactKind::AwsKey => "[REDACTED:aws_key]",
            RedactKind::DatabricksToken => "[REDACTED:databricks_token]",
            RedactKind::Jwt => "[REDACTED:jwt]",
            RedactKind::PrivateKey => "[REDACTED:private_key]",
            RedactKind::Password => "[REDACTED:password]",
        }
    }
}

impl fmt::Display for RedactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `REDACT_KINDS` entry that names no kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "REDACT_KINDS: unknown kind {0:?}; use a comma-separated list of email, phone, card, ssn, \
     iban, aws_key, databricks_token, jwt, private_key, password, secret"
)]
pub struct UnknownRedactKind(pub String);

impl FromStr for RedactKind {
    type Err = UnknownRedactKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase().replace('-', "_");
        RedactKind::ALL
            .into_iter()
            .find(|k| k.as_str() == t)
            .ok_or_else(|| UnknownRedactKind(s.trim().to_string()))
    }
}

/// Parse `REDACT_KINDS` (comma separated; `secret`/`secrets` = all secret kinds; empty = all).
pub fn parse_kinds(list: &str) -> Result<Vec<RedactKind>, UnknownRedactKind> {
    let mut out: Vec<RedactKind> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.to_ascii_lowercase().as_str() {
            "secret" | "secrets" => out.extend(RedactKind::SECRETS),
            "all" => out.extend(RedactKind::ALL),
            _ => out.push(item.parse()?),
        }
    }
    if out.is_empty() {
        out.extend(RedactKind::ALL);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// How many values of each kind were redacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RedactionCounts([u64; KINDS]);

impl RedactionCounts {
    /// Count of one kind.
    pub fn get(&self, kind: RedactKind) -> u64 {
        self.0[kind.index()]
    }

    /// Sum over all kinds.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Non-zero counts, in kind order.
    pub fn iter(&self) -> impl Iterator<Item = (RedactKind, u64)> + '_ {
        RedactKind::ALL
            .into_iter()
            .map(|k| (k, self.get(k)))
            .filter(|(_, n)| *n > 0)
    }

    /// Add another set of counts.
    pub fn add(&mut self, other: &RedactionCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }

    fn bump(&mut self, kind: RedactKind) {
        self.0[kind.index()] = self.0[kind.index()].saturating_add(1);
    }
}

/// Headers whose values are structural and never redacted: the collection's host, content
/// types, ids, and the links of a span record to its trace (`traces` writes the `x-mlflow-*`
/// and `x-span-*` ones: an experiment id in `x-mlflow-location: mlflow:<id>` may be 16 digits
/// that pass the Luhn check). `x-span-error` is not among them: it carries the span's error
/// message, free text that may hold user data.
const STRUCTURAL_HEADERS: [&str; 19] = [
    "host",
    "content-type",
    "x-databricks-request-id",
    "x-client-request-id",
    "x-tool-call-id",
    "x-databricks-table",
    "x-databricks-served-entity-id",
    "x-databricks-execution-duration-ms",
    "x-databricks-logging-error-codes",
    "x-databricks-status-code",
    "x-databricks-shield-inventory-hash",
    "x-mlflow-trace-id",
    "x-mlflow-span-id",
    "x-mlflow-parent-span-id",
    "x-mlflow-span-type",
    "x-mlflow-location",
    "x-span-duration-ms",
    "x-span-start",
    "x-span-status",
];

/// Assignment keys whose value is a secret (also matched as `<prefix>_<key>`).
const SECRET_KEYS: [&str; 17] = [
    "password",
    "passwd",
    "pwd",
    "secret",
    "client_secret",
    "secret_key",
    "api_key",
    "apikey",
    "api-key",
    "access_key",
    "private_key",
    "access_token",
    "refresh_token",
    "auth_token",
    "id_token",
    "api_token",
    "session_token",
];

/// Masks sensitive values of the enabled kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redactor {
    on: [bool; KINDS],
}

impl Default for Redactor {
    fn default() -> Self {
        Redactor::new(&RedactKind::ALL)
    }
}

/// One match: byte span, kind, and whether the replacement must be quoted (outside a JSON
/// string).
struct Hit {
    start: usize,
    end: usize,
    kind: RedactKind,
    quote: bool,
    /// The span is the content of a JSON string whose opening quote the scanner skipped.
    enter_string: bool,
}

/// Byte flags of the scanner (0 = starts nothing and is skipped at once): a word byte
/// `[A-Za-z0-9_]`, a byte a detector may start with at the start of a token, or an anchor
/// that is always looked at.
const F_WORD: u8 = 1;
const F_TOKEN_START: u8 = 2;
const F_ANCHOR: u8 = 4;
static FLAGS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        let mut f = 0;
        if b.is_ascii_alphanumeric() || b == b'_' {
            f |= F_WORD;
        }
        if b.is_ascii_digit() || b.is_ascii_uppercase() || matches!(b, b'+' | b'(' | b'd' | b'e') {
            f |= F_TOKEN_START;
        }
        if matches!(b, b'"' | b'\\' | b'@' | b'-' | b':' | b'=') {
            f |= F_ANCHOR;
        }
        t[c] = f;
        c += 1;
    }
    t
};

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

impl Redactor {
    /// A redactor for the given kinds.
    pub fn new(kinds: &[RedactKind]) -> Self {
        let mut on = [false; KINDS];
        for k in kinds {
            on[k.index()] = true;
        }
        Redactor { on }
    }

    /// Is `kind` enabled?
    pub fn enabled(&self, kind: RedactKind) -> bool {
        self.on[kind.index()]
    }

    /// Redact every record of a mapping: payloads and non-structural header values. Strings
    /// that grow past `max_string_bytes` are cut again (counted in `truncated_payloads`).
    pub fn redact_mapped(&self, mapped: &mut Mapped, max_string_bytes: usize) -> RedactionCounts {
        let mut counts = RedactionCounts::default();
        for r in &mut mapped.records {
            self.redact_record(
                r,
                max_string_bytes,
                &mut counts,
                &mut mapped.truncated_payloads,
            );
        }
        counts
    }

    /// Redact one record in place.
    pub fn redact_record(
        &self,
        r: &mut AktoRecord,
        max_string_bytes: usize,
        counts: &mut RedactionCounts,
        truncated: &mut u32,
    ) {
        for p in [&mut r.request_payload, &mut r.response_payload] {
            let redacted = self.redact_text(&p.text(), counts);
            if let Some(new) = redacted {
                *p = fit_text(&new, max_string_bytes, truncated);
            }
        }
        for h in [&mut r.request_headers, &mut r.response_headers] {
            if let Some(new) = self.redact_headers(h, counts) {
                *h = new;
            }
        }
    }

    /// Redact the values of a header object string, except structural headers.
    fn redact_headers(&self, headers: &str, counts: &mut RedactionCounts) -> Option<String> {
        // Fast path: nothing in the whole object matches, so no value can.
        let mut probe = RedactionCounts::default();
        self.redact_text(headers, &mut probe)?;
        let mut map: std::collections::BTreeMap<String, String> =
            serde_json::from_str(headers).ok()?;
        let mut changed = false;
        for (k, v) in map.iter_mut() {
            if STRUCTURAL_HEADERS.contains(&k.as_str()) {
                continue;
            }
            // A header value is text, never a JSON document: a value of digits only is not a
            // JSON number whose mask would need quotes.
            if let Some(new) = self.redact_in(v, false, counts) {
                *v = new;
                changed = true;
            }
        }
        if changed {
            serde_json::to_string(&map).ok()
        } else {
            None
        }
    }

    /// Redact one string; `None` when nothing matched (no allocation).
    pub fn redact_text(&self, s: &str, counts: &mut RedactionCounts) -> Option<String> {
        self.redact_in(s, true, counts)
    }

    /// [`Redactor::redact_text`]; `maybe_json`: `s` may be a JSON document (a payload), whose
    /// strings and structure are kept valid, else it is plain text (a header value).
    fn redact_in(&self, s: &str, maybe_json: bool, counts: &mut RedactionCounts) -> Option<String> {
        if !self.on.iter().any(|b| *b) {
            return None;
        }
        let bytes = s.as_bytes();
        // JSON documents are objects, arrays or strings here; a short payload may also be a
        // bare JSON scalar (a card number as the whole body must stay a JSON value).
        let json = maybe_json
            && match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b'{') | Some(b'[') | Some(b'"') => true,
                Some(_) if s.len() <= 64 => {
                    serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok()
                }
                _ => false,
            };
        let mut out: Option<String> = None;
        let mut copied = 0usize; // bytes of `s` already handled in `out`
        let mut in_string = false;
        // Start of the current run without escapes or quotes: matches never reach before it.
        let mut seg = 0usize;
        let mut i = 0usize;
        let n = bytes.len();
        while i < n {
            let b = bytes[i];
            let flags = FLAGS[usize::from(b)];
            if flags == 0 {
                i += 1;
                continue;
            }
            let word = flags & F_WORD != 0;
            if json && b == b'"' {
                in_string = !in_string;
                i += 1;
                seg = i;
                continue;
            }
            if b == b'\\' {
                // Inside JSON an escape is skipped whole; in text a backslash is a boundary.
                let len = if json && in_string {
                    if bytes.get(i + 1) == Some(&b'u') {
                        6
                    } else {
                        2
                    }
                } else {
                    1
                };
                i = (i + len).min(n);
                while i < n && !s.is_char_boundary(i) {
                    i += 1;
                }
                seg = i;
                continue;
            }
            let lo = seg.max(copied);
            let prev_word = i > lo && is_word(bytes[i - 1]);
            let hit = if word && (prev_word || flags & F_TOKEN_START == 0) {
                None
            } else {
                self.detect(s, i, lo, prev_word, json, in_string)
            };
            match hit {
                Some(h)
                    if h.start >= copied && h.end > h.start && s.get(h.start..h.end).is_some() =>
                {
                    let o = out.get_or_insert_with(|| String::with_capacity(s.len() + 32));
                    o.push_str(s.get(copied..h.start).unwrap_or(""));
                    if h.quote {
                        o.push('"');
                        o.push_str(h.kind.replacement());
                        o.push('"');
                    } else {
                        o.push_str(h.kind.replacement());
                    }
                    counts.bump(h.kind);
                    copied = h.end;
                    i = h.end;
                    if h.enter_string {
                        in_string = true;
                    }
                }
                _ if word => {
                    // Nothing starts inside a word: skip the rest of it at once.
                    i += 1;
                    while i < n && FLAGS[usize::from(bytes[i])] & F_WORD != 0 {
                        i += 1;
                    }
                }
                _ => i += 1,
            }
        }
        let mut o = out?;
        o.push_str(&s[copied..]);
        Some(o)
    }

    /// Try every detector that can start (or is anchored) at byte `i`.
    #[inline]
    fn detect(
        &self,
        s: &str,
        i: usize,
        lo: usize,
        prev_word: bool,
        json: bool,
        in_string: bool,
    ) -> Option<Hit> {
        let bytes = s.as_bytes();
        let b = bytes[i];
        let quote = json && !in_string;
        let hit = |start: usize, end: usize, kind: RedactKind| {
            Some(Hit {
                start,
                end,
                kind,
                quote,
                enter_string: false,
            })
        };
        match b {
            b'@' if self.enabled(RedactKind::Email) => {
                let (start, end) = email(bytes, i, lo)?;
                hit(start, end, RedactKind::Email)
            }
            b'0'..=b'9' | b'+' | b'(' if !prev_word && !after_joined_word(bytes, i, lo) => {
                if quote {
                    // A bare JSON number: only a card number can be one.
                    if self.enabled(RedactKind::Card) && b.is_ascii_digit() {
                        let end = card(bytes, i, false)?;
                        // Replace a negative number whole: `-"[REDACTED:card]"` is not JSON.
                        let start = if i > lo && bytes[i - 1] == b'-' {
                            i - 1
                        } else {
                            i
                        };
                        return hit(start, end, RedactKind::Card);
                    }
                    return None;
                }
                if self.enabled(RedactKind::Ssn) && b.is_ascii_digit() {
                    if let Some(end) = ssn(bytes, i) {
                        return hit(i, end, RedactKind::Ssn);
                    }
                }
                if self.enabled(RedactKind::Card) && b.is_ascii_digit() {
                    if let Some(end) = card(bytes, i, true) {
                        return hit(i, end, RedactKind::Card);
                    }
                }
                if self.enabled(RedactKind::Phone) {
                    if let Some(end) = phone(bytes, i) {
                        return hit(i, end, RedactKind::Phone);
                    }
                }
                None
            }
            b'A'..=b'Z' if !prev_word => {
                if self.enabled(RedactKind::AwsKey) {
                    if let Some(end) = aws_key(bytes, i) {
                        return hit(i, end, RedactKind::AwsKey);
                    }
                }
                if self.enabled(RedactKind::Iban) {
                    if let Some(end) = iban(bytes, i) {
                        return hit(i, end, RedactKind::Iban);
                    }
                }
                None
            }
            b'd' if !prev_word && self.enabled(RedactKind::DatabricksToken) => {
                let end = databricks_token(bytes, i)?;
                hit(i, end, RedactKind::DatabricksToken)
            }
            b'e' if !prev_word && self.enabled(RedactKind::Jwt) => {
                let end = jwt(bytes, i)?;
                hit(i, end, RedactKind::Jwt)
            }
            b'-' if self.enabled(RedactKind::PrivateKey) => {
                let end = private_key(bytes, i, json)?;
                hit(i, end, RedactKind::PrivateKey)
            }
            b':' | b'=' if self.enabled(RedactKind::Password) => {
                let (start, end) = assignment(bytes, i, lo, json, in_string)?;
                // The value replaced is always inside a string or plain text.
                Some(Hit {
                    start,
                    end,
                    kind: RedactKind::Password,
                    quote: false,
                    enter_string: quote,
                })
            }
            _ => None,
        }
    }
}

/// `true` when `bytes[i]` follows a `-` or `.` that itself follows a word character (e.g. the
/// tail of `abc-123...`), so it is not the start of a standalone number.
fn after_joined_word(bytes: &[u8], i: usize, lo: usize) -> bool {
    i >= lo + 2 && matches!(bytes[i - 1], b'-' | b'.') && is_word(bytes[i - 2])
}

/// Does a token end at `end` (not followed by a word character, or by `-`/`.` + word)?
fn ends_token(bytes: &[u8], end: usize) -> bool {
    match bytes.get(end) {
        None => true,
        Some(&c) if is_word(c) => false,
        Some(b'-') | Some(b'.') => !bytes
            .get(end + 1)
            .is_some_and(|c| c.is_ascii_alphanumeric()),
        Some(_) => true,
    }
}

fn email(bytes: &[u8], at: usize, lo: usize) -> Option<(usize, usize)> {
    let local = |c: u8| c.is_ascii_alphanumeric() || b"._%+-".contains(&c);
    let mut start = at;
    while start > lo && local(bytes[start - 1]) {
        start -= 1;
    }
    while start < at && bytes[start] == b'.' {
        start += 1;
    }
    if start == at {
        return None;
    }
    let mut end = at + 1;
    while end < bytes.len()
        && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'.' || bytes[end] == b'-')
    {
        end += 1;
    }
    while end > at + 1 && matches!(bytes[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let domain = &bytes[at + 1..end];
    let dot = domain.iter().rposition(|c| *c == b'.')?;
    // The top-level domain is the letters starting the last label (`com` of `com4111`).
    let tld = domain[dot + 1..]
        .iter()
        .take_while(|c| c.is_ascii_alphabetic())
        .count();
    if dot == 0 || tld < 2 {
        return None;
    }
    Some((start, at + 1 + dot + 1 + tld))
}

/// `ddd-dd-dddd`, not `000`/`666`/`9xx` area, not `00` group, not `0000` serial.
fn ssn(bytes: &[u8], i: usize) -> Option<usize> {
    let t = bytes.get(i..i + 11)?;
    let shape = t.iter().enumerate().all(|(k, c)| match k {
        3 | 6 => *c == b'-',
        _ => c.is_ascii_digit(),
    });
    if !shape || !ends_token(bytes, i + 11) {
        return None;
    }
    let area = &t[0..3];
    if area == b"000"
        || area == b"666"
        || area[0] == b'9'
        || &t[4..6] == b"00"
        || &t[7..11] == b"0000"
    {
        return None;
    }
    Some(i + 11)
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (k, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d - b'0');
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// 13-19 digits, Luhn-valid; when `separators`, optionally grouped by one kind of single
/// separator (space or dash) with a first group of 4 and later groups of 3-6 digits
/// (`4-4-4-4`, `4-6-5`, ...). The longest valid prefix of a run of groups wins, so two card
/// numbers separated by a space are two matches.
fn card(bytes: &[u8], i: usize, separators: bool) -> Option<usize> {
    let mut buf = [0u8; 19];
    let mut n = 0usize;
    let mut j = i;
    let mut sep: Option<u8> = None;
    let mut best: Option<usize> = None;
    let mut groups = 0usize;
    loop {
        let g0 = j;
        while j < bytes.len() && bytes[j].is_ascii_digit() {
            if n == buf.len() {
                // Past 19 digits: keep the longest card found so far, if any.
                return best;
            }
            buf[n] = bytes[j];
            n += 1;
            j += 1;
        }
        let g = j - g0;
        let grouped = separators
            && g == 4
            && (continues(bytes, j, Some(b' ')) || continues(bytes, j, Some(b'-')));
        if groups == 0 && !grouped {
            // Compact digits: exactly one token (a JSON number must not continue as a float).
            let ok = (13..=19).contains(&n)
                && luhn(&buf[..n])
                && (separators || !matches!(bytes.get(j), Some(b'.') | Some(b'e') | Some(b'E')))
                && ends_token(bytes, j);
            return ok.then_some(j);
        }
        if groups > 0 && !(3..=6).contains(&g) {
            return best;
        }
        groups += 1;
        if groups >= 2 && (13..=19).contains(&n) && luhn(&buf[..n]) && ends_token(bytes, j) {
            best = Some(j);
        }
        match bytes.get(j) {
            Some(&c) if sep.is_none_or(|s| s == c) && continues(bytes, j, Some(c)) => {
                sep = Some(c);
                j += 1;
            }
            _ => return best,
        }
    }
}

/// Is `bytes[j]` the separator `sep` followed by a digit (another group follows)?
fn continues(bytes: &[u8], j: usize, sep: Option<u8>) -> bool {
    match sep {
        Some(s) => bytes.get(j) == Some(&s) && bytes.get(j + 1).is_some_and(u8::is_ascii_digit),
        None => false,
    }
}

/// `+` and 8-15 digits, or at least three groups (first optionally in parentheses) of digits
/// separated by one space, dash or dot, 10-15 digits in all, groups after the first of 2-4
/// digits.
fn phone(bytes: &[u8], i: usize) -> Option<usize> {
    let mut j = i;
    let plus = bytes.get(j) == Some(&b'+');
    if plus {
        j += 1;
    }
    let mut groups = [0usize; 8];
    let mut ng = 0usize;
    let mut digits = 0usize;
    let mut end = j;
    loop {
        let paren = bytes.get(j) == Some(&b'(');
        if paren {
            if ng > 0 && !plus {
                break;
            }
            j += 1;
        }
        let g0 = j;
        while j < bytes.len() && bytes[j].is_ascii_digit() {
            j += 1;
        }
        let g = j - g0;
        if g == 0 {
            break;
        }
        if paren {
            if bytes.get(j) != Some(&b')') {
                return None;
            }
            j += 1;
        }
        if ng == groups.len() {
            return None;
        }
        groups[ng] = g;
        ng += 1;
        digits += g;
        end = j;
        match bytes.get(j) {
            Some(b' ') | Some(b'-') | Some(b'.')
                if bytes
                    .get(j + 1)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'(') =>
            {
                j += 1;
            }
            Some(b'-') if paren && bytes.get(j + 1) == Some(&b' ') => j += 2,
            _ => break,
        }
    }
    let groups = &groups[..ng];
    if !ends_token(bytes, end) || digits > 15 {
        return None;
    }
    let ok = if plus {
        digits >= 8 && (groups.len() == 1 || groups[1..].iter().all(|g| (1..=4).contains(g)))
    } else {
        digits >= 10
            && groups.len() >= 3
            && groups[0] <= 4
            && groups[1..].iter().all(|g| (2..=4).contains(g))
    };
    ok.then_some(end)
}

/// Two letters, two digits, 11-30 alphanumerics (groups of 4 may be separated by single
/// spaces), mod-97 == 1.
fn iban(bytes: &[u8], i: usize) -> Option<usize> {
    let head = bytes.get(i..i + 4)?;
    if !(head[0].is_ascii_uppercase()
        && head[1].is_ascii_uppercase()
        && head[2].is_ascii_digit()
        && head[3].is_ascii_digit())
    {
        return None;
    }
    let mut buf = [0u8; 34];
    buf[..4].copy_from_slice(head);
    let mut n = 4usize;
    let mut j = i + 4;
    let mut end = j;
    while j < bytes.len() && n < buf.len() {
        let c = bytes[j];
        if c.is_ascii_uppercase() || c.is_ascii_digit() {
            buf[n] = c;
            n += 1;
            j += 1;
            end = j;
        } else if c == b' '
            && n.is_multiple_of(4)
            && bytes
                .get(j + 1)
                .is_some_and(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        {
            j += 1;
        } else {
            break;
        }
    }
    let chars = &buf[..n];
    if n < 15 || !ends_token(bytes, end) {
        return None;
    }
    // Move the first four characters to the end, letters as 10..35, remainder mod 97.
    let mut rem = 0u32;
    for c in chars[4..].iter().chain(chars[..4].iter()) {
        let v = if c.is_ascii_digit() {
            u32::from(c - b'0')
        } else {
            u32::from(c - b'A') + 10
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    (rem == 1).then_some(end)
}

fn aws_key(bytes: &[u8], i: usize) -> Option<usize> {
    let t = bytes.get(i..i + 20)?;
    let prefix_ok = [b"AKIA", b"ASIA", b"ABIA", b"ACCA"]
        .iter()
        .any(|p| t.starts_with(*p));
    let body_ok = t[4..]
        .iter()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
    (prefix_ok && body_ok && ends_token(bytes, i + 20)).then_some(i + 20)
}

fn databricks_token(bytes: &[u8], i: usize) -> Option<usize> {
    let t = bytes.get(i..i + 36)?;
    if !t.starts_with(b"dapi")
        || !t[4..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    {
        return None;
    }
    let mut end = i + 36;
    if bytes.get(end) == Some(&b'-') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit) {
        end += 1;
        while end < bytes.len() && bytes[end].is_ascii_digit() {
            end += 1;
        }
    }
    ends_token(bytes, end).then_some(end)
}

/// `eyJ<header>.eyJ<payload>.<signature>` in base64url.
fn jwt(bytes: &[u8], i: usize) -> Option<usize> {
    let b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    let mut j = i;
    for part in 0..3 {
        if part < 2 && !bytes.get(j..)?.starts_with(b"eyJ") {
            return None;
        }
        let p0 = j;
        while j < bytes.len() && b64(bytes[j]) {
            j += 1;
        }
        if part < 2 {
            if j - p0 < 8 || bytes.get(j) != Some(&b'.') {
                return None;
            }
            j += 1;
        }
    }
    match bytes.get(j) {
        Some(c) if c.is_ascii_alphanumeric() || *c == b'.' => None,
        _ => Some(j),
    }
}

/// `-----BEGIN ... PRIVATE KEY-----` through the matching END line, or to the end of the
/// string when the block is cut. In JSON the block never crosses an unescaped quote.
fn private_key(bytes: &[u8], i: usize, json: bool) -> Option<usize> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const TAIL: &[u8] = b"PRIVATE KEY-----";
    if !bytes.get(i..)?.starts_with(BEGIN) {
        return None;
    }
    let line_end = find(bytes, i + BEGIN.len(), b"-----")? + 5;
    if !bytes[..line_end].ends_with(TAIL) || line_end - i > 80 {
        return None;
    }
    // Where the enclosing string (or text) ends.
    let limit = if json {
        string_end(bytes, line_end)
    } else {
        bytes.len()
    };
    let end = match find(&bytes[..limit], line_end, b"-----END ") {
        Some(e) => match find(&bytes[..limit], e + 9, TAIL) {
            Some(t) => t + TAIL.len(),
            None => limit,
        },
        None => limit,
    };
    Some(end)
}

/// Index of the unescaped `"` closing the JSON string that contains `from` (or the end).
fn string_end(bytes: &[u8], from: usize) -> usize {
    let mut j = from;
    while j < bytes.len() {
        match bytes[j] {
            b'\\' => j += 2,
            b'"' => return j,
            _ => j += 1,
        }
    }
    bytes.len()
}

fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    if from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Bytes that end an unquoted assignment value.
fn ends_value(c: u8) -> bool {
    matches!(
        c,
        b' ' | b'\t'
            | b'\r'
            | b'\n'
            | b'&'
            | b';'
            | b','
            | b'"'
            | b'\''
            | b'\\'
            | b')'
            | b'}'
            | b']'
            | b'<'
            | b'>'
    )
}

fn is_secret_key(key: &[u8]) -> bool {
    if key.len() > 64 {
        return false;
    }
    SECRET_KEYS.iter().any(|k| {
        let k = k.as_bytes();
        if key.len() < k.len() {
            return false;
        }
        let tail = &key[key.len() - k.len()..];
        tail.eq_ignore_ascii_case(k)
            && (key.len() == k.len() || matches!(key[key.len() - k.len() - 1], b'_' | b'-' | b'.'))
    })
}

/// An assignment whose key names a secret, anchored at its `:` or `=` at `op`; returns the
/// span of the value. Forms: `key=value`, `key: value`, `"key": "value"`, and the same with
/// escaped quotes inside a JSON string (`{\"key\":\"value\"}`).
fn assignment(
    bytes: &[u8],
    op: usize,
    lo: usize,
    json: bool,
    in_string: bool,
) -> Option<(usize, usize)> {
    let key_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.';
    // Look back over spaces to the key (possibly quoted).
    let mut k_end = op;
    while k_end > 0 && bytes[k_end - 1] == b' ' {
        k_end -= 1;
    }
    // Quote style around the key: 0 none, 1 `"`, 2 `\"`.
    let mut style = 0;
    if k_end > 0 && bytes[k_end - 1] == b'"' {
        if k_end > 1 && bytes[k_end - 2] == b'\\' {
            style = 2;
            k_end -= 2;
        } else {
            style = 1;
            k_end -= 1;
        }
    }
    // The key of a quoted style ends at its opening quote; a bare key must not reach back
    // into an escape sequence (`\\npassword`).
    let floor = if style == 0 { lo } else { 0 };
    let mut k_start = k_end;
    while k_start > floor && key_char(bytes[k_start - 1]) {
        k_start -= 1;
    }
    if k_start == k_end || !is_secret_key(&bytes[k_start..k_end]) {
        return None;
    }
    // Forward to the value.
    let mut v = op + 1;
    while v < bytes.len() && bytes[v] == b' ' {
        v += 1;
    }
    let (start, end) = if json && !in_string {
        // `"key": "value"` in JSON: the value is a whole string.
        if style != 1 || bytes.get(v) != Some(&b'"') {
            return None;
        }
        let start = v + 1;
        (start, string_end(bytes, start))
    } else if bytes.get(v) == Some(&b'\\') && bytes.get(v + 1) == Some(&b'"') {
        // `\"key\":\"value\"` inside a JSON string.
        let start = v + 2;
        let mut j = start;
        loop {
            match bytes.get(j) {
                None => return None,
                Some(b'"') => return None, // the outer string ended first
                Some(b'\\') if bytes.get(j + 1) == Some(&b'"') => break,
                Some(b'\\') => j += 2,
                Some(_) => j += 1,
            }
        }
        (start, j.min(bytes.len()))
    } else if !in_string && (bytes.get(v) == Some(&b'\'') || bytes.get(v) == Some(&b'"')) {
        // Quoted value in plain text.
        let q = bytes[v];
        let start = v + 1;
        let end = bytes[start..]
            .iter()
            .position(|c| *c == q)
            .map(|p| p + start)?;
        (start, end)
    } else {
        let start = v;
        let mut j = v;
        while j < bytes.len() && !ends_value(bytes[j]) && !bytes[j..].starts_with(b"-----BEGIN ") {
            j += 1;
        }
        (start, j)
    };
    if end <= start || bytes[start..end].starts_with(b"[REDACTED:") {
        return None;
    }
    Some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Luhn-valid 16-digit number (it passes the card check) used as an MLflow experiment id.
    const EXPERIMENT_ID: &str = "4111111111111111";

    #[test]
    fn trace_link_headers_are_structural_even_when_an_id_looks_like_a_card() {
        let r = Redactor::new(&RedactKind::ALL);
        let mut counts = RedactionCounts::default();
        // The detector does fire on this id anywhere else...
        let text = format!("paid with {EXPERIMENT_ID}");
        assert!(r
            .redact_text(&text, &mut counts)
            .is_some_and(|t| t.contains("[REDACTED:card]")));
        // ...but not in the headers that link a span record to its trace.
        let location = format!("mlflow:{EXPERIMENT_ID}");
        let request = serde_json::json!({
            "host": "agent.ws.databricks",
            "x-mlflow-location": location,
            "x-mlflow-trace-id": format!("tr-{EXPERIMENT_ID}"),
            "x-mlflow-span-id": EXPERIMENT_ID,
            "x-mlflow-parent-span-id": EXPERIMENT_ID,
            "x-mlflow-span-type": "TOOL",
            "x-client-request-id": EXPERIMENT_ID,
        })
        .to_string();
        let response = serde_json::json!({
            "x-span-duration-ms": EXPERIMENT_ID,
            "x-span-start": "2024-01-01T00:00:00Z",
            "x-span-status": "OK",
        })
        .to_string();
        let mut counts = RedactionCounts::default();
        assert_eq!(r.redact_headers(&request, &mut counts), None, "{request}");
        assert_eq!(r.redact_headers(&response, &mut counts), None, "{response}");
        assert_eq!(counts.total(), 0);

        // Other headers, and the span's free-text error, are still redacted.
        let other = serde_json::json!({
            "x-mlflow-location": location,
            "x-span-error": format!("card {EXPERIMENT_ID} declined"),
            "x-user-note": EXPERIMENT_ID,
        })
        .to_string();
        let out = r
            .redact_headers(&other, &mut counts)
            .expect("the other headers are redacted");
        let v: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&out).expect("still a JSON object of strings");
        assert_eq!(v["x-mlflow-location"], location);
        // A header value of digits only is text: masked without JSON quotes.
        assert_eq!(v["x-user-note"], "[REDACTED:card]", "{out}");
        assert!(v["x-span-error"].contains("[REDACTED:card]"), "{out}");
        assert_eq!(counts.get(RedactKind::Card), 2);
    }
}
