//! Discovery scope against the emulator: what one instance (DATABRICKS_CATALOG.DATABRICKS_SCHEMA
//! and DATABRICKS_PREFIX) reads, and what it leaves to another instance.
//!
//! - The prefix is compared case-insensitively, as Unity Catalog names are.
//! - An agent whose Unity Catalog anchor (its inference table) is outside the scope stays in the
//!   inventory with a note but gets no trace source: the instance of its prefix reads its traces.
//! - An app belongs with the inference tables of the agent endpoints it queries (those named
//!   after it first; any one in scope keeps it in scope), else with the tables named after it: one
//!   in this instance's scope (exactly or after its prefix) always wins, one outside (exactly or
//!   after a prefix of whole words) leaves it to another instance with a WARN. An experiment found
//!   by the name without the prefix is read for an agent whose own table is in scope; two
//!   instances whose own tables share that name both read it (the documented limit).
//! - The legacy Agent Framework's `*_payload_request_logs` / `*_payload_assessment_logs` tables
//!   (derived from an inference table) are not agents.
//! - A serving-endpoint listing or a UC function listing that is refused (403/404) costs a WARN
//!   naming the fix, not the whole discovery; an unavailable one (503) still fails it.
//! - Without EXECUTE the model and function lists are empty: the served models they leave out are
//!   named with the GRANT. A model's run in an experiment without CAN READ is named with the fix.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use databricks_emulator::Privilege;
use databricks_shield::collect::{Chunk, CollectOptions};
use databricks_shield::databricks::{ClientOptions, Credentials, DatabricksClient, RetryPolicy};
use databricks_shield::discovery::{self, Inventory};
use databricks_shield::state::StateStore;
use databricks_shield::traces;
use tokio::sync::mpsc;
use tracing::instrument::WithSubscriber;

/// Log lines written during a test, for asserting on WARNs.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Discovers `workspace.default` with `prefix`, returning the inventory and the log lines.
async fn discover_logged(
    c: &DatabricksClient,
    prefix: &str,
) -> (
    Result<Inventory, databricks_shield::databricks::DatabricksError>,
    String,
) {
    discover_in(c, "workspace", "default", prefix).await
}

/// Discovers `catalog.schema` with `prefix`, returning the inventory and the log lines.
async fn discover_in(
    c: &DatabricksClient,
    catalog: &str,
    schema: &str,
    prefix: &str,
) -> (
    Result<Inventory, databricks_shield::databricks::DatabricksError>,
    String,
) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let inv = discovery::discover(c, catalog, schema, prefix)
        .with_subscriber(subscriber)
        .await;
    (inv, logs.text())
}

fn endpoint_agent<'a>(inv: &'a Inventory, short: &str) -> &'a discovery::Agent {
    inv.agents
        .iter()
        .find(|a| a.endpoint.as_deref() == Some(&format!("agents_workspace-default-{short}")))
        .unwrap_or_else(|| panic!("endpoint agent {short} in {:?}", names(inv)))
}

fn names(inv: &Inventory) -> Vec<&str> {
    inv.agents.iter().map(|a| a.name.as_str()).collect()
}

