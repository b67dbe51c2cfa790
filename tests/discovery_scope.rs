//! Discovery scope against the emulator: what one instance (DATABRICKS_CATALOG.DATABRICKS_SCHEMA
//! and DATABRICKS_PREFIX) reads, and what it leaves to another instance.
//!
//! - The prefix is compared case-insensitively, as Unity Catalog names are.
//! - An agent whose Unity Catalog anchor (its inference table) is outside the scope stays in the
//!   inventory with a note but gets no trace source: two instances split by prefix never read the
//!   same MLflow traces.
//! - A serving-endpoint listing or a UC function listing that is refused (403/404) costs a WARN
//!   naming the fix, not the whole discovery; an unavailable one (503) still fails it.

mod common;

use std::collections::BTreeSet;
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
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let inv = discovery::discover(c, "workspace", "default", prefix)
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
            && logs.contains("GRANT EXECUTE ON SCHEMA workspace.default TO `emulator-client`"),
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
