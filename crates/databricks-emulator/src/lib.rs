//! A Databricks workspace emulator: speaks the documented REST API (OAuth M2M, Unity Catalog,
//! Model Serving, SQL Statement Execution, MLflow traces) over real HTTP and executes the SQL it
//! receives with SQLite, so the connector's tests, benchmarks and demo exercise every code path
//! without a real workspace.
//!
//! Architecture Invariants: the data is deterministic from the seed; statements are executed,
//! never pattern-matched; no handler panics on bad input; secrets never reach logs or Debug.

mod error;
mod faults;
mod http;
mod layout;
mod payload;
mod sql;
mod state;
mod statements;
mod store;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

pub use error::EmulatorError;
pub use state::PAT_PRINCIPAL;

use crate::layout::Layout;
use crate::state::{lock, Shared};
use crate::store::Store;

/// Emulator configuration; `Default` gives the CLI defaults.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Number of agents (their kind cycles through the four deployment shapes).
    pub agents: usize,
    /// Initial executions spread over the past 60 minutes.
    pub rows: usize,
    /// Seed of all generated data.
    pub seed: u64,
    /// OAuth client id accepted by `/oidc/v1/token`.
    pub client_id: String,
    /// OAuth client secret accepted by `/oidc/v1/token`.
    pub client_secret: String,
    /// A personal access token also accepted as Bearer (principal [`PAT_PRINCIPAL`]).
    pub pat: Option<String>,
    /// Unity Catalog catalog name.
    pub catalog: String,
    /// Unity Catalog schema name.
    pub schema: String,
    /// Prefix of the agents' tables; distractor tables sit outside it.
    pub table_prefix: String,
    /// Fault spec (see the README); "" = none.
    pub faults: String,
    /// OAuth token lifetime in seconds.
    pub token_ttl_secs: u64,
    /// Rows per statement result chunk.
    pub chunk_rows: usize,
    /// Approximate size of each request+response payload in bytes.
    pub payload_bytes: usize,
    /// Bytes of `mlflow.spanOutputs` on one TOOL span of the OTel span table (0: none), to make
    /// a span as large as a test needs (e.g. larger than a statement may return).
    pub otel_output_bytes: usize,
    /// The end of the generated initial hour, µs since the epoch (None: the moment it starts).
    /// Two emulators with the same seed and anchor hold the same rows, with the same times: a
    /// workspace that restarts, not a new one.
    pub anchor_us: Option<i64>,
    /// The workspace has no Unity Catalog metastore (Unity Catalog not enabled): every Unity
    /// Catalog route answers 404 `METASTORE_DOES_NOT_EXIST`, as Databricks does.
    pub no_metastore: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            agents: 5,
            rows: 200,
            seed: 42,
            client_id: "emulator-client".into(),
            client_secret: "emulator-secret".into(),
            pat: None,
            catalog: "workspace".into(),
            schema: "default".into(),
            table_prefix: String::new(),
            faults: String::new(),
            token_ttl_secs: 3600,
            chunk_rows: 1000,
            payload_bytes: 1500,
            otel_output_bytes: 0,
            anchor_us: None,
            no_metastore: false,
        }
    }
}

impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("listen", &self.listen)
            .field("agents", &self.agents)
            .field("rows", &self.rows)
            .field("seed", &self.seed)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("pat", &self.pat.as_ref().map(|_| "<redacted>"))
            .field("catalog", &self.catalog)
            .field("schema", &self.schema)
            .field("table_prefix", &self.table_prefix)
            .field("faults", &self.faults)
            .field("token_ttl_secs", &self.token_ttl_secs)
            .field("chunk_rows", &self.chunk_rows)
            .field("payload_bytes", &self.payload_bytes)
            .field("anchor_us", &self.anchor_us)
            .field("no_metastore", &self.no_metastore)
            .finish()
    }
}

