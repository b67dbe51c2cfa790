//! Delivery sinks: where finished Akto traffic records go.
//!
//! This module exists so the rest of the connector never cares *how* records reach Akto. The
//! traffic module hands over pre-encoded records ([`OutRecord`]); a sink reports, per record,
//! whether it was delivered or permanently rejected ([`BatchOutcome`]), or fails with a
//! [`SinkError`] that says what was delivered before the failure. The state module checkpoints
//! only what a sink reported as delivered (acknowledge, then checkpoint).
//!
//! Sinks:
//! - [`HttpSink`]: Akto's Data Ingestion Service (`POST {url}/api/ingestData`).
//! - [`FileSink`]: JSON lines to a file or stdout, for dry runs and inspection.
//! - [`KafkaSink`]: Akto's `akto.api.logs` topic, with an idempotent producer.
//!
//! Architecture Invariant: sinks never re-parse or modify a record; what the traffic module
//! encoded is exactly what is sent. Secrets (the JWT) never appear in logs, errors or Debug.

use std::ops::Range;
use std::time::Duration;

mod akto_size;
mod file;
mod http;
mod kafka;

pub use akto_size::{
    akto_escape_growth, akto_limit_for, akto_size_upper_bound, AKTO_FIXED_OVERHEAD_BYTES,
    AKTO_MAX_GROWTH_FACTOR,
};
pub use file::FileSink;
pub use http::{HttpSink, HttpSinkConfig, DEFAULT_REQUEST_TIMEOUT, UPLOAD_FLOOR_BYTES_PER_SEC};
pub use kafka::{
    KafkaSink, KafkaSinkConfig, DEFAULT_KAFKA_MAX_MESSAGE_BYTES, DEFAULT_KAFKA_MESSAGE_TIMEOUT,
    DEFAULT_KAFKA_TOPIC, KAFKA_MESSAGE_OVERHEAD_BYTES, KAFKA_QUEUE_MAX_KBYTES,
};

/// Akto's Data Ingestion Service refuses request bodies larger than this (10 MiB).
pub const MAX_BODY_BYTES: usize = 10_485_760;
/// Akto's own connectors send batches of 50 records.
pub const MAX_RECORDS_PER_BATCH: usize = 50;
/// `{"batchData":[` + `]}`: the bytes the HTTP body adds around the records.
pub const BODY_WRAPPER_BYTES: usize = BODY_PREFIX.len() + BODY_SUFFIX.len();

/// Akto's ingestion producer's `max.request.size` when `AKTO_KAFKA_MAX_REQUEST_SIZE` is unset, in
/// current Akto releases (older ones keep Kafka's 1,048,576). A record Akto re-encodes to more
/// is dropped by Akto after it answered 200.
pub const AKTO_PRODUCER_MAX_REQUEST_BYTES: usize = 5_242_880;
/// What the default of `AKTO_MAX_RECORD_BYTES` leaves below
/// [`AKTO_PRODUCER_MAX_REQUEST_BYTES`] for Akto's re-encoding of a record (see
/// [`akto_size_upper_bound`]): at most [`AKTO_FIXED_OVERHEAD_BYTES`] (1 KiB) for the field names,
/// quotes and Kafka's framing whatever the record holds, and 63 KiB for characters Java escapes
/// and serde does not: about 8,000 emoji (+8 bytes each) or 16,000 combining marks (+4) per
/// record. Text in Latin, Cyrillic, Greek, Hebrew, Arabic, CJK or Hangul letters does not grow;
/// a record near the limit dense in emoji or marks (Indic or Thai vowel signs) may outgrow it
/// unless the limit is applied per record with [`AnySink::max_record_bytes_for`].
pub const AKTO_REENCODING_MARGIN_BYTES: usize = 64 * 1024;
/// Default of `AKTO_MAX_RECORD_BYTES`: 5,177,344 = 5,242,880 - 64 KiB.
pub const DEFAULT_AKTO_MAX_RECORD_BYTES: usize =
    AKTO_PRODUCER_MAX_REQUEST_BYTES - AKTO_REENCODING_MARGIN_BYTES;
