//! The Kafka sink: records straight to Akto's `akto.api.logs` topic.
//!
//! It exists for deployments where Akto's traffic processor reads Kafka directly
//! (`KAFKA_BROKER_HOST`). It keeps the HTTP sink's guarantee: a record is reported delivered only
//! after its delivery report came back successful from an idempotent producer with `acks=all`,
//! and `deliver` awaits every report before returning, so no record of a call is left in flight
//! with an unknown fate.
//!
//! A broker that stalls is ridden out inside the producer's idempotent session: a request that
//! gets no answer times out after a quarter of the delivery time-out (at most 30 s) and is sent
//! again with the same sequence numbers, which the broker de-duplicates; only a stall past the
//! delivery time-out itself fails records, and those the broker may have stored already are
//! counted in a warning (they are sent again: possible duplicates). After such a time-out, or an
//! error that says the broker no longer accepts the producer's session, the producer is replaced.
//!
//! Architecture Invariant: the SASL password is only ever handed to librdkafka; it never appears
//! in Debug output, logs or errors (rdkafka's own `ClientConfig` Debug would print it, so this
//! module never keeps or formats one).

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::bindings::{
    rd_kafka_message_produce_errstr, rd_kafka_message_status, rd_kafka_msg_status_t,
};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use secrecy::{ExposeSecret, SecretString};

use super::{BatchOutcome, OutRecord, SinkError, MAX_BODY_BYTES};

/// Bound on the producer's in-memory queue (`queue.buffering.max.kbytes`): 64 MiB.
pub const KAFKA_QUEUE_MAX_KBYTES: usize = 64 * 1024;
/// The message size limit assumed when `KAFKA_MAX_MESSAGE_BYTES` is unset and the topic's own
/// `max.message.bytes` cannot be read: Kafka's default (brokers' `message.max.bytes`).
pub const DEFAULT_KAFKA_MAX_MESSAGE_BYTES: usize = 1_048_588;
/// Room kept in each message for the key (the agent host) and Kafka's record framing: a record's
/// JSON may take the configured limit less this.
pub const KAFKA_MESSAGE_OVERHEAD_BYTES: usize = 1024;

