//! MLflow: experiments, runs and traces — where agents record what they did, span by span.
//!
//! Traces are searched with `POST /api/3.0/mlflow/traces/search` (filter on
//! `trace.timestamp_ms`, ascending order, paged). Their spans are not in the REST answer: they
//! are downloaded from cloud storage through the signed URI that
//! `credentials-for-data-download` returns. That URI is a credential of its own and the storage
//! refuses a second auth mechanism, so it is fetched WITHOUT the Databricks `Authorization`
//! header, and it never appears in logs, errors or `Debug` output. The request goes through the
//! workspace client's own HTTP client (which adds the token per API request, never by default),
//! so storage is reached with the same trusted roots (`DATABRICKS_CA_BUNDLE`) and proxies.
//!
//! Errors of a span download say what they mean to the trace reader: `NotFound` (not uploaded
//! yet: the trace is read again later), `PermissionDenied` (names the grant or network rule to
//! fix), retriable ones (429, 5xx, transport), anything else.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::classify_transport_error;
use super::{DatabricksClient, DatabricksError};

/// A key/value tag of an experiment or run.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct KeyValue {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
}

/// An MLflow experiment.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Experiment {
    pub experiment_id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub lifecycle_stage: Option<String>,
    #[serde(default)]
    pub tags: Vec<KeyValue>,
}

/// `TraceInfoV3` as the search returns it (optional fields tolerated).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TraceInfo {
    pub trace_id: String,
    #[serde(default)]
    pub client_request_id: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub request_time: Option<String>,
    /// e.g. `"1.250s"`.
    #[serde(default)]
    pub execution_duration: Option<String>,
    /// `OK`, `ERROR` or `IN_PROGRESS`.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub request_preview: Option<String>,
    #[serde(default)]
    pub response_preview: Option<String>,
    #[serde(default)]
    pub trace_metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

impl TraceInfo {
    /// The trace's start, µs since the epoch.
    pub fn time_us(&self) -> Option<i64> {
        let t = self.request_time.as_deref()?;
        chrono::DateTime::parse_from_rfc3339(t.trim())
            .ok()
            .map(|d| d.timestamp_micros())
    }

    /// `execution_duration` in ms (`"1.2s"`, `"1200ms"`).
    pub fn duration_ms(&self) -> Option<i64> {
        let d = self.execution_duration.as_deref()?.trim();
        if let Some(ms) = d.strip_suffix("ms") {
            return ms.trim().parse::<f64>().ok().map(|v| v.round() as i64);
        }
        d.strip_suffix('s')?
            .trim()
            .parse::<f64>()
            .ok()
            .map(|v| (v * 1000.0).round() as i64)
    }
}

/// One page of a trace search.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TracePage {
    #[serde(default)]
    pub traces: Vec<TraceInfo>,
    #[serde(default)]
    pub next_page_token: Option<String>,
}

/// Where a trace's data can be downloaded. The URI is a bearer credential: never shown.
pub struct TraceDownload {
    signed_uri: SecretString,
    headers: Vec<(String, String)>,
}

