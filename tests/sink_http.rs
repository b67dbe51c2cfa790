//! The HTTP sink against real loopback servers: a scriptable axum server for failure modes
//! (retries, bisection, auth, timeouts, size limits), the strict Akto stand-in, a raw server
//! that goes on storing a request after the client gave up on it (possible duplicates must be
//! announced), and a TLS front signed by a private CA (`AKTO_CA_BUNDLE`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use databricks_shield::sink::{
    plan_batches, AnySink, HttpSink, HttpSinkConfig, OutRecord, RetryPolicy, SinkError,
    MAX_BODY_BYTES, MAX_RECORDS_PER_BATCH,
};
use secrecy::SecretString;
use url::Url;

#[path = "common/echo.rs"]
mod echo;

/// One scripted answer of the test server.
#[derive(Clone)]
struct Answer {
    status: u16,
    retry_after: Option<&'static str>,
    delay: Duration,
}

impl Answer {
    fn status(status: u16) -> Answer {
        Answer {
            status,
            retry_after: None,
            delay: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Raw bodies of every POST received, in order.
    bodies: Vec<String>,
    /// `authorization` header of every POST (None when absent).
    auths: Vec<Option<String>>,
    content_types: Vec<Option<String>>,
    /// Bodies answered with 200.
    accepted: Vec<String>,
    /// Answers to use first, in order.
    script: VecDeque<Answer>,
    /// Once the script is empty: a body containing this is answered 422.
    poison: Option<String>,
    /// Once the script is empty and after this many 200s, answer this status forever.
    fail_after_accepted: Option<(usize, u16)>,
    health_status: u16,
}

#[derive(Clone)]
struct Server {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
}

impl Server {
    async fn start() -> Server {
        let inner = Arc::new(Mutex::new(Inner {
            health_status: 200,
            ..Inner::default()
        }));
        let app = Router::new()
            .route("/prefix/api/ingestData", post(ingest))
            .route("/prefix/healthCheck", get(health))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES + 1024))
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Server { inner, addr }
    }

    fn url(&self) -> Url {
        Url::parse(&format!("http://{}/prefix/", self.addr)).unwrap()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().unwrap())
    }
}

async fn ingest(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    let answer = {
        let mut g = inner.lock().unwrap();
        g.bodies.push(text.clone());
        g.auths.push(
            headers
                .get("authorization")
                .map(|v| v.to_str().unwrap_or("<non-ascii>").to_string()),
        );
        g.content_types.push(
            headers
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("").to_string()),
        );
        if let Some(a) = g.script.pop_front() {
            a
        } else if g.poison.as_deref().is_some_and(|p| text.contains(p)) {
            Answer::status(422)
        } else if let Some((n, status)) = g
            .fail_after_accepted
            .filter(|(n, _)| g.accepted.len() >= *n)
        {
            let _ = n;
            Answer::status(status)
        } else {
            Answer::status(200)
        }
    };
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    if answer.status == 200 {
        inner.lock().unwrap().accepted.push(text);
    }
    let status = StatusCode::from_u16(answer.status).unwrap();
    let mut resp = (status, format!("{{\"status\":{}}}", answer.status)).into_response();
    if let Some(ra) = answer.retry_after {
        resp.headers_mut()
            .insert("retry-after", ra.parse().unwrap());
    }
    if answer.status == 302 {
        resp.headers_mut()
            .insert("location", "/elsewhere".parse().unwrap());
    }
    resp
}

async fn health(State(inner): State<Arc<Mutex<Inner>>>) -> StatusCode {
    StatusCode::from_u16(inner.lock().unwrap().health_status).unwrap()
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        max_elapsed: Duration::from_secs(20),
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    }
}

fn sink(url: Url, jwt: Option<&str>, retry: RetryPolicy) -> HttpSink {
    HttpSink::new(HttpSinkConfig {
        url,
        jwt: jwt.map(|j| SecretString::from(j.to_string())),
        timeout: Duration::from_secs(10),
        retry,
    })
    .unwrap()
}

fn record(i: usize) -> OutRecord {
    OutRecord {
        key: format!("agent-{}.ws.example", i % 3),
        json: format!(r#"{{"path":"/p/{i}","method":"POST","requestPayload":"{{\"n\":{i}}}"}}"#),
    }
}

/// The records of one accepted body, as raw JSON texts in order.
fn records_of(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).expect("body is JSON");
    v["batchData"]
        .as_array()
        .expect("batchData array")
        .iter()
        .map(|r| r.to_string())
        .collect()
}

