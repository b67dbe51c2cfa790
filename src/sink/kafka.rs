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
//! A record the broker refuses for what it is is tried alone once, then rejected (quarantined by
//! the caller); when every record of a batch of two or more is refused alone, the topic or
//! broker may refuse them all (a policy, schema validation): they are rejected all the same (kept
//! pending, one bad unit alone in its batch would stop its source for good) and the outcome's
//! `whole_batch_refused` says so, so that the caller reports the cycle as failed.
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
use rdkafka::bindings::{rd_kafka_message_status, rd_kafka_msg_status_t};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
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
/// How long [`KafkaSink::flush_within`] waits past its bound for the purge to end.
const FLUSH_PURGE_MARGIN: Duration = Duration::from_secs(2);

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
///
/// Not the broker's own words about a refused record (`rd_kafka_message_produce_errstr`): in
/// librdkafka 2.12 that string points into the produce response, which the broker thread frees
/// right after it queues the delivery report (`rd_kafka_handle_Produce` destroys the result
/// after `rd_kafka_dr_msgq0`, whose copy the message does not point to), so reading it in the
/// callback would read freed memory. A refusal is worded from its error code alone.
struct Report {
    /// `None`: the broker acknowledged it.
    error: Option<KafkaError>,
    /// librdkafka's message status said the broker may have stored it although the delivery
    /// failed (it timed out after being sent).
    possibly_persisted: bool,
}

impl Report {
    fn of(result: &DeliveryResult<'_>) -> Report {
        match result {
            Ok(_) => Report {
                error: None,
                possibly_persisted: false,
            },
            Err((e, msg)) => Report {
                error: Some(e.clone()),
                possibly_persisted: possibly_persisted(msg),
            },
        }
    }
}