/// The topic Akto's traffic processor reads unless `AKTO_KAFKA_TOPIC_NAME` says otherwise.
pub const DEFAULT_KAFKA_TOPIC: &str = "akto.api.logs";
/// Default bound on how long one record may stay undelivered (`message.timeout.ms`): four times
/// the request time-out, so that a broker stalling for up to about 90 s is ridden out (Kafka's
/// own producer default `delivery.timeout.ms`).
pub const DEFAULT_KAFKA_MESSAGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound on the time-out of one request to a broker (`request.timeout.ms`,
/// `socket.timeout.ms`): a quarter of the message time-out, at most this.
const MAX_KAFKA_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the [`KafkaSink`]. Debug output redacts the password.
#[derive(Debug, Clone)]
pub struct KafkaSinkConfig {
    /// `KAFKA_BROKER_HOST`: one or more `host:port`, comma-separated.
    pub brokers: String,
    /// `AKTO_KAFKA_TOPIC_NAME`, default `akto.api.logs`.
    pub topic: String,
    /// `KAFKA_SECURITY_PROTOCOL` (`plaintext`, `sasl_plaintext`, ...); librdkafka's default when None.
    pub security_protocol: Option<String>,
    /// `KAFKA_SASL_MECHANISM` (`PLAIN`, `SCRAM-SHA-256`, ...).
    pub sasl_mechanism: Option<String>,
    /// `KAFKA_SASL_USERNAME`.
    pub sasl_username: Option<String>,
    /// `KAFKA_SASL_PASSWORD` (secret).
    pub sasl_password: Option<SecretString>,
    /// CA certificate file for TLS (`ssl.ca.location`).
    pub ca_file: Option<PathBuf>,
    /// How long librdkafka keeps trying one record (`message.timeout.ms`) before its delivery
    /// report says it failed; bounds one `deliver` call. One request to a broker times out after
    /// a quarter of it, at most 30 s, and is retried within it (see
    /// [`KafkaSinkConfig::request_timeout`]).
    pub message_timeout: Duration,
    /// `KAFKA_MAX_MESSAGE_BYTES`: the topic's message size limit, records are cut to fit it (see
    /// [`KafkaSink::max_record_bytes`]). `None`: the topic's `max.message.bytes`, read by the
    /// health check, else [`DEFAULT_KAFKA_MAX_MESSAGE_BYTES`].
    pub max_message_bytes: Option<usize>,
}

impl KafkaSinkConfig {
    /// Plaintext settings for `brokers` and `topic`, with [`DEFAULT_KAFKA_MESSAGE_TIMEOUT`].
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> KafkaSinkConfig {
        KafkaSinkConfig {
            brokers: brokers.into(),
            topic: topic.into(),
            security_protocol: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ca_file: None,
            message_timeout: DEFAULT_KAFKA_MESSAGE_TIMEOUT,
            max_message_bytes: None,
        }
    }

    /// The time-out of one request to a broker (`request.timeout.ms` and `socket.timeout.ms`):
    /// a quarter of [`Self::message_timeout`], at most 30 s, at least 10 ms. Well below the
    /// message time-out, so that a request lost to a stalled broker is retried (and
    /// de-duplicated by the broker) before any record's delivery fails.
    pub fn request_timeout(&self) -> Duration {
        (self.message_timeout / 4).clamp(Duration::from_millis(10), MAX_KAFKA_REQUEST_TIMEOUT)
    }
}

/// The last client-level error librdkafka reported (e.g. connection refused, SASL failure):
/// delivery reports only say "timed out", this says why.
type LastError = Arc<Mutex<Option<(Option<RDKafkaErrorCode>, String)>>>;

/// The last authentication failure librdkafka reported (wrong SASL credentials or mechanism, an
/// ACL). Kept until the broker answers again: librdkafka does not repeat an identical error, so
/// a later call would otherwise only see time-outs and blame the network.
type AuthFailure = Arc<Mutex<AuthState>>;

#[derive(Default)]
struct AuthState {
    /// The broker's words, until it answers again.
    reason: Option<String>,
    /// Refusals reported so far: a call sees whether one came while it waited.
    reports: u64,
}

/// How often the health check looks for a refused login while its metadata request waits.
const AUTH_POLL: Duration = Duration::from_millis(100);

/// Captures librdkafka's client errors and routes its log lines to `tracing`.
struct SinkContext {
    last_error: LastError,
    auth_failure: AuthFailure,
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        // librdkafka repeats connection errors while a broker is down; the sink's own error
        // carries the last one, so these stay at debug level.
        tracing::debug!(sink = "kafka", ?level, fac, "librdkafka: {log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(sink = "kafka", "librdkafka error: {error}: {reason}");
        if let Ok(mut last) = self.last_error.lock() {
            let code = error.rdkafka_error_code();
            // "n/m brokers are down" follows the specific cause (refused, DNS, TLS, SASL):
            // keep the cause.
            if !(code == Some(RDKafkaErrorCode::AllBrokersDown) && last.is_some()) {
                *last = Some((code, reason.to_string()));
            }
        }
        // librdkafka's words for a refused login or an unsupported mechanism (its error code
        // is not always an authentication one).
        // Not "broker might require SASL authentication": librdkafka's guess for any early
        // disconnect of a plaintext client.
        let refused = [
            "SASL authentication error",
            "SASL authentication failure",
            "mechanism handshake failed",
        ]
        .iter()
        .any(|w| reason.contains(w));
        if code_is_auth(&error) || refused {
            if let Ok(mut auth) = self.auth_failure.lock() {
                auth.reason = Some(reason.to_string());
                auth.reports += 1;
            }
        }
    }
}

/// What librdkafka's delivery report said about one record.
struct Report {
    /// `None`: the broker acknowledged it.
    error: Option<KafkaError>,
    /// librdkafka's message status said the broker may have stored it although the delivery
    /// failed (it timed out after being sent).
    possibly_persisted: bool,
    /// The broker's own words about a refused record, when it gave any.
    broker_reason: Option<String>,
}

impl Report {
    fn of(result: &DeliveryResult<'_>) -> Report {
        match result {
            Ok(_) => Report {
                error: None,
                possibly_persisted: false,
                broker_reason: None,
            },
            Err((e, msg)) => Report {
                error: Some(e.clone()),
                possibly_persisted: possibly_persisted(msg),
                broker_reason: produce_errstr(msg),
            },
        }
    }
}

/// `rd_kafka_message_status`: whether a failed record may be stored nevertheless.
fn possibly_persisted(msg: &BorrowedMessage<'_>) -> bool {
    // SAFETY: `msg` borrows a message librdkafka keeps alive for the whole delivery callback.
    let status = unsafe { rd_kafka_message_status(msg.ptr()) };
    status == rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_POSSIBLY_PERSISTED
}

/// `rd_kafka_message_produce_errstr`: the broker's error message for a refused record.
fn produce_errstr(msg: &BorrowedMessage<'_>) -> Option<String> {
    // SAFETY: as above; the returned string, when not null, lives as long as the message and is
    // copied before the callback returns.
    let text = unsafe {
        let p = rd_kafka_message_produce_errstr(msg.ptr());
        if p.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    };
    let text = text.trim().to_string();
    (!text.is_empty()).then_some(text)
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Box<tokio::sync::oneshot::Sender<Report>>;

    fn delivery(&self, result: &DeliveryResult<'_>, tx: Self::DeliveryOpaque) {
        // The receiver is gone only when its `deliver` call was dropped.
        let _ = tx.send(Report::of(result));
    }
}

/// The producer type this sink uses (clones share one producer and its polling thread).
type SinkProducer = Arc<ThreadedProducer<SinkContext>>;

/// Awaits one record's delivery report.
type DeliveryFuture = tokio::sync::oneshot::Receiver<Report>;

/// Delivers records to a Kafka topic with an idempotent, lz4-compressing producer.
pub struct KafkaSink {
    config: KafkaSinkConfig,
    /// Replaced by a fresh producer when librdkafka reports a fatal error.
    producer: Mutex<SinkProducer>,
    last_error: LastError,
    auth_failure: AuthFailure,
    /// The message size limit in force: the configured one, else the topic's once read.
    message_limit: AtomicUsize,
    /// Whether the topic answered when asked for its limit (with or without one).
    limit_known: AtomicBool,
    /// When the topic was last asked (a broker that does not answer is asked again a minute later).
    limit_asked_at: Mutex<Option<Instant>>,
}

impl fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSink")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The fate of one record.
enum Fate {
    Delivered,
    /// Refused for what it is (too large, invalid, against a broker policy): retried alone
    /// once, then rejected with this reason.
    Refused(String),
    /// Not delivered (yet): the call fails and the record stays pending.
    Failed {
        error: KafkaError,
        /// The broker may have stored it anyway (it timed out after being sent).
        possibly_persisted: bool,
    },
}

impl KafkaSink {
    /// Validates the settings and creates the producer (no connection is made yet).
    pub fn new(config: KafkaSinkConfig) -> Result<KafkaSink, SinkError> {
        if config.brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(SinkError::Config {
                field: "KAFKA_BROKER_HOST",
                message: "is empty; set it to the broker list, e.g. kafka:9092 or a:9092,b:9092"
                    .into(),
            });
        }
        if let Some(bad) = config
            .brokers
            .split(',')
            .map(str::trim)
            .find(|b| !b.is_empty() && !b.contains(':'))
        {
            return Err(SinkError::Config {
                field: "KAFKA_BROKER_HOST",
                message: format!("entry `{bad}` has no port; use host:port, e.g. {bad}:9092"),
            });
        }
        if config.topic.trim().is_empty() {
            return Err(SinkError::Config {
                field: "AKTO_KAFKA_TOPIC_NAME",
                message: "is empty; leave it unset for akto.api.logs".into(),
            });
        }
        let last_error: LastError = Arc::default();
        let auth_failure: AuthFailure = Arc::default();
        let limit = config
            .max_message_bytes
            .unwrap_or(DEFAULT_KAFKA_MAX_MESSAGE_BYTES);
        let producer = create_producer(&config, limit, &last_error, &auth_failure)?;
        let config_sets_limit = config.max_message_bytes.is_some();
        Ok(KafkaSink {
            config,
            producer: Mutex::new(producer),
            last_error,
            auth_failure,
            message_limit: AtomicUsize::new(limit),
            limit_known: AtomicBool::new(config_sets_limit),
            limit_asked_at: Mutex::new(None),
        })
    }

    /// E.g. `Kafka topic akto.api.logs at kafka:9092`.
    pub fn describe(&self) -> String {
        format!(
            "Kafka topic {} at {}",
            self.config.topic, self.config.brokers
        )
    }

    /// The longest record JSON this sink sends: the message size limit less the room for the key
    /// and Kafka's framing; the connector cuts larger records' payloads to fit.
    pub fn max_record_bytes(&self) -> usize {
        self.message_limit()
            .saturating_sub(KAFKA_MESSAGE_OVERHEAD_BYTES)
    }

    /// The message size limit in force (bytes).
    pub fn message_limit(&self) -> usize {
        self.message_limit.load(Ordering::Relaxed)
    }

    /// Before a delivery stage maps records: makes sure the limit records are cut to is the
    /// topic's (see `detect_message_limit`).
    pub async fn prepare(&self) {
        self.detect_message_limit().await;
    }

    /// Without `KAFKA_MAX_MESSAGE_BYTES`: reads the topic's `max.message.bytes` (what a broker
    /// applies to it, its own override or the broker's default) and cuts records to that. A
    /// broker that does not say (no DescribeConfigs permission, an old broker) leaves the default;
    /// one that does not answer (down) is asked again, at most once a minute.
    async fn detect_message_limit(&self) {
        if self.limit_known.load(Ordering::Relaxed) {
            return;
        }
        {
            let Ok(mut at) = self.limit_asked_at.lock() else {
                return;
            };
            if at.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
                return;
            }
            *at = Some(Instant::now());
        }
        let admin: AdminClient<SinkContext> = match client_config(&self.config)
            .0
            .create_with_context(SinkContext {
                last_error: Arc::clone(&self.last_error),
                auth_failure: Arc::clone(&self.auth_failure),
            }) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(
                    "Kafka admin client for the topic's message limit: {}",
                    describe_kafka_error(&e)
                );
                return;
            }
        };
        let timeout = self
            .config
            .message_timeout
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        let opts = AdminOptions::new().request_timeout(Some(timeout));
        let topic = ResourceSpecifier::Topic(&self.config.topic);
        let answer = admin.describe_configs([&topic], &opts).await;
        // Dropping an admin client joins its thread: not on an async worker.
        let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
        let found: Option<usize> = match answer {
            Ok(results) => {
                self.limit_known.store(true, Ordering::Relaxed);
                results
                    .into_iter()
                    .flatten()
                    .find_map(|r| r.get("max.message.bytes")?.value.as_deref()?.parse().ok())
            }
            Err(e) => {
                tracing::debug!(
                    "Kafka DescribeConfigs for {}: {}",
                    self.config.topic,
                    describe_kafka_error(&e)
                );
                return;
            }
        };
        match found {
            Some(n) => {
                let n = usize::min(n, MAX_BODY_BYTES);
                let before = self.message_limit.swap(n, Ordering::Relaxed);
                if batch_bytes(n) < batch_bytes(before) {
                    // The producer batches up to the old limit: a batch could exceed the topic's.
                    self.replace_producer();
                }
                tracing::info!(
                    "Kafka topic {} takes messages up to {n} bytes (its max.message.bytes): larger \
                     records have their payloads cut to fit",
                    self.config.topic
                );
            }
            None => tracing::info!(
                "Kafka topic {}: its max.message.bytes could not be read (DescribeConfigs not \
                 allowed?); assuming Kafka's default {DEFAULT_KAFKA_MAX_MESSAGE_BYTES} bytes. \
                 Set KAFKA_MAX_MESSAGE_BYTES to the topic's limit if it differs",
                self.config.topic
            ),
        }
    }

    /// Fetches the topic's metadata: the brokers answer and the topic exists. A refused login
    /// is reported as soon as the broker refuses it, not after the time-out.
    pub async fn healthcheck(&self) -> Result<(), SinkError> {
        let producer = self.producer()?;
        self.clear_last_error();
        let refusals = self.auth_reports();
        let topic = self.config.topic.clone();
        let timeout = self
            .config
            .message_timeout
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
        // One request with the whole time-out, as librdkafka needs it for a slow or remote
        // broker (it gives up a round that ends before a connection is ready), on its own thread,
        // not the blocking pool: a refused login ends the wait at once, and a request still
        // waiting then does not hold the process at exit (e.g. after `check`).
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("kafka-healthcheck".into())
            .spawn(move || {
                let fetched = producer
                    .client()
                    .fetch_metadata(Some(&topic), timeout)
                    .map(|md| {
                        md.topics()
                            .iter()
                            .find(|t| t.name() == topic)
                            .and_then(|t| t.error())
                            .map(RDKafkaErrorCode::from)
                    });
                let _ = tx.send(fetched);
            })
            .map_err(|e| {
                SinkError::retriable(format!("cannot start the Kafka health check: {e}"))
            })?;
        // Bounded: the request ends at `timeout`, and the thread then answers.
        let res = loop {
            tokio::select! {
                answer = &mut rx => break answer.map_err(|_| {
                    SinkError::retriable("the Kafka health check ended without an answer")
                })?,
                _ = tokio::time::sleep(AUTH_POLL) => {
                    if self.auth_reports() > refusals {
                        return Err(self.auth_error(&KafkaError::MetadataFetch(
                            RDKafkaErrorCode::SaslAuthenticationFailed,
                        )));
                    }
                }
            }
        };
        match res {
            Ok(None) => {
                self.set_auth_failure(None);
                self.detect_message_limit().await;
                Ok(())
            }
            Ok(Some(RDKafkaErrorCode::UnknownTopicOrPartition)) => Err(SinkError::Config {
                field: "AKTO_KAFKA_TOPIC_NAME",
                message: format!(
                    "topic {} does not exist at {} and the broker did not create it; create \
                     it or set AKTO_KAFKA_TOPIC_NAME to the topic Akto's traffic processor reads",
                    self.config.topic, self.config.brokers
                ),
            }),
            Ok(Some(code)) if is_auth(code) => {
                Err(self.auth_error(&KafkaError::MetadataFetch(code)))
            }
            // Leader elections and similar settle by themselves; delivery will wait for them.
            Ok(Some(_)) => Ok(()),
            Err(e) if self.auth_failure().is_some() => Err(self.auth_error(&e)),
            Err(e) => Err(self.failure(&e, "metadata fetch")),
        }
    }

    /// Sends every record (key = host, value = the JSON) and awaits every delivery report.
    ///
    /// Records the producer or broker refuse for what they are (too large, an invalid record, a
    /// broker policy) are retried alone once (a batch of small records can exceed a broker limit
    /// together) and then reported rejected with the broker's reason.
    pub async fn deliver(&self, batch: &[OutRecord]) -> Result<BatchOutcome, SinkError> {
        let producer = self.producer()?;
        self.clear_last_error();
        let mut fates = self
            .send_all(&producer, batch, (0..batch.len()).collect())
            .await;
        // Refused records: retry each alone (a batch of small records can exceed a broker
        // limit together), unless something else already failed.
        let failed = fates
            .iter()
            .any(|f| matches!(f, None | Some(Fate::Failed { .. })));
        if !failed {
            let refused: Vec<usize> = fates
                .iter()
                .enumerate()
                .filter(|(_, f)| matches!(f, Some(Fate::Refused(_))))
                .map(|(i, _)| i)
                .collect();
            for i in refused {
                let alone = self.send_all(&producer, batch, vec![i]).await;
                if let Some(fate @ (Some(Fate::Delivered) | Some(Fate::Failed { .. }))) =
                    alone.into_iter().nth(i)
                {
                    fates[i] = fate;
                }
            }
        }
        let replaced = self.reset_if_fatal(&producer);

        let mut out = BatchOutcome::default();
        let mut first_failure: Option<KafkaError> = None;
        let mut state_failure: Option<KafkaError> = None;
        let mut timed_out = false;
        let mut maybe_stored = 0usize;
        for (i, fate) in fates.into_iter().enumerate() {
            match fate {
                Some(Fate::Delivered) => out.delivered.push(i),
                // Unverified alone (the call failed): certain only when over our own limit;
                // otherwise leave it pending for the next attempt.
                Some(Fate::Refused(reason))
                    if !failed || batch[i].json.len() > producer_limit(&self.config) =>
                {
                    out.rejected.push((i, reason))
                }
                Some(Fate::Refused(_)) => {}
                Some(Fate::Failed {
                    error,
                    possibly_persisted,
                }) => {
                    maybe_stored += usize::from(possibly_persisted);
                    let code = kafka_code(&error);
                    timed_out |= code == Some(RDKafkaErrorCode::MessageTimedOut);
                    if code.is_some_and(is_producer_state) && state_failure.is_none() {
                        state_failure = Some(error.clone());
                    }
                    first_failure.get_or_insert(error);
                }
                None => {
                    first_failure.get_or_insert(KafkaError::Canceled);
                }
            }
        }
        if !out.delivered.is_empty() {
            self.set_auth_failure(None);
        }
        if maybe_stored > 0 {
            tracing::warn!(
                sink = "kafka",
                records = maybe_stored,
                "{maybe_stored} records may already be stored by the Kafka broker(s) {} although \
                 their delivery timed out (the broker stopped answering after they were sent): \
                 they stay pending and are sent again, so the topic may hold them twice",
                self.config.brokers
            );
        }
        // After a delivery time-out or a refused producer session, librdkafka's producer can
        // stay unusable (every later record refused): the next call gets a fresh one.
        let restart = !replaced && (timed_out || state_failure.is_some());
        if restart {
            self.replace_producer();
            retire(producer);
        }
        match first_failure {
            None => Ok(out),
            Some(e) => {
                let last_auth = self
                    .last_error()
                    .is_some_and(|(code, _)| code.is_some_and(is_auth));
                let note = stored_note(maybe_stored);
                let err = if last_auth
                    || kafka_code(&e).is_some_and(is_auth)
                    || (out.delivered.is_empty() && self.auth_failure().is_some())
                {
                    self.auth_error(&e)
                } else if let Some(state) = state_failure {
                    self.session_error(&state, &note)
                } else {
                    let restarted = if restart {
                        "; the connector restarted its Kafka producer"
                    } else {
                        ""
                    };
                    self.failure_with(&e, "delivery", &format!("{restarted}{note}"))
                };
                Err(err.with_progress(out.delivered, out.rejected))
            }
        }
    }

    /// Waits (bounded by the message timeout) until everything queued was delivered or failed.
    pub async fn flush(&self) -> Result<(), SinkError> {
        let producer = self.producer()?;
        let timeout = self.config.message_timeout + Duration::from_secs(1);
        let res = tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| SinkError::retriable(format!("Kafka flush task failed: {e}")))?;
        res.map_err(|e| self.failure(&e, "flush"))
    }

    /// Enqueues `indices` of `batch` and awaits their delivery reports; `None` = unknown.
    async fn send_all(
        &self,
        producer: &SinkProducer,
        batch: &[OutRecord],
        indices: Vec<usize>,
    ) -> Vec<Option<Fate>> {
        let mut fates: Vec<Option<Fate>> = (0..batch.len()).map(|_| None).collect();
        let mut pending: VecDeque<(usize, DeliveryFuture)> = VecDeque::new();
        let limit = self.message_limit();
        for i in indices {
            let r = &batch[i];
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut record = BaseRecord::with_opaque_to(&self.config.topic, Box::new(tx))
                .key(r.key.as_bytes())
                .payload(r.json.as_bytes());
            loop {
                match producer.send(record) {
                    Ok(()) => {
                        pending.push_back((i, rx));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // Bounded queue full: wait for our oldest report, then try again.
                        record = back;
                        match pending.pop_front() {
                            Some((j, fut)) => {
                                fates[j] = Some(resolve(fut.await, batch[j].json.len(), limit))
                            }
                            None => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                    Err((e, _)) => {
                        fates[i] = Some(classify(e, None, false, r.json.len(), limit));
                        break;
                    }
                }
            }
        }
        while let Some((j, fut)) = pending.pop_front() {
            fates[j] = Some(resolve(fut.await, batch[j].json.len(), limit));
        }
        fates
    }

    fn producer(&self) -> Result<SinkProducer, SinkError> {
        let guard = self
            .producer
            .lock()
            .map_err(|_| SinkError::retriable("the Kafka producer lock was poisoned"))?;
        Ok(guard.clone())
    }

    /// After a fatal librdkafka error the producer is unusable: replace it for the next call.
    fn clear_last_error(&self) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = None;
        }
    }

    fn last_error(&self) -> Option<(Option<RDKafkaErrorCode>, String)> {
        self.last_error.lock().ok().and_then(|l| l.clone())
    }

    /// `; last client error: ...` when librdkafka reported one during this call.
    fn last_error_note(&self) -> String {
        match self.last_error() {
            Some((_, reason)) => format!("; last client error: {reason}"),
            None => String::new(),
        }
    }

    /// Replaces the producer when librdkafka reported a fatal error; true when it did.
    fn reset_if_fatal(&self, producer: &SinkProducer) -> bool {
        let Some((code, reason)) = producer.client().fatal_error() else {
            return false;
        };
        tracing::warn!(
            sink = "kafka",
            %code,
            "the Kafka producer hit a fatal error ({reason}); creating a new producer"
        );
        self.replace_producer();
        true
    }

    /// A fresh producer for the next call (after a fatal error, a delivery time-out, a refused
    /// producer session, or a smaller message limit). The old one is shut down off the async
    /// workers once its last user lets go of it.
    fn replace_producer(&self) {
        let Ok(fresh) = create_producer(
            &self.config,
            self.message_limit(),
            &self.last_error,
            &self.auth_failure,
        ) else {
            return;
        };
        let old = match self.producer.lock() {
            Ok(mut guard) => std::mem::replace(&mut *guard, fresh),
            Err(_) => return,
        };
        retire(old);
    }

    fn failure(&self, e: &KafkaError, what: &str) -> SinkError {
        self.failure_with(e, what, "")
    }

    /// [`Self::failure`] with `note` after the cause.
    fn failure_with(&self, e: &KafkaError, what: &str, note: &str) -> SinkError {
        SinkError::retriable(format!(
            "No data appearing: Kafka {what} failed for topic {} at broker(s) {} ({}{}{note}); \
             check KAFKA_BROKER_HOST and that the broker is up and reachable from this host; \
             the records stay pending and are retried next cycle",
            self.config.topic,
            self.config.brokers,
            describe_kafka_error(e),
            self.last_error_note()
        ))
    }

    /// The broker refused the producer's idempotent session (its id, epoch or sequence), which
    /// no retry of the same producer fixes.
    fn session_error(&self, e: &KafkaError, note: &str) -> SinkError {
        SinkError::retriable(format!(
            "Kafka broker(s) {} no longer accept this producer's session for topic {} ({}{note}): \
             this follows a delivery that timed out or a broker that lost the producer's state; \
             the connector restarted its Kafka producer, the records stay pending and are sent \
             again next cycle",
            self.config.brokers,
            self.config.topic,
            describe_kafka_error(e),
        ))
    }

    fn auth_error(&self, e: &KafkaError) -> SinkError {
        // The authentication failure itself says more than the time-out it caused.
        let note = match self.auth_failure() {
            Some(reason) => format!("; the broker refused the authentication: {reason}"),
            None => self.last_error_note(),
        };
        SinkError::Auth {
            message: format!(
                "the Kafka broker(s) {} refused this client ({}{note}); check \
                 KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD, KAFKA_SASL_MECHANISM, \
                 KAFKA_SECURITY_PROTOCOL and the topic's ACLs for {}",
                self.config.brokers,
                describe_kafka_error(e),
                self.config.topic
            ),
            delivered_before_failure: Vec::new(),
        }
    }

    /// The authentication failure librdkafka last reported, until the broker answers again.
    fn auth_failure(&self) -> Option<String> {
        self.auth_failure.lock().ok().and_then(|a| a.reason.clone())
    }

    fn set_auth_failure(&self, value: Option<String>) {
        if let Ok(mut a) = self.auth_failure.lock() {
            a.reason = value;
        }
    }

    /// Refused logins reported so far.
    fn auth_reports(&self) -> u64 {
        self.auth_failure.lock().map(|a| a.reports).unwrap_or(0)
    }
}