/// Lowest `AKTO_MAX_RECORD_BYTES` accepted (64 KiB).
pub const MIN_AKTO_MAX_RECORD_BYTES: usize = 64 * 1024;
/// Highest `AKTO_MAX_RECORD_BYTES` accepted: a record alone in one request of Akto's 10 MiB body
/// limit (10,485,744).
pub const MAX_AKTO_MAX_RECORD_BYTES: usize = MAX_BODY_BYTES - BODY_WRAPPER_BYTES;

pub(crate) const BODY_PREFIX: &str = "{\"batchData\":[";
pub(crate) const BODY_SUFFIX: &str = "]}";

/// One Akto traffic record, already serialized once by the traffic module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    /// The agent's synthetic host; used as the Kafka message key.
    pub key: String,
    /// One flat Akto record as compact JSON (a single line).
    pub json: String,
}

/// What happened to each record of a batch handed to [`AnySink::deliver`].
///
/// Indices refer to positions in the slice passed to `deliver`. On `Ok`, every index appears
/// exactly once, either in `delivered` or in `rejected`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Records the sink acknowledged; safe to checkpoint.
    pub delivered: Vec<usize>,
    /// Records the sink refused permanently, with the sink's reason; the caller quarantines them.
    pub rejected: Vec<(usize, String)>,
    /// Set when every record of a batch of two or more was refused (each sent alone) with the
    /// same reason: Akto's HTTP 422 to all of them, or a Kafka topic refusing all of them. The
    /// records are in `rejected` (quarantined like any refused record), but a destination that
    /// refuses everything is more likely misconfigured than fed bad records, so the caller
    /// reports the cycle as failed with this one-line reason (it names the code and the fix).
    pub whole_batch_refused: Option<String>,
}

impl BatchOutcome {
    /// Indices of delivered and rejected records, sorted (handy for checks).
    pub fn all_indices(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self
            .delivered
            .iter()
            .copied()
            .chain(self.rejected.iter().map(|(i, _)| *i))
            .collect();
        all.sort_unstable();
        all
    }
}

