//! One Akto host per agent, through the real discovery over HTTP: a serving endpoint and a
//! Databricks App whose names slug alike (`support_bot`, `support-bot`) get hosts of their own,
//! while an agent that collides with nothing keeps the host it always had.
//!
//! The emulator cannot lay out such names (its apps always match an agent's table), so a small
//! workspace that answers only the discovery routes stands in for it here.

mod common;

use axum::http::{StatusCode, Uri};
use axum::Json;
use databricks_shield::databricks::{Credentials, DatabricksClient};
use databricks_shield::discovery;
use databricks_shield::traffic::agent_host;
use serde_json::{json, Value};

fn endpoint(name: &str) -> Value {
    json!({"name": name, "task": "agent/v1/chat", "tags": []})
}

/// The discovery routes of a workspace with two agent endpoints (`support_bot`, `hr_helper`)
/// and one agent app (`support-bot`, granted a serving endpoint), no tables or models.
async fn workspace(uri: Uri) -> (StatusCode, Json<Value>) {
    let path = uri.path();
    let body = match path {
        "/api/2.1/unity-catalog/tables" => json!({"tables": []}),
        "/api/2.1/unity-catalog/functions" => json!({"functions": []}),
        "/api/2.1/unity-catalog/models" => json!({"registered_models": []}),
        "/api/2.0/serving-endpoints" => {
            json!({"endpoints": [endpoint("support_bot"), endpoint("hr_helper")]})
        }
        "/api/2.0/serving-endpoints/support_bot" => endpoint("support_bot"),
        "/api/2.0/serving-endpoints/hr_helper" => endpoint("hr_helper"),
        "/api/2.0/apps" => json!({"apps": [{
            "name": "support-bot",
            "url": "https://support-bot-1.aws.databricksapps.com",
            "resources": [{"name": "llm", "serving_endpoint": {"name": "databricks-llm"}}]
        }]}),
        "/api/2.0/mlflow/experiments/search" => json!({"experiments": []}),
        _ => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error_code": "NOT_FOUND", "message": format!("no route {path}")})),
            )
        }
    };
    (StatusCode::OK, Json(body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_and_an_app_with_colliding_names_land_in_two_collections() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().fallback(workspace))
            .await
            .unwrap()
    });
    let client = DatabricksClient::new(
        &url::Url::parse(&base).unwrap(),
        Credentials::Pat("test-token".to_string().into()),
        common::fast_retry(),
    )
    .unwrap();

    let inv = discovery::discover(&client, "c", "s", "").await.unwrap();
    let mut names: Vec<&str> = inv.agents.iter().map(|a| a.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["hr_helper", "support-bot", "support_bot"]);
    let ws = "adb-1.azuredatabricks.net";
    let endpoint_host = inv.agent_host("support_bot", ws);
    let app_host = inv.agent_host("support-bot", ws);
    assert_ne!(endpoint_host, app_host);
    for h in [&endpoint_host, &app_host] {
        assert!(h.starts_with("support-bot-"), "{h}");
        assert!(h.ends_with(".ai-agent.adb-1.azuredatabricks.net"), "{h}");
    }
    // The agent that collides with nothing keeps its collection.
    assert_eq!(inv.agent_host("hr_helper", ws), agent_host("hr_helper", ws));
    // The same workspace gives the same hosts.
    let again = discovery::discover(&client, "c", "s", "").await.unwrap();
    assert_eq!(again.host_labels, inv.host_labels);
    server.abort();
}
