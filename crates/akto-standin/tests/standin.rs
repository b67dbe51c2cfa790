//! The stand-in over real sockets: every rejection rule, auth, and every behavior.

use akto_standin::{Behavior, StandIn, StandInConfig};
use serde_json::{json, Value};

fn good() -> Value {
    json!({
        "path": "/serving-endpoints/bot/invocations",
        "method": "POST",
        "requestHeaders": "{\"host\":\"bot.ai-agent.ws.example.com\",\"content-type\":\"application/json\"}",
        "responseHeaders": "{\"content-type\":\"application/json\"}",
        "requestPayload": "{\"messages\":[]}",
        "responsePayload": "{}",
        "ip": "10.0.0.1",
        "destIp": "",
        "time": "1700000000",
        "statusCode": "200",
        "status": "OK",
        "type": "HTTP/1.1",
        "akto_account_id": "1000000",
        "akto_vxlan_id": "0",
        "is_pending": "false",
        "source": "MIRRORING",
        "tag": "{\"gen-ai\":\"Gen AI\",\"ai-agent\":\"bot\"}"
    })
}

fn with(field: &str, value: Value) -> Value {
    let mut r = good();
    r[field] = value;
    r
}

async fn start() -> StandIn {
    StandIn::start(StandInConfig::default()).await.unwrap()
}

async fn post_raw(s: &StandIn, body: Vec<u8>, auth: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/api/ingestData", s.url()))
        .header("content-type", "application/json")
        .body(body);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.unwrap();
    let code = resp.status().as_u16();
    let v = resp.json::<Value>().await.unwrap_or(Value::Null);
    (code, v)
}

async fn post(s: &StandIn, records: Vec<Value>) -> (u16, Value) {
    post_raw(
        s,
        json!({ "batchData": records }).to_string().into_bytes(),
        None,
    )
    .await
}

#[tokio::test]
async fn accepts_a_valid_batch_and_keeps_order() {
    let s = start().await;
    let mut second = good();
    second["path"] = json!("/tools/search");
    second["publishToGuardrails"] = json!(true);
    let (code, _) = post(&s, vec![good(), second.clone()]).await;
    assert_eq!(code, 200);
    assert_eq!(s.records(), vec![good(), second]);
    assert_eq!((s.accepted_batches(), s.rejected_batches()), (1, 0));
    let health = reqwest::get(format!("{}/healthCheck", s.url()))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    s.shutdown().await;
}

#[tokio::test]
async fn rejects_each_contract_violation_with_422_and_stores_nothing() {
    let s = start().await;
    let big = "x".repeat(5_242_881);
    let mut missing = good();
    missing.as_object_mut().unwrap().remove("destIp");
    // (record, text the error must contain)
    let cases: Vec<(Value, &str)> = vec![
        (json!("not an object"), "batchData[1].(record)"),
        (missing, "batchData[1].destIp: missing"),
        (
            with("statusCode", json!(200)),
            "statusCode: must be a string",
        ),
        (
            with("publishToGuardrails", json!("yes")),
            "publishToGuardrails: must be a boolean",
        ),
        (with("source", json!("DATABRICKS")), "source"),
        (with("time", json!("1700000000000")), "time"),
        (with("time", json!("0")), "time"),
        (with("time", json!("-1")), "time"),
        (with("time", json!("17e8")), "time"),
        (with("statusCode", json!("OK")), "statusCode"),
        (with("akto_account_id", json!("acme")), "akto_account_id"),
        (with("requestHeaders", json!("{")), "requestHeaders"),
        (with("requestHeaders", json!("[]")), "requestHeaders"),
        (with("responseHeaders", json!("\"x\"")), "responseHeaders"),
        (with("tag", json!("gen-ai")), "tag"),
        (with("tag", json!("{\"gen-ai\":1}")), "tag"),
        (
            with("requestHeaders", json!("{\"Host\":\"a\"}")),
            "must be lowercase",
        ),
        (
            with("responseHeaders", json!("{\"Content-Type\":\"a\"}")),
            "must be lowercase",
        ),
        (
            with("requestHeaders", json!("{\"content-type\":\"a\"}")),
            "host header missing",
        ),
        (
            with("requestHeaders", json!("{\"host\":\"Bot_1.example\"}")),
            "[a-z0-9.-]",
        ),
        (
            with("requestHeaders", json!("{\"host\":\"\"}")),
            "[a-z0-9.-]",
        ),
        (
            with("responsePayload", json!(big)),
            "responsePayload: 5242881 bytes",
        ),
    ];
    for (i, (bad, needle)) in cases.into_iter().enumerate() {
        let (code, body) = post(&s, vec![good(), bad]).await;
        assert_eq!(code, 422, "case {i} ({needle})");
        let errors = body["actionErrors"].as_array().unwrap();
        assert!(
            errors.iter().any(|e| e.as_str().unwrap().contains(needle)),
            "case {i}: {errors:?} lacks {needle:?}"
        );
    }
    assert!(s.records().is_empty(), "a rejected batch stores nothing");
    assert_eq!(s.accepted_batches(), 0);
    s.shutdown().await;
}

