//! Agent inventory records: one Akto record per agent, so Akto lists every agent (with its
//! models, task, tools and tables) even before it has any traffic, and again whenever its
//! configuration changes.
//!
//! The record is `GET /serving-endpoints/<endpoint>` (agents without an endpoint:
//! `GET /tables/<catalog.schema.table>`, or `GET /apps/<app>` for an app with no table) on the
//! agent's host; its response payload is the agent's inventory entry as JSON. Exactly once per
//! configuration: the unit id is `<agent>#<config hash>` in the state namespace `inventory`, where
//! the hash covers the whole entry (served models and versions, task, tools, tables, tags, app,
//! experiment), so a changed configuration is a new unit and an unchanged one is never re-sent.
//!
//! Pure apart from reading state: no I/O towards Databricks or the sink.

use serde_json::{json, Value};

use crate::collect::Prepared;
use crate::discovery::{Agent, Inventory};
use crate::json::JsonString;
use crate::state::StateStore;
use crate::traffic::host::{encode_segment, fnv1a64};
use crate::traffic::record::{fit_text, JsonObject, MAX_STRING_BYTES};
use crate::traffic::AktoRecord;

/// The state namespace of inventory records.
pub const NAMESPACE: &str = "inventory";

/// The inventory entry of one agent: what its record's response payload says.
pub fn entry(agent: &Agent, inv: &Inventory) -> Value {
    json!({
        "name": agent.name,
        "is_agent": agent.is_agent,
        "endpoint": agent.endpoint,
        "task": agent.task,
        "served_models": agent.models.iter().map(|m| json!({
            "name": m.name, "version": m.version, "kind": m.kind,
        })).collect::<Vec<_>>(),
        "inference_table": agent.table.as_ref().map(|t| json!({"name": t.full_name, "kind": t.kind})),
        "table_note": agent.table_note,
        "tools": inv.tools,
        "otel_span_tables": inv.otel_span_tables,
        "mlflow_experiment_id": agent.experiment_id,
        "app": agent.app,
        "tags": agent.tags,
        "catalog": inv.catalog,
        "schema": inv.schema,
    })
}

/// A stable hash of an entry (16 hex digits of FNV-1a 64 over its JSON).
pub fn config_hash(entry: &Value) -> String {
    format!("{:016x}", fnv1a64(entry.to_string().as_bytes()))
}

/// The request path of an agent's inventory record.
pub fn inventory_path(agent: &Agent) -> String {
    match (&agent.endpoint, &agent.table, &agent.app) {
        (Some(e), _, _) => format!("/serving-endpoints/{}", encode_segment(e)),
        (None, Some(t), _) => format!("/tables/{}", encode_segment(&t.full_name)),
        (None, None, Some(app)) => format!("/apps/{}", encode_segment(&app.name)),
        (None, None, None) => format!("/agents/{}", encode_segment(&agent.name)),
    }
}

/// The inventory record of one agent whose entry hashes to `hash`, for its Akto `host`
/// ([`Inventory::agent_host`]).
pub fn inventory_record(
    agent: &Agent,
    entry: &Value,
    hash: &str,
    host: &str,
    account_id: &str,
    now_us: i64,
) -> AktoRecord {
    let mut cut = 0u32;
    let mut h = JsonObject::default();
    h.set("host", host, &mut cut)
        .set("accept", "application/json", &mut cut);
    let mut rh = JsonObject::default();
    rh.set("content-type", "application/json", &mut cut).set(
        "x-databricks-shield-inventory-hash",
        hash,
        &mut cut,
    );
    let mut tag = JsonObject::default();
    tag.set("gen-ai", "Gen AI", &mut cut)
        .set("ai-agent", &agent.name, &mut cut)
        .set("inventory", "true", &mut cut);
    AktoRecord {
        path: inventory_path(agent),
        method: "GET".into(),
        request_headers: h.encode(),
        response_headers: rh.encode(),
        request_payload: JsonString::empty(),
        response_payload: fit_text(&entry.to_string(), MAX_STRING_BYTES, &mut cut),
        ip: "10.0.0.1".into(),
        dest_ip: String::new(),
        time: now_us
            .div_euclid(1_000_000)
            .clamp(1, i64::from(i32::MAX))
            .to_string(),
        status_code: "200".into(),
        status: "OK".into(),
        http_type: "HTTP/1.1".into(),
        akto_account_id: account_id.to_string(),
        akto_vxlan_id: "0".into(),
        is_pending: "false".into(),
        source: "MIRRORING".into(),
        tag: tag.encode(),
    }
}

