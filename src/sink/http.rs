//! The HTTP sink: Akto's Data Ingestion Service (`POST {url}/api/ingestData`).
//!
//! It exists to turn "a batch of encoded records" into exactly-acknowledged deliveries against
//! a service that answers per batch:
//! - 200 means the service took every record: Akto's hand-off, not durable storage. Akto's
//!   ingestion service answers 200 and then hands each record to its own Kafka producer,
//!   asynchronously and without retries; a record it re-encodes to more than the producer's
//!   `max.request.size` is dropped there with only a log line in Akto. So records longer than
//!   `AKTO_MAX_RECORD_BYTES` ([`HttpSink::max_record_bytes`], default
//!   [`super::DEFAULT_AKTO_MAX_RECORD_BYTES`]) are rejected without sending (the connector cuts
//!   their payloads before, so this only catches what a caller did not cut);
//! - 408/429/5xx and connection failures (timeouts included) are retried with capped, jittered
//!   backoff (honouring `Retry-After`). A request that timed out or lost its connection after
//!   it was sent, or got a 502/504 from a gateway in front of Akto (which may have passed it on
//!   before giving up), may have been stored by the service all the same (Akto has no
//!   idempotency key): its records are counted and announced in a WARN ("N records may be
//!   stored twice") and in the delivery error, never silently;
//! - 422: Akto's ingestion service validates nothing; it answers 422 (`actionErrors`) when an
//!   exception escapes its per-record loop, after the records before the failing one were
//!   already handed to its producer. The strict stand-in answers 422 for a record Akto would
//!   drop silently. Either way the batch is bisected so only the refused record(s) are rejected
//!   (and quarantined by the caller); records of a refused batch of two or more that are then
//!   accepted may be stored twice, and are counted and announced as such;
//! - 400, 403 and 413 may come from Akto or from something in between (an ingress, a WAF
//!   refusing a payload that looks like an attack, a proxy with a smaller body limit): the batch
//!   is bisected too;
//! - when every record of a batch ends up refused alone with the same status 400, 403 or 413,
//!   the requests are refused, not the records (most often a WAF or ingress in between): a
//!   delivery error that keeps them all pending for the next cycle instead of quarantining
//!   everything;
//! - when Akto refuses every record of a batch of two or more with 422, each alone, they are
//!   quarantined like any refused record (kept pending, one bad unit alone in its batch would
//!   stop its source for good), and [`BatchOutcome::whole_batch_refused`] says so: the caller
//!   reports the cycle as failed;
//! - any other 4xx (407, 411, 415, 431, ...) says the same at once; 401 means the JWT is wrong
//!   and 404/405/3xx a wrong URL. No retry fixes those, and no record is rejected for them.
//!
//! TLS is always verified: against the webpki roots, plus the certificates of a PEM bundle given
//! with [`HttpSink::with_ca_bundle`] (`AKTO_CA_BUNDLE`: a private CA or a TLS-inspecting proxy)
//! or [`HttpSink::with_ca_bundle_from`] (the same from another setting, e.g. the workspace's
//! `DATABRICKS_CA_BUNDLE`). A certificate error names its cause: only an unknown issuer gets the
//! advice to give the CA's bundle; an expired certificate, one for another name, or a demand for
//! a client certificate get their own fix.
//!
//! A request may take [`HttpSinkConfig::timeout`] (`AKTO_REQUEST_TIMEOUT_SECONDS`) plus one
//! second per [`UPLOAD_FLOOR_BYTES_PER_SEC`] bytes of its body, so a 10 MiB body has time to
//! upload over a slow link instead of timing out (and being sent again) on every attempt.
//!
//! Architecture Invariant: the body is built by concatenating the pre-encoded records (no
//! re-parse), sent as `Content-Type: application/json`, and the `authorization` header is
//! marked sensitive and never logged.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use url::Url;

use super::{
    plan_by_len, BatchOutcome, OutRecord, RetryPolicy, SinkError, BODY_PREFIX, BODY_SUFFIX,
    BODY_WRAPPER_BYTES, MAX_BODY_BYTES,
};
use crate::secret_file::SecretFile;

/// How many characters of a server's error body are kept in reasons and messages.
const SNIPPET_CHARS: usize = 300;

/// The default of [`HttpSinkConfig::timeout`] (`AKTO_REQUEST_TIMEOUT_SECONDS`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The slowest upload a request is given time for: each request may take its base timeout plus
/// one second per this many bytes of body (256 KiB/s, about 2 Mbit/s: +40 s for 10 MiB).
pub const UPLOAD_FLOOR_BYTES_PER_SEC: u64 = 256 * 1024;

/// Settings of the [`HttpSink`]. Debug output hides the JWT and any credentials in the URL.
#[derive(Clone)]
pub struct HttpSinkConfig {
    /// `DATA_INGESTION_SERVICE_URL`: the service's base URL (a trailing slash is fine).
    pub url: Url,
    /// `AKTO_JWT_TOKEN`, sent raw as `authorization` when set.
    pub jwt: Option<SecretString>,
    /// `AKTO_REQUEST_TIMEOUT_SECONDS`: whole-request timeout of a small request; a POST gets
    /// one more second per [`UPLOAD_FLOOR_BYTES_PER_SEC`] bytes of body (see
    /// [`HttpSink::request_timeout`]). Connect timeout: the smaller of this and 10 s. Zero means
    /// the default, 30 s.
    pub timeout: Duration,
    /// Retry budget of one `deliver` call.
    pub retry: RetryPolicy,
}

impl fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("url", &shown(&self.url))
            .field("jwt", &self.jwt.as_ref().map(|_| "[REDACTED]"))
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

impl HttpSinkConfig {
    /// Settings for `url` with a 30 s request timeout and the default [`RetryPolicy`].
    pub fn new(url: Url, jwt: Option<SecretString>) -> HttpSinkConfig {
        HttpSinkConfig {
            url,
            jwt,
            timeout: DEFAULT_REQUEST_TIMEOUT,
            retry: RetryPolicy::default(),
        }
    }
}

