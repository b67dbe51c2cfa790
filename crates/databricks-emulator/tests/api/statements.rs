use databricks_emulator::{EmulatorConfig, Privilege};
use serde_json::{json, Value};

use crate::{default_env, start, WAREHOUSE};

fn is_ts(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 27 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && s.ends_with('Z')
}

const KEYSET: &str = "SELECT databricks_request_id, request_time FROM `workspace`.`default`.`support_bot_payload`
WHERE request_date >= :since_date AND request_time >= :since
  AND (request_time > :after_time OR (request_time = :after_time AND databricks_request_id > :after_id))
ORDER BY request_time, databricks_request_id LIMIT 5000";

#[tokio::test]
async fn warehouses_list() {
    let env = default_env().await;
    let (s, v) = env.get("/api/2.0/sql/warehouses").await;
    assert_eq!(s, 200);
    let w = v["warehouses"].as_array().unwrap();
    assert!(w
        .iter()
        .any(|x| x["state"] == "RUNNING" && x["enable_serverless_compute"] == true));
    assert!(w
        .iter()
        .any(|x| x["state"] == "STOPPED" && x["warehouse_type"] == "CLASSIC"));
    assert!(w
        .iter()
        .all(|x| x["id"].is_string() && x["name"].is_string()));
    env.emu.shutdown().await;
}

#[tokio::test]
async fn keyset_query_matches_ground_truth_in_order() {
    let env = default_env().await;
    let truth: Vec<(String, String)> = {
        let mut t: Vec<_> = env
            .emu
            .ground_truth()
            .into_iter()
            .filter(|r| r.table == "workspace.default.support_bot_payload")
            .map(|r| (r.request_time, r.databricks_request_id))
            .collect();
        t.sort();
        t
    };
    assert!(truth.len() > 10);
    let cut = &truth[truth.len() / 2];
    let since = &truth[2].0;
    let params = json!([
        {"name": "since_date", "value": &since[..10], "type": "DATE"},
        {"name": "since", "value": since, "type": "TIMESTAMP"},
        {"name": "after_time", "value": cut.0, "type": "TIMESTAMP"},
        {"name": "after_id", "value": cut.1, "type": "STRING"},
    ]);
    let v = env.sql(KEYSET, params).await;
    assert_eq!(v["status"]["state"], "SUCCEEDED", "{v}");
    let m = &v["manifest"];
    assert_eq!(m["schema"]["column_count"], 2);
    assert_eq!(m["schema"]["columns"][0]["name"], "databricks_request_id");
    assert_eq!(m["schema"]["columns"][0]["type_name"], "STRING");
    assert_eq!(m["schema"]["columns"][1]["type_name"], "TIMESTAMP");
    assert_eq!(m["schema"]["columns"][1]["position"], 1);
    assert_eq!(m["truncated"], false);
    let rows = env.all_rows(&v).await;
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r[1].as_str().unwrap().to_string(),
                r[0].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = truth.iter().filter(|x| *x > cut).cloned().collect();
    assert_eq!(got, expected);
    assert_eq!(m["total_row_count"], expected.len());
    assert!(got.iter().all(|(t, _)| is_ts(t)));

    // A wrong filter gives a different answer: the statement really runs.
    let params = json!([
        {"name": "since_date", "value": &since[..10], "type": "DATE"},
        {"name": "since", "value": since, "type": "TIMESTAMP"},
        {"name": "after_time", "value": truth[0].0, "type": "TIMESTAMP"},
        {"name": "after_id", "value": truth[0].1, "type": "STRING"},
    ]);
    let rows = env.all_rows(&env.sql(KEYSET, params).await).await;
    assert_eq!(rows.len(), truth.len() - 2);
    env.emu.shutdown().await;
}

