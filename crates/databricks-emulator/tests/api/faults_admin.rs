use databricks_emulator::EmulatorConfig;
use serde_json::{json, Value};

use crate::{default_env, start, WAREHOUSE};

#[tokio::test]
async fn generate_and_late_rows_appear_in_ground_truth() {
    let env = default_env().await;
    let before = env.emu.ground_truth();
    assert_eq!(before.len(), 200);
    let now = chrono::Utc::now();
    let r: Value = env
        .post_open("/_emulator/generate", json!({"rows": 10, "late": 4}))
        .await
        .1;
    assert_eq!(r["rows"], 10);
    let v: Value = env.get_open("/_emulator/requests").await.1;
    let all = v["requests"].as_array().unwrap();
    assert_eq!(all.len(), 214);
    let old: std::collections::HashSet<&str> = before
        .iter()
        .map(|r| r.databricks_request_id.as_str())
        .collect();
    let new: Vec<&Value> = all
        .iter()
        .filter(|r| !old.contains(r["databricks_request_id"].as_str().unwrap()))
        .collect();
    assert_eq!(new.len(), 14);
    let ages: Vec<i64> = new
        .iter()
        .map(|r| {
            let t =
                chrono::DateTime::parse_from_rfc3339(r["request_time"].as_str().unwrap()).unwrap();
            (now - t.with_timezone(&chrono::Utc)).num_seconds()
        })
        .collect();
    assert_eq!(
        ages.iter()
            .filter(|a| **a >= 5 * 60 - 5 && **a <= 55 * 60 + 5)
            .count(),
        4,
        "{ages:?}"
    );
    assert_eq!(ages.iter().filter(|a| **a < 60).count(), 10, "{ages:?}");
    assert!(new.iter().all(|r| r["table"]
        .as_str()
        .unwrap()
        .starts_with("workspace.default.")));
    // In-process generate, and the SQL view sees it.
    env.emu.generate(5, 0);
    let v = env
        .sql("SELECT count(*) FROM support_bot_payload", json!([]))
        .await;
    let n: usize = env.all_rows(&v).await[0][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let truth = env.emu.ground_truth();
    assert_eq!(truth.len(), 219);
    assert_eq!(
        n,
        truth
            .iter()
            .filter(|r| r.table.ends_with(".support_bot_payload"))
            .count()
    );
    let stats: Value = env.get_open("/_emulator/stats").await.1;
    assert!(stats["statements_executed"].as_u64().unwrap() >= 1);
    assert!(stats["rows_returned"].as_u64().unwrap() >= 1);
    assert!(
        stats["requests"]["/api/2.0/sql/statements"]
            .as_u64()
            .unwrap()
            >= 1
    );
    env.emu.shutdown().await;
}

#[tokio::test]
async fn seeded_data_is_deterministic_and_prefix_distractor_excluded() {
    let a = start(EmulatorConfig {
        table_prefix: "ai_".into(),
        ..Default::default()
    })
    .await;
    let b = start(EmulatorConfig {
        table_prefix: "ai_".into(),
        ..Default::default()
    })
    .await;
    let ids = |e: &crate::Env| {
        let mut v: Vec<_> = e
            .emu
            .ground_truth()
            .into_iter()
            .map(|r| (r.table, r.databricks_request_id))
            .collect();
        v.sort();
        v
    };
    let (ia, ib) = (ids(&a), ids(&b));
    assert_eq!(ia, ib);
    assert!(ia
        .iter()
        .all(|(t, _)| t.starts_with("workspace.default.ai_")));
    let v = a
        .sql("SELECT count(*) FROM legacy_bot_payload", json!([]))
        .await;
    assert_eq!(a.all_rows(&v).await[0][0], "20");
    a.emu.shutdown().await;
    b.emu.shutdown().await;
}

#[tokio::test]
async fn fault_429_then_success_and_503() {
    let env = start(EmulatorConfig { faults: "route=/api/2.0/serving-endpoints,kind=429,count=2,retry_after=3;route=/api/2.1,kind=503".into(), ..Default::default() }).await;
    for _ in 0..2 {
        let r = env
            .http
            .get(format!("{}/api/2.0/serving-endpoints", env.base))
            .bearer_auth(&env.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers().get("retry-after").unwrap(), "3");
        assert_eq!(
            r.json::<Value>().await.unwrap()["error_code"],
            "REQUEST_LIMIT_EXCEEDED"
        );
    }
    assert_eq!(env.get("/api/2.0/serving-endpoints").await.0, 200);
    let (s, v) = env
        .get("/api/2.1/unity-catalog/schemas?catalog_name=workspace")
        .await;
    assert_eq!(
        (s, v["error_code"].as_str()),
        (503, Some("TEMPORARILY_UNAVAILABLE"))
    );
    assert_eq!(
        env.get("/api/2.1/unity-catalog/schemas?catalog_name=workspace")
            .await
            .0,
        200
    );
    assert_eq!(env.emu.stats()["faults_fired"], 3);
    env.emu.shutdown().await;
}

#[tokio::test]
async fn fault_drop_expire_pending_fail() {
    let env = default_env().await;
    env.emu
        .set_faults("route=/api/2.0/sql/warehouses,kind=drop")
        .unwrap();
    let r = env
        .http
        .get(format!("{}/api/2.0/sql/warehouses", env.base))
        .bearer_auth(&env.token)
        .send()
        .await;
    assert!(r.is_err(), "the connection should have been dropped");
    assert_eq!(env.get("/api/2.0/sql/warehouses").await.0, 200);

    // Via the admin API: expire every token on the next matching request.
    assert_eq!(
        env.post_open(
            "/_emulator/faults",
            json!({"spec": "route=/api/2.0/sql/warehouses,kind=expire_tokens"})
        )
        .await
        .0,
        200
    );
    assert_eq!(env.get("/api/2.0/sql/warehouses").await.0, 403);
    let (status, v) = env
        .post_open("/_emulator/faults", json!({"spec": "kind=explode"}))
        .await;
    assert_eq!(status, 400);
    assert!(v["message"].as_str().unwrap().contains("unknown kind"));
    let env = crate::Env {
        token: crate::get_token(&env.http, &env.base, "emulator-client", "emulator-secret").await,
        ..env
    };

    env.emu
        .set_faults(
            "kind=pending,polls=3;kind=fail,table=workspace.default.sales_assistant_payload",
        )
        .unwrap();
    let (_, v) = env
        .post(
            "/api/2.0/sql/statements",
            json!({"warehouse_id": WAREHOUSE, "statement": "SELECT 1", "wait_timeout": "5s"}),
        )
        .await;
    assert_eq!(v["status"]["state"], "PENDING");
    let id = v["statement_id"].as_str().unwrap().to_string();
    for _ in 0..3 {
        assert_eq!(
            env.get(&format!("/api/2.0/sql/statements/{id}")).await.1["status"]["state"],
            "PENDING"
        );
    }
    assert_eq!(
        env.get(&format!("/api/2.0/sql/statements/{id}")).await.1["status"]["state"],
        "SUCCEEDED"
    );
    let v = env
        .sql("SELECT 1 FROM support_bot_payload LIMIT 1", json!([]))
        .await;
    assert_eq!(v["status"]["state"], "SUCCEEDED");
    let v = env
        .sql("SELECT 1 FROM sales_assistant_payload LIMIT 1", json!([]))
        .await;
    assert_eq!(v["status"]["state"], "FAILED");
    assert!(env.emu.set_faults("route=x,kind=503").is_err());
    env.emu.shutdown().await;
}

#[tokio::test]
async fn admin_permissions_over_http() {
    let env = default_env().await;
    let r = env
        .http
        .post(format!("{}/_emulator/permissions", env.base))
        .json(&json!({"principal": "emulator-client", "revoke": "SELECT", "table": "workspace.default.support_bot_payload"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = env
        .sql("SELECT 1 FROM support_bot_payload", json!([]))
        .await;
    assert_eq!(v["status"]["error"]["error_code"], "BAD_REQUEST");
    let r = env
        .http
        .post(format!("{}/_emulator/permissions", env.base))
        .json(&json!({"principal": "emulator-client", "grant": "SELECT", "table": "workspace.default.support_bot_payload"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = env
        .sql("SELECT 1 FROM support_bot_payload LIMIT 1", json!([]))
        .await;
    assert_eq!(v["status"]["state"], "SUCCEEDED");
    let r = env
        .http
        .post(format!("{}/_emulator/permissions", env.base))
        .json(&json!({"principal": "x", "revoke": "DANCE"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    env.emu.shutdown().await;
}

#[tokio::test]
async fn shutdown_frees_the_port() {
    let env = default_env().await;
    let addr: std::net::SocketAddr = env.base.trim_start_matches("http://").parse().unwrap();
    env.emu.shutdown().await;
    let l = tokio::net::TcpListener::bind(addr).await;
    assert!(l.is_ok(), "port still bound");
}

#[tokio::test]
async fn latency_fault_delays_but_answers() {
    let env = default_env().await;
    env.emu
        .set_faults("route=/api/2.0/serving-endpoints,kind=latency,ms=30,count=2")
        .unwrap();
    for _ in 0..3 {
        assert_eq!(env.get("/api/2.0/serving-endpoints").await.0, 200);
    }
    assert_eq!(env.emu.stats()["faults_fired"], 2);
    env.emu.shutdown().await;
}

#[tokio::test]
async fn wait_timeout_with_cancel_on_timeout() {
    let env = default_env().await;
    let heavy = "SELECT count(*) FROM customers a, customers b, customers c, customers d, customers e, customers f, customers g";
    let (s, v) = env
        .post(
            "/api/2.0/sql/statements",
            json!({"warehouse_id": WAREHOUSE, "statement": heavy, "wait_timeout": "5s", "on_wait_timeout": "CANCEL"}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["status"]["state"], "CANCELED", "{v}");
    let id = v["statement_id"].as_str().unwrap();
    assert_eq!(
        env.get(&format!("/api/2.0/sql/statements/{id}")).await.1["status"]["state"],
        "CANCELED"
    );
    env.emu.shutdown().await;
}

#[tokio::test]
async fn shutdown_interrupts_running_statements() {
    let env = default_env().await;
    let heavy = "SELECT count(*) FROM customers a, customers b, customers c, customers d, customers e, customers f, customers g";
    let (_, v) = env
        .post(
            "/api/2.0/sql/statements",
            json!({"warehouse_id": WAREHOUSE, "statement": heavy, "wait_timeout": "0s"}),
        )
        .await;
    assert_eq!(v["status"]["state"], "PENDING");
    // Returning at all (the runtime waits for blocking threads) proves the query was stopped.
    env.emu.shutdown().await;
}