/// Units for the agents whose current configuration was not delivered yet: one per agent, id
/// `<agent>#<config hash>`, to be sent in a [`crate::collect::Chunk`] with table [`NAMESPACE`].
/// A state read failure yields no units (WARN): the next cycle tries again.
pub fn inventory_units(
    inv: &Inventory,
    workspace_host: &str,
    account_id: &str,
    state: &StateStore,
    now_us: i64,
) -> Vec<Prepared> {
    let candidates: Vec<(&Agent, Value, String)> = inv
        .agents
        .iter()
        .map(|a| {
            let e = entry(a, inv);
            let h = config_hash(&e);
            (a, e, h)
        })
        .collect();
    let ids: Vec<String> = candidates
        .iter()
        .map(|(a, _, h)| format!("{}#{h}", a.name))
        .collect();
    let delivered = match state.delivered_among(NAMESPACE, ids.iter().map(String::as_str)) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("inventory records skipped this cycle: {e}");
            return Vec::new();
        }
    };
    candidates
        .into_iter()
        .zip(ids)
        .filter(|(_, id)| !delivered.contains(id))
        .map(|((a, e, h), id)| {
            let host = inv.agent_host(&a.name, workspace_host);
            let records = vec![inventory_record(a, &e, &h, &host, account_id, now_us)];
            Prepared {
                id,
                time_us: now_us,
                agent: a.name.clone(),
                host,
                records,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{InferenceTable, ServedModel, TableKind};

    fn agent() -> Agent {
        Agent {
            name: "support_bot".into(),
            endpoint: None,
            task: None,
            is_agent: true,
            models: vec![ServedModel {
                name: "c.s.m".into(),
                version: Some("2".into()),
                kind: "uc_model",
            }],
            table: Some(InferenceTable {
                full_name: "c.s.support_bot_payload".into(),
                kind: TableKind::AiGatewayPayload,
                columns: Vec::new(),
            }),
            table_note: None,
            tags: Default::default(),
            experiment_id: None,
            app: None,
        }
    }

    #[test]
    fn record_carries_the_entry_and_the_hash_follows_the_config() {
        let inv = Inventory {
            agents: vec![agent()],
            tools: vec!["c.s.lookup".into()],
            ..Default::default()
        };
        let e = entry(&inv.agents[0], &inv);
        let h = config_hash(&e);
        let r = inventory_record(
            &inv.agents[0],
            &e,
            &h,
            "support-bot.ai-agent.ws.example",
            "1000000",
            1_700_000_000_000_000,
        );
        crate::traffic::validate(&r).unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/tables/c.s.support_bot_payload");
        let body: Value = serde_json::from_str(&r.response_payload.text()).unwrap();
        assert_eq!(body["served_models"][0]["version"], "2");
        assert_eq!(body["tools"][0], "c.s.lookup");
        assert!(r.tag.contains("\"gen-ai\"") && r.tag.contains("\"ai-agent\":\"support_bot\""));
        let mut changed = inv.agents[0].clone();
        changed.models[0].version = Some("3".into());
        assert_ne!(config_hash(&entry(&changed, &inv)), h);
        assert_eq!(config_hash(&entry(&inv.agents[0], &inv)), h);
    }
}