/// Delivers batches to Akto's Data Ingestion Service.
pub struct HttpSink {
    client: reqwest::Client,
    ingest_url: Url,
    health_url: Url,
    /// `ingest_url` without user info or query, for messages.
    shown_url: String,
    /// The `authorization` header sent now.
    auth: std::sync::Mutex<Option<HeaderValue>>,
    /// `AKTO_JWT_TOKEN_FILE`, read again at most every [`JWT_RECHECK`] and after a 401/403.
    jwt_file: Option<SecretFile>,
    /// Base timeout of one request (see [`HttpSink::request_timeout`]).
    timeout: Duration,
    retry: RetryPolicy,
    /// The PEM bundle whose certificates are trusted too, and the setting it came from (e.g.
    /// `AKTO_CA_BUNDLE`), for messages.
    ca_bundle: Option<(PathBuf, &'static str)>,
    /// Records sent in a request that timed out, lost its connection after it was sent or got a
    /// gateway's 502/504, and were sent again, or in a batch of two or more refused with 422 and
    /// then accepted: the service may hold them twice. Since the sink was built.
    maybe_stored_twice: AtomicU64,
    /// `AKTO_MAX_RECORD_BYTES`: longer records are rejected without sending.
    max_record_bytes: usize,
}

/// How often a JWT read from a file is looked at again.
const JWT_RECHECK: Duration = Duration::from_secs(30);

impl fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSink")
            .field("url", &self.shown_url)
            .field(
                "jwt",
                &self
                    .auth
                    .lock()
                    .ok()
                    .and_then(|a| a.as_ref().map(|_| "[REDACTED]")),
            )
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("ca_bundle", &self.ca_bundle)
            .finish()
    }
}

/// Per record of one `deliver` call: what may have been stored although it was not confirmed.
struct Marks {
    /// In a request that was sent but got no answer (timeout, lost connection, gateway 502/504).
    maybe_stored: Vec<bool>,
    /// In a batch of two or more refused with 422 (Akto may have handed part of it on).
    refused_in_batch: Vec<bool>,
}

/// What one HTTP exchange said about a batch.
enum Reply {
    Accepted,
    /// Refused with 422 (Akto's answer when a record failed mid-batch, the stand-in's for a
    /// record Akto would drop) or 400/403/413 (Akto's or the path's): bisected; see
    /// [`HttpSink::deliver`] for when a refusal rejects a record.
    Refused {
        status: StatusCode,
        body: String,
    },
    /// Worth retrying: what happened, and the server's Retry-After if any.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
        /// The request was sent (it timed out or lost its connection afterwards, or a gateway
        /// in front of the service answered 502/504): the service may have stored it.
        maybe_stored: bool,
    },
}