/// Why a delivery (or a sink's construction or healthcheck) failed.
///
/// Messages name the setting to fix. They never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A transient failure (connection refused/reset, timeout, HTTP 408/429/5xx, broker down)
    /// that persisted through the retry budget. Retrying later (next cycle) may succeed.
    #[error("{message}")]
    Retriable {
        /// What failed and what to check.
        message: String,
        /// Records of this call that *were* acknowledged before the failure (e.g. a bisection
        /// half that succeeded). Only these may be checkpointed.
        delivered_before_failure: Vec<usize>,
        /// Records of this call that were permanently rejected before the failure.
        rejected_before_failure: Vec<(usize, String)>,
    },
    /// The sink refused our credentials (HTTP 401, a Kafka authentication or authorization
    /// error): a configuration error, not retriable.
    #[error("{message}")]
    Auth {
        /// Says which setting (e.g. `AKTO_JWT_TOKEN`) to fix.
        message: String,
        /// Records acknowledged before the failure (normally none).
        delivered_before_failure: Vec<usize>,
    },
    /// The sink's configuration is unusable (bad URL, bad header value, ...). Not retriable.
    #[error("invalid sink configuration: {field}: {message}")]
    Config {
        /// The setting at fault, e.g. `DATA_INGESTION_SERVICE_URL`.
        field: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The sink, or something on the path to it, answered in a way no retry within the cycle
    /// and no bisection fixes: a redirect, a wrong URL (404/405), or a 4xx that refuses the
    /// requests themselves rather than a record (a proxy, WAF or ingress in between, e.g. a 403,
    /// 400 or 413 to every record of a batch, each sent alone). Not retriable: the records of the
    /// batch stay pending (neither delivered nor quarantined) and go out again next cycle, once
    /// the operator fixed the path or the destination's configuration.
    #[error("{message}")]
    Protocol {
        /// What happened and what to check.
        message: String,
        /// Records acknowledged before the failure.
        delivered_before_failure: Vec<usize>,
        /// Records the sink refused for what they are (e.g. refused alone while others of the
        /// batch were taken) before the failure.
        rejected_before_failure: Vec<(usize, String)>,
    },
    /// Writing the output file failed. Not retriable within the cycle; nothing of the failed
    /// write is reported delivered.
    #[error("could not write records to {target}: {source}; check that --output points to a writable file with free space")]
    Io {
        /// The file (or `stdout`).
        target: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl SinkError {
    /// True when the same delivery may succeed later (the caller keeps state and retries next
    /// cycle); false for configuration problems an operator must fix.
    pub fn is_retriable(&self) -> bool {
        matches!(self, SinkError::Retriable { .. })
    }

    /// Records of the failed call that were acknowledged anyway and may be checkpointed.
    pub fn delivered_before_failure(&self) -> &[usize] {
        match self {
            SinkError::Retriable {
                delivered_before_failure,
                ..
            }
            | SinkError::Auth {
                delivered_before_failure,
                ..
            }
            | SinkError::Protocol {
                delivered_before_failure,
                ..
            } => delivered_before_failure,
            SinkError::Config { .. } | SinkError::Io { .. } => &[],
        }
    }

    /// Records of the failed call that were permanently rejected before the failure.
    pub fn rejected_before_failure(&self) -> &[(usize, String)] {
        match self {
            SinkError::Retriable {
                rejected_before_failure,
                ..
            }
            | SinkError::Protocol {
                rejected_before_failure,
                ..
            } => rejected_before_failure,
            _ => &[],
        }
    }

    /// Attaches what was acknowledged/rejected before this error happened.
    pub(crate) fn with_progress(
        self,
        delivered: Vec<usize>,
        rejected: Vec<(usize, String)>,
    ) -> SinkError {
        match self {
            SinkError::Retriable { message, .. } => SinkError::Retriable {
                message,
                delivered_before_failure: delivered,
                rejected_before_failure: rejected,
            },
            SinkError::Auth { message, .. } => SinkError::Auth {
                message,
                delivered_before_failure: delivered,
            },
            SinkError::Protocol { message, .. } => SinkError::Protocol {
                message,
                delivered_before_failure: delivered,
                rejected_before_failure: rejected,
            },
            other => other,
        }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> SinkError {
        SinkError::Protocol {
            message: message.into(),
            delivered_before_failure: Vec::new(),
            rejected_before_failure: Vec::new(),
        }
    }

    pub(crate) fn retriable(message: impl Into<String>) -> SinkError {
        SinkError::Retriable {
            message: message.into(),
            delivered_before_failure: Vec::new(),
            rejected_before_failure: Vec::new(),
        }
    }
}

/// How hard a sink retries transient failures inside one `deliver` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, including the first (at least 1).
    pub max_attempts: u32,
    /// Total time budget of one `deliver` call for retries; no new wait starts past it.
    pub max_elapsed: Duration,
    /// Delay before the first retry; doubles on each further retry.
    pub base_delay: Duration,
    /// Cap on one computed delay (a server's Retry-After may ask for longer, within budget).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            max_elapsed: Duration::from_secs(60),
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The jittered delay before retry number `retry` (1 = first retry): uniformly random in
    /// `[d/2, d]` where `d = min(max_delay, base_delay * 2^(retry-1))`, and never less than
    /// the server's `retry_after` when one was given.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let exp = retry.saturating_sub(1).min(31);
        let d = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        let half = d / 2;
        let jitter_nanos = u64::try_from((d - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if jitter_nanos == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(rand::random_range(0..=jitter_nanos))
        };
        let computed = half + jitter;
        match retry_after {
            Some(ra) if ra > computed => ra,
            _ => computed,
        }
    }
}

/// Size in bytes of the HTTP body `{"batchData":[r1,r2,...]}` for these records.
pub fn body_len(records: &[OutRecord]) -> usize {
    BODY_WRAPPER_BYTES
        + records.iter().map(|r| r.json.len()).sum::<usize>()
        + records.len().saturating_sub(1)
}

/// Splits `records` into consecutive batches of at most `max_records` records whose HTTP body
/// (wrapper and commas included) is at most `max_body_bytes`.
///
/// A record that alone exceeds `max_body_bytes` gets a range of its own; `deliver` then rejects
/// it without sending. Ranges cover every index exactly once, in order. `max_records == 0` is
/// treated as 1.
pub fn plan_batches(
    records: &[OutRecord],
    max_records: usize,
    max_body_bytes: usize,
) -> Vec<Range<usize>> {
    plan_by_len(
        records.iter().map(|r| r.json.len()),
        max_records,
        max_body_bytes,
    )
}

/// [`plan_batches`] over record lengths; ranges index the iterator's positions.
pub(crate) fn plan_by_len(
    lens: impl Iterator<Item = usize>,
    max_records: usize,
    max_body_bytes: usize,
) -> Vec<Range<usize>> {
    let max_records = max_records.max(1);
    let mut out = Vec::new();
    let mut start = 0usize;
    let mut size = BODY_WRAPPER_BYTES;
    let mut total = 0usize;
    for (i, len) in lens.enumerate() {
        total = i + 1;
        let n = i - start;
        let added = len.saturating_add(usize::from(n > 0));
        if n > 0 && (n >= max_records || size.saturating_add(added) > max_body_bytes) {
            out.push(start..i);
            start = i;
            size = BODY_WRAPPER_BYTES.saturating_add(len);
        } else {
            size = size.saturating_add(added);
        }
        if size > max_body_bytes {
            // Oversized alone: its own range, and the next batch starts fresh.
            out.push(start..i + 1);
            start = i + 1;
            size = BODY_WRAPPER_BYTES;
        }
    }
    if start < total {
        out.push(start..total);
    }
    out
}

/// The configured sink, dispatched by enum (no trait objects, no async-trait).
// One sink lives per process, so variant size does not matter; keeping the variants unboxed
// keeps the `AnySink::Http(HttpSink)` shape the rest of the connector matches on.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnySink {
    /// Akto's Data Ingestion Service.
    Http(HttpSink),
    /// JSON lines to a file or stdout.
    File(FileSink),
    /// Akto's Kafka topic.
    Kafka(KafkaSink),
}

impl AnySink {
    /// Short name for logs and config: `http`, `file`, `kafka`.
    pub fn name(&self) -> &'static str {
        match self {
            AnySink::Http(_) => "http",
            AnySink::File(_) => "file",
            AnySink::Kafka(_) => "kafka",
        }
    }

    /// Human description of the destination, without secrets.
    pub fn describe(&self) -> String {
        match self {
            AnySink::Http(s) => s.describe(),
            AnySink::File(s) => s.describe(),
            AnySink::Kafka(s) => s.describe(),
        }
    }

    /// A cheap check run once at start so a wrong destination fails before data moves.
    pub async fn healthcheck(&self) -> Result<(), SinkError> {
        match self {
            AnySink::Http(s) => s.healthcheck().await,
            AnySink::File(s) => s.healthcheck().await,
            AnySink::Kafka(s) => s.healthcheck().await,
        }
    }

    /// Delivers one batch; see [`BatchOutcome`] and [`SinkError`] for what may be checkpointed.
    pub async fn deliver(&self, batch: &[OutRecord]) -> Result<BatchOutcome, SinkError> {
        match self {
            AnySink::Http(s) => s.deliver(batch).await,
            AnySink::File(s) => s.deliver(batch).await,
            AnySink::Kafka(s) => s.deliver(batch).await,
        }
    }

    /// The longest record (its JSON) this sink can deliver; the connector cuts the payloads of a
    /// longer one to fit. HTTP and file: `AKTO_MAX_RECORD_BYTES` (what Akto's ingestion producer
    /// takes after its re-encoding, see [`DEFAULT_AKTO_MAX_RECORD_BYTES`]; the file holds what
    /// would go to Akto); Kafka: the message size limit, `KAFKA_MAX_MESSAGE_BYTES`.
    pub fn max_record_bytes(&self) -> usize {
        match self {
            AnySink::Http(s) => s.max_record_bytes(),
            AnySink::File(s) => s.max_record_bytes(),
            AnySink::Kafka(s) => s.max_record_bytes(),
        }
    }

    /// [`Self::max_record_bytes`] for this record (its JSON): for HTTP and file, lowered by what
    /// Akto's re-encoding may add to it (Java escapes emoji, combining marks and control
    /// characters our JSON holds raw, see [`akto_limit_for`]), so that `json.len()` at most this
    /// also fits Akto's producer once re-encoded. Costs nothing for a record under a sixth of the
    /// limit; one pass over the text otherwise. Kafka: the message limit (no re-encoding).
    pub fn max_record_bytes_for(&self, json: &str) -> usize {
        match self {
            AnySink::Http(_) | AnySink::File(_) => akto_limit_for(json, self.max_record_bytes()),
            AnySink::Kafka(s) => s.max_record_bytes(),
        }
    }

    /// The setting [`Self::max_record_bytes`] comes from, to name in messages.
    pub fn limit_setting(&self) -> &'static str {
        match self {
            AnySink::Http(_) | AnySink::File(_) => "AKTO_MAX_RECORD_BYTES",
            AnySink::Kafka(_) => "KAFKA_MAX_MESSAGE_BYTES, else the topic's max.message.bytes",
        }
    }

    /// Called before a delivery stage maps records, so that [`Self::max_record_bytes`] is the
    /// destination's own limit (a Kafka topic's `max.message.bytes`, read once it answers).
    pub async fn prepare(&self) {
        if let AnySink::Kafka(s) = self {
            s.prepare().await
        }
    }

    /// Makes what `deliver` confirmed durable, before state records it: a regular file is fsynced
    /// (its `deliver` stops at the kernel, so one fsync covers a whole checkpoint; a pipe or
    /// device is only flushed, it has nothing to sync). Kafka (`acks=all`) confirmations are
    /// durable already. HTTP's 200 is Akto's hand-off, not durability: Akto's ingestion service
    /// answers before its own Kafka producer (`retries=0`, asynchronous) wrote the records, so a
    /// broker outage or a record over its `max.request.size` can still lose them there, and
    /// nothing can be done here about that; the Kafka sink is the durable path.
    pub async fn sync_confirmed(&self) -> Result<(), SinkError> {
        match self {
            AnySink::File(s) => s.flush().await,
            AnySink::Http(_) | AnySink::Kafka(_) => Ok(()),
        }
    }

    /// Makes everything delivered so far durable at the destination.
    pub async fn flush(&self) -> Result<(), SinkError> {
        match self {
            AnySink::Http(_) => Ok(()),
            AnySink::File(s) => s.flush().await,
            AnySink::Kafka(s) => s.flush().await,
        }
    }

    /// [`Self::flush`] bounded by `within`, for shutdown: a Kafka sink waits at most `within`
    /// for its queued and in-flight records, then purges them (their fate stays unknown, they
    /// were never reported delivered, so they stay pending), so that no thread of the producer
    /// outlives the call by much. HTTP holds nothing back; a file is flushed (not bounded: a
    /// local write).
    pub async fn flush_within(&self, within: Duration) -> Result<(), SinkError> {
        match self {
            AnySink::Http(_) => Ok(()),
            AnySink::File(s) => s.flush().await,
            AnySink::Kafka(s) => s.flush_within(within).await,
        }
    }

    /// Flushes and releases resources; the sink should not be used afterwards.
    pub async fn close(&self) -> Result<(), SinkError> {
        match self {
            AnySink::Http(_) => Ok(()),
            AnySink::File(s) => s.flush().await,
            AnySink::Kafka(s) => s.flush().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(len: usize) -> OutRecord {
        // A JSON string literal of exactly `len` bytes (len >= 2).
        OutRecord {
            key: "h".into(),
            json: format!("\"{}\"", "x".repeat(len.saturating_sub(2))),
        }
    }

    fn check_plan(records: &[OutRecord], max_records: usize, max_body: usize) {
        let plan = plan_batches(records, max_records, max_body);
        let mut next = 0;
        for r in &plan {
            assert_eq!(r.start, next, "ranges must be contiguous: {plan:?}");
            assert!(r.end > r.start, "no empty ranges: {plan:?}");
            next = r.end;
            let batch = &records[r.clone()];
            assert!(batch.len() <= max_records.max(1));
            if batch.len() > 1 {
                assert!(body_len(batch) <= max_body, "{plan:?}");
            }
        }
        assert_eq!(next, records.len());
        // Greedy: a batch could not have taken the next record.
        for w in plan.windows(2) {
            let with_next = &records[w[0].start..w[1].start + 1];
            let single_oversized = body_len(&records[w[0].clone()]) > max_body
                || body_len(&records[w[1].start..w[1].start + 1]) > max_body;
            assert!(
                single_oversized
                    || with_next.len() > max_records.max(1)
                    || body_len(with_next) > max_body,
                "not greedy at {w:?}"
            );
        }
    }

    #[test]
    fn body_len_counts_wrapper_and_commas() {
        assert_eq!(body_len(&[]), 16);
        let rs = vec![rec(10), rec(20), rec(30)];
        let body = format!(
            "{BODY_PREFIX}{}{BODY_SUFFIX}",
            rs.iter()
                .map(|r| r.json.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(body_len(&rs), body.len());
    }

    #[test]
    fn plan_splits_by_count() {
        let rs: Vec<_> = (0..120).map(|_| rec(10)).collect();
        let plan = plan_batches(&rs, 50, MAX_BODY_BYTES);
        assert_eq!(plan, vec![0..50, 50..100, 100..120]);
        check_plan(&rs, 50, MAX_BODY_BYTES);
    }

    #[test]
    fn plan_splits_by_bytes_exactly_at_limit() {
        // Two records of 42 bytes: 16 + 42 + 1 + 42 = 101.
        let rs = vec![rec(42), rec(42), rec(42)];
        assert_eq!(plan_batches(&rs, 50, 101), vec![0..2, 2..3]);
        assert_eq!(plan_batches(&rs, 50, 100), vec![0..1, 1..2, 2..3]);
        // Three fit in 16 + 3*42 + 2 = 144.
        assert_eq!(plan_batches(&rs, 50, 144), vec![0..3]);
    }

    #[test]
    fn plan_isolates_oversized_record() {
        let rs = vec![rec(10), rec(10), rec(500), rec(10)];
        let plan = plan_batches(&rs, 50, 100);
        assert_eq!(plan, vec![0..2, 2..3, 3..4]);
        check_plan(&rs, 50, 100);
        // First record oversized.
        let rs = vec![rec(500), rec(10)];
        assert_eq!(plan_batches(&rs, 50, 100), vec![0..1, 1..2]);
        // Exactly at the limit alone is fine: 16 + 84 = 100.
        let rs = vec![rec(84)];
        assert_eq!(plan_batches(&rs, 50, 100), vec![0..1]);
        assert!(body_len(&rs) <= 100);
    }

    #[test]
    fn plan_empty_and_zero_count() {
        assert!(plan_batches(&[], 50, 100).is_empty());
        let rs = vec![rec(5), rec(5)];
        assert_eq!(plan_batches(&rs, 0, 1000), vec![0..1, 1..2]);
    }

    #[test]
    fn plan_property_random_sizes() {
        // Deterministic pseudo-random sizes; exercises many shapes.
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..300 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = (seed % 40) as usize;
            let max_records = 1 + (seed >> 8) as usize % 7;
            let max_body = 20 + (seed >> 16) as usize % 200;
            let rs: Vec<_> = (0..n)
                .map(|i| rec(2 + ((seed >> (i % 50)) as usize % 120)))
                .collect();
            check_plan(&rs, max_records, max_body);
        }
    }

    #[test]
    fn retry_delay_is_capped_jittered_and_honours_retry_after() {
        let p = RetryPolicy {
            max_attempts: 5,
            max_elapsed: Duration::from_secs(60),
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        };
        for _ in 0..50 {
            let d1 = p.delay(1, None);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = p.delay(3, None);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d20 = p.delay(20, None);
            assert!(d20 >= Duration::from_millis(500) && d20 <= Duration::from_millis(1000));
            assert_eq!(
                p.delay(1, Some(Duration::from_secs(5))),
                Duration::from_secs(5)
            );
        }
        assert!(p.delay(u32::MAX, None) <= Duration::from_millis(1000));
    }

    #[test]
    fn error_progress_and_retriability() {
        let e = SinkError::retriable("x").with_progress(vec![1, 2], vec![(3, "bad".into())]);
        assert!(e.is_retriable());
        assert_eq!(e.delivered_before_failure(), &[1, 2]);
        assert_eq!(e.rejected_before_failure().len(), 1);
        let a = SinkError::Auth {
            message: "m".into(),
            delivered_before_failure: vec![],
        };
        assert!(!a.is_retriable());
    }
}