/// The connection settings every client of the sink shares (brokers, TLS, SASL), and which
/// librdkafka key came from which setting (for errors that never echo a value).
fn client_config(config: &KafkaSinkConfig) -> (ClientConfig, Vec<(&'static str, &'static str)>) {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", config.brokers.trim()).set(
        "client.id",
        concat!("databricks-shield/", env!("CARGO_PKG_VERSION")),
    );
    let mut fields: Vec<(&'static str, &'static str)> = Vec::new();
    if let Some(p) = non_empty(&config.security_protocol) {
        cc.set("security.protocol", p);
        fields.push(("security.protocol", "KAFKA_SECURITY_PROTOCOL"));
    }
    if let Some(m) = non_empty(&config.sasl_mechanism) {
        cc.set("sasl.mechanism", m);
        fields.push(("sasl.mechanism", "KAFKA_SASL_MECHANISM"));
    }
    if let Some(u) = non_empty(&config.sasl_username) {
        cc.set("sasl.username", u);
    }
    if let Some(p) = &config.sasl_password {
        cc.set("sasl.password", p.expose_secret());
    }
    if let Some(ca) = &config.ca_file {
        cc.set("ssl.ca.location", ca.display().to_string());
        fields.push(("ssl.ca.location", "the Kafka CA file (ssl.ca.location)"));
    }
    (cc, fields)
}