impl std::fmt::Debug for TraceDownload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceDownload")
            .field("signed_uri", &"[hidden]")
            .field("headers", &self.headers.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct ExperimentsPage {
    #[serde(default)]
    experiments: Vec<Experiment>,
    #[serde(default)]
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
struct RunEnvelope {
    run: RunBody,
}
#[derive(Deserialize)]
struct RunBody {
    info: RunInfo,
}
#[derive(Deserialize)]
struct RunInfo {
    experiment_id: String,
}

#[derive(Deserialize)]
struct CredentialEnvelope {
    credential_info: CredentialInfo,
}
#[derive(Deserialize)]
struct CredentialInfo {
    signed_uri: String,
    #[serde(default)]
    headers: Vec<HttpHeader>,
}
#[derive(Deserialize)]
struct HttpHeader {
    #[serde(default)]
    name: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
struct SpansDoc {
    #[serde(default)]
    spans: Vec<Value>,
}

const MAX_PAGES: usize = 10_000;
const DOWNLOAD_ROUTE: &str = "GET <signed trace data URI>";

/// How long one span document download may take (they can be large).
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// The largest span document read (64 MiB): a larger one is not read (nor held in memory),
/// and the trace is sent as its summary. Its records would be cut to Akto's 10 MiB per record
/// anyway.
pub const MAX_SPAN_DOCUMENT_BYTES: u64 = 64 << 20;

/// How much of a refusal's body is read for its error code.
const ERROR_BODY_BYTES: u64 = 4096;

/// A trace's downloaded span document.
#[derive(Debug)]
pub enum SpanDownload {
    /// Its spans, and the length of the document (bytes).
    Spans { spans: Vec<Value>, bytes: u64 },
    /// Larger than the cap: not read. `bytes` is its `Content-Length`, or (`exact: false`) what
    /// was read before the cap was passed.
    TooLarge { bytes: u64, exact: bool },
}

/// Reads a response body up to `cap` bytes: `Ok(None)` when it is longer.
async fn read_capped(
    resp: &mut reqwest::Response,
    cap: u64,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::with_capacity(resp.content_length().unwrap_or(0).min(cap) as usize);
    while let Some(chunk) = resp.chunk().await? {
        if body.len() as u64 + chunk.len() as u64 > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

fn mlflow_denied(e: DatabricksError, what: &str) -> DatabricksError {
    match e {
        DatabricksError::PermissionDenied { detail, .. } => DatabricksError::PermissionDenied {
            object: what.to_string(),
            detail,
            fix: "give the service principal CAN READ on the agents' MLflow experiments".into(),
        },
        other => other,
    }
}

impl DatabricksClient {
    /// Every active experiment (all pages).
    pub async fn search_experiments(&self) -> Result<Vec<Experiment>, DatabricksError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut body = json!({"max_results": 1000});
            if let Some(t) = &token {
                body["page_token"] = json!(t);
            }
            let page: ExperimentsPage = self
                .api
                .request(
                    Method::POST,
                    "POST /api/2.0/mlflow/experiments/search",
                    "/api/2.0/mlflow/experiments/search",
                    &[],
                    Some(&body),
                )
                .await
                .map_err(|e| mlflow_denied(e, "MLflow experiments"))?;
            out.extend(
                page.experiments
                    .into_iter()
                    .filter(|e| e.lifecycle_stage.as_deref() != Some("deleted")),
            );
            match super::next_page(
                "POST /api/2.0/mlflow/experiments/search",
                token.as_deref(),
                page.next_page_token,
            ) {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
        Err(DatabricksError::Decode {
            route: "POST /api/2.0/mlflow/experiments/search".into(),
            detail: format!("more than {MAX_PAGES} pages: the listing never ends"),
        })
    }

    /// The experiment of a run (`GET /api/2.0/mlflow/runs/get`).
    pub async fn run_experiment(&self, run_id: &str) -> Result<String, DatabricksError> {
        let r: RunEnvelope = self
            .api
            .request(
                Method::GET,
                "GET /api/2.0/mlflow/runs/get",
                "/api/2.0/mlflow/runs/get",
                &[("run_id", run_id.to_string())],
                None,
            )
            .await
            .map_err(|e| mlflow_denied(e, &format!("MLflow run {run_id}")))?;
        Ok(r.run.info.experiment_id)
    }

    /// One page of the traces of `experiment_id` matching `filter`, oldest first.
    pub async fn search_traces(
        &self,
        experiment_id: &str,
        filter: &str,
        max_results: usize,
        page_token: Option<&str>,
    ) -> Result<TracePage, DatabricksError> {
        let mut body = json!({
            "locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}],
            "filter": filter,
            "max_results": max_results,
            "order_by": ["timestamp_ms ASC"],
        });
        if let Some(t) = page_token {
            body["page_token"] = json!(t);
        }
        self.api
            .request(
                Method::POST,
                "POST /api/3.0/mlflow/traces/search",
                "/api/3.0/mlflow/traces/search",
                &[],
                Some(&body),
            )
            .await
            .map_err(|e| mlflow_denied(e, &format!("traces of MLflow experiment {experiment_id}")))
    }

    /// Where the spans of a trace can be downloaded.
    pub async fn trace_download(&self, trace_id: &str) -> Result<TraceDownload, DatabricksError> {
        let c: CredentialEnvelope = self
            .api
            .request(
                Method::GET,
                "GET /api/2.0/mlflow/traces/{id}/credentials-for-data-download",
                &format!(
                    "/api/2.0/mlflow/traces/{}/credentials-for-data-download",
                    path_segment(trace_id)
                ),
                &[],
                None,
            )
            .await
            .map_err(
                |e| match mlflow_denied(e, &format!("the span data of trace {trace_id}")) {
                    DatabricksError::NotFound {
                        error_code,
                        message,
                        ..
                    } => DatabricksError::NotFound {
                        object: format!("the span data of trace {trace_id}"),
                        error_code,
                        message,
                        fix: "none needed if the trace just ended: its spans are uploaded when it \
                          ends and it is read again next cycle"
                            .into(),
                    },
                    other => other,
                },
            )?;
        Ok(TraceDownload {
            signed_uri: SecretString::from(c.credential_info.signed_uri),
            headers: c
                .credential_info
                .headers
                .into_iter()
                .filter(|h| !h.name.is_empty() && !h.name.eq_ignore_ascii_case("authorization"))
                .map(|h| (h.name, h.value))
                .collect(),
        })
    }

    /// Downloads the spans of a trace from its signed URI (no Databricks auth header), with the
    /// same retry rules as the API (transient failures, 429, 5xx) within a bounded time.
    ///
    /// Storage answering 404 is [`DatabricksError::NotFound`] (the spans are not uploaded yet, or
    /// are gone), 403 is [`DatabricksError::PermissionDenied`] naming what to fix; any other
    /// refusal is [`DatabricksError::Api`].
    pub async fn download_spans(
        &self,
        trace_id: &str,
        dl: &TraceDownload,
    ) -> Result<SpanDownload, DatabricksError> {
        self.download_spans_capped(trace_id, dl, MAX_SPAN_DOCUMENT_BYTES)
            .await
    }

    /// [`Self::download_spans`] with the largest document read set to `cap` bytes: a longer
    /// one (by its `Content-Length`, else while it is read) is [`SpanDownload::TooLarge`].
    pub async fn download_spans_capped(
        &self,
        trace_id: &str,
        dl: &TraceDownload,
        cap: u64,
    ) -> Result<SpanDownload, DatabricksError> {
        // The workspace client's own reqwest client, so the same trusted roots
        // (DATABRICKS_CA_BUNDLE: a TLS-inspecting proxy sees storage too) and proxies. It holds
        // no credentials: the Databricks token is added per API request, and none is added here.
        let http = &self.api.http;
        let started = Instant::now();
        let budget = self.api.retry.max_elapsed.min(Duration::from_secs(120));
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut req = http
                .get(dl.signed_uri.expose_secret())
                .timeout(DOWNLOAD_TIMEOUT);
            for (k, v) in &dl.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let transient = match req.send().await {
                Ok(mut resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        if let Some(n) = resp.content_length().filter(|n| *n > cap) {
                            return Ok(SpanDownload::TooLarge {
                                bytes: n,
                                exact: true,
                            });
                        }
                    }
                    let limit = if status.is_success() {
                        cap
                    } else {
                        ERROR_BODY_BYTES
                    };
                    match read_capped(&mut resp, limit).await {
                        Ok(None) if status.is_success() => {
                            return Ok(SpanDownload::TooLarge {
                                bytes: cap,
                                exact: false,
                            })
                        }
                        Ok(Some(body)) if status.is_success() => {
                            let doc: SpansDoc = serde_json::from_slice(&body).map_err(|e| {
                                DatabricksError::Decode {
                                    route: DOWNLOAD_ROUTE.into(),
                                    detail: format!(
                                        "the data of trace {trace_id} is not a span document: {e}"
                                    ),
                                }
                            })?;
                            return Ok(SpanDownload::Spans {
                                spans: doc.spans,
                                bytes: body.len() as u64,
                            });
                        }
                        Ok(body) => {
                            // A refusal: its first bytes name the code (a body over 4 KiB is not
                            // kept: the status alone decides then).
                            let body = body.unwrap_or_default();
                            let code = status.as_u16();
                            if !(code == 429 || code >= 500) {
                                let text: String =
                                    String::from_utf8_lossy(&body).chars().take(300).collect();
                                return Err(storage_refusal(trace_id, code, storage_code(&text)));
                            }
                            format!("HTTP {code}")
                        }
                        Err(e) => classify_transport_error(&e).1,
                    }
                }
                // Not sent at all: a workspace reached over https follows only https signed
                // URIs (a presigned URL in clear text would show its signature to the network).
                Err(e) if e.is_builder() => {
                    return Err(DatabricksError::Connect {
                        host: "trace storage".into(),
                        kind: super::ConnectKind::Tls,
                        detail: format!(
                            "the signed URI of trace {trace_id} was not requested ({}); a \
                             workspace reached over https is only followed to https storage",
                            strip_query(&e.to_string())
                        ),
                    });
                }
                Err(e) => {
                    let (kind, detail) = classify_transport_error(&e);
                    if matches!(kind, super::ConnectKind::Dns | super::ConnectKind::Tls) {
                        return Err(DatabricksError::Connect {
                            host: "trace storage".into(),
                            kind,
                            detail: strip_query(&detail),
                        });
                    }
                    strip_query(&detail)
                }
            };
            let delay = Duration::from_millis(
                (self.api.retry.base_delay.as_millis() as u64)
                    .saturating_mul(1 << attempt.min(6))
                    .min(self.api.retry.max_delay.as_millis() as u64)
                    .max(1),
            );
            if started.elapsed() + delay > budget {
                return Err(DatabricksError::Exhausted {
                    route: DOWNLOAD_ROUTE.into(),
                    status: 0,
                    error_code: String::new(),
                    message: format!("downloading trace {trace_id}: {transient}"),
                    attempts: attempt,
                    elapsed_s: started.elapsed().as_secs(),
                });
            }
            tokio::time::sleep(delay).await;
        }
    }
}

/// What cloud storage refusing a trace's span data (HTTP 4xx but 429) means, and its fix.
fn storage_refusal(trace_id: &str, status: u16, code: String) -> DatabricksError {
    let object = format!("the span data of trace {trace_id} in cloud storage");
    match status {
        404 => DatabricksError::NotFound {
            object,
            error_code: code,
            message: "no such object at the signed URL".into(),
            fix: "none needed if the trace just ended: its spans are uploaded when it ends and \
                  it is read again next cycle"
                .into(),
        },
        403 => DatabricksError::PermissionDenied {
            object,
            detail: format!("HTTP 403 {code}"),
            fix: "let this machine reach the workspace's MLflow artifact storage (the bucket or \
                  storage account firewall, VPC/private endpoint rules must allow it), check its \
                  clock (an expired signature is also refused with 403), and give the service \
                  principal CAN READ on the experiment"
                .into(),
        },
        _ => DatabricksError::Api {
            route: DOWNLOAD_ROUTE.into(),
            status,
            error_code: code,
            message: format!("cloud storage refused the data of trace {trace_id}"),
        },
    }
}

/// Percent-encodes one URL path segment (RFC 3986 unreserved characters kept).
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The S3/Azure/GCS error code of an XML error body (`<Code>...</Code>`), if any.
fn storage_code(body: &str) -> String {
    body.split_once("<Code>")
        .and_then(|(_, r)| r.split_once("</Code>"))
        .map(|(c, _)| c.chars().take(64).collect())
        .unwrap_or_default()
}

/// Transport errors may quote the URL: keep everything before any `?` query (the signature).
fn strip_query(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len());
    let mut skipping = false;
    for c in detail.chars() {
        if c == '?' {
            skipping = true;
            out.push_str("?[signature hidden]");
            continue;
        }
        if skipping && (c.is_whitespace() || c == ')' || c == '"') {
            skipping = false;
        }
        if !skipping {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_parse() {
        let t = TraceInfo {
            request_time: Some("2026-11-29T08:00:00.250Z".into()),
            execution_duration: Some("1.250s".into()),
            ..Default::default()
        };
        assert_eq!(t.duration_ms(), Some(1250));
        assert_eq!(t.time_us(), Some(1_795_939_200_250_000));
        let t = TraceInfo {
            execution_duration: Some("15ms".into()),
            ..Default::default()
        };
        assert_eq!(t.duration_ms(), Some(15));
    }

    #[test]
    fn signed_uris_never_show() {
        let d = TraceDownload {
            signed_uri: SecretString::from("https://s3/x?X-Amz-Signature=abc".to_string()),
            headers: vec![],
        };
        assert!(!format!("{d:?}").contains("abc"));
        let s = strip_query("error sending request for url (https://s3/x?X-Amz-Signature=abc)");
        assert!(!s.contains("abc") && s.contains("https://s3/x"), "{s}");
        assert_eq!(
            storage_code("<Error><Code>AccessDenied</Code></Error>"),
            "AccessDenied"
        );
    }
}