/// The emulator's default workspace has agents `support_bot` (endpoint), `sales_assistant`
/// (endpoint), `hr_helper` (endpoint, legacy table, no experiment), `code_reviewer` (app) and
/// `travel_planner` (endpoint), their tables `<agent>_payload` all in `workspace.default`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_outside_the_prefix_are_listed_but_their_traces_are_not_read() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);

    // Upper case: Unity Catalog names are case-insensitive.
    let (inv, _) = discover_logged(&c, "SUPPORT_").await;
    let inv = inv.unwrap();
    assert_eq!(
        inv.tables_matching_prefix, 1,
        "{:?}",
        inv.filtered_out_examples
    );
    let support = endpoint_agent(&inv, "support_bot");
    assert_eq!(
        support.table.as_ref().map(|t| t.full_name.as_str()),
        Some("workspace.default.support_bot_payload")
    );
    assert!(support.experiment_id.is_some());

    // Agents whose inference table is in the schema but outside the prefix: listed, with a note
    // saying why, and no experiment.
    for short in ["sales_assistant", "travel_planner", "hr_helper"] {
        let a = endpoint_agent(&inv, short);
        assert!(a.table.is_none(), "{short}");
        assert_eq!(a.experiment_id, None, "{short}");
        let note = a.table_note.as_deref().unwrap_or_default();
        assert!(
            note.contains(&format!("workspace.default.{short}_payload"))
                && note.contains("out of scope"),
            "{short}: {note}"
        );
    }
    // The app writing a table outside the prefix: listed, out of scope, no experiment.
    let app = inv
        .agents
        .iter()
        .find(|a| a.app.as_ref().is_some_and(|p| p.name == "code-reviewer"))
        .unwrap_or_else(|| panic!("the app agent in {:?}", names(&inv)));
    assert_eq!(app.experiment_id, None);
    assert!(
        app.table_note
            .as_deref()
            .is_some_and(|n| n.contains("code_reviewer_payload") && n.contains("out of scope")),
        "{:?}",
        app.table_note
    );
    // `discover` shows why.
    let rendered = discovery::render_table(&inv);
    assert!(rendered.contains("out of scope"), "{rendered}");

    // (b) Only the agent in scope has a trace source.
    let sources = traces::trace_sources(&inv, "127.0.0.1");
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert_eq!(sources[0].agent, support.name);
    assert_eq!(
        Some(&sources[0].experiment_id),
        support.experiment_id.as_ref()
    );

    // (a) Its traces are read, on its host.
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let (tx, mut rx) = mpsc::channel::<Chunk>(1024);
    let opts = CollectOptions {
        lookback: Duration::from_secs(7200),
        ..Default::default()
    };
    let now = chrono::Utc::now().timestamp_micros();
    let stats = traces::TraceReader {
        client: &c,
        state: &state,
        opts: &opts,
        account_id: "1000000",
        workspace_host: "127.0.0.1",
        now_us: now,
    }
    .experiment(&sources[0], &tx)
    .await
    .unwrap();
    drop(tx);
    let mut units = 0;
    while let Ok(chunk) = rx.try_recv() {
        for u in &chunk.prepared {
            assert_eq!(u.agent, support.name);
            assert_eq!(u.host, inv.agent_host(&support.name, "127.0.0.1"));
            units += 1;
        }
    }
    assert!(units > 0, "the in-scope agent's traces are read");
    assert_eq!(stats.executions as usize, units);

    // Two instances split by prefix read disjoint experiments; the instance without a prefix
    // reads them all.
    let (sales, _) = discover_logged(&c, "sales_").await;
    let sales = sales.unwrap();
    let (all, _) = discover_logged(&c, "").await;
    let all = all.unwrap();
    let exps = |inv: &Inventory| -> BTreeSet<String> {
        traces::trace_sources(inv, "127.0.0.1")
            .into_iter()
            .map(|s| s.experiment_id)
            .collect()
    };
    let (support_exps, sales_exps, all_exps) = (exps(&inv), exps(&sales), exps(&all));
    assert_eq!(sales_exps.len(), 1);
    assert!(support_exps.is_disjoint(&sales_exps));
    assert_eq!(all_exps.len(), 4, "{all_exps:?}");
    assert!(support_exps.is_subset(&all_exps) && sales_exps.is_subset(&all_exps));
    assert!(all.agents.iter().all(|a| !a
        .table_note
        .as_deref()
        .unwrap_or_default()
        .contains("out of scope")));
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_endpoints_refused_leave_the_table_agents() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let (full, _) = discover_logged(&c, "").await;
    let full = full.unwrap();

    for kind in ["403", "404"] {
        emu.set_faults(&format!(
            "route=/api/2.0/serving-endpoints,method=GET,kind={kind},count=1"
        ))
        .unwrap();
        let (inv, logs) = discover_logged(&c, "").await;
        let inv = inv.unwrap_or_else(|e| panic!("{kind}: discovery goes on: {e}"));
        // Every inference table is still an agent, now known from its table alone.
        assert_eq!(inv.readable().count(), full.readable().count(), "{kind}");
        assert!(inv.agents.iter().all(|a| a.endpoint.is_none()), "{kind}");
        assert!(inv.llm_endpoints.is_empty());
        assert!(
            logs.contains("WARN")
                && logs.contains("cannot list serving endpoints")
                && logs.contains("CAN_VIEW"),
            "{kind}: {logs}"
        );
    }

    // Unavailable is not refused: discovery fails (the cycle is retried), it does not go on
    // with part of the workspace.
    emu.set_faults("route=/api/2.0/serving-endpoints,method=GET,kind=503,count=unlimited")
        .unwrap();
    let impatient = DatabricksClient::new(
        &url::Url::parse(&emu.base_url()).unwrap(),
        Credentials::OAuth {
            client_id: "emulator-client".into(),
            client_secret: SECRET.to_string().into(),
        },
        ClientOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            retry: RetryPolicy {
                max_elapsed: Duration::from_millis(300),
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(50),
            },
        },
    )
    .unwrap();
    let (err, _) = discover_logged(&impatient, "").await;
    let err = err.expect_err("a 503 fails discovery");
    assert!(err.is_retriable(), "{err}");
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uc_functions_or_models_refused_leave_the_rest_of_the_inventory() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let (full, _) = discover_logged(&c, "").await;
    let full = full.unwrap();
    assert!(!full.tools.is_empty() && !full.models.is_empty());

    emu.set_faults("route=/api/2.1/unity-catalog/functions,kind=403,count=unlimited")
        .unwrap();
    let (inv, logs) = discover_logged(&c, "").await;
    let inv = inv.unwrap_or_else(|e| panic!("discovery goes on without tools: {e}"));
    assert!(inv.tools.is_empty());
    assert_eq!(names(&inv), names(&full));
    assert_eq!(inv.models.len(), full.models.len());
    assert!(
        logs.contains("cannot list the UC functions of workspace.default")
            && logs.contains("GRANT EXECUTE ON SCHEMA `workspace`.`default` TO `emulator-client`"),
        "{logs}"
    );

    emu.set_faults("route=/api/2.1/unity-catalog/models,kind=404,count=1")
        .unwrap();
    let (inv, logs) = discover_logged(&c, "").await;
    let inv = inv.unwrap_or_else(|e| panic!("discovery goes on without models: {e}"));
    assert!(inv.models.is_empty());
    // A refused listing is not taken for a missing EXECUTE.
    assert!(inv.unlisted_models.is_empty(), "{:?}", inv.unlisted_models);
    assert_eq!(inv.tools, full.tools);
    assert_eq!(names(&inv), names(&full));
    assert!(
        logs.contains("cannot list the UC models of workspace.default"),
        "{logs}"
    );
    emu.shutdown().await;
}