/// One visible inference row, as `GET /_emulator/requests` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroundTruthRow {
    /// `catalog.schema.table`.
    pub table: String,
    /// The row's `databricks_request_id`.
    pub databricks_request_id: String,
    /// The row's request time, `2026-11-29T08:33:00.123456Z` style.
    pub request_time: String,
}

/// The tool call an inference row's response carries (ground truth for tool call records).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RowToolCall {
    /// `catalog.schema.table`.
    pub table: String,
    /// The row's `databricks_request_id`.
    pub databricks_request_id: String,
    pub tool_call_id: String,
    /// The tool's name as the agent called it.
    pub tool: String,
    /// The call's arguments (a JSON text).
    pub arguments: String,
    /// The response was streamed: logged as the list of its chunks or events.
    pub streamed: bool,
}

/// A tool call that both an inference row and an MLflow trace of the same agent describe: the
/// row's response carries it and the trace's TOOL span has the same `gen_ai.tool.call.id`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MirroredToolCall {
    /// The agent's name.
    pub agent: String,
    /// The MLflow experiment holding the trace.
    pub experiment_id: String,
    /// The trace describing the execution.
    pub trace_id: String,
    /// The inference row describing the same execution.
    pub databricks_request_id: String,
    /// The shared tool call id.
    pub tool_call_id: String,
    /// The tool's name.
    pub tool: String,
}

/// A privilege the emulator checks per principal (everything is granted until revoked).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Privilege {
    /// USE CATALOG on the configured catalog.
    UseCatalog,
    /// USE SCHEMA on the configured schema.
    UseSchema,
    /// SELECT on one table (`catalog.schema.table`).
    Select {
        /// Full table name.
        table: String,
    },
    /// EXECUTE on the configured schema (schema-wide: all its registered models, model versions
    /// and functions). As in Unity Catalog, the model, model-version and function lists hold only
    /// what the principal may EXECUTE: without it they are empty (not refused), and getting a
    /// model answers 403.
    Execute,
    /// CAN READ on one MLflow experiment. Without it `runs/get` of a run logged there and
    /// `traces/search` in it answer 403 `PERMISSION_DENIED`, and `experiments/search` leaves it
    /// out, as MLflow on Databricks does.
    ReadExperiment {
        /// The experiment's id.
        experiment_id: String,
    },
}

impl Privilege {
    fn normalized(self) -> Privilege {
        match self {
            Privilege::Select { table } => Privilege::Select {
                table: table.to_lowercase(),
            },
            p => p,
        }
    }
}

/// A running emulator.
pub struct Emulator {
    shared: Arc<Shared>,
    base_url: String,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn validate(cfg: &EmulatorConfig) -> Result<(), EmulatorError> {
    let ident = |field: &'static str, v: &str, allow_empty: bool| {
        if (v.is_empty() && !allow_empty)
            || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            Err(EmulatorError::Config {
                field,
                reason: format!("`{v}` must be non-empty letters, digits or underscores"),
            })
        } else {
            Ok(())
        }
    };
    ident("catalog", &cfg.catalog, false)?;
    ident("schema", &cfg.schema, false)?;
    ident("table_prefix", &cfg.table_prefix, true)?;
    if cfg.chunk_rows == 0 {
        return Err(EmulatorError::Config {
            field: "chunk_rows",
            reason: "must be at least 1".into(),
        });
    }
    if cfg.client_id.is_empty() || cfg.client_secret.is_empty() {
        return Err(EmulatorError::Config {
            field: "client_id/client_secret",
            reason: "must not be empty".into(),
        });
    }
    Ok(())
}

