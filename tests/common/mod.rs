//! Shared test harness: an emulated workspace, the strict Akto stand-in, and a connector wired to
//! both over real loopback sockets.
#![allow(dead_code)]

pub mod echo;
pub mod kafka;
pub mod sasl;
pub mod tls;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use akto_standin::{StandIn, StandInConfig};
use databricks_emulator::{Emulator, EmulatorConfig};
use databricks_shield::databricks::{ClientOptions, Credentials, DatabricksClient, RetryPolicy};
use databricks_shield::run::{Connector, CycleReport, Settings, Shutdown};
use databricks_shield::sink::{AnySink, HttpSink, HttpSinkConfig};
use databricks_shield::state::StateStore;

pub const SECRET: &str = "emulator-secret";

pub fn emulator_config() -> EmulatorConfig {
    EmulatorConfig {
        agents: 5,
        rows: 200,
        seed: 7,
        ..Default::default()
    }
}

pub async fn emulator(cfg: EmulatorConfig) -> Emulator {
    Emulator::start(cfg).await.expect("emulator starts")
}

/// The real binary against `emu` (OAuth M2M) and `standin`: a cleared environment, state in
/// `state`, the emulator's whole hour of rows in the lookback, no listener. Add to taste.
pub fn shield_command(
    emu: &Emulator,
    standin: &StandIn,
    state: &std::path::Path,
) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_databricks-shield"));
    c.env_clear()
        .env("DATABRICKS_HOST", emu.base_url())
        .env("DATABRICKS_CLIENT_ID", "emulator-client")
        .env("DATABRICKS_CLIENT_SECRET", SECRET)
        .env("DATA_INGESTION_SERVICE_URL", standin.url())
        .env("STATE_DIR", state)
        .env("LOOKBACK_MINUTES", "120")
        .env("METRICS_ADDR", "off");
    c
}

pub async fn standin() -> StandIn {
    StandIn::start(StandInConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        require_jwt: None,
    })
    .await
    .expect("stand-in starts")
}

pub fn fast_retry() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_elapsed: Duration::from_secs(10),
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(1500),
        },
    }
}

pub fn client(base_url: &str, client_id: &str, secret: &str) -> DatabricksClient {
    DatabricksClient::new(
        &url::Url::parse(base_url).unwrap(),
        Credentials::OAuth {
            client_id: client_id.to_string(),
            client_secret: secret.to_string().into(),
        },
        fast_retry(),
    )
    .unwrap()
}

pub fn http_sink(url: &str) -> AnySink {
    AnySink::Http(
        HttpSink::new(HttpSinkConfig {
            url: url::Url::parse(url).unwrap(),
            jwt: None,
            timeout: Duration::from_secs(5),
            retry: databricks_shield::sink::RetryPolicy {
                max_attempts: 2,
                max_elapsed: Duration::from_secs(2),
                base_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(50),
            },
        })
        .unwrap(),
    )
}

pub fn settings(state_dir: &std::path::Path) -> Settings {
    let mut s = databricks_shield::app::settings_for_demo("workspace", "default", state_dir);
    // The emulator spreads its first rows over the past hour: read two hours to get them all.
    s.collect.lookback = Duration::from_secs(7200);
    s.collect.statement_timeout = Duration::from_secs(20);
    s.workspace_host = "127.0.0.1".into();
    s
}

pub struct Rig {
    pub emulator: Emulator,
    pub standin: StandIn,
    pub state_dir: tempfile::TempDir,
}

impl Rig {
    pub async fn new(cfg: EmulatorConfig) -> Rig {
        Rig {
            emulator: emulator(cfg).await,
            standin: standin().await,
            state_dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn state_path(&self) -> PathBuf {
        self.state_dir.path().join("state")
    }

    /// A fresh connector on the rig's state (as after a process restart).
    pub fn connector(&self) -> Arc<Connector> {
        let state = StateStore::open(&self.state_path(), false).unwrap();
        Arc::new(Connector::new(
            client(&self.emulator.base_url(), "emulator-client", SECRET),
            http_sink(&self.standin.url()),
            state,
            settings(&self.state_path()),
        ))
    }

    pub async fn cycle(&self) -> CycleReport {
        let c = self.connector();
        let (_t, shutdown) = Shutdown::new();
        c.run_cycle(&shutdown).await
    }

    /// Invocation records received, by databricks request id -> count.
    pub fn received_executions(&self) -> BTreeMap<String, usize> {
        executions_in(&self.standin.records())
    }

    /// Ground truth ids.
    pub fn truth(&self) -> BTreeMap<String, String> {
        self.emulator
            .ground_truth()
            .into_iter()
            .map(|r| (r.databricks_request_id, r.table))
            .collect()
    }
}

pub fn header(record: &serde_json::Value, field: &str, key: &str) -> Option<String> {
    let raw = record.get(field)?.as_str()?;
    let map: serde_json::Value = serde_json::from_str(raw).ok()?;
    map.get(key)?.as_str().map(str::to_string)
}

/// Execution records (not tool calls) by request id -> how many times seen.
pub fn executions_in(records: &[serde_json::Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in records {
        let path = r.get("path").and_then(|p| p.as_str()).unwrap_or("");
        if !path.ends_with("/invocations") {
            continue;
        }
        if let Some(id) = header(r, "requestHeaders", "x-databricks-request-id") {
            *out.entry(id).or_insert(0) += 1;
        }
    }
    out
}
