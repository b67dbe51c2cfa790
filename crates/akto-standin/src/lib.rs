//! A strict local stand-in for Akto's Data Ingestion Service (`POST /api/ingestData`).
//!
//! It exists so the connector can be tested end to end against something that rejects exactly
//! what Akto rejects or silently drops (see `shared/reference/akto-ingestion.md`), instead of
//! against a mock that accepts anything. It is deliberately independent of the connector crate:
//! the rules are written a second time here, so a mistake shared with the connector's own
//! validation cannot hide.
//!
//! Rules (a batch is all-or-nothing: nothing is stored when any rule fails):
//! - `Content-Type: application/json` (parameters such as `; charset=utf-8` allowed), else 415,
//!   as Akto's JSON endpoint answers;
//! - body at most 10,485,760 bytes (else 413), JSON, an object with a `batchData` array (else 422);
//! - every record, re-serialized, at most [`DEFAULT_MAX_RECORD_BYTES`] (5,242,880; see
//!   [`StandIn::set_max_record_bytes`]), else 422: Akto's ingestion producer (`max.request.size`,
//!   `AKTO_KAFKA_MAX_REQUEST_SIZE`) drops a larger record silently after answering 200;
//! - every record an object with all 17 fields, each a string (only the optional
//!   `publishToGuardrails` may be, and must be, a boolean), none longer than 5,242,880 bytes;
//! - `source` one of HAR, PCAP, MIRRORING, SDK, OTHER, POSTMAN, OPEN_API, BURP, IMPERVA, WIZ;
//! - `time` a positive 32-bit decimal integer (epoch seconds), `statusCode`, `akto_account_id`
//!   and `akto_vxlan_id` decimal 32-bit integers;
//! - `requestHeaders`, `responseHeaders`, `tag`: JSON objects encoded as strings with string
//!   values; header keys lowercase; a `host` request header using only `[a-z0-9.-]`;
//! - a `requestPayload` that Akto's runtime takes for incomplete JSON (it starts with `{` or `[`
//!   but does not end with `}` or `]`, as is or trimmed) only with a request `content-type`
//!   other than exactly `application/json` (a missing one counts as `application/json`): Akto
//!   drops such a record silently;
//! - what Akto's runtime accepts and then drops from its inventory without a word
//!   (`HttpCallParser.filterHttpResponseParams`): a `statusCode` outside 200-299 and 302
//!   (`HttpResponseParams.validHttpResponseCode`); a `path` whose lowercase form contains
//!   `/health`; a `path` matching the default redundant-endpoint pattern
//!   `.*\.(htm|html|css|js|...)(\?.*)?` ([`REDUNDANT_EXTENSIONS`]); and a `requestPayload` that
//!   is empty, whitespace only or ends with `[` under a `content-type` of exactly
//!   `application/json` or none (`SampleParser.isPossiblyIncompleteJson` of Akto releases up to
//!   018552b4).
//!
//! 422 answers carry `{"actionErrors":["batchData[i].field: what is wrong"]}`. With
//! `require_jwt`, the `authorization` header must equal the raw JWT (no `Bearer `), else 401.
//! [`Behavior`] injects failures, delays and slow uploads for retry tests, and plays what a
//! proxy, WAF or ingress in front of Akto may answer (a status for every request, or for the
//! requests holding a given record).

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Akto's limit on a whole request body.
pub const MAX_BODY_BYTES: usize = 10_485_760;
/// How much of a request body is read before the connection is given up on.
const READ_LIMIT_BYTES: usize = 4 * MAX_BODY_BYTES;
/// Akto's limit on any one string of a record.
pub const MAX_STRING_BYTES: usize = 5_242_880;
/// Akto's ingestion producer's `max.request.size` by default (`AKTO_KAFKA_MAX_REQUEST_SIZE`
/// unset, current releases; older ones keep Kafka's 1,048,576): a record re-encoded to more is
/// dropped by Akto after it answered 200. The stand-in refuses such a record with 422.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 5_242_880;
/// Accepted `source` values.
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
/// Fields every record must carry, as strings.
pub const REQUIRED_FIELDS: [&str; 17] = [
    "path",
    "method",
    "requestHeaders",
    "responseHeaders",
    "requestPayload",
    "responsePayload",
    "ip",
    "destIp",
    "time",
    "statusCode",
    "status",
    "type",
    "akto_account_id",
    "akto_vxlan_id",
    "is_pending",
    "source",
    "tag",
];

