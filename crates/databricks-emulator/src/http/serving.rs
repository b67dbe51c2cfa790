//! Model Serving routes: list and get serving endpoints. Agent endpoints carry AI Gateway
//! inference table configs; the legacy `auto_capture_config` is only visible in the GET of one
//! endpoint, as in Databricks.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::{err, ok};
use crate::layout::{AgentKind, EndpointDef, Served};
use crate::state::Shared;

fn endpoint_json(shared: &Shared, ep: &EndpointDef, detail: bool) -> Value {
    let l = &shared.layout;
    let prefix = shared.cfg.table_prefix.to_lowercase();
    let served = match &ep.served {
        Served::Agent(i) => {
            let a = &l.agents[*i];
            json!({
                "name": format!("{}-{}", a.name, a.model_versions),
                "entity_name": a.model_full_name,
                "entity_version": a.model_versions.to_string(),
                "workload_size": "Small", "scale_to_zero_enabled": true,
                "state": {"deployment": "DEPLOYMENT_READY", "deployment_state_message": ""},
                "creator": ep.creator, "creation_timestamp": ep.creation_timestamp,
            })
        }
        Served::Foundation { model } => json!({
            "name": model,
            "foundation_model": {"name": model, "display_name": "Meta Llama 3.3 70B Instruct",
                "docs": "https://docs.databricks.com/machine-learning/foundation-models/index.html",
                "description": "Pay-per-token foundation model"},
            "creator": ep.creator, "creation_timestamp": ep.creation_timestamp,
        }),
        Served::External { provider, model } => json!({
            "name": format!("{provider}-{model}"),
            "external_model": {"provider": provider, "name": model, "task": "llm/v1/chat",
                "openai_config": {"openai_api_key": "{{secrets/llm/openai_key}}"}},
            "creator": ep.creator, "creation_timestamp": ep.creation_timestamp,
        }),
    };
    let served_name = served["name"].clone();
    let mut config = json!({
        "served_entities": [served],
        "traffic_config": {"routes": [{"served_model_name": served_name, "served_entity_name": served_name, "traffic_percentage": 100}]},
        "config_version": ep.config_version,
    });
    let mut v = json!({
        "name": ep.name,
        "id": ep.id,
        "creator": ep.creator,
        "creation_timestamp": ep.creation_timestamp,
        "last_updated_timestamp": ep.creation_timestamp + ep.config_version as i64 * 1000,
        "state": {"ready": "READY", "config_update": "NOT_UPDATING"},
        "task": ep.task,
        "tags": ep.tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>(),
        "permission_level": "CAN_MANAGE",
        "route_optimized": false,
    });
    if let Served::Agent(i) = ep.served {
        let a = &l.agents[i];
        let tcfg = json!({
            "catalog_name": l.catalog, "schema_name": l.schema,
            "table_name_prefix": format!("{prefix}{}", a.name), "enabled": true,
        });
        match a.kind {
            AgentKind::Responses | AgentKind::ChatAgent => {
                v["ai_gateway"] = json!({"inference_table_config": tcfg, "usage_tracking_config": {"enabled": true}});
            }
            AgentKind::LegacyChat if detail => {
                let mut c = tcfg;
                c["state"] = json!({"payload_table": {"name": format!("{prefix}{}_payload", a.name), "status": "ACTIVE"}});
                config["auto_capture_config"] = c;
            }
            _ => {}
        }
    }
    v["config"] = config;
    v
}

pub(crate) async fn list(State(shared): State<Arc<Shared>>) -> Response {
    let eps = shared.endpoints.read().unwrap_or_else(|e| e.into_inner());
    let items: Vec<Value> = eps
        .iter()
        .map(|e| endpoint_json(&shared, e, false))
        .collect();
    ok(json!({"endpoints": items}))
}

pub(crate) async fn get_one(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Response {
    let eps = shared.endpoints.read().unwrap_or_else(|e| e.into_inner());
    match eps.iter().find(|e| e.name == name) {
        Some(e) => ok(endpoint_json(&shared, e, true)),
        None => err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Serving endpoint with name '{name}' does not exist."),
        ),
    }
}