/// Without EXECUTE on the schema, Unity Catalog lists no registered model, model version or
/// function (empty lists, not a refusal): discovery still finds every agent from its table and
/// endpoint, and names the served models the listing left out, with the GRANT, in a WARN and in
/// the inventory; with EXECUTE back all is as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_execute_the_served_models_not_listed_are_named_with_the_grant() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let (full, logs) = discover_logged(&c, "").await;
    let full = full.unwrap();
    assert!(!full.tools.is_empty() && !full.models.is_empty());
    assert!(
        full.unlisted_models.is_empty(),
        "{:?}",
        full.unlisted_models
    );
    assert!(!logs.contains("GRANT EXECUTE"), "{logs}");
    let model = full.models[0].full_name.clone();

    emu.revoke("emulator-client", Privilege::Execute);
    // The lists are empty, as Unity Catalog answers them; getting a model is refused.
    assert!(c
        .list_models("workspace", "default")
        .await
        .unwrap()
        .is_empty());
    assert!(c
        .list_functions("workspace", "default")
        .await
        .unwrap()
        .is_empty());
    assert!(c.list_model_versions(&model).await.unwrap().is_empty());

    let (inv, logs) = discover_logged(&c, "").await;
    let inv = inv.unwrap_or_else(|e| panic!("discovery goes on without EXECUTE: {e}"));
    assert_eq!(names(&inv), names(&full));
    assert!(inv.models.is_empty() && inv.tools.is_empty());
    for a in full.agents.iter().filter(|a| a.table.is_some()) {
        let now = inv.agents.iter().find(|b| b.name == a.name).unwrap();
        assert_eq!(now.table, a.table, "{}", a.name);
    }
    // Every UC model an endpoint serves, each named with its endpoint.
    let served: BTreeSet<String> = full
        .agents
        .iter()
        .flat_map(|a| a.models.iter())
        .filter(|m| m.kind == "uc_model")
        .map(|m| m.name.clone())
        .collect();
    assert!(served.len() >= 3, "{served:?}");
    assert_eq!(
        inv.unlisted_models.keys().cloned().collect::<BTreeSet<_>>(),
        served
    );
    let support = endpoint_agent(&inv, "support_bot");
    assert_eq!(
        inv.unlisted_models.get(&support.models[0].name),
        support.endpoint.as_ref()
    );
    assert!(
        logs.contains("Unity Catalog did not list the UC model(s)")
            && logs.contains(&format!("{} (served by endpoint", support.models[0].name))
            && logs.contains("GRANT EXECUTE ON SCHEMA `workspace`.`default` TO `emulator-client`;"),
        "{logs}"
    );
    // Shown by `discover` (the inventory's JSON).
    let json = serde_json::to_value(&inv).unwrap();
    assert!(json["unlisted_models"].is_object(), "{json}");

    emu.grant("emulator-client", Privilege::Execute);
    let (back, logs) = discover_logged(&c, "").await;
    let back = back.unwrap();
    assert!(
        back.unlisted_models.is_empty() && !logs.contains("GRANT EXECUTE"),
        "{logs}"
    );
    assert_eq!(back.tools, full.tools);
    assert_eq!(back.models.len(), full.models.len());
    emu.shutdown().await;
}

