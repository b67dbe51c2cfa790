use databricks_emulator::{EmulatorConfig, Privilege};
use serde_json::Value;

use crate::{default_env, start};

#[tokio::test]
async fn tables_paginate_with_empty_pages() {
    let env = start(EmulatorConfig {
        agents: 8,
        table_prefix: "p_".into(),
        ..Default::default()
    })
    .await;
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut empty_pages = 0;
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages < 100, "pagination does not end");
        let mut path = "/api/2.1/unity-catalog/tables?catalog_name=workspace&schema_name=default&max_results=3&include_browse=true".to_string();
        if let Some(t) = &token {
            path.push_str(&format!("&page_token={t}"));
        }
        let (s, v) = env.get(&path).await;
        assert_eq!(s, 200, "{v}");
        match v.get("tables") {
            None => empty_pages += 1,
            Some(Value::Array(a)) => {
                assert!(!a.is_empty() && a.len() <= 3);
                for t in a {
                    names.push(t["name"].as_str().unwrap().to_string());
                }
            }
            Some(other) => panic!("tables is not an array: {other}"),
        }
        match v["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert!(empty_pages >= 2, "expected empty pages, got {empty_pages}");
    // 8 agents + customers + view + otel spans + the outside-prefix distractor.
    assert_eq!(names.len(), 12, "{names:?}");
    assert!(names.contains(&"p_support_bot_payload".to_string()));
    assert!(names.contains(&"legacy_bot_payload".to_string()));
    assert!(names.contains(&"p_customers".to_string()));
    assert!(names.contains(&"p_agent_traces_otel_spans".to_string()));
    env.emu.shutdown().await;
}

#[tokio::test]
async fn table_info_shapes() {
    let env = default_env().await;
    let (s, v) = env
        .get("/api/2.1/unity-catalog/tables/workspace.default.support_bot_payload")
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["name"], "support_bot_payload");
    assert_eq!(v["full_name"], "workspace.default.support_bot_payload");
    assert_eq!(v["catalog_name"], "workspace");
    assert_eq!(v["schema_name"], "default");
    assert_eq!(v["table_type"], "MANAGED");
    assert_eq!(v["data_source_format"], "DELTA");
    assert!(v["created_at"].as_i64().is_some() && v["updated_at"].as_i64().is_some());
    assert!(v["owner"].is_string());
    let cols = v["columns"].as_array().unwrap();
    let names: Vec<&str> = cols.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "databricks_request_id",
            "request_date",
            "client_request_id",
            "request_time",
            "status_code",
            "sampling_fraction",
            "execution_duration_ms",
            "request",
            "response",
            "logging_error_codes",
            "served_entity_id",
            "requester"
        ]
    );
    assert_eq!(cols[3]["type_name"], "TIMESTAMP");
    assert_eq!(cols[3]["position"], 3);
    assert_eq!(cols[9]["type_text"], "array<string>");
    assert_eq!(cols[0]["nullable"], false);
    // Legacy table schema.
    let (_, v) = env
        .get("/api/2.1/unity-catalog/tables/workspace.default.hr_helper_payload")
        .await;
    let names: Vec<&str> = v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"timestamp_ms")
            && names.contains(&"request_metadata")
            && names.contains(&"date")
    );
    let (_, v) = env
        .get("/api/2.1/unity-catalog/tables/workspace.default.customer_emails_v")
        .await;
    assert_eq!(v["table_type"], "VIEW");
    let (s, v) = env
        .get("/api/2.1/unity-catalog/tables/workspace.default.nope")
        .await;
    assert_eq!(s, 404);
    assert_eq!(v["error_code"], "TABLE_DOES_NOT_EXIST");
    env.emu.shutdown().await;
}