/// The producer's own message size limit: the configured one, else Akto's 10 MiB (the records
/// are cut to the topic's limit before they reach it).
fn producer_limit(config: &KafkaSinkConfig) -> usize {
    config.max_message_bytes.unwrap_or(MAX_BODY_BYTES)
}

/// librdkafka's `batch.size` for a message size limit: its default (1,000,000) unless the limit is
/// smaller, so that a batch of small records never exceeds what the topic takes.
fn batch_bytes(message_limit: usize) -> usize {
    message_limit
        .saturating_sub(KAFKA_MESSAGE_OVERHEAD_BYTES)
        .min(1_000_000)
}

/// `; N of them may already be stored ...` when some failed records may be in the topic.
fn stored_note(maybe_stored: usize) -> String {
    if maybe_stored == 0 {
        return String::new();
    }
    format!(
        "; {maybe_stored} of them may already be stored by the broker (their delivery timed out \
         after they were sent) and are sent again: the topic may hold them twice"
    )
}

/// Drops a replaced producer off the async workers: the last handle's drop waits for
/// librdkafka's threads.
fn retire(producer: SinkProducer) {
    if Arc::strong_count(&producer) > 1 {
        return; // someone still uses it; its last user drops it
    }
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(move || drop(producer));
        }
        Err(_) => drop(producer),
    }
}