#[tokio::test]
async fn full_rows_by_id_nulls_and_strings() {
    let env = start(EmulatorConfig {
        rows: 2000,
        agents: 1,
        ..Default::default()
    })
    .await;
    let truth = env.emu.ground_truth();
    let ids: Vec<&str> = truth
        .iter()
        .take(3)
        .map(|r| r.databricks_request_id.as_str())
        .collect();
    let v = env
        .sql(
            "SELECT databricks_request_id, client_request_id, request_time, status_code, execution_duration_ms, request, response,
                    logging_error_codes, served_entity_id, requester
             FROM `workspace`.`default`.`support_bot_payload`
             WHERE request_date >= :since_date AND databricks_request_id IN (:id0, :id1, :id2)
             ORDER BY request_time, databricks_request_id",
            json!([{"name": "since_date", "value": "2000-01-01", "type": "DATE"},
                   {"name": "id0", "value": ids[0]}, {"name": "id1", "value": ids[1]}, {"name": "id2", "value": ids[2]}]),
        )
        .await;
    let rows = env.all_rows(&v).await;
    assert_eq!(rows.len(), 3);
    let types: Vec<&str> = v["manifest"]["schema"]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type_name"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "STRING",
            "STRING",
            "TIMESTAMP",
            "INT",
            "LONG",
            "STRING",
            "STRING",
            "ARRAY",
            "STRING",
            "STRING"
        ]
    );
    for r in &rows {
        assert!(r.iter().all(|x| x.is_string() || x.is_null()), "{r:?}");
        assert!(r[3].as_str().unwrap().parse::<i64>().is_ok());
        if let Some(req) = r[5].as_str() {
            let j: Value = serde_json::from_str(req).unwrap();
            assert!(j["input"].is_array(), "ResponsesAgent request: {j}");
        }
    }
    // Across all rows there are NULL client_request_ids, NULL payloads and error rows.
    let v = env
        .sql(
            "SELECT count(*), sum(CASE WHEN client_request_id IS NULL THEN 1 ELSE 0 END),
                    sum(CASE WHEN request IS NULL OR response IS NULL THEN 1 ELSE 0 END),
                    sum(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END),
                    sum(CASE WHEN array_contains(logging_error_codes, 'MAX_REQUEST_SIZE_EXCEEDED') THEN 1 ELSE 0 END)
             FROM workspace.default.support_bot_payload",
            json!([]),
        )
        .await;
    let r = &env.all_rows(&v).await[0];
    let n = |i: usize| r[i].as_str().unwrap().parse::<i64>().unwrap();
    assert_eq!(n(0), 2000);
    assert!(n(1) > 100 && n(2) > 3 && n(3) > 40 && n(4) > 0, "{r:?}");
    env.emu.shutdown().await;
}