#[tokio::test]
async fn schemas_summaries_models_functions() {
    let env = default_env().await;
    let (s, v) = env
        .get("/api/2.1/unity-catalog/schemas?catalog_name=workspace")
        .await;
    assert_eq!(s, 200);
    let names: Vec<&str> = v["schemas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"default"));
    assert_eq!(v["schemas"][0]["catalog_name"], "workspace");
    let (_, v) = env.get("/api/2.1/unity-catalog/table-summaries?catalog_name=workspace&schema_name_pattern=default&table_name_pattern=%25_payload").await;
    let t = v["tables"].as_array().unwrap();
    assert_eq!(t.len(), 5);
    assert!(t
        .iter()
        .all(|x| x["full_name"].as_str().unwrap().ends_with("_payload")
            && x["table_type"] == "MANAGED"));
    let (_, v) = env
        .get("/api/2.1/unity-catalog/models?catalog_name=workspace&schema_name=default")
        .await;
    let models = v["registered_models"].as_array().unwrap();
    // Agents 0,1,2 and 4 have endpoints (agent 3 is an app).
    assert_eq!(models.len(), 4);
    assert_eq!(models[0]["full_name"], "workspace.default.support_bot");
    for k in [
        "name",
        "catalog_name",
        "schema_name",
        "owner",
        "created_at",
        "updated_at",
        "aliases",
    ] {
        assert!(!models[0][k].is_null(), "{k}");
    }
    let (s, v) = env
        .get("/api/2.1/unity-catalog/models/workspace.default.support_bot/versions")
        .await;
    assert_eq!(s, 200);
    let vs = v["model_versions"].as_array().unwrap();
    assert!(!vs.is_empty() && vs.len() <= 3);
    assert_eq!(vs[0]["status"], "READY");
    assert_eq!(vs[0]["run_id"].as_str().unwrap().len(), 32);
    assert!(vs[0]["source"]
        .as_str()
        .unwrap()
        .contains(vs[0]["run_id"].as_str().unwrap()));
    let (_, v) = env
        .get("/api/2.1/unity-catalog/functions?catalog_name=workspace&schema_name=default")
        .await;
    let f = v["functions"].as_array().unwrap();
    assert!(f
        .iter()
        .any(|x| x["full_name"] == "workspace.default.lookup_order"));
    assert!(f[0]["input_params"]["parameters"].is_array());
    assert!(f[0]["data_type"].is_string() && f[0]["routine_body"].is_string());
    env.emu.shutdown().await;
}

#[tokio::test]
async fn unknown_namespace_and_permission_denials() {
    let env = default_env().await;
    let (s, v) = env
        .get("/api/2.1/unity-catalog/tables?catalog_name=nope&schema_name=default")
        .await;
    assert_eq!(
        (s, v["error_code"].as_str()),
        (404, Some("CATALOG_DOES_NOT_EXIST"))
    );
    let (s, v) = env
        .get("/api/2.1/unity-catalog/tables?catalog_name=workspace&schema_name=nope")
        .await;
    assert_eq!(
        (s, v["error_code"].as_str()),
        (404, Some("SCHEMA_DOES_NOT_EXIST"))
    );
    let (s, v) = env.get("/api/2.1/unity-catalog/tables?catalog_name=workspace&schema_name=default&max_results=-1").await;
    assert_eq!(
        (s, v["error_code"].as_str()),
        (400, Some("INVALID_PARAMETER_VALUE"))
    );
    let (s, _) = env.get("/api/2.1/unity-catalog/tables?catalog_name=workspace&schema_name=default&page_token=garbage").await;
    assert_eq!(s, 400);

    env.emu.revoke("emulator-client", Privilege::UseSchema);
    let (s, v) = env
        .get("/api/2.1/unity-catalog/tables?catalog_name=workspace&schema_name=default")
        .await;
    assert_eq!(
        (s, v["error_code"].as_str()),
        (403, Some("PERMISSION_DENIED"))
    );
    assert!(v["message"].as_str().unwrap().contains("USE SCHEMA"));
    env.emu.grant("emulator-client", Privilege::UseSchema);
    env.emu.revoke("emulator-client", Privilege::UseCatalog);
    let (s, v) = env
        .get("/api/2.1/unity-catalog/schemas?catalog_name=workspace")
        .await;
    assert_eq!(
        (s, v["error_code"].as_str()),
        (403, Some("PERMISSION_DENIED"))
    );
    env.emu.grant("emulator-client", Privilege::UseCatalog);
    let (s, _) = env
        .get("/api/2.1/unity-catalog/tables?catalog_name=workspace&schema_name=default")
        .await;
    assert_eq!(s, 200);
    env.emu.shutdown().await;
}