fn create_producer(
    config: &KafkaSinkConfig,
    message_limit: usize,
    last_error: &LastError,
    auth_failure: &AuthFailure,
) -> Result<SinkProducer, SinkError> {
    let timeout_ms = config
        .message_timeout
        .as_millis()
        .clamp(1, i32::MAX as u128);
    // librdkafka takes socket.timeout.ms from 10 ms to 300 s.
    let request_ms = config.request_timeout().as_millis().clamp(10, 300_000);
    let (mut cc, fields) = client_config(config);
    cc.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set(
            "queue.buffering.max.kbytes",
            KAFKA_QUEUE_MAX_KBYTES.to_string(),
        )
        .set("message.max.bytes", producer_limit(config).to_string())
        .set("batch.size", batch_bytes(message_limit).to_string())
        .set("message.timeout.ms", timeout_ms.to_string())
        // A request a stalled broker never answers is given up long before the record's
        // delivery is, and sent again within the idempotent session (no duplicate).
        .set("request.timeout.ms", request_ms.to_string())
        .set("socket.timeout.ms", request_ms.to_string())
        // Back on a broker soon after it answers again (librdkafka's default: up to 10 s).
        .set(
            "reconnect.backoff.max.ms",
            request_ms.clamp(100, 10_000).to_string(),
        );
    let context = SinkContext {
        last_error: Arc::clone(last_error),
        auth_failure: Arc::clone(auth_failure),
    };
    cc.create_with_context::<_, ThreadedProducer<SinkContext>>(context)
        .map(Arc::new)
        .map_err(|e| match e {
            // Never echo the value of a setting: it could be the password.
            KafkaError::ClientConfig(_, desc, key, _) => SinkError::Config {
                field: fields
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, f)| *f)
                    .unwrap_or("KAFKA_BROKER_HOST"),
                message: format!("librdkafka refused `{key}`: {desc}"),
            },
            other => {
                let text = other.to_string();
                let field = if text.contains("ca.location") || text.contains("CA cert") {
                    "the Kafka CA file (ssl.ca.location)"
                } else if text.contains("SASL") || text.contains("sasl") {
                    "KAFKA_SASL_MECHANISM"
                } else if text.contains("SSL") || text.contains("ssl") {
                    "KAFKA_SECURITY_PROTOCOL"
                } else {
                    "KAFKA_BROKER_HOST"
                };
                SinkError::Config {
                    field,
                    message: format!("could not create the Kafka producer: {text}"),
                }
            }
        })
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn resolve(
    res: Result<Report, tokio::sync::oneshot::error::RecvError>,
    len: usize,
    limit: usize,
) -> Fate {
    match res {
        Ok(Report { error: None, .. }) => Fate::Delivered,
        Ok(Report {
            error: Some(e),
            possibly_persisted,
            broker_reason,
        }) => classify(e, broker_reason.as_deref(), possibly_persisted, len, limit),
        // The producer went away without a report: its fate is unknown, it stays pending.
        Err(_) => Fate::Failed {
            error: KafkaError::Canceled,
            possibly_persisted: true,
        },
    }
}

