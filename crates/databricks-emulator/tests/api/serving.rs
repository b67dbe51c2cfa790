use serde_json::Value;

use crate::default_env;

fn find<'a>(eps: &'a [Value], name: &str) -> &'a Value {
    eps.iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no endpoint {name}"))
}

#[tokio::test]
async fn endpoint_kinds_and_inference_configs() {
    let env = default_env().await;
    let (s, v) = env.get("/api/2.0/serving-endpoints").await;
    assert_eq!(s, 200);
    let eps = v["endpoints"].as_array().unwrap();
    // 5 agents: 4 with endpoints (agent 3 is an app) + foundation + external.
    assert_eq!(eps.len(), 6);
    let r = find(eps, "agents_workspace-default-support_bot");
    assert_eq!(r["task"], "agent/v1/responses");
    assert_eq!(r["state"]["ready"], "READY");
    assert_eq!(r["state"]["config_update"], "NOT_UPDATING");
    assert!(r["creator"].is_string() && r["creation_timestamp"].is_i64() && r["id"].is_string());
    assert!(r["tags"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["key"].is_string() && t["value"].is_string()));
    let itc = &r["ai_gateway"]["inference_table_config"];
    assert_eq!(itc["catalog_name"], "workspace");
    assert_eq!(itc["schema_name"], "default");
    assert_eq!(itc["table_name_prefix"], "support_bot");
    assert_eq!(itc["enabled"], true);
    let se = &r["config"]["served_entities"][0];
    assert_eq!(se["entity_name"], "workspace.default.support_bot");
    assert!(se["entity_version"].is_string() && se["name"].is_string());
    assert_eq!(
        find(eps, "agents_workspace-default-sales_assistant")["task"],
        "agent/v2/chat"
    );
    let legacy = find(eps, "agents_workspace-default-hr_helper");
    assert_eq!(legacy["task"], "agent/v1/chat");
    assert!(
        legacy["config"].get("auto_capture_config").is_none(),
        "legacy config must not be in the list"
    );
    assert!(legacy.get("ai_gateway").is_none());
    assert!(eps
        .iter()
        .all(|e| e["name"] != "agents_workspace-default-code_reviewer"));
    let fm = find(eps, "databricks-meta-llama-3-3-70b-instruct");
    assert_eq!(fm["task"], "llm/v1/chat");
    assert!(fm["config"]["served_entities"][0]["foundation_model"]["name"].is_string());
    let ext = eps
        .iter()
        .find(|e| !e["config"]["served_entities"][0]["external_model"].is_null())
        .unwrap();
    assert_eq!(
        ext["config"]["served_entities"][0]["external_model"]["provider"],
        "openai"
    );
    assert_eq!(
        ext["config"]["served_entities"][0]["external_model"]["name"],
        "gpt-4o"
    );

    let (s, v) = env
        .get("/api/2.0/serving-endpoints/agents_workspace-default-hr_helper")
        .await;
    assert_eq!(s, 200);
    let acc = &v["config"]["auto_capture_config"];
    assert_eq!(acc["catalog_name"], "workspace");
    assert_eq!(acc["table_name_prefix"], "hr_helper");
    assert_eq!(acc["enabled"], true);
    let (s, v) = env.get("/api/2.0/serving-endpoints/nope").await;
    assert_eq!(
        (s, v["error_code"].as_str()),
        (404, Some("RESOURCE_DOES_NOT_EXIST"))
    );

    env.emu
        .set_endpoint_tag("agents_workspace-default-support_bot", "owner", "new-team");
    let (_, v) = env
        .get("/api/2.0/serving-endpoints/agents_workspace-default-support_bot")
        .await;
    assert!(v["tags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["key"] == "owner" && t["value"] == "new-team"));
    assert_eq!(v["config"]["config_version"], 2);
    env.emu.shutdown().await;
}
