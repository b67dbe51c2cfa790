//! Agent inventory records against the emulator: one per agent, valid for Akto, carrying the
//! agent's entry; never again once delivered; again (for that agent only) after a configuration
//! change; none for an agent out of the instance's scope (the instance of its scope sends it).

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

/// What Akto's latest inventory record of an agent says must be its current description: an
/// agent whose description goes back to an earlier one (A -> B -> A) is sent again, and so is an
/// agent whose Akto host changes; an unchanged agent is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_record_again_when_the_description_goes_back_or_the_host_changes() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let discover = || discovery::discover(&c, "workspace", "default", "");
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    // One clock reading for every cycle: the order of an agent's records must not depend on it.
    let now = chrono::Utc::now().timestamp_micros();
    let units = |inv: &discovery::Inventory| {
        inventory::inventory_units(inv, "127.0.0.1", "1000000", &state, now)
    };

    let inv_a = discover().await.unwrap();
    let first = units(&inv_a);
    assert_eq!(first.len(), inv_a.agents.len());
    deliver(&state, &first);
    assert!(units(&inv_a).is_empty());

    let agent = inv_a
        .agents
        .iter()
        .find(|a| a.endpoint.is_some() && a.is_agent)
        .unwrap();
    let endpoint = agent.endpoint.as_deref().unwrap();
    let team = agent.tags.get("team").cloned().unwrap();
    let id_a = first
        .iter()
        .find(|u| u.agent == agent.name)
        .unwrap()
        .id
        .clone();

    // A -> B: B is sent.
    emu.set_endpoint_tag(endpoint, "team", "security");
    let inv_b = discover().await.unwrap();
    let b = units(&inv_b);
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].agent, agent.name);
    assert_ne!(b[0].id, id_a);
    deliver(&state, &b);
    assert!(units(&inv_b).is_empty());

    // B -> A: A was delivered before, yet it is not the last record of the agent: sent again.
    emu.set_endpoint_tag(endpoint, "team", &team);
    let inv_a2 = discover().await.unwrap();
    let a2 = units(&inv_a2);
    assert_eq!(a2.len(), 1, "{a2:?}");
    assert_eq!(a2[0].agent, agent.name);
    assert_eq!(a2[0].id, id_a, "the same description has the same hash");
    let body = a2[0].records[0].response_payload.text();
    assert!(body.contains(&format!("\"team\":\"{team}\"")), "{body}");
    assert!(a2[0].time_us > b[0].time_us, "ordered after B");
    deliver(&state, &a2);
    assert!(units(&inv_a2).is_empty());

    // The same description on another host (say, a new agent collides with it): sent again,
    // with the new host; the other agents are not.
    let mut moved = inv_a2.clone();
    moved
        .host_labels
        .insert(agent.name.clone(), "renamed-label-1234".into());
    let m = units(&moved);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].agent, agent.name);
    assert_eq!(m[0].host, moved.agent_host(&agent.name, "127.0.0.1"));
    assert_ne!(m[0].host, inv_a2.agent_host(&agent.name, "127.0.0.1"));
    let h: serde_json::Value = serde_json::from_str(&m[0].records[0].request_headers).unwrap();
    assert_eq!(h["host"], m[0].host.as_str());
    deliver(&state, &m);
    assert!(units(&moved).is_empty());
    // And back to the old host: again.
    assert_eq!(units(&inv_a2).len(), 1);

    // A state store reopened knows the same: nothing new for the current description.
    drop(state);
    let state = StateStore::open(dir.path(), false).unwrap();
    assert!(inventory::inventory_units(&moved, "127.0.0.1", "1000000", &state, now).is_empty());
    emu.shutdown().await;
}

