//! Discovery scope against the emulator: what one instance (DATABRICKS_CATALOG.DATABRICKS_SCHEMA
//! and DATABRICKS_PREFIX) reads, and what it leaves to another instance.
//!
//! - The prefix is compared case-insensitively, as Unity Catalog names are.
//! - An agent whose Unity Catalog anchor (its inference table) is outside the scope stays in the
//!   inventory with a note but gets no trace source: the instance of its prefix reads its traces.
//! - An app belongs with the inference table of the agent endpoint it queries, else with the
//!   table named after it, exactly or after a table prefix; instances split by prefix (or by
//!   schema, for an app querying an agent endpoint) agree on which of them reads its traces, and
//!   an experiment found by the name without the prefix is read by one instance only.
//! - The legacy Agent Framework's `*_payload_request_logs` / `*_payload_assessment_logs` tables
//!   (derived from an inference table) are not agents.
//! - A serving-endpoint listing or a UC function listing that is refused (403/404) costs a WARN
//!   naming the fix, not the whole discovery; an unavailable one (503) still fails it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
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
    let stats = traces::collect_experiment(&c, &state, &sources[0], &opts, "1000000", now, &tx)
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
    assert_eq!(inv.tools, full.tools);
    assert_eq!(names(&inv), names(&full));
    assert!(
        logs.contains("cannot list the UC models of workspace.default"),
        "{logs}"
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
    let (dev, _) = discover_logged(&c, "dev_").await;
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
    /// `(app name, serving endpoint it queries, its experiment id)`.
    apps: Vec<(&'static str, Option<&'static str>, &'static str)>,
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
        "/api/2.0/apps" => json!({"apps": ws.apps.iter().map(|(name, ep, exp)| {
            let mut resources = vec![json!({"name": "experiment", "experiment": {"experiment_id": exp}})];
            if let Some(ep) = ep {
                resources.push(json!({"name": "agent", "serving_endpoint": {"name": ep}}));
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

/// One schema, instances `prod_` and `dev_`, each agent under both prefixes. The app
/// `code-reviewer` and the experiment named `support_bot` match both instances' tables once the
/// prefix is stripped: before, each instance claimed them and read their traces. Now the name
/// belongs to one table (the shortest name, then the first by name), the same in both instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_agent_under_two_prefixes_has_its_traces_read_once() {
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
        apps: vec![("code-reviewer", None, "900")],
        experiments: vec![
            ("901", "/Users/owner@example.com/support_bot"),
            ("902", "/Users/owner@example.com/prod_code_reviewer"),
        ],
        ..Default::default()
    })
    .await;
    let (prod, prod_logs) = discover_in(&c, "c", "s", "prod_").await;
    let prod = prod.unwrap();
    let (dev, dev_logs) = discover_in(&c, "c", "s", "dev_").await;
    let dev = dev.unwrap();

    let read = readers(&[&prod, &dev]);
    assert_eq!(
        read,
        BTreeMap::from([("900".into(), 1), ("901".into(), 1), ("902".into(), 1)]),
        "prod: {:?}, dev: {:?}",
        traces::trace_sources(&prod, "h"),
        traces::trace_sources(&dev, "h")
    );
    let exp = |inv: &Inventory, agent: &str| {
        inv.agents
            .iter()
            .find(|a| a.name == agent)
            .unwrap_or_else(|| panic!("{agent} in {:?}", names(inv)))
            .experiment_id
            .clone()
    };
    // `dev_support_bot` is shorter than `prod_support_bot`: the name `support_bot` is its.
    assert_eq!(exp(&dev, "dev_support_bot").as_deref(), Some("901"));
    assert_eq!(exp(&prod, "prod_support_bot"), None);
    // An experiment named exactly after a prefixed agent is that agent's.
    assert_eq!(exp(&prod, "prod_code_reviewer").as_deref(), Some("902"));
    // The app belongs with dev_code_reviewer_payload: matched there, out of scope in prod_.
    assert_eq!(app_agent(&dev, "code-reviewer").name, "dev_code_reviewer");
    assert_eq!(exp(&dev, "dev_code_reviewer").as_deref(), Some("900"));
    let in_prod = app_agent(&prod, "code-reviewer");
    assert!(prod.is_out_of_scope(in_prod) && in_prod.experiment_id.is_none());
    assert!(
        in_prod
            .table_note
            .as_deref()
            .is_some_and(|n| n.contains("c.s.dev_code_reviewer_payload")),
        "{:?}",
        in_prod.table_note
    );
    // The ambiguity is a WARN naming both tables and the fix (logged once per process).
    let logs = format!("{prod_logs}{dev_logs}");
    assert!(
        logs.contains("app code-reviewer is named after 2 inference tables")
            && logs.contains("c.s.prod_code_reviewer_payload")
            && logs.contains("Fix:"),
        "{logs}"
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
            ("support-bot", Some("agents_support_bot"), "910"),
            ("hr-chat", Some("agents_hr_helper"), "911"),
            ("travel-planner", None, "912"),
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