/// The run that logged an agent's model is in an experiment the principal may not read: MLflow
/// answers `runs/get` 403 and leaves the experiment out of `experiments/search`, so the agent
/// gets no experiment; discovery names the agent, the run and the fix (CAN READ) in a WARN and
/// in the inventory. With CAN READ back, the agent has its experiment again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_an_unreadable_experiment_is_named_with_the_fix() {
    let mut cfg = emulator_config();
    cfg.pat = Some("dapi-discovery-pat".into());
    let emu = emulator(cfg).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let (full, _) = discover_logged(&c, "").await;
    let full = full.unwrap();
    assert!(
        full.unreadable_runs.is_empty(),
        "{:?}",
        full.unreadable_runs
    );
    let support = endpoint_agent(&full, "support_bot");
    let exp = support
        .experiment_id
        .clone()
        .expect("support_bot's experiment");
    let others: Vec<(String, Option<String>)> = full
        .agents
        .iter()
        .filter(|a| a.name != support.name)
        .map(|a| (a.name.clone(), a.experiment_id.clone()))
        .collect();

    // Everyone (this client and the PAT) loses CAN READ on it.
    emu.revoke(
        "*",
        Privilege::ReadExperiment {
            experiment_id: exp.clone(),
        },
    );
    let (inv, logs) = discover_logged(&c, "").await;
    let inv = inv.unwrap();
    let now = endpoint_agent(&inv, "support_bot");
    assert_eq!(now.experiment_id, None);
    for (name, e) in &others {
        let a = inv.agents.iter().find(|a| &a.name == name).unwrap();
        assert_eq!(&a.experiment_id, e, "{name}");
    }
    assert_eq!(inv.unreadable_runs.len(), 1, "{:?}", inv.unreadable_runs);
    let r = &inv.unreadable_runs[0];
    assert_eq!(r.agent, now.name);
    assert_eq!(Some(&r.model), now.models.first().map(|m| &m.name));
    assert_eq!(r.experiment_id, None);
    assert!(
        logs.contains(&format!("agent {}: MLflow run {}", now.name, r.run_id))
            && logs.contains(&format!("CAN READ on the experiment of run {}", r.run_id))
            && logs.contains("traces are not read"),
        "{logs}"
    );

    // MLflow's answers: 403 with its JSON error shape, the experiment left out of the search,
    // its traces refused.
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("{}/api/2.0/mlflow/runs/get", emu.base_url()))
        .query(&[("run_id", r.run_id.as_str())])
        .bearer_auth("dapi-discovery-pat")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error_code"], "PERMISSION_DENIED", "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains(&exp)),
        "{body}"
    );
    let exps = c.search_experiments().await.unwrap();
    assert!(!exps.is_empty() && exps.iter().all(|e| e.experiment_id != exp));
    let traces = c.search_traces(&exp, "", 10, None).await;
    assert!(
        matches!(
            traces,
            Err(databricks_shield::databricks::DatabricksError::PermissionDenied { .. })
        ),
        "{:?}",
        traces.map(|_| ())
    );

    emu.grant(
        "*",
        Privilege::ReadExperiment {
            experiment_id: exp.clone(),
        },
    );
    let (back, logs) = discover_logged(&c, "").await;
    let back = back.unwrap();
    assert!(
        back.unreadable_runs.is_empty() && !logs.contains("CAN READ"),
        "{logs}"
    );
    assert_eq!(
        endpoint_agent(&back, "support_bot").experiment_id,
        Some(exp)
    );
    emu.shutdown().await;
}

/// Every experiment a set of instances reads, with how many of them read it.
fn readers(instances: &[&Inventory]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for inv in instances {
        for s in traces::trace_sources(inv, "127.0.0.1") {
            *out.entry(s.experiment_id).or_insert(0) += 1;
        }
    }
    out
}

fn app_agent<'a>(inv: &'a Inventory, app: &str) -> &'a discovery::Agent {
    inv.agents
        .iter()
        .find(|a| a.app.as_ref().is_some_and(|p| p.name == app))
        .unwrap_or_else(|| panic!("app {app} in {:?}", names(inv)))
}

