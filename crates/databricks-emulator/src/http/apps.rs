//! Databricks Apps routes: `GET /api/2.0/apps` (paged with `page_size` / `page_token`) and
//! `GET /api/2.0/apps/{name}`, in the documented shape (`name`, `url`, `description`,
//! `app_status`, `compute_status`, `resources`, ...). Agents deployed as apps (layout kind `App`)
//! use the foundation-model endpoint, a SQL warehouse and their MLflow experiment; a dashboard
//! app that is not an agent is listed too.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::{err, ok, page};
use crate::layout::AgentKind;
use crate::payload::Rng;
use crate::state::Shared;

/// The app name of an agent: Databricks app names are lowercase letters, digits and `-`.
pub(crate) fn app_name(agent: &str) -> String {
    agent.replace('_', "-")
}

fn app_json(shared: &Shared, name: &str, description: &str, resources: Value, k: u64) -> Value {
    let l = &shared.layout;
    let mut rng = Rng::new(shared.cfg.seed ^ 0xA995 ^ k);
    let created = chrono::DateTime::from_timestamp_millis(shared.started_ms - 86_400_000 * 7)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    json!({
        "name": name,
        "id": rng.uuid(),
        "description": description,
        "url": format!("https://{name}-{}.aws.databricksapps.com", l.workspace_id),
        "app_status": {"state": "RUNNING", "message": "App has status: App is running"},
        "compute_status": {"state": "ACTIVE", "message": "App compute is running."},
        "resources": resources,
        "active_deployment": {
            "deployment_id": rng.hex(32),
            "source_code_path": format!("/Workspace/Users/owner@example.com/apps/{name}"),
            "mode": "SNAPSHOT",
            "status": {"state": "SUCCEEDED", "message": "App started successfully"},
            "create_time": created,
        },
        "default_source_code_path": format!("/Workspace/Users/owner@example.com/apps/{name}"),
        "service_principal_client_id": rng.uuid(),
        "service_principal_name": format!("app-{name}"),
        "creator": "owner@example.com",
        "create_time": created,
        "update_time": created,
        "updater": "owner@example.com",
    })
}

fn all_apps(shared: &Shared) -> Vec<Value> {
    let l = &shared.layout;
    let mut apps: Vec<Value> = l
        .agents
        .iter()
        .enumerate()
        .filter(|(_, a)| a.kind == AgentKind::App)
        .map(|(i, a)| {
            let mut resources = vec![
                json!({"name": "llm", "description": "Chat model",
                    "serving_endpoint": {"name": "databricks-meta-llama-3-3-70b-instruct", "permission": "CAN_QUERY"}}),
                json!({"name": "sql-warehouse", "sql_warehouse": {"id": "4b9f1c2d3e5a6001", "permission": "CAN_USE"}}),
            ];
            if let Some(e) = l.experiments.iter().find(|e| e.agent == i) {
                resources.push(json!({"name": "experiment",
                    "experiment": {"experiment_id": e.id, "permission": "CAN_EDIT"}}));
            }
            app_json(
                shared,
                &app_name(&a.name),
                &format!("Agent {} (deployed as a Databricks App)", a.name),
                json!(resources),
                i as u64,
            )
        })
        .collect();
    apps.push(app_json(
        shared,
        "ops-dashboard",
        "Operations dashboard (not an agent)",
        json!([{"name": "sql-warehouse", "sql_warehouse": {"id": "4b9f1c2d3e5a6001", "permission": "CAN_USE"}}]),
        u64::MAX,
    ));
    apps.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    apps
}

pub(crate) async fn list(
    State(shared): State<Arc<Shared>>,
    Query(mut q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(size) = q.remove("page_size") {
        q.insert("max_results".into(), size);
    }
    let apps = all_apps(&shared);
    let (s, e, next) = match page(apps.len(), &q, 100, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut v = json!({});
    if e > s {
        v["apps"] = json!(apps[s..e]);
    }
    if let Some(t) = next {
        v["next_page_token"] = json!(t);
    }
    ok(v)
}

pub(crate) async fn get_one(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Response {
    match all_apps(&shared)
        .into_iter()
        .find(|a| a["name"] == name.as_str())
    {
        Some(a) => ok(a),
        None => err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("App with name {name} does not exist."),
        ),
    }
}