impl HttpSink {
    /// Validates the configuration and builds the HTTP client (rustls, no redirects).
    pub fn new(config: HttpSinkConfig) -> Result<HttpSink, SinkError> {
        let url = config.url;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(SinkError::Config {
                field: "DATA_INGESTION_SERVICE_URL",
                message: format!(
                    "must be an http:// or https:// URL with a host, got {}",
                    shown(&url)
                ),
            });
        }
        let ingest_url = with_path(&url, "api/ingestData");
        let health_url = with_path(&url, "healthCheck");
        let auth = match config.jwt {
            None => None,
            Some(secret) => {
                let raw = secret.expose_secret().trim();
                if raw.is_empty() {
                    None
                } else {
                    let mut value = HeaderValue::from_str(raw).map_err(|_| SinkError::Config {
                        field: "AKTO_JWT_TOKEN",
                        message: "contains characters not allowed in an HTTP header \
                                  (e.g. a line break inside the token); set it to the raw JWT"
                            .into(),
                    })?;
                    value.set_sensitive(true);
                    Some(value)
                }
            }
        };
        let timeout = if config.timeout.is_zero() {
            DEFAULT_REQUEST_TIMEOUT
        } else {
            config.timeout
        };
        let client = build_client(timeout, Vec::new())?;
        let mut retry = config.retry;
        retry.max_attempts = retry.max_attempts.max(1);
        Ok(HttpSink {
            client,
            shown_url: shown(&ingest_url),
            ingest_url,
            health_url,
            auth: std::sync::Mutex::new(auth),
            jwt_file: None,
            timeout,
            retry,
            ca_bundle: None,
            maybe_stored_twice: AtomicU64::new(0),
            max_record_bytes: super::DEFAULT_AKTO_MAX_RECORD_BYTES,
        })
    }

    /// Sets `AKTO_MAX_RECORD_BYTES`: the longest record (its JSON) sent, for Akto's ingestion
    /// producer's `max.request.size` (1,000,000 for Akto releases whose producer keeps Kafka's
    /// 1 MB default). Between [`super::MIN_AKTO_MAX_RECORD_BYTES`] and
    /// [`super::MAX_AKTO_MAX_RECORD_BYTES`], else a configuration error naming the setting.
    pub fn with_max_record_bytes(mut self, bytes: usize) -> Result<HttpSink, SinkError> {
        self.max_record_bytes = checked_max_record_bytes(bytes)?;
        Ok(self)
    }

    /// `AKTO_MAX_RECORD_BYTES`: the longest record (its JSON) this sink sends.
    pub fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }

    /// Also trusts the CA certificates of the PEM bundle at `path` (`AKTO_CA_BUNDLE`: the CA of a
    /// private ingestion endpoint or of a TLS-inspecting proxy), besides the webpki roots.
    /// Certificates are always verified. Errors name `AKTO_CA_BUNDLE`, the file and the fix.
    pub fn with_ca_bundle(self, path: impl AsRef<Path>) -> Result<HttpSink, SinkError> {
        self.with_ca_bundle_from(path, "AKTO_CA_BUNDLE")
    }

    /// [`Self::with_ca_bundle`] for a bundle given by `setting` (e.g. `DATABRICKS_CA_BUNDLE` or
    /// `SSL_CERT_FILE` when `AKTO_CA_BUNDLE` is unset and the sink trusts the workspace's bundle):
    /// errors and certificate advice name that setting, and say that `AKTO_CA_BUNDLE` gives the
    /// sink a bundle of its own.
    pub fn with_ca_bundle_from(
        mut self,
        path: impl AsRef<Path>,
        setting: &'static str,
    ) -> Result<HttpSink, SinkError> {
        let path = path.as_ref();
        let fix = if setting == "AKTO_CA_BUNDLE" {
            String::new()
        } else {
            format!(
                " (the ingestion sink trusts {setting} because AKTO_CA_BUNDLE is unset; set \
                 AKTO_CA_BUNDLE to give it a bundle of its own)"
            )
        };
        let pem = std::fs::read(path).map_err(|e| SinkError::Config {
            field: setting,
            message: format!(
                "{} cannot be read ({e}); set {setting} to a readable PEM file of the CA that \
                 signed the ingestion service's certificate{fix}",
                path.display()
            ),
        })?;
        let certs =
            crate::databricks::parse_ca_bundle(&pem).map_err(|detail| SinkError::Config {
                field: setting,
                message: format!("{}: {detail}{fix}", path.display()),
            })?;
        self.client = build_client(self.timeout, certs)?;
        self.ca_bundle = Some((path.to_path_buf(), setting));
        Ok(self)
    }

    /// Records sent in a request that timed out, lost its connection after it was sent or got a
    /// 502/504 from a gateway in front of the service, and that were sent again, or that were
    /// in a batch of two or more refused with 422 (Akto hands the records before a failing one
    /// on before it answers 422) and were then accepted, since this sink was built: the
    /// ingestion service may hold them twice (each such delivery is announced in a WARN,
    /// `records=N`).
    pub fn records_maybe_stored_twice(&self) -> u64 {
        self.maybe_stored_twice.load(Ordering::Relaxed)
    }

    /// How long one POST of `body_len` bytes may take: the base timeout plus one second per
    /// [`UPLOAD_FLOOR_BYTES_PER_SEC`] bytes, so the upload itself never eats the whole budget.
    pub fn request_timeout(&self, body_len: usize) -> Duration {
        let len = u64::try_from(body_len).unwrap_or(u64::MAX);
        let upload_ms = len.saturating_mul(1000) / UPLOAD_FLOOR_BYTES_PER_SEC;
        self.timeout
            .saturating_add(Duration::from_millis(upload_ms))
    }

    /// The JWT came from `path` (`AKTO_JWT_TOKEN_FILE`): read it again at most every 30 s and
    /// at once after a 401/403, so that a rotated token needs no restart (a 403 counts as the
    /// token's fault only when the file holds a new token, which is then sent).
    pub fn reread_jwt_from(mut self, path: std::path::PathBuf) -> Self {
        let initial = self
            .auth
            .lock()
            .ok()
            .and_then(|a| a.as_ref().and_then(|h| h.to_str().ok().map(str::to_owned)))
            .unwrap_or_default();
        self.jwt_file = Some(SecretFile::new(
            path,
            "AKTO_JWT_TOKEN_FILE",
            SecretString::from(initial),
        ));
        self
    }

    /// [`snippet`] of an answer, without the token `sent` with the request when the answer
    /// echoes it (a proxy's or firewall's error page showing its headers).
    fn answer_snippet(body: &str, sent: Option<&HeaderValue>) -> String {
        let token = sent
            .and_then(|h| h.to_str().ok())
            .filter(|t| t.len() >= 8 && body.contains(*t));
        match token {
            Some(t) => snippet(&body.replace(t, "[redacted]")),
            None => snippet(body),
        }
    }

    /// The `authorization` header to send (the token file read again when due).
    fn auth_header(&self) -> Option<HeaderValue> {
        if let Some(f) = self.jwt_file.as_ref().filter(|f| f.due(JWT_RECHECK)) {
            if let (token, true) = f.read() {
                self.use_token(f, &token);
            }
        }
        self.auth.lock().ok().and_then(|a| a.clone())
    }

    /// Makes `token` (read from `f`) the header sent from now on; returns whether it changed.
    /// A token that cannot be a header keeps the one before (WARN, never the value).
    fn use_token(&self, f: &SecretFile, token: &SecretString) -> bool {
        let Ok(mut value) = HeaderValue::from_str(token.expose_secret().trim()) else {
            tracing::warn!(
                "{} {} holds characters not allowed in an HTTP header: still using the token \
                 read before",
                f.variable(),
                f.path().display()
            );
            return false;
        };
        value.set_sensitive(true);
        let Ok(mut auth) = self.auth.lock() else {
            return false;
        };
        if auth
            .as_ref()
            .is_some_and(|a| a.as_bytes() == value.as_bytes())
        {
            return false;
        }
        *auth = Some(value);
        true
    }

    /// E.g. `Akto ingestion at https://host/api/ingestData` (no credentials).
    pub fn describe(&self) -> String {
        format!("Akto ingestion at {}", self.shown_url)
    }

    /// `GET {url}/healthCheck` once: 200 is healthy.
    pub async fn healthcheck(&self) -> Result<(), SinkError> {
        let mut req = self.client.get(self.health_url.clone());
        let sent = self.auth_header();
        if let Some(auth) = &sent {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let shown_health = shown(&self.health_url);
        let resp = req.send().await.map_err(|e| {
            let mut message = unreachable_message(&shown_health, &e);
            if is_certificate_error(&message) {
                message = format!("{message}; {}", self.certificate_hint(&message));
            }
            SinkError::retriable(message)
        })?;
        let status = resp.status();
        if status == StatusCode::OK {
            return Ok(());
        }
        let body = Self::answer_snippet(&resp.text().await.unwrap_or_default(), sent.as_ref());
        if let Some(err) = self.config_error(status, &body, &shown_health) {
            return Err(err);
        }
        let hint = if status == StatusCode::FORBIDDEN {
            " (a 403 with a valid token: a WAF, ingress or proxy in between, or an access rule \
             in front of the service, refuses the request; Akto answers a bad token with 401)"
        } else {
            ""
        };
        Err(SinkError::retriable(format!(
            "No data appearing: the Akto ingestion service health check at {shown_health} \
             answered HTTP {status} ({body}){hint}; check DATA_INGESTION_SERVICE_URL and the \
             service's own logs"
        )))
    }

    /// Posts an empty batch (`{"batchData":[]}`, which stores nothing) with the sink's own
    /// client, URL and token, for `check`: whether the service takes the token the deliveries
    /// will send. Returns the HTTP status and whether a token was sent; `Err` names the URL and
    /// why no answer came.
    pub async fn post_empty_batch(&self) -> Result<(StatusCode, bool), String> {
        let (req, with_token) =
            self.ingest_request(bytes::Bytes::from(format!("{BODY_PREFIX}{BODY_SUFFIX}")));
        let resp = req
            .send()
            .await
            .map_err(|e| format!("POST {} failed ({})", self.shown_url, error_chain(&e)))?;
        Ok((resp.status(), with_token.is_some()))
    }

    /// The ingestion URL as shown in messages (no credentials, no query).
    pub fn shown_url(&self) -> &str {
        &self.shown_url
    }

    /// Delivers `batch` (see [`super::AnySink::deliver`] for the contract).
    ///
    /// Records longer than [`Self::max_record_bytes`] (`AKTO_MAX_RECORD_BYTES`), or that alone
    /// exceed Akto's 10 MiB body limit, are rejected without sending; the rest go out in as few
    /// requests as the body limit allows, bisected on 422/400/403/413 answers. A record refused
    /// alone is rejected, unless every sent record of the batch was refused alone with the same
    /// 400, 403 or 413: then the path between the connector and Akto (or the service) refuses
    /// the requests rather than the records, and the result is a [`SinkError::Protocol`] that
    /// keeps them all pending. When every record of a batch of two or more was refused with
    /// 422, they are rejected and [`BatchOutcome::whole_batch_refused`] says so. Records of a
    /// request that timed out or lost its connection after it was sent, and records of a batch
    /// of two or more refused with 422 that were accepted afterwards, are counted (WARN,
    /// [`Self::records_maybe_stored_twice`]): they may be stored twice.
    pub async fn deliver(&self, batch: &[OutRecord]) -> Result<BatchOutcome, SinkError> {
        let mut marks = Marks {
            maybe_stored: vec![false; batch.len()],
            refused_in_batch: vec![false; batch.len()],
        };
        let result = self.deliver_counted(batch, &mut marks).await;
        let unanswered = marks.maybe_stored.iter().filter(|m| **m).count();
        // Accepted after a 422 to a batch holding them: Akto may have handed them on already.
        let delivered = match &result {
            Ok(out) => out.delivered.as_slice(),
            Err(e) => e.delivered_before_failure(),
        };
        let after_422 = delivered
            .iter()
            .filter(|&&i| marks.refused_in_batch[i] && !marks.maybe_stored[i])
            .count();
        // Of a 422 batch and left pending by a later failure: sent again next cycle, and Akto
        // may hold them already.
        let pending_422 = match &result {
            Ok(_) => 0,
            Err(e) => {
                let rejected: std::collections::HashSet<usize> = e
                    .rejected_before_failure()
                    .iter()
                    .map(|(i, _)| *i)
                    .collect();
                (0..batch.len())
                    .filter(|&i| {
                        marks.refused_in_batch[i]
                            && !marks.maybe_stored[i]
                            && !delivered.contains(&i)
                            && !rejected.contains(&i)
                    })
                    .count()
            }
        };
        let count = unanswered + after_422 + pending_422;
        if count == 0 {
            return result;
        }
        self.maybe_stored_twice
            .fetch_add(u64::try_from(count).unwrap_or(u64::MAX), Ordering::Relaxed);
        let mut causes = Vec::new();
        if unanswered > 0 {
            // Not "accepted": a group sent again may have been split on 422 and partly refused.
            let sent_again = if result.is_ok() {
                "were sent again"
            } else {
                "stay pending and are sent again"
            };
            causes.push(format!(
                "{unanswered} were in a request that timed out, lost its connection after it was \
                 sent, or got HTTP 502/504 from a gateway in front of the service (the service \
                 may have stored it all the same) and {sent_again}"
            ));
        }
        if after_422 > 0 {
            causes.push(format!(
                "{after_422} were in a batch the service answered with HTTP 422 and were \
                 accepted when sent again in smaller batches (Akto answers 422 when a record \
                 fails mid-batch, after it handed the records before it on)"
            ));
        }
        if pending_422 > 0 {
            causes.push(format!(
                "{pending_422} were in a batch the service answered with HTTP 422 (Akto may have \
                 handed them on before the record that failed) and stay pending and are sent \
                 again"
            ));
        }
        let causes = causes.join("; ");
        let advice = if unanswered > 0 {
            ". If this repeats, raise AKTO_REQUEST_TIMEOUT_SECONDS; a gateway in front of Akto \
             (load balancer, ingress) with a shorter timeout makes that useless: raise the \
             gateway's timeout too (e.g. an ingress' proxy-read-timeout)"
        } else {
            ". If this repeats, look in the ingestion service's logs for \"Error while \
             inserting data to Kafka\""
        };
        tracing::warn!(
            sink = "http",
            records = count,
            "{count} records may be stored twice by the Akto ingestion service at {}: {causes}; \
             Akto's ingestion API has no idempotency key{advice}",
            self.shown_url
        );
        result.map_err(|e| {
            with_note(
                e,
                &format!(
                    "; {count} of these records may already be stored by the service ({causes}): \
                     Akto may hold them twice"
                ),
            )
        })
    }

    /// [`Self::deliver`], marking in `marks` the records of requests the service may have
    /// stored although no answer came, and those of batches of two or more refused with 422.
    async fn deliver_counted(
        &self,
        batch: &[OutRecord],
        marks: &mut Marks,
    ) -> Result<BatchOutcome, SinkError> {
        let deadline = Instant::now() + self.retry.max_elapsed;
        let mut out = BatchOutcome::default();
        let mut sendable = Vec::with_capacity(batch.len());
        for (i, r) in batch.iter().enumerate() {
            let alone = BODY_WRAPPER_BYTES.saturating_add(r.json.len());
            if alone > MAX_BODY_BYTES {
                out.rejected.push((
                    i,
                    format!(
                        "record is {} bytes; a request holding only it would be {alone} bytes, \
                         over Akto's {MAX_BODY_BYTES}-byte body limit",
                        r.json.len()
                    ),
                ));
            } else if r.json.len() > self.max_record_bytes {
                out.rejected.push((
                    i,
                    format!(
                        "record is {} bytes, over AKTO_MAX_RECORD_BYTES ({}): Akto's ingestion \
                         service would answer 200 and then drop it (its Kafka producer refuses \
                         records over its max.request.size); cut its payloads, or raise \
                         AKTO_MAX_RECORD_BYTES together with Akto's AKTO_KAFKA_MAX_REQUEST_SIZE",
                        r.json.len(),
                        self.max_record_bytes
                    ),
                ));
            } else {
                sendable.push(i);
            }
        }
        // Pending groups of indices, last to send on top.
        let plan = plan_by_len(
            sendable.iter().map(|&i| batch[i].json.len()),
            usize::MAX,
            MAX_BODY_BYTES,
        );
        let mut stack: Vec<Vec<usize>> = plan
            .into_iter()
            .rev()
            .map(|r| sendable[r].to_vec())
            .collect();
        // Records refused alone: rejected only if not every sent record was (same status).
        let mut doubtful: Vec<(usize, StatusCode, String)> = Vec::new();
        while let Some(group) = stack.pop() {
            match self
                .send_with_retry(batch, &group, deadline, &mut marks.maybe_stored)
                .await
            {
                Ok(None) => out.delivered.extend_from_slice(&group),
                Ok(Some((status, body))) => {
                    if let [only] = group.as_slice() {
                        doubtful.push((*only, status, body));
                    } else {
                        if status == StatusCode::UNPROCESSABLE_ENTITY {
                            for &i in &group {
                                marks.refused_in_batch[i] = true;
                            }
                        }
                        let (left, right) = group.split_at(group.len() / 2);
                        stack.push(right.to_vec());
                        stack.push(left.to_vec());
                    }
                }
                // Doubtful refusals stay pending: the batch did not finish, so whether the
                // service or the path refused them all cannot be told.
                Err(e) => return Err(e.with_progress(out.delivered, out.rejected)),
            }
        }
        if let Some((_, status, body)) = doubtful.first() {
            let all_alike =
                doubtful.len() == sendable.len() && doubtful.iter().all(|(_, s, _)| s == status);
            if all_alike && *status == StatusCode::UNPROCESSABLE_ENTITY && doubtful.len() >= 2 {
                // Quarantined like any refused record (kept pending, one bad unit alone in its
                // batch would stop its source for good), but said: the caller fails the cycle.
                out.whole_batch_refused = Some(self.refused_all_reason(body, doubtful.len()));
            }
            if all_alike && *status != StatusCode::UNPROCESSABLE_ENTITY {
                let what = if doubtful.len() == 1 {
                    "to the batch's only record".to_string()
                } else {
                    format!(
                        "to every one of the batch's {} records, each sent alone",
                        doubtful.len()
                    )
                };
                return Err(self
                    .path_error(*status, body, &what)
                    .with_progress(Vec::new(), out.rejected));
            }
            // Others went through (or were refused otherwise): this record itself is refused.
            // Kept in quarantine (with the fix) rather than pending, which would stop all
            // delivery at it every cycle.
            for (i, status, body) in doubtful {
                let reason = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    tracing::error!(
                        "a {}-byte record was refused with HTTP 413 while smaller ones were \
                         accepted: something between the connector and Akto limits request bodies \
                         below Akto's 10 MiB (e.g. an ingress' client_max_body_size); raise it to \
                         10m. The record is kept in STATE_DIR/quarantine.jsonl",
                        batch[i].json.len()
                    );
                    format!(
                        "{}; smaller records were accepted, so a proxy or ingress between the \
                         connector and Akto limits request bodies below Akto's 10 MiB: raise that \
                         limit to 10m",
                        refusal(status, &body)
                    )
                } else if status == StatusCode::FORBIDDEN {
                    format!(
                        "{}; other records were accepted, so a WAF, ingress or proxy between the \
                         connector and Akto refuses this record's content (e.g. a prompt that \
                         looks like SQL injection or a script; Akto itself answers a bad token \
                         with 401): allow it there; the record is kept in \
                         STATE_DIR/quarantine.jsonl",
                        refusal(status, &body)
                    )
                } else {
                    refusal(status, &body)
                };
                out.rejected.push((i, reason));
            }
        }
        Ok(out)
    }

    /// The one-line reason of [`BatchOutcome::whole_batch_refused`] for a batch of two or more
    /// records refused with 422, each sent alone: one record refused among good ones is that
    /// record's fault (Akto's per-record loop failed on it; the strict stand-in answers 422 for
    /// a record Akto would drop); all of them refused may say the service does not take this
    /// connector's records at all.
    fn refused_all_reason(&self, body: &str, records: usize) -> String {
        format!(
            "Akto refused every record of a batch of {records} with HTTP 422, each sent alone \
             (the Akto ingestion service at {}: {body}): they are in STATE_DIR/quarantine.jsonl; \
             if Akto refuses every record, check its version and the record format (an Akto \
             version expecting another format, a validation rule of the account) and the \
             ingestion service's logs",
            self.shown_url
        )
    }

    /// The error for a 4xx that refuses requests rather than records: what answered, and where
    /// to look (the URL, a proxy, WAF or ingress in between). The records stay pending.
    fn path_error(&self, status: StatusCode, body: &str, what: &str) -> SinkError {
        let hint = match status.as_u16() {
            403 => {
                "Akto answers a bad token with 401 and never 403, so a WAF, ingress or proxy \
                 between the connector and Akto (or an access rule in front of the service) \
                 refuses the requests, e.g. a WAF rule matching payloads that look like \
                 SQL injection or scripts: check its logs and rules for this connector's \
                 requests"
            }
            407 => {
                "a proxy between the connector and Akto requires authentication: give its \
                 credentials in HTTPS_PROXY / HTTP_PROXY (http://user:password@proxy:port), or \
                 list the ingestion host in NO_PROXY"
            }
            413 => {
                "something between the connector and Akto has a body size limit under Akto's \
                 10 MiB (e.g. an ingress' client_max_body_size or proxy-body-size): raise it to \
                 at least 10m"
            }
            415 => {
                "something between the connector and Akto does not pass the request's \
                 `Content-Type: application/json` on"
            }
            431 => {
                "something between the connector and Akto refuses the request headers as too \
                 large"
            }
            _ => {
                "Akto's ingestion service answers only 200, 401 or 422, so a proxy, WAF or \
                 ingress between the connector and Akto (or another service at that URL) \
                 refuses the requests"
            }
        };
        SinkError::protocol(format!(
            "No data appearing: {} answered HTTP {status} ({body}) {what}; {hint}. Check \
             DATA_INGESTION_SERVICE_URL (Akto's Data Ingestion Service itself, without \
             /api/ingestData), HTTPS_PROXY / HTTP_PROXY / NO_PROXY and any WAF or ingress rule \
             in between; the records stay pending (not quarantined) and are sent again next \
             cycle",
            self.shown_url
        ))
    }

    /// Sends one group until accepted (`Ok(None)`), refused (`Ok(Some((status, body
    /// excerpt)))`) or the retry budget runs out (`Err`). Marks the group in `maybe_stored`
    /// when an attempt was sent but got no answer.
    async fn send_with_retry(
        &self,
        batch: &[OutRecord],
        group: &[usize],
        deadline: Instant,
        maybe_stored: &mut [bool],
    ) -> Result<Option<(StatusCode, String)>, SinkError> {
        // Shared, not copied, by each attempt.
        let body = bytes::Bytes::from(build_body(batch, group));
        let mut attempt = 1u32;
        loop {
            match self.send_once(body.clone()).await? {
                Reply::Accepted => return Ok(None),
                Reply::Refused { status, body } => return Ok(Some((status, body))),
                Reply::Transient {
                    reason,
                    retry_after,
                    maybe_stored: sent,
                } => {
                    if sent {
                        for &i in group {
                            if let Some(m) = maybe_stored.get_mut(i) {
                                *m = true;
                            }
                        }
                    }
                    let give_up = |why: &str| {
                        SinkError::retriable(format!(
                            "No data appearing: delivery to the Akto ingestion service at {} \
                             failed ({reason}); {why}. Check DATA_INGESTION_SERVICE_URL and that \
                             the service is up and reachable; the records stay pending and are \
                             retried next cycle",
                            self.shown_url
                        ))
                    };
                    if attempt >= self.retry.max_attempts {
                        return Err(give_up(&format!("gave up after {attempt} attempts")));
                    }
                    let delay = self.retry.delay(attempt, retry_after);
                    if Instant::now() + delay > deadline {
                        return Err(give_up(&format!(
                            "gave up after {attempt} attempts: the retry time budget of {:?} \
                             is spent",
                            self.retry.max_elapsed
                        )));
                    }
                    tracing::warn!(
                        sink = "http",
                        attempt,
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        records = group.len(),
                        "delivery to Akto ingestion failed ({reason}); retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// What to do about the certificate error `reason` (as [`error_chain`] words it): the CA's
    /// bundle only for an unknown issuer, the certificate's own fix otherwise.
    fn certificate_hint(&self, reason: &str) -> String {
        match certificate_problem(reason) {
            CertProblem::UnknownIssuer => match &self.ca_bundle {
                None => "the service's TLS certificate is not trusted (not signed by a CA \
                         trusted here): when it is signed by a private CA or a TLS-inspecting \
                         proxy re-signs it, set AKTO_CA_BUNDLE to the PEM file of that CA (TLS is \
                         always verified)"
                    .to_string(),
                Some((path, "AKTO_CA_BUNDLE")) => format!(
                    "the service's TLS certificate is not trusted (not signed by a CA trusted \
                     here), also not with the CA certificates of AKTO_CA_BUNDLE {}: set \
                     AKTO_CA_BUNDLE to the PEM file of the CA that signed it (TLS is always \
                     verified)",
                    path.display()
                ),
                Some((path, setting)) => format!(
                    "the service's TLS certificate is not trusted (not signed by a CA trusted \
                     here), also not with the CA certificates of {setting} {}, which the \
                     ingestion sink trusts because AKTO_CA_BUNDLE is unset: set AKTO_CA_BUNDLE \
                     to the PEM file of the CA that signed the ingestion service's certificate \
                     (TLS is always verified)",
                    path.display()
                ),
            },
            CertProblem::Expired => "the service's TLS certificate has expired (or this host's \
                                     clock is wrong): renew the ingestion service's certificate, \
                                     or set the clock right (NTP); no CA bundle changes that"
                .to_string(),
            CertProblem::NotValidYet => "the service's TLS certificate is not valid yet: set this \
                                         host's clock right (NTP), or check the certificate's \
                                         start date"
                .to_string(),
            CertProblem::WrongName => "the service's TLS certificate is not issued for the host \
                                       name in DATA_INGESTION_SERVICE_URL: use a name the \
                                       certificate lists, or have the ingestion service's \
                                       certificate issued for this name; no CA bundle changes \
                                       that"
                .to_string(),
            CertProblem::ClientCertificateWanted => "the service, or a proxy in front of it, asks \
                                                     for a client certificate (mutual TLS), which \
                                                     this connector does not send: let it connect \
                                                     without one"
                .to_string(),
            CertProblem::Revoked => "the service's TLS certificate has been revoked: the \
                                     ingestion service needs a new certificate"
                .to_string(),
            CertProblem::Other => "the service's TLS certificate was refused for the reason \
                                   above: fix the ingestion service's certificate (TLS is always \
                                   verified)"
                .to_string(),
        }
    }

    /// `POST /api/ingestData` of `body` with the token, and the token that went with it.
    fn ingest_request(&self, body: bytes::Bytes) -> (reqwest::RequestBuilder, Option<HeaderValue>) {
        let mut req = self
            .client
            .post(self.ingest_url.clone())
            .timeout(self.request_timeout(body.len()))
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        let auth = self.auth_header();
        if let Some(auth) = &auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        (req, auth)
    }

    async fn send_once(&self, body: bytes::Bytes) -> Result<Reply, SinkError> {
        let (req, sent) = self.ingest_request(body);
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => {
                let reason = error_chain(&e);
                if is_certificate_error(&reason) {
                    // No retry makes an untrusted certificate trusted.
                    return Err(SinkError::retriable(format!(
                        "No data appearing: delivery to the Akto ingestion service at {} failed \
                         ({reason}); {}; the records stay pending and are retried next cycle",
                        self.shown_url,
                        self.certificate_hint(&reason)
                    )));
                }
                return Ok(Reply::Transient {
                    reason,
                    retry_after: None,
                    // A connect error (refused, DNS, TLS handshake, connect timeout) sent
                    // nothing; anything later (a timeout, a connection lost while sending or
                    // waiting) may have left the whole request with the service.
                    maybe_stored: !e.is_connect(),
                });
            }
        };
        let status = resp.status();
        if status == StatusCode::OK {
            return Ok(Reply::Accepted);
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = match resp.text().await {
            Ok(text) => Self::answer_snippet(&text, sent.as_ref()),
            Err(e) => format!("body unreadable: {}", error_chain(&e)),
        };
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            // A rotated token: the file may hold the new one already; if so, send again. (A 403
            // is a token error only then: Akto answers a bad token with 401.)
            if let Some(f) = &self.jwt_file {
                let (token, _) = f.read();
                if self.use_token(f, &token) {
                    return Ok(Reply::Transient {
                        reason: format!(
                            "HTTP {status} with the previous token; AKTO_JWT_TOKEN_FILE holds a \
                             new one"
                        ),
                        retry_after: Some(Duration::ZERO),
                        maybe_stored: false,
                    });
                }
            }
        }
        if let Some(err) = self.config_error(status, &body, &self.shown_url) {
            return Err(err);
        }
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            // A 502/504 comes from a gateway in front of Akto (a load balancer, an ingress) that
            // gave up on it: a slow Akto may have stored the request all the same.
            let gateway =
                status == StatusCode::BAD_GATEWAY || status == StatusCode::GATEWAY_TIMEOUT;
            let reason = if gateway {
                format!(
                    "HTTP {status} from a gateway in front of the service, which may have passed \
                     the request on (a gateway timeout: the service may have stored it): {body}"
                )
            } else {
                format!("HTTP {status}: {body}")
            };
            return Ok(Reply::Transient {
                reason,
                retry_after,
                maybe_stored: gateway,
            });
        }
        if status == StatusCode::UNPROCESSABLE_ENTITY
            || status == StatusCode::BAD_REQUEST
            || status == StatusCode::FORBIDDEN
            || status == StatusCode::PAYLOAD_TOO_LARGE
        {
            return Ok(Reply::Refused { status, body });
        }
        if status.is_client_error() {
            return Err(self.path_error(status, &body, "to a request"));
        }
        Err(SinkError::protocol(format!(
            "the Akto ingestion service at {} answered HTTP {status} ({body}); only 200 means \
             delivered. Check that DATA_INGESTION_SERVICE_URL points at the Data Ingestion \
             Service itself (not a proxy or login page)",
            self.shown_url
        )))
    }

    /// Answers that no retry and no bisection can fix: bad token (401; a 403 is a WAF's or
    /// ingress' refusal as often, see [`Self::deliver`]), wrong URL, redirects.
    fn config_error(&self, status: StatusCode, body: &str, shown_url: &str) -> Option<SinkError> {
        if status == StatusCode::UNAUTHORIZED {
            let has_token = self.auth.lock().map(|a| a.is_some()).unwrap_or(false);
            let message = if let (true, Some(f)) = (has_token, &self.jwt_file) {
                format!(
                    "the ingestion service rejected the token of AKTO_JWT_TOKEN_FILE {} ({}): \
                     {body}; write a valid token for the Akto account into that file (the raw \
                     JWT, no `Bearer ` prefix); it is read again within 30 s",
                    f.path().display(),
                    status.as_u16()
                )
            } else if has_token {
                format!(
                    "the ingestion service rejected AKTO_JWT_TOKEN ({}): {body}; set \
                     AKTO_JWT_TOKEN to a valid token for the Akto account (the raw JWT, no \
                     `Bearer ` prefix)",
                    status.as_u16()
                )
            } else {
                format!(
                    "the ingestion service requires AKTO_JWT_TOKEN ({}) but none is set: {body}; \
                     set AKTO_JWT_TOKEN to a valid token for the Akto account",
                    status.as_u16()
                )
            };
            return Some(SinkError::Auth {
                message,
                delivered_before_failure: Vec::new(),
            });
        }
        if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED {
            return Some(SinkError::protocol(format!(
                "No data appearing: {shown_url} answered HTTP {status}; check \
                 DATA_INGESTION_SERVICE_URL (the base URL of Akto's Data Ingestion Service, \
                 without /api/ingestData)"
            )));
        }
        if status.is_redirection() {
            return Some(SinkError::protocol(format!(
                "{shown_url} answered with a redirect (HTTP {status}); set \
                 DATA_INGESTION_SERVICE_URL to the final URL of the Data Ingestion Service"
            )));
        }
        None
    }
}

/// The HTTP client of the sink: rustls (webpki roots, plus `extra_roots`), no redirects.
fn build_client(
    timeout: Duration,
    extra_roots: Vec<reqwest::Certificate>,
) -> Result<reqwest::Client, SinkError> {
    let mut builder = reqwest::Client::builder().use_rustls_tls();
    for cert in extra_roots {
        builder = builder.add_root_certificate(cert);
    }
    builder
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("databricks-shield/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| SinkError::Config {
            field: "DATA_INGESTION_SERVICE_URL",
            message: format!("could not build the HTTP client: {}", error_chain(&e)),
        })
}

/// What is wrong with a certificate, as far as the TLS error (rustls' words) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CertProblem {
    /// Signed by a CA not trusted here (or by another CA of the same name: a bad signature).
    UnknownIssuer,
    Expired,
    NotValidYet,
    /// Issued for other host names.
    WrongName,
    /// The server asked for a client certificate (a TLS alert).
    ClientCertificateWanted,
    Revoked,
    Other,
}

