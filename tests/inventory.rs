//! Agent inventory records against the emulator: one per agent, valid for Akto, carrying the
//! agent's entry; never again once delivered; again (for that agent only) after a configuration
//! change.

mod common;

use common::*;
use databricks_shield::discovery;
use databricks_shield::inventory::{self, NAMESPACE};
use databricks_shield::state::{DeliveredRow, StateStore};

fn deliver(state: &StateStore, units: &[databricks_shield::collect::Prepared]) {
    let rows: Vec<DeliveredRow<'_>> = units
        .iter()
        .map(|u| DeliveredRow {
            table: NAMESPACE,
            id: &u.id,
            time_us: u.time_us,
            by_id: true,
        })
        .collect();
    state.commit_delivered(&rows).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_records_once_and_again_after_a_config_change() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let inv = discovery::discover(&c, "workspace", "default", "")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let now = chrono::Utc::now().timestamp_micros();

    let first = inventory::inventory_units(&inv, "127.0.0.1", "1000000", &state, now);
    assert_eq!(first.len(), inv.agents.len());
    for u in &first {
        assert_eq!(u.records.len(), 1);
        let r = &u.records[0];
        databricks_shield::traffic::validate(r).unwrap();
        assert_eq!(r.method, "GET");
        assert!(u.id.starts_with(&format!("{}#", u.agent)));
        let a = inv.agents.iter().find(|a| a.name == u.agent).unwrap();
        match &a.endpoint {
            Some(e) => assert_eq!(r.path, format!("/serving-endpoints/{e}")),
            None => assert!(r.path.starts_with("/tables/workspace.default.")),
        }
        let body: serde_json::Value = serde_json::from_str(&r.response_payload.text()).unwrap();
        assert_eq!(body["name"], a.name.as_str());
        assert_eq!(body["tools"].as_array().unwrap().len(), inv.tools.len());
        assert!(r.tag.contains("\"gen-ai\":\"Gen AI\"") && r.tag.contains("\"ai-agent\""));
        let h: serde_json::Value = serde_json::from_str(&r.request_headers).unwrap();
        assert_eq!(h["host"], u.host.as_str());
        // The host discovery decided for the agent (one Akto collection per agent).
        assert_eq!(u.host, inv.agent_host(&u.agent, "127.0.0.1"));
    }
    // Served models with versions reach Akto.
    assert!(first.iter().any(|u| u.records[0]
        .response_payload
        .text()
        .contains("\"uc_model\"")));

    // Not delivered yet: offered again. Delivered: never again.
    assert_eq!(
        inventory::inventory_units(&inv, "127.0.0.1", "1000000", &state, now).len(),
        first.len()
    );
    deliver(&state, &first);
    let inv2 = discovery::discover(&c, "workspace", "default", "")
        .await
        .unwrap();
    assert!(inventory::inventory_units(&inv2, "127.0.0.1", "1000000", &state, now).is_empty());

    // A configuration change re-sends that agent only.
    let changed = inv
        .agents
        .iter()
        .find(|a| a.endpoint.is_some() && a.is_agent)
        .unwrap();
    emu.set_endpoint_tag(changed.endpoint.as_deref().unwrap(), "team", "security");
    let inv3 = discovery::discover(&c, "workspace", "default", "")
        .await
        .unwrap();
    let again = inventory::inventory_units(&inv3, "127.0.0.1", "1000000", &state, now);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].agent, changed.name);
    assert!(!first.iter().any(|u| u.id == again[0].id));
    assert!(again[0].records[0]
        .response_payload
        .text()
        .contains("security"));
    deliver(&state, &again);
    assert!(inventory::inventory_units(&inv3, "127.0.0.1", "1000000", &state, now).is_empty());
    emu.shutdown().await;
}