/// Sorts a failed record: refused for what it is (rejected after a retry alone) or failed
/// (pending, sent again next cycle).
fn classify(
    e: KafkaError,
    broker_reason: Option<&str>,
    possibly_persisted: bool,
    len: usize,
    limit: usize,
) -> Fate {
    let said = broker_reason
        .map(|r| format!("; the broker said: {r}"))
        .unwrap_or_default();
    match kafka_code(&e) {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => Fate::Refused(format!(
            "record is {len} bytes; Kafka refused it as too large (MessageSizeTooLarge: the \
             topic's or broker's message size limit is below the {limit} bytes records were cut \
             to, from KAFKA_MAX_MESSAGE_BYTES or else the topic's max.message.bytes; set \
             KAFKA_MAX_MESSAGE_BYTES to the topic's limit{said})"
        )),
        Some(code) if is_record_refusal(code) => Fate::Refused(format!(
            "Kafka refused this {len}-byte record, also when sent alone ({code}{said}); the \
             broker's validation or policy for the topic does not take it"
        )),
        _ => Fate::Failed {
            error: e,
            possibly_persisted,
        },
    }
}

/// Errors a broker gives a record for what it is, not for the state of the broker or the
/// network: sending it again does not help.
fn is_record_refusal(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::InvalidMessage // CORRUPT_MESSAGE: its CRC or framing is wrong
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidTimestamp
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::BadMessage
    )
}