/// How to run the stand-in.
#[derive(Clone)]
pub struct StandInConfig {
    /// Address to bind, e.g. `127.0.0.1:0` for any free port.
    pub listen: SocketAddr,
    /// When set, requests must carry `authorization: <this JWT>`.
    pub require_jwt: Option<String>,
}

impl Default for StandInConfig {
    fn default() -> Self {
        StandInConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            require_jwt: None,
        }
    }
}

impl fmt::Debug for StandInConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandInConfig")
            .field("listen", &self.listen)
            .field(
                "require_jwt",
                &self.require_jwt.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Failure injection for the next batches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Behavior {
    /// Validate and store.
    #[default]
    Normal,
    /// The next `count` batches are answered with `status` (nothing stored), then Normal.
    FailNext { count: usize, status: u16 },
    /// Every batch is answered after `delay_ms`.
    Slow { delay_ms: u64 },
    /// Every `every`-th batch (counted from when this behavior was set) is answered with `status`.
    FailEvery { every: usize, status: u16 },
    /// A batch whose body contains `needle` is rejected with 422 (a poison record).
    Reject422Matching { needle: String },
    /// A batch whose body contains `needle` is answered with `status` (nothing stored): e.g. a
    /// WAF rule refusing a request that holds one record with 400.
    RejectMatching { needle: String, status: u16 },
    /// Every batch is answered with `status` (nothing stored): what a proxy, WAF or ingress in
    /// front of the service answers to every request (400, 407, 413, 415, 431, ...).
    FailAll { status: u16 },
    /// The body is read at no more than `bytes_per_sec` (a slow uplink), then handled as usual.
    SlowRead { bytes_per_sec: u64 },
}

#[derive(Debug, Default)]
struct Inner {
    records: Vec<Value>,
    accepted: usize,
    rejected: usize,
    injected: usize,
    behavior: Behavior,
    /// Batches received since the behavior was set.
    seen: usize,
    /// Remaining failures of `FailNext`.
    fail_left: usize,
}

#[derive(Debug)]
struct Shared {
    /// The JWT required now (`StandIn::set_required_jwt` rotates it).
    jwt: Mutex<Option<String>>,
    /// Longest record accepted, re-serialized (`StandIn::set_max_record_bytes`).
    max_record_bytes: std::sync::atomic::AtomicUsize,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means a test thread panicked; the data is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running stand-in; dropped or [`StandIn::shutdown`] stops it.
pub struct StandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for StandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandIn").field("addr", &self.addr).finish()
    }
}