/// The emulator with table prefix `prod_`: tables `prod_<agent>_payload`, its app `code-reviewer`
/// (and its experiments) named without the prefix. The instance `prod_` reads the app's traces;
/// the instance `dev_` (no table of its own) lists it as out of scope: before, it saw no table
/// named `code_reviewer` outside its prefix and read the app's experiment as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_named_after_a_prefixed_table_is_read_by_the_instance_of_that_prefix_only() {
    let mut cfg = emulator_config();
    cfg.table_prefix = "prod_".into();
    let emu = emulator(cfg).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let (prod, _) = discover_logged(&c, "prod_").await;
    let prod = prod.unwrap();
    let (dev, dev_logs) = discover_logged(&c, "dev_").await;
    let dev = dev.unwrap();

    let in_prod = app_agent(&prod, "code-reviewer");
    assert_eq!(
        in_prod.name, "prod_code_reviewer",
        "matched to its table agent"
    );
    let exp = in_prod.experiment_id.clone().expect("prod_ reads the app");
    assert!(!prod.is_out_of_scope(in_prod));

    let in_dev = app_agent(&dev, "code-reviewer");
    assert_eq!(in_dev.experiment_id, None);
    assert!(dev.is_out_of_scope(in_dev));
    let note = in_dev.table_note.as_deref().unwrap_or_default();
    assert!(
        note.contains("workspace.default.prod_code_reviewer_payload")
            && note.contains("out of scope"),
        "{note}"
    );

    // The dev_ instance says so in a WARN naming the table and the fix.
    assert!(
        dev_logs.contains(
            "app code-reviewer is named after inference table(s) \
             workspace.default.prod_code_reviewer_payload outside this instance's scope"
        ) && dev_logs.contains("DATABRICKS_PREFIX"),
        "{dev_logs}"
    );

    // Across the two instances, every experiment is read once, the app's by prod_.
    let read = readers(&[&prod, &dev]);
    assert!(read.values().all(|n| *n == 1), "{read:?}");
    assert_eq!(read.get(&exp), Some(&1));
    assert!(traces::trace_sources(&dev, "127.0.0.1").is_empty());
    emu.shutdown().await;
}