impl Emulator {
    /// Build the workspace, bind the listener and spawn the server.
    pub async fn start(cfg: EmulatorConfig) -> Result<Emulator, EmulatorError> {
        validate(&cfg)?;
        let rules = faults::parse(&cfg.faults)?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| EmulatorError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let base_url = format!("http://{addr}");
        let anchor_us = cfg.anchor_us.unwrap_or_else(store::now_us);
        let now_ms = anchor_us.div_euclid(1000);
        let layout = Arc::new(Layout::build(
            &cfg.catalog.to_lowercase(),
            &cfg.schema.to_lowercase(),
            &cfg.table_prefix.to_lowercase(),
            cfg.agents,
            cfg.seed,
            now_ms,
        ));
        let (l2, pb, seed, rows) = (layout.clone(), cfg.payload_bytes, cfg.seed, cfg.rows);
        let ob = cfg.otel_output_bytes;
        let store =
            tokio::task::spawn_blocking(move || Store::open(l2, (pb, ob), seed, rows, anchor_us))
                .await
                .map_err(|e| {
                    EmulatorError::Storage(format!("store initialisation task failed: {e}"))
                })??;
        let mut f = faults::Faults::default();
        f.replace(rules);
        let shared = Arc::new(Shared {
            endpoints: RwLock::new(layout.endpoints.clone()),
            layout,
            store: Arc::new(store),
            tokens: Mutex::new(Default::default()),
            revoked: RwLock::new(Default::default()),
            faults: Mutex::new(f),
            stats: Mutex::new(Default::default()),
            statements: Mutex::new(Default::default()),
            sign_key: rand::random::<u64>(),
            started_ms: now_ms,
            extra_traces: Mutex::new(Vec::new()),
            traces_in_progress: Mutex::new(Default::default()),
            traces_finished: Mutex::new(Default::default()),
            storage_url: Mutex::new(None),
            rotated: Mutex::new((None, None)),
            base_url: base_url.clone(),
            cfg,
        });
        let (tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(http::serve(listener, shared.clone(), rx));
        Ok(Emulator {
            shared,
            base_url,
            shutdown: tx,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Append `rows` executions timestamped now and `late` executions 5-55 minutes old
    /// (same as `POST /_emulator/generate`). Blocks while writing.
    pub fn generate(&self, rows: usize, late: usize) {
        if let Err(e) = generate(&self.shared, rows, late) {
            tracing::error!(error = %e, "generate failed");
        }
    }

    /// Every visible inference row of the agents' tables (same as `GET /_emulator/requests`).
    pub fn ground_truth(&self) -> Vec<GroundTruthRow> {
        match self.shared.store.ground_truth() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "ground truth query failed");
                Vec::new()
            }
        }
    }

    /// The tool call of every visible inference row that made one, as its response carries it
    /// (about one row in four was streamed: its response is the list of its chunks or events).
    pub fn row_tool_calls(&self) -> Vec<RowToolCall> {
        match self.shared.store.row_tool_calls() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "row tool call query failed");
                Vec::new()
            }
        }
    }

    /// Counters (same as `GET /_emulator/stats`).
    pub fn stats(&self) -> serde_json::Value {
        self.shared.stats_json()
    }

    /// Replace the active faults with `spec` (same syntax as `--faults`; "" clears).
    pub fn set_faults(&self, spec: &str) -> Result<(), EmulatorError> {
        let rules = faults::parse(spec)?;
        lock(&self.shared.faults).replace(rules);
        Ok(())
    }

    /// Rotates the service principal's OAuth secret and/or the personal access token: from now
    /// on only the new ones are accepted (the old secret deleted, as after a rotation); access
    /// tokens issued before stay valid until they expire.
    pub fn rotate_secrets(&self, client_secret: Option<&str>, pat: Option<&str>) {
        let mut r = lock(&self.shared.rotated);
        if let Some(s) = client_secret {
            r.0 = Some(s.to_string());
        }
        if let Some(p) = pat {
            r.1 = Some(p.to_string());
        }
    }

    /// Revoke a privilege from `principal` (`*` = everyone).
    pub fn revoke(&self, principal: &str, privilege: Privilege) {
        let mut r = self
            .shared
            .revoked
            .write()
            .unwrap_or_else(|e| e.into_inner());
        r.insert((principal.to_string(), privilege.normalized()));
    }

    /// Undo a [`Emulator::revoke`].
    pub fn grant(&self, principal: &str, privilege: Privilege) {
        let mut r = self
            .shared
            .revoked
            .write()
            .unwrap_or_else(|e| e.into_inner());
        r.remove(&(principal.to_string(), privilege.normalized()));
    }

    /// Set (or add) a tag on a serving endpoint; bumps its config version.
    pub fn set_endpoint_tag(&self, endpoint: &str, key: &str, value: &str) {
        http::set_endpoint_tag(&self.shared, endpoint, key, value);
    }

    /// Add `count` new MLflow traces, timestamped now, to every experiment (same as
    /// `POST /_emulator/traces`).
    pub fn add_traces(&self, count: usize) {
        http::add_traces(&self.shared, count);
    }

    /// Starts one trace at `ts_ms` in every experiment, `IN_PROGRESS` until
    /// [`Emulator::finish_trace`] with the returned handle (a long agent run).
    pub fn start_trace(&self, ts_ms: i64) -> u64 {
        http::mlflow::start_trace(&self.shared, ts_ms)
    }

    /// Ends the traces of [`Emulator::start_trace`]: from now on they are `OK` (or `ERROR`).
    pub fn finish_trace(&self, handle: u64) {
        if lock(&self.shared.traces_in_progress).remove(&handle) {
            lock(&self.shared.traces_finished)
                .insert(handle, chrono::Utc::now().timestamp_millis());
        }
    }

    /// Make the signed URIs of trace data point at `url` (e.g. `https://localhost:PORT`, a TLS
    /// front relaying to this emulator, as cloud storage behind a TLS-inspecting proxy) instead
    /// of the emulator's own address; `None` restores that.
    pub fn set_storage_url(&self, url: Option<&str>) {
        *lock(&self.shared.storage_url) = url.map(|u| u.trim_end_matches('/').to_string());
    }

    /// Logs one trace to the OTel span table, ended at `end_us` (µs since the epoch) and visible
    /// at once: a root AGENT span of the first agent and the CHAT_MODEL span of a streamed
    /// generation, whose chunks MLflow records as span events (`mlflow.chunk.item.N`), at least
    /// `event_bytes` of them in its `events` column (its attributes stay small). Returns the
    /// trace id. Blocks while writing.
    pub fn add_streamed_otel_trace(
        &self,
        event_bytes: usize,
        end_us: i64,
    ) -> Result<String, EmulatorError> {
        self.shared
            .store
            .insert_streamed_generation(event_bytes, end_us)
    }

    /// From now on cloud storage serves the span document of MLflow trace `trace_id` streamed,
    /// with chunked transfer encoding and no Content-Length (as storage behind some gateways
    /// does), `pad_bytes` of padding (a field readers ignore) ahead of its spans.
    pub fn stream_span_document(&self, trace_id: &str, pad_bytes: usize) {
        self.shared.store.stream_span_document(trace_id, pad_bytes);
    }

    /// Tool calls described by both an inference row and an MLflow trace (the first successful
    /// tool-calling rows of each agent with an experiment), deterministic for a seed.
    pub fn mirrored_tool_calls(&self) -> Vec<MirroredToolCall> {
        http::mirrored_tool_calls(&self.shared)
    }

    /// Stop accepting, close connections gracefully and free the port.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        // Stop statements still running on blocking threads.
        for e in lock(&self.shared.statements).map.values() {
            e.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(h) = &e.interrupt {
                h.interrupt();
            }
        }
        let _ = self.task.await;
    }
}

pub(crate) fn generate(shared: &Shared, rows: usize, late: usize) -> Result<(), EmulatorError> {
    let now = store::now_us();
    shared.store.insert_rows(rows, now - 3_000_000, now)?;
    shared
        .store
        .insert_rows(late, now - 55 * 60_000_000, now - 5 * 60_000_000)?;
    Ok(())
}