fn canonical(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn delivers_exact_body_with_raw_jwt() {
    let server = Server::start().await;
    let s = sink(server.url(), Some("eyJ.token.sig"), fast_retry(3));
    let batch: Vec<_> = (0..5).map(record).collect();
    let out = s.deliver(&batch).await.unwrap();
    assert_eq!(out.delivered, vec![0, 1, 2, 3, 4]);
    assert!(out.rejected.is_empty());
    server.with(|g| {
        assert_eq!(g.bodies.len(), 1);
        let expected = format!(
            "{{\"batchData\":[{}]}}",
            batch
                .iter()
                .map(|r| r.json.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(g.bodies[0], expected, "body is the exact concatenation");
        assert_eq!(g.auths[0].as_deref(), Some("eyJ.token.sig"));
        assert_eq!(g.content_types[0].as_deref(), Some("application/json"));
    });
    let any = AnySink::Http(s);
    assert_eq!(any.name(), "http");
    assert_eq!(
        any.describe(),
        format!(
            "Akto ingestion at http://{}/prefix/api/ingestData",
            server.addr
        )
    );
    any.healthcheck().await.unwrap();
    any.flush().await.unwrap();
    any.close().await.unwrap();
}

#[tokio::test]
async fn no_authorization_header_without_jwt_and_empty_batch_sends_nothing() {
    let server = Server::start().await;
    let s = sink(server.url(), None, fast_retry(3));
    let out = s.deliver(&[]).await.unwrap();
    assert!(out.delivered.is_empty() && out.rejected.is_empty());
    assert_eq!(server.with(|g| g.bodies.len()), 0);
    s.deliver(&[record(1)]).await.unwrap();
    server.with(|g| assert_eq!(g.auths, vec![None]));
}

#[tokio::test]
async fn transient_errors_are_retried_then_delivered() {
    let server = Server::start().await;
    server.with(|g| {
        g.script.extend([
            Answer::status(503),
            Answer {
                retry_after: Some("0"),
                ..Answer::status(429)
            },
            Answer::status(408),
            Answer::status(500),
        ])
    });
    let s = sink(server.url(), None, fast_retry(5));
    let batch: Vec<_> = (0..3).map(record).collect();
    let out = s.deliver(&batch).await.unwrap();
    assert_eq!(out.delivered, vec![0, 1, 2]);
    // Answered refusals were not stored: nothing may be there twice.
    assert_eq!(s.records_maybe_stored_twice(), 0);
    server.with(|g| {
        assert_eq!(g.bodies.len(), 5);
        assert!(
            g.bodies.iter().all(|b| b == &g.bodies[0]),
            "same body each try"
        );
        assert_eq!(g.accepted.len(), 1);
    });
}

#[tokio::test]
async fn persistent_5xx_gives_up_retriable_after_max_attempts() {
    let server = Server::start().await;
    server.with(|g| g.script.extend((0..10).map(|_| Answer::status(502))));
    let s = sink(server.url(), None, fast_retry(3));
    let err = s.deliver(&[record(0), record(1)]).await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
    assert!(err.delivered_before_failure().is_empty());
    let msg = err.to_string();
    assert!(msg.contains("DATA_INGESTION_SERVICE_URL"), "{msg}");
    assert!(msg.contains(&server.addr.to_string()), "{msg}");
    assert!(msg.contains("502"), "{msg}");
    assert_eq!(server.with(|g| g.bodies.len()), 3);
    // A 502 comes from a gateway that may have passed the request on to Akto before failing:
    // the records may be stored already, and the error says so.
    assert!(msg.contains("gateway in front of the service"), "{msg}");
    assert!(
        msg.contains("2 of these records may already be stored"),
        "{msg}"
    );
    assert_eq!(s.records_maybe_stored_twice(), 2);
}

#[tokio::test]
async fn retry_after_beyond_the_time_budget_stops_early() {
    let server = Server::start().await;
    server.with(|g| {
        g.script.push_back(Answer {
            retry_after: Some("3600"),
            ..Answer::status(503)
        })
    });
    let retry = RetryPolicy {
        max_elapsed: Duration::from_secs(5),
        ..fast_retry(5)
    };
    let s = sink(server.url(), None, retry);
    let err = s.deliver(&[record(0)]).await.unwrap_err();
    assert!(err.is_retriable());
    assert!(err.to_string().contains("budget"), "{err}");
    assert_eq!(server.with(|g| g.bodies.len()), 1);
}

#[tokio::test]
async fn unreachable_service_is_retriable_and_names_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = Url::parse(&format!("http://{addr}/")).unwrap();
    let s = sink(url, Some("secret-token-value"), fast_retry(2));
    let err = s.deliver(&[record(0)]).await.unwrap_err();
    assert!(err.is_retriable());
    let msg = err.to_string();
    assert!(msg.contains("No data appearing"), "{msg}");
    assert!(msg.contains(&addr.to_string()), "{msg}");
    assert!(msg.contains("DATA_INGESTION_SERVICE_URL"), "{msg}");
    assert!(!msg.contains("secret-token-value"));
    // A refused connection sent nothing: nothing may be stored twice.
    assert_eq!(s.records_maybe_stored_twice(), 0);
    assert!(!msg.contains("stored"), "{msg}");
    let err = s.healthcheck().await.unwrap_err();
    assert!(err.is_retriable());
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn timeout_is_retriable() {
    let server = Server::start().await;
    server.with(|g| {
        g.script.extend((0..2).map(|_| Answer {
            delay: Duration::from_millis(1500),
            ..Answer::status(200)
        }))
    });
    let s = HttpSink::new(HttpSinkConfig {
        url: server.url(),
        jwt: None,
        timeout: Duration::from_millis(200),
        retry: fast_retry(2),
    })
    .unwrap();
    let err = s.deliver(&[record(0)]).await.unwrap_err();
    assert!(err.is_retriable());
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[tokio::test]
async fn poison_records_are_isolated_by_bisection() {
    let server = Server::start().await;
    let mut batch: Vec<_> = (0..11).map(record).collect();
    for i in [2, 7] {
        batch[i].json = format!(r#"{{"path":"/p/{i}","poison":"POISON"}}"#);
    }
    server.with(|g| g.poison = Some("POISON".into()));
    let s = sink(server.url(), None, fast_retry(3));
    let out = s.deliver(&batch).await.unwrap();
    let rejected: Vec<usize> = out.rejected.iter().map(|(i, _)| *i).collect();
    assert_eq!(rejected, vec![2, 7]);
    assert!(out.rejected[0].1.contains("422"), "{:?}", out.rejected);
    let mut delivered = out.delivered.clone();
    delivered.sort_unstable();
    assert_eq!(delivered, vec![0, 1, 3, 4, 5, 6, 8, 9, 10]);
    // Every good record reached the server exactly once among accepted bodies.
    let accepted: Vec<String> =
        server.with(|g| g.accepted.iter().flat_map(|b| records_of(b)).collect());
    let mut got: Vec<String> = accepted.clone();
    got.sort();
    let mut want: Vec<String> = delivered
        .iter()
        .map(|&i| canonical(&batch[i].json))
        .collect();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn failure_during_bisection_reports_what_was_delivered() {
    let server = Server::start().await;
    let mut batch: Vec<_> = (0..4).map(record).collect();
    batch[3].json = r#"{"poison":"POISON"}"#.into();
    server.with(|g| {
        g.poison = Some("POISON".into());
        // After the first accepted half, the service goes down.
        g.fail_after_accepted = Some((1, 503));
    });
    let s = sink(server.url(), None, fast_retry(2));
    let err = s.deliver(&batch).await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
    assert_eq!(err.delivered_before_failure(), &[0, 1]);
    let accepted: Vec<String> =
        server.with(|g| g.accepted.iter().flat_map(|b| records_of(b)).collect());
    assert_eq!(
        accepted,
        vec![canonical(&batch[0].json), canonical(&batch[1].json)]
    );
}

#[tokio::test]
async fn bad_token_is_a_permanent_config_error() {
    let server = Server::start().await;
    server.with(|g| g.script.push_back(Answer::status(401)));
    let s = sink(server.url(), Some("wrong-jwt-value"), fast_retry(5));
    let err = s.deliver(&[record(0), record(1)]).await.unwrap_err();
    assert!(!err.is_retriable());
    assert!(matches!(err, SinkError::Auth { .. }));
    let msg = err.to_string();
    assert!(
        msg.starts_with("the ingestion service rejected AKTO_JWT_TOKEN (401)"),
        "{msg}"
    );
    assert!(!msg.contains("wrong-jwt-value"), "{msg}");
    assert!(!format!("{err:?}").contains("wrong-jwt-value"));
    assert_eq!(server.with(|g| g.bodies.len()), 1, "no retry, no bisection");

    // No token at all: the 401 says one is needed.
    server.with(|g| g.script.push_back(Answer::status(401)));
    let s = sink(server.url(), None, fast_retry(5));
    let err = s.deliver(&[record(0)]).await.unwrap_err();
    assert!(!err.is_retriable());
    assert!(matches!(err, SinkError::Auth { .. }), "{err:?}");
    assert!(
        err.to_string().contains("requires AKTO_JWT_TOKEN (401)"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_path_and_redirects_do_not_quarantine_records() {
    let server = Server::start().await;
    // No route at this base URL: 404, which must not be mistaken for poison records.
    let url = Url::parse(&format!("http://{}/wrong", server.addr)).unwrap();
    let s = sink(url, None, fast_retry(3));
    let err = s.deliver(&[record(0), record(1)]).await.unwrap_err();
    assert!(!err.is_retriable());
    assert!(
        err.to_string().contains("DATA_INGESTION_SERVICE_URL"),
        "{err}"
    );
    let err = s.healthcheck().await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");

    server.with(|g| g.script.push_back(Answer::status(302)));
    let s = sink(server.url(), None, fast_retry(3));
    let err = s.deliver(&[record(0)]).await.unwrap_err();
    assert!(!err.is_retriable());
    assert!(err.to_string().contains("redirect"), "{err}");
}

#[tokio::test]
async fn unhealthy_service_fails_healthcheck() {
    let server = Server::start().await;
    server.with(|g| g.health_status = 503);
    let s = sink(server.url(), None, fast_retry(1));
    let err = s.healthcheck().await.unwrap_err();
    assert!(err.is_retriable());
    assert!(err.to_string().contains("503"), "{err}");
}

#[tokio::test]
async fn oversized_record_is_rejected_without_sending_and_bodies_stay_under_limit() {
    let server = Server::start().await;
    let big = |i: usize, bytes: usize| OutRecord {
        key: "k".into(),
        json: format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(bytes)),
    };
    let batch = vec![
        big(0, 4 * 1024 * 1024),
        big(1, MAX_BODY_BYTES), // alone over the limit
        big(2, 4 * 1024 * 1024),
        big(3, 4 * 1024 * 1024),
        big(4, 4 * 1024 * 1024),
        record(5),
    ];
    let plan = plan_batches(&batch, MAX_RECORDS_PER_BATCH, MAX_BODY_BYTES);
    assert_eq!(plan, vec![0..1, 1..2, 2..4, 4..6]);
    let s = sink(server.url(), None, fast_retry(2));
    // Deliver the whole slice at once: the sink still keeps every body under the limit.
    let out = s.deliver(&batch).await.unwrap();
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].0, 1);
    assert!(
        out.rejected[0].1.contains("10485760"),
        "{:?}",
        out.rejected[0].1
    );
    let mut delivered = out.delivered.clone();
    delivered.sort_unstable();
    assert_eq!(delivered, vec![0, 2, 3, 4, 5]);
    server.with(|g| {
        assert!(g.bodies.iter().all(|b| b.len() <= MAX_BODY_BYTES));
        assert_eq!(
            g.bodies.len(),
            2,
            "over-limit slice split into several requests"
        );
        assert!(!g.bodies.iter().any(|b| b.contains("\"i\":1,")));
    });
    // The planned single-record range of the oversized record is rejected without a request.
    let before = server.with(|g| g.bodies.len());
    let out = s.deliver(&batch[1..2]).await.unwrap();
    assert_eq!(out.rejected.len(), 1);
    assert!(out.delivered.is_empty());
    assert_eq!(server.with(|g| g.bodies.len()), before);
}

// ---------------------------------------------------------------------------------------------
// Against the strict Akto stand-in: it validates every record as Akto does.

use akto_standin::{Behavior, StandIn, StandInConfig};

async fn standin(jwt: Option<&str>) -> StandIn {
    StandIn::start(StandInConfig {
        require_jwt: jwt.map(str::to_string),
        ..StandInConfig::default()
    })
    .await
    .expect("stand-in starts")
}

fn standin_url(s: &StandIn) -> Url {
    Url::parse(&s.url()).expect("stand-in url")
}

/// A record that satisfies Akto's contract.
fn akto_record(i: usize) -> OutRecord {
    let host = format!("agent-{}.ws-1.databricks", i % 3);
    let v = serde_json::json!({
        "path": format!("/serving-endpoints/agent-{}/invocations", i % 3),
        "method": "POST",
        "requestHeaders": serde_json::json!({"host": host, "content-type": "application/json"}).to_string(),
        "responseHeaders": serde_json::json!({"content-type": "application/json"}).to_string(),
        "requestPayload": format!("{{\"messages\":[{{\"role\":\"user\",\"content\":\"q{i}\"}}]}}"),
        "responsePayload": "{\"choices\":[]}",
        "ip": "10.0.0.1",
        "destIp": "",
        "time": (1_700_000_000 + i).to_string(),
        "statusCode": "200",
        "status": "OK",
        "type": "HTTP/1.1",
        "akto_account_id": "1000000",
        "akto_vxlan_id": "0",
        "is_pending": "false",
        "source": "MIRRORING",
        "tag": serde_json::json!({"gen-ai": "Gen AI", "ai-agent": format!("agent-{}", i % 3)}).to_string(),
    });
    OutRecord {
        key: host,
        json: v.to_string(),
    }
}

fn values(records: &[OutRecord], indices: &[usize]) -> Vec<serde_json::Value> {
    indices
        .iter()
        .map(|&i| serde_json::from_str(&records[i].json).unwrap())
        .collect()
}

#[tokio::test]
async fn standin_accepts_planned_batches_with_jwt() {
    let st = standin(Some("eyJhbGciOi.jwt.sig")).await;
    let s = sink(standin_url(&st), Some("eyJhbGciOi.jwt.sig"), fast_retry(3));
    s.healthcheck().await.unwrap();
    let records: Vec<_> = (0..120).map(akto_record).collect();
    let plan = plan_batches(&records, MAX_RECORDS_PER_BATCH, MAX_BODY_BYTES);
    assert_eq!(plan, vec![0..50, 50..100, 100..120]);
    for range in plan {
        let out = s.deliver(&records[range.clone()]).await.unwrap();
        assert_eq!(out.delivered, (0..range.len()).collect::<Vec<_>>());
        assert!(out.rejected.is_empty());
    }
    assert_eq!(st.accepted_batches(), 3);
    assert_eq!(st.rejected_batches(), 0);
    let all: Vec<usize> = (0..120).collect();
    assert_eq!(st.records(), values(&records, &all));
    st.shutdown().await;
}

#[tokio::test]
async fn standin_wrong_jwt_is_a_config_error() {
    let st = standin(Some("the-right-token")).await;
    let s = sink(standin_url(&st), Some("a-wrong-token"), fast_retry(3));
    let err = s.deliver(&[akto_record(0)]).await.unwrap_err();
    assert!(!err.is_retriable());
    let msg = err.to_string();
    assert!(
        msg.starts_with("the ingestion service rejected AKTO_JWT_TOKEN (401)"),
        "{msg}"
    );
    assert!(!msg.contains("a-wrong-token") && !msg.contains("the-right-token"));
    assert!(st.records().is_empty());
    assert_eq!(st.rejected_batches(), 1, "no retries, no bisection on 401");
    // Without a token at all, the message says it is missing.
    let s = sink(standin_url(&st), None, fast_retry(3));
    let err = s.deliver(&[akto_record(0)]).await.unwrap_err();
    assert!(err.to_string().contains("none is set"), "{err}");
}

#[tokio::test]
async fn standin_contract_violations_are_isolated_and_the_rest_delivered() {
    let st = standin(None).await;
    let s = sink(standin_url(&st), None, fast_retry(3));
    let mut records: Vec<_> = (0..20).map(akto_record).collect();
    // What Akto would drop: an unknown source, and time in milliseconds (overflows 32 bits).
    records[4].json = records[4].json.replace("\"MIRRORING\"", "\"DATABRICKS\"");
    records[13].json = records[13].json.replace(
        &format!("\"time\":\"{}\"", 1_700_000_013),
        "\"time\":\"1700000013000\"",
    );
    let out = s.deliver(&records).await.unwrap();
    let rejected: Vec<usize> = out.rejected.iter().map(|(i, _)| *i).collect();
    assert_eq!(rejected, vec![4, 13]);
    assert!(
        out.rejected[0].1.contains("source"),
        "{:?}",
        out.rejected[0]
    );
    assert!(out.rejected[1].1.contains("time"), "{:?}", out.rejected[1]);
    let mut delivered = out.delivered.clone();
    delivered.sort_unstable();
    let want: Vec<usize> = (0..20).filter(|i| *i != 4 && *i != 13).collect();
    assert_eq!(delivered, want);
    // The stand-in holds each good record exactly once.
    let mut got: Vec<String> = st.records().iter().map(|v| v.to_string()).collect();
    got.sort();
    let mut exp: Vec<String> = values(&records, &want)
        .iter()
        .map(|v| v.to_string())
        .collect();
    exp.sort();
    assert_eq!(got, exp);
}

#[tokio::test]
async fn standin_injected_poison_is_bisected() {
    let st = standin(None).await;
    st.set_behavior(Behavior::Reject422Matching {
        needle: "\"1700000007\"".into(),
    });
    let s = sink(standin_url(&st), None, fast_retry(3));
    let records: Vec<_> = (0..16).map(akto_record).collect();
    let out = s.deliver(&records).await.unwrap();
    assert_eq!(
        out.rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![7]
    );
    assert_eq!(out.delivered.len(), 15);
    assert_eq!(st.records().len(), 15);
}

#[tokio::test]
async fn standin_transient_failures_are_retried() {
    let st = standin(None).await;
    st.set_behavior(Behavior::FailNext {
        count: 2,
        status: 503,
    });
    let s = sink(standin_url(&st), None, fast_retry(4));
    let records: Vec<_> = (0..10).map(akto_record).collect();
    let out = s.deliver(&records).await.unwrap();
    assert_eq!(out.delivered.len(), 10);
    assert_eq!(st.injected_failures(), 2);
    assert_eq!(st.records().len(), 10);

    st.set_behavior(Behavior::FailEvery {
        every: 2,
        status: 429,
    });
    for chunk in records.chunks(3) {
        assert_eq!(s.deliver(chunk).await.unwrap().delivered.len(), chunk.len());
    }
    assert_eq!(st.records().len(), 20);
}

#[tokio::test]
async fn standin_outage_then_recovery_sends_each_record_once() {
    let st = standin(None).await;
    st.set_behavior(Behavior::FailNext {
        count: 100,
        status: 500,
    });
    let s = sink(standin_url(&st), None, fast_retry(3));
    let records: Vec<_> = (0..5).map(akto_record).collect();
    let err = s.deliver(&records).await.unwrap_err();
    assert!(err.is_retriable());
    assert!(err.delivered_before_failure().is_empty());
    assert_eq!(st.injected_failures(), 3);
    // Next cycle, the service is back: the same records go out once.
    st.set_behavior(Behavior::Normal);
    let out = s.deliver(&records).await.unwrap();
    assert_eq!(out.delivered, vec![0, 1, 2, 3, 4]);
    assert_eq!(st.records(), values(&records, &[0, 1, 2, 3, 4]));
}

#[tokio::test]
async fn standin_slow_answers_time_out_as_retriable() {
    let st = standin(None).await;
    st.set_behavior(Behavior::Slow { delay_ms: 1500 });
    let s = HttpSink::new(HttpSinkConfig {
        url: standin_url(&st),
        jwt: None,
        timeout: Duration::from_millis(200),
        retry: fast_retry(2),
    })
    .unwrap();
    let err = s.deliver(&[akto_record(0)]).await.unwrap_err();
    assert!(err.is_retriable());
    assert!(err.to_string().contains("timed out"), "{err}");
}

/// A rotated JWT in `AKTO_JWT_TOKEN_FILE` needs no restart: after the service stops accepting
/// the old token, the 401 makes the sink read the file again and send once more. A sink that
/// kept its first token is refused; a file still holding a refused token names the file.
#[tokio::test]
async fn standin_rotated_jwt_file_is_read_again() {
    let st = standin(Some("jwt-before-rotation")).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("akto_jwt_token");
    std::fs::write(&file, "jwt-before-rotation\n").unwrap();
    let rotating = sink(standin_url(&st), Some("jwt-before-rotation"), fast_retry(3))
        .reread_jwt_from(file.clone());
    let fixed = sink(standin_url(&st), Some("jwt-before-rotation"), fast_retry(3));
    rotating.deliver(&[akto_record(0)]).await.unwrap();
    fixed.deliver(&[akto_record(1)]).await.unwrap();

    std::fs::write(&file, "jwt-after-rotation\n").unwrap();
    st.set_required_jwt(Some("jwt-after-rotation"));
    let out = rotating
        .deliver(&[akto_record(2)])
        .await
        .expect("the new token is read from the file after the 401");
    assert_eq!(out.delivered, vec![0]);
    assert_eq!(st.rejected_batches(), 1, "one 401, then the new token");
    let err = fixed.deliver(&[akto_record(3)]).await.unwrap_err();
    assert!(
        err.to_string().contains("rejected AKTO_JWT_TOKEN (401)"),
        "{err}"
    );

    // The service moves on but the file does not: a permanent error naming the file.
    st.set_required_jwt(Some("jwt-third"));
    let err = rotating.deliver(&[akto_record(4)]).await.unwrap_err();
    assert!(!err.is_retriable());
    let msg = err.to_string();
    assert!(msg.contains("AKTO_JWT_TOKEN_FILE"), "{msg}");
    assert!(
        !msg.contains("jwt-after-rotation") && !msg.contains("jwt-third"),
        "{msg}"
    );
    let all: Vec<usize> = vec![0, 1, 2];
    let records: Vec<_> = (0..3).map(akto_record).collect();
    assert_eq!(st.records(), values(&records, &all));
    st.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 4xx answers from the path between the connector and Akto (ingress, WAF, proxy): Akto refuses
// a bad record with 422; anything else that refuses every request must not quarantine records.

/// The records of a failed delivery are all still pending: none delivered, none rejected.
fn assert_all_pending(err: &SinkError) {
    assert!(err.delivered_before_failure().is_empty(), "{err}");
    assert!(err.rejected_before_failure().is_empty(), "{err}");
}

#[tokio::test]
async fn standin_400_or_413_to_every_record_is_a_path_error_that_keeps_them_pending() {
    let st = standin(None).await;
    let s = sink(standin_url(&st), None, fast_retry(3));
    let records: Vec<_> = (0..6).map(akto_record).collect();
    for status in [400u16, 413] {
        st.set_behavior(Behavior::FailAll { status });
        let err = s.deliver(&records).await.unwrap_err();
        assert!(matches!(err, SinkError::Protocol { .. }), "{err:?}");
        assert!(!err.is_retriable(), "{err}");
        assert_all_pending(&err);
        let msg = err.to_string();
        for part in [
            &format!("HTTP {status}"),
            &format!("injected failure {status}"),
            "to every one of the batch's 6 records",
            "DATA_INGESTION_SERVICE_URL",
            "HTTPS_PROXY",
            "stay pending",
        ] {
            assert!(msg.contains(part), "{part:?} missing: {msg}");
        }
        // A batch of one record refused alone is the same case.
        let err = s.deliver(&records[..1]).await.unwrap_err();
        assert!(matches!(err, SinkError::Protocol { .. }), "{err:?}");
        assert_all_pending(&err);
    }
    assert!(st.records().is_empty());
    // Next cycle, the path is fixed: the same records go out, each once.
    st.set_behavior(Behavior::Normal);
    let out = s.deliver(&records).await.unwrap();
    assert_eq!(out.delivered, (0..6).collect::<Vec<_>>());
    assert_eq!(st.records(), values(&records, &[0, 1, 2, 3, 4, 5]));
}

#[tokio::test]
async fn standin_other_4xx_stops_at_once_without_bisecting_or_rejecting() {
    let st = standin(None).await;
    let s = sink(standin_url(&st), None, fast_retry(3));
    let records: Vec<_> = (0..8).map(akto_record).collect();
    for (status, hint) in [
        (407u16, "HTTPS_PROXY / HTTP_PROXY"),
        (411, "proxy, WAF or ingress"),
        (415, "Content-Type: application/json"),
        (431, "headers"),
        (409, "proxy, WAF or ingress"),
    ] {
        st.set_behavior(Behavior::FailAll { status });
        let before = st.injected_failures();
        let err = s.deliver(&records).await.unwrap_err();
        assert!(matches!(err, SinkError::Protocol { .. }), "{err:?}");
        assert_all_pending(&err);
        let msg = err.to_string();
        assert!(msg.contains(&format!("HTTP {status}")), "{msg}");
        assert!(msg.contains(hint), "{hint:?} missing: {msg}");
        assert!(msg.contains("DATA_INGESTION_SERVICE_URL"), "{msg}");
        assert_eq!(
            st.injected_failures(),
            before + 1,
            "one request, no bisection"
        );
    }
    assert!(st.records().is_empty());
}

#[tokio::test]
async fn standin_400_for_one_record_rejects_only_that_record() {
    let st = standin(None).await;
    st.set_behavior(Behavior::RejectMatching {
        needle: "\"1700000005\"".into(),
        status: 400,
    });
    let s = sink(standin_url(&st), None, fast_retry(3));
    let records: Vec<_> = (0..12).map(akto_record).collect();
    let out = s.deliver(&records).await.unwrap();
    assert_eq!(
        out.rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![5]
    );
    assert!(out.rejected[0].1.contains("HTTP 400"), "{:?}", out.rejected);
    assert_eq!(out.delivered.len(), 11);
    assert_eq!(st.records().len(), 11);
}

/// A record refused alone with 413 while the others went through: a proxy's body limit below
/// Akto's. It is rejected (quarantined by delivery) with a reason naming the limit to raise.
#[tokio::test]
async fn standin_413_for_one_record_names_the_body_limit_to_raise() {
    let st = standin(None).await;
    st.set_behavior(Behavior::RejectMatching {
        needle: "\"1700000003\"".into(),
        status: 413,
    });
    let s = sink(standin_url(&st), None, fast_retry(3));
    let records: Vec<_> = (0..6).map(akto_record).collect();
    let out = s.deliver(&records).await.unwrap();
    assert_eq!(out.delivered.len(), 5);
    assert_eq!(
        out.rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![3]
    );
    let reason = &out.rejected[0].1;
    assert!(reason.contains("HTTP 413"), "{reason}");
    assert!(reason.contains("raise that limit to 10m"), "{reason}");
}

/// Akto answering 422 to every record of a batch, each sent alone (e.g. an Akto version that
/// expects another record format, or one bad unit alone in its batch): the records are refused
/// (quarantined by delivery: kept pending, a bad unit alone in its batch would block its source
/// every cycle), and the outcome says the whole batch was refused, naming the code and the fix,
/// so that the cycle is reported failed. A bad record among good ones, or the only record of a
/// batch, is refused without that.
#[tokio::test]
async fn standin_422_for_every_record_of_a_batch_quarantines_them_and_says_so() {
    let st = standin(None).await;
    let s = sink(standin_url(&st), None, fast_retry(3));
    let bad = |i: usize| {
        let mut r = akto_record(i);
        r.json = r.json.replace("\"MIRRORING\"", "\"DATABRICKS\"");
        r
    };
    let records: Vec<_> = (0..4).map(bad).collect();
    let out = s.deliver(&records).await.unwrap();
    assert!(out.delivered.is_empty());
    assert_eq!(out.all_indices(), vec![0, 1, 2, 3]);
    assert!(out.rejected.iter().all(|(_, r)| r.contains("HTTP 422")));
    let why = out
        .whole_batch_refused
        .as_deref()
        .expect("every record refused: the outcome says so");
    assert!(!why.contains('\n') && !why.contains("  "), "{why}");
    for part in [
        "HTTP 422",
        "every record of a batch of 4",
        "each sent alone",
        "quarantine.jsonl",
        "check its version and the record format",
        "/api/ingestData",
    ] {
        assert!(why.contains(part), "{part:?} missing: {why}");
    }
    // Bisected down to single records before concluding (1 + 2 + 4 requests).
    assert_eq!(st.rejected_batches(), 7);

    // The only record of a batch: refused (quarantined by delivery), nothing more said.
    let out = s.deliver(&records[..1]).await.unwrap();
    assert_eq!(out.rejected.len(), 1);
    assert!(out.rejected[0].1.contains("422"), "{:?}", out.rejected);
    assert_eq!(out.whole_batch_refused, None);

    // Bad records among a good one: each bad one refused, the good one delivered.
    let mixed = vec![bad(0), akto_record(1), bad(2)];
    let out = s.deliver(&mixed).await.unwrap();
    assert_eq!(out.delivered, vec![1]);
    let mut rejected: Vec<usize> = out.rejected.iter().map(|(i, _)| *i).collect();
    rejected.sort_unstable();
    assert_eq!(rejected, vec![0, 2]);
    assert!(out.rejected.iter().all(|(_, r)| r.contains("422")));
    assert_eq!(out.whole_batch_refused, None);
    assert_eq!(st.records(), values(&mixed, &[1]));
}

/// A 403 is not the token's fault (Akto answers a bad token with 401): a WAF or ingress in
/// front of the service refusing requests. To every record alone: nothing quarantined, the
/// records pending, an error naming the WAF, not AKTO_JWT_TOKEN.
#[tokio::test]
async fn standin_403_to_every_record_is_a_path_error_not_a_token_error() {
    let st = standin(Some("valid-jwt")).await;
    let s = sink(standin_url(&st), Some("valid-jwt"), fast_retry(3));
    let records: Vec<_> = (0..6).map(akto_record).collect();
    st.set_behavior(Behavior::FailAll { status: 403 });
    let err = s.deliver(&records).await.unwrap_err();
    assert!(matches!(err, SinkError::Protocol { .. }), "{err:?}");
    assert_all_pending(&err);
    let msg = err.to_string();
    for part in [
        "HTTP 403",
        "to every one of the batch's 6 records",
        "WAF",
        "stay pending",
    ] {
        assert!(msg.contains(part), "{part:?} missing: {msg}");
    }
    assert!(!msg.contains("rejected AKTO_JWT_TOKEN"), "{msg}");
    assert!(st.injected_failures() > 1, "the batch was bisected");
    assert!(st.records().is_empty());
    // The WAF rule fixed: the same records go out, each once.
    st.set_behavior(Behavior::Normal);
    let out = s.deliver(&records).await.unwrap();
    assert_eq!(out.delivered, (0..6).collect::<Vec<_>>());
    assert_eq!(st.records(), values(&records, &[0, 1, 2, 3, 4, 5]));
}

/// A WAF refusing one record's content with 403 (e.g. a prompt that looks like SQL
/// injection): that record alone is refused, with a reason naming the WAF; the rest delivered.
#[tokio::test]
async fn standin_403_for_one_record_rejects_only_that_record_naming_the_waf() {
    let st = standin(Some("valid-jwt")).await;
    st.set_behavior(Behavior::RejectMatching {
        needle: "\"1700000002\"".into(),
        status: 403,
    });
    let s = sink(standin_url(&st), Some("valid-jwt"), fast_retry(3));
    let records: Vec<_> = (0..5).map(akto_record).collect();
    let out = s.deliver(&records).await.unwrap();
    assert_eq!(out.delivered, vec![0, 1, 3, 4]);
    assert_eq!(
        out.rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![2]
    );
    let reason = &out.rejected[0].1;
    assert!(
        reason.contains("HTTP 403") && reason.contains("WAF"),
        "{reason}"
    );
    assert_eq!(st.records(), values(&records, &[0, 1, 3, 4]));
}

/// With `AKTO_JWT_TOKEN_FILE`, a 403 still makes the sink read the file again: a new token
/// there is sent at once; an unchanged one leaves the 403 to the WAF rule.
#[tokio::test]
async fn a_403_reads_the_token_file_again_and_sends_a_new_token() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("akto_jwt_token");
    std::fs::write(&file, "jwt-new\n").unwrap();
    let s = sink(server.url(), Some("jwt-old"), fast_retry(3)).reread_jwt_from(file.clone());
    server.with(|g| g.script.push_back(Answer::status(403)));
    let out = s.deliver(&[record(0), record(1)]).await.unwrap();
    assert_eq!(out.delivered, vec![0, 1]);
    server.with(|g| {
        assert_eq!(
            g.auths,
            vec![Some("jwt-old".to_string()), Some("jwt-new".to_string())]
        )
    });
    // The file holds the token sent already: the 403 is not about it.
    server.with(|g| g.fail_after_accepted = Some((0, 403)));
    let err = s.deliver(&[record(2)]).await.unwrap_err();
    assert!(matches!(err, SinkError::Protocol { .. }), "{err:?}");
    assert!(!err.to_string().contains("AKTO_JWT_TOKEN"), "{err}");
    assert!(err.to_string().contains("WAF"), "{err}");
}

#[tokio::test]
async fn path_error_during_bisection_leaves_every_record_pending() {
    let server = Server::start().await;
    // The batch: 422; its first half (record 0) alone: 422 (a bad record); the second: 407.
    server.with(|g| {
        g.script.extend([
            Answer::status(422),
            Answer::status(422),
            Answer::status(407),
        ])
    });
    let s = sink(server.url(), None, fast_retry(3));
    let err = s.deliver(&[record(0), record(1)]).await.unwrap_err();
    assert!(matches!(err, SinkError::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("HTTP 407"), "{err}");
    // Record 0's 422 is doubtful until the batch ends (the path may refuse every request):
    // it stays pending with record 1.
    assert_all_pending(&err);
}

#[tokio::test]
async fn doubtful_400s_stay_pending_when_the_batch_fails_before_it_ends() {
    let server = Server::start().await;
    // The batch: 400; record 0 alone: 400 (doubtful); record 1 alone: 503 until the budget ends.
    server.with(|g| {
        g.script.extend([
            Answer::status(400),
            Answer::status(400),
            Answer::status(503),
            Answer::status(503),
        ])
    });
    let s = sink(server.url(), None, fast_retry(2));
    let err = s.deliver(&[record(0), record(1)]).await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
    assert_all_pending(&err);
}

// ---------------------------------------------------------------------------------------------
// The request timeout grows with the body: a large batch on a slow link is not cut off.

/// A valid record whose request payload is about `pad` bytes.
fn big_akto_record(i: usize, pad: usize) -> OutRecord {
    let mut r = akto_record(i);
    let mut v: serde_json::Value = serde_json::from_str(&r.json).unwrap();
    v["requestPayload"] = serde_json::Value::String("x".repeat(pad));
    r.json = v.to_string();
    r
}

#[tokio::test]
async fn standin_reading_slowly_gets_the_body_within_the_size_allowance() {
    let st = standin(None).await;
    // About 2 MiB at 1 MiB/s: some 2 s, four times the 500 ms base timeout, while the body
    // adds 8 s to it (1 s per 256 KiB).
    st.set_behavior(Behavior::SlowRead {
        bytes_per_sec: 1024 * 1024,
    });
    let s = HttpSink::new(HttpSinkConfig {
        url: standin_url(&st),
        jwt: None,
        timeout: Duration::from_millis(500),
        retry: fast_retry(1),
    })
    .unwrap();
    let records: Vec<_> = (0..4).map(|i| big_akto_record(i, 512 * 1024)).collect();
    let body = databricks_shield::sink::body_len(&records);
    assert!(body > 2 * 1024 * 1024, "{body}");
    assert!(
        s.request_timeout(body) >= Duration::from_secs(8),
        "{:?}",
        s.request_timeout(body)
    );
    let out = s
        .deliver(&records)
        .await
        .expect("the upload gets time by body size");
    assert_eq!(out.delivered, vec![0, 1, 2, 3]);
    assert_eq!(st.records().len(), 4);
    assert_eq!(st.accepted_batches(), 1, "one request, no retry");
}

/// Akto's endpoint answers 415 to a body that is not declared `application/json`: the stand-in
/// does the same, and the sink always declares it.
#[tokio::test]
async fn standin_refuses_a_body_without_json_content_type_and_the_sink_declares_it() {
    let st = standin(None).await;
    let body = format!("{{\"batchData\":[{}]}}", akto_record(0).json);
    let resp = reqwest::Client::new()
        .post(format!("{}/api/ingestData", st.url()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    assert!(st.records().is_empty());
    let s = sink(standin_url(&st), None, fast_retry(1));
    let out = s.deliver(&[akto_record(0)]).await.unwrap();
    assert_eq!(out.delivered, vec![0]);
    assert_eq!(st.records(), values(&[akto_record(0)], &[0]));
}

// ---------------------------------------------------------------------------------------------
// A request the service stores after the client gave up on it: the sink sends it again (Akto has
// no idempotency key), so the records may be stored twice. That must be announced, never silent.

/// An ingestion service that finishes a request even when the client has gone (as a real one
/// does: its handler does not watch the connection). It reads the whole request, waits
/// `delays[n]` before the n-th one, stores its body, then answers 200 to whoever is left.
struct Lingering {
    addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<String>>>,
}

impl Lingering {
    async fn start(delays: Vec<Duration>) -> Lingering {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stored = Arc::clone(&bodies);
        let delays = Arc::new(delays);
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (stored, delays, count) = (stored.clone(), delays.clone(), count.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // The head, then `content-length` bytes of body.
                    let head_end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        if buf.len() > 1 << 20 {
                            return;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
                    let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if let Some(d) = delays.get(n) {
                        tokio::time::sleep(*d).await;
                    }
                    // Stored whether or not the client is still there.
                    stored.lock().unwrap().push(body);
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                        )
                        .await;
                });
            }
        });
        Lingering { addr, bodies }
    }

    fn url(&self) -> Url {
        Url::parse(&format!("http://{}/", self.addr)).unwrap()
    }

    /// The bodies stored, once there are `n` of them (bounded wait).
    async fn stored(&self, n: usize) -> Vec<String> {
        for _ in 0..200 {
            if self.bodies.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.bodies.lock().unwrap().clone()
    }
}

/// A sink that gives up on a request after 500 ms.
fn impatient(url: Url, attempts: u32) -> HttpSink {
    HttpSink::new(HttpSinkConfig {
        url,
        jwt: None,
        timeout: Duration::from_millis(500),
        retry: fast_retry(attempts),
    })
    .unwrap()
}

/// Collects what `tracing` writes on this thread (the tests run on a current-thread runtime).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn start(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn a_request_stored_after_its_timeout_is_announced_as_maybe_stored_twice() {
    // The first request is stored after 1.5 s, long after the sink gave up on it (500 ms);
    // the retry is answered at once.
    let server = Lingering::start(vec![Duration::from_millis(1500)]).await;
    let s = impatient(server.url(), 3);
    let batch: Vec<_> = (0..5).map(record).collect();
    let log = Captured::default();
    let out = {
        let _guard = log.start();
        s.deliver(&batch).await.unwrap()
    };
    assert_eq!(out.delivered, vec![0, 1, 2, 3, 4]);
    // The service really holds the batch twice...
    let stored = server.stored(2).await;
    assert!(stored.len() >= 2, "{stored:?}");
    assert!(stored.iter().all(|b| b == &stored[0]), "{stored:?}");
    // ...and the sink said so: a counter and a WARN with the number of records.
    assert_eq!(s.records_maybe_stored_twice(), 5);
    let text = log.text();
    assert!(text.contains("WARN"), "{text}");
    assert!(
        text.contains("5 records may be stored twice") && text.contains("records=5"),
        "{text}"
    );
    assert!(text.contains("AKTO_REQUEST_TIMEOUT_SECONDS"), "{text}");
}

#[tokio::test]
async fn a_failed_delivery_whose_requests_may_be_stored_says_so() {
    // Every attempt is stored too late: the delivery fails, the records stay pending and are
    // sent again next cycle, so the error says they may already be there.
    let server = Lingering::start(vec![Duration::from_millis(1500); 2]).await;
    let s = impatient(server.url(), 2);
    let err = s.deliver(&[record(0), record(1)]).await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
    assert!(err.delivered_before_failure().is_empty());
    let msg = err.to_string();
    assert!(msg.contains("timed out"), "{msg}");
    assert!(
        msg.contains("2 of these records may already be stored"),
        "{msg}"
    );
    assert_eq!(s.records_maybe_stored_twice(), 2);
    assert_eq!(server.stored(2).await.len(), 2);
}

/// A gateway in front of Akto (a load balancer, an ingress) answering 504 gave up waiting on a
/// slow Akto that may have stored the request all the same: the records are announced as maybe
/// stored twice, with the advice on the gateway's own timeout. The group sent again is then split
/// on 422 and one record refused: the WARN says "sent again", never "accepted".
#[tokio::test]
async fn a_gateway_timeout_is_announced_as_maybe_stored_twice() {
    let server = Server::start().await;
    server.with(|g| {
        g.script.extend([
            Answer::status(504),
            Answer::status(422),
            Answer::status(200),
            Answer::status(422),
        ])
    });
    let s = sink(server.url(), None, fast_retry(3));
    let log = Captured::default();
    let out = {
        let _guard = log.start();
        s.deliver(&[record(0), record(1)]).await.unwrap()
    };
    assert_eq!(out.delivered, vec![0]);
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(s.records_maybe_stored_twice(), 2);
    let text = log.text();
    for part in [
        "2 records may be stored twice",
        "records=2",
        "502/504 from a gateway in front of the service",
        "were sent again;",
        "AKTO_REQUEST_TIMEOUT_SECONDS",
        "gateway in front of Akto",
        "with a shorter timeout makes that useless",
    ] {
        assert!(text.contains(part), "{part:?} missing: {text}");
    }
    assert!(!text.contains("accepted;"), "{text}");
    // A 503 (the service itself is unavailable) stored nothing.
    let s = sink(server.url(), None, fast_retry(3));
    server.with(|g| g.script.push_back(Answer::status(503)));
    assert_eq!(s.deliver(&[record(2)]).await.unwrap().delivered, vec![0]);
    assert_eq!(s.records_maybe_stored_twice(), 0);
}

// ---------------------------------------------------------------------------------------------
// An ingestion service whose certificate is signed by a private CA (or re-signed by a
// TLS-inspecting proxy): trusted only with AKTO_CA_BUNDLE.

#[allow(dead_code)]
#[path = "common/tls.rs"]
mod tls;

#[tokio::test]
async fn a_service_signed_by_a_private_ca_needs_akto_ca_bundle() {
    let st = standin(None).await;
    let front = tls::tls_front(&st.url()).await;
    let url = Url::parse(&format!("https://127.0.0.1:{}/", front.port)).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Without the bundle: refused at the handshake, not retried, and the error names the fix.
    let plain = sink(url.clone(), None, fast_retry(3));
    let err = plain.deliver(&[akto_record(0)]).await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("AKTO_CA_BUNDLE"), "{msg}");
    assert!(msg.contains("certificate"), "{msg}");
    assert_eq!(
        front.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a certificate error is not retried"
    );
    let err = plain.healthcheck().await.unwrap_err();
    assert!(err.to_string().contains("AKTO_CA_BUNDLE"), "{err}");

    // The bundle of another CA of the same name: still refused, the bundle named.
    let (other, _) = tls::test_ca();
    let other_pem = dir.path().join("other-ca.pem");
    std::fs::write(&other_pem, other.pem()).unwrap();
    let wrong = sink(url.clone(), None, fast_retry(3))
        .with_ca_bundle(&other_pem)
        .unwrap();
    let err = wrong.deliver(&[akto_record(0)]).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("AKTO_CA_BUNDLE") && msg.contains(&other_pem.display().to_string()),
        "{msg}"
    );
    assert!(st.records().is_empty());

    // The same bundle trusted because AKTO_CA_BUNDLE is unset and DATABRICKS_CA_BUNDLE is set:
    // the advice names where the bundle came from, and AKTO_CA_BUNDLE as the fix.
    let inherited = sink(url.clone(), None, fast_retry(3))
        .with_ca_bundle_from(&other_pem, "DATABRICKS_CA_BUNDLE")
        .unwrap();
    let msg = inherited
        .deliver(&[akto_record(0)])
        .await
        .unwrap_err()
        .to_string();
    for part in [
        format!("DATABRICKS_CA_BUNDLE {}", other_pem.display()).as_str(),
        "because AKTO_CA_BUNDLE is unset",
        "set AKTO_CA_BUNDLE to the PEM file of the CA",
    ] {
        assert!(msg.contains(part), "{part:?} missing: {msg}");
    }
    assert!(!msg.contains("of AKTO_CA_BUNDLE"), "{msg}");

    // With the CA that signed it: healthy and delivered.
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, &front.ca_pem).unwrap();
    let trusted = sink(url, None, fast_retry(3))
        .with_ca_bundle(&ca_pem)
        .unwrap();
    trusted
        .healthcheck()
        .await
        .expect("trusted with the bundle");
    let records: Vec<_> = (0..3).map(akto_record).collect();
    let out = trusted.deliver(&records).await.unwrap();
    assert_eq!(out.delivered, vec![0, 1, 2]);
    assert_eq!(st.records(), values(&records, &[0, 1, 2]));
}

/// A certificate the client refuses for another reason than its issuer (here: issued for other
/// names) gets that reason's fix, not the advice to set AKTO_CA_BUNDLE, which changes nothing.
#[tokio::test]
async fn a_certificate_for_another_host_name_is_not_called_an_unknown_ca() {
    let st = standin(None).await;
    let front = tls::tls_front(&st.url()).await;
    // The front's certificate names localhost and 127.0.0.1; a relay on 127.0.0.2 reaches it
    // under a name it does not list.
    let relay = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let front_port = front.port;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = relay.accept().await {
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", front_port)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, &front.ca_pem).unwrap();
    let url = Url::parse(&format!("https://127.0.0.2:{relay_port}/")).unwrap();
    let s = sink(url, None, fast_retry(3))
        .with_ca_bundle(&ca_pem)
        .unwrap();
    let err = s.deliver(&[akto_record(0)]).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("certificate"), "{msg}");
    assert!(
        msg.contains("not issued for the host name in DATA_INGESTION_SERVICE_URL"),
        "{msg}"
    );
    assert!(!msg.contains("set AKTO_CA_BUNDLE"), "{msg}");
    let err = s.healthcheck().await.unwrap_err();
    assert!(
        err.to_string().contains("not issued for the host name"),
        "{err}"
    );
    assert!(st.records().is_empty());
}

#[test]
fn an_unusable_akto_ca_bundle_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = Url::parse("https://akto.example/").unwrap();
    let missing = dir.path().join("missing.pem");
    let err = sink(url.clone(), None, fast_retry(1))
        .with_ca_bundle(&missing)
        .unwrap_err();
    assert!(matches!(err, SinkError::Config { .. }), "{err:?}");
    assert!(!err.is_retriable());
    let msg = err.to_string();
    assert!(
        msg.contains("AKTO_CA_BUNDLE")
            && msg.contains(&missing.display().to_string())
            && msg.contains("cannot be read"),
        "{msg}"
    );
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "just text, no certificate").unwrap();
    let err = sink(url, None, fast_retry(1))
        .with_ca_bundle(&not_pem)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("AKTO_CA_BUNDLE") && msg.contains("no PEM certificate"),
        "{msg}"
    );
    // A bundle the sink trusts because AKTO_CA_BUNDLE is unset: the error names its setting.
    let err = sink(
        Url::parse("https://akto.example/").unwrap(),
        None,
        fast_retry(1),
    )
    .with_ca_bundle_from(&missing, "SSL_CERT_FILE")
    .unwrap_err();
    assert!(
        matches!(
            err,
            SinkError::Config {
                field: "SSL_CERT_FILE",
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("because AKTO_CA_BUNDLE is unset"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Akto's ingestion service answers 200 and then hands each record to its own Kafka producer,
// which drops a record over its max.request.size: AKTO_MAX_RECORD_BYTES keeps records under it.

use databricks_shield::sink::{
    FileSink, AKTO_FIXED_OVERHEAD_BYTES, DEFAULT_AKTO_MAX_RECORD_BYTES, MAX_AKTO_MAX_RECORD_BYTES,
    MIN_AKTO_MAX_RECORD_BYTES,
};

#[tokio::test]
async fn records_over_akto_max_record_bytes_are_rejected_without_sending() {
    let server = Server::start().await;
    let s = sink(server.url(), None, fast_retry(2));
    assert_eq!(s.max_record_bytes(), DEFAULT_AKTO_MAX_RECORD_BYTES);
    assert_eq!(DEFAULT_AKTO_MAX_RECORD_BYTES, 5_242_880 - 65_536);
    let s = s.with_max_record_bytes(100_000).unwrap();
    let big = OutRecord {
        key: "k".into(),
        json: format!(r#"{{"i":1,"pad":"{}"}}"#, "x".repeat(100_000)),
    };
    let batch = vec![record(0), big, record(2)];
    let out = s.deliver(&batch).await.unwrap();
    assert_eq!(out.delivered, vec![0, 2]);
    assert_eq!(out.rejected.len(), 1);
    let (i, reason) = &out.rejected[0];
    assert_eq!(*i, 1);
    for part in [
        "over AKTO_MAX_RECORD_BYTES (100000)",
        "max.request.size",
        "AKTO_KAFKA_MAX_REQUEST_SIZE",
    ] {
        assert!(reason.contains(part), "{part:?} missing: {reason}");
    }
    server.with(|g| {
        assert_eq!(g.bodies.len(), 1);
        assert!(!g.bodies[0].contains("\"pad\""));
    });
    // Exactly at the limit is sent.
    let at = OutRecord {
        key: "k".into(),
        json: format!(r#"{{"pad":"{}"}}"#, "x".repeat(100_000 - 10)),
    };
    assert_eq!(at.json.len(), 100_000);
    assert_eq!(s.deliver(&[at]).await.unwrap().delivered, vec![0]);

    // The sink (and, through the enum, the run stage) cuts records to the setting.
    let any = AnySink::Http(s);
    assert_eq!(any.max_record_bytes(), 100_000);
    let dir = tempfile::tempdir().unwrap();
    let file = FileSink::new(Some(dir.path().join("out.jsonl"))).unwrap();
    assert_eq!(file.max_record_bytes(), DEFAULT_AKTO_MAX_RECORD_BYTES);
    let file = AnySink::File(file.with_max_record_bytes(1_000_000).unwrap());
    assert_eq!(file.max_record_bytes(), 1_000_000);
}

#[test]
fn akto_max_record_bytes_out_of_range_names_the_setting() {
    let url = Url::parse("http://127.0.0.1:9/").unwrap();
    for bad in [
        0,
        MIN_AKTO_MAX_RECORD_BYTES - 1,
        MAX_AKTO_MAX_RECORD_BYTES + 1,
    ] {
        let err = sink(url.clone(), None, fast_retry(1))
            .with_max_record_bytes(bad)
            .unwrap_err();
        assert!(
            matches!(
                err,
                SinkError::Config {
                    field: "AKTO_MAX_RECORD_BYTES",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("between 65536 and 10485744") && msg.contains("1000000"),
            "{msg}"
        );
        let dir = tempfile::tempdir().unwrap();
        let err = FileSink::new(Some(dir.path().join("o.jsonl")))
            .unwrap()
            .with_max_record_bytes(bad)
            .unwrap_err();
        assert!(err.to_string().contains("AKTO_MAX_RECORD_BYTES"), "{err}");
    }
    for good in [MIN_AKTO_MAX_RECORD_BYTES, MAX_AKTO_MAX_RECORD_BYTES] {
        let s = sink(url.clone(), None, fast_retry(1))
            .with_max_record_bytes(good)
            .unwrap();
        assert_eq!(s.max_record_bytes(), good);
    }
}

/// The limit per record the run stage can apply: the setting for a record whose JSON cannot
/// outgrow it, lowered by what Akto's re-encoding may add (Java writes an emoji as a 12-byte
/// surrogate pair escape) for one near it; Kafka records are not re-encoded.
#[test]
fn the_limit_per_record_accounts_for_akto_re_encoding() {
    let s = sink(
        Url::parse("http://127.0.0.1:9/").unwrap(),
        None,
        fast_retry(1),
    )
    .with_max_record_bytes(1_000_000)
    .unwrap();
    let any = AnySink::Http(s);
    let small = format!(r#"{{"requestPayload":"{}"}}"#, "😀".repeat(1000));
    assert_eq!(any.max_record_bytes_for(&small), 1_000_000);
    let near = format!(
        r#"{{"requestPayload":"{}{}"}}"#,
        "a".repeat(900_000),
        "😀".repeat(20_000)
    );
    assert!(near.len() <= 1_000_000, "{}", near.len());
    let limit = any.max_record_bytes_for(&near);
    assert_eq!(limit, 1_000_000 - AKTO_FIXED_OVERHEAD_BYTES - 20_000 * 8);
    assert!(limit < near.len(), "the record must be cut: {limit}");
}

/// Akto answers 422 when an exception escapes its per-record loop, after the records before the
/// failing one were handed to its Kafka producer: the records of a refused batch that are
/// accepted when sent again may be stored twice, and that is counted and announced.
#[tokio::test]
async fn records_of_a_batch_refused_with_422_and_accepted_later_are_announced() {
    let server = Server::start().await;
    let mut batch: Vec<_> = (0..4).map(record).collect();
    batch[3].json = r#"{"path":"/p/3","poison":"POISON"}"#.into();
    server.with(|g| g.poison = Some("POISON".into()));
    let s = sink(server.url(), None, fast_retry(2));
    let log = Captured::default();
    let out = {
        let _guard = log.start();
        s.deliver(&batch).await.unwrap()
    };
    let mut delivered = out.delivered.clone();
    delivered.sort_unstable();
    assert_eq!(delivered, vec![0, 1, 2]);
    assert_eq!(out.rejected.len(), 1);
    // All three were in the first (refused) request, then accepted: three may be there twice.
    assert_eq!(s.records_maybe_stored_twice(), 3);
    let text = log.text();
    for part in [
        "3 records may be stored twice",
        "records=3",
        "3 were in a batch the service answered with HTTP 422",
        "Error while inserting data to Kafka",
    ] {
        assert!(text.contains(part), "{part:?} missing: {text}");
    }
    assert!(!text.contains("AKTO_REQUEST_TIMEOUT_SECONDS"), "{text}");

    // A record refused alone in a batch of one is not counted: nothing else was in the request.
    let s = sink(server.url(), None, fast_retry(2));
    let out = s.deliver(&batch[3..]).await.unwrap();
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(s.records_maybe_stored_twice(), 0);

    // The service fails while the 422 batch is being split: the records of it still pending
    // are sent again next cycle, and counted too.
    let server = Server::start().await;
    server.with(|g| {
        g.poison = Some("POISON".into());
        g.fail_after_accepted = Some((1, 503));
    });
    let s = sink(server.url(), None, fast_retry(2));
    let log = Captured::default();
    let err = {
        let _guard = log.start();
        s.deliver(&batch).await.unwrap_err()
    };
    let mut delivered = err.delivered_before_failure().to_vec();
    delivered.sort_unstable();
    assert_eq!(delivered, vec![0, 1]);
    assert_eq!(s.records_maybe_stored_twice(), 4);
    let text = log.text();
    for part in [
        "2 were in a batch the service answered with HTTP 422 and were accepted",
        "2 were in a batch the service answered with HTTP 422 (Akto may have handed them on",
    ] {
        assert!(text.contains(part), "{part:?} missing: {text}");
    }
}

/// The strict stand-in plays Akto's producer limit: a record whose JSON is over it is refused
/// with 422 (Akto would answer 200 and drop it), naming max.request.size; one at it is taken.
#[tokio::test]
async fn standin_refuses_a_record_over_akto_producer_limit() {
    let st = standin(None).await;
    let s = sink(standin_url(&st), None, fast_retry(2));
    let rec = akto_record(0);
    let len = serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(&rec.json).unwrap())
        .unwrap()
        .len();
    st.set_max_record_bytes(len);
    assert_eq!(
        s.deliver(std::slice::from_ref(&rec))
            .await
            .unwrap()
            .delivered,
        vec![0]
    );
    st.set_max_record_bytes(len - 1);
    let out = s.deliver(&[rec]).await.unwrap();
    assert_eq!(out.rejected.len(), 1);
    let reason = &out.rejected[0].1;
    assert!(
        reason.contains("422") && reason.contains("max.request.size"),
        "{reason}"
    );
    assert_eq!(st.records().len(), 1);

    // The default: Akto's 5,242,880. A 6 MB record (each payload under the 5 MiB string limit)
    // is refused by the stand-in when the connector's own limit lets it through.
    st.set_max_record_bytes(akto_standin::DEFAULT_MAX_RECORD_BYTES);
    let mut v: serde_json::Value = serde_json::from_str(&akto_record(1).json).unwrap();
    v["requestPayload"] = serde_json::Value::String("q".repeat(3_000_000));
    v["responsePayload"] = serde_json::Value::String("r".repeat(3_000_000));
    let big = OutRecord {
        key: "agent-1.ws-1.databricks".into(),
        json: v.to_string(),
    };
    let wide = sink(standin_url(&st), None, fast_retry(2))
        .with_max_record_bytes(MAX_AKTO_MAX_RECORD_BYTES)
        .unwrap();
    let out = wide.deliver(&[akto_record(2), big.clone()]).await.unwrap();
    assert_eq!(out.delivered, vec![0]);
    assert_eq!(out.rejected.len(), 1);
    assert!(out.rejected[0].1.contains("max.request.size"), "{out:?}");
    // With the connector's default limit, it is never sent.
    let before = st.rejected_batches();
    let out = s.deliver(&[big]).await.unwrap();
    assert!(
        out.rejected[0].1.contains("AKTO_MAX_RECORD_BYTES"),
        "{out:?}"
    );
    assert_eq!(st.rejected_batches(), before);
}

/// A proxy's or firewall's error page that echoes the request's headers: the JWT it shows never
/// reaches the error, for a batch or for the start's health check.
#[tokio::test]
async fn an_answer_echoing_the_jwt_does_not_carry_it_into_the_error() {
    let addr = echo::echoing_error_page().await;
    let jwt = "eyJhbGciOiJIUzI1NiJ9.echoed-jwt-payload.sig";
    let s = sink(
        Url::parse(&format!("http://{addr}")).unwrap(),
        Some(jwt),
        fast_retry(1),
    );
    let health = s.healthcheck().await.unwrap_err();
    let batch = s.deliver(&[record(0)]).await;
    let texts = [
        health.to_string(),
        format!("{health:?}"),
        format!("{batch:?}"),
    ];
    assert!(texts[0].contains("blocked by policy"), "{}", texts[0]);
    assert!(texts.iter().any(|t| t.contains("[redacted]")), "{texts:?}");
    for t in &texts {
        assert!(!t.contains("echoed-jwt-payload"), "{t}");
    }
}