impl StandIn {
    /// Bind and serve in a background task.
    pub async fn start(cfg: StandInConfig) -> std::io::Result<StandIn> {
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            jwt: Mutex::new(cfg.require_jwt),
            max_record_bytes: std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_RECORD_BYTES),
            inner: Mutex::new(Inner::default()),
        });
        let app = Router::new()
            .route("/api/ingestData", post(ingest))
            .route("/healthCheck", get(|| async { "OK" }))
            .layer(DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!("akto-standin server stopped: {e}");
            }
        });
        Ok(StandIn {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every accepted record, in arrival order.
    pub fn records(&self) -> Vec<Value> {
        self.shared.lock().records.clone()
    }

    /// Batches answered 200.
    pub fn accepted_batches(&self) -> usize {
        self.shared.lock().accepted
    }

    /// Batches answered with an error (401, 413, 422, or an injected failure).
    pub fn rejected_batches(&self) -> usize {
        self.shared.lock().rejected
    }

    /// Of the rejected batches, those failed by a [`Behavior`] rather than by a rule.
    pub fn injected_failures(&self) -> usize {
        self.shared.lock().injected
    }

    /// Change the behavior for the following batches.
    /// Rotates the required JWT: from now on only `jwt` is accepted (None: no token needed).
    pub fn set_required_jwt(&self, jwt: Option<&str>) {
        *self.shared.jwt.lock().unwrap_or_else(|e| e.into_inner()) = jwt.map(str::to_string);
    }

    /// The longest record accepted, re-serialized: Akto's ingestion producer's
    /// `max.request.size` (default [`DEFAULT_MAX_RECORD_BYTES`]; 1,048,576 plays an Akto release
    /// whose producer keeps Kafka's default). A batch holding a longer record is refused with 422.
    pub fn set_max_record_bytes(&self, bytes: usize) {
        self.shared
            .max_record_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set_behavior(&self, b: Behavior) {
        let mut g = self.shared.lock();
        g.fail_left = match &b {
            Behavior::FailNext { count, .. } => *count,
            _ => 0,
        };
        g.seen = 0;
        g.behavior = b;
    }

    /// Stop accepting connections and wait for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn answer(status: StatusCode, errors: Vec<String>) -> Response {
    (status, axum::Json(json!({ "actionErrors": errors }))).into_response()
}

fn status_from(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// What the current behavior decides for one batch.
enum Injected {
    None,
    Delay(u64),
    Fail(u16),
    Needle(String, StatusCode),
}

/// Whether `Content-Type` is `application/json`, with or without parameters.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads the whole body, at most `limit` bytes (`None` past it or on a read error), no faster
/// than `bytes_per_sec` when given.
async fn read_body(body: Body, limit: usize, bytes_per_sec: Option<u64>) -> Option<Vec<u8>> {
    let Some(rate) = bytes_per_sec.filter(|r| *r > 0) else {
        return axum::body::to_bytes(body, limit)
            .await
            .ok()
            .map(|b| b.to_vec());
    };
    use axum::body::HttpBody;
    let start = tokio::time::Instant::now();
    let mut body = body;
    let mut out = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.ok()?;
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
            if out.len() > limit {
                return None;
            }
            // Wait until the bytes read so far are due at the configured rate.
            let due_ms = (out.len() as u64).saturating_mul(1000) / rate;
            tokio::time::sleep_until(start + Duration::from_millis(due_ms)).await;
        }
    }
    Some(out)
}

async fn ingest(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let required = shared.jwt.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(jwt) = &required {
        let ok = headers
            .get("authorization")
            .is_some_and(|v| v.as_bytes() == jwt.as_bytes());
        if !ok {
            shared.lock().rejected += 1;
            tracing::warn!("batch rejected: 401 authorization missing or wrong");
            return answer(
                StatusCode::UNAUTHORIZED,
                vec![
                    "authorization: missing or invalid token (send the raw JWT, no Bearer prefix)"
                        .to_string(),
                ],
            );
        }
    }
    let slow_read = match shared.lock().behavior {
        Behavior::SlowRead { bytes_per_sec } => Some(bytes_per_sec),
        _ => None,
    };
    // Read somewhat past the limit so an oversized batch gets a clean 413 (answering before
    // the client finished sending could surface as a broken pipe instead).
    let bytes = match read_body(body, READ_LIMIT_BYTES, slow_read).await {
        Some(b) if b.len() <= MAX_BODY_BYTES => b,
        _ => {
            shared.lock().rejected += 1;
            tracing::warn!("batch rejected: 413 body over {MAX_BODY_BYTES} bytes");
            return answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                vec![format!(
                    "body: larger than {MAX_BODY_BYTES} bytes (or unreadable); split the batch"
                )],
            );
        }
    };

    if !is_json_content_type(&headers) {
        shared.lock().rejected += 1;
        tracing::warn!("batch rejected: 415 Content-Type is not application/json");
        return answer(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            vec!["Content-Type: must be application/json".to_string()],
        );
    }

    let injected = {
        let mut g = shared.lock();
        g.seen += 1;
        let seen = g.seen;
        match g.behavior.clone() {
            Behavior::Normal | Behavior::SlowRead { .. } => Injected::None,
            Behavior::Slow { delay_ms } => Injected::Delay(delay_ms),
            Behavior::FailNext { status, .. } if g.fail_left > 0 => {
                g.fail_left -= 1;
                Injected::Fail(status)
            }
            Behavior::FailNext { .. } => Injected::None,
            Behavior::FailEvery { every, status } if every > 0 && seen % every == 0 => {
                Injected::Fail(status)
            }
            Behavior::FailEvery { .. } => Injected::None,
            Behavior::Reject422Matching { needle } => {
                Injected::Needle(needle, StatusCode::UNPROCESSABLE_ENTITY)
            }
            Behavior::RejectMatching { needle, status } => {
                Injected::Needle(needle, status_from(status))
            }
            Behavior::FailAll { status } => Injected::Fail(status),
        }
    };
    match injected {
        Injected::None => {}
        Injected::Delay(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Injected::Fail(code) => {
            let mut g = shared.lock();
            g.rejected += 1;
            g.injected += 1;
            tracing::warn!("batch failed on purpose with {code}");
            return answer(status_from(code), vec![format!("injected failure {code}")]);
        }
        Injected::Needle(needle, status) => {
            if !needle.is_empty() && contains(&bytes, needle.as_bytes()) {
                let mut g = shared.lock();
                g.rejected += 1;
                g.injected += 1;
                tracing::warn!("batch rejected on purpose with {status}: contains the marker");
                return answer(
                    status,
                    vec!["batchData: contains a record rejected on purpose".to_string()],
                );
            }
        }
    }

    let max_record_bytes = shared
        .max_record_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    match check_batch(&bytes).and_then(|records| check_record_sizes(records, max_record_bytes)) {
        Ok(records) => {
            let n = records.len();
            let mut g = shared.lock();
            g.accepted += 1;
            g.records.extend(records);
            tracing::info!(
                "batch accepted: records={n} bytes={} total_records={}",
                bytes.len(),
                g.records.len()
            );
            (StatusCode::OK, axum::Json(json!({"success": true}))).into_response()
        }
        Err(errors) => {
            shared.lock().rejected += 1;
            tracing::warn!(
                "batch rejected: 422 {} problem(s), first: {}",
                errors.len(),
                errors.first().map(String::as_str).unwrap_or("")
            );
            answer(StatusCode::UNPROCESSABLE_ENTITY, errors)
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `records` when each, re-serialized as JSON, takes at most `max_record_bytes`, else a problem
/// per longer record (up to 20): Akto would answer 200 and its producer drop the record.
pub fn check_record_sizes(
    records: Vec<Value>,
    max_record_bytes: usize,
) -> Result<Vec<Value>, Vec<String>> {
    let mut errors = Vec::new();
    for (i, rec) in records.iter().enumerate() {
        let len = serde_json::to_vec(rec).map_or(usize::MAX, |v| v.len());
        if len > max_record_bytes {
            errors.push(format!(
                "batchData[{i}].(record): {len} bytes, over Akto's ingestion producer \
                 max.request.size ({max_record_bytes}, AKTO_KAFKA_MAX_REQUEST_SIZE): Akto would \
                 answer 200 and drop it silently"
            ));
            if errors.len() >= MAX_ERRORS {
                break;
            }
        }
    }
    if errors.is_empty() {
        Ok(records)
    } else {
        Err(errors)
    }
}

/// At most this many problems are reported per batch.
const MAX_ERRORS: usize = 20;

/// Validate a whole ingestion body; the records when every rule holds, else every problem
/// found (up to 20), each naming where it is (`batchData[i].field`).
pub fn check_batch(body: &[u8]) -> Result<Vec<Value>, Vec<String>> {
    if body.len() > MAX_BODY_BYTES {
        return Err(vec![format!(
            "body: {} bytes, over the {MAX_BODY_BYTES}-byte limit",
            body.len()
        )]);
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| vec![format!("body: not valid JSON: {e}")])?;
    let Value::Object(mut top) = v else {
        return Err(vec![
            "body: must be a JSON object {\"batchData\":[...]}".to_string()
        ]);
    };
    let Some(Value::Array(batch)) = top.remove("batchData") else {
        return Err(vec!["batchData: missing or not an array".to_string()]);
    };
    let mut errors = Vec::new();
    for (i, rec) in batch.iter().enumerate() {
        if let Err(e) = check_record(rec) {
            errors.push(format!("batchData[{i}].{e}"));
            if errors.len() >= MAX_ERRORS {
                break;
            }
        }
    }
    if errors.is_empty() {
        Ok(batch)
    } else {
        Err(errors)
    }
}

fn digits_i32(s: &str) -> Option<i32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn cut(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Akto's `isPossiblyIncompleteJson`: non-empty, and starts with `{` without ending with `}`,
/// or starts with `[` without ending with `]`. One Akto version applies it to the body as is,
/// another to the body trimmed (Java's `trim`: characters up to U+0020); strict, this fires
/// when either would.
pub fn possibly_incomplete_json(body: &str) -> bool {
    fn fires(s: &str) -> bool {
        (s.starts_with('{') && !s.ends_with('}')) || (s.starts_with('[') && !s.ends_with(']'))
    }
    fires(body) || fires(body.trim_matches(|c: char| c <= ' '))
}

/// Akto's `HttpResponseParams.validHttpResponseCode`: the status codes its runtime keeps.
pub fn akto_keeps_status(code: i32) -> bool {
    code >= 200 && (code < 300 || code == 302)
}

/// The extensions of Akto's default `allowRedundantEndpointsList`
/// (`AccountSettings.getAllowRedundantEndpointsList` of an account that never set one), as the
/// regex alternatives they are: the union of its releases' lists (the newest adds `js.map` and
/// `ico`; an older one has `.pptx` and `.json`, whose `.` matches any character).
pub const REDUNDANT_EXTENSIONS: [&str; 29] = [
    "htm", "html", "css", "js", "js.map", "jpg", "jpeg", "png", "gif", "svg", "webp", "mp4",
    "webm", "ogg", "ogv", "avi", "mov", "mp3", "wav", "oga", "woff", "woff2", "ttf", "otf", "pptx",
    "json", "ico", ".pptx", ".json",
];

/// What Java's regex `.` matches: any character but a line terminator.
fn java_dot(c: char) -> bool {
    !matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// Whether `url` fully matches Akto's redundant-endpoint pattern built by
/// `Utils.createRegexPatternFromList(REDUNDANT_EXTENSIONS)`: `.*\.(ext|...)(\?.*)?`
/// (case-sensitive, as Java compiles it). The extension must end where the URL ends or where a
/// `?` starts the rest.
pub fn redundant_endpoint(url: &str) -> bool {
    let chars: Vec<char> = url.chars().collect();
    let mut ends = vec![chars.len()];
    for (i, &c) in chars.iter().enumerate() {
        if c == '?' && chars[i + 1..].iter().all(|&c| java_dot(c)) {
            ends.push(i);
        }
    }
    ends.into_iter().any(|end| {
        REDUNDANT_EXTENSIONS.iter().any(|ext| {
            let n = ext.chars().count();
            let Some(dot) = end.checked_sub(n + 1) else {
                return false;
            };
            chars[dot] == '.'
                && chars[..dot].iter().all(|&c| java_dot(c))
                && ext.chars().zip(&chars[dot + 1..end]).all(|(e, &c)| {
                    if e == '.' {
                        java_dot(c)
                    } else {
                        e == c
                    }
                })
        })
    })
}

/// `SampleParser.isPossiblyIncompleteJson` of Akto releases up to 018552b4, beyond what
/// [`possibly_incomplete_json`] covers: an empty or blank body (`json.trim().isEmpty()`), or one
/// ending with `[` (its `json.endsWith("[") && !json.endsWith("]")`).
pub fn blank_or_open_bracket(body: &str) -> bool {
    // `rawToJsonString` trims the body first (Java's `trim`: characters up to U+0020).
    let trimmed = body.trim_matches(|c: char| c <= ' ');
    trimmed.is_empty() || trimmed.ends_with('[')
}

fn object_string(
    field: &str,
    s: &str,
    headers: bool,
) -> Result<serde_json::Map<String, Value>, String> {
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(s) else {
        return Err(format!(
            "{field}: must be a JSON object encoded as a string"
        ));
    };
    for (k, v) in &map {
        if !v.is_string() {
            return Err(format!("{field}: value of {k:?} must be a string"));
        }
        if headers && k.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!("{field}: header key {k:?} must be lowercase"));
        }
    }
    Ok(map)
}

/// Validate one record; the error starts with the field name.
pub fn check_record(rec: &Value) -> Result<(), String> {
    let Value::Object(map) = rec else {
        return Err("(record): must be a JSON object".to_string());
    };
    for f in REQUIRED_FIELDS {
        if !map.contains_key(f) {
            return Err(format!("{f}: missing"));
        }
    }
    for (k, v) in map {
        if k == "publishToGuardrails" {
            if !v.is_boolean() {
                return Err(format!("{k}: must be a boolean"));
            }
            continue;
        }
        match v {
            Value::String(s) if s.len() > MAX_STRING_BYTES => {
                return Err(format!(
                    "{k}: {} bytes, over the {MAX_STRING_BYTES}-byte string limit",
                    s.len()
                ))
            }
            Value::String(_) => {}
            _ => return Err(format!("{k}: must be a string")),
        }
    }
    let s = |f: &str| map.get(f).and_then(Value::as_str).unwrap_or_default();
    let source = s("source");
    if !ALLOWED_SOURCES.contains(&source) {
        return Err(format!(
            "source: {:?} is not one of {}",
            cut(source),
            ALLOWED_SOURCES.join(",")
        ));
    }
    if digits_i32(s("time")).is_none_or(|t| t <= 0) {
        return Err(format!(
            "time: {:?} is not a positive 32-bit integer of epoch seconds",
            cut(s("time"))
        ));
    }
    for f in ["statusCode", "akto_account_id", "akto_vxlan_id"] {
        if digits_i32(s(f)).is_none() {
            return Err(format!("{f}: {:?} is not numeric", cut(s(f))));
        }
    }
    if let Some(code) = digits_i32(s("statusCode")).filter(|&c| !akto_keeps_status(c)) {
        return Err(format!(
            "statusCode: {code}: Akto's runtime drops the record (HttpCallParser.\
             filterHttpResponseParams keeps only HttpResponseParams.validHttpResponseCode: \
             200-299 and 302)"
        ));
    }
    let path = s("path");
    if path.to_lowercase().contains("/health") {
        return Err(format!(
            "path: {:?} contains \"/health\" once lowercased: Akto's runtime drops the record \
             (HttpCallParser.filterHttpResponseParams skips health checks)",
            cut(path)
        ));
    }
    if redundant_endpoint(path) {
        return Err(format!(
            "path: {:?} matches Akto's default redundant-endpoint pattern .*\\.({})(\\?.*)?: \
             Akto's runtime drops the record (HttpCallParser.filterHttpResponseParams, \
             AccountSettings.allowRedundantEndpointsList)",
            cut(path),
            REDUNDANT_EXTENSIONS.join("|")
        ));
    }
    let req = object_string("requestHeaders", s("requestHeaders"), true)?;
    object_string("responseHeaders", s("responseHeaders"), true)?;
    object_string("tag", s("tag"), false)?;
    // Akto's runtime (SampleParser): a request whose content-type is exactly application/json,
    // or missing (taken for it), and whose body is possibly incomplete JSON is dropped.
    let content_type = req.get("content-type").and_then(Value::as_str);
    if matches!(content_type, None | Some("application/json"))
        && blank_or_open_bracket(s("requestPayload"))
    {
        return Err(format!(
            "requestPayload: {:?} is empty, blank or ends with '[' while the request \
             content-type is {}: Akto releases up to 018552b4 drop it \
             (SampleParser.isPossiblyIncompleteJson)",
            cut(s("requestPayload")),
            content_type.unwrap_or("missing (taken for application/json)")
        ));
    }
    if matches!(content_type, None | Some("application/json"))
        && possibly_incomplete_json(s("requestPayload"))
    {
        return Err(format!(
            "requestPayload: {:?} starts like JSON but does not end like it while the request \
             content-type is {}: Akto drops it as possibly incomplete JSON",
            cut(s("requestPayload")),
            content_type.unwrap_or("missing (taken for application/json)")
        ));
    }
    match req.get("host").and_then(Value::as_str) {
        None => Err("requestHeaders: host header missing".to_string()),
        Some(h)
            if h.is_empty()
                || !h.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                }) =>
        {
            Err(format!(
                "requestHeaders: host {:?} must use only [a-z0-9.-]",
                cut(h)
            ))
        }
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(time: u32) -> Value {
        json!({
            "path": "/serving-endpoints/bot/invocations",
            "method": "POST",
            "requestHeaders": "{\"host\":\"bot.ai-agent.ws.example.com\"}",
            "responseHeaders": "{}",
            "requestPayload": "{}",
            "responsePayload": "{}",
            "ip": "10.0.0.1",
            "destIp": "",
            "time": time.to_string(),
            "statusCode": "200",
            "status": "OK",
            "type": "HTTP/1.1",
            "akto_account_id": "1000000",
            "akto_vxlan_id": "0",
            "is_pending": "false",
            "source": "MIRRORING",
            "tag": "{}"
        })
    }

    fn body(records: &[Value]) -> Vec<u8> {
        json!({ "batchData": records }).to_string().into_bytes()
    }

    /// POSTs `body` with this `Content-Type` (none when `None`); the status and the answer.
    async fn post(s: &StandIn, content_type: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .post(format!("{}/api/ingestData", s.url()))
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.expect("the stand-in answers");
        let code = resp.status().as_u16();
        (code, resp.json::<Value>().await.unwrap_or(Value::Null))
    }

    #[test]
    fn a_json_request_akto_takes_for_incomplete_is_refused() {
        let with = |payload: &str, headers: &str| {
            let mut r = record(1_700_000_000);
            r["requestPayload"] = json!(payload);
            r["requestHeaders"] = json!(headers);
            check_record(&r)
        };
        let no_ct = "{\"host\":\"bot.ai-agent.ws.example.com\"}";
        let json_ct =
            "{\"host\":\"bot.ai-agent.ws.example.com\",\"content-type\":\"application/json\"}";
        let text_ct = "{\"host\":\"bot.ai-agent.ws.example.com\",\"content-type\":\"text/plain\"}";
        for bad in [
            "{\"a\":",
            "[1,",
            "{\"a\":1}\n",
            "\n{\"a\":",
            "{\"m\":[1 ...[truncated]",
        ] {
            for h in [no_ct, json_ct] {
                let e = with(bad, h).expect_err(bad);
                assert!(e.starts_with("requestPayload:"), "{e}");
            }
            // The same body as text is kept.
            assert_eq!(with(bad, text_ct), Ok(()), "{bad:?}");
        }
        for good in ["{}", "[1]", "{\"a\":1}", "hello {", "plain"] {
            for h in [no_ct, json_ct, text_ct] {
                assert_eq!(with(good, h), Ok(()), "{good:?} {h}");
            }
        }
        // Akto releases up to 018552b4 also drop an empty or blank body, or one ending with
        // `[`, taken for JSON; as text it is kept.
        for old_release in ["", " ", "\n\t ", "see [", "[1,["] {
            for h in [no_ct, json_ct] {
                let e = with(old_release, h).expect_err(old_release);
                assert!(e.starts_with("requestPayload:"), "{e}");
                assert!(e.contains("018552b4"), "{e}");
            }
            assert_eq!(with(old_release, text_ct), Ok(()), "{old_release:?}");
        }
        // Only the exact application/json counts (Akto compares with equals).
        let charset = "{\"host\":\"h\",\"content-type\":\"application/json; charset=utf-8\"}";
        assert_eq!(with("{\"a\":", charset), Ok(()));
    }

    #[test]
    fn only_status_codes_akto_keeps_are_accepted() {
        let with = |code: &str| {
            let mut r = record(1_700_000_000);
            r["statusCode"] = json!(code);
            check_record(&r)
        };
        for kept in ["200", "201", "204", "299", "302"] {
            assert_eq!(with(kept), Ok(()), "{kept}");
        }
        for dropped in [
            "0", "100", "199", "300", "301", "304", "400", "429", "500", "503",
        ] {
            let e = with(dropped).expect_err(dropped);
            assert!(e.starts_with("statusCode:"), "{e}");
            assert!(e.contains("validHttpResponseCode"), "{e}");
        }
    }

    #[test]
    fn paths_akto_filters_out_are_refused() {
        let with = |path: &str| {
            let mut r = record(1_700_000_000);
            r["path"] = json!(path);
            check_record(&r)
        };
        for dropped in [
            "/serving-endpoints/healthcare-assistant/invocations",
            "/tools/HEALTH_check",
            "/a/Health",
            "/health",
            "/tables/c.s.t.json",
            "/tools/app.js",
            "/tools/map.js.map",
            "/tools/map.jsXmap",
            "/tools/x.png?size=1",
            "/tools/a.b.woff2",
            "/tools/deck..pptx",
            "/tools/ajson.xjson",
        ] {
            let e = with(dropped).expect_err(dropped);
            assert!(e.starts_with("path:"), "{e}");
            assert!(e.contains("filterHttpResponseParams"), "{e}");
        }
        for kept in [
            "/serving-endpoints/%68ealthcare-assistant/invocations",
            "/tools/my-health",
            "/tools/x%2Ejson",
            "/tools/x.jsx",
            "/tools/x.js.js1",
            "/tools/x.JSON",
            "/tables/c.s.t/invocations",
            "/tools/json",
            "/tools/x.json/more",
            "/tools/x.json\n?q",
        ] {
            assert_eq!(with(kept), Ok(()), "{kept:?}");
        }
    }

    #[test]
    fn redundant_endpoint_agrees_with_akto_own_test() {
        // Akto's HttpCallParserTest.testRedundantUrlCheck, with the list ["js"] replaced by the
        // default list (which holds js).
        assert!(redundant_endpoint("test1.js"));
        assert!(!redundant_endpoint("test2.jsx"));
        assert!(!redundant_endpoint("test3.js.js1"));
        assert!(redundant_endpoint("test4.js?temp=test"));
        assert!(redundant_endpoint("test5.js.js"));
    }

    #[tokio::test]
    async fn content_type_must_be_application_json() {
        let s = StandIn::start(StandInConfig::default()).await.unwrap();
        for ct in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            let (code, answer) = post(&s, ct, body(&[record(1_700_000_000)])).await;
            assert_eq!(code, 415, "{ct:?}");
            assert!(
                answer["actionErrors"][0]
                    .as_str()
                    .is_some_and(|e| e.contains("application/json")),
                "{answer}"
            );
        }
        assert!(s.records().is_empty(), "a refused batch stores nothing");
        assert_eq!(s.rejected_batches(), 3);
        for ct in ["application/json", "Application/JSON; charset=utf-8"] {
            let (code, answer) = post(&s, Some(ct), body(&[record(1_700_000_001)])).await;
            assert_eq!(code, 200, "{ct}: {answer}");
        }
        assert_eq!(s.records().len(), 2);
        s.shutdown().await;
    }

    #[tokio::test]
    async fn fail_all_and_reject_matching_play_a_proxy_in_front() {
        let s = StandIn::start(StandInConfig::default()).await.unwrap();
        s.set_behavior(Behavior::FailAll { status: 407 });
        for _ in 0..3 {
            let (code, _) = post(&s, Some("application/json"), body(&[record(1)])).await;
            assert_eq!(code, 407);
        }
        assert_eq!(s.injected_failures(), 3);
        s.set_behavior(Behavior::RejectMatching {
            needle: "\"1700000007\"".into(),
            status: 400,
        });
        let bad = body(&[record(1_700_000_006), record(1_700_000_007)]);
        let (code, _) = post(&s, Some("application/json"), bad).await;
        assert_eq!(code, 400);
        let good = body(&[record(1_700_000_006)]);
        let (code, _) = post(&s, Some("application/json"), good).await;
        assert_eq!(code, 200);
        assert_eq!(s.records(), vec![record(1_700_000_006)]);
        s.shutdown().await;
    }

    #[tokio::test]
    async fn slow_read_still_accepts_the_whole_body() {
        let s = StandIn::start(StandInConfig::default()).await.unwrap();
        s.set_behavior(Behavior::SlowRead {
            bytes_per_sec: 64 * 1024,
        });
        let records: Vec<Value> = (0..50).map(|i| record(1_700_000_000 + i)).collect();
        let (code, answer) = post(&s, Some("application/json"), body(&records)).await;
        assert_eq!(code, 200, "{answer}");
        assert_eq!(s.records(), records);
        s.shutdown().await;
    }
}