#[tokio::test]
async fn rejects_malformed_bodies() {
    let s = start().await;
    for (body, code, needle) in [
        (b"not json".to_vec(), 422, "not valid JSON"),
        (b"[]".to_vec(), 422, "JSON object"),
        (b"{}".to_vec(), 422, "batchData"),
        (br#"{"batchData":{}}"#.to_vec(), 422, "batchData"),
    ] {
        let (got, v) = post_raw(&s, body, None).await;
        assert_eq!(got, code);
        assert!(
            v["actionErrors"][0].as_str().unwrap().contains(needle),
            "{v}"
        );
    }
    // Just over the 10 MiB body limit, made of valid records.
    let mut rec = good();
    rec["requestPayload"] = json!("y".repeat(5_000_000));
    let mut body = json!({"batchData": [rec.clone(), rec.clone(), rec]}).to_string();
    assert!(body.len() > 10_485_760);
    let (code, v) = post_raw(&s, std::mem::take(&mut body).into_bytes(), None).await;
    assert_eq!(code, 413);
    assert!(
        v["actionErrors"][0].as_str().unwrap().contains("10485760"),
        "{v}"
    );
    // Two such records (10,000,xxx bytes) are fine.
    let mut rec = good();
    rec["requestPayload"] = json!("y".repeat(5_000_000));
    let (code, _) = post(&s, vec![rec.clone(), rec]).await;
    assert_eq!(code, 200);
    assert_eq!((s.accepted_batches(), s.rejected_batches()), (1, 5));
    s.shutdown().await;
}

#[tokio::test]
async fn jwt_must_be_raw() {
    let s = StandIn::start(StandInConfig {
        require_jwt: Some("eyJ.test.jwt".into()),
        ..StandInConfig::default()
    })
    .await
    .unwrap();
    let body = || json!({ "batchData": [good()] }).to_string().into_bytes();
    assert_eq!(post_raw(&s, body(), None).await.0, 401);
    assert_eq!(
        post_raw(&s, body(), Some("Bearer eyJ.test.jwt")).await.0,
        401
    );
    assert_eq!(post_raw(&s, body(), Some("wrong")).await.0, 401);
    assert_eq!(post_raw(&s, body(), Some("eyJ.test.jwt")).await.0, 200);
    assert_eq!(s.records().len(), 1);
    let dbg = format!(
        "{:?}",
        StandInConfig {
            require_jwt: Some("eyJ.secret".into()),
            ..StandInConfig::default()
        }
    );
    assert!(!dbg.contains("eyJ.secret"), "{dbg}");
    s.shutdown().await;
}

#[tokio::test]
async fn fail_next_then_recovers() {
    let s = start().await;
    s.set_behavior(Behavior::FailNext {
        count: 2,
        status: 503,
    });
    assert_eq!(post(&s, vec![good()]).await.0, 503);
    assert_eq!(post(&s, vec![good()]).await.0, 503);
    assert_eq!(post(&s, vec![good()]).await.0, 200);
    assert_eq!(s.records().len(), 1);
    assert_eq!(
        (
            s.accepted_batches(),
            s.rejected_batches(),
            s.injected_failures()
        ),
        (1, 2, 2)
    );
    s.set_behavior(Behavior::FailNext {
        count: 1,
        status: 429,
    });
    assert_eq!(post(&s, vec![good()]).await.0, 429);
    assert_eq!(post(&s, vec![good()]).await.0, 200);
    s.shutdown().await;
}

#[tokio::test]
async fn fail_every_kth_batch() {
    let s = start().await;
    s.set_behavior(Behavior::FailEvery {
        every: 3,
        status: 500,
    });
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(post(&s, vec![good()]).await.0);
    }
    assert_eq!(codes, [200, 200, 500, 200, 200, 500]);
    assert_eq!(s.records().len(), 4);
    s.shutdown().await;
}

#[tokio::test]
async fn reject_matching_poison_record() {
    let s = start().await;
    s.set_behavior(Behavior::Reject422Matching {
        needle: "POISON".into(),
    });
    let poison = with("requestPayload", json!("{\"x\":\"POISON\"}"));
    let (code, v) = post(&s, vec![good(), poison]).await;
    assert_eq!(code, 422);
    assert!(v["actionErrors"].is_array());
    assert_eq!(post(&s, vec![good()]).await.0, 200);
    assert_eq!(s.records().len(), 1);
    s.set_behavior(Behavior::Normal);
    let poison = with("requestPayload", json!("{\"x\":\"POISON\"}"));
    assert_eq!(post(&s, vec![poison]).await.0, 200);
    s.shutdown().await;
}

#[tokio::test]
async fn slow_still_accepts() {
    let s = start().await;
    s.set_behavior(Behavior::Slow { delay_ms: 50 });
    assert_eq!(post(&s, vec![good()]).await.0, 200);
    assert_eq!(s.records().len(), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_the_port() {
    let s = start().await;
    let url = s.url();
    s.shutdown().await;
    let r = reqwest::Client::new()
        .get(format!("{url}/healthCheck"))
        .send()
        .await;
    assert!(r.is_err());
}

#[tokio::test]
async fn binary_prints_its_url_and_serves() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_akto-standin"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let resp = reqwest::Client::new()
        .post(format!("{url}/api/ingestData"))
        .header("content-type", "application/json")
        .body(json!({ "batchData": [good()] }).to_string())
        .send()
        .await
        .unwrap();
    let code = resp.status().as_u16();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(code, 200);
}