/// `rd_kafka_message_status`: whether a failed record may be stored nevertheless.
fn possibly_persisted(msg: &BorrowedMessage<'_>) -> bool {
    // SAFETY: `rd_kafka_message_status` only reads `rkm_status`, a field of the message struct
    // itself. `msg` holds the delivery-report event that owns the message, so the message stays
    // allocated for as long as `msg` is borrowed (the whole delivery callback).
    let status = unsafe { rd_kafka_message_status(msg.ptr()) };
    status == rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_POSSIBLY_PERSISTED
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
#[derive(Debug)]
enum Fate {
    Delivered,
    /// Refused for what it is (too large, invalid, against a broker policy): retried alone
    /// once, then rejected with `reason`. Left pending when it could not be retried alone.
    Refused {
        error: KafkaError,
        reason: String,
    },
    /// Refused only because another record of the same produce request was invalid
    /// (librdkafka's `InvalidDifferentRecord`): says nothing about this record, which is sent
    /// again without the invalid one; never rejected for it.
    Bystander,
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
                    if let Err(reason) = self.replace_producer() {
                        tracing::warn!(
                            sink = "kafka",
                            "could not restart the Kafka producer for the topic's smaller \
                             message limit ({reason}); a batch of small records may be refused \
                             as too large and is then sent record by record"
                        );
                    }
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
    /// together) and then reported rejected, with the error code as the reason. Records the
    /// broker refused only because another record of their request was invalid are sent again
    /// without it (see [`settle`]). When the batch holds two or more records and the broker
    /// refused every one of them alone (those within the producer's own limit), they are
    /// rejected too and [`BatchOutcome::whole_batch_refused`] names the refusal and the fix.
    pub async fn deliver(&self, batch: &[OutRecord]) -> Result<BatchOutcome, SinkError> {
        let producer = self.producer()?;
        self.clear_last_error();
        let first = self
            .send_all(&producer, batch, (0..batch.len()).collect())
            .await;
        let settled = settle(first, |indices| self.send_all(&producer, batch, indices)).await;
        let fatal_restart = self.reset_if_fatal(&producer);
        let Tally {
            mut out,
            first_failure,
            state_failure,
            timed_out,
            maybe_stored,
            all_refused,
        } = tally(settled, batch, producer_limit(&self.config));
        if let Some((e, refused)) = all_refused {
            out.whole_batch_refused = Some(self.refused_all_reason(&e, refused));
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
        let restart = match fatal_restart {
            Some(done) => Some(done),
            None if timed_out || state_failure.is_some() => Some(self.replace_producer()),
            None => None,
        };
        if restart.is_some() {
            // `producer` may now hold the old producer's last handle, whose drop joins
            // librdkafka's threads (purge, flush): not on an async worker.
            retire(producer);
        }
        match first_failure {
            None => Ok(out),
            Some(e) => {
                let last_auth = self
                    .last_error()
                    .is_some_and(|(code, _)| code.is_some_and(is_auth));
                let note = format!(
                    "{}{}",
                    restart_note(restart.as_ref()),
                    stored_note(maybe_stored)
                );
                let err = if last_auth
                    || kafka_code(&e).is_some_and(is_auth)
                    || (out.delivered.is_empty() && self.auth_failure().is_some())
                {
                    self.auth_error(&e)
                } else if let Some(state) = state_failure {
                    self.session_error(&state, &note)
                } else {
                    self.failure_with(&e, "delivery", &note)
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

    /// [`Self::flush`] bounded by `within`, for shutdown: waits up to `within` for the queued and
    /// in-flight records, then purges what is left (librdkafka's queue and in-flight requests),
    /// so that the producer holds no record and no thread of it waits any longer. A purged
    /// record was never reported delivered: it stays pending and goes out again at the next
    /// start (one that was in flight may already be in the topic, so it may be stored twice).
    ///
    /// The wait runs on a thread of its own, not tokio's blocking pool, so that even a
    /// librdkafka call that overruns never holds the runtime's shutdown; the call itself
    /// returns at most about two seconds after `within`.
    pub async fn flush_within(&self, within: Duration) -> Result<(), SinkError> {
        let producer = self.producer()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("kafka-flush".into())
            .spawn(move || {
                let flushed = producer.flush(within);
                let left = if flushed.is_err() {
                    let left = producer.in_flight_count();
                    producer.purge(PurgeConfig::default().queue().inflight());
                    left
                } else {
                    0
                };
                let _ = tx.send((flushed, left));
            })
            .map_err(|e| SinkError::retriable(format!("cannot start the Kafka flush: {e}")))?;
        // The flush ends at `within` and a purge takes moments; the margin only guards against
        // a librdkafka call that overruns.
        let answer = tokio::time::timeout(within.saturating_add(FLUSH_PURGE_MARGIN), rx).await;
        match answer {
            Ok(Ok((Ok(()), _))) => Ok(()),
            Ok(Ok((Err(e), left))) => Err(self.failure_with(
                &e,
                "flush at shutdown",
                &format!(
                    "; {left} records were still queued or in flight after {within:?} and were \
                     purged: they were never reported delivered, so they stay pending and are \
                     sent at the next start (those already in flight may be stored twice)"
                ),
            )),
            Ok(Err(_)) => Err(SinkError::retriable(
                "the Kafka flush at shutdown ended without an answer",
            )),
            Err(_) => Err(SinkError::retriable(format!(
                "the Kafka flush at shutdown did not end within {within:?} and its purge; \
                 records not reported delivered stay pending and are sent at the next start"
            ))),
        }
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
                        fates[i] = Some(classify(e, false, r.json.len(), limit));
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

    /// Replaces the producer when librdkafka reported a fatal error: `None` when there was
    /// none, else whether the replacement worked (see [`Self::replace_producer`]).
    fn reset_if_fatal(&self, producer: &SinkProducer) -> Option<Result<(), String>> {
        let (code, reason) = producer.client().fatal_error()?;
        tracing::warn!(
            sink = "kafka",
            %code,
            "the Kafka producer hit a fatal error ({reason}); creating a new producer"
        );
        Some(self.replace_producer())
    }

    /// A fresh producer for the next call (after a fatal error, a delivery time-out, a refused
    /// producer session, or a smaller message limit). The old one is shut down off the async
    /// workers once its last user lets go of it (a caller holding a handle retires it too).
    /// `Err` says why no new producer could be created; the old one then stays in use.
    fn replace_producer(&self) -> Result<(), String> {
        let fresh = create_producer(
            &self.config,
            self.message_limit(),
            &self.last_error,
            &self.auth_failure,
        )
        .map_err(|e| e.to_string())?;
        let old = match self.producer.lock() {
            Ok(mut guard) => std::mem::replace(&mut *guard, fresh),
            Err(_) => return Err("the Kafka producer lock was poisoned".into()),
        };
        retire(old);
        Ok(())
    }

    /// The one-line reason of [`BatchOutcome::whole_batch_refused`] for a batch whose every
    /// record the broker refused, each also alone: more likely a topic or broker policy than bad
    /// records.
    fn refused_all_reason(&self, e: &KafkaError, records: usize) -> String {
        let code = kafka_code(e)
            .map(|c| format!("{c:?}: {c}"))
            .unwrap_or_else(|| e.to_string());
        format!(
            "the Kafka broker(s) {} refused every record of a batch of {records} for topic {}, \
             each also when sent alone ({code}): they are in STATE_DIR/quarantine.jsonl; if the \
             topic refuses every record, check its configuration (a topic policy, broker-side \
             schema validation such as confluent.value.schema.validation, a message size limit \
             below KAFKA_MAX_MESSAGE_BYTES) and AKTO_KAFKA_TOPIC_NAME",
            self.config.brokers, self.config.topic
        )
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
    /// no retry of the same producer fixes; `note` says whether the producer was restarted.
    fn session_error(&self, e: &KafkaError, note: &str) -> SinkError {
        SinkError::retriable(format!(
            "Kafka broker(s) {} no longer accept this producer's session for topic {} ({}{note}): \
             this follows a delivery that timed out or a broker that lost the producer's state, \
             which only a new producer fixes; the records stay pending and are sent again next \
             cycle",
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

/// `; the connector restarted its Kafka producer` after a restart, or why it could not.
fn restart_note(restart: Option<&Result<(), String>>) -> String {
    match restart {
        None => String::new(),
        Some(Ok(())) => "; the connector restarted its Kafka producer".into(),
        Some(Err(reason)) => {
            format!("; the connector could not restart its Kafka producer: {reason}")
        }
    }
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
/// librdkafka's threads. Always on a blocking thread, whatever the count: another holder may let
/// go between a count and the drop.
fn retire(producer: SinkProducer) {
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
        }) => classify(e, possibly_persisted, len, limit),
        // The producer went away without a report: its fate is unknown, it stays pending.
        Err(_) => Fate::Failed {
            error: KafkaError::Canceled,
            possibly_persisted: true,
        },
    }
}

/// Sorts a failed record: refused for what it is (rejected after a retry alone), a bystander
/// of another record's refusal (sent again without it) or failed (pending, sent again next
/// cycle).
fn classify(e: KafkaError, possibly_persisted: bool, len: usize, limit: usize) -> Fate {
    match kafka_code(&e) {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => Fate::Refused {
            reason: format!(
                "record is {len} bytes; Kafka refused it as too large (MessageSizeTooLarge: the \
                 topic's or broker's message size limit is below the {limit} bytes records were \
                 cut to, from KAFKA_MAX_MESSAGE_BYTES or else the topic's max.message.bytes; set \
                 KAFKA_MAX_MESSAGE_BYTES to the topic's limit)"
            ),
            error: e,
        },
        Some(RDKafkaErrorCode::InvalidDifferentRecord) => Fate::Bystander,
        Some(code) if is_record_refusal(code) => Fate::Refused {
            reason: format!(
                "the broker refused this {len}-byte record, also when sent alone: {code:?} \
                 ({code}; broker-side validation, e.g. a topic policy, does not take it)"
            ),
            error: e,
        },
        _ => Fate::Failed {
            error: e,
            possibly_persisted,
        },
    }
}

/// Whether a record's fate leaves the call failed (unknown or not delivered).
fn is_failed(fate: &Option<Fate>) -> bool {
    matches!(fate, None | Some(Fate::Failed { .. }))
}

/// The indices whose fate matches `which`.
fn indices_where(fates: &[Option<Fate>], which: impl Fn(&Fate) -> bool) -> Vec<usize> {
    fates
        .iter()
        .enumerate()
        .filter(|(_, f)| f.as_ref().is_some_and(&which))
        .map(|(i, _)| i)
        .collect()
}

/// Takes the fates a later round learnt (`None` there: not sent in that round).
fn take_known(fates: &mut [Option<Fate>], again: Vec<Option<Fate>>) {
    for (slot, fate) in fates.iter_mut().zip(again) {
        if fate.is_some() {
            *slot = fate;
        }
    }
}

/// A batch's fates after the retries of [`settle`].
struct Settled {
    fates: Vec<Option<Fate>>,
    /// Per record: whether it was sent alone (a refusal then concerns the record itself).
    alone: Vec<bool>,
}

/// After the first round (`fates`): sends again, through `send` (indices of the batch to send
/// together; their fates), what was refused, unless something failed otherwise (the call fails
/// then, and those records stay pending).
///
/// When a broker refuses some records of a produce request, librdkafka fails the others with
/// `InvalidDifferentRecord`: those bystanders are sent again together (none of them was refused
/// itself), then every refused record (and any bystander left) is sent alone once, so that one
/// invalid record never holds the others back and is itself rejected once the broker refused it
/// alone. The alone round stops at the first failure.
async fn settle<F, Fut>(mut fates: Vec<Option<Fate>>, mut send: F) -> Settled
where
    F: FnMut(Vec<usize>) -> Fut,
    Fut: std::future::Future<Output = Vec<Option<Fate>>>,
{
    let mut alone = vec![false; fates.len()];
    if fates.iter().any(is_failed) {
        return Settled { fates, alone };
    }
    let bystanders = indices_where(&fates, |f| matches!(f, Fate::Bystander));
    if !bystanders.is_empty() {
        let again = send(bystanders).await;
        take_known(&mut fates, again);
    }
    let refused = indices_where(&fates, |f| {
        matches!(f, Fate::Refused { .. } | Fate::Bystander)
    });
    for i in refused {
        if fates.iter().any(is_failed) {
            break;
        }
        let again = send(vec![i]).await;
        take_known(&mut fates, again);
        alone[i] = true;
    }
    Settled { fates, alone }
}

/// What a call reports after [`settle`].
struct Tally {
    out: BatchOutcome,
    /// The first reason a record stays pending; `None`: every record delivered or rejected.
    first_failure: Option<KafkaError>,
    /// The first error that says the broker no longer accepts the producer's session.
    state_failure: Option<KafkaError>,
    /// A record's delivery timed out.
    timed_out: bool,
    /// Failed records the broker may have stored nevertheless.
    maybe_stored: usize,
    /// Set when the batch held two or more records and the broker refused every one of them
    /// (those within the producer's own limit), each also when sent alone: perhaps a topic or
    /// broker policy refusing them all rather than bad records. They are in `out.rejected`; the
    /// first refusal and how many records it covers.
    all_refused: Option<(KafkaError, usize)>,
}

/// Sorts the settled fates into delivered, rejected (refused alone, or larger than the
/// producer's own limit `own_limit`, which no broker takes) and pending records.
fn tally(settled: Settled, batch: &[OutRecord], own_limit: usize) -> Tally {
    let mut t = Tally {
        out: BatchOutcome::default(),
        first_failure: None,
        state_failure: None,
        timed_out: false,
        maybe_stored: 0,
        all_refused: None,
    };
    // Why records stay pending when none failed outright (a refusal not verified alone, a
    // bystander): reported only without a real failure, which names the actual cause.
    let mut weak_failure = None;
    // The refusals of records within the producer's limit that the broker refused alone.
    let mut refused_alone: Vec<KafkaError> = Vec::new();
    let mut over_limit = 0usize;
    for (i, fate) in settled.fates.into_iter().enumerate() {
        match fate {
            Some(Fate::Delivered) => t.out.delivered.push(i),
            Some(Fate::Refused { reason, .. })
                if batch.get(i).is_some_and(|r| r.json.len() > own_limit) =>
            {
                over_limit += 1;
                t.out.rejected.push((i, reason))
            }
            Some(Fate::Refused { reason, error })
                if settled.alone.get(i).copied().unwrap_or(false) =>
            {
                refused_alone.push(error);
                t.out.rejected.push((i, reason))
            }
            // Not verified alone (something else failed first): pending.
            Some(Fate::Refused { error, .. }) => {
                weak_failure.get_or_insert(error);
            }
            Some(Fate::Bystander) => {
                weak_failure.get_or_insert(KafkaError::MessageProduction(
                    RDKafkaErrorCode::InvalidDifferentRecord,
                ));
            }
            Some(Fate::Failed {
                error,
                possibly_persisted,
            }) => {
                t.maybe_stored += usize::from(possibly_persisted);
                let code = kafka_code(&error);
                t.timed_out |= code == Some(RDKafkaErrorCode::MessageTimedOut);
                if code.is_some_and(is_producer_state) && t.state_failure.is_none() {
                    t.state_failure = Some(error.clone());
                }
                t.first_failure.get_or_insert(error);
            }
            None => {
                weak_failure.get_or_insert(KafkaError::Canceled);
            }
        }
    }
    if t.first_failure.is_none() {
        t.first_failure = weak_failure;
    }
    // Every record the broker could take refused, in a batch of two or more: perhaps the topic
    // (a policy, schema validation) refuses them all, which quarantining alone would hide; they
    // stay rejected and the outcome says so.
    let refused = refused_alone.len();
    if refused >= 2 && refused + over_limit == batch.len() && t.first_failure.is_none() {
        t.all_refused = refused_alone.into_iter().next().map(|e| (e, refused));
    }
    t
}

/// Errors a broker gives a record for what it is, not for the state of the broker or the
/// network: sending it again does not help. Not among them: `InvalidTimestamp` (librdkafka
/// stamps each record with this host's clock, so it says the clock is off, for every record
/// alike), `BadMessage` (librdkafka could not parse the broker's answer: the records may be
/// stored) and `InvalidMessage` (a corrupt message, which librdkafka itself retries): those
/// records stay pending.
fn is_record_refusal(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::InvalidRecord
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
        KafkaError::MessageProduction(RDKafkaErrorCode::InvalidTimestamp) => format!(
            "{e}: the broker refuses the records' timestamps, which come from this host's \
             clock; check that it is right (NTP)"
        ),
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
            false,
            42,
            1000,
        );
        assert!(matches!(big, Fate::Refused { ref reason, .. }
            if reason.contains("42 bytes") && reason.contains("1000 bytes")
                && reason.contains("KAFKA_MAX_MESSAGE_BYTES")));
        let down = classify(
            produce_error(RDKafkaErrorCode::MessageTimedOut),
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
    fn a_broker_refusing_the_record_itself_is_a_rejection_worded_from_its_code() {
        for code in [
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::PolicyViolation,
            RDKafkaErrorCode::InvalidMessageSize,
            RDKafkaErrorCode::MessageBatchTooLarge,
        ] {
            match classify(produce_error(code), false, 42, 1000) {
                Fate::Refused { reason, error } => {
                    assert_eq!(kafka_code(&error), Some(code));
                    assert!(
                        reason.starts_with("the broker refused this 42-byte record"),
                        "{reason}"
                    );
                    assert!(reason.contains(&format!("{code:?}")), "{reason}");
                    assert!(reason.contains(&code.to_string()), "{reason}");
                    assert!(reason.contains("broker-side validation"), "{reason}");
                    assert!(!reason.contains("KAFKA_BROKER_HOST"), "{reason}");
                }
                other => panic!("{code:?} must be a per-record rejection, got {other:?}"),
            }
            assert!(!is_producer_state(code));
        }
        // Broker and network trouble stays a failure (pending, sent again next cycle).
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            // This host's clock, an unparsable answer (maybe stored), a corrupt message
            // librdkafka already retried: not the record's own fault.
            RDKafkaErrorCode::InvalidTimestamp,
            RDKafkaErrorCode::BadMessage,
            RDKafkaErrorCode::InvalidMessage,
        ] {
            let fate = classify(produce_error(code), false, 42, 1000);
            assert!(
                matches!(fate, Fate::Failed { .. }),
                "{code:?} must not reject the record"
            );
        }
        let clock = describe_kafka_error(&produce_error(RDKafkaErrorCode::InvalidTimestamp));
        assert!(clock.contains("this host's clock"), "{clock}");
    }

    #[test]
    fn a_record_failed_for_another_records_refusal_is_a_bystander() {
        // librdkafka's -138, "INVALID_DIFFERENT_RECORD": the others of a request with a refused
        // record. Neither rejected nor a failure of the call.
        assert_eq!(RDKafkaErrorCode::InvalidDifferentRecord as i32, -138);
        let fate = classify(
            produce_error(RDKafkaErrorCode::InvalidDifferentRecord),
            false,
            42,
            1000,
        );
        assert!(matches!(fate, Fate::Bystander), "{fate:?}");
        assert!(!is_record_refusal(RDKafkaErrorCode::InvalidDifferentRecord));
        assert!(!is_producer_state(RDKafkaErrorCode::InvalidDifferentRecord));
    }

    /// A broker stand-in for [`settle`]: refuses the records in `invalid` (with `InvalidRecord`)
    /// and fails every other record of a request holding one (`InvalidDifferentRecord`), as
    /// librdkafka reports per-record errors; `down` fails everything sent (a time-out). Keeps
    /// each request's indices.
    struct FakeBroker {
        invalid: Vec<usize>,
        down: bool,
        requests: Vec<Vec<usize>>,
    }

    impl FakeBroker {
        fn new(invalid: &[usize]) -> FakeBroker {
            FakeBroker {
                invalid: invalid.to_vec(),
                down: false,
                requests: Vec::new(),
            }
        }

        fn send(&mut self, len: usize, indices: Vec<usize>) -> Vec<Option<Fate>> {
            let mut fates: Vec<Option<Fate>> = (0..len).map(|_| None).collect();
            let poisoned = indices.iter().any(|i| self.invalid.contains(i));
            for &i in &indices {
                let code = if self.down {
                    Some(RDKafkaErrorCode::MessageTimedOut)
                } else if self.invalid.contains(&i) {
                    Some(RDKafkaErrorCode::InvalidRecord)
                } else if poisoned {
                    Some(RDKafkaErrorCode::InvalidDifferentRecord)
                } else {
                    None
                };
                fates[i] = Some(match code {
                    None => Fate::Delivered,
                    Some(c) => classify(produce_error(c), self.down, 10, 1000),
                });
            }
            self.requests.push(indices);
            fates
        }
    }

    fn records(n: usize) -> Vec<OutRecord> {
        (0..n)
            .map(|i| OutRecord {
                key: "h".into(),
                json: format!("{{\"i\":{i}}}"),
            })
            .collect()
    }

    /// Runs a batch of `n` through the fake broker as `deliver` does: one request, then
    /// [`settle`], then [`tally`].
    async fn run(broker: &mut FakeBroker, n: usize) -> Tally {
        let first = broker.send(n, (0..n).collect());
        let broker = std::cell::RefCell::new(broker);
        let settled = settle(first, |indices| {
            let fates = broker.borrow_mut().send(n, indices);
            async move { fates }
        })
        .await;
        tally(settled, &records(n), 10_000)
    }

    #[tokio::test]
    async fn one_invalid_record_is_rejected_and_the_rest_of_its_request_delivered() {
        let mut broker = FakeBroker::new(&[2]);
        let t = run(&mut broker, 5).await;
        assert_eq!(t.out.delivered, vec![0, 1, 3, 4]);
        assert_eq!(t.out.rejected.len(), 1);
        assert_eq!(t.out.rejected[0].0, 2);
        assert!(t.out.rejected[0].1.contains("InvalidRecord"));
        assert!(t.first_failure.is_none(), "{:?}", t.first_failure);
        assert!(!t.timed_out && t.state_failure.is_none());
        // The whole batch, the bystanders together, then the refused record alone.
        assert_eq!(
            broker.requests,
            vec![vec![0, 1, 2, 3, 4], vec![0, 1, 3, 4], vec![2]]
        );

        // Several invalid records: each rejected alone, every other one delivered.
        let mut broker = FakeBroker::new(&[0, 3]);
        let t = run(&mut broker, 4).await;
        assert_eq!(t.out.delivered, vec![1, 2]);
        let rejected: Vec<usize> = t.out.rejected.iter().map(|(i, _)| *i).collect();
        assert_eq!(rejected, vec![0, 3]);
        assert!(t.first_failure.is_none());

        // Nothing refused: one request, nothing retried.
        let mut broker = FakeBroker::new(&[]);
        let t = run(&mut broker, 3).await;
        assert_eq!(t.out.delivered, vec![0, 1, 2]);
        assert_eq!(broker.requests.len(), 1);
    }

    #[tokio::test]
    async fn when_the_retry_fails_nothing_is_rejected_unverified() {
        // The broker goes down after the first request: the bystanders fail (pending, the call
        // fails) and the refused record is not retried alone, so it is not rejected either.
        let mut broker = FakeBroker::new(&[1]);
        let first = broker.send(3, vec![0, 1, 2]);
        broker.down = true;
        let broker = std::cell::RefCell::new(&mut broker);
        let settled = settle(first, |indices| {
            let fates = broker.borrow_mut().send(3, indices);
            async move { fates }
        })
        .await;
        let t = tally(settled, &records(3), 10_000);
        assert!(t.out.delivered.is_empty() && t.out.rejected.is_empty());
        assert!(t.timed_out);
        assert_eq!(
            t.first_failure.as_ref().and_then(kafka_code),
            Some(RDKafkaErrorCode::MessageTimedOut)
        );
        assert_eq!(broker.borrow().requests.len(), 2, "no alone round");

        // A first round that failed otherwise: no retry at all; the refused and bystander
        // records stay pending, but one over the producer's own limit is rejected (no broker
        // takes it).
        let fates = vec![
            Some(Fate::Failed {
                error: produce_error(RDKafkaErrorCode::MessageTimedOut),
                possibly_persisted: true,
            }),
            Some(classify(
                produce_error(RDKafkaErrorCode::InvalidRecord),
                false,
                10,
                1000,
            )),
            Some(Fate::Bystander),
            Some(classify(
                produce_error(RDKafkaErrorCode::MessageSizeTooLarge),
                false,
                10,
                1000,
            )),
        ];
        let mut sent = 0;
        let settled = settle(fates, |_| {
            sent += 1;
            async { Vec::new() }
        })
        .await;
        assert_eq!(sent, 0);
        let mut batch = records(4);
        batch[3].json = "x".repeat(20);
        let t = tally(settled, &batch, 10);
        assert!(t.out.delivered.is_empty());
        let rejected: Vec<usize> = t.out.rejected.iter().map(|(i, _)| *i).collect();
        assert_eq!(rejected, vec![3]);
        assert_eq!(t.maybe_stored, 1);
        assert!(t.first_failure.is_some());
    }

    #[tokio::test]
    async fn a_record_refused_alone_after_a_bystander_round_is_rejected_only_alone() {
        // A bystander that is itself invalid (the broker reported only another record of the
        // first request): refused in the bystanders' request, whose others are bystanders
        // again; each is then sent alone: the invalid one rejected, the others delivered.
        let mut broker = FakeBroker::new(&[1]);
        let first = vec![
            Some(Fate::Bystander),
            Some(Fate::Bystander),
            Some(Fate::Bystander),
        ];
        let b = std::cell::RefCell::new(&mut broker);
        let settled = settle(first, |indices| {
            let fates = b.borrow_mut().send(3, indices);
            async move { fates }
        })
        .await;
        assert_eq!(settled.alone, vec![true, true, true]);
        let t = tally(settled, &records(3), 10_000);
        assert_eq!(t.out.delivered, vec![0, 2]);
        assert_eq!(t.out.rejected.len(), 1);
        assert_eq!(
            broker.requests,
            vec![vec![0, 1, 2], vec![0], vec![1], vec![2]]
        );
    }

    #[tokio::test]
    async fn a_broker_refusing_every_record_alone_quarantines_them_and_says_so() {
        // A topic policy (e.g. broker-side schema validation) refusing every record: each is
        // quarantined (kept pending, one bad unit alone in its batch would block its source for
        // good), and the outcome says the whole batch was refused.
        let mut broker = FakeBroker::new(&[0, 1, 2]);
        let t = run(&mut broker, 3).await;
        assert!(t.out.delivered.is_empty());
        let rejected: Vec<usize> = t.out.rejected.iter().map(|(i, _)| *i).collect();
        assert_eq!(rejected, vec![0, 1, 2]);
        let (e, n) = t
            .all_refused
            .expect("every record refused: the whole batch is said refused");
        assert_eq!(kafka_code(&e), Some(RDKafkaErrorCode::InvalidRecord));
        assert_eq!(n, 3);
        assert!(t.first_failure.is_none());
        // Each was tried alone first: the whole batch, then one by one.
        assert_eq!(
            broker.requests,
            vec![vec![0, 1, 2], vec![0], vec![1], vec![2]]
        );

        // Records over the producer's own limit are rejected too; the others refused alone
        // still make the whole batch refused.
        let mut broker = FakeBroker::new(&[0, 1, 2]);
        let first = broker.send(3, vec![0, 1, 2]);
        let b = std::cell::RefCell::new(&mut broker);
        let settled = settle(first, |indices| {
            let fates = b.borrow_mut().send(3, indices);
            async move { fates }
        })
        .await;
        let mut batch = records(3);
        batch[2].json = "x".repeat(50);
        let t = tally(settled, &batch, 20);
        let mut rejected: Vec<usize> = t.out.rejected.iter().map(|(i, _)| *i).collect();
        rejected.sort_unstable();
        assert_eq!(rejected, vec![0, 1, 2]);
        assert_eq!(t.all_refused.as_ref().map(|(_, n)| *n), Some(2));

        // A batch of one refused record: that record is quarantined, nothing more is said (no
        // way to tell the topic from the record).
        let mut broker = FakeBroker::new(&[0]);
        let t = run(&mut broker, 1).await;
        assert_eq!(t.out.rejected.len(), 1);
        assert!(t.all_refused.is_none());

        // One good record among refused ones: the refused ones are bad records, quarantined.
        let mut broker = FakeBroker::new(&[0, 1]);
        let t = run(&mut broker, 3).await;
        assert_eq!(t.out.delivered, vec![2]);
        assert_eq!(t.out.rejected.len(), 2);
        assert!(t.all_refused.is_none());

        // The reason names the refusal, the topic, the quarantine and the fix, on one line.
        let sink = KafkaSink::new(KafkaSinkConfig::new("b1:9092", DEFAULT_KAFKA_TOPIC)).unwrap();
        let msg = sink.refused_all_reason(
            &KafkaError::MessageProduction(RDKafkaErrorCode::PolicyViolation),
            4,
        );
        assert!(!msg.contains('\n') && !msg.contains("  "), "{msg}");
        for part in [
            "b1:9092",
            "every record of a batch of 4",
            "PolicyViolation",
            "akto.api.logs",
            "quarantine.jsonl",
            "AKTO_KAFKA_TOPIC_NAME",
        ] {
            assert!(msg.contains(part), "{part:?} missing: {msg}");
        }
    }

    /// A record left pending only because a neighbour's refusal was not verified alone does not
    /// hide the real failure of another record (here a refused topic authorization).
    #[test]
    fn the_failure_reported_is_the_real_one() {
        let refused = classify(
            produce_error(RDKafkaErrorCode::InvalidRecord),
            false,
            42,
            1000,
        );
        let denied = classify(
            produce_error(RDKafkaErrorCode::TopicAuthorizationFailed),
            false,
            42,
            1000,
        );
        let settled = Settled {
            fates: vec![Some(refused), Some(Fate::Bystander), Some(denied)],
            alone: vec![false, false, false],
        };
        let t = tally(settled, &records(3), 10_000);
        assert!(t.out.delivered.is_empty() && t.out.rejected.is_empty());
        assert_eq!(
            t.first_failure.as_ref().and_then(kafka_code),
            Some(RDKafkaErrorCode::TopicAuthorizationFailed)
        );
        // Without a real failure, the first pending record's reason is reported.
        let refused = classify(
            produce_error(RDKafkaErrorCode::InvalidRecord),
            false,
            42,
            1000,
        );
        let settled = Settled {
            fates: vec![Some(Fate::Bystander), Some(refused)],
            alone: vec![false, false],
        };
        let t = tally(settled, &records(2), 10_000);
        assert_eq!(
            t.first_failure.as_ref().and_then(kafka_code),
            Some(RDKafkaErrorCode::InvalidDifferentRecord)
        );
    }

    #[test]
    fn a_failed_restart_is_worded_as_such() {
        assert_eq!(restart_note(None), "");
        assert_eq!(
            restart_note(Some(&Ok(()))),
            "; the connector restarted its Kafka producer"
        );
        let note = restart_note(Some(&Err("no CA file".into())));
        assert_eq!(
            note,
            "; the connector could not restart its Kafka producer: no CA file"
        );
        assert!(!note.contains("restarted"));
    }

    #[tokio::test]
    async fn a_producer_that_cannot_be_recreated_says_so() {
        // The CA file goes away after the start: a restart cannot create a new producer.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        // A closed loopback port: records time out, which restarts the producer.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut cfg = KafkaSinkConfig::new(format!("127.0.0.1:{port}"), DEFAULT_KAFKA_TOPIC);
        cfg.security_protocol = Some("ssl".into());
        cfg.ca_file = Some(ca.clone());
        cfg.message_timeout = Duration::from_millis(200);
        let sink = KafkaSink::new(cfg).expect("the CA file is there at the start");
        std::fs::remove_file(&ca).unwrap();
        let reason = sink.replace_producer().unwrap_err();
        assert!(reason.contains("CA file"), "{reason}");

        let e = sink.deliver(&records(2)).await.unwrap_err();
        let msg = e.to_string();
        assert!(e.is_retriable(), "{msg}");
        assert!(
            msg.contains("the connector could not restart its Kafka producer: ")
                && msg.contains("CA file"),
            "{msg}"
        );
        assert!(!msg.contains("restarted its Kafka producer"), "{msg}");
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
            &format!("{}{}", restart_note(Some(&Ok(()))), stored_note(3)),
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