/// Sorts a certificate error by rustls' words (`invalid peer certificate: UnknownIssuer`,
/// `certificate expired: ...`, `certificate not valid for name ...`, `received fatal alert:
/// CertificateRequired`, ...).
fn certificate_problem(reason: &str) -> CertProblem {
    let lower = reason.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    if has(&[
        "unknownissuer",
        "unknown issuer",
        "badsignature",
        "bad signature",
    ]) {
        CertProblem::UnknownIssuer
    } else if has(&["notvalidforname", "not valid for name"]) {
        CertProblem::WrongName
    } else if has(&["notvalidyet", "not valid yet"]) {
        CertProblem::NotValidYet
    } else if has(&["expired"]) {
        CertProblem::Expired
    } else if has(&["certificaterequired", "certificate required"]) {
        CertProblem::ClientCertificateWanted
    } else if has(&["revoked"]) {
        CertProblem::Revoked
    } else {
        CertProblem::Other
    }
}

/// Whether an error (as [`error_chain`] words it) says the server's certificate is not trusted.
fn is_certificate_error(reason: &str) -> bool {
    let lower = reason.to_ascii_lowercase();
    lower.contains("certificate") || lower.contains("unknownissuer")
}

/// `e` with `note` appended to its message (errors that carry one).
fn with_note(e: SinkError, note: &str) -> SinkError {
    match e {
        SinkError::Retriable {
            message,
            delivered_before_failure,
            rejected_before_failure,
        } => SinkError::Retriable {
            message: format!("{message}{note}"),
            delivered_before_failure,
            rejected_before_failure,
        },
        SinkError::Auth {
            message,
            delivered_before_failure,
        } => SinkError::Auth {
            message: format!("{message}{note}"),
            delivered_before_failure,
        },
        SinkError::Protocol {
            message,
            delivered_before_failure,
            rejected_before_failure,
        } => SinkError::Protocol {
            message: format!("{message}{note}"),
            delivered_before_failure,
            rejected_before_failure,
        },
        other => other,
    }
}