/// A workspace laid out by the test that answers only the discovery routes: the emulator has a
/// single schema and table prefix, while a split needs one agent under two of them.
#[derive(Default)]
struct Workspace {
    /// Schema -> names of its AI Gateway inference tables (catalog `c`).
    tables: BTreeMap<&'static str, Vec<&'static str>>,
    /// Agent endpoints with the full name of the inference table each logs to.
    endpoints: Vec<(&'static str, &'static str)>,
    /// `(app name, serving endpoints it queries, its experiment id)`.
    apps: Vec<(&'static str, &'static [&'static str], &'static str)>,
    /// `(experiment id, experiment name)`.
    experiments: Vec<(&'static str, &'static str)>,
}

const GATEWAY_COLUMNS: &[&str] = &[
    "databricks_request_id",
    "request_date",
    "client_request_id",
    "request_time",
    "status_code",
    "request",
    "response",
];

fn endpoint_json(name: &str, table: &str) -> serde_json::Value {
    let mut parts = table.splitn(3, '.');
    let (c, s, t) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    serde_json::json!({
        "name": name,
        "task": "agent/v1/responses",
        "tags": [],
        "ai_gateway": {"inference_table_config": {
            "catalog_name": c, "schema_name": s,
            "table_name_prefix": t.strip_suffix("_payload").unwrap_or(t), "enabled": true,
        }},
    })
}

async fn answer(
    axum::extract::State(ws): axum::extract::State<Arc<Workspace>>,
    uri: axum::http::Uri,
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    use serde_json::json;
    let query: BTreeMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let path = uri.path();
    let body = match path {
        "/api/2.1/unity-catalog/tables" => {
            let schema = query.get("schema_name").cloned().unwrap_or_default();
            let tables: Vec<serde_json::Value> = ws
                .tables
                .get(schema.as_str())
                .into_iter()
                .flatten()
                .map(|t| {
                    json!({
                        "name": t, "full_name": format!("c.{schema}.{t}"),
                        "columns": GATEWAY_COLUMNS.iter().map(|c| json!({"name": c})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({ "tables": tables })
        }
        "/api/2.1/unity-catalog/functions" => json!({"functions": []}),
        "/api/2.1/unity-catalog/models" => json!({"registered_models": []}),
        "/api/2.0/serving-endpoints" => json!({"endpoints": ws
            .endpoints
            .iter()
            .map(|(n, t)| endpoint_json(n, t))
            .collect::<Vec<_>>()}),
        "/api/2.0/apps" => json!({"apps": ws.apps.iter().map(|(name, eps, exp)| {
            let mut resources = vec![json!({"name": "experiment", "experiment": {"experiment_id": exp}})];
            for (i, ep) in eps.iter().enumerate() {
                resources.push(json!({"name": format!("agent{i}"), "serving_endpoint": {"name": ep}}));
            }
            json!({"name": name, "resources": resources})
        }).collect::<Vec<_>>()}),
        "/api/2.0/mlflow/experiments/search" => json!({"experiments": ws
            .experiments
            .iter()
            .map(|(id, name)| json!({"experiment_id": id, "name": name, "tags": []}))
            .collect::<Vec<_>>()}),
        _ => match path
            .strip_prefix("/api/2.0/serving-endpoints/")
            .and_then(|n| ws.endpoints.iter().find(|(e, _)| *e == n))
        {
            Some((n, t)) => endpoint_json(n, t),
            None => {
                return (
                    axum::http::StatusCode::NOT_FOUND,
                    axum::Json(
                        json!({"error_code": "NOT_FOUND", "message": format!("no route {path}")}),
                    ),
                )
            }
        },
    };
    (axum::http::StatusCode::OK, axum::Json(body))
}

/// Serves `ws` on a loopback port: the client and the server's task.
async fn serve(ws: Workspace) -> (DatabricksClient, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(Arc::new(ws));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let client = DatabricksClient::new(
        &url::Url::parse(&base).unwrap(),
        Credentials::Pat("test-token".to_string().into()),
        fast_retry(),
    )
    .unwrap();
    (client, server)
}

/// One schema, one instance `prod_`, the tables of `dev_` (no instance: the prefix is a filter)
/// named alike. A table in scope named after the app or experiment always wins: before, the
/// shorter `dev_support_bot_payload` took the app `support-bot` and the experiment named
/// `code_reviewer`, and no instance read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_keeps_the_app_and_experiment_of_its_table_next_to_an_excluded_one() {
    let (c, server) = serve(Workspace {
        tables: BTreeMap::from([(
            "d1",
            vec![
                "dev_code_reviewer_payload",
                "dev_support_bot_payload",
                "prod_code_reviewer_payload",
                "prod_support_bot_payload",
            ],
        )]),
        apps: vec![("support-bot", &[], "930")],
        experiments: vec![("931", "/Users/owner@example.com/code_reviewer")],
        ..Default::default()
    })
    .await;
    let (prod, logs) = discover_in(&c, "c", "d1", "prod_").await;
    let prod = prod.unwrap();

    let app = app_agent(&prod, "support-bot");
    assert_eq!(app.name, "prod_support_bot", "matched to its table agent");
    assert!(!prod.is_out_of_scope(app));
    assert_eq!(app.experiment_id.as_deref(), Some("930"));
    let reviewer = prod
        .agents
        .iter()
        .find(|a| a.name == "prod_code_reviewer")
        .unwrap_or_else(|| panic!("prod_code_reviewer in {:?}", names(&prod)));
    assert_eq!(reviewer.experiment_id.as_deref(), Some("931"));
    assert_eq!(
        readers(&[&prod]),
        BTreeMap::from([("930".into(), 1), ("931".into(), 1)])
    );
    assert!(prod.agents.iter().all(|a| !prod.is_out_of_scope(a)));
    assert!(
        !logs.contains("out of scope") && !logs.contains("left to"),
        "{logs}"
    );
    server.abort();
}

/// Instance `prod_`, an app `assistant` whose only table named after it is outside the prefix,
/// after whole words (`test_hr_assistant_payload`): out of scope, as before, but no longer
/// silently: a WARN names the table, who reads the app and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_left_to_a_table_outside_the_prefix_is_announced() {
    let (c, server) = serve(Workspace {
        tables: BTreeMap::from([(
            "d1w",
            vec!["prod_support_bot_payload", "test_hr_assistant_payload"],
        )]),
        apps: vec![("assistant", &[], "940")],
        ..Default::default()
    })
    .await;
    let (prod, logs) = discover_in(&c, "c", "d1w", "prod_").await;
    let prod = prod.unwrap();
    let app = app_agent(&prod, "assistant");
    assert!(prod.is_out_of_scope(app) && app.experiment_id.is_none());
    assert!(
        app.table_note
            .as_deref()
            .is_some_and(|n| n.contains("c.d1w.test_hr_assistant_payload")),
        "{:?}",
        app.table_note
    );
    assert!(
        logs.contains("WARN")
            && logs.contains(
                "app assistant is named after inference table(s) c.d1w.test_hr_assistant_payload"
            )
            && logs.contains("left to the instance whose DATABRICKS_PREFIX covers")
            && logs.contains("Fix: if this instance should read them, set DATABRICKS_PREFIX")
            && logs.contains("serving endpoint to the app's resources"),
        "{logs}"
    );
    // One line, no run of spaces from a lost line continuation.
    assert!(!logs.contains("   "), "{logs}");
    server.abort();
}

/// One schema, instances `prod_` and `dev_`, each agent under both prefixes: the app and the
/// experiment named without the prefix match each instance's own table, so both read them (the
/// documented limit, as before this session's anchoring by name); neither leaves them out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefixes_whose_own_tables_share_a_name_both_read_it() {
    let (c, server) = serve(Workspace {
        tables: BTreeMap::from([(
            "s",
            vec![
                "dev_code_reviewer_payload",
                "dev_support_bot_payload",
                "prod_code_reviewer_payload",
                "prod_support_bot_payload",
            ],
        )]),
        apps: vec![("code-reviewer", &[], "900")],
        experiments: vec![("901", "/Users/owner@example.com/support_bot")],
        ..Default::default()
    })
    .await;
    let (prod, _) = discover_in(&c, "c", "s", "prod_").await;
    let prod = prod.unwrap();
    let (dev, _) = discover_in(&c, "c", "s", "dev_").await;
    let dev = dev.unwrap();

    let read = readers(&[&prod, &dev]);
    assert_eq!(
        read,
        BTreeMap::from([("900".into(), 2), ("901".into(), 2)]),
        "prod: {:?}, dev: {:?}",
        traces::trace_sources(&prod, "h"),
        traces::trace_sources(&dev, "h")
    );
    assert_eq!(app_agent(&prod, "code-reviewer").name, "prod_code_reviewer");
    assert_eq!(app_agent(&dev, "code-reviewer").name, "dev_code_reviewer");
    server.abort();
}

/// Catalog `c`, instances `c.prod`, `c.guardrails` and `c.dev`. An app querying its own agent
/// endpoint and a shared guardrail endpoint belongs with the one named after it: before, the
/// first table by name (the guardrail's) decided and `c.prod` left the app out. An app named
/// after neither is in scope wherever one of them is, with a WARN naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_querying_several_agent_endpoints_is_in_scope_where_its_own_is() {
    let (c, server) = serve(Workspace {
        tables: BTreeMap::from([
            ("prod", vec!["bot_payload"]),
            ("guardrails", vec!["safety_payload"]),
        ]),
        endpoints: vec![
            ("agents_bot", "c.prod.bot_payload"),
            ("agents_guard", "c.guardrails.safety_payload"),
        ],
        apps: vec![
            ("bot", &["agents_guard", "agents_bot"], "950"),
            ("front-desk", &["agents_bot", "agents_guard"], "951"),
        ],
        ..Default::default()
    })
    .await;
    let (prod, prod_logs) = discover_in(&c, "c", "prod", "").await;
    let prod = prod.unwrap();
    let (guard, _) = discover_in(&c, "c", "guardrails", "").await;
    let guard = guard.unwrap();
    let (dev, _) = discover_in(&c, "c", "dev", "").await;
    let dev = dev.unwrap();

    let bot = app_agent(&prod, "bot");
    assert!(!prod.is_out_of_scope(bot));
    assert_eq!(bot.experiment_id.as_deref(), Some("950"));
    let in_guard = app_agent(&guard, "bot");
    assert!(guard.is_out_of_scope(in_guard) && in_guard.experiment_id.is_none());
    assert!(
        in_guard
            .table_note
            .as_deref()
            .is_some_and(|n| n.contains("agents_bot") && n.contains("c.prod.bot_payload")),
        "{:?}",
        in_guard.table_note
    );
    // Named after neither: read where either table is (the WARN says so), not in c.dev.
    let read = readers(&[&prod, &guard, &dev]);
    assert_eq!(read.get("950"), Some(&1), "{read:?}");
    assert_eq!(read.get("951"), Some(&2), "{read:?}");
    assert!(dev.is_out_of_scope(app_agent(&dev, "front-desk")));
    assert!(
        prod_logs.contains(
            "app front-desk queries agent endpoints whose inference tables lie in several scopes"
        ) && prod_logs.contains("agents_guard -> c.guardrails.safety_payload")
            && prod_logs.contains("Fix: name the app after its own agent"),
        "{prod_logs}"
    );
    assert!(
        prod_logs.contains("app bot queries agent endpoints") && !prod_logs.contains("   "),
        "{prod_logs}"
    );
    server.abort();
}

/// Catalog `c`, instances `c.prod` and `c.dev` (no prefix). An app querying an agent endpoint
/// belongs with that endpoint's inference table, which every instance sees in the endpoint
/// listing: before, `c.dev` could not see `c.prod.support_bot_payload` and read the app's
/// traces too. An app with no such resource is anchored by its name only where its table is
/// visible: the other schema's instance reads it as well (the documented limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_split_reads_an_app_querying_an_agent_endpoint_once() {
    let (c, server) = serve(Workspace {
        tables: BTreeMap::from([
            (
                "prod",
                vec!["support_bot_payload", "travel_planner_payload"],
            ),
            ("dev", vec!["hr_helper_payload"]),
        ]),
        endpoints: vec![
            ("agents_support_bot", "c.prod.support_bot_payload"),
            ("agents_hr_helper", "c.dev.hr_helper_payload"),
        ],
        apps: vec![
            ("support-bot", &["agents_support_bot"], "910"),
            ("hr-chat", &["agents_hr_helper"], "911"),
            ("travel-planner", &[], "912"),
        ],
        ..Default::default()
    })
    .await;
    let (prod, _) = discover_in(&c, "c", "prod", "").await;
    let prod = prod.unwrap();
    let (dev, _) = discover_in(&c, "c", "dev", "").await;
    let dev = dev.unwrap();

    let read = readers(&[&prod, &dev]);
    assert_eq!(read.get("910"), Some(&1), "{read:?}");
    assert_eq!(read.get("911"), Some(&1), "{read:?}");
    assert_eq!(
        app_agent(&prod, "support-bot").experiment_id.as_deref(),
        Some("910")
    );
    assert_eq!(
        app_agent(&dev, "hr-chat").experiment_id.as_deref(),
        Some("911")
    );
    for (inv, app, table) in [
        (&dev, "support-bot", "c.prod.support_bot_payload"),
        (&prod, "hr-chat", "c.dev.hr_helper_payload"),
    ] {
        let a = app_agent(inv, app);
        assert!(inv.is_out_of_scope(a) && a.experiment_id.is_none(), "{app}");
        let note = a.table_note.as_deref().unwrap_or_default();
        assert!(
            note.contains("agents_") && note.contains(table) && note.contains("out of scope"),
            "{note}"
        );
    }
    // No endpoint resource: `c.prod` matches the app to its table; `c.dev` cannot see that table.
    assert_eq!(app_agent(&prod, "travel-planner").name, "travel_planner");
    assert_eq!(read.get("912"), Some(&2), "{read:?}");
    server.abort();
}

/// Older `databricks-agents` `deploy()` also created `<model>_payload_request_logs` (with every
/// column of a legacy inference table) and `<model>_payload_assessment_logs`, both derived from
/// the payload table: read as agents, every request would be sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_agent_framework_request_and_assessment_logs_are_not_agents() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let tables = c.list_tables("workspace", "default").await.unwrap();
    let derived: Vec<_> = tables
        .iter()
        .filter(|t| {
            t.name.ends_with("_payload_request_logs")
                || t.name.ends_with("_payload_assessment_logs")
        })
        .collect();
    assert_eq!(derived.len(), 2, "the emulator lists both");
    for t in &derived {
        assert_eq!(
            discovery::classify(t),
            discovery::TableKind::Other,
            "{}",
            t.name
        );
    }
    // The request logs have the legacy columns; the name alone rules them out, in any case.
    let mut logs = (*derived
        .iter()
        .find(|t| t.name.ends_with("_request_logs"))
        .unwrap())
    .clone();
    logs.name = logs.name.to_ascii_uppercase();
    assert_eq!(discovery::classify(&logs), discovery::TableKind::Other);

    let (inv, _) = discover_logged(&c, "").await;
    let inv = inv.unwrap();
    assert!(
        inv.readable()
            .all(|(_, t)| t.full_name.ends_with("_payload")),
        "{:?}",
        names(&inv)
    );
    // One agent per payload table, hr_helper's read from its payload table.
    assert_eq!(inv.agents.len(), 5, "{:?}", names(&inv));
    assert_eq!(
        endpoint_agent(&inv, "hr_helper")
            .table
            .as_ref()
            .map(|t| t.full_name.as_str()),
        Some("workspace.default.hr_helper_payload")
    );
    emu.shutdown().await;
}