/// Errors that say the broker no longer accepts the producer's idempotent session: only a new
/// producer (a new producer id) gets records through again.
fn is_producer_state(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::InvalidProducerIdMapping
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::Fatal
    )
}

fn kafka_code(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    e.rdkafka_error_code()
}

fn code_is_auth(e: &KafkaError) -> bool {
    e.rdkafka_error_code().is_some_and(is_auth)
}

fn is_auth(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
    )
}

fn describe_kafka_error(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, desc, key, _) => format!("config `{key}`: {desc}"),
        KafkaError::Canceled => "the delivery report was lost (producer shut down)".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce_error(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn too_large_is_a_rejection_other_errors_are_failures() {
        let big = classify(
            produce_error(RDKafkaErrorCode::MessageSizeTooLarge),
            None,
            false,
            42,
            1000,
        );
        assert!(matches!(big, Fate::Refused(ref r)
            if r.contains("42 bytes") && r.contains("1000 bytes") && r.contains("KAFKA_MAX_MESSAGE_BYTES")));
        let down = classify(
            produce_error(RDKafkaErrorCode::MessageTimedOut),
            None,
            true,
            42,
            1000,
        );
        assert!(matches!(
            down,
            Fate::Failed {
                possibly_persisted: true,
                ..
            }
        ));
        assert!(is_auth(RDKafkaErrorCode::SaslAuthenticationFailed));
        assert!(is_auth(RDKafkaErrorCode::TopicAuthorizationFailed));
        assert!(!is_auth(RDKafkaErrorCode::MessageTimedOut));
    }

    #[test]
    fn a_broker_refusing_the_record_itself_is_a_rejection_with_its_reason() {
        for code in [
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::PolicyViolation,
            RDKafkaErrorCode::InvalidMessage,
            RDKafkaErrorCode::InvalidMessageSize,
            RDKafkaErrorCode::MessageBatchTooLarge,
            RDKafkaErrorCode::InvalidTimestamp,
            RDKafkaErrorCode::BadMessage,
        ] {
            let fate = classify(
                produce_error(code),
                Some("record 0: field `x` is not allowed"),
                false,
                42,
                1000,
            );
            match fate {
                Fate::Refused(reason) => {
                    assert!(reason.contains(&format!("{code:?}")), "{reason}");
                    assert!(
                        reason.contains("the broker said: record 0: field `x` is not allowed"),
                        "{reason}"
                    );
                    assert!(reason.contains("42-byte"), "{reason}");
                    assert!(!reason.contains("KAFKA_BROKER_HOST"), "{reason}");
                }
                _ => panic!("{code:?} must be a per-record rejection"),
            }
            assert!(!is_producer_state(code));
        }
        // Without the broker's words the code alone explains it.
        let fate = classify(
            produce_error(RDKafkaErrorCode::InvalidRecord),
            None,
            false,
            7,
            1000,
        );
        assert!(
            matches!(fate, Fate::Refused(ref r) if r.contains("InvalidRecord") && !r.contains("broker said"))
        );
        // Broker and network trouble stays a failure (pending, sent again next cycle).
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            let fate = classify(produce_error(code), None, false, 42, 1000);
            assert!(
                matches!(fate, Fate::Failed { .. }),
                "{code:?} must not reject the record"
            );
        }
    }

    #[test]
    fn producer_state_errors_are_told_apart_and_worded_as_such() {
        for code in [
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::OutOfOrderSequenceNumber,
            RDKafkaErrorCode::UnknownProducerId,
        ] {
            assert!(is_producer_state(code), "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::AllBrokersDown,
        ] {
            assert!(!is_producer_state(code), "{code:?}");
        }
        let sink = KafkaSink::new(KafkaSinkConfig::new("b1:9092", DEFAULT_KAFKA_TOPIC)).unwrap();
        let e = sink.session_error(
            &produce_error(RDKafkaErrorCode::ProducerFenced),
            &stored_note(3),
        );
        let msg = e.to_string();
        assert!(e.is_retriable());
        assert!(msg.contains("ProducerFenced"), "{msg}");
        assert!(msg.contains("restarted its Kafka producer"), "{msg}");
        assert!(msg.contains("3 of them may already be stored"), "{msg}");
        assert!(!msg.contains("reachable"), "not a network problem: {msg}");
        assert_eq!(stored_note(0), "");
    }

    #[test]
    fn requests_time_out_well_before_records_do() {
        let mut cfg = KafkaSinkConfig::new("b1:9092", DEFAULT_KAFKA_TOPIC);
        assert_eq!(cfg.message_timeout, Duration::from_secs(120));
        assert_eq!(cfg.request_timeout(), Duration::from_secs(30));
        cfg.message_timeout = Duration::from_secs(20);
        assert_eq!(cfg.request_timeout(), Duration::from_secs(5));
        cfg.message_timeout = Duration::from_secs(3600);
        assert_eq!(cfg.request_timeout(), MAX_KAFKA_REQUEST_TIMEOUT);
        cfg.message_timeout = Duration::from_millis(1);
        assert_eq!(cfg.request_timeout(), Duration::from_millis(10));
        // librdkafka accepts the settings derived from any of these.
        for t in [1u64, 20, 3_000, 120_000, 3_600_000] {
            cfg.message_timeout = Duration::from_millis(t);
            KafkaSink::new(cfg.clone()).unwrap_or_else(|e| panic!("{t} ms: {e}"));
        }
    }

    #[test]
    fn errors_name_broker_and_settings_without_secrets() {
        let mut cfg = KafkaSinkConfig::new("b1:9092,b2:9092", DEFAULT_KAFKA_TOPIC);
        cfg.sasl_password = Some(SecretString::from("pa55-secret".to_string()));
        assert!(!format!("{cfg:?}").contains("pa55-secret"));
        let sink = KafkaSink::new(cfg).unwrap();
        assert!(!format!("{sink:?}").contains("pa55-secret"));
        let e = sink.failure(
            &KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            "delivery",
        );
        let msg = e.to_string();
        assert!(e.is_retriable());
        assert!(
            msg.contains("b1:9092,b2:9092") && msg.contains("KAFKA_BROKER_HOST"),
            "{msg}"
        );
        let e = sink.auth_error(&KafkaError::MessageProduction(
            RDKafkaErrorCode::SaslAuthenticationFailed,
        ));
        assert!(!e.is_retriable());
        assert!(e.to_string().contains("KAFKA_SASL_PASSWORD"), "{e}");
        assert!(!e.to_string().contains("pa55-secret"));
        assert_eq!(
            sink.describe(),
            "Kafka topic akto.api.logs at b1:9092,b2:9092"
        );
    }

    #[test]
    fn tls_and_scram_are_available_and_a_bad_ca_file_is_named() {
        let mut cfg = KafkaSinkConfig::new("b1:9093", DEFAULT_KAFKA_TOPIC);
        cfg.security_protocol = Some("sasl_ssl".into());
        cfg.sasl_mechanism = Some("SCRAM-SHA-512".into());
        cfg.sasl_username = Some("user".into());
        cfg.sasl_password = Some(SecretString::from("pa55-secret".to_string()));
        KafkaSink::new(cfg.clone()).expect("TLS + SCRAM supported by this build");
        cfg.ca_file = Some(PathBuf::from("/nonexistent/kafka-ca.pem"));
        let e = KafkaSink::new(cfg).unwrap_err();
        let msg = e.to_string();
        assert!(!e.is_retriable());
        assert!(msg.contains("CA file"), "{msg}");
        assert!(!msg.contains("pa55-secret"), "{msg}");
    }
}