/// `bytes` as `AKTO_MAX_RECORD_BYTES`, or the configuration error naming it and the fix.
pub(crate) fn checked_max_record_bytes(bytes: usize) -> Result<usize, SinkError> {
    if (super::MIN_AKTO_MAX_RECORD_BYTES..=super::MAX_AKTO_MAX_RECORD_BYTES).contains(&bytes) {
        return Ok(bytes);
    }
    Err(SinkError::Config {
        field: "AKTO_MAX_RECORD_BYTES",
        message: format!(
            "{bytes} is out of range: set it between {} and {} bytes (default {}; 1000000 for \
             Akto releases whose ingestion producer keeps Kafka's 1 MB default)",
            super::MIN_AKTO_MAX_RECORD_BYTES,
            super::MAX_AKTO_MAX_RECORD_BYTES,
            super::DEFAULT_AKTO_MAX_RECORD_BYTES
        ),
    })
}

/// The reason recorded for a record refused alone.
fn refusal(status: StatusCode, body: &str) -> String {
    format!("the Akto ingestion service refused the record with HTTP {status}: {body}")
}

/// `{"batchData":[r1,r2,...]}` from the pre-encoded records, no re-parse.
fn build_body(batch: &[OutRecord], group: &[usize]) -> Vec<u8> {
    let len = BODY_WRAPPER_BYTES
        + group.iter().map(|&i| batch[i].json.len()).sum::<usize>()
        + group.len().saturating_sub(1);
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(BODY_PREFIX.as_bytes());
    for (n, &i) in group.iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(batch[i].json.as_bytes());
    }
    body.extend_from_slice(BODY_SUFFIX.as_bytes());
    body
}