/// Two agents of one name (an endpoint, and a table-only agent whose table the endpoint no
/// longer claims) are two records, each sent once: before, each cycle re-sent the one whose
/// description was not the last one delivered under that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_of_one_name_are_each_sent_once() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let mut inv = discovery::discover(&c, "workspace", "default", "")
        .await
        .unwrap();
    let with_table = inv
        .agents
        .iter()
        .find(|a| a.endpoint.is_some() && a.table.is_some())
        .expect("an endpoint agent with a table")
        .clone();
    let mut table_only = with_table.clone();
    table_only.endpoint = None;
    table_only.task = None;
    let mut endpoint_only = with_table;
    endpoint_only.table = None;
    inv.agents.retain(|a| a.name != endpoint_only.name);
    inv.agents.push(endpoint_only);
    inv.agents.push(table_only);
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let now = chrono::Utc::now().timestamp_micros();
    let first = inventory::inventory_units(&inv, "127.0.0.1", "1000000", &state, now);
    assert_eq!(first.len(), inv.agents.len());
    deliver(&state, &first);
    for cycle in 1..=3 {
        let again = inventory::inventory_units(&inv, "127.0.0.1", "1000000", &state, now + cycle);
        assert!(
            again.is_empty(),
            "cycle {cycle} re-sent {:?}",
            again.iter().map(|u| &u.id).collect::<Vec<_>>()
        );
    }
    emu.shutdown().await;
}

/// Two instances split by prefix (`prod_`, whose tables the emulator has, and `dev_`): every
/// agent gets its record from one of them, the one whose scope holds it. Before, `dev_` also sent
/// one for each agent it lists as out of scope, with its own catalog, schema and tools and no
/// inference table: a conflicting description in each agent's Akto collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_out_of_scope_get_their_record_from_the_instance_of_their_scope_only() {
    let mut cfg = emulator_config();
    cfg.table_prefix = "prod_".into();
    let emu = emulator(cfg).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let prod = discovery::discover(&c, "workspace", "default", "prod_")
        .await
        .unwrap();
    let dev = discovery::discover(&c, "workspace", "default", "dev_")
        .await
        .unwrap();
    // dev_ lists the workspace's agents (endpoints and the app), all out of its scope.
    let out: Vec<&str> = dev
        .agents
        .iter()
        .filter(|a| dev.is_out_of_scope(a))
        .map(|a| a.name.as_str())
        .collect();
    assert!(!out.is_empty() && out.len() == dev.agents.len(), "{out:?}");
    assert!(prod.agents.iter().all(|a| !prod.is_out_of_scope(a)));

    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now().timestamp_micros();
    let units = |inv: &discovery::Inventory, state: &StateStore| {
        inventory::inventory_units(inv, "127.0.0.1", "1000000", state, now)
    };
    let prod_state = StateStore::open(&dir.path().join("prod"), false).unwrap();
    let dev_state = StateStore::open(&dir.path().join("dev"), false).unwrap();
    let from_prod = units(&prod, &prod_state);
    let from_dev = units(&dev, &dev_state);
    assert!(
        from_dev.is_empty(),
        "{:?}",
        from_dev.iter().map(|u| &u.id).collect::<Vec<_>>()
    );
    assert_eq!(from_prod.len(), prod.agents.len());
    // Each listed agent is described once, by prod_, with its inference table.
    let mut described: Vec<&str> = from_prod.iter().map(|u| u.agent.as_str()).collect();
    described.sort_unstable();
    described.dedup();
    assert_eq!(described.len(), from_prod.len());
    for u in &from_prod {
        let body: serde_json::Value =
            serde_json::from_str(&u.records[0].response_payload.text()).unwrap();
        assert!(body["inference_table"]["name"]
            .as_str()
            .is_some_and(|t| t.starts_with("workspace.default.prod_")));
    }
    for a in &dev.agents {
        let twin = a.endpoint.as_ref().map_or_else(
            || prod.agents.iter().any(|p| p.app == a.app),
            |e| prod.agents.iter().any(|p| p.endpoint.as_ref() == Some(e)),
        );
        assert!(twin, "{} is described by prod_", a.name);
    }
    emu.shutdown().await;
}
