//! Agent inventory records: one Akto record per agent, so Akto lists every agent (with its
//! models, task, tools and tables) even before it has any traffic, and again whenever its
//! configuration changes.
//!
//! The record is `GET /serving-endpoints/<endpoint>` (agents without an endpoint:
//! `GET /tables/<catalog.schema.table>`, or `GET /apps/<app>` for an app with no table) on the
//! agent's host; its response payload is the agent's inventory entry as JSON. Once per change of
//! the agent's description: the unit id is `<agent>#<config hash>` (`<agent>@<record path>#...`
//! when two agents share a name) in the state namespace
//! `inventory`, where the hash covers the whole entry (served models and versions, task, tools,
//! tables, tags, app, experiment) and the agent's Akto host. A record is sent when that hash is
//! not the one of the agent's LAST delivered record (the newest `<agent>#...` id by delivery
//! time): an unchanged agent is never re-sent, and an agent that changes back to an earlier
//! description (A -> B -> A), or moves to another host (a new host collision), is sent again, so
//! Akto's latest inventory record of an agent is always its current description.
//!
//! Only the agents in this instance's scope get a record: an agent discovery marks out of scope
//! ([`Inventory::is_out_of_scope`]) is described by the instance of its catalog.schema and
//! prefix, which knows its inference table and tools; a record from here would carry this
//! instance's catalog, schema and tools and no table, one more conflicting description per
//! instance.
//!
//! Pure apart from reading state: no I/O towards Databricks or the sink.

use std::collections::HashMap;

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

/// A stable hash of an entry and the Akto `host` its record goes to (16 hex digits of FNV-1a 64
/// over the entry's JSON and the host): an agent whose host changes gets a new record on it.
pub fn config_hash(entry: &Value, host: &str) -> String {
    let mut bytes = entry.to_string().into_bytes();
    bytes.push(0);
    bytes.extend_from_slice(host.as_bytes());
    format!("{:016x}", fnv1a64(&bytes))
}

/// The last delivered hash of each agent: for every id `<agent>#<hash>` of [`NAMESPACE`], in
/// delivery-time order (ties by id), the later one wins.
fn last_sent(state: &StateStore) -> Result<HashMap<String, String>, crate::state::StateError> {
    let mut last = HashMap::new();
    for id in state.ids_in_range(NAMESPACE, i64::MIN, i64::MAX)? {
        if let Some((agent, hash)) = id.rsplit_once('#') {
            last.insert(agent.to_string(), hash.to_string());
        }
    }
    Ok(last)
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
    // A GET has no body, and Akto releases up to 018552b4 drop an empty body sent as JSON
    // (`content-type` application/json or missing): text/plain keeps it.
    h.set("host", host, &mut cut)
        .set("accept", "application/json", &mut cut)
        .set("content-type", "text/plain", &mut cut);
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

/// Units for the agents in scope whose current description (entry and host) is not the one last
/// delivered for them (agents out of scope get none): one per such agent, id `<agent>#<config hash>`, to be sent in a
/// [`crate::collect::Chunk`] with table [`NAMESPACE`]. The units' time is `now_us`, or just after
/// the newest inventory record delivered when that is later (it orders an agent's records); the
/// records carry `now_us`. A state read failure yields no units (WARN): the next cycle tries again.
pub fn inventory_units(
    inv: &Inventory,
    workspace_host: &str,
    account_id: &str,
    state: &StateStore,
    now_us: i64,
) -> Vec<Prepared> {
    // The units' time orders each agent's records: after every record delivered so far, even
    // when two cycles share a clock reading or the clock went back.
    let read = last_sent(state).and_then(|l| Ok((l, state.cursor(NAMESPACE)?)));
    let (last, time_us) = match read {
        Ok((l, cursor)) => (
            l,
            cursor.map_or(now_us, |c| now_us.max(c.time_us.saturating_add(1))),
        ),
        Err(e) => {
            tracing::warn!("inventory records skipped this cycle: {e}");
            return Vec::new();
        }
    };
    // Two agents of one name (an endpoint and a table-only agent, say) are told apart by their
    // record's path, or each cycle would re-send the one that was not last.
    let in_scope = || inv.agents.iter().filter(|a| !inv.is_out_of_scope(a));
    let mut names: HashMap<&str, usize> = HashMap::new();
    for a in in_scope() {
        *names.entry(a.name.as_str()).or_default() += 1;
    }
    in_scope()
        .filter_map(|a| {
            let host = inv.agent_host(&a.name, workspace_host);
            let e = entry(a, inv);
            let h = config_hash(&e, &host);
            let key = if names.get(a.name.as_str()).is_some_and(|n| *n > 1) {
                format!("{}@{}", a.name, inventory_path(a))
            } else {
                a.name.clone()
            };
            if last.get(&key) == Some(&h) {
                return None;
            }
            let records = vec![inventory_record(a, &e, &h, &host, account_id, now_us)];
            Some(Prepared {
                id: format!("{key}#{h}"),
                time_us,
                agent: a.name.clone(),
                host,
                records,
            })
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
        let h = config_hash(&e, "support-bot.ai-agent.ws.example");
        let r = inventory_record(
            &inv.agents[0],
            &e,
            &h,
            "support-bot.ai-agent.ws.example",
            "1000000",
            1_700_000_000_000_000,
        );
        crate::traffic::validate(&r).unwrap();
        // Kept by Akto as built (an empty GET body as text): nothing to rewrite on the way out.
        assert!(matches!(
            crate::traffic::for_akto_runtime(&r),
            std::borrow::Cow::Borrowed(_)
        ));
        assert!(r
            .request_headers
            .contains("\"content-type\":\"text/plain\""));
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/tables/c.s.support_bot_payload");
        let body: Value = serde_json::from_str(&r.response_payload.text()).unwrap();
        assert_eq!(body["served_models"][0]["version"], "2");
        assert_eq!(body["tools"][0], "c.s.lookup");
        assert!(r.tag.contains("\"gen-ai\"") && r.tag.contains("\"ai-agent\":\"support_bot\""));
        let mut changed = inv.agents[0].clone();
        changed.models[0].version = Some("3".into());
        let host = "support-bot.ai-agent.ws.example";
        assert_ne!(config_hash(&entry(&changed, &inv), host), h);
        assert_eq!(config_hash(&entry(&inv.agents[0], &inv), host), h);
        // The same entry on another host is another record.
        assert_ne!(
            config_hash(
                &entry(&inv.agents[0], &inv),
                "support-bot-1a2b.ai-agent.ws.example"
            ),
            h
        );
    }
}