/// `base` with `tail` appended to its path (one slash between), no query or fragment.
fn with_path(base: &Url, tail: &str) -> Url {
    let mut url = base.clone();
    let path = format!("{}/{tail}", base.path().trim_end_matches('/'));
    url.set_path(&path);
    url.set_query(None);
    url.set_fragment(None);
    url
}

/// The URL as shown in messages: no user info, no query, no fragment.
fn shown(url: &Url) -> String {
    let mut url = url.clone();
    // These fail only for URLs that cannot have credentials; ignoring is correct then.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

fn unreachable_message(shown_url: &str, e: &reqwest::Error) -> String {
    format!(
        "No data appearing: could not reach the Akto ingestion service at {shown_url} ({}); \
         check DATA_INGESTION_SERVICE_URL and that the service is up and reachable from this host",
        error_chain(e)
    )
}

/// The error and its sources, without the request URL (which could carry credentials).
fn error_chain(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    if e.is_timeout() {
        parts.push("timed out".to_string());
    }
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let first = if e.is_connect() {
        "connection failed"
    } else if e.is_request() {
        "request failed"
    } else if e.is_body() || e.is_decode() {
        "response body failed"
    } else {
        "HTTP error"
    };
    parts.insert(0, first.to_string());
    while let Some(s) = src {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// At most [`SNIPPET_CHARS`] characters of a server body, on one line.
fn snippet(body: &str) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(SNIPPET_CHARS)
        .collect();
    let trimmed = one_line.trim();
    if trimmed.is_empty() {
        "empty body".to_string()
    } else if body.chars().count() > SNIPPET_CHARS {
        format!("{trimmed}...")
    } else {
        trimmed.to_string()
    }
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = when.signed_duration_since(chrono::Utc::now());
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_handle_trailing_slash_and_prefix() {
        let u = Url::parse("https://akto.example:8443/").unwrap();
        assert_eq!(
            with_path(&u, "api/ingestData").as_str(),
            "https://akto.example:8443/api/ingestData"
        );
        let u = Url::parse("http://h/base/?x=1").unwrap();
        assert_eq!(
            with_path(&u, "api/ingestData").as_str(),
            "http://h/base/api/ingestData"
        );
        let u = Url::parse("http://h/base").unwrap();
        assert_eq!(
            with_path(&u, "healthCheck").as_str(),
            "http://h/base/healthCheck"
        );
    }

    #[test]
    fn shown_url_hides_credentials() {
        let u = Url::parse("https://user:pw@h/x?token=abc").unwrap();
        let s = shown(&u);
        assert!(
            !s.contains("pw") && !s.contains("user") && !s.contains("abc"),
            "{s}"
        );
    }

    #[test]
    fn body_is_concatenation() {
        let batch = vec![
            OutRecord {
                key: "a".into(),
                json: r#"{"a":"1"}"#.into(),
            },
            OutRecord {
                key: "b".into(),
                json: r#"{"b":"2"}"#.into(),
            },
        ];
        let body = build_body(&batch, &[0, 1]);
        assert_eq!(body, br#"{"batchData":[{"a":"1"},{"b":"2"}]}"#.to_vec());
        assert_eq!(body.len(), super::super::body_len(&batch));
        assert_eq!(
            build_body(&batch, &[1]),
            br#"{"batchData":[{"b":"2"}]}"#.to_vec()
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn snippet_is_bounded_single_line() {
        let s = snippet(&format!("a\nb{}", "x".repeat(1000)));
        assert!(!s.contains('\n'));
        assert!(s.chars().count() <= SNIPPET_CHARS + 3);
        assert_eq!(snippet("  "), "empty body");
    }

    #[test]
    fn request_timeout_grows_with_the_body() {
        let sink = |timeout: Duration| {
            HttpSink::new(HttpSinkConfig {
                timeout,
                ..HttpSinkConfig::new(Url::parse("http://h/").unwrap(), None)
            })
            .unwrap()
        };
        let s = sink(Duration::from_secs(30));
        assert_eq!(s.request_timeout(0), Duration::from_secs(30));
        assert_eq!(s.request_timeout(256 * 1024), Duration::from_secs(31));
        // A full 10 MiB body: 40 s more to upload at the 256 KiB/s floor.
        assert_eq!(s.request_timeout(MAX_BODY_BYTES), Duration::from_secs(70));
        assert_eq!(
            s.request_timeout(usize::MAX),
            Duration::from_secs(30) + Duration::from_millis(u64::MAX / 262_144)
        );
        // Zero means the default.
        assert_eq!(
            sink(Duration::ZERO).request_timeout(0),
            DEFAULT_REQUEST_TIMEOUT
        );
    }

    #[test]
    fn certificate_errors_are_sorted_by_rustls_words() {
        use CertProblem::*;
        for (reason, want) in [
            ("invalid peer certificate: UnknownIssuer", UnknownIssuer),
            ("invalid peer certificate: BadSignature", UnknownIssuer),
            (
                "invalid peer certificate: certificate expired: verification time 1 (UNIX), but \
                 certificate is not valid after 0 (1 seconds ago)",
                Expired,
            ),
            ("invalid peer certificate: Expired", Expired),
            (
                "invalid peer certificate: certificate not valid yet: verification time 0",
                NotValidYet,
            ),
            (
                "invalid peer certificate: certificate not valid for name \"a\"; certificate is \
                 only valid for b",
                WrongName,
            ),
            ("invalid peer certificate: NotValidForName", WrongName),
            (
                "received fatal alert: CertificateRequired",
                ClientCertificateWanted,
            ),
            ("invalid peer certificate: Revoked", Revoked),
            (
                "invalid peer certificate: UnhandledCriticalExtension",
                Other,
            ),
        ] {
            assert_eq!(certificate_problem(reason), want, "{reason}");
            assert!(is_certificate_error(reason), "{reason}");
        }
        let s =
            HttpSink::new(HttpSinkConfig::new(Url::parse("https://h/").unwrap(), None)).unwrap();
        // Only an unknown issuer is told to give a CA bundle.
        assert!(s
            .certificate_hint("invalid peer certificate: UnknownIssuer")
            .contains("set AKTO_CA_BUNDLE"));
        for reason in [
            "invalid peer certificate: Expired",
            "invalid peer certificate: NotValidForName",
            "received fatal alert: CertificateRequired",
            "invalid peer certificate: Revoked",
            "invalid peer certificate: UnhandledCriticalExtension",
        ] {
            let hint = s.certificate_hint(reason);
            assert!(!hint.contains("AKTO_CA_BUNDLE"), "{reason}: {hint}");
            assert!(!hint.contains("  "), "{hint}");
        }
        assert!(s
            .certificate_hint("invalid peer certificate: Expired")
            .contains("renew the ingestion service's certificate"));
        assert!(s
            .certificate_hint("received fatal alert: CertificateRequired")
            .contains("client certificate"));
    }

    #[test]
    fn config_rejects_bad_url_and_token_without_leaking() {
        let cfg = |url: &str, jwt: Option<&str>| HttpSinkConfig {
            url: Url::parse(url).unwrap(),
            jwt: jwt.map(|j| SecretString::from(j.to_string())),
            timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
        };
        let e = HttpSink::new(cfg("ftp://h/", None)).unwrap_err();
        assert!(e.to_string().contains("DATA_INGESTION_SERVICE_URL"), "{e}");
        let e = HttpSink::new(cfg("http://h/", Some("sec\nret"))).unwrap_err();
        assert!(e.to_string().contains("AKTO_JWT_TOKEN"), "{e}");
        assert!(!e.to_string().contains("sec"), "{e}");
        let c = cfg("http://u:pw@h/", Some("supersecret"));
        let c_dbg = format!("{c:?}");
        assert!(
            !c_dbg.contains("supersecret") && !c_dbg.contains("pw"),
            "{c_dbg}"
        );
        let s = HttpSink::new(c).unwrap();
        let dbg = format!("{s:?} {}", s.describe());
        assert!(!dbg.contains("supersecret") && !dbg.contains("pw"), "{dbg}");
        assert_eq!(s.describe(), "Akto ingestion at http://h/api/ingestData");
    }
}
