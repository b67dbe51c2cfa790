//! Opt-in redaction of sensitive values before any record leaves the process
//! (`REDACT_SENSITIVE_DATA=true`, narrowed by `REDACT_KINDS`).
//!
//! Off by default: Akto's own sensitive-data detection needs the raw values. When on, every
//! match is replaced by `[REDACTED:<kind>]`.
//!
//! Kinds: `email`, `phone`, `card` (13-19 digits, Luhn-checked), `ssn` (US, `ddd-dd-dddd`), `iban`
//! (mod-97 checked), and the secrets `aws_key` (`AKIA...`), `databricks_token` (`dapi...`), `jwt`,
//! `private_key` (PEM and PGP private key blocks), `password` (`api_key=`, `password: ...`,
//! `"clientSecret": "..."`, `password='...'`, `token`, `authorization`, `cookie`, `credentials`
//! style assignments, also inside JSON-encoded strings at any depth; the credential of
//! `Authorization: Bearer <credential>` and of `Bearer <20+ characters>` anywhere, `\/` in it
//! included; a secret-named JSON member whose value is a number, an array or an object, masked
//! whole; and the whole value of a header named like a secret). A name ending in `token` or `auth`
//! alone (`token`, `csrf_token`, `oauth`) also names what is no secret (logprobs and TGI `token`s,
//! `auth` settings, prose): its value is masked only when it is a string shaped like a credential
//! (16+ characters, no spaces, not a plain word); `access_token`, `id_token`, `x-auth-token` and
//! the like mask any value. In `REDACT_KINDS`, `secret`/`secrets` selects all five secret kinds.
//!
//! JSON stays valid: a payload that parses as JSON, or a JSON document cut by the truncation
//! marker, is scanned as JSON; anything else (a log line starting with `[INFO]`, a Python
//! `{'k': 'v'}`) is plain text. Inside strings a match never starts or ends inside an escape
//! sequence and the replacement has no character that needs escaping; a replaced JSON value that is
//! not a string (a card number written as a JSON number, masked only when its key names a card; a
//! secret-named member's number or array) is quoted, with escaped quotes in JSON inside a string. A
//! string with a printable character written as `\u00XX` (.NET writes `"` as `\u0022`, `+` as
//! `\u002B`) is looked at decoded, and escaped again only when something in it was masked; a decode
//! stops at an escape that does not decode (a lone surrogate, an escape cut by the truncation
//! marker) and goes on after it, so each byte is decoded once. In JSON inside strings a quote's
//! level is read from its run of backslashes, escaped backslashes ending a string included
//! (`\"x\\\\\"`). Redaction is a single pass over the bytes that only looks closer at token starts
//! and at `@`, `\`, `:`, `=` and `-----BEGIN`; a detector that fails does not scan the same run
//! again, so the cost stays linear (a JSON validity check plus a fraction of a parse; the ends of
//! values in JSON nested in strings, near-linear: one pass per nesting level at most).
//!
//! Not over-masked: JSON numbers (timestamps, ids) other than under a card key, also as member
//! values of JSON inside a string (tool-call arguments: `{\"start_ms\": 1700000000004}`) and as
//! elements of its arrays of numbers (`[1700000000004, 12]`), a whole string value of a key naming an id or a
//! time (`span_id`, `timestamp_ms`), counts of tokens (`max_tokens`, `prompt_tokens`),
//! pagination and latency names (`next_page_token`, `NextToken`, `time_to_first_token`),
//! `true`/`false`/`null` of a secret name (also in JSON inside a string), dates
//! (`2024-01-15 10:30`) and IPv4 addresses. A secret cut by the truncation marker (`dapi0123...`,
//! `AKIA...`, a JWT after its header) is masked although shorter than a whole one.
//!
//! Not redacted: the `host` header (it names the Akto collection), ids (request, tool call, and
//! the `x-mlflow-*` / `x-span-*` headers linking a span record to its trace), table names,
//! content types, the tag and the path — they are structural, not user data.

use std::fmt;
use std::str::FromStr;

use super::map::Mapped;
use super::record::{fit_text, write_json_str, AktoRecord};

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

/// Names whose value is a secret: a key (or header name) whose lowercase letters and digits
/// end with one of these (see [`secret_name`]). `token` covers `access_token`, `id_token`,
/// `x-auth-token`, ...; `tokens`, `max_tokens`, `token_count` and the other counts of tokens do
/// not end with it. `token` and `auth` alone are [`SHAPE_CHECKED_KEYS`].
const SECRET_KEYS: [&str; 15] = [
    "password",
    "passwd",
    "pwd",
    "secret",
    "secretkey",
    "apikey",
    "accesskey",
    "privatekey",
    "token",
    "auth",
    "authorization",
    "bearer",
    "cookie",
    "credential",
    "credentials",
];

/// The last two letters of the names of [`SECRET_KEYS`] (a quick reject of other keys).
const SECRET_KEY_ENDINGS: [[u8; 2]; 11] = [
    *b"rd", *b"wd", *b"et", *b"ey", *b"en", *b"th", *b"on", *b"er", *b"ie", *b"al", *b"ls",
];

/// Names of [`SECRET_KEYS`] that also name what is no secret: a `token` of logprobs or of a
/// TGI stream (`{"token": "Hello"}`, `{"token": {"id": 4013, ...}}`), an `auth` settings
/// object, prose (`each token: a piece`). Their value is masked only when it is a string shaped
/// like a credential ([`credential_shaped`]), unless the name is one of
/// [`CREDENTIAL_NAMES`].
const SHAPE_CHECKED_KEYS: [&str; 2] = ["token", "auth"];

/// Names ending with one of [`SHAPE_CHECKED_KEYS`] whose value is a credential whatever its
/// shape (`access_token`, `x-auth-token`, `basic_auth`): masked as any other secret name.
const CREDENTIAL_NAMES: [&str; 14] = [
    "accesstoken",
    "refreshtoken",
    "idtoken",
    "apitoken",
    "authtoken",
    "bearertoken",
    "sessiontoken",
    "securitytoken",
    "secrettoken",
    "oauthtoken",
    "privatetoken",
    "csrftoken",
    "xsrftoken",
    "basicauth",
];

/// Names ending like a secret name that are not secrets: a tokenizer's special tokens
/// (`eos_token: "</s>"`), limits (`max_token`), pagination (`next_page_token`, `NextToken`)
/// and latency (`time_to_first_token`).
const NOT_SECRET_KEYS: [&str; 16] = [
    "eostoken",
    "bostoken",
    "padtoken",
    "unktoken",
    "septoken",
    "clstoken",
    "masktoken",
    "stoptoken",
    "maxtoken",
    "maxnewtoken",
    "pagetoken",
    "nexttoken",
    "prevtoken",
    "previoustoken",
    "continuationtoken",
    "firsttoken",
];