#[tokio::test]
async fn legacy_table_and_limit_zero() {
    let env = default_env().await;
    let v = env
        .sql(
            "SELECT databricks_request_id, timestamp_ms FROM `workspace`.`default`.`hr_helper_payload`
             WHERE `date` >= :since_date AND timestamp_ms >= :since_ms ORDER BY timestamp_ms, databricks_request_id LIMIT 5000",
            json!([{"name": "since_date", "value": "2000-01-01", "type": "DATE"}, {"name": "since_ms", "value": "0", "type": "BIGINT"}]),
        )
        .await;
    let rows = env.all_rows(&v).await;
    let truth = env
        .emu
        .ground_truth()
        .into_iter()
        .filter(|r| r.table.ends_with("hr_helper_payload"))
        .count();
    assert_eq!(rows.len(), truth);
    assert_eq!(v["manifest"]["schema"]["columns"][1]["type_name"], "LONG");
    let ms: Vec<i64> = rows
        .iter()
        .map(|r| r[1].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(ms.windows(2).all(|w| w[0] <= w[1]));

    let v = env
        .sql(
            "SELECT * FROM `workspace`.`default`.`support_bot_payload` LIMIT 0",
            json!([]),
        )
        .await;
    assert_eq!(v["status"]["state"], "SUCCEEDED");
    assert_eq!(v["manifest"]["schema"]["column_count"], 12);
    assert_eq!(v["manifest"]["total_row_count"], 0);
    assert_eq!(v["manifest"]["total_chunk_count"], 0);
    assert!(v["result"]["data_array"].is_null());
    env.emu.shutdown().await;
}

#[tokio::test]
async fn chunks_follow_links() {
    let env = start(EmulatorConfig {
        chunk_rows: 7,
        rows: 300,
        agents: 1,
        ..Default::default()
    })
    .await;
    let v = env.sql("SELECT databricks_request_id FROM support_bot_payload ORDER BY databricks_request_id LIMIT 30", json!([])).await;
    assert_eq!(v["manifest"]["total_chunk_count"], 5);
    assert_eq!(v["manifest"]["chunks"][4]["row_offset"], 28);
    assert_eq!(v["manifest"]["chunks"][4]["row_count"], 2);
    assert_eq!(v["result"]["chunk_index"], 0);
    assert_eq!(v["result"]["row_count"], 7);
    assert_eq!(v["result"]["next_chunk_index"], 1);
    let id = v["statement_id"].as_str().unwrap();
    let (s, c) = env
        .get(&format!("/api/2.0/sql/statements/{id}/result/chunks/4"))
        .await;
    assert_eq!(s, 200);
    assert_eq!(c["row_offset"], 28);
    assert!(c.get("next_chunk_internal_link").is_none());
    let rows = env.all_rows(&v).await;
    assert_eq!(rows.len(), 30);
    let ids: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let (s, _) = env
        .get(&format!("/api/2.0/sql/statements/{id}/result/chunks/9"))
        .await;
    assert_eq!(s, 400);
    env.emu.shutdown().await;
}

#[tokio::test]
async fn wait_timeout_zero_then_poll() {
    let env = default_env().await;
    let (s, v) = env
        .post("/api/2.0/sql/statements", json!({"warehouse_id": WAREHOUSE, "statement": "SELECT 1 AS one", "wait_timeout": "0s"}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["status"]["state"], "PENDING");
    assert!(v.get("result").is_none());
    let id = v["statement_id"].as_str().unwrap().to_string();
    let mut last = Value::Null;
    for _ in 0..200 {
        last = env.get(&format!("/api/2.0/sql/statements/{id}")).await.1;
        if last["status"]["state"] == "SUCCEEDED" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(last["status"]["state"], "SUCCEEDED");
    assert_eq!(last["result"]["data_array"], json!([["1"]]));
    assert_eq!(last["manifest"]["schema"]["columns"][0]["name"], "one");
    for bad in [
        json!({"warehouse_id": WAREHOUSE, "statement": "SELECT 1", "wait_timeout": "3s"}),
        json!({"warehouse_id": WAREHOUSE, "statement": "SELECT 1", "disposition": "EXTERNAL_LINKS"}),
        json!({"warehouse_id": WAREHOUSE}),
    ] {
        let (s, v) = env.post("/api/2.0/sql/statements", bad).await;
        assert_eq!(
            (s, v["error_code"].as_str()),
            (400, Some("INVALID_PARAMETER_VALUE"))
        );
    }
    let (s, v) = env
        .post(
            "/api/2.0/sql/statements",
            json!({"warehouse_id": "nope", "statement": "SELECT 1"}),
        )
        .await;
    assert_eq!(
        (s, v["error_code"].as_str()),
        (404, Some("RESOURCE_DOES_NOT_EXIST"))
    );
    let (s, _) = env.get("/api/2.0/sql/statements/does-not-exist").await;
    assert_eq!(s, 404);
    env.emu.shutdown().await;
}

async fn failed(env: &crate::Env, sql: &str, params: Value) -> (String, String) {
    let v = env.sql(sql, params).await;
    assert_eq!(v["status"]["state"], "FAILED", "{sql}: {v}");
    (
        v["status"]["error"]["error_code"]
            .as_str()
            .unwrap()
            .to_string(),
        v["status"]["error"]["message"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

#[tokio::test]
async fn bad_sql_fails_like_spark() {
    let env = default_env().await;
    let (_, m) = failed(&env, "SELEC 1", json!([])).await;
    assert!(m.contains("PARSE_SYNTAX_ERROR"), "{m}");
    let (_, m) = failed(&env, "SELECT nope FROM support_bot_payload", json!([])).await;
    assert!(m.contains("UNRESOLVED_COLUMN") && m.contains("nope"), "{m}");
    let (_, m) = failed(
        &env,
        "SELECT request_time FROM support_bot_payload ORDER BY nope",
        json!([]),
    )
    .await;
    assert!(m.contains("UNRESOLVED_COLUMN"), "{m}");
    let (_, m) = failed(&env, "SELECT `nope` FROM support_bot_payload", json!([])).await;
    assert!(
        m.contains("UNRESOLVED_COLUMN"),
        "backtick unknown column must not become a string: {m}"
    );
    let (_, m) = failed(
        &env,
        "SELECT 1 FROM workspace.default.missing_payload",
        json!([]),
    )
    .await;
    assert!(m.contains("TABLE_OR_VIEW_NOT_FOUND"), "{m}");
    let (_, m) = failed(
        &env,
        "SELECT strftime('%s', request_time) FROM support_bot_payload",
        json!([]),
    )
    .await;
    assert!(m.contains("UNRESOLVED_ROUTINE"), "{m}");
    let (_, m) = failed(
        &env,
        "SELECT 1 FROM support_bot_payload WHERE request_time > datetime('now')",
        json!([]),
    )
    .await;
    assert!(m.contains("UNRESOLVED_ROUTINE"), "{m}");
    let (_, m) = failed(
        &env,
        "SELECT 1 FROM support_bot_payload WHERE databricks_request_id = :id",
        json!([]),
    )
    .await;
    assert!(m.contains("UNBOUND_SQL_PARAMETER"), "{m}");
    let (_, m) = failed(
        &env,
        "SELECT 1 FROM support_bot_payload WHERE databricks_request_id = ?",
        json!([]),
    )
    .await;
    assert!(m.contains("POSITIONAL"), "{m}");
    let (_, m) = failed(
        &env,
        "SELECT 1 FROM support_bot_payload WHERE request_time >= :t",
        json!([{"name": "t", "value": "soon", "type": "TIMESTAMP"}]),
    )
    .await;
    assert!(m.contains("INVALID_PARAMETER_VALUE"), "{m}");
    // Spark string literal in double quotes compares as a string.
    let v = env
        .sql(
            "SELECT count(*) FROM support_bot_payload WHERE status_code = 200 AND \"a\" = 'a'",
            json!([]),
        )
        .await;
    assert_eq!(v["status"]["state"], "SUCCEEDED", "{v}");
    env.emu.shutdown().await;
}

#[tokio::test]
async fn missing_select_fails_with_permission_denied() {
    let env = default_env().await;
    env.emu.revoke(
        "emulator-client",
        Privilege::Select {
            table: "workspace.default.support_bot_payload".into(),
        },
    );
    let (code, m) = failed(
        &env,
        "SELECT * FROM `workspace`.`default`.`support_bot_payload`",
        json!([]),
    )
    .await;
    assert_eq!(code, "BAD_REQUEST");
    assert!(m.starts_with("[INSUFFICIENT_PERMISSIONS]"), "{m}");
    assert!(
        m.contains("workspace.default.support_bot_payload") && m.contains("SELECT"),
        "{m}"
    );
    let v = env
        .sql(
            "SELECT * FROM `workspace`.`default`.`sales_assistant_payload` LIMIT 1",
            json!([]),
        )
        .await;
    assert_eq!(v["status"]["state"], "SUCCEEDED");
    env.emu.shutdown().await;
}

#[tokio::test]
async fn cancel_a_running_statement() {
    let env = default_env().await;
    let heavy = "SELECT count(*) FROM customers a, customers b, customers c, customers d, customers e, customers f, customers g";
    let (_, v) = env
        .post(
            "/api/2.0/sql/statements",
            json!({"warehouse_id": WAREHOUSE, "statement": heavy, "wait_timeout": "0s"}),
        )
        .await;
    let id = v["statement_id"].as_str().unwrap().to_string();
    let (s, _) = env
        .post(&format!("/api/2.0/sql/statements/{id}/cancel"), json!({}))
        .await;
    assert_eq!(s, 200);
    let (_, v) = env.get(&format!("/api/2.0/sql/statements/{id}")).await;
    assert_eq!(v["status"]["state"], "CANCELED");
    // The warehouse still answers (the reader connection was interrupted and released).
    let v = env.sql("SELECT count(*) FROM customers", json!([])).await;
    assert_eq!(env.all_rows(&v).await, vec![vec![json!("25")]]);
    env.emu.shutdown().await;
}

/// The INLINE cap counts the JSON the client receives, escapes included: 14 MiB of quotes are
/// 28 MiB as JSON_ARRAY cells, over the cap, though under any `byte_limit` of 20 MiB.
#[tokio::test]
async fn inline_limit_counts_escaped_json() {
    let env = default_env().await;
    let quotes = "\"".repeat(65_536);
    let q =
        |rows: usize| format!("SELECT '{quotes}' AS q FROM customers a, customers b LIMIT {rows}");
    let (code, m) = failed(&env, &q(225), json!([])).await;
    assert_eq!(code, "BAD_REQUEST");
    assert!(m.contains("25 MiB"), "{m}");
    let v = env.sql(&q(100), json!([])).await;
    assert_eq!(v["status"]["state"], "SUCCEEDED", "12.5 MiB as JSON fits");
    env.emu.shutdown().await;
}

#[tokio::test]
async fn inline_limit_25_mib() {
    let env = start(EmulatorConfig {
        agents: 1,
        rows: 60,
        payload_bytes: 400_000,
        ..Default::default()
    })
    .await;
    let (code, m) = failed(
        &env,
        "SELECT a.request FROM support_bot_payload a, customers b",
        json!([]),
    )
    .await;
    assert_eq!(code, "BAD_REQUEST");
    assert!(m.contains("25 MiB"), "{m}");
    let v = env
        .sql(
            "SELECT a.request FROM support_bot_payload a LIMIT 3",
            json!([]),
        )
        .await;
    assert_eq!(v["status"]["state"], "SUCCEEDED");
    env.emu.shutdown().await;
}

/// The Spark built-ins a cut read of a too-large row uses: `left` (characters), `octet_length`
/// (UTF-8 bytes), and `element_at` / `map_keys` over a MAP<STRING,STRING> column.
#[tokio::test]
async fn cut_read_builtins_behave_like_spark() {
    let env = default_env().await;
    let v = env
        .sql(
            "SELECT left('héllo', 2) AS a, left('abc', 0) AS b, octet_length('héllo') AS c, \
             length('héllo') AS d FROM `workspace`.`default`.`support_bot_payload` LIMIT 1",
            json!([]),
        )
        .await;
    assert_eq!(v["status"]["state"], "SUCCEEDED", "{v}");
    assert_eq!(
        v["result"]["data_array"][0],
        json!(["hé", "", "6", "5"]),
        "{v}"
    );
    let v = env
        .sql(
            "SELECT map_keys(attributes) AS k, element_at(attributes, 'mlflow.spanType') AS t, \
             element_at(attributes, 'absent') AS n FROM `workspace`.`default`.`agent_traces_otel_spans` LIMIT 1",
            json!([]),
        )
        .await;
    assert_eq!(v["status"]["state"], "SUCCEEDED", "{v}");
    let row = &v["result"]["data_array"][0];
    let keys: Vec<String> = serde_json::from_str(row[0].as_str().unwrap()).unwrap();
    assert!(keys.contains(&"mlflow.spanType".to_string()), "{row}");
    assert!(row[1].is_string() && row[2].is_null(), "{row}");
    env.emu.shutdown().await;
}