/// Authorization schemes written before a credential (`Authorization: Bearer <token>`): the
/// credential after one is the secret value, not the scheme's name.
const AUTH_SCHEMES: [&str; 7] = [
    "bearer",
    "basic",
    "token",
    "digest",
    "bot",
    "negotiate",
    "apikey",
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

/// One match: byte span, kind, and whether the replacement must be quoted (a JSON value that
/// is not a string).
struct Hit {
    start: usize,
    end: usize,
    kind: RedactKind,
    /// Quote the replacement with a `"` after this many backslashes: `Some(0)` for a value
    /// of the JSON document itself, `Some(1)` for one of JSON inside a JSON string, ...
    quote: Option<usize>,
    /// The span is the content of a JSON string whose opening quote the scanner skipped.
    enter_string: bool,
}

/// Where detectors whose scan runs over many possible starts may be tried again: a failed
/// candidate moves its detector's position past the run it scanned, so no byte is scanned by
/// it over and over (the scan stays linear in the input).
#[derive(Debug, Default)]
struct Skip {
    /// First byte at which a JWT may start.
    jwt: usize,
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
        if b.is_ascii_digit()
            || b.is_ascii_uppercase()
            || matches!(b, b'+' | b'(' | b'b' | b'd' | b'e')
        {
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
        // A payload that grew past the limit was cut again: not as JSON (Akto would drop it).
        super::record::settle_request_content_type(r);
    }

    /// Redact the values of a header object string, except structural headers.
    fn redact_headers(&self, headers: &str, counts: &mut RedactionCounts) -> Option<String> {
        // Fast path: nothing in the whole object matches, so no value can (a header named
        // like a secret is an `"api-key": "..."` assignment there).
        // The connector builds header objects with serde_json, so they are JSON: no validity
        // check (a JSON parse) before the scan. An object that is not JSON after all fails the
        // parse into a map below and is left as it is, as before.
        let mut probe = RedactionCounts::default();
        self.redact_in(headers, true, &mut probe)?;
        let mut map: std::collections::BTreeMap<String, String> =
            serde_json::from_str(headers).ok()?;
        let mut changed = false;
        for (k, v) in map.iter_mut() {
            if STRUCTURAL_HEADERS.contains(&k.as_str()) {
                continue;
            }
            // A header named like a secret (`x-databricks-metadata-api-key`) is masked whole.
            let secret = match secret_name(k.as_bytes()) {
                Some(SecretName::Any) => true,
                Some(SecretName::Shaped) => credential_shaped(v.as_bytes(), false),
                None => false,
            };
            if self.enabled(RedactKind::Password)
                && secret
                && !v.is_empty()
                && v != RedactKind::Password.replacement()
            {
                *v = RedactKind::Password.replacement().to_string();
                counts.bump(RedactKind::Password);
                changed = true;
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
        if !self.any_enabled() {
            return None;
        }
        self.redact_in(s, is_json(s), counts)
    }

    /// Is any kind enabled?
    fn any_enabled(&self) -> bool {
        self.on.iter().any(|b| *b)
    }

    /// [`Redactor::redact_text`]; `json`: `s` is scanned as a JSON document (a payload that
    /// [`is_json`], a header object), whose strings and structure are kept valid, else as
    /// plain text (a header value, a log line).
    fn redact_in(&self, s: &str, json: bool, counts: &mut RedactionCounts) -> Option<String> {
        self.redact_at(s, json, counts, 0)
    }

    /// [`Redactor::redact_in`] of a string found `depth` levels of `\u00XX`-escaped strings
    /// deep (see [`Redactor::redact_escaped_string`]).
    fn redact_at(
        &self,
        s: &str,
        json: bool,
        counts: &mut RedactionCounts,
        depth: usize,
    ) -> Option<String> {
        if !self.any_enabled() {
            return None;
        }
        let bytes = s.as_bytes();
        let mut skip = Skip::default();
        let mut out: Option<String> = None;
        let mut copied = 0usize; // bytes of `s` already handled in `out`
        let mut in_string = false;
        // The opening quote of the string the scan is in (when `in_string`).
        let mut str_start = 0usize;
        // Start of the current run without escapes or quotes: matches never reach before it.
        let mut seg = 0usize;
        // Bytes of `\u00XX`-escaped strings before this were decoded already.
        let mut decoded_to = 0usize;
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
                str_start = i;
                i += 1;
                seg = i;
                continue;
            }
            if b == b'\\' {
                // `\u0040` is an `@` written as an escape inside a JSON string.
                if json
                    && in_string
                    && self.enabled(RedactKind::Email)
                    && bytes[i..].starts_with(b"\\u0040")
                {
                    if let Some((start, end)) = email(bytes, i, 6, seg.max(copied)) {
                        let h = Hit {
                            start,
                            end,
                            kind: RedactKind::Email,
                            quote: None,
                            enter_string: false,
                        };
                        emit(&mut out, s, &mut copied, &h, counts);
                        i = end;
                        continue;
                    }
                }
                // A printable ASCII character written as `\u00XX` (.NET writes `"`, `+`, `'`,
                // `<`, `>` and `&` so): the string is looked at decoded.
                // Each byte is decoded once: a decode stops at an escape that does not decode
                // (a lone surrogate, an escape cut by the truncation marker) and the next one
                // starts after it, never again at the start of the string.
                if json
                    && in_string
                    && depth < MAX_ESCAPED_DEPTH
                    && escaped_byte(bytes, i).is_some_and(|c| (b' '..=b'~').contains(&c))
                {
                    let mut from = copied.max(str_start + 1).max(decoded_to);
                    loop {
                        let (stop, bad) = self.redact_escaped_string(
                            s,
                            from,
                            &mut out,
                            &mut copied,
                            counts,
                            depth,
                        );
                        decoded_to = stop + bad;
                        // Stopped before this escape: go on decoding after the bad one.
                        if stop > i || bad == 0 {
                            i = stop;
                            break;
                        }
                        from = decoded_to;
                    }
                    seg = i;
                    continue;
                }
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
                self.detect(s, i, lo, prev_word, json, in_string, &mut skip)
            };
            match hit {
                Some(h)
                    if h.start >= copied && h.end > h.start && s.get(h.start..h.end).is_some() =>
                {
                    emit(&mut out, s, &mut copied, &h, counts);
                    i = h.end;
                    if h.enter_string {
                        in_string = true;
                        str_start = h.start.saturating_sub(1);
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

    /// The rest of a JSON string, from `from` (inside its literal, not inside an escape) to its
    /// closing quote, decoded, redacted and escaped again (serde_json's way) when anything in it
    /// matched; left as written otherwise. The decode stops at an escape that does not decode
    /// (a lone surrogate such as `\ud800`, an escape cut by the truncation marker): the text
    /// before it is redacted all the same, as JSON when it is the start of a JSON document.
    /// Returns where the decode stopped (the closing quote, or the bad escape) and the length
    /// of the bad escape (0 at the closing quote).
    fn redact_escaped_string(
        &self,
        s: &str,
        from: usize,
        out: &mut Option<String>,
        copied: &mut usize,
        counts: &mut RedactionCounts,
        depth: usize,
    ) -> (usize, usize) {
        let end = string_end(s.as_bytes(), from);
        let (text, stop, bad) = decode_literal(s, from, end);
        let json = if bad == 0 {
            is_json(&text)
        } else {
            starts_json(&text)
        };
        let redacted = self.redact_at(&text, json, counts, depth + 1);
        if let Some(r) = redacted {
            let o = out.get_or_insert_with(|| String::with_capacity(s.len() + 32));
            o.push_str(s.get(*copied..from).unwrap_or(""));
            let mut escaped = String::with_capacity(r.len() + 2);
            write_json_str(&mut escaped, &r);
            o.push_str(&escaped[1..escaped.len() - 1]);
            *copied = stop;
        }
        (stop, bad)
    }

    /// The credential after `Bearer ` at `i` ([`bearer`]), unless it is a JWT, Databricks token
    /// or AWS key whose own detector is enabled (it is masked as its kind then).
    fn bearer(&self, bytes: &[u8], i: usize, in_json_string: bool) -> Option<(usize, usize)> {
        let (start, end) = bearer(bytes, i, in_json_string)?;
        self.token_end(bytes, start)
            .is_none()
            .then_some((start, end))
    }

    /// The end of the JWT, Databricks token or AWS key starting at `start`, if one of the enabled
    /// kinds does.
    fn token_end(&self, bytes: &[u8], start: usize) -> Option<usize> {
        if self.enabled(RedactKind::Jwt) && bytes[start..].starts_with(b"eyJ") {
            if let Ok(end) = jwt(bytes, start) {
                return Some(end);
            }
        }
        if self.enabled(RedactKind::DatabricksToken) {
            if let Some(end) = databricks_token(bytes, start) {
                return Some(end);
            }
        }
        if self.enabled(RedactKind::AwsKey) {
            return aws_key(bytes, start);
        }
        None
    }

    /// Try every detector that can start (or is anchored) at byte `i`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn detect(
        &self,
        s: &str,
        i: usize,
        lo: usize,
        prev_word: bool,
        json: bool,
        in_string: bool,
        skip: &mut Skip,
    ) -> Option<Hit> {
        let bytes = s.as_bytes();
        let b = bytes[i];
        let outside = json && !in_string;
        let hit = |start: usize, end: usize, kind: RedactKind| {
            Some(Hit {
                start,
                end,
                kind,
                quote: outside.then_some(0),
                enter_string: false,
            })
        };
        match b {
            b'@' if self.enabled(RedactKind::Email) => {
                let (start, end) = email(bytes, i, 1, lo)?;
                hit(start, end, RedactKind::Email)
            }
            b'0'..=b'9' | b'+' | b'(' if !prev_word && !after_joined_word(bytes, i, lo) => {
                // Replace a negative number whole: `-"[REDACTED:card]"` is not JSON.
                let start = if i > lo && bytes[i - 1] == b'-' {
                    i - 1
                } else {
                    i
                };
                // A number that is a member value of JSON inside this string (tool-call
                // arguments: `{\"start_ms\": 1700000000004}`) follows the rules of a bare one.
                let nested = if json && in_string && b.is_ascii_digit() {
                    nested_member_key(bytes, start).filter(|_| json_number_at(bytes, i))
                } else {
                    None
                };
                // An element of an array of numbers in JSON inside this string
                // (`{\"ids\": [1700000000004, 1700000000012]}`): an id or a time, like a bare
                // number outside any string.
                if nested.is_none()
                    && json
                    && in_string
                    && b.is_ascii_digit()
                    && nested_array_number(bytes, start, lo)
                    && json_number_at(bytes, i)
                {
                    return None;
                }
                if outside || nested.is_some() {
                    // A bare JSON number is a timestamp, an id or a count, not a card number,
                    // unless its key names a card (`"card_number": 4111111111111111`).
                    if self.enabled(RedactKind::Card) && b.is_ascii_digit() {
                        let end = card(bytes, i, false)?;
                        let (key, r) = match nested {
                            Some((key, r)) => (Some(key), r),
                            None => (member_key(bytes, start), 0),
                        };
                        if !key.is_some_and(names_card) {
                            return None;
                        }
                        return Some(Hit {
                            start,
                            end,
                            kind: RedactKind::Card,
                            quote: Some(r),
                            enter_string: false,
                        });
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
                        // A whole string value of an id or a time (`"span_id": "..."`,
                        // `"timestamp_ms": "..."`, also in JSON inside a string) is not a card
                        // number.
                        let id = in_string
                            && whole_string_value_key(bytes, i, end).is_some_and(names_id_or_time);
                        if !id {
                            return hit(i, end, RedactKind::Card);
                        }
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
                if b == b'B' && self.enabled(RedactKind::Password) {
                    if let Some((start, end)) = self.bearer(bytes, i, json && in_string) {
                        return hit(start, end, RedactKind::Password);
                    }
                }
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
            b'b' if !prev_word && self.enabled(RedactKind::Password) => {
                let (start, end) = self.bearer(bytes, i, json && in_string)?;
                hit(start, end, RedactKind::Password)
            }
            b'd' if !prev_word && self.enabled(RedactKind::DatabricksToken) => {
                let end = databricks_token(bytes, i)?;
                hit(i, end, RedactKind::DatabricksToken)
            }
            b'e' if !prev_word && i >= skip.jwt && self.enabled(RedactKind::Jwt) => {
                match jwt(bytes, i) {
                    Ok(end) => hit(i, end, RedactKind::Jwt),
                    Err(resume) => {
                        skip.jwt = resume;
                        None
                    }
                }
            }
            b'-' if self.enabled(RedactKind::PrivateKey) => {
                let end = private_key(bytes, i, json)?;
                hit(i, end, RedactKind::PrivateKey)
            }
            b':' | b'=' if self.enabled(RedactKind::Password) => {
                let (start, end, quote) = assignment(bytes, i, lo, json, in_string)?;
                // A value that is a whole JWT, Databricks or AWS token is left to the detector
                // of its kind (`token: eyJ...` is counted as a JWT).
                if quote.is_none() && self.token_end(bytes, start) == Some(end) {
                    return None;
                }
                Some(Hit {
                    start,
                    end,
                    kind: RedactKind::Password,
                    // A value that is not a string (`"password": 12345678`) is replaced by a
                    // string; a string value's content is replaced inside its quotes.
                    enter_string: outside && quote.is_none(),
                    quote,
                })
            }
            _ => None,
        }
    }
}

/// Append the text before `h` and `h`'s replacement to `out`; `copied` moves past `h`.
fn emit(
    out: &mut Option<String>,
    s: &str,
    copied: &mut usize,
    h: &Hit,
    counts: &mut RedactionCounts,
) {
    let o = out.get_or_insert_with(|| String::with_capacity(s.len() + 32));
    o.push_str(s.get(*copied..h.start).unwrap_or(""));
    match h.quote {
        Some(r) => {
            let q = |o: &mut String| {
                o.extend(std::iter::repeat_n('\\', r));
                o.push('"');
            };
            q(o);
            o.push_str(h.kind.replacement());
            q(o);
        }
        None => o.push_str(h.kind.replacement()),
    }
    counts.bump(h.kind);
    *copied = h.end;
}

/// The start of the marker `record::fit` appends to a cut string (equal to
/// `record::MARKER_PREFIX`, which a test checks).
const CUT_MARKER: &str = "...[truncated by databricks-shield: original ";

/// Does the truncation marker start at `j`? A token cut by it is masked although it is shorter
/// than a whole one.
fn at_marker(bytes: &[u8], j: usize) -> bool {
    bytes
        .get(j..)
        .is_some_and(|t| t.starts_with(CUT_MARKER.as_bytes()))
}

/// Is `s` scanned as JSON: it parses as JSON, or it is a JSON object, array or string cut by
/// the truncation marker (the text before the marker is a prefix of a JSON document)? Text that
/// merely starts like JSON (`[INFO] ...`, a Python `{'k': 'v'}`) is plain text, so its values
/// outside double quotes are still looked at.
///
/// At most one parse, and a full one only for text starting with `{`, `[` or `"`: a scalar
/// (`4111111111111111`, `true`) fails or ends within its first token, other text is not JSON
/// without parsing, and a cut document is parsed only up to the marker (no text ending with
/// the marker's ` bytes]` is whole JSON).
fn is_json(s: &str) -> bool {
    let parses = |t: &str| parse(t).is_ok();
    // Rust's whitespace includes JSON's (space, tab, CR, LF); with any other one before the
    // value the parse fails, as it would have anyway.
    match s.trim_start().as_bytes().first() {
        Some(b'{' | b'[' | b'"') => {}
        Some(b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => return parses(s),
        _ => return false,
    }
    match cut_body(s) {
        Some(body) => parse(body).is_err_and(|e| e.is_eof()),
        None => parses(s),
    }
}

/// Is `s` the start of a JSON object, array or string (the text decoded before an escape
/// that does not decode): it parses, or fails only for want of more text.
fn starts_json(s: &str) -> bool {
    match s.trim_start().as_bytes().first() {
        Some(b'{' | b'[' | b'"') => parse(s).map_or_else(|e| e.is_eof(), |_| true),
        _ => false,
    }
}

/// The literal of a JSON string, `s[from..end]` (no quotes), decoded up to `end` or to its
/// first escape that does not decode (a lone surrogate, an escape cut short): the text, where
/// the decode stopped, and the length of the escape it stopped at (0 when it reached `end`).
/// Linear; serde_json would refuse the whole literal for one such escape.
fn decode_literal(s: &str, from: usize, end: usize) -> (String, usize, usize) {
    #[cfg(test)]
    tests::DECODED.with(|c| c.set(c.get() + end.saturating_sub(from)));
    let bytes = s.as_bytes();
    let hex4 = |j: usize| -> Option<u32> {
        let h = bytes
            .get(j..j + 4)
            .filter(|h| j + 4 <= end && h.iter().all(u8::is_ascii_hexdigit))?;
        u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    let mut text = String::with_capacity(end.saturating_sub(from));
    let mut j = from;
    while j < end {
        let Some(k) = bytes[j..end].iter().position(|c| *c == b'\\') else {
            text.push_str(s.get(j..end).unwrap_or(""));
            break;
        };
        text.push_str(s.get(j..j + k).unwrap_or(""));
        j += k;
        let decoded = match bytes.get(j + 1).filter(|_| j + 1 < end) {
            Some(b'"') => Some(('"', 2)),
            Some(b'\\') => Some(('\\', 2)),
            Some(b'/') => Some(('/', 2)),
            Some(b'b') => Some(('\u{8}', 2)),
            Some(b'f') => Some(('\u{c}', 2)),
            Some(b'n') => Some(('\n', 2)),
            Some(b'r') => Some(('\r', 2)),
            Some(b't') => Some(('\t', 2)),
            Some(b'u') => match hex4(j + 2) {
                Some(hi @ 0xD800..=0xDBFF) => {
                    let lo = bytes
                        .get(j + 6..j + 8)
                        .filter(|e| *e == b"\\u")
                        .and_then(|_| hex4(j + 8))
                        .filter(|lo| (0xDC00..=0xDFFF).contains(lo));
                    lo.and_then(|lo| {
                        char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                    })
                    .map(|c| (c, 12))
                }
                Some(u) => char::from_u32(u).map(|c| (c, 6)),
                None => None,
            },
            _ => None,
        };
        match decoded {
            Some((c, len)) => {
                text.push(c);
                j += len;
            }
            None => {
                // Skip the bad escape: the backslash, its letter, and the hex digits after `u`.
                let mut len = 1 + usize::from(j + 1 < end);
                if bytes.get(j + 1) == Some(&b'u') {
                    len += bytes
                        .get(j + 2..end)
                        .unwrap_or(&[])
                        .iter()
                        .take(4)
                        .take_while(|c| c.is_ascii_hexdigit())
                        .count();
                }
                while j + len < end && !s.is_char_boundary(j + len) {
                    len += 1;
                }
                return (text, j, len);
            }
        }
    }
    (text, end, 0)
}

/// Parse `t` as JSON, keeping nothing.
fn parse(t: &str) -> serde_json::Result<serde::de::IgnoredAny> {
    #[cfg(test)]
    tests::JSON_PARSED.with(|c| c.set(c.get() + t.len()));
    serde_json::from_str(t)
}

/// The text before the truncation marker ending `s`, if `s` ends with one.
fn cut_body(s: &str) -> Option<&str> {
    let rest = s.strip_suffix(" bytes]")?;
    let at = rest.rfind(CUT_MARKER)?;
    rest[at + CUT_MARKER.len()..]
        .bytes()
        .all(|c| c.is_ascii_digit())
        .then(|| &s[..at])
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

/// An address around the `@` at `at` (`at_len` bytes: 1, or 6 for `\u0040` in JSON).
fn email(bytes: &[u8], at: usize, at_len: usize, lo: usize) -> Option<(usize, usize)> {
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
    let d0 = at + at_len;
    let mut end = d0;
    while end < bytes.len()
        && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'.' || bytes[end] == b'-')
    {
        end += 1;
    }
    while end > d0 && matches!(bytes[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let domain = &bytes[d0..end];
    let dot = domain.iter().rposition(|c| *c == b'.')?;
    // The top-level domain is the letters starting the last label (`com` of `com4111`).
    let tld = domain[dot + 1..]
        .iter()
        .take_while(|c| c.is_ascii_alphabetic())
        .count();
    if dot == 0 || tld < 2 {
        return None;
    }
    Some((start, d0 + dot + 1 + tld))
}

/// The key of the JSON object member whose value starts at `v` (`"key": <value>`), if any
/// (not a key with escapes, nor one longer than [`MAX_KEY`]).
fn member_key(bytes: &[u8], v: usize) -> Option<&[u8]> {
    let mut j = v;
    while j > 0 && bytes[j - 1].is_ascii_whitespace() {
        j -= 1;
    }
    if j == 0 || bytes[j - 1] != b':' {
        return None;
    }
    j -= 1;
    while j > 0 && bytes[j - 1].is_ascii_whitespace() {
        j -= 1;
    }
    if j == 0 || bytes[j - 1] != b'"' {
        return None;
    }
    let end = j - 1;
    let floor = end.saturating_sub(MAX_KEY + 1);
    let open = bytes[floor..end].iter().rposition(|c| *c == b'"')? + floor;
    let key = &bytes[open + 1..end];
    (!key.contains(&b'\\')).then_some(key)
}

/// The key of the member of JSON inside a JSON string whose value starts at `v`
/// (`\"key\": <value>`, or deeper with more backslashes), and the number of backslashes
/// before each of its quotes (odd). `None` when `v` is no such value.
fn nested_member_key(bytes: &[u8], v: usize) -> Option<(&[u8], usize)> {
    let mut j = v;
    while j > 0 && bytes[j - 1] == b' ' {
        j -= 1;
    }
    if j == 0 || bytes[j - 1] != b':' {
        return None;
    }
    j -= 1;
    while j > 0 && bytes[j - 1] == b' ' {
        j -= 1;
    }
    if j == 0 || bytes[j - 1] != b'"' {
        return None;
    }
    let r = backslashes_before(bytes, j - 1, 0);
    if r.is_multiple_of(2) {
        return None;
    }
    let end = j - 1 - r;
    let floor = end.saturating_sub(MAX_KEY + 1);
    let open = bytes[floor..end].iter().rposition(|c| *c == b'"')? + floor;
    let key = &bytes[open + 1..end];
    let opened = open >= r && bytes[open - r..open].iter().all(|c| *c == b'\\');
    (opened && !key.contains(&b'\\')).then_some((key, r))
}

/// Does a JSON number start at `i` (digits, an optional fraction and exponent) and end where
/// a JSON value may (before `,`, `}`, `]`, an escape such as `\n`, or the end, spaces
/// between)? `123-45-6789` or `555 123 4567` after a key in text is not one.
fn json_number_at(bytes: &[u8], i: usize) -> bool {
    let mut j = i;
    let digits = |j: &mut usize| {
        let n = bytes[*j..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        *j += n;
        n
    };
    if digits(&mut j) == 0 {
        return false;
    }
    if bytes.get(j) == Some(&b'.') {
        j += 1;
        if digits(&mut j) == 0 {
            return false;
        }
    }
    if matches!(bytes.get(j), Some(b'e' | b'E')) {
        j += 1;
        if matches!(bytes.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if digits(&mut j) == 0 {
            return false;
        }
    }
    while bytes.get(j) == Some(&b' ') {
        j += 1;
    }
    matches!(bytes.get(j), None | Some(b',' | b'}' | b']' | b'\\'))
}

/// Whether the number at `start` stands where an element of a JSON array of numbers does: right
/// after `[`, or after a `,` that follows a number or an array (`[1, 2]`, `[[1], 2]`), and is
/// followed by `,` or `]`. A number in prose (`card 4111..., exp 12/29`) is not: the comma there
/// follows a word. Not before `lo` (text already replaced).
fn nested_array_number(bytes: &[u8], start: usize, lo: usize) -> bool {
    let back = |mut j: usize| {
        while j > lo && bytes[j - 1] == b' ' {
            j -= 1;
        }
        j
    };
    let j = back(start);
    let opens = match j.checked_sub(1).filter(|&k| k >= lo).map(|k| bytes[k]) {
        Some(b'[') => true,
        Some(b',') => {
            let k = back(j - 1);
            k > lo && (bytes[k - 1].is_ascii_digit() || bytes[k - 1] == b']')
        }
        _ => false,
    };
    if !opens {
        return false;
    }
    let mut e = start + usize::from(bytes.get(start) == Some(&b'-'));
    while e < bytes.len()
        && (bytes[e].is_ascii_digit() || matches!(bytes[e], b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        e += 1;
    }
    while e < bytes.len() && bytes[e] == b' ' {
        e += 1;
    }
    matches!(bytes.get(e), Some(b',' | b']'))
}

/// The key of the member whose whole string value is `bytes[start..end]` (`"key": "value"`, or
/// `\"key\": \"value\"` in JSON inside a string, at any depth), if it is one.
fn whole_string_value_key(bytes: &[u8], start: usize, end: usize) -> Option<&[u8]> {
    if start == 0 || bytes[start - 1] != b'"' {
        return None;
    }
    // An even run before the quote is escaped backslashes: the quote is a plain one.
    let r = match backslashes_before(bytes, start - 1, 0) {
        r if r.is_multiple_of(2) => 0,
        r => r,
    };
    let close = bytes.get(end..end + r + 1)?;
    if close[r] != b'"' || close[..r].iter().any(|c| *c != b'\\') {
        return None;
    }
    if r == 0 {
        member_key(bytes, start - 1)
    } else {
        nested_member_key(bytes, start - 1 - r)
            .filter(|(_, kr)| *kr == r)
            .map(|(k, _)| k)
    }
}

/// The tokens of a key: split at every byte that is not an ASCII letter
/// or digit (`_`, `-`, `.`, spaces, ...) and at camelCase boundaries (`cardNumber` → `card`,
/// `Number`; `spanID` → `span`, `ID`; `HTTPServer` → `HTTP`, `Server`); compared without
/// case.
fn key_tokens(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    let sep = |c: u8| !c.is_ascii_alphanumeric();
    // An uppercase letter after a lowercase letter or a digit, or the last capital of an
    // acronym followed by a lowercase letter, starts a token.
    let camel = move |j: usize| {
        let (p, c) = (key[j - 1], key[j]);
        c.is_ascii_uppercase()
            && (p.is_ascii_lowercase()
                || p.is_ascii_digit()
                || (p.is_ascii_uppercase() && key.get(j + 1).is_some_and(u8::is_ascii_lowercase)))
    };
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        while pos < key.len() && sep(key[pos]) {
            pos += 1;
        }
        if pos >= key.len() {
            return None;
        }
        let start = pos;
        pos += 1;
        while pos < key.len() && !sep(key[pos]) && !camel(pos) {
            pos += 1;
        }
        Some(&key[start..pos])
    })
}

/// Tokens (see [`key_tokens`]) that name a card number.
const CARD_TOKENS: [&str; 6] = [
    "card",
    "cc",
    "pan",
    "cardnumber",
    "creditcard",
    "creditcardnumber",
];

/// A key naming a card number: one of its tokens is `card`, `cc`, `pan`, `cardnumber`,
/// `creditcard` or `creditcardnumber` (`card`, `cardNumber`, `credit_card_no`, `cc-num`), not
/// a word that merely contains `card` (`discard`, `cardinality`).
fn names_card(key: &[u8]) -> bool {
    key_tokens(key).any(|t| {
        CARD_TOKENS
            .iter()
            .any(|c| t.eq_ignore_ascii_case(c.as_bytes()))
    })
}

/// Last tokens (see [`key_tokens`]) of a key naming an id or a time.
const ID_TIME_TOKENS: [&str; 11] = [
    "id",
    "ids",
    "ms",
    "ns",
    "us",
    "ts",
    "time",
    "timestamp",
    "nano",
    "nanos",
    "epoch",
];

/// A key naming an id or a time: its last token is one of [`ID_TIME_TOKENS`] (`span_id`,
/// `spanId`, `timestamp_ms`, `startTimeUnixNano`, `id`), not a word that merely ends like one
/// (`paid`, `valid`, `prepaid`).
fn names_id_or_time(key: &[u8]) -> bool {
    key_tokens(key).last().is_some_and(|t| {
        ID_TIME_TOKENS
            .iter()
            .any(|w| t.eq_ignore_ascii_case(w.as_bytes()))
    })
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
    // Start of each group and the separator after it.
    let mut starts = [0usize; 8];
    let mut seps = [0u8; 8];
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
        starts[ng] = g0;
        ng += 1;
        digits += g;
        end = j;
        match bytes.get(j) {
            Some(&c @ (b' ' | b'-' | b'.'))
                if bytes
                    .get(j + 1)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'(') =>
            {
                seps[ng - 1] = c;
                j += 1;
            }
            Some(b'-') if paren && bytes.get(j + 1) == Some(&b' ') => {
                seps[ng - 1] = b'-';
                j += 2;
            }
            _ => break,
        }
    }
    let groups = &groups[..ng];
    if !ends_token(bytes, end) || digits > 15 {
        return None;
    }
    // A date (`2024-01-15 10:30`, `15.01.2024 10:30`) or an IPv4 address is not a phone.
    let same_sep =
        |n: usize, set: &[u8]| (0..n).all(|k| seps[k] == seps[0] && set.contains(&seps[k]));
    if !plus && ng >= 3 && same_sep(2, b"-.") {
        let year = |k: usize| matches!(&bytes[starts[k]..starts[k] + 2], b"19" | b"20");
        if groups[..3] == [4, 2, 2] || (groups[..3] == [2, 2, 4] && year(2)) {
            return None;
        }
    }
    if !plus && ng >= 4 && same_sep(3, b".") && groups[..4].iter().all(|g| *g <= 3) {
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
    // Mod-97 of the characters after the first four, kept as they are read; the check moves
    // the first four to the end (letters as 10..35).
    let fold = |rem: u32, c: u8| {
        if c.is_ascii_digit() {
            (rem * 10 + u32::from(c - b'0')) % 97
        } else {
            (rem * 100 + u32::from(c - b'A') + 10) % 97
        }
    };
    let valid = |rem: u32| head.iter().fold(rem, |r, c| fold(r, *c)) == 1;
    let mut rem = 0u32;
    let mut n = 4usize;
    let mut j = i + 4;
    // The longest valid IBAN ending at a group boundary (`IBAN ES91 ... 1332 EUR 500`: the
    // word after the last group is not part of it).
    let mut best = None;
    while j < bytes.len() && n < 34 {
        let c = bytes[j];
        if c.is_ascii_uppercase() || c.is_ascii_digit() {
            rem = fold(rem, c);
            n += 1;
            j += 1;
        } else if c == b' '
            && n.is_multiple_of(4)
            && bytes
                .get(j + 1)
                .is_some_and(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        {
            if n >= 15 && valid(rem) {
                best = Some(j);
            }
            j += 1;
        } else {
            break;
        }
    }
    if n >= 15 && ends_token(bytes, j) && valid(rem) {
        return Some(j);
    }
    best
}

/// `AKIA` (or `ASIA`, `ABIA`, `ACCA`) and 16 uppercase letters or digits; fewer when the
/// truncation marker cuts it.
fn aws_key(bytes: &[u8], i: usize) -> Option<usize> {
    let t = bytes.get(i..i + 4)?;
    if ![b"AKIA", b"ASIA", b"ABIA", b"ACCA"].iter().any(|p| t == *p) {
        return None;
    }
    let body = bytes[i + 4..]
        .iter()
        .take(16)
        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        .count();
    let end = i + 4 + body;
    let whole = body == 16 && ends_token(bytes, end);
    (whole || (body > 0 && at_marker(bytes, end))).then_some(end)
}

/// The credential of `Bearer <credential>` (at least 20 token characters, fewer when the
/// truncation marker cuts it), wherever it is written (`curl -H "Authorization: Bearer ..."`
/// in a prompt, a log line; inside a JSON string (`in_json_string`) `\/` is part of it).
/// [`Redactor::bearer`] leaves a token of a kind with its own detector to that one.
fn bearer(bytes: &[u8], i: usize, in_json_string: bool) -> Option<(usize, usize)> {
    // The scheme is case-insensitive (RFC 9110): `Bearer`, `bearer`, `BEARER`.
    if !bytes.get(i..i + 7)?.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let start = i + 7 + bytes[i + 7..].iter().take_while(|c| **c == b' ').count();
    let token = |c: &u8| c.is_ascii_alphanumeric() || b"-._~+/=".contains(c);
    let mut end = start;
    loop {
        match bytes.get(end) {
            Some(c) if token(c) => end += 1,
            // Inside a JSON string `\/` is a `/` (PHP, Go's encoders write it so).
            Some(b'\\') if in_json_string && bytes.get(end + 1) == Some(&b'/') => end += 2,
            _ => break,
        }
    }
    // `.` ending a sentence (or starting the marker) is not part of the credential.
    while end > start && bytes[end - 1] == b'.' {
        end -= 1;
    }
    let long = end - start >= 20 && ends_token(bytes, end);
    if !(long || (end > start && at_marker(bytes, end))) {
        return None;
    }
    Some((start, end))
}

/// `dapi`, 32 lowercase hex digits and an optional `-<digits>` suffix; fewer digits when the
/// truncation marker cuts it.
fn databricks_token(bytes: &[u8], i: usize) -> Option<usize> {
    if !bytes.get(i..)?.starts_with(b"dapi") {
        return None;
    }
    let hex = bytes[i + 4..]
        .iter()
        .take(32)
        .take_while(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(*c))
        .count();
    let mut end = i + 4 + hex;
    if hex < 32 {
        return (hex > 0 && at_marker(bytes, end)).then_some(end);
    }
    if bytes.get(end) == Some(&b'-') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit) {
        end += 1;
        while end < bytes.len() && bytes[end].is_ascii_digit() {
            end += 1;
        }
    }
    ends_token(bytes, end).then_some(end)
}

/// `eyJ<header>.eyJ<payload>.<signature>` in base64url, or a token cut by the truncation
/// marker after its header. `Err(resume)` when none starts at `i`: no token starts before
/// `resume` either (every start inside the scanned header run ends at the same failure), so
/// the caller does not try again inside the run; that keeps the scan linear on input like
/// `eyJ-eyJ-eyJ-...`.
fn jwt(bytes: &[u8], i: usize) -> Result<usize, usize> {
    let b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    let mut j = i;
    // A later start can only succeed at or after the start of the part that failed.
    let mut resume = i + 1;
    for part in 0..3 {
        let p0 = j;
        if part < 2 && !bytes[j..].starts_with(b"eyJ") {
            return if part == 1 && at_marker(bytes, j) {
                Ok(j)
            } else {
                Err(resume.max(j))
            };
        }
        while j < bytes.len() && b64(bytes[j]) {
            j += 1;
        }
        #[cfg(test)]
        tests::JWT_SCANNED.with(|c| c.set(c.get() + (j - p0)));
        if part < 2 {
            if part == 1 && at_marker(bytes, j) {
                return Ok(j);
            }
            if j - p0 < 8 || bytes.get(j) != Some(&b'.') {
                return Err(if part == 0 { j } else { p0 });
            }
            j += 1;
            resume = j;
        }
    }
    // The signature run ends at a byte that is not base64url: the end of the token, also
    // when that byte is a `.` ending a sentence or starting the truncation marker.
    Ok(j)
}

/// `-----BEGIN ... PRIVATE KEY-----` (PEM) or `-----BEGIN PGP PRIVATE KEY BLOCK-----` through
/// the matching END line, or to the end of the string when the block is cut. In JSON the block
/// never crosses an unescaped quote.
fn private_key(bytes: &[u8], i: usize, json: bool) -> Option<usize> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const TAILS: [&[u8]; 2] = [b"PRIVATE KEY-----", b"PRIVATE KEY BLOCK-----"];
    if !bytes.get(i..)?.starts_with(BEGIN) {
        return None;
    }
    // The header line is short: look no further than 80 bytes for its end.
    let header = &bytes[..bytes.len().min(i + 80)];
    let line_end = find(header, i + BEGIN.len(), b"-----")? + 5;
    if line_end - i > 80 {
        return None;
    }
    let tail = *TAILS.iter().find(|t| bytes[..line_end].ends_with(t))?;
    // Where the enclosing string (or text) ends.
    let limit = if json {
        string_end(bytes, line_end)
    } else {
        bytes.len()
    };
    let end = match find(&bytes[..limit], line_end, b"-----END ") {
        Some(e) => match find(&bytes[..limit], e + 9, tail) {
            Some(t) => t + tail.len(),
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

/// How the value of a secret name is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecretName {
    /// Any value (`password`, `api_key`, `access_token`, `authorization`, `cookie`).
    Any,
    /// A string value shaped like a credential only (`token`, `auth`: see
    /// [`SHAPE_CHECKED_KEYS`]).
    Shaped,
}

/// Does `key` name a secret, and how is its value masked? Compared without case and without
/// `_`, `-` and `.`, so `client_secret`, `clientSecret`, `SecretAccessKey` and
/// `x-databricks-metadata-api-key` all end with a name of [`SECRET_KEYS`].
fn secret_name(key: &[u8]) -> Option<SecretName> {
    if key.len() > MAX_KEY {
        return None;
    }
    // Quick reject (this runs at every `:` and `=`): every name of SECRET_KEYS ends with one
    // of these pairs of letters (`role`, `type`, `name`, `messages` do not).
    let mut tail = key
        .iter()
        .rev()
        .filter(|c| !matches!(c, b'_' | b'-' | b'.'))
        .map(u8::to_ascii_lowercase);
    let (Some(last), Some(before)) = (tail.next(), tail.next()) else {
        return None;
    };
    if !SECRET_KEY_ENDINGS.contains(&[before, last]) {
        return None;
    }
    let mut buf = [0u8; MAX_KEY];
    let mut n = 0usize;
    for &c in key {
        if !matches!(c, b'_' | b'-' | b'.') {
            buf[n] = c.to_ascii_lowercase();
            n += 1;
        }
    }
    let key = &buf[..n];
    let ends = |names: &[&str]| names.iter().any(|k| key.ends_with(k.as_bytes()));
    if ends(&NOT_SECRET_KEYS) {
        return None;
    }
    let any = SECRET_KEYS
        .iter()
        .filter(|k| !SHAPE_CHECKED_KEYS.contains(k))
        .any(|k| key.ends_with(k.as_bytes()));
    if any || ends(&CREDENTIAL_NAMES) {
        Some(SecretName::Any)
    } else if ends(&SHAPE_CHECKED_KEYS) {
        Some(SecretName::Shaped)
    } else {
        None
    }
}

/// Fewest bytes of a credential under a name of [`SHAPE_CHECKED_KEYS`].
const MIN_CREDENTIAL: usize = 16;

/// Is the value `v` (as written; `\/` is a `/`) shaped like a credential: at least
/// [`MIN_CREDENTIAL`] bytes of letters, digits and `-._~+/=:%` (no spaces, no brackets), and
/// not a plain word (it has a digit, or both upper- and lowercase letters)? A value `cut` by
/// the truncation marker (or running into it) is one when it is such bytes, however short.
fn credential_shaped(v: &[u8], cut: bool) -> bool {
    let (mut digit, mut upper, mut lower) = (false, false, false);
    let mut j = 0usize;
    while j < v.len() {
        match v[j] {
            b'0'..=b'9' => digit = true,
            b'A'..=b'Z' => upper = true,
            b'a'..=b'z' => lower = true,
            b'.' if at_marker(v, j) => return j > 0,
            b'-' | b'_' | b'.' | b'~' | b'+' | b'/' | b'=' | b':' | b'%' => {}
            b'\\' if v.get(j + 1) == Some(&b'/') => j += 1,
            _ => return false,
        }
        j += 1;
    }
    if cut {
        return !v.is_empty();
    }
    v.len() >= MIN_CREDENTIAL && (digit || (upper && lower))
}

/// Longest key looked at.
const MAX_KEY: usize = 64;

/// How many levels of strings within strings written with `\u00XX` escapes are decoded.
const MAX_ESCAPED_DEPTH: usize = 3;

/// Number of `\` directly before `bytes[end]`, not looking before `floor`.
fn backslashes_before(bytes: &[u8], end: usize, floor: usize) -> usize {
    bytes[floor..end]
        .iter()
        .rev()
        .take_while(|c| **c == b'\\')
        .count()
}

/// The level of a `"` after a run of `run` backslashes: how many of them escape the quote
/// itself (0 for a bare quote, 1 in JSON inside a JSON string, then 3, 7, ...). The others are
/// escaped backslashes ending the string content before it: a run is `q + 2k(q + 1)` for `k`
/// backslashes in the content of a string closed by a quote of level `q` (`"x\\"` in JSON
/// inside a string is written `\"x\\\\\"`, five), so `q + 1` is the largest power of two
/// dividing `run + 1`.
fn quote_level(run: usize) -> usize {
    let n = run.saturating_add(1);
    (n & n.wrapping_neg()) - 1
}

/// The end of a value quoted by `q` backslashes and a `"` (JSON-encoded JSON, `q` = 1, 3, 7 for
/// one, two, three levels; see [`quote_level`]): the next quote of the same level, after the
/// escaped backslashes ending the value (`\"x\\\\\"` is the value `x\`: five backslashes).
/// A quote of a deeper level is a quote escaped inside the value; one of a shallower level (or
/// a bare `"`) ends an enclosing string or is not JSON at this depth, and then there is no
/// value. Stopping there keeps the scan near-linear: a scan for `q` only passes quotes of
/// deeper levels, so a byte is passed by at most one scan per level (`pwd:\"x pwd:\\"x
/// pwd:\\\"x ...` scanned the rest of the text from every `pwd:`).
fn nested_value_end(bytes: &[u8], start: usize, q: usize) -> Option<usize> {
    let q = quote_level(q);
    if q == 0 {
        return None;
    }
    let mut j = start;
    while j < bytes.len() {
        #[cfg(test)]
        tests::NESTED_SCANNED.with(|c| c.set(c.get() + 1));
        match bytes[j] {
            b'"' => return None,
            b'\\' => {
                let run = bytes[j..].iter().take_while(|c| **c == b'\\').count();
                #[cfg(test)]
                tests::NESTED_SCANNED.with(|c| c.set(c.get() + run));
                if bytes.get(j + run) == Some(&b'"') {
                    let level = quote_level(run);
                    if level == q {
                        // The escaped backslashes before the quote end the value.
                        return Some(j + run - q);
                    }
                    if level < q {
                        return None;
                    }
                    j += run + 1;
                } else {
                    j += run;
                }
            }
            _ => j += 1,
        }
    }
    None
}

/// An assignment whose key names a secret, anchored at its `:` or `=` at `op`; returns the
/// span of the value, and for a JSON value that is not a string (`"password": 12345678`,
/// `"password": ["a"]`), how its replacement is quoted (see [`Hit::quote`]). Forms:
/// `key=value`, `key: value`, `"key": "value"`, `'key': 'value'`, `key='value'` (also inside a
/// JSON string), `Authorization: Bearer <credential>`, and the same with escaped quotes inside
/// JSON strings, at any depth (`{\"key\":\"value\"}`, `{\\\"key\\\":\\\"value\\\"}`).
fn assignment(
    bytes: &[u8],
    op: usize,
    lo: usize,
    json: bool,
    in_string: bool,
) -> Option<(usize, usize, Option<usize>)> {
    let key_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.';
    // Look back over spaces to the key (possibly quoted).
    let mut k_end = op;
    while k_end > 0 && bytes[k_end - 1] == b' ' {
        k_end -= 1;
    }
    // Quote around the key: None for a bare key, else the number of backslashes before its
    // closing `"` (0 in JSON, 1 in JSON inside a JSON string, ...), or 0 for a `'`.
    let mut key_quote: Option<usize> = None;
    if k_end > 0 && matches!(bytes[k_end - 1], b'"' | b'\'') {
        let r = if bytes[k_end - 1] == b'"' {
            backslashes_before(bytes, k_end - 1, 0)
        } else {
            0
        };
        key_quote = Some(r);
        k_end -= 1 + r;
    }
    // The key of a quoted style ends at its opening quote; a bare key must not reach back
    // into an escape sequence (`\\npassword`).
    let floor = if key_quote.is_none() { lo } else { 0 };
    let floor = floor.max(k_end.saturating_sub(MAX_KEY + 1));
    let mut k_start = k_end;
    while k_start > floor && key_char(bytes[k_start - 1]) {
        k_start -= 1;
    }
    if k_start == k_end {
        return None;
    }
    let shaped = secret_name(&bytes[k_start..k_end])? == SecretName::Shaped;
    // Forward to the value.
    let mut v = op + 1;
    while v < bytes.len() && bytes[v] == b' ' {
        v += 1;
    }
    let escaped_quote = bytes[v.min(bytes.len())..]
        .iter()
        .take_while(|c| **c == b'\\')
        .count();
    let opens_value = |c: Option<&u8>| matches!(c, Some(b'0'..=b'9' | b'-' | b'[' | b'{'));
    // `true`, `false` and `null` of a quoted key (JSON, also inside a string) hide nothing and
    // stay as they are: a mask without quotes would break JSON inside a string.
    if key_quote.is_some() && json_literal_at(bytes, v) {
        return None;
    }
    let (start, end) = if json && !in_string {
        // `"key": "value"` in JSON: the value is a whole string; a number, an array or an
        // object is replaced whole by the (quoted) mask.
        if key_quote != Some(0) {
            return None;
        }
        if opens_value(bytes.get(v)) {
            // A `token` object or number (TGI's `{"id": 4013, ...}`) is no credential.
            if shaped {
                return None;
            }
            let end = json_value_end(bytes, v);
            return (end > v).then_some((v, end, Some(0)));
        }
        if bytes.get(v) != Some(&b'"') {
            return None;
        }
        let start = v + 1;
        // A string cut by the truncation marker is masked up to the marker, which stays.
        let end = match string_end(bytes, start) {
            end if end == bytes.len() => cut_marker_start(bytes)
                .filter(|m| *m > start)
                .unwrap_or(end),
            end => end,
        };
        (start, end)
    } else if let (true, Some(r)) = (in_string && opens_value(bytes.get(v)), key_quote) {
        // `\"key\": 12345678` in JSON inside a JSON string: replaced whole, quoted as the key.
        if r.is_multiple_of(2) || shaped {
            return None;
        }
        let end = nested_json_value_end(bytes, v, r);
        return (end > v).then_some((v, end, Some(r)));
    } else if escaped_quote > 0 && bytes.get(v + escaped_quote) == Some(&b'"') {
        // `\"key\":\"value\"` inside a JSON string (or deeper).
        let start = v + escaped_quote + 1;
        (start, nested_value_end(bytes, start, escaped_quote)?)
    } else if bytes.get(v) == Some(&b'\'') || (!in_string && bytes.get(v) == Some(&b'"')) {
        // Quoted value in plain text, or `'value'` inside a JSON string (up to the end of the
        // string when the closing `'` is missing).
        let q = bytes[v];
        let start = v + 1;
        let end = if json {
            // Stop at the first `'` or at the end of the string, whichever comes first (not
            // looking for the end first: that would rescan the rest of a long string from
            // every `password='` in it).
            let mut j = start;
            while j < bytes.len() && bytes[j] != q && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            j.min(bytes.len())
        } else {
            bytes[start..]
                .iter()
                .position(|c| *c == q)
                .map(|p| p + start)?
        };
        (start, end)
    } else {
        let end = bare_value_end(bytes, v, json && in_string);
        // `Authorization: Bearer <credential>`: the credential is the value.
        let scheme = &bytes[v..end];
        let after = end + bytes[end..].iter().take_while(|c| **c == b' ').count();
        if after > end
            && AUTH_SCHEMES
                .iter()
                .any(|s| scheme.eq_ignore_ascii_case(s.as_bytes()))
        {
            let credential_end = bare_value_end(bytes, after, json && in_string);
            if credential_end > after {
                let credential = &bytes[after..credential_end];
                let masked = credential.starts_with(b"[REDACTED:")
                    || (shaped && !credential_shaped(credential, at_marker(bytes, credential_end)));
                return (!masked).then_some((after, credential_end, None));
            }
        }
        (v, end)
    };
    if end <= start
        || bytes[start..end].starts_with(b"[REDACTED:")
        || (shaped && !credential_shaped(&bytes[start..end], at_marker(bytes, end)))
    {
        return None;
    }
    Some((start, end, None))
}

/// Does the JSON literal `true`, `false` or `null` start at `v` (and end there as a token)?
fn json_literal_at(bytes: &[u8], v: usize) -> bool {
    let rest = bytes.get(v..).unwrap_or(&[]);
    [&b"true"[..], b"false", b"null"]
        .iter()
        .any(|w| rest.starts_with(w) && ends_token(bytes, v + w.len()))
}

/// The end of an unquoted assignment value starting at `v`: the first byte that [`ends_value`],
/// `-----BEGIN ` or the truncation marker. Inside a JSON string (`in_json_string`) an escape is
/// part of the value (`wJalrXUtnFEMI\/K7MDENG`) unless it stands for a byte that ends it (`\"`,
/// `\n`, `\t`, `\u0022`, ...): the value is not cut short at its first escaped `/`.
fn bare_value_end(bytes: &[u8], v: usize, in_json_string: bool) -> usize {
    let mut j = v;
    while j < bytes.len() && !bytes[j..].starts_with(b"-----BEGIN ") {
        let c = bytes[j];
        // The truncation marker is not part of the value: it stays whole.
        if c == b'.' && at_marker(bytes, j) {
            break;
        }
        if c == b'\\' && in_json_string {
            let (stands_for, len) = match bytes.get(j + 1) {
                Some(b'u') => (escaped_byte(bytes, j), 6),
                Some(b'n') => (Some(b'\n'), 2),
                Some(b'r') => (Some(b'\r'), 2),
                Some(b't') => (Some(b'\t'), 2),
                Some(&e) => (Some(e).filter(|e| *e != b'\\'), 2),
                None => break,
            };
            // An escape cut by the end of the text is not part of the value either.
            if stands_for.is_some_and(ends_value) || j + len > bytes.len() {
                break;
            }
            j += len;
            continue;
        }
        if ends_value(c) {
            break;
        }
        j += 1;
    }
    j
}

/// The ASCII byte a `\u00XX` escape at `j` stands for (`None` for another escape or a
/// non-ASCII character).
fn escaped_byte(bytes: &[u8], j: usize) -> Option<u8> {
    let e = bytes.get(j..j + 6)?;
    if !e.starts_with(b"\\u00") {
        return None;
    }
    let hex = std::str::from_utf8(&e[4..6]).ok()?;
    u8::from_str_radix(hex, 16).ok().filter(u8::is_ascii)
}

/// The end of the JSON number, array or object starting at `v` in a JSON document (strings in
/// it skipped whole); the end of the text when it is cut before the value closes (the mask then
/// stops at the truncation marker).
fn json_value_end(bytes: &[u8], v: usize) -> usize {
    if bytes[v] != b'[' && bytes[v] != b'{' {
        let n = bytes[v..]
            .iter()
            .take_while(|c| c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E'))
            .count();
        return v + n;
    }
    let mut depth = 0usize;
    let mut j = v;
    while j < bytes.len() {
        match bytes[j] {
            b'"' => {
                j = string_end(bytes, j + 1);
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    cut_marker_start(bytes)
        .filter(|m| *m > v)
        .unwrap_or(bytes.len())
}

/// Where the truncation marker ending `bytes` starts, if it ends with one.
fn cut_marker_start(bytes: &[u8]) -> Option<usize> {
    let rest = bytes.strip_suffix(b" bytes]")?;
    let at = find_last(rest, CUT_MARKER.as_bytes())?;
    rest[at + CUT_MARKER.len()..]
        .iter()
        .all(u8::is_ascii_digit)
        .then_some(at)
}

/// Index of the last occurrence of `needle` in `hay`.
fn find_last(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

/// [`json_value_end`] for a value of JSON inside a JSON string, whose quotes are preceded by
/// `r` backslashes (odd; a quote's level is read as [`quote_level`] says, so a string ending in
/// escaped backslashes closes). A value that does not close before its enclosing string does
/// (a bare `"` or a quote of a shallower level) ends there: the rest of that string is masked.
fn nested_json_value_end(bytes: &[u8], v: usize, r: usize) -> usize {
    let r = quote_level(r);
    if bytes[v] != b'[' && bytes[v] != b'{' {
        let n = bytes[v..]
            .iter()
            .take_while(|c| c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E'))
            .count();
        return v + n;
    }
    let mut depth = 0usize;
    let mut in_str = false;
    let mut j = v;
    while j < bytes.len() {
        match bytes[j] {
            b'\\' => {
                let run = bytes[j..].iter().take_while(|c| **c == b'\\').count();
                if bytes.get(j + run) == Some(&b'"') {
                    // Escaped backslashes may end a string before its quote (see
                    // [`quote_level`]).
                    let level = quote_level(run);
                    if level < r {
                        return j;
                    }
                    if level == r {
                        in_str = !in_str;
                    }
                    j += run + 1;
                } else {
                    j += run;
                }
                continue;
            }
            b'"' => return j,
            b'[' | b'{' if !in_str => depth += 1,
            b']' | b'}' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    cut_marker_start(bytes)
        .filter(|m| *m > v)
        .unwrap_or(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Bytes the JWT detector scanned on this thread.
        pub(super) static JWT_SCANNED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        /// Steps `nested_value_end` took on this thread.
        pub(super) static NESTED_SCANNED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        /// Bytes of `\u00XX`-escaped strings decoded on this thread.
        pub(super) static DECODED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        /// Bytes handed to the JSON validity check on this thread.
        pub(super) static JSON_PARSED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Does `key` name a secret (whatever the shape of its value)?
    fn is_secret_key(key: &[u8]) -> bool {
        secret_name(key).is_some()
    }

    /// Redact with all kinds; the output (the input when nothing matched).
    fn red(input: &str) -> String {
        let mut counts = RedactionCounts::default();
        let out = Redactor::default().redact_text(input, &mut counts);
        assert_eq!(out.is_some(), counts.total() > 0);
        out.unwrap_or_else(|| input.to_string())
    }

    /// Redact a header object with all kinds; the header values after.
    fn red_headers(headers: &str) -> std::collections::BTreeMap<String, String> {
        let mut counts = RedactionCounts::default();
        let out = Redactor::default()
            .redact_headers(headers, &mut counts)
            .unwrap_or_else(|| headers.to_string());
        serde_json::from_str(&out).expect("headers stay a JSON object of strings")
    }

    fn marker(n: usize) -> String {
        super::super::record::truncation_marker(n)
    }

    #[test]
    fn the_cut_marker_is_the_one_record_appends() {
        assert_eq!(marker(99), format!("{CUT_MARKER}99 bytes]"));
        // A JSON document cut by the marker is still JSON text up to the marker...
        assert!(is_json(&format!(r#"{{"t":"Bearer abc{}"#, marker(9999))));
        assert!(is_json(&format!(r#"[1, 2{}"#, marker(50))));
        // ...text that starts like JSON is not, cut or not.
        assert!(!is_json(&format!("[INFO] start{}", marker(50))));
        assert!(!is_json("{'a': 1}"));
        assert!(!is_json(r#"{"a":"b"} trailing"#));
        assert!(is_json(" 4111111111111111 ") && is_json(r#""x""#));
    }

    #[test]
    fn text_that_starts_like_json_but_is_not_is_scanned_as_text() {
        assert_eq!(
            red(
                "{'ssn': '123-45-6789', 'phone': '555-123-4567', 'password': 'hunter2', \
                 'card': '4111 1111 1111 1111', 'iban': 'DE89 3704 0044 0532 0130 00'}"
            ),
            "{'ssn': '[REDACTED:ssn]', 'phone': '[REDACTED:phone]', \
             'password': '[REDACTED:password]', 'card': '[REDACTED:card]', \
             'iban': '[REDACTED:iban]'}"
        );
        assert_eq!(
            red("[INFO] login password: hunter2 ssn 123-45-6789 call 555-123-4567"),
            "[INFO] login password: [REDACTED:password] ssn [REDACTED:ssn] call [REDACTED:phone]"
        );
        // Valid JSON is still scanned as JSON: the masks stay inside the strings.
        assert_eq!(
            red(r#"{"ssn": "123-45-6789", "phone": "555-123-4567", "password": "hunter2"}"#),
            r#"{"ssn": "[REDACTED:ssn]", "phone": "[REDACTED:phone]", "password": "[REDACTED:password]"}"#
        );
        // A cut JSON document keeps the JSON-aware scan: a card number under a card key
        // outside strings is quoted, the JSON part before the marker stays JSON text.
        let cut = format!(
            r#"{{"card_number": 4111111111111111, "t": "password=hunter2 and more{}"#,
            marker(9999)
        );
        assert_eq!(
            red(&cut),
            format!(
                r#"{{"card_number": "[REDACTED:card]", "t": "password=[REDACTED:password] and more{}"#,
                marker(9999)
            )
        );
    }

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2JAZXhhbXBsZS5jb20ifQ.\
                       dBjftJeZ4CVPmB92K27uhbUJU1p1r_wW1gFWFOEjXk";

    #[test]
    fn a_jwt_followed_by_a_dot_or_the_cut_marker_is_masked() {
        assert_eq!(
            red(&format!(r#"{{"t":"Your token is {JWT}."}}"#)),
            r#"{"t":"Your token is [REDACTED:jwt]."}"#
        );
        assert_eq!(
            red(&format!("token {JWT}... next")),
            "token [REDACTED:jwt]... next"
        );
        let cut = format!(r#"{{"t":"Bearer {}{}"#, &JWT[..70], marker(9999));
        assert_eq!(
            red(&cut),
            format!(r#"{{"t":"Bearer [REDACTED:jwt]{}"#, marker(9999))
        );
        // Cut inside the payload part: still masked; cut inside the header: not a JWT yet.
        let cut = format!("Bearer {}{}", &JWT[..30], marker(99));
        assert_eq!(red(&cut), format!("Bearer [REDACTED:jwt]{}", marker(99)));
        let cut = format!("id {}{}", &JWT[..15], marker(99));
        assert_eq!(red(&cut), cut);
        // After `Bearer`, the cut credential is masked all the same (not as a JWT).
        let cut = format!("Bearer {}{}", &JWT[..15], marker(99));
        assert_eq!(
            red(&cut),
            format!("Bearer [REDACTED:password]{}", marker(99))
        );
        // Still one token: more base64url after the signature belongs to it.
        assert_eq!(red(&format!("{JWT}_-x ok")), "[REDACTED:jwt] ok");
    }

    #[test]
    fn a_failed_jwt_candidate_is_not_tried_again_inside_its_run() {
        // The scan position moves past the run the failed candidate scanned...
        let run = "eyJ-".repeat(1000);
        assert_eq!(jwt(run.as_bytes(), 0), Err(run.len()));
        // ...or to the start of the part that failed, where a token may still start.
        let t = format!("eyJaaaaaaaa.eyJbb.{JWT}");
        assert_eq!(jwt(t.as_bytes(), 0), Err(12));
        assert_eq!(jwt(t.as_bytes(), 12), Err(17));
        assert_eq!(jwt(t.as_bytes(), 18), Ok(t.len()));
        // End to end, the detector scans each byte of `eyJ-eyJ-...` a bounded number of times
        // (it scanned the rest of the run from every `eyJ`: n²/8 bytes, 2 million here).
        for text in [
            run.clone(),
            format!(r#"{{"a":"{run}"}}"#),
            "eyJaaaaaaaa-".repeat(300),
        ] {
            JWT_SCANNED.with(|c| c.set(0));
            assert_eq!(red(&text), text);
            let scanned = JWT_SCANNED.with(|c| c.get());
            assert!(
                scanned <= 2 * text.len(),
                "{scanned} bytes for {}",
                text.len()
            );
        }
    }

    #[test]
    fn single_quoted_values_inside_json_strings_and_headers_are_masked() {
        assert_eq!(
            red(
                r#"{"code":"conn = psycopg2.connect(host='db', password='s3cr3tP@ss', user='x')"}"#
            ),
            r#"{"code":"conn = psycopg2.connect(host='db', password='[REDACTED:password]', user='x')"}"#
        );
        // Without the closing quote the value runs to the end of the string.
        assert_eq!(
            red(r#"{"a":"password='s3cr","b":1}"#),
            r#"{"a":"password='[REDACTED:password]","b":1}"#
        );
        let h = red_headers(r#"{"host":"h","x-note":"password='hunter2'"}"#);
        assert_eq!(h["x-note"], "password='[REDACTED:password]'");
        assert_eq!(h["host"], "h");
    }

    #[test]
    fn secret_key_spellings_header_names_and_nested_json_are_masked() {
        assert_eq!(
            red(
                r#"{"clientSecret":"cs-abc123","accessToken":"at-xyz","SecretAccessKey":"wJalrXUtnFEMI/K7MDENG","privateKey":"pk","max_tokens":"100"}"#
            ),
            r#"{"clientSecret":"[REDACTED:password]","accessToken":"[REDACTED:password]","SecretAccessKey":"[REDACTED:password]","privateKey":"[REDACTED:password]","max_tokens":"100"}"#
        );
        for key in [
            "client_secret",
            "CLIENT-SECRET",
            "db.password",
            "idToken",
            "x-api-key",
        ] {
            assert!(is_secret_key(key.as_bytes()), "{key}");
        }
        for key in ["passwordless", "password_hint", "max_tokens", "keyboard"] {
            assert!(!is_secret_key(key.as_bytes()), "{key}");
        }
        let h = red_headers(
            r#"{"host":"h","x-databricks-metadata-api-key":"sk-live-abc123","x-databricks-metadata-password":"hunter2","x-databricks-metadata-endpoint-name":"e1"}"#,
        );
        assert_eq!(h["x-databricks-metadata-api-key"], "[REDACTED:password]");
        assert_eq!(h["x-databricks-metadata-password"], "[REDACTED:password]");
        assert_eq!(h["x-databricks-metadata-endpoint-name"], "e1");
        assert_eq!(h["host"], "h");
        // Two and three levels of JSON inside JSON strings.
        assert_eq!(
            red(r#"{"out":"{\"content\":\"{\\\"password\\\":\\\"hunter2\\\"}\"}"}"#),
            r#"{"out":"{\"content\":\"{\\\"password\\\":\\\"[REDACTED:password]\\\"}\"}"}"#
        );
        assert_eq!(
            red(r#"{"out":"{\"code\":\"connect(password=\\\"hunter2\\\")\"}"}"#),
            r#"{"out":"{\"code\":\"connect(password=\\\"[REDACTED:password]\\\")\"}"}"#
        );
        let three = serde_json::json!({ "a": serde_json::json!({ "b": serde_json::json!({
            "c": serde_json::json!({ "api_key": "sk-deep", "q": "a\"b" }).to_string()
        }).to_string() }).to_string() })
        .to_string();
        let out = red(&three);
        let mut v: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
        for key in ["a", "b", "c"] {
            let inner = v[key].as_str().expect("a JSON-encoded string").to_string();
            v = serde_json::from_str(&inner).expect("the nested JSON stays JSON");
        }
        assert_eq!(
            v,
            serde_json::json!({ "api_key": "[REDACTED:password]", "q": "a\"b" })
        );
        // An escaped quote inside a nested value is part of it.
        assert_eq!(
            red(r#"{"a":"{\"password\":\"x\\\"y\"}"}"#),
            r#"{"a":"{\"password\":\"[REDACTED:password]\"}"}"#
        );
    }

    #[test]
    fn timestamps_and_ids_are_not_cards() {
        // Both pass the Luhn check.
        let (ms, ns) = ("1705312200002", "1705312200123456008");
        assert!(luhn(ms.as_bytes()) && luhn(ns.as_bytes()));
        let text = format!(
            r#"{{"timestamp_ms": {ms}, "start_time_unix_nano": {ns}, "experiment_id": "{ns}", "startTimeMs": "{ms}", "n": [{ns}]}}"#
        );
        assert_eq!(red(&text), text);
        // A string that is not a whole id or time value, or under another key, still is one.
        assert_eq!(
            red(&format!(r#"{{"s": "{ns}", "span_id": "paid {ms}"}}"#)),
            r#"{"s": "[REDACTED:card]", "span_id": "paid [REDACTED:card]"}"#
        );
        assert!(names_id_or_time(b"trace_id") && names_id_or_time(b"created_ms"));
        assert!(!names_id_or_time(b"card_number") && !names_id_or_time(b"items"));
    }

    #[test]
    fn dates_and_ipv4_addresses_are_not_phones() {
        assert_eq!(
            red(r#"{"rows":[["2024-01-15 10:30:00", 42]], "t":"at 2024-01-15 10:30"}"#),
            r#"{"rows":[["2024-01-15 10:30:00", 42]], "t":"at 2024-01-15 10:30"}"#
        );
        assert_eq!(red("on 15.01.2024 10:30"), "on 15.01.2024 10:30");
        assert_eq!(
            red(r#"{"client":"192.168.100.200"}"#),
            r#"{"client":"192.168.100.200"}"#
        );
        assert_eq!(
            red("call 555.123.4567 or 555-123-4567"),
            "call [REDACTED:phone] or [REDACTED:phone]"
        );
    }

    #[test]
    fn an_iban_followed_by_an_uppercase_word_is_masked() {
        assert_eq!(
            red("IBAN ES91 2100 0418 4502 0005 1332 EUR 500"),
            "IBAN [REDACTED:iban] EUR 500"
        );
        assert_eq!(red("BE68 5390 0754 7034 REF 12"), "[REDACTED:iban] REF 12");
        assert_eq!(
            red("IBAN ES91 2100 0418 4502 0005 1332"),
            "IBAN [REDACTED:iban]"
        );
        // A failed checksum is no IBAN.
        assert!(!red("BE68 5390 0754 7035 REF 12").contains("iban"));
    }

    #[test]
    fn secrets_cut_by_the_marker_are_masked() {
        let m = marker(99);
        assert_eq!(
            red(&format!("Bearer dapi0123456789abcdef01234567{m}")),
            format!("Bearer [REDACTED:databricks_token]{m}")
        );
        assert_eq!(
            red(&format!("key AKIAIOSFOD{m}")),
            format!("key [REDACTED:aws_key]{m}")
        );
        // A secret value cut by the marker is masked up to it; the marker stays whole.
        assert_eq!(
            red(&format!("password=abc{m}")),
            format!("password=[REDACTED:password]{m}")
        );
        assert_eq!(
            red(&format!(r#"{{"password":"abc{m}"#)),
            format!(r#"{{"password":"[REDACTED:password]{m}"#)
        );
        // Not cut: a short one is not a token.
        assert_eq!(
            red("dapi0123456789abcdef01234567 AKIAIOSFOD."),
            "dapi0123456789abcdef01234567 AKIAIOSFOD."
        );
    }

    #[test]
    fn an_at_sign_written_as_an_escape_is_an_email() {
        assert_eq!(
            red(r#"{"e":"bob\u0040example.com","f":"x\u0040y"}"#),
            r#"{"e":"[REDACTED:email]","f":"x\u0040y"}"#
        );
    }

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

    #[test]
    fn the_secret_key_quick_reject_keeps_every_name() {
        for k in SECRET_KEYS {
            let b = k.as_bytes();
            assert!(
                SECRET_KEY_ENDINGS.contains(&[b[b.len() - 2], b[b.len() - 1]]),
                "{k}"
            );
            assert!(is_secret_key(k.as_bytes()), "{k}");
            assert!(is_secret_key(k.to_uppercase().as_bytes()), "{k}");
            assert!(is_secret_key(format!("x-{k}_").as_bytes()), "{k}");
        }
        assert!(!is_secret_key(b"") && !is_secret_key(b"__") && !is_secret_key(b"tokens"));
    }

    #[test]
    fn card_keys_are_matched_on_whole_tokens() {
        for key in [
            "card",
            "card_number",
            "cardNumber",
            "CardNumber",
            "credit_card_no",
            "creditCard",
            "creditcard",
            "cardnumber",
            "cc",
            "cc-num",
            "PAN",
            "billing.card",
            "payment card",
        ] {
            assert!(names_card(key.as_bytes()), "{key}");
        }
        for key in [
            "discard",
            "cardinality",
            "scorecard",
            "span",
            "panel",
            "acc",
            "id",
        ] {
            assert!(!names_card(key.as_bytes()), "{key}");
        }
        // End to end: a JSON number is masked under a card key only.
        assert_eq!(
            red(r#"{"discard": 4111111111111111, "cardinality": 4111111111111111}"#),
            r#"{"discard": 4111111111111111, "cardinality": 4111111111111111}"#
        );
        assert_eq!(
            red(r#"{"cardNumber": 4111111111111111, "cc": 4111111111111111}"#),
            r#"{"cardNumber": "[REDACTED:card]", "cc": "[REDACTED:card]"}"#
        );
    }

    #[test]
    fn id_and_time_keys_are_matched_on_their_last_token() {
        for key in [
            "id",
            "ID",
            "span_id",
            "spanId",
            "spanID",
            "trace-ids",
            "timestamp_ms",
            "timestampMs",
            "startTimeUnixNano",
            "start_time_unix_nanos",
            "created.ts",
            "event time",
            "epoch",
            "latency_us",
        ] {
            assert!(names_id_or_time(key.as_bytes()), "{key}");
        }
        for key in [
            "paid",
            "valid",
            "prepaid",
            "card_number",
            "cardNumber",
            "idea",
            "id_card",
            "times",
            "items",
            "",
        ] {
            assert!(!names_id_or_time(key.as_bytes()), "{key}");
        }
        // End to end: a card number as the whole value of `paid` is masked, of `span_id` not.
        assert_eq!(
            red(r#"{"paid": "4111111111111111", "valid": "4111111111111111"}"#),
            r#"{"paid": "[REDACTED:card]", "valid": "[REDACTED:card]"}"#
        );
        assert_eq!(
            red(r#"{"spanId": "4111111111111111", "startTimeUnixNano": "4111111111111111"}"#),
            r#"{"spanId": "4111111111111111", "startTimeUnixNano": "4111111111111111"}"#
        );
    }

    #[test]
    fn key_tokens_split_at_separators_and_camel_case() {
        let tokens = |k: &str| -> Vec<String> {
            key_tokens(k.as_bytes())
                .map(|t| String::from_utf8_lossy(t).into_owned())
                .collect()
        };
        assert_eq!(
            tokens("startTimeUnixNano"),
            ["start", "Time", "Unix", "Nano"]
        );
        assert_eq!(
            tokens("x-span.ID_v2 HTTPServer"),
            ["x", "span", "ID", "v2", "HTTP", "Server"]
        );
        assert_eq!(tokens("sha256Hash"), ["sha256", "Hash"]);
        assert_eq!(tokens("__"), Vec::<String>::new());
    }

    /// Bytes the JSON validity check looked at while `f` ran.
    fn parsed_by(f: impl FnOnce()) -> usize {
        JSON_PARSED.with(|c| c.set(0));
        f();
        JSON_PARSED.with(|c| c.get())
    }

    #[test]
    fn each_payload_is_parsed_at_most_once_and_header_objects_never() {
        let r = Redactor::default();
        let mut counts = RedactionCounts::default();
        let doc = r#"{"t":"mail bob@example.com", "n": [1, 2, 3]}"#;
        let cut = format!(r#"{{"t":"Bearer abc{}"#, marker(9999));
        for payload in [doc, cut.as_str(), " 4111111111111111 ", r#""x""#] {
            let n = parsed_by(|| {
                r.redact_text(payload, &mut counts);
            });
            assert!(n > 0 && n <= payload.len(), "{n} bytes for {payload}");
        }
        // Text that cannot be JSON is not parsed at all.
        for text in ["INFO ssn 123-45-6789", "plain words", "", "  ~{\"a\":1}"] {
            assert_eq!(parsed_by(|| assert!(!is_json(text))), 0, "{text}");
        }
        // Header objects are built by the connector as JSON: no validity check.
        let headers = r#"{"host":"h","x-note":"password='hunter2'","x-user":"bob@example.com"}"#;
        let mut out = None;
        assert_eq!(
            parsed_by(|| out = r.redact_headers(headers, &mut counts)),
            0
        );
        let v: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&out.expect("redacted")).expect("a JSON object of strings");
        assert_eq!(v["x-note"], "password='[REDACTED:password]'");
        assert_eq!(v["x-user"], "[REDACTED:email]");
        // A header string that is not a JSON object is left as it is.
        assert_eq!(r.redact_headers("bob@example.com", &mut counts), None);
    }

    /// `red` and the output parses as JSON (the input does).
    fn red_json(input: &str) -> String {
        serde_json::from_str::<serde_json::Value>(input).expect("the input is JSON");
        let out = red(input);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap_or_else(|e| panic!("JSON broken ({e}): {out}"));
        out
    }

    /// The string value `v[key]` parsed as JSON (JSON inside a JSON string).
    fn inner(doc: &str, key: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(doc).expect("JSON");
        let s = v[key].as_str().expect("a string").to_string();
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("inner JSON broken ({e}): {s}"))
    }

    #[test]
    fn bearer_credentials_and_authorization_token_cookie_names_are_masked() {
        // The scheme in any case.
        for scheme in ["bearer", "BEARER", "Bearer"] {
            let text = format!("curl -H 'x: {scheme} sk-proj-abcdefghijklmnopqrstuvwx' ...");
            assert_eq!(
                red(&text),
                format!("curl -H 'x: {scheme} [REDACTED:password]' ..."),
                "{scheme}"
            );
        }
        // Prose is no credential.
        let prose = "the bearer of this letter is welcome";
        assert_eq!(red(prose), prose);
        // A JWT after Bearer is masked as a JWT, or as a password when only passwords are.
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        let text = format!("curl -H 'x: Bearer {jwt}'");
        assert_eq!(red(&text), "curl -H 'x: Bearer [REDACTED:jwt]'");
        let mut counts = RedactionCounts::default();
        assert_eq!(
            Redactor::new(&[RedactKind::Password])
                .redact_text(&text, &mut counts)
                .as_deref(),
            Some("curl -H 'x: Bearer [REDACTED:password]'")
        );
        for (input, want) in [
            (
                r#"{"authorization":"Bearer sk-proj-abcdefghijklmnopqrstuvwx"}"#,
                r#"{"authorization":"[REDACTED:password]"}"#,
            ),
            (
                r#"{"t":"Authorization: Bearer sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123"}"#,
                r#"{"t":"Authorization: Bearer [REDACTED:password]"}"#,
            ),
            (
                r#"{"token":"abc123secret0123456","auth":"dXNlcjpwYXNzd29yZA==","cookie":"sid=1","aws_credentials":[1]}"#,
                r#"{"token":"[REDACTED:password]","auth":"[REDACTED:password]","cookie":"[REDACTED:password]","aws_credentials":"[REDACTED:password]"}"#,
            ),
            (
                r#"{"headers":{"X-Auth-Token":"t0k3n","Proxy-Authorization":"Basic dXNlcjpwYXNz"}}"#,
                r#"{"headers":{"X-Auth-Token":"[REDACTED:password]","Proxy-Authorization":"[REDACTED:password]"}}"#,
            ),
        ] {
            assert_eq!(red_json(input), want, "{input}");
        }
        // In text: after the header name, and `Bearer <credential>` anywhere.
        assert_eq!(
            red("curl -H 'Authorization: Basic dXNlcjpwYXNzd29yZA==' https://x"),
            "curl -H 'Authorization: Basic [REDACTED:password]' https://x"
        );
        assert_eq!(
            red("send Bearer sk-ant-api03-abcdefghijklmnopqrstuvwxyz. Then"),
            "send Bearer [REDACTED:password]. Then"
        );
        assert_eq!(
            red(&format!("Bearer abc{}", marker(99))),
            format!("Bearer [REDACTED:password]{}", marker(99))
        );
        // A JWT or a Databricks token keeps its own kind.
        let mut counts = RedactionCounts::default();
        let out = Redactor::default()
            .redact_text(
                &format!("Bearer {JWT} and token: dapi0123456789abcdef0123456789abcdef"),
                &mut counts,
            )
            .unwrap();
        assert_eq!(
            out,
            "Bearer [REDACTED:jwt] and token: [REDACTED:databricks_token]"
        );
        assert_eq!(counts.get(RedactKind::Password), 0);
        // Not secrets: counts of tokens, a tokenizer's special tokens, `Bearer` as a word.
        for kept in [
            r#"{"max_tokens":100,"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12,"input_tokens":1,"output_tokens":2},"tokens":["a","b"],"token_count":3,"eos_token":"</s>","pad_token_id":0,"author":"x"}"#,
            r#"{"t":"Bearer of bad news, a token of thanks"}"#,
        ] {
            assert_eq!(red_json(kept), kept);
        }
        for key in [
            "authorization",
            "x-databricks-metadata-authorization",
            "x-databricks-metadata-cookie",
            "Set-Cookie",
            "token",
            "X-Auth-Token",
            "csrf_token",
            "credentials",
            "oauth",
        ] {
            assert!(is_secret_key(key.as_bytes()), "{key}");
        }
        for key in [
            "max_tokens",
            "tokens",
            "token_count",
            "total_tokens",
            "eos_token",
            "max_new_token",
            "author",
        ] {
            assert!(!is_secret_key(key.as_bytes()), "{key}");
        }
        let h = red_headers(
            r#"{"host":"h","x-databricks-metadata-authorization":"Bearer abcdefghijklmnopqrstuvwxyz","x-databricks-metadata-cookie":"sid=abc"}"#,
        );
        assert_eq!(
            h["x-databricks-metadata-authorization"],
            "[REDACTED:password]"
        );
        assert_eq!(h["x-databricks-metadata-cookie"], "[REDACTED:password]");
        assert_eq!(h["host"], "h");
    }

    #[test]
    fn values_written_with_unicode_escapes_are_masked() {
        // How .NET's System.Text.Json writes `"`, `+`, `'`, `<`, `>` and `&`.
        let out = red_json(r#"{"args":"{\u0022api_key\u0022:\u0022sk-live-abcdef\u0022}"}"#);
        assert_eq!(
            inner(&out, "args"),
            serde_json::json!({"api_key": "[REDACTED:password]"})
        );
        assert_eq!(
            red_json(r#"{"phone":"\u002B14155551234","e":"bob\u0040example.com"}"#),
            r#"{"phone":"[REDACTED:phone]","e":"[REDACTED:email]"}"#
        );
        assert_eq!(
            red_json(r#"{"q":"it\u0027s password=hunter2 \u003Cb\u003E"}"#),
            r#"{"q":"it's password=[REDACTED:password] <b>"}"#
        );
        // Two levels: a string inside a string, both written with escapes.
        let out = red_json(
            r#"{"a":"{\u0022b\u0022:\u0022{\\u0022password\\u0022:\\u0022hunter2\\u0022}\u0022}"}"#,
        );
        assert!(!out.contains("hunter2"), "{out}");
        // Nothing matched: the string is left exactly as written.
        for kept in [
            r#"{"a":"it\u0027s \u003Cfine\u003E","b":"x\u0040y"}"#,
            r#"{"a":"caf\u00e9 \u0001"}"#,
        ] {
            assert_eq!(red_json(kept), kept);
        }
        // A hit before the escape is kept; the rest of the string is looked at decoded.
        assert_eq!(
            red_json(r#"{"a":"bob@example.com \u0027+14155551234\u0027"}"#),
            r#"{"a":"[REDACTED:email] '[REDACTED:phone]'"}"#
        );
    }

    #[test]
    fn escaped_slashes_do_not_end_a_key_value() {
        assert_eq!(
            red_json(
                r#"{"t":"AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI\/K7MDENG\/bPxRfiCYEXAMPLEKEY rest"}"#
            ),
            r#"{"t":"AWS_SECRET_ACCESS_KEY=[REDACTED:password] rest"}"#
        );
        // An escaped backslash is part of the value; an escaped quote, newline or tab, or an
        // escaped `&`, ends it.
        for (input, want) in [
            (
                r#"{"t":"password=ab\\cd ok"}"#,
                r#"{"t":"password=[REDACTED:password] ok"}"#,
            ),
            (
                r#"{"t":"password=abc\"x"}"#,
                r#"{"t":"password=[REDACTED:password]\"x"}"#,
            ),
            (
                r#"{"t":"password=abc\nnext"}"#,
                r#"{"t":"password=[REDACTED:password]\nnext"}"#,
            ),
            (
                r#"{"t":"password=abc\tnext"}"#,
                r#"{"t":"password=[REDACTED:password]\tnext"}"#,
            ),
        ] {
            assert_eq!(red_json(input), want, "{input}");
        }
        // In plain text a backslash still ends the value.
        assert_eq!(
            red(r"password=abc\def"),
            r"password=[REDACTED:password]\def"
        );
    }

    #[test]
    fn numbers_in_json_inside_strings_follow_the_json_number_rules() {
        // Both pass the Luhn check: as JSON numbers of tool-call arguments they are kept.
        assert!(luhn(b"1700000000004") && luhn(b"1700000000012"));
        let args = r#"{"arguments":"{\"start_ms\": 1700000000004,\n \"user_id\": 1700000000012}"}"#;
        assert_eq!(red_json(args), args);
        // Under a card key, masked with quotes: the inner document stays JSON.
        let out = red_json(
            r#"{"arguments":"{\"card_number\": 4111111111111111, \"cc\":-4111111111111111}"}"#,
        );
        assert_eq!(
            inner(&out, "arguments"),
            serde_json::json!({"card_number": "[REDACTED:card]", "cc": "[REDACTED:card]"})
        );
        // A whole string value of an id or a time is no card, in nested JSON too.
        let ids =
            r#"{"a":"{\"span_id\":\"4111111111111111\",\"startTimeMs\": \"4111111111111111\"}"}"#;
        assert_eq!(red_json(ids), ids);
        assert_eq!(
            red_json(r#"{"a":"{\"note\":\"4111111111111111\",\"ssn\": \"123-45-6789\"}"}"#),
            r#"{"a":"{\"note\":\"[REDACTED:card]\",\"ssn\": \"[REDACTED:ssn]\"}"}"#
        );
        // Text after a key that is not a JSON number is still text.
        assert_eq!(
            red_json(r#"{"a":"{\"x\": 123-45-6789}"}"#),
            r#"{"a":"{\"x\": [REDACTED:ssn]}"}"#
        );
    }

    #[test]
    fn nested_values_are_found_in_near_linear_steps() {
        // `pwd:\"x pwd:\\"x pwd:\\\"x ...`: every assignment scanned the rest of the text.
        let mut text = String::new();
        for k in 1..600 {
            text.push_str("pwd:");
            text.push_str(&"\\".repeat(k));
            text.push_str("\"x ");
        }
        NESTED_SCANNED.with(|c| c.set(0));
        let _ = red(&text);
        let steps = NESTED_SCANNED.with(|c| c.get());
        assert!(
            steps <= 4 * text.len(),
            "{steps} steps for {} bytes",
            text.len()
        );
        // The values still end where they should: at their own quote, past deeper ones.
        assert_eq!(
            red(r#"{"a":"{\"password\":\"x\\\"y\"}"}"#),
            r#"{"a":"{\"password\":\"[REDACTED:password]\"}"}"#
        );
        assert_eq!(
            red(r#"{"a":"{\"b\":\"{\\\"password\\\":\\\"x\\\\\\\"y\\\"}\"}"}"#),
            r#"{"a":"{\"b\":\"{\\\"password\\\":\\\"[REDACTED:password]\\\"}\"}"}"#
        );
    }

    #[test]
    fn numbers_in_arrays_of_json_inside_strings_are_ids_not_cards() {
        // 4111111111111111 and 1700000000004 pass the Luhn check.
        let args = r#"{"arguments":"{\"ids\": [4111111111111111, 1700000000004],\"m\":[[1], 4111111111111111]}"}"#;
        assert_eq!(red_json(args), args);
        // In prose a card number after a word and a comma is still a card.
        assert_eq!(
            red(r#"{"t":"card, 4111111111111111, exp 12/29"}"#),
            r#"{"t":"card, [REDACTED:card], exp 12/29"}"#
        );
        assert_eq!(
            red(r#"{"t":"pay with [4111111111111111 ] now"}"#),
            r#"{"t":"pay with [4111111111111111 ] now"}"#,
            "a lone number in brackets reads as an array element"
        );
    }

    #[test]
    fn pgp_private_key_blocks_are_masked() {
        let block = "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF0AAAAB\n=abcd\n\
                     -----END PGP PRIVATE KEY BLOCK-----";
        assert_eq!(
            red(&format!("key:\n{block}\nbye")),
            "key:\n[REDACTED:private_key]\nbye"
        );
        let doc = serde_json::json!({ "k": block, "z": "ok" }).to_string();
        assert_eq!(red_json(&doc), r#"{"k":"[REDACTED:private_key]","z":"ok"}"#);
        // A public key block is not a secret.
        let public =
            "-----BEGIN PGP PUBLIC KEY BLOCK-----\nmQINBF\n-----END PGP PUBLIC KEY BLOCK-----";
        assert_eq!(red(public), public);
    }

    #[test]
    fn secrets_that_are_numbers_arrays_or_objects_are_masked_whole() {
        for (input, want) in [
            (
                r#"{"password":12345678,"n":1}"#,
                r#"{"password":"[REDACTED:password]","n":1}"#,
            ),
            (
                r#"{"password": -1.5e3, "api_key": ["a", "b]\"", {"c": 1}], "secret": {"k": "v"}}"#,
                r#"{"password": "[REDACTED:password]", "api_key": "[REDACTED:password]", "secret": "[REDACTED:password]"}"#,
            ),
            // Nothing to hide: kept.
            (
                r#"{"password":null,"token":true}"#,
                r#"{"password":null,"token":true}"#,
            ),
        ] {
            assert_eq!(red_json(input), want, "{input}");
        }
        // Pretty-printed, and in JSON inside a JSON string.
        let pretty = serde_json::to_string_pretty(&serde_json::json!({"pwd": [1, 2]})).unwrap();
        assert!(red_json(&pretty).contains(r#""pwd": "[REDACTED:password]""#));
        let out =
            red_json(r#"{"a":"{\"password\": 12345678, \"api_key\": [\"x\", {\"y\": \"]\"}]}"}"#);
        assert_eq!(
            inner(&out, "a"),
            serde_json::json!({"password": "[REDACTED:password]", "api_key": "[REDACTED:password]"})
        );
        // Cut inside the value: masked up to the marker.
        let cut = format!(r#"{{"password":["abc","de{}"#, marker(999));
        assert_eq!(
            red(&cut),
            format!(r#"{{"password":"[REDACTED:password]"{}"#, marker(999))
        );
    }

    /// Bytes of `\u00XX`-escaped strings decoded while `f` ran.
    fn decoded_by(f: impl FnOnce()) -> usize {
        DECODED.with(|c| c.set(0));
        f();
        DECODED.with(|c| c.get())
    }

    #[test]
    fn a_string_that_does_not_decode_whole_is_decoded_once() {
        // Go and .NET write `"` as `\u0022`; the string is cut inside an escape, or holds a
        // lone surrogate (JSON all the same): every escape decoded the rest of the string again.
        let body = r"word \u0022q\u0022 ".repeat(2000);
        let cut = format!(r#"{{"a":"{body}\u00{}"#, marker(999_999));
        let lone = format!(r#"{{"a":"{body}\ud800"}}"#);
        let lone_first = format!(r#"{{"a":"\udc00 {body}"}}"#);
        for text in [&cut, &lone, &lone_first] {
            assert!(is_json(text), "{text}");
            let n = decoded_by(|| assert_eq!(&red(text), text));
            assert!(n <= 2 * text.len(), "{n} bytes decoded for {}", text.len());
        }
        // What decodes before (and after) such an escape is still looked at decoded.
        let out = red(
            r#"{"a":"{\u0022password\u0022:\u0022hunter2\u0022} \ud800 \u0027+14155551234\u0027"}"#,
        );
        assert_eq!(
            out,
            r#"{"a":"{\"password\":\"[REDACTED:password]\"} \ud800 '[REDACTED:phone]'"}"#
        );
        parse(&out).expect("still JSON");
        let cut = format!(
            r#"{{"args":"{{\u0022api_key\u0022:\u0022sk-live-abcdef\u0022, \u0022n\u0022:\u00{}"#,
            marker(99)
        );
        let out = red(&cut);
        assert_eq!(
            out,
            format!(
                r#"{{"args":"{{\"api_key\":\"[REDACTED:password]\", \"n\":\u00{}"#,
                marker(99)
            )
        );
    }

    #[test]
    fn the_level_of_a_quote_is_read_from_its_run_of_backslashes() {
        // `q + 2k(q + 1)` backslashes: `k` escaped backslashes before a quote of level `q`.
        for (run, level) in [
            (0, 0),
            (2, 0),
            (4, 0),
            (1, 1),
            (5, 1),
            (9, 1),
            (3, 3),
            (11, 3),
        ] {
            assert_eq!(quote_level(run), level, "{run}");
        }
        assert_eq!(
            (quote_level(7), quote_level(23), quote_level(15)),
            (7, 7, 15)
        );
    }

    #[test]
    fn nested_strings_ending_in_escaped_backslashes_end_at_their_own_quote() {
        // `"hunter2\\"` in JSON inside a string: five backslashes before its closing quote.
        let out = red_json(r#"{"arguments":"{\"password\": \"hunter2\\\\\", \"q\": \"x\"}"}"#);
        assert_eq!(
            inner(&out, "arguments"),
            serde_json::json!({"password": "[REDACTED:password]", "q": "x"})
        );
        let out = red_json(
            r#"{"arguments":"{\"credentials\": {\"dir\": \"C:\\\\keys\\\\\"}, \"query\": \"weather in Paris\", \"user_email\": \"bob@example.com\"}"}"#,
        );
        assert_eq!(
            inner(&out, "arguments"),
            serde_json::json!({
                "credentials": "[REDACTED:password]",
                "query": "weather in Paris",
                "user_email": "[REDACTED:email]"
            })
        );
        // Two levels deep (eleven backslashes), and a backslash and a quote ending a value.
        for (secret, want) in [
            (
                serde_json::json!({"password": "x\\", "q": "y\\"}),
                serde_json::json!({"password": "[REDACTED:password]", "q": "y\\"}),
            ),
            (
                serde_json::json!({"credentials": {"dir": "C:\\"}, "q": "a\\\"", "pwd": "\\\"\\"}),
                serde_json::json!({"credentials": "[REDACTED:password]", "q": "a\\\"", "pwd": "[REDACTED:password]"}),
            ),
        ] {
            let doc = serde_json::json!({ "a": serde_json::json!({ "b": secret.to_string() }).to_string() })
                .to_string();
            let out = red_json(&doc);
            let b = inner(&out, "a");
            let got: serde_json::Value =
                serde_json::from_str(b["b"].as_str().expect("a string")).expect("still JSON");
            assert_eq!(got, want, "{out}");
        }
    }

    #[test]
    fn true_false_and_null_of_secret_names_in_nested_json_are_kept() {
        for kept in [
            r#"{"role":"tool","content":"{\"items\": [1], \"password\": null}"}"#,
            r#"{"a":"{\"api_key\":true, \"secret\" : false,\"pwd\":null}"}"#,
            r#"{"a":"{\"b\":\"{\\\"password\\\": null}\"}"}"#,
        ] {
            assert_eq!(red_json(kept), kept);
        }
        // A word that merely starts like one is a value.
        assert_eq!(
            red_json(r#"{"a":"{\"password\": nullable}"}"#.replace("nullable", "\\\"nullable\\\"").as_str()),
            r#"{"a":"{\"password\": \"[REDACTED:password]\"}"}"#
        );
        assert_eq!(red("password: nullable"), "password: [REDACTED:password]");
    }

    #[test]
    fn bearer_credentials_with_escaped_slashes_are_masked_whole() {
        for (input, want) in [
            (
                r#"{"t":"use Bearer ab\/cdefghijklmnopqrstuvwxyz0123 now"}"#,
                r#"{"t":"use Bearer [REDACTED:password] now"}"#,
            ),
            (
                r#"{"t":"Bearer abcdefghijklmnopqrstuvwxyz\/0123"}"#,
                r#"{"t":"Bearer [REDACTED:password]"}"#,
            ),
        ] {
            assert_eq!(red_json(input), want, "{input}");
        }
        // In text a backslash is no escape: it ends the credential.
        assert_eq!(
            red(r"Bearer abcdefghijklmnopqrstuvwxyz\/0123"),
            r"Bearer [REDACTED:password]\/0123"
        );
    }

    #[test]
    fn token_and_auth_names_mask_only_credential_shaped_strings() {
        // LLM fields named like a token: logprobs, TGI stream tokens, pagination, latency,
        // prose and code.
        for kept in [
            r#"{"logprobs":{"content":[{"token":"Hello","logprob":-0.1,"bytes":[72],"top_logprobs":[{"token":" Hi","logprob":-2.3}]}]}}"#,
            r#"{"token":{"id":4013,"text":"Hello","logprob":-0.5,"special":false}}"#,
            r#"{"next_page_token":"CiAKGjBpNDd2Nmp2Zml2cXRp","page_token":"Q2lBS0dqQnBORGQyTm1wMlptbDJjWFJw","nextToken":"AAAABBBBCCCCDDDD1234","NextPageToken":"x","time_to_first_token":0.32,"timeToFirstToken":0.3}"#,
            r#"{"t":"each token: a piece of a word. Auth: users log in. token = tokenizer.encode(text)"}"#,
            r#"{"auth":{"type":"oauth2","scopes":["read"]},"token":12345678901234567,"tokens":["a"]}"#,
            r#"{"max_tokens":10,"usage":{"total_tokens":3},"token_type":"bearer","auth_type":"pat","author":"x","authority":"y","tokenizer":"z","cookie_consent":"yes"}"#,
            r#"{"a":"{\"token\": \"Hello\", \"token\": [1, 2], \"auth\": {\"k\": 1}}"}"#,
        ] {
            assert_eq!(red_json(kept), kept);
        }
        assert_eq!(
            red("each token: a piece; Auth: users log in; token = tokenizer.encode(text)"),
            "each token: a piece; Auth: users log in; token = tokenizer.encode(text)"
        );
        // A credential under those names, and every value of the unambiguous ones.
        for (input, want) in [
            (
                r#"{"token":"ghp_16CharactersAndMore0123","auth":"dXNlcjpwYXNzd29yZA==","oauth":"ya29.a0AfH6SMBx-abcdefghijk"}"#,
                r#"{"token":"[REDACTED:password]","auth":"[REDACTED:password]","oauth":"[REDACTED:password]"}"#,
            ),
            (
                r#"{"access_token":"at","refresh_token":"rt 1","id_token":"x","api_token":"y","auth_token":"z","authorization":"Basic a","cookie":"sid=1","credentials":"c","x_auth_token":[1]}"#,
                r#"{"access_token":"[REDACTED:password]","refresh_token":"[REDACTED:password]","id_token":"[REDACTED:password]","api_token":"[REDACTED:password]","auth_token":"[REDACTED:password]","authorization":"[REDACTED:password]","cookie":"[REDACTED:password]","credentials":"[REDACTED:password]","x_auth_token":"[REDACTED:password]"}"#,
            ),
            (
                r#"{"a":"{\"token\": \"s3cr3tTokenValue0123\", \"id_token\": \"x\"}"}"#,
                r#"{"a":"{\"token\": \"[REDACTED:password]\", \"id_token\": \"[REDACTED:password]\"}"}"#,
            ),
        ] {
            assert_eq!(red_json(input), want, "{input}");
        }
        assert_eq!(
            red("token: ghp_abcdefghijklmnop0123456789 auth=dXNlcjpwYXNzd29yZA== x"),
            "token: [REDACTED:password] auth=[REDACTED:password] x"
        );
        // Cut by the marker: masked although short.
        let cut = format!(r#"{{"token":"ghp_abc{}"#, marker(999));
        assert_eq!(
            red(&cut),
            format!(r#"{{"token":"[REDACTED:password]{}"#, marker(999))
        );
        for key in [
            "next_page_token",
            "pageToken",
            "NextToken",
            "time_to_first_token",
        ] {
            assert!(!is_secret_key(key.as_bytes()), "{key}");
        }
        // Headers follow the same rule.
        let h = red_headers(
            r#"{"host":"h","x-token":"hello","x-auth-token":"t","token":"ghp_abcdefghijklmnop0123"}"#,
        );
        assert_eq!(h["x-token"], "hello");
        assert_eq!(h["x-auth-token"], "[REDACTED:password]");
        assert_eq!(h["token"], "[REDACTED:password]");
    }
}
