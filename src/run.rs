//! Run: one cycle end to end, the recurring service loop, and clean shutdown.
//!
//! A cycle: authenticate -> discover -> choose a warehouse -> read every inference table
//! (concurrently, bounded) -> map each execution to Akto records -> deliver in batches ->
//! checkpoint what the sink confirmed. Collectors feed one delivery task through a bounded
//! channel, so memory stays flat whatever the table sizes (back-pressure, not buffering).
//!
//! Architecture Invariant: the state store is written only here, and only with ids whose records
//! the sink confirmed (or that were quarantined). A failed batch stops the cycle; the next cycle
//! re-reads from the last confirmed position. Cycles never overlap.
//!
//! Tool calls are sent once per agent, whichever source describes them. An MLflow trace's TOOL
//! span and an inference row's tool call record can describe the same call (same
//! `x-tool-call-id`); the delivery stage identifies a tool-call record by (agent host, call id)
//! and drops it when the other source already sent that call (the registry, state namespace
//! `toolcall:<agent host>`, id = `trace`/`row`, U+001F, call id; time = the unit's time; the
//! bare ids of an earlier release are registered under both keys by the state's format 4
//! upgrade). Calls of one source are never merged: each source
//! sends a unit once, and agents reuse call ids across requests. A call enters the registry in
//! the `commit_delivered` transaction
//! that follows its record's delivery (also when other records of its unit were not delivered);
//! the registry is pruned with the same horizon as delivered ids (lookback + 10 minutes).
//!
//! A unit is committed when all its records are settled. One whose records were split over
//! several requests (a unit over 10 MiB) or Kafka messages, and only some of them confirmed
//! before a failure, is read and sent again by a later cycle: its records confirmed the first
//! time are kept in state (namespace `partly-sent:<namespace>`, one key per record: its unit id
//! and the SHA-256 of its JSON) and not sent again.
//!
//! The trace is preferred (it has timing and errors): the trace sources (MLflow experiments, OTel
//! span tables) and the inference tables are read concurrently, but through two channels, and
//! delivery takes every chunk of the trace sources before any chunk of the tables (table readers
//! wait with their first pages meanwhile). Within a cycle the trace's record therefore always
//! wins, and across cycles it normally wins too, since inference rows land later than traces. The remaining case: a row delivered in an earlier
//! cycle than its trace (a trace still in progress or exported late, or a trace source that
//! failed that cycle). Then the trace's TOOL record is the one dropped, so its timing and error
//! reach Akto in no record; the call is still sent once.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Semaphore};

use crate::collect::{Chunk, CollectError, CollectOptions, TableReader, TableStats};
use crate::databricks::{DatabricksClient, DatabricksError};
use crate::discovery::{self, Inventory};
use crate::sink::{AnySink, OutRecord, SinkError, BODY_WRAPPER_BYTES, MAX_BODY_BYTES};
use crate::state::{create_private_file, DeliveredRow, StateError, StateStore};
use crate::traffic::{self, AgentContext, MapOptions, RedactionCounts, Redactor};

/// How long a batch in flight when shutdown is requested (SIGTERM, the `-once` time limit) may
/// still take. After that it is abandoned: not checkpointed, announced at the next start as
/// possibly stored (the in-flight marker), and sent again then. A batch can otherwise take a
/// minute or more (an HTTP sink's retries, a Kafka broker's time-out), past Akto's 300 s kill.
pub const IN_FLIGHT_GRACE: Duration = Duration::from_secs(10);

/// How far back a table's last delivered row may lie for its disappearance from Unity Catalog to
/// be reported ([`Inventory::vanished`]): a table dropped on purpose stops being named a week
/// after its last row.
pub const VANISHED_WITHIN: Duration = Duration::from_secs(7 * 24 * 3600);

/// Stopping, as an explicit value handed to every long-running part (after mini-redis).
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending half: `trigger()` asks everything to stop between batches.
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }
    /// Resolves when shutdown is triggered.
    pub async fn wait(&mut self) {
        while !*self.rx.borrow() {
            if self.rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Resolves once shutdown was requested; never when the trigger is dropped without one.
    pub async fn requested(&mut self) {
        while !*self.rx.borrow() {
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

/// Everything a cycle needs that is not per-cycle.
pub struct Settings {
    pub catalog: String,
    pub schema: String,
    pub prefix: String,
    pub warehouse_id: Option<String>,
    pub account_id: String,
    /// The workspace host name, part of every agent's Akto host.
    pub workspace_host: String,
    pub batch_size: usize,
    /// Batches confirmed by the sink per state commit (`CHECKPOINT_BATCHES`).
    pub checkpoint_batches: usize,
    pub table_concurrency: usize,
    pub collect: CollectOptions,
    pub map: MapOptions,
    /// Masks sensitive values before records leave the process (`REDACT_SENSITIVE_DATA`).
    pub redactor: Option<Redactor>,
    pub state_dir: PathBuf,
}

/// The connector, assembled.
pub struct Connector {
    pub client: DatabricksClient,
    pub sink: AnySink,
    pub state: Arc<StateStore>,
    pub settings: Settings,
    /// When the sink last confirmed records: readiness during a long cycle.
    pub progress: Arc<Progress>,
    warehouse: tokio::sync::Mutex<Option<String>>,
    quarantine: Quarantine,
    /// The vanished tables already named in a WARN by this process (see
    /// [`CycleReport::vanished_tables`]); one listed again leaves it.
    vanished_warned: Mutex<HashSet<String>>,
}

/// When the sink last confirmed records of this process. A cycle that catches up after an outage
/// can run for many intervals; readiness (`/readyz`) looks here to tell it from a stuck one.
#[derive(Debug, Default)]
pub struct Progress(std::sync::Mutex<Option<Instant>>);

impl Progress {
    /// The sink confirmed records now.
    pub fn note(&self) {
        self.note_at(Instant::now());
    }

    /// The sink confirmed records at `at` (tests).
    pub fn note_at(&self, at: Instant) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
    }

    /// When the sink last confirmed records, if ever.
    pub fn last(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The outcome of a cycle.
#[derive(Debug, Default, Clone)]
pub struct CycleReport {
    pub agents: usize,
    pub tables: usize,
    pub rows_read: u64,
    pub bytes_read: u64,
    pub statements: u64,
    pub executions: u64,
    pub records_sent: u64,
    pub duplicates_skipped: u64,
    pub late_found: u64,
    pub quarantined: u64,
    /// Payloads cut: while reading (a row larger than one statement may return), and in the
    /// units committed (by the mapping, after masking, to the sink's per-record limit).
    pub truncated: u64,
    pub tool_calls: u64,
    /// Tool-call records not sent because the same call was already sent (by a trace or an
    /// inference row, this cycle or an earlier one), counted with their unit's commit.
    pub tool_calls_deduplicated: u64,
    pub errors: Vec<String>,
    /// The state store failed (a read, a write, or the checkpoint of records the sink
    /// confirmed), or a file sink could not make its lines durable: the service stops instead
    /// of going on (redb refuses every write after a failed one until the process restarts, so
    /// every later cycle would send the same records again). One of `errors` says why.
    pub fatal: bool,
    pub duration: Duration,
    pub stopped: bool,
    pub per_agent: BTreeMap<String, u64>,
    /// Values masked, by kind (redaction on).
    pub redacted: RedactionCounts,
    pub inventory: Option<Inventory>,
    /// Tables of this instance's scope that delivered rows within [`VANISHED_WITHIN`] but that
    /// Unity Catalog no longer lists (dropped, renamed, or SELECT revoked): their agents are not
    /// read. Each is named in a WARN the first cycle it is missing.
    pub vanished_tables: Vec<String>,
}

impl CycleReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// The line Akto's job runner forwards to its operators.
    pub fn summary_line(&self) -> String {
        format!(
            "Cycle {} in {:.1}s. Results: agents={} tables={} rows_read={} records_sent={} \
             duplicates_skipped={} quarantined={} errors={}{}",
            if self.stopped {
                "stopped before it finished"
            } else {
                "completed"
            },
            self.duration.as_secs_f64(),
            self.agents,
            self.tables,
            self.rows_read,
            self.records_sent,
            self.duplicates_skipped,
            self.quarantined,
            self.errors.len(),
            if self.redacted.total() > 0 {
                let kinds: Vec<String> = self
                    .redacted
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(k, n)| format!("{}:{n}", k.as_str()))
                    .collect();
                format!(" redacted={}", kinds.join(","))
            } else {
                String::new()
            }
        )
    }

    /// Adds what the delivery stage counted, also when it ended with an error or was stopped:
    /// the records the sink confirmed (sent and checkpointed), and the payloads cut, values
    /// masked and tool-call records left out of the units committed. A unit left open (a batch
    /// of it failed or was abandoned) counts nothing here; it counts once, in the cycle that
    /// commits it.
    fn add_delivery(&mut self, d: DeliveryTotals) {
        self.records_sent += d.records_sent;
        self.truncated += d.truncated;
        self.tool_calls += d.tool_calls;
        self.tool_calls_deduplicated += d.tool_calls_deduplicated;
        for (agent, n) in d.per_agent {
            *self.per_agent.entry(agent).or_default() += n;
        }
        self.redacted.add(&d.redacted);
        // Records settled in quarantine, but the cycle failed: the operator must look.
        if let Some(e) = d.refused_whole.error() {
            self.errors.push(e);
        }
    }

    fn add_table(&mut self, s: &TableStats) {
        self.rows_read += s.rows_returned;
        self.bytes_read += s.bytes_returned;
        self.statements += s.statements;
        self.executions += s.executions;
        self.duplicates_skipped += s.duplicates_skipped;
        self.late_found += s.late_found;
        // Payloads cut while reading (a row larger than one statement may return).
        self.truncated += s.payloads_cut;
    }
}

/// Appends records that Akto would reject to `STATE_DIR/quarantine.jsonl` (mode 0600).
struct Quarantine {
    path: PathBuf,
    lock: Mutex<()>,
    count: AtomicU64,
}

impl Quarantine {
    fn put(
        &self,
        table: &str,
        request_id: &str,
        reason: &str,
        record: &str,
    ) -> Result<(), StateError> {
        use std::io::Write as _;
        let line = serde_json::json!({
            "quarantined_at": chrono::Utc::now().to_rfc3339(),
            "table": table,
            "databricks_request_id": request_id,
            "reason": reason,
            "record": record,
        });
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = create_private_file(&self.path, true).map_err(|e| StateError::Io {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        writeln!(f, "{line}")
            .and_then(|_| f.sync_data())
            .map_err(|e| StateError::Io {
                path: self.path.clone(),
                detail: e.to_string(),
            })?;
        self.count.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "quarantined a record of {table} (request {request_id}): {reason}; kept in {}",
            self.path.display()
        );
        Ok(())
    }
}

/// The readers of a cycle, and the source each task reads: a reader that panicked (a bug) is
/// reported with its source's name.
#[derive(Default)]
struct Readers {
    set: tokio::task::JoinSet<(String, TableStats, Result<(), CollectError>)>,
    names: std::collections::HashMap<tokio::task::Id, String>,
}

/// A reader's work: it counts into the [`TableStats`] it is given as it goes, so what it did is
/// reported also when it fails or is stopped.
type ReaderWork = Box<
    dyn for<'a> FnOnce(
            &'a mut TableStats,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<(), CollectError>> + Send + 'a>,
        > + Send,
>;

/// Runs one source's reader under the concurrency bound; shutdown stops it at once (a statement
/// may poll for minutes): what it already handed to delivery is delivered or left unconfirmed,
/// never lost.
fn spawn_reader(
    readers: &mut Readers,
    sem: &Arc<Semaphore>,
    shutdown: &Shutdown,
    name: String,
    work: ReaderWork,
) {
    let sem = sem.clone();
    let mut shutdown = shutdown.clone();
    let task_name = name.clone();
    let handle = readers.set.spawn(async move {
        let mut stats = TableStats::default();
        let _permit = sem.acquire_owned().await;
        if shutdown.is_triggered() {
            return (name, stats, Err(CollectError::Closed));
        }
        let result = tokio::select! {
            r = work(&mut stats) => r,
            _ = shutdown.wait() => Err(CollectError::Closed),
        };
        (name, stats, result)
    });
    readers.names.insert(handle.id(), task_name);
}

/// The agent a table belongs to, as records need it.
struct AgentInfo {
    name: String,
    host: String,
    path: String,
}

/// Below what the delivery registries (tool calls sent, units sent in part, rows quarantined)
/// are pruned after a cycle that delivered. They answer for units of every source: while one
/// source failed this cycle (`failed`), it may still catch up on units older than the usual
/// horizon, whose tool calls must still be found then, so only what the catch-up floor no
/// longer reaches is pruned.
///
/// Like delivered ids (`StateStore::record_complete_read`), the horizon counts back from the
/// newest source time delivered (`newest_source_us`, the sources' own clock) when that is older
/// than the cycle's start: a local clock running ahead (an NTP step, a VM resumed) cannot make
/// one cycle forget tool calls that a late pass on the corrected clock still needs.
fn registry_horizon(
    cycle_start_us: i64,
    newest_source_us: Option<i64>,
    keep_us: i64,
    max_catchup: Duration,
    failed: bool,
) -> i64 {
    let now = newest_source_us.map_or(cycle_start_us, |n| n.min(cycle_start_us));
    if failed {
        now - (max_catchup + Duration::from_secs(600)).as_micros() as i64
    } else {
        now - keep_us
    }
}

/// A warehouse that statements can still run on: any state but being deleted (a stopped one
/// starts on the first statement).
fn warehouse_usable(w: &crate::databricks::sql::Warehouse) -> bool {
    !w.is_deleted()
}

/// Why a cycle's delivery stopped early.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    State(#[from] StateError),
    /// What the sink confirmed could not be made durable (a file sink's fsync) or recorded
    /// (the state commit): the run must stop, or every later cycle would send it again.
    #[error("{0}")]
    Unrecorded(String),
    /// Shutdown was requested and the batch in flight was not confirmed within
    /// [`IN_FLIGHT_GRACE`]: it was abandoned (not an error: the cycle ends as stopped).
    #[error("the batch in flight ({records} records) was abandoned at shutdown")]
    Abandoned { records: usize },
}

impl Connector {
    pub fn new(
        client: DatabricksClient,
        sink: AnySink,
        state: StateStore,
        settings: Settings,
    ) -> Self {
        let quarantine = Quarantine {
            path: settings.state_dir.join("quarantine.jsonl"),
            lock: Mutex::new(()),
            count: AtomicU64::new(0),
        };
        Connector {
            client,
            sink,
            state: Arc::new(state),
            settings,
            progress: Default::default(),
            warehouse: tokio::sync::Mutex::new(None),
            quarantine,
            vanished_warned: Mutex::new(HashSet::new()),
        }
    }

    /// Announces, once per state, what the first start of this release may send again: state
    /// written by an earlier release (a state that has delivered anything) keyed long traces by
    /// their start and held records Akto's runtime would drop in their earlier form.
    pub fn announce_upgrade(&self) -> Result<(), StateError> {
        self.announce_lookback_change()?;
        if !self.state.first_time("traces-keyed-by-end")? {
            return Ok(());
        }
        if self.state.cursors()?.is_empty() {
            // A new state: nothing was delivered before, nothing can come again.
            return Ok(());
        }
        tracing::warn!(
            "this release keys long MLflow and OTel traces by their end (earlier releases: by \
             their start), and sends records Akto's runtime would drop in the form it keeps \
             (status 2xx with the real code in a header, /health paths encoded, empty bodies as \
             text): an MLflow trace of a run longer than both half LOOKBACK_MINUTES and 10 \
             minutes, or an OTel trace whose root ran over 10 minutes, delivered within \
             LOOKBACK_MINUTES before this upgrade, and such a record of a unit confirmed only in \
             part, may be sent once more. Said once, at the first start of this release"
        );
        Ok(())
    }

    /// A WARN when LOOKBACK_MINUTES is lower than at the previous start: a trace longer than
    /// half the new lookback but not half the old one was kept by its start and is now kept by
    /// its end; its start key is forgotten while the long-run search still finds it, so one
    /// delivered within the old lookback may be sent once more.
    fn announce_lookback_change(&self) -> Result<(), StateError> {
        let now = self.settings.collect.lookback.as_secs() / 60;
        let before = self
            .state
            .swap_setting("lookback_minutes", &now.to_string())?;
        if let Some(old) = before.and_then(|b| b.parse::<u64>().ok()) {
            if now < old {
                tracing::warn!(
                    "LOOKBACK_MINUTES is {now}, {old} at the previous start: an MLflow trace of a \
                     run between {} and {} minutes long delivered in the last {old} minutes may \
                     be sent once more (it was kept by its start, and is now kept by its end)",
                    now / 2,
                    old / 2
                );
            }
        }
        Ok(())
    }

    /// Reports a batch left unconfirmed by the previous run (it will be sent again).
    pub fn report_unconfirmed(&self) -> Result<(), StateError> {
        if let Some(n) = self.state.unconfirmed_batch()? {
            tracing::warn!(
                "re-sending {n} records of an unconfirmed batch: the previous run stopped between \
                 sending it and recording the sink's confirmation"
            );
            self.state.clear_in_flight()?;
        }
        Ok(())
    }

    /// The warehouse of this cycle. One set by `DATABRICKS_WAREHOUSE_ID` is looked up once. One
    /// picked automatically is kept while the listing (one call per cycle) still holds it, not
    /// being deleted: a warehouse that was deleted, or whose CAN USE was revoked, is replaced by
    /// the next cycle instead of failing every cycle until a restart, but another one that
    /// happens to be running does not take its place (no alternating between warehouses). A
    /// listing that fails with a retriable error (5xx, 429, the network) keeps the pick. The
    /// choice is logged when it changes.
    async fn warehouse_id(&self) -> Result<String, DatabricksError> {
        let mut w = self.warehouse.lock().await;
        if let Some(id) = w.as_ref() {
            if self.settings.warehouse_id.is_some() {
                return Ok(id.clone());
            }
            match self.client.list_warehouses().await {
                Ok(all) if all.iter().any(|wh| wh.id == *id && warehouse_usable(wh)) => {
                    return Ok(id.clone());
                }
                Ok(_) => tracing::warn!(
                    "SQL warehouse {id} is no longer listed for this service principal, or is \
                     being deleted (or its CAN USE was revoked): choosing another one"
                ),
                Err(e) if e.is_retriable() => {
                    tracing::warn!(
                        "listing the SQL warehouses failed ({e}); this cycle keeps warehouse {id}"
                    );
                    return Ok(id.clone());
                }
                // Choosing again says what is wrong, with the fix.
                Err(_) => {}
            }
        }
        let (wh, why) = self
            .client
            .choose_warehouse(self.settings.warehouse_id.as_deref())
            .await?;
        if w.as_deref() != Some(wh.id.as_str()) {
            tracing::info!(
                "Using SQL warehouse {} ({}) [{}]",
                wh.id,
                wh.name.as_deref().unwrap_or("unnamed"),
                why
            );
        }
        *w = Some(wh.id.clone());
        Ok(wh.id)
    }

    /// The trace readers' shared settings for the cycle starting at `cycle_start_us`.
    fn trace_reader(&self, cycle_start_us: i64) -> crate::traces::TraceReader<'_> {
        crate::traces::TraceReader {
            client: &self.client,
            state: &self.state,
            opts: &self.settings.collect,
            account_id: &self.settings.account_id,
            workspace_host: &self.settings.workspace_host,
            now_us: cycle_start_us,
        }
    }

    /// The tables read before that Unity Catalog no longer lists ([`Inventory::vanished`]), each
    /// named in a WARN the first time this process misses it. A state that cannot be read here
    /// fails nothing: the cycle's own reads report it.
    fn note_vanished_tables(&self, inv: &Inventory, cycle_start_us: i64) -> Vec<String> {
        let since = cycle_start_us.saturating_sub(VANISHED_WITHIN.as_micros() as i64);
        let vanished = match self.state.cursors() {
            Ok(cursors) => inv.vanished(&cursors, since),
            Err(e) => {
                tracing::debug!("cannot list the state's cursors: {e}");
                return Vec::new();
            }
        };
        let mut warned = self
            .vanished_warned
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        warned.retain(|t| vanished.iter().any(|(v, _)| v == t));
        for (table, last_us) in &vanished {
            if warned.insert(table.clone()) {
                let last = chrono::DateTime::from_timestamp_micros(*last_us)
                    .map_or_else(|| last_us.to_string(), |t| t.to_rfc3339());
                tracing::warn!(
                    "{table} delivered rows until {last}, but Unity Catalog no longer lists it: \
                     it was dropped or renamed, or the service principal lost SELECT on it \
                     (Unity Catalog lists only the tables it may read). Its agent's traffic is \
                     not read while it is missing. If the table still exists: `GRANT SELECT ON \
                     TABLE {} TO {};` (or SELECT on its schema)",
                    crate::databricks::error::quote_name(table),
                    crate::databricks::error::quote_ident(&self.client.principal())
                );
            }
        }
        vanished.into_iter().map(|(t, _)| t).collect()
    }

    /// Runs one cycle. Never panics on bad data; every problem ends up in `errors`.
    pub async fn run_cycle(self: &Arc<Self>, shutdown: &Shutdown) -> CycleReport {
        let started = Instant::now();
        let cycle_start_us = chrono::Utc::now().timestamp_micros();
        let mut report = CycleReport::default();
        let q_before = self.quarantine.count.load(Ordering::Relaxed);
        // Logged once, with the cycle's other errors, by whoever reports the cycle.
        if let Err(e) = self
            .cycle_inner(shutdown, cycle_start_us, &mut report)
            .await
        {
            report.errors.push(e.to_string());
        }
        report.quarantined = self.quarantine.count.load(Ordering::Relaxed) - q_before;
        report.duration = started.elapsed();
        report.stopped = shutdown.is_triggered();
        report
    }

    async fn cycle_inner(
        self: &Arc<Self>,
        shutdown: &Shutdown,
        cycle_start_us: i64,
        report: &mut CycleReport,
    ) -> Result<(), DatabricksError> {
        let s = &self.settings;
        // Authentication and discovery retry for minutes when the workspace is unreachable;
        // shutdown ends them at once (nothing was read, so nothing is left undelivered).
        let setup = async {
            self.client.authenticate().await?;
            discovery::discover(&self.client, &s.catalog, &s.schema, &s.prefix).await
        };
        let mut stop = shutdown.clone();
        let inv = tokio::select! {
            inv = setup => inv?,
            () = stop.requested() => {
                tracing::info!("Shutdown requested before anything was read: the cycle ends");
                return Ok(());
            }
        };
        report.agents = inv.agents.len();
        report.vanished_tables = self.note_vanished_tables(&inv, cycle_start_us);
        report.tables = inv.readable().count();
        let trace_sources = crate::traces::trace_sources(&inv, &s.workspace_host);
        if report.tables == 0 && trace_sources.is_empty() {
            tracing::warn!(
                "no inference tables or MLflow traces to read in {}.{} (prefix '{}'): {} tables found, \
                 {} match the prefix (Unity Catalog lists only the tables the service principal \
                 may SELECT). Run `databricks-shield check` or `discover` to see what was found",
                s.catalog,
                s.schema,
                s.prefix,
                inv.tables_total,
                inv.tables_matching_prefix
            );
        }
        // A warehouse only when there are tables to read with SQL.
        let warehouse = if report.tables > 0 || !inv.otel_span_tables.is_empty() {
            tokio::select! {
                w = self.warehouse_id() => Some(w?),
                () = stop.requested() => {
                    tracing::info!("Shutdown requested before anything was read: the cycle ends");
                    return Ok(());
                }
            }
        } else {
            None
        };

        let agents: BTreeMap<String, Arc<AgentInfo>> = inv
            .readable()
            .map(|(a, t)| {
                (
                    t.full_name.clone(),
                    Arc::new(AgentInfo {
                        name: a.name.clone(),
                        host: inv.agent_host(&a.name, &s.workspace_host),
                        path: traffic::invocation_path(a.endpoint.as_deref(), &t.full_name),
                    }),
                )
            })
            .collect();

        // Two channels: delivery drains the trace sources' (and the inventory's) before it takes
        // anything from the tables, so a trace's TOOL record reaches it before an inference row's
        // record of the same call and is the one sent (module doc). Table readers still start at
        // once: they read their first pages and wait on their channel meanwhile.
        let (tx, rx) = mpsc::channel::<Chunk>(1);
        let (table_tx, table_rx) = mpsc::channel::<Chunk>(1);
        let delivery = {
            let this = self.clone();
            let agents = agents.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { this.deliver(rx, table_rx, agents, shutdown).await })
        };

        // Agent inventory records first: once per agent and configuration.
        let units = crate::inventory::inventory_units(
            &inv,
            &s.workspace_host,
            &s.account_id,
            &self.state,
            cycle_start_us,
        );
        if !units.is_empty() {
            let chunk = Chunk {
                table: crate::inventory::NAMESPACE.into(),
                prepared: units,
                by_id: true,
                ..Default::default()
            };
            if tx.send(chunk).await.is_err() {
                tracing::debug!("delivery stopped before the inventory records");
            }
        }

        // Trace sources have their own bound: table readers waiting on their channel must not
        // hold the permits the trace readers need to finish.
        let sem = Arc::new(Semaphore::new(s.table_concurrency.max(1)));
        let trace_sem = Arc::new(Semaphore::new(s.table_concurrency.max(1)));
        let mut readers = Readers::default();
        let inv_arc = Arc::new(inv.clone());
        for src in trace_sources {
            let (this, tx) = (self.clone(), tx.clone());
            let name = crate::traces::experiment_namespace(&src.experiment_id);
            let work: ReaderWork = Box::new(move |stats| {
                Box::pin(async move {
                    this.trace_reader(cycle_start_us)
                        .experiment_into(&src, &tx, stats)
                        .await
                })
            });
            spawn_reader(&mut readers, &trace_sem, shutdown, name, work);
        }
        for table in inv.otel_span_tables.clone() {
            let (this, tx, inv) = (self.clone(), tx.clone(), inv_arc.clone());
            let warehouse = warehouse.clone().unwrap_or_default();
            let name = table.clone();
            let work: ReaderWork = Box::new(move |stats| {
                Box::pin(async move {
                    this.trace_reader(cycle_start_us)
                        .otel_table_into(&warehouse, &table, &inv, &tx, stats)
                        .await
                })
            });
            spawn_reader(&mut readers, &trace_sem, shutdown, name, work);
        }
        drop(tx);
        for (_, table) in inv.readable() {
            let (this, tx, table) = (self.clone(), table_tx.clone(), table.clone());
            let warehouse = warehouse.clone().unwrap_or_default();
            let name = table.full_name.clone();
            let work: ReaderWork = Box::new(move |stats| {
                Box::pin(async move {
                    let reader = TableReader {
                        client: &this.client,
                        state: &this.state,
                        warehouse_id: &warehouse,
                        table: &table,
                        opts: &this.settings.collect,
                        now_us: cycle_start_us,
                    };
                    reader.collect_into(&tx, stats).await
                })
            });
            spawn_reader(&mut readers, &sem, shutdown, name, work);
        }
        drop(table_tx);
        let mut completed: Vec<(String, Option<i64>)> = Vec::new();
        join_readers(&mut readers, report, &mut completed).await;
        let (totals, delivered) = match delivery.await {
            Ok(r) => r,
            // A panic (a bug): what it had confirmed but not checkpointed is sent again at the
            // next start; stopping beats sending it again every cycle.
            Err(e) => (
                DeliveryTotals::default(),
                Err(DeliveryError::Unrecorded(format!(
                    "the delivery task failed ({e}); records it had sent but not checkpointed \
                     are sent again at the next start (announced then). Please report this with \
                     the log"
                ))),
            ),
        };
        // What the sink confirmed counts whether delivery ended well or not: a catch-up that
        // sent 900 records before Akto failed sent (and checkpointed) those 900.
        report.add_delivery(totals);
        match delivered {
            Ok(()) => {
                // Tables read completely and delivered: remember when, and forget old ids.
                if !shutdown.is_triggered() {
                    let keep = (s.collect.lookback + Duration::from_secs(600)).as_micros() as i64;
                    for (table, hold_from) in &completed {
                        let mark = read_mark_holding(
                            cycle_start_us,
                            *hold_from,
                            s.collect.lookback.as_micros() as i64,
                        );
                        if let Err(e) = self.state.record_complete_read(table, mark, keep) {
                            report.fatal = true;
                            report.errors.push(format!("{table}: {e}"));
                        }
                    }
                    let mut newest = None;
                    for (table, _) in &completed {
                        match self.state.cursor(table) {
                            Ok(c) => newest = newest.max(c.map(|c| c.time_us)),
                            Err(e) => {
                                report.fatal = true;
                                report.errors.push(format!("{table}: {e}"));
                            }
                        }
                    }
                    let horizon = registry_horizon(
                        cycle_start_us,
                        newest,
                        keep,
                        s.collect.max_catchup,
                        !report.errors.is_empty(),
                    );
                    if let Err(e) = self.prune_registries(horizon) {
                        report.fatal = true;
                        report
                            .errors
                            .push(format!("pruning the delivery registries: {e}"));
                    }
                }
            }
            Err(e) => {
                let msg = match &e {
                    DeliveryError::Sink(se) => format!(
                        "delivery to {} failed: {se}. Nothing unconfirmed was checkpointed; the next cycle retries",
                        self.sink.describe()
                    ),
                    DeliveryError::State(se) => {
                        report.fatal = true;
                        se.to_string()
                    }
                    DeliveryError::Unrecorded(m) => {
                        report.fatal = true;
                        m.clone()
                    }
                    // Stopped, not failed: the WARN logged then says what happens to it.
                    DeliveryError::Abandoned { .. } => String::new(),
                };
                // Logged with the cycle's other errors (`app::log_report`).
                if !msg.is_empty() {
                    report.errors.push(msg);
                }
            }
        }
        report.inventory = Some(inv);
        Ok(())
    }

    /// Forgets what the delivery stage's own namespaces hold from before `before_us`: tool calls
    /// sent (every agent's registry, also of agents no longer discovered), records of units
    /// confirmed in part, unreadable rows and records quarantined. None of them grows without bound.
    fn prune_registries(&self, before_us: i64) -> Result<u64, StateError> {
        let mut removed = 0;
        for prefix in [
            TOOL_CALL_PREFIX,
            PARTLY_SENT_PREFIX,
            QUARANTINED_PREFIX,
            QUARANTINED_RECORD_PREFIX,
        ] {
            for ns in self.state.namespaces_with_prefix(prefix)? {
                removed += self.state.prune(&ns, before_us)?;
            }
        }
        Ok(removed)
    }

    /// The delivery stage: map, batch, send, checkpoint. Takes every chunk of `first`
    /// (inventory, trace sources) before any of `tables`. What the sink confirmed is
    /// checkpointed whatever ends delivery (the end, a failure, shutdown).
    async fn deliver(
        &self,
        first: mpsc::Receiver<Chunk>,
        tables: mpsc::Receiver<Chunk>,
        agents: BTreeMap<String, Arc<AgentInfo>>,
        shutdown: Shutdown,
    ) -> (DeliveryTotals, Result<(), DeliveryError>) {
        let mut totals = DeliveryTotals {
            stop: Some(shutdown.clone()),
            ..Default::default()
        };
        let mut pending = Pending::default();
        self.sink.prepare().await;
        let result = self
            .deliver_chunks(first, tables, agents, shutdown, &mut totals, &mut pending)
            .await;
        let committed = self.commit_pending(&mut pending).await;
        // A commit that failed outranks the sink's error: it stops the run. The totals count
        // what the sink confirmed either way.
        (totals, committed.and(result))
    }

    /// The loop of [`Self::deliver`]; confirmed rows not yet committed stay in `pending`.
    async fn deliver_chunks(
        &self,
        mut first: mpsc::Receiver<Chunk>,
        mut tables: mpsc::Receiver<Chunk>,
        agents: BTreeMap<String, Arc<AgentInfo>>,
        shutdown: Shutdown,
        totals: &mut DeliveryTotals,
        pending: &mut Pending,
    ) -> Result<(), DeliveryError> {
        let mut ledger = ToolCallLedger {
            partly_sent: PartlySent::load(&self.state)?,
            quarantined: KnownQuarantined::load(&self.state)?,
            ..Default::default()
        };
        let mut first_open = true;
        loop {
            let next = if first_open {
                match first.recv().await {
                    Some(c) => Some(c),
                    None => {
                        first_open = false;
                        continue;
                    }
                }
            } else {
                tables.recv().await
            };
            let Some(mut chunk) = next else {
                break;
            };
            if shutdown.is_triggered() {
                return Ok(());
            }
            // Every earlier chunk was flushed and checkpointed: its calls are in the registry or
            // were not sent.
            self.commit_pending(pending).await?;
            ledger.start_chunk();
            self.quarantine_unreadable(&chunk, pending)?;
            let mut batch = Batch::default();
            // Units with ready records (traces, inventory): validated, batched, checkpointed alike.
            ledger.prefetch(
                &self.state,
                CallSource::Trace,
                chunk
                    .prepared
                    .iter()
                    .map(|u| (u.host.as_str(), u.records.as_slice())),
            )?;
            for unit in &chunk.prepared {
                let unit_ref = UnitRef {
                    table: &chunk.table,
                    by_id: chunk.by_id,
                    agent: &unit.agent,
                    host: &unit.host,
                    id: &unit.id,
                    time_us: unit.time_us,
                    source: CallSource::Trace,
                };
                if self
                    .stage(
                        &mut batch,
                        &mut ledger,
                        unit_ref,
                        (unit.records.clone(), 0),
                        totals,
                        pending,
                    )
                    .await?
                    && shutdown.is_triggered()
                {
                    return Ok(());
                }
            }
            if !batch.is_empty() {
                let agent = chunk
                    .prepared
                    .first()
                    .map(|u| u.agent.clone())
                    .unwrap_or_default();
                self.flush(
                    &mut batch,
                    (&chunk.table, chunk.by_id),
                    &agent,
                    totals,
                    pending,
                )
                .await?;
            }
            if chunk.executions.is_empty() {
                continue;
            }
            let Some(agent) = agents.get(&chunk.table) else {
                continue;
            };
            let ctx = AgentContext {
                agent: &agent.name,
                host: &agent.host,
                path: &agent.path,
                account_id: &self.settings.account_id,
            };
            // Mapped a group at a time: one registry lookup per group, memory stays bounded.
            // The payloads move from the executions into the records (no copy).
            for group in chunk.executions.chunks_mut(LOOKUP_GROUP) {
                let mapped: Vec<traffic::Mapped> = group
                    .iter_mut()
                    .map(|exec| traffic::map_execution_taking(&ctx, exec, &self.settings.map))
                    .collect();
                ledger.prefetch(
                    &self.state,
                    CallSource::Row,
                    mapped
                        .iter()
                        .map(|m| (agent.host.as_str(), m.records.as_slice())),
                )?;
                for (exec, m) in group.iter().zip(mapped) {
                    let unit_ref = UnitRef {
                        table: &chunk.table,
                        by_id: chunk.by_id,
                        agent: &agent.name,
                        host: &agent.host,
                        id: &exec.request_id,
                        time_us: exec.request_time.timestamp_micros(),
                        source: CallSource::Row,
                    };
                    if self
                        .stage(
                            &mut batch,
                            &mut ledger,
                            unit_ref,
                            (m.records, m.truncated_payloads),
                            totals,
                            pending,
                        )
                        .await?
                        && shutdown.is_triggered()
                    {
                        return Ok(());
                    }
                }
            }
            if !batch.is_empty() {
                self.flush(
                    &mut batch,
                    (&chunk.table, chunk.by_id),
                    &agent.name,
                    totals,
                    pending,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Quarantines the rows of `chunk` that could not be read (no id or time), each once: a row
    /// read again by a later cycle (one without an id stays in the window the late pass reads)
    /// is known by the SHA-256 of its content (state namespace `quarantined:<namespace>`, kept a
    /// lookback like delivered ids) and not quarantined twice.
    fn quarantine_unreadable(
        &self,
        chunk: &Chunk,
        pending: &mut Pending,
    ) -> Result<(), StateError> {
        if chunk.unreadable.is_empty() {
            return Ok(());
        }
        let ns = quarantined_namespace(&chunk.table);
        let keys: Vec<String> = chunk
            .unreadable
            .iter()
            .map(|(_, raw)| content_key(raw))
            .collect();
        let known = self
            .state
            .delivered_among(&ns, keys.iter().map(String::as_str))?;
        let now_us = chrono::Utc::now().timestamp_micros();
        for ((reason, raw), key) in chunk.unreadable.iter().zip(keys) {
            if known.contains(&key) {
                continue;
            }
            self.quarantine.put(&chunk.table, "", reason, raw)?;
            pending.rows.push((ns.clone(), key, now_us, true));
        }
        Ok(())
    }

    /// One unit's records into the batch: tool calls already sent dropped, redacted, validated
    /// and encoded. `cut`: payloads its mapping cut. What staging counts (payloads cut, values
    /// masked, tool-call records left out) goes with the unit into the batch and into the totals
    /// only once the unit is committed ([`UnitCounts`]). Returns whether a batch was sent to make
    /// room.
    async fn stage(
        &self,
        batch: &mut Batch,
        ledger: &mut ToolCallLedger,
        unit: UnitRef<'_>,
        (records, cut): (Vec<traffic::AktoRecord>, u32),
        totals: &mut DeliveryTotals,
        pending: &mut Pending,
    ) -> Result<bool, DeliveryError> {
        let mut mapped = traffic::Mapped {
            records,
            truncated_payloads: 0,
            tool_calls: 0,
        };
        let mut counts = UnitCounts {
            truncated: u64::from(cut),
            ..Default::default()
        };
        let before = ledger.dropped;
        let calls = ledger.filter(unit.host, unit.source, &mut mapped.records);
        counts.tool_calls_deduplicated = ledger.dropped - before;
        if ledger.dropped > before {
            tracing::debug!(
                "{}: {} tool call record(s) of {} not sent: the same call was already sent from \
                 the other source (trace or inference row)",
                unit.table,
                ledger.dropped - before,
                unit.id
            );
        }
        if let Some(r) = &self.settings.redactor {
            counts.redacted = r.redact_mapped(&mut mapped, self.settings.map.max_string_bytes);
            // A payload that masking made longer than the limit was cut: count it too.
            counts.truncated += u64::from(mapped.truncated_payloads);
        }
        let (mut records, mut calls, mut meta) = self.accept(
            unit,
            mapped.records.iter().zip(calls),
            &mut counts.truncated,
            &mut ledger.quarantined,
            pending,
        )?;
        let before = records.len();
        ledger
            .partly_sent
            .filter(unit.table, unit.id, &mut records, &mut calls, &mut meta);
        if records.len() < before {
            tracing::info!(
                "{}: {} is sent again after a failure that confirmed only part of it; {} of its \
                 records were confirmed then and are not sent again",
                unit.table,
                unit.id,
                before - records.len()
            );
        }
        self.add_unit(batch, unit, (records, calls, meta), counts, totals, pending)
            .await
    }

    /// Validates and encodes records, cutting the payloads of one longer than the sink takes;
    /// what Akto would reject goes to quarantine, once: a record quarantined before (its unit is
    /// staged again because other records of it were not confirmed) is left out without a new
    /// quarantine entry, and so is one the sink refused before. Returns the records, by their
    /// index the tool call ids they carry, and for each record its [`RecordMeta`].
    fn accept<'r>(
        &self,
        unit: UnitRef<'_>,
        records: impl Iterator<Item = (&'r traffic::AktoRecord, Option<String>)>,
        truncated: &mut u64,
        known: &mut KnownQuarantined,
        pending: &mut Pending,
    ) -> Result<Staged, StateError> {
        let mut out = Vec::new();
        let mut calls = Vec::new();
        let mut metas = Vec::new();
        // Hashing the records only of a unit that had a record quarantined before.
        let check_known = known.has_unit(unit.table, unit.id);
        for (rec, call) in records {
            // What Akto accepts but its runtime would drop (status, path, empty JSON body) goes
            // out in the equivalent form it keeps; the common record is borrowed as is.
            let rec = traffic::for_akto_runtime(rec);
            let mut json = traffic::encode(&rec);
            // The limit as Akto will measure this record (it re-encodes it, escaping more).
            let max = self.sink.max_record_bytes_for(&json);
            let mut key = check_known.then(|| content_key(&json));
            if let Some(k) = &key {
                if known.contains(unit.table, unit.id, k) {
                    tracing::debug!(
                        "{}: a record of {} was quarantined before and is left out",
                        unit.table,
                        unit.id
                    );
                    continue;
                }
            }
            if let Err(v) = traffic::validate(&rec) {
                let k = key.take().unwrap_or_else(|| content_key(&json));
                self.quarantine_once(unit, &v.to_string(), &json, k, known, pending)?;
                continue;
            }
            let mut uncut = None;
            if json.len() > max {
                let k = key.take().unwrap_or_else(|| content_key(&json));
                uncut = Some(k);
                // Rare (a record over the sink's limit, or one Akto's re-encoding would take
                // over it): cut.
                match self.cut_to_fit(&rec, json.len()) {
                    Ok((cut, cuts)) => {
                        json = cut;
                        *truncated += u64::from(cuts);
                    }
                    Err(why) => {
                        let reason = format!(
                            "the record is {} bytes and {why} under the {} sink's {}-byte limit \
                             per record ({})",
                            json.len(),
                            self.sink.name(),
                            self.sink.max_record_bytes(),
                            self.sink.limit_setting()
                        );
                        let k = uncut.take().unwrap_or_default();
                        self.quarantine_once(unit, &reason, &json, k, known, pending)?;
                        continue;
                    }
                }
            }
            if let Some(c) = call {
                calls.push((out.len(), c));
            }
            out.push(OutRecord {
                key: unit.host.to_string(),
                json,
            });
            metas.push(RecordMeta {
                uncut,
                tool: rec.path.starts_with("/tools/"),
            });
        }
        Ok((out, calls, metas))
    }

    /// Quarantines a record of `unit` found unsendable before it was sent, and remembers its
    /// key (the content key of the record before any cut) with the next checkpoint, so that the
    /// unit staged again does not quarantine it again.
    fn quarantine_once(
        &self,
        unit: UnitRef<'_>,
        reason: &str,
        json: &str,
        key: String,
        known: &mut KnownQuarantined,
        pending: &mut Pending,
    ) -> Result<(), StateError> {
        self.quarantine.put(unit.table, unit.id, reason, json)?;
        pending.rows.push((
            quarantined_record_namespace(unit.table),
            partly_sent_key(unit.id, &key),
            chrono::Utc::now().timestamp_micros(),
            true,
        ));
        known.insert(unit.table, unit.id, key);
        Ok(())
    }

    /// Adds one unit's records to the batch, sending the batch first when the unit would not
    /// fit. Returns whether a batch was sent.
    async fn add_unit(
        &self,
        batch: &mut Batch,
        unit: UnitRef<'_>,
        (records, calls, meta): Staged,
        counts: UnitCounts,
        totals: &mut DeliveryTotals,
        pending: &mut Pending,
    ) -> Result<bool, DeliveryError> {
        let max_records = self.settings.batch_size.max(1);
        let max_bytes = MAX_BODY_BYTES - BODY_WRAPPER_BYTES - 1024;
        let bytes: usize = records.iter().map(|r| r.json.len() + 1).sum();
        let mut sent = false;
        if !batch.is_empty()
            && (batch.records.len() + records.len() > max_records
                || batch.bytes + bytes > max_bytes)
        {
            self.flush(batch, (unit.table, unit.by_id), unit.agent, totals, pending)
                .await?;
            sent = true;
        }
        batch.push(unit, (records, calls, meta), counts, bytes);
        Ok(sent)
    }

    /// Sends one batch of the namespace `table` (its units indexed by id too when `by_id`) and
    /// adds the executions whose records were all confirmed, with the tool calls of their
    /// delivered records (registry), to the pending checkpoint; commits it when
    /// it holds `checkpoint_batches` batches or the sink failed.
    async fn flush(
        &self,
        batch: &mut Batch,
        (table, by_id): (&str, bool),
        agent: &str,
        totals: &mut DeliveryTotals,
        pending: &mut Pending,
    ) -> Result<(), DeliveryError> {
        let b = std::mem::take(batch);
        if !b.records.is_empty() {
            if pending.probe.is_none() {
                pending.probe = b
                    .execs
                    .first()
                    .map(|(id, t, _)| (table.to_string(), id.clone(), *t));
            }
            pending.records += b.records.len();
            let probe = pending
                .probe
                .as_ref()
                .map(|(t, id, time_us)| (t.as_str(), id.as_str(), *time_us));
            self.state.mark_in_flight(pending.records, probe)?;
        }
        let result = if b.records.is_empty() {
            Ok(Default::default())
        } else {
            match self
                .deliver_within_grace(&b.records, totals.stop.clone())
                .await
            {
                Some(r) => r,
                None => return Err(self.abandon(&b, table, pending).await),
            }
        };
        let (done, rejected, failure): (Vec<usize>, Vec<(usize, String)>, Option<SinkError>) =
            match result {
                Ok(outcome) => {
                    if let Some(reason) = outcome.whole_batch_refused {
                        totals.refused_whole.note(reason);
                    }
                    (outcome.delivered, outcome.rejected, None)
                }
                Err(e) => (
                    e.delivered_before_failure().to_vec(),
                    e.rejected_before_failure().to_vec(),
                    Some(e),
                ),
            };
        if !done.is_empty() {
            self.progress.note();
        }
        let mut settled = vec![false; b.records.len()];
        let mut delivered = vec![false; b.records.len()];
        for i in &done {
            if let Some(s) = settled.get_mut(*i) {
                *s = true;
            }
            if let Some(d) = delivered.get_mut(*i) {
                *d = true;
            }
        }
        // A refused record settles its unit only once it is in quarantine. When that write
        // fails, the rest of the batch is still recorded below (what the sink took must not be
        // sent again) and the error is returned after that.
        // Its key is remembered with the checkpoint: a unit staged again (another of its
        // records was not confirmed) leaves it out instead of sending and quarantining it again.
        let mut quarantine_failed = None;
        for (i, reason) in &rejected {
            if let (Some(s), Some(rec), Some(meta)) =
                (settled.get_mut(*i), b.records.get(*i), b.meta.get(*i))
            {
                let owner = b.owner_of(*i).map(|e| e.0.as_str()).unwrap_or("");
                match self.quarantine.put(
                    table,
                    owner,
                    &format!("the sink refused it: {reason}"),
                    &rec.json,
                ) {
                    Ok(()) => {
                        *s = true;
                        pending.rows.push((
                            quarantined_record_namespace(table),
                            partly_sent_key(owner, &record_key(&rec.json, &meta.uncut)),
                            chrono::Utc::now().timestamp_micros(),
                            true,
                        ));
                    }
                    Err(e) => {
                        quarantine_failed.get_or_insert(e);
                    }
                }
            }
        }
        let committed: Vec<bool> = b
            .execs
            .iter()
            .map(|(_, _, range)| range.clone().all(|i| settled[i]))
            .collect();
        pending.batches += 1;
        for ((id, t, _), _) in b.execs.iter().zip(&committed).filter(|(_, c)| **c) {
            pending
                .rows
                .push((table.to_string(), id.clone(), *t, by_id));
        }
        // Counted once, with the unit's commit: a unit left open is staged (and counted) again
        // by the next cycle.
        for (counts, _) in b.counts.iter().zip(&committed).filter(|(_, c)| **c) {
            totals.truncated += counts.truncated;
            totals.tool_calls_deduplicated += counts.tool_calls_deduplicated;
            totals.redacted.add(&counts.redacted);
        }
        // A unit confirmed in part (its records split over requests or partitions, and a later
        // one failed) is read and sent again: its records confirmed now are remembered, so
        // that only the others are sent then.
        let partial_ns = partly_sent_namespace(table);
        for ((id, t, range), _) in b.execs.iter().zip(&committed).filter(|(_, c)| !**c) {
            for i in range.clone().filter(|i| delivered[*i]) {
                pending.rows.push((
                    partial_ns.clone(),
                    partly_sent_key(id, &record_key(&b.records[i].json, &b.meta[i].uncut)),
                    *t,
                    true,
                ));
            }
        }
        // Every delivered tool call enters the registry, also of a unit confirmed in part.
        for c in b
            .calls
            .iter()
            .filter(|c| delivered.get(c.record).copied().unwrap_or(false))
        {
            pending
                .rows
                .push((c.namespace.clone(), c.call_id.clone(), c.time_us, true));
        }
        let commit = if failure.is_some()
            || quarantine_failed.is_some()
            || pending.batches >= self.settings.checkpoint_batches.max(1)
        {
            self.commit_pending(pending).await
        } else {
            Ok(())
        };
        // What the sink confirmed counts also when its checkpoint failed (those records are
        // sent again at the next start, announced then).
        totals.records_sent += done.len() as u64;
        totals.tool_calls += done
            .iter()
            .filter(|i| b.meta.get(**i).is_some_and(|m| m.tool))
            .count() as u64;
        for i in &done {
            let owner = b.execs.iter().position(|(_, _, r)| r.contains(i));
            let who = owner
                .and_then(|k| b.agents.get(k))
                .map(String::as_str)
                .unwrap_or(agent);
            *totals.per_agent.entry(who.to_string()).or_default() += 1;
        }
        if let Err(e) = commit {
            // The state error stops the service; the sink's own failure is not lost with it.
            if let Some(f) = &failure {
                tracing::error!("delivery to {} also failed: {f}", self.sink.describe());
            }
            return Err(e);
        }
        match (failure, quarantine_failed) {
            (Some(e), _) => Err(e.into()),
            (None, Some(e)) => Err(e.into()),
            (None, None) => Ok(()),
        }
    }

    /// `rec` (`json_len` bytes encoded, over the sink's limit) with its payloads cut until it
    /// fits the limit as measured for the cut record itself (`max_record_bytes_for`: what Akto's
    /// re-encoding adds to what remains), and how many strings were cut. The first cut is to the
    /// nominal limit; a cut that Akto's re-encoding would still take over it is cut again by
    /// that overshoot, which then fits (a shorter cut keeps shorter prefixes of the payloads,
    /// whose growth is no larger). Otherwise why it cannot be cut to fit.
    fn cut_to_fit(
        &self,
        rec: &traffic::AktoRecord,
        json_len: usize,
    ) -> Result<(String, u32), &'static str> {
        let mut target = self.sink.max_record_bytes();
        for _ in 0..4 {
            let mut cut = rec.clone();
            let mut cuts = 0u32;
            if !traffic::fit_record(&mut cut, json_len, target, &mut cuts) {
                return Err("its headers alone leave no room for its payloads");
            }
            let json = traffic::encode(&cut);
            let max = self.sink.max_record_bytes_for(&json);
            if json.len() <= max {
                return Ok((json, cuts));
            }
            let over = json.len() - max;
            target = json
                .len()
                .saturating_sub(over)
                .min(target.saturating_sub(1));
        }
        Err("its payloads cut four times still grow past the limit once Akto re-encodes them")
    }

    /// Sends `records`; `None` when shutdown was requested and they were not confirmed within
    /// [`IN_FLIGHT_GRACE`] after that (the sink's call is dropped then).
    async fn deliver_within_grace(
        &self,
        records: &[OutRecord],
        stop: Option<Shutdown>,
    ) -> Option<Result<crate::sink::BatchOutcome, SinkError>> {
        let Some(mut stop) = stop else {
            return Some(self.sink.deliver(records).await);
        };
        let grace = async move {
            stop.requested().await;
            tokio::time::sleep(IN_FLIGHT_GRACE).await;
        };
        tokio::select! {
            biased;
            r = self.sink.deliver(records) => Some(r),
            () = grace => None,
        }
    }

    /// Gives up the batch `b` in flight at shutdown: the batches confirmed before it are
    /// committed, and the in-flight marker is left for `b` alone, so that the next start
    /// announces that its records (which the destination may have stored) are sent again.
    async fn abandon(&self, b: &Batch, table: &str, pending: &mut Pending) -> DeliveryError {
        let records = b.records.len();
        tracing::warn!(
            "Shutdown: the batch in flight ({records} records to {}) was not confirmed within \
             {}s; it is left unconfirmed and sent again by the next run, which says so (the \
             destination may have stored it)",
            self.sink.describe(),
            IN_FLIGHT_GRACE.as_secs()
        );
        pending.records = pending.records.saturating_sub(records);
        if let Err(e) = self.commit_pending(pending).await {
            return e;
        }
        let probe = b.execs.first().map(|(id, t, _)| (table, id.as_str(), *t));
        if let Err(e) = self.state.mark_in_flight(records, probe) {
            return e.into();
        }
        DeliveryError::Abandoned { records }
    }

    /// Commits the pending checkpoint in one durable transaction (and removes the in-flight
    /// marker), after the sink made what it accepted durable (a file's fsync). Nothing to do
    /// when no batch was sent since the last commit.
    async fn commit_pending(&self, pending: &mut Pending) -> Result<(), DeliveryError> {
        if pending.batches == 0 && pending.records == 0 && pending.rows.is_empty() {
            return Ok(());
        }
        let p = std::mem::take(pending);
        let group = format!(
            "{} record(s) in {} batch(es) the sink confirmed",
            p.records, p.batches
        );
        // Acknowledge, then checkpoint. On failure the marker stays: a restart announces them.
        self.sink.sync_confirmed().await.map_err(|e| {
            DeliveryError::Unrecorded(format!(
                "{group} could not be made durable: {e}. They are sent again at the next start \
                 (announced then). Fix: check the disk of the output file, then restart"
            ))
        })?;
        let rows: Vec<DeliveredRow<'_>> = p
            .rows
            .iter()
            .map(|(table, id, time_us, by_id)| DeliveredRow {
                table,
                id,
                time_us: *time_us,
                by_id: *by_id,
            })
            .collect();
        self.state.commit_delivered(&rows).map_err(|e| {
            let dir = self.state.path().display();
            DeliveryError::Unrecorded(match e {
                StateError::AfterCommit { .. } => format!(
                    "{e}. {group} are recorded; the store cannot be trusted for the next ones. \
                     Fix: free space on the disk of STATE_DIR ({dir}) or fix its file system, \
                     then restart"
                ),
                e => format!(
                    "{group} could not be checkpointed: {e}. They are sent again at the next \
                     start (announced then). Fix: free space on the disk of STATE_DIR ({dir}) \
                     or fix its file system, then restart"
                ),
            })
        })?;
        Ok(())
    }
}

/// What the sink confirmed since the last state commit: up to `checkpoint_batches` batches are
/// confirmed before one commit records them all (acknowledge, then checkpoint). A process
/// killed in between re-sends at most these batches, announced by the in-flight marker.
#[derive(Default)]
struct Pending {
    /// (state namespace, id, time µs, indexed by id) of settled executions and delivered tool
    /// calls.
    rows: Vec<(String, String, i64, bool)>,
    /// Batches sent since the last commit.
    batches: usize,
    /// Records sent since the last commit (the marker's count).
    records: usize,
    /// The first execution of the group (namespace, id, time µs): committed means the whole
    /// group was.
    probe: Option<(String, String, i64)>,
}

/// Waits for every reader of `readers`, adding their statistics and errors to the report and
/// the sources read completely to `completed` (with the time their next read must reach back
/// to, if any: [`TableStats::hold_from`]).
async fn join_readers(
    readers: &mut Readers,
    report: &mut CycleReport,
    completed: &mut Vec<(String, Option<i64>)>,
) {
    while let Some(joined) = readers.set.join_next().await {
        // What a reader did counts however it ended (a failed or stopped one too: its
        // statements ran, and the rows it handed on are delivered or pending).
        if let Ok((_, stats, _)) = &joined {
            report.add_table(stats);
        }
        match joined {
            Ok((table, stats, Ok(()))) => {
                completed.push((table, stats.hold_from));
            }
            Ok((_, _, Err(CollectError::Closed))) => {}
            Ok((table, _, Err(e))) => {
                // The state store refused a read or a write: an operator is needed (redb
                // refuses every write after a failed one until restart).
                report.fatal |= matches!(e, CollectError::State(_));
                let msg = format!("{table}: {e}");
                tracing::error!("reading {msg}");
                report.errors.push(msg);
            }
            Err(e) => {
                let source = readers
                    .names
                    .get(&e.id())
                    .map_or("a source", String::as_str);
                let msg = format!(
                    "{source}: its reader failed ({e}); it is read again by the next cycle. \
                     Please report this with the log"
                );
                tracing::error!("{msg}");
                report.errors.push(msg);
            }
        }
    }
}

/// The read mark recorded for a source read completely by the cycle that started at
/// `cycle_start_us`. The next read reaches back to the mark minus `lookback`; a source that saw
/// an unfinished trace started at `hold_from` gets an earlier mark, so that the trace is still
/// in the window when it has ended (a minute of margin), and its delivered ids are kept as long.
fn read_mark_holding(cycle_start_us: i64, hold_from: Option<i64>, lookback_us: i64) -> i64 {
    match hold_from {
        Some(h) => cycle_start_us.min(h.saturating_add(lookback_us) - 60_000_000),
        None => cycle_start_us,
    }
}

/// Inference-row executions mapped and looked up in the tool call registry at a time.
const LOOKUP_GROUP: usize = 64;

/// The prefix of the tool call registry's state namespaces.
pub const TOOL_CALL_PREFIX: &str = "toolcall:";

/// The state namespace of the tool calls sent on one agent host.
pub fn tool_call_namespace(host: &str) -> String {
    format!("{TOOL_CALL_PREFIX}{host}")
}

/// State namespaces `partly-sent:<namespace>`: records confirmed of units whose other records
/// were not (id `<unit id>#<record key>`, time = the unit's).
pub const PARTLY_SENT_PREFIX: &str = "partly-sent:";

fn partly_sent_namespace(table: &str) -> String {
    format!("{PARTLY_SENT_PREFIX}{table}")
}

/// State namespaces `quarantined:<namespace>`: unreadable rows already quarantined (id: the
/// [`content_key`] of the row). Looked up per chunk, for the rows it could not read.
pub const QUARANTINED_PREFIX: &str = "quarantined:";

fn quarantined_namespace(table: &str) -> String {
    format!("{QUARANTINED_PREFIX}{table}")
}

/// State namespaces `quarantined-record:<namespace>`: records already quarantined, found
/// unsendable or refused by the sink (id: `<unit id>#<record key>`, [`partly_sent_key`] of the
/// [`record_key`], the record before any cut). Apart from the unreadable rows: a table whose rows
/// lack ids keeps one key per row for a lookback, and loading those keys at every delivery is
/// not needed.
pub const QUARANTINED_RECORD_PREFIX: &str = "quarantined-record:";

fn quarantined_record_namespace(table: &str) -> String {
    format!("{QUARANTINED_RECORD_PREFIX}{table}")
}

/// The records quarantined before, by unit: rare, so all of them are loaded when delivery
/// starts, and what this delivery quarantines is added. Only the records of a unit listed here
/// are hashed to be looked up.
#[derive(Default)]
struct KnownQuarantined {
    /// (namespace, unit id) of the units.
    units: HashSet<(String, String)>,
    /// (namespace, `<unit id>#<record key>`) of their quarantined records.
    keys: HashSet<(String, String)>,
}

impl KnownQuarantined {
    fn load(state: &StateStore) -> Result<KnownQuarantined, StateError> {
        let mut out = KnownQuarantined::default();
        for ns in state.namespaces_with_prefix(QUARANTINED_RECORD_PREFIX)? {
            let table = &ns[QUARANTINED_RECORD_PREFIX.len()..];
            for key in state.ids_in_range(&ns, i64::MIN, i64::MAX)? {
                if let Some((unit, _)) = key.rsplit_once('#') {
                    out.units.insert((table.to_string(), unit.to_string()));
                }
                out.keys.insert((table.to_string(), key));
            }
        }
        Ok(out)
    }

    fn has_unit(&self, table: &str, unit: &str) -> bool {
        self.units.contains(&(table.to_string(), unit.to_string()))
    }

    fn contains(&self, table: &str, unit: &str, key: &str) -> bool {
        self.keys
            .contains(&(table.to_string(), partly_sent_key(unit, key)))
    }

    fn insert(&mut self, table: &str, unit: &str, key: String) {
        self.units.insert((table.to_string(), unit.to_string()));
        self.keys
            .insert((table.to_string(), partly_sent_key(unit, &key)));
    }
}

/// The first 128 bits of the SHA-256 of `text`, in hex.
fn content_key(text: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A record's key within its unit: its [`content_key`]. The mapping is deterministic, so the
/// same row gives the same record again (a change of configuration that changes the record, e.g.
/// redaction, sends it again).
fn partly_sent_key(unit: &str, record_key: &str) -> String {
    format!("{unit}#{record_key}")
}

/// A record's key in the `partly-sent` and `quarantined-record` registries: the content key of the
/// record as mapped, before any cut to a sink's per-record limit (`uncut`, kept for the records
/// that were cut). A limit that changes between cycles (a Kafka topic's) then does not change
/// the key.
fn record_key(json: &str, uncut: &Option<String>) -> String {
    match uncut {
        Some(key) => key.clone(),
        None => content_key(json),
    }
}

/// A unit's records as staged for a batch: the records, by index the tool call ids they carry,
/// and per record its [`RecordMeta`].
type Staged = (Vec<OutRecord>, Vec<RecordCall>, Vec<RecordMeta>);

/// What delivery keeps about a staged record besides its JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RecordMeta {
    /// Its content key before a cut, when it was cut ([`record_key`]).
    uncut: Option<String>,
    /// A tool-call record (`/tools/<name>`, from an inference row or a trace's TOOL span):
    /// counted in `tool_calls` once the sink confirmed it.
    tool: bool,
}

/// Records confirmed of units that were sent only in part (see [`Connector::flush`]): rare, so
/// all of them are loaded when delivery starts.
#[derive(Default)]
struct PartlySent {
    /// (namespace, unit id) of the units.
    units: HashSet<(String, String)>,
    /// (namespace, `<unit id>#<record key>`) of their confirmed records.
    records: HashSet<(String, String)>,
}

impl PartlySent {
    fn load(state: &StateStore) -> Result<PartlySent, StateError> {
        let mut out = PartlySent::default();
        for ns in state.namespaces_with_prefix(PARTLY_SENT_PREFIX)? {
            let table = ns[PARTLY_SENT_PREFIX.len()..].to_string();
            for key in state.ids_in_range(&ns, i64::MIN, i64::MAX)? {
                if let Some((unit, _)) = key.rsplit_once('#') {
                    out.units.insert((table.clone(), unit.to_string()));
                }
                out.records.insert((table.clone(), key));
            }
        }
        Ok(out)
    }

    /// Drops the records of unit `id` of `table` that were confirmed before (and renumbers the
    /// tool calls they carry).
    fn filter(
        &self,
        table: &str,
        id: &str,
        records: &mut Vec<OutRecord>,
        calls: &mut Vec<RecordCall>,
        meta: &mut Vec<RecordMeta>,
    ) {
        if self.units.is_empty() || !self.units.contains(&(table.to_string(), id.to_string())) {
            return;
        }
        let keep: Vec<bool> = records
            .iter()
            .zip(meta.iter())
            .map(|(r, m)| {
                !self.records.contains(&(
                    table.to_string(),
                    partly_sent_key(id, &record_key(&r.json, &m.uncut)),
                ))
            })
            .collect();
        let mut new_index = Vec::with_capacity(keep.len());
        let mut next = 0;
        for k in &keep {
            new_index.push(next);
            next += usize::from(*k);
        }
        calls.retain_mut(|(i, _)| {
            let kept = keep.get(*i).copied().unwrap_or(false);
            if kept {
                *i = new_index[*i];
            }
            kept
        });
        let mut it = keep.iter();
        records.retain(|_| it.next().copied().unwrap_or(true));
        let mut it = keep.iter();
        meta.retain(|_| it.next().copied().unwrap_or(true));
    }
}

/// Where a tool call record comes from: an MLflow trace or OTel span table (a TOOL span), or an
/// inference row. The registry merges a call only across the two: each source sends its own
/// calls once by their units, and an agent that reuses call ids (`call_0` in every request,
/// `functions.lookup:0`) makes distinct calls with the same id, which must all be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallSource {
    Trace,
    Row,
}

impl CallSource {
    /// The registry key of a call of this source sent with this id (the separator, U+001F, is
    /// never part of a call id). Registries of state format 3 held bare ids of either source: the
    /// upgrade registers each under both keys ([`tool_call_keys`]).
    fn key(self, id: &str) -> String {
        match self {
            CallSource::Trace => format!("trace\u{1f}{id}"),
            CallSource::Row => format!("row\u{1f}{id}"),
        }
    }

    /// The source whose calls this one's are merged with.
    fn other(self) -> CallSource {
        match self {
            CallSource::Trace => CallSource::Row,
            CallSource::Row => CallSource::Trace,
        }
    }
}

/// The registry keys of a call id of both sources: what a call registered by a release that
/// did not tell them apart counts as (`StateStore`'s format 4 upgrade).
pub(crate) fn tool_call_keys(id: &str) -> [String; 2] {
    [CallSource::Trace.key(id), CallSource::Row.key(id)]
}

/// Which tool calls the other source sent already (see the module doc): the registry's answer
/// for the units being staged.
#[derive(Default)]
struct ToolCallLedger {
    /// Records of units that were sent only in part before (loaded when delivery starts).
    partly_sent: PartlySent,
    /// Records and rows quarantined before (loaded when delivery starts).
    quarantined: KnownQuarantined,
    /// `(host, call id)` that the registry holds as sent by the other source (or by a release
    /// that did not tell the sources apart), found by the last [`ToolCallLedger::prefetch`].
    registered: HashSet<(String, String)>,
    /// Records dropped so far.
    dropped: u64,
}

impl ToolCallLedger {
    /// A new chunk: the previous one was flushed and checkpointed, so its calls are in the
    /// registry (delivered) or were not sent (refused by the sink) and may be sent by the other
    /// source. A chunk holds units of one source (a trace reader's, or a table reader's).
    fn start_chunk(&mut self) {
        self.registered.clear();
    }

    /// Looks up, once per host, which tool calls of these records (of `source`) the registry
    /// holds as sent by the other source.
    fn prefetch<'a>(
        &mut self,
        state: &StateStore,
        source: CallSource,
        units: impl Iterator<Item = (&'a str, &'a [traffic::AktoRecord])>,
    ) -> Result<(), StateError> {
        self.registered.clear();
        let mut by_host: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (host, records) in units {
            for id in records.iter().filter_map(crate::traces::tool_call_id) {
                by_host
                    .entry(host)
                    .or_default()
                    .push(source.other().key(&id));
            }
        }
        for (host, keys) in by_host {
            let ns = tool_call_namespace(host);
            for key in state.delivered_among(&ns, keys.iter().map(String::as_str))? {
                let id = key
                    .strip_prefix(&source.other().key(""))
                    .map_or(key.as_str(), |id| id);
                self.registered.insert((host.to_string(), id.to_string()));
            }
        }
        Ok(())
    }

    /// Drops the records of tool calls the other source already sent; returns, for each record
    /// kept, the registry key of the call it carries (registered once the record is delivered).
    fn filter(
        &mut self,
        host: &str,
        source: CallSource,
        records: &mut Vec<traffic::AktoRecord>,
    ) -> Vec<Option<String>> {
        let mut calls = Vec::with_capacity(records.len());
        records.retain(|r| {
            let Some(id) = crate::traces::tool_call_id(r) else {
                calls.push(None);
                return true;
            };
            let key = (host.to_string(), id);
            if self.registered.contains(&key) {
                self.dropped += 1;
                return false;
            }
            calls.push(Some(source.key(&key.1)));
            true
        });
        calls
    }
}

/// The unit being staged.
#[derive(Clone, Copy)]
struct UnitRef<'a> {
    /// Its state namespace.
    table: &'a str,
    /// The namespace's units are looked up by id (`Chunk::by_id`).
    by_id: bool,
    agent: &'a str,
    host: &'a str,
    id: &'a str,
    time_us: i64,
    /// Where its tool call records come from.
    source: CallSource,
}

/// What the delivery stage counted: records the sink confirmed (`records_sent`, `tool_calls`,
/// `per_agent`), and the [`UnitCounts`] of the units committed.
#[derive(Default)]
struct DeliveryTotals {
    /// Shutdown, watched while a batch is in flight ([`IN_FLIGHT_GRACE`]); `None`: never.
    stop: Option<Shutdown>,
    redacted: RedactionCounts,
    records_sent: u64,
    truncated: u64,
    tool_calls: u64,
    tool_calls_deduplicated: u64,
    per_agent: BTreeMap<String, u64>,
    /// Batches whose every record the sink refused ([`crate::sink::BatchOutcome::whole_batch_refused`]).
    refused_whole: RefusedWhole,
}

/// Batches of two or more records the sink refused every record of, with the same reason. The
/// records are quarantined (settled, not sent again), but a destination that refuses everything
/// is more likely misconfigured than fed bad records: the cycle fails, with one error for all
/// such batches of the cycle (the first reason and how many batches).
#[derive(Debug, Default)]
struct RefusedWhole {
    first: Option<String>,
    batches: u64,
}

impl RefusedWhole {
    fn note(&mut self, reason: String) {
        self.batches += 1;
        self.first.get_or_insert(reason);
    }

    /// The cycle's error, if any batch was refused whole.
    fn error(&self) -> Option<String> {
        let first = self.first.as_deref()?;
        Some(if self.batches > 1 {
            format!(
                "{first} ({} batches were refused whole this cycle)",
                self.batches
            )
        } else {
            first.to_string()
        })
    }
}

/// What staging one unit counted. Added to the cycle's totals when the unit is committed (every
/// record settled), not when it is staged: a unit that a failed or stopped cycle left open is
/// staged again by the next one, and counting it at every staging would count it once per
/// retry (an hour of Akto outage: a dozen times).
#[derive(Debug, Clone, Copy, Default)]
struct UnitCounts {
    /// Payloads cut: by the mapping, after masking, to the sink's per-record limit.
    truncated: u64,
    /// Values masked.
    redacted: RedactionCounts,
    /// Tool-call records left out: the same call was already sent.
    tool_calls_deduplicated: u64,
}

/// `(index of a unit's record, the tool call id it carries)`.
type RecordCall = (usize, String);

/// A tool call a batched record carries, registered when the record is delivered.
struct BatchedCall {
    /// Index into `Batch::records`.
    record: usize,
    /// `toolcall:<host>`.
    namespace: String,
    call_id: String,
    /// The unit's time.
    time_us: i64,
}

/// Records of whole executions, sent together so an execution is checkpointed as a unit.
#[derive(Default)]
struct Batch {
    records: Vec<OutRecord>,
    /// Per record: what else delivery keeps about it.
    meta: Vec<RecordMeta>,
    /// (request id, time µs, its records' indices)
    execs: Vec<(String, i64, std::ops::Range<usize>)>,
    /// The agent of each entry of `execs` (a prepared-units batch mixes agents).
    agents: Vec<String>,
    /// What staging counted of each entry of `execs`.
    counts: Vec<UnitCounts>,
    /// Tool calls of the records, for the registry.
    calls: Vec<BatchedCall>,
    bytes: usize,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.execs.is_empty()
    }
    fn push(
        &mut self,
        unit: UnitRef<'_>,
        (records, calls, meta): Staged,
        counts: UnitCounts,
        bytes: usize,
    ) {
        self.agents.push(unit.agent.to_string());
        self.counts.push(counts);
        let start = self.records.len();
        let namespace = tool_call_namespace(unit.host);
        self.calls
            .extend(calls.into_iter().map(|(i, call_id)| BatchedCall {
                record: start + i,
                namespace: namespace.clone(),
                call_id,
                time_us: unit.time_us,
            }));
        self.records.extend(records);
        self.meta.extend(meta);
        self.execs
            .push((unit.id.to_string(), unit.time_us, start..self.records.len()));
        self.bytes += bytes;
    }
    fn owner_of(&self, i: usize) -> Option<&(String, i64, std::ops::Range<usize>)> {
        self.execs.iter().find(|(_, _, r)| r.contains(&i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::Prepared;
    use crate::traces::{span_records, tool_call_id, Span, TraceMeta, TraceSource};
    use crate::traffic::{Execution, TableFormat};
    use serde_json::{json, Value};

    const HOST: &str = "bot.ai-agent.ws";
    const TABLE: &str = "c.s.bot_payload";

    /// A trace unit with an LLM span and one TOOL span per call id.
    fn trace_unit(trace: &str, time_us: i64, calls: &[&str]) -> Prepared {
        let mut spans = vec![Span::from_json(&json!({"trace_id": trace, "span_id": "l",
            "parent_span_id": "r", "name": "llm", "attributes": {"mlflow.spanType": "\"LLM\""}}))];
        for (k, c) in calls.iter().enumerate() {
            spans.push(Span::from_json(
                &json!({"trace_id": trace, "span_id": format!("t{k}"),
                "parent_span_id": "r", "name": "lookup", "start_time_unix_nano": 1_000_000_000i64,
                "end_time_unix_nano": 1_250_000_000i64, "status": {"code": "STATUS_CODE_OK"},
                "attributes": {"mlflow.spanType": "\"TOOL\"", "mlflow.spanInputs": "{\"q\":1}",
                    "gen_ai.tool.call.id": json!(c).to_string()}}),
            ));
        }
        let source = TraceSource {
            experiment_id: "1".into(),
            agent: "bot".into(),
            host: HOST.into(),
            execution_path: None,
        };
        let meta = TraceMeta {
            trace_id: trace.into(),
            time_us,
            location: "mlflow:1".into(),
            ..Default::default()
        };
        Prepared {
            id: trace.into(),
            time_us,
            agent: "bot".into(),
            host: HOST.into(),
            records: span_records(&source, "1000000", &meta, &spans),
        }
    }

    /// An inference row (ResponsesAgent) that made these tool calls.
    fn execution(id: &str, time_us: i64, calls: &[&str]) -> Execution {
        let mut output: Vec<Value> = Vec::new();
        for c in calls {
            output.push(json!({"type": "function_call", "call_id": c, "name": "lookup", "arguments": "{\"q\":1}"}));
            output.push(
                json!({"type": "function_call_output", "call_id": c, "output": "{\"ok\":true}"}),
            );
        }
        Execution {
            table: TABLE.into(),
            format: TableFormat::AiGateway,
            request_id: id.into(),
            client_request_id: None,
            request_time: chrono::DateTime::from_timestamp_micros(time_us).unwrap_or_default(),
            status_code: Some(200),
            duration_ms: Some(5),
            request: Some(
                json!({"input": [{"role": "user", "content": "hi"}]})
                    .to_string()
                    .into(),
            ),
            response: Some(json!({"output": output}).to_string().into()),
            logging_error_codes: Vec::new(),
            served_entity_id: None,
            requester: None,
            request_metadata: None,
        }
    }

    fn connector(dir: &std::path::Path) -> Connector {
        let sink = AnySink::File(crate::sink::FileSink::new(Some(dir.join("out.jsonl"))).unwrap());
        connector_with(dir, sink)
    }

    /// A strict stand-in and a connector sending to it, the HTTP sink configured by `tune`.
    #[test]
    fn registries_keep_what_a_failed_source_may_still_catch_up_on() {
        let min = 60_000_000i64;
        let day = Duration::from_secs(24 * 3600);
        // Every source read: a lookback and 10 minutes back.
        assert_eq!(
            registry_horizon(1000 * min, None, 70 * min, day, false),
            930 * min
        );
        assert_eq!(
            registry_horizon(1000 * min, Some(1005 * min), 70 * min, day, false),
            930 * min
        );
        // One failed: back to the catch-up floor and 10 minutes, where it resumes at worst.
        assert_eq!(
            registry_horizon(2000 * min, None, 70 * min, day, true),
            2000 * min - 24 * 60 * min - 10 * min
        );
        // The local clock runs an hour ahead of the sources: the horizon counts from the
        // newest source time delivered, not from the clock.
        assert_eq!(
            registry_horizon(1060 * min, Some(1000 * min), 70 * min, day, false),
            930 * min
        );
        assert_eq!(
            registry_horizon(1060 * min, Some(1000 * min), 70 * min, day, true),
            1000 * min - 24 * 60 * min - 10 * min
        );
    }

    async fn http_connector(
        dir: &std::path::Path,
        tune: impl FnOnce(&mut crate::sink::HttpSinkConfig),
    ) -> (akto_standin::StandIn, Connector) {
        let standin = akto_standin::StandIn::start(akto_standin::StandInConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            require_jwt: None,
        })
        .await
        .unwrap();
        let mut cfg =
            crate::sink::HttpSinkConfig::new(url::Url::parse(&standin.url()).unwrap(), None);
        tune(&mut cfg);
        let sink = AnySink::Http(crate::sink::HttpSink::new(cfg).unwrap());
        (standin, connector_with(dir, sink))
    }

    /// One delivery of `execs` of `TABLE` (as one chunk), no trace source.
    async fn deliver_table(
        c: &Connector,
        execs: Vec<Execution>,
    ) -> Result<DeliveryTotals, DeliveryError> {
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let (table_tx, table_rx) = mpsc::channel(1);
        table_tx.send(table_chunk(execs)).await.unwrap();
        drop(table_tx);
        let (_t, shutdown) = Shutdown::new();
        let (totals, result) = c.deliver(rx, table_rx, bot_agents(), shutdown).await;
        result.map(|()| totals)
    }

    fn connector_with(dir: &std::path::Path, sink: AnySink) -> Connector {
        let client = DatabricksClient::new(
            &url::Url::parse("http://127.0.0.1:9").unwrap(),
            crate::databricks::Credentials::Pat("unused".to_string().into()),
            Default::default(),
        )
        .unwrap();
        let state = StateStore::open(&dir.join("state"), false).unwrap();
        let settings = crate::app::settings_for_demo("c", "s", &dir.join("state"));
        Connector::new(client, sink, state, settings)
    }

    /// The agent of `TABLE`.
    fn bot_agents() -> BTreeMap<String, Arc<AgentInfo>> {
        [(
            TABLE.to_string(),
            Arc::new(AgentInfo {
                name: "bot".into(),
                host: HOST.into(),
                path: "/serving-endpoints/bot/invocations".into(),
            }),
        )]
        .into_iter()
        .collect()
    }

    /// Delivers `tables` and `first` (the trace sources' channel), the tables' chunks queued
    /// first: delivery must still take the traces' first.
    async fn deliver(c: &Connector, first: Vec<Chunk>, tables: Vec<Chunk>) -> DeliveryTotals {
        let agents = bot_agents();
        let (table_tx, table_rx) = mpsc::channel(16);
        for chunk in tables {
            table_tx.send(chunk).await.unwrap();
        }
        drop(table_tx);
        let (tx, rx) = mpsc::channel(16);
        for chunk in first {
            tx.send(chunk).await.unwrap();
        }
        drop(tx);
        let (_t, shutdown) = Shutdown::new();
        match c.deliver(rx, table_rx, agents, shutdown).await {
            (t, Ok(())) => t,
            (_, Err(e)) => panic!("delivery failed: {e}"),
        }
    }

    /// `(call id, from a trace?)` of every tool-call record written, in order.
    fn sent_calls(dir: &std::path::Path) -> Vec<(String, bool)> {
        let text = std::fs::read_to_string(dir.join("out.jsonl")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                let h: Value = serde_json::from_str(v["requestHeaders"].as_str()?).ok()?;
                Some((
                    h["x-tool-call-id"].as_str()?.to_string(),
                    h.get("x-mlflow-trace-id").is_some(),
                ))
            })
            .collect()
    }

    fn trace_chunk(units: Vec<Prepared>) -> Chunk {
        Chunk {
            table: "mlflow:1".into(),
            prepared: units,
            ..Default::default()
        }
    }

    fn table_chunk(execs: Vec<Execution>) -> Chunk {
        Chunk {
            table: TABLE.into(),
            executions: execs,
            ..Default::default()
        }
    }

    /// A table read before and no longer listed is named every cycle in the report, but in a
    /// WARN only the first time this process misses it, and again once it came back and went.
    #[test]
    fn a_vanished_table_is_warned_about_once_until_it_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let c = connector(dir.path());
        let now = 10 * 24 * 3_600_000_000i64;
        c.state
            .commit_delivered(&[DeliveredRow {
                table: "c.s.gone_payload",
                id: "r1",
                time_us: now - 3_600_000_000,
                by_id: false,
            }])
            .unwrap();
        let mut inv = Inventory {
            catalog: "c".into(),
            schema: "s".into(),
            ..Default::default()
        };
        let warned = |c: &Connector| c.vanished_warned.lock().unwrap().len();
        assert_eq!(c.note_vanished_tables(&inv, now), vec!["c.s.gone_payload"]);
        assert_eq!(warned(&c), 1);
        // Still missing: still reported, not warned again (the set does not grow).
        assert_eq!(
            c.note_vanished_tables(&inv, now + 1),
            vec!["c.s.gone_payload"]
        );
        assert_eq!(warned(&c), 1);
        // Listed again: nothing to report, and a later disappearance warns anew.
        inv.listed_tables.insert("c.s.gone_payload".into());
        assert!(c.note_vanished_tables(&inv, now + 2).is_empty());
        assert_eq!(warned(&c), 0);
        // Its last row older than VANISHED_WITHIN: a table dropped on purpose stops being named.
        inv.listed_tables.clear();
        let later = now + VANISHED_WITHIN.as_micros() as i64;
        assert!(c.note_vanished_tables(&inv, later).is_empty());
    }

    /// A record whose payloads Akto's re-encoding would grow past the limit (emoji: 4 bytes
    /// each, 12 once Java escapes them) is cut until its re-encoded size fits: sent, never
    /// quarantined. (Conservatively: the cut is sized as if every byte grew alike, so the ASCII
    /// request is cut too.)
    #[tokio::test]
    async fn a_record_akto_would_grow_past_the_limit_is_cut_to_fit_it() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 100_000;
        let sink = AnySink::File(
            crate::sink::FileSink::new(Some(dir.path().join("out.jsonl")))
                .unwrap()
                .with_max_record_bytes(limit)
                .unwrap(),
        );
        let c = connector_with(dir.path(), sink);
        let mut e = execution("r-emoji", 1_000_000, &[]);
        e.request = Some(crate::json::JsonString::encode(&"q".repeat(30_000)));
        e.response = Some(crate::json::JsonString::encode(&"😀".repeat(20_000)));
        // An answer whose emoji all lie in the part that is cut off: once they are gone the
        // rest does not grow, so the cut keeps far more than the length at which any content
        // fits (about a sixth of the limit), which is where a limit taken from the uncut record
        // would have cut it.
        let mut tail = execution("r-tail", 2_000_000, &[]);
        tail.request = Some(crate::json::JsonString::encode(&"q".repeat(5_000)));
        tail.response = Some(crate::json::JsonString::encode(&format!(
            "{}{}",
            "a".repeat(80_000),
            "😀".repeat(10_000)
        )));
        let totals = deliver_table(&c, vec![e, tail]).await.unwrap();
        assert_eq!(totals.records_sent, 2);
        assert!(totals.truncated >= 2);
        let text = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
        for line in text.lines() {
            assert!(
                crate::sink::akto_size_upper_bound(line) <= limit,
                "{}",
                line.len()
            );
        }
        let tail: Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(tail["requestPayload"].as_str().unwrap().len(), 5_000);
        let answer = tail["responsePayload"].as_str().unwrap();
        assert!(answer.len() > 60_000, "{}", answer.len());
        assert!(answer.ends_with("original 120000 bytes]"), "{answer:.80}");
        let line = text.lines().next().unwrap();
        let rec: Value = serde_json::from_str(line).unwrap();
        // Both payloads keep a part, each marked with its original size.
        for (field, original) in [("requestPayload", 30_000), ("responsePayload", 80_000)] {
            let p = rec[field].as_str().unwrap();
            assert!(p.len() > 5_000, "{field}: {}", p.len());
            assert!(
                p.ends_with(&format!("original {original} bytes]")),
                "{field}"
            );
        }
    }

    #[tokio::test]
    async fn each_tool_call_is_sent_once_and_registered_with_its_unit() {
        let dir = tempfile::tempdir().unwrap();
        let c = connector(dir.path());
        let ns = tool_call_namespace(HOST);

        // One cycle: the trace describes call_1; the row describes call_1 and call_2.
        let t = deliver(
            &c,
            vec![trace_chunk(vec![trace_unit("tr-1", 1_000, &["call_1"])])],
            vec![table_chunk(vec![execution(
                "req-1",
                2_000,
                &["call_1", "call_2"],
            )])],
        )
        .await;
        assert_eq!(
            sent_calls(dir.path()),
            [("call_1".into(), true), ("call_2".into(), false)]
        );
        assert_eq!(t.tool_calls_deduplicated, 1);
        assert_eq!(t.tool_calls, 2, "found in the row, whether sent or not");
        // Registered with the unit that carried each call, at the unit's time.
        // Registered under its source's key: the trace's call_1, the row's call_2.
        let (t1, r2) = (
            CallSource::Trace.key("call_1"),
            CallSource::Row.key("call_2"),
        );
        let keys = [t1.as_str(), r2.as_str(), "call_1", "call_2", "call_3"];
        let reg = c.state.delivered_among(&ns, keys).unwrap();
        assert_eq!(reg.len(), 2, "{reg:?}");
        assert_eq!(c.state.ids_in_range(&ns, 1_000, 1_001).unwrap(), [t1]);
        assert_eq!(c.state.ids_in_range(&ns, 2_000, 2_001).unwrap(), [r2]);
        assert_eq!(c.state.delivered_count("mlflow:1").unwrap(), 1);
        assert_eq!(c.state.delivered_count(TABLE).unwrap(), 1);

        // A later cycle: a new row repeats call_1 (dropped); a late trace describes call_2, whose
        // row was sent before (its TOOL record is the one dropped) and a new call_3.
        let t = deliver(
            &c,
            vec![trace_chunk(vec![trace_unit(
                "tr-2",
                3_000,
                &["call_2", "call_3"],
            )])],
            vec![table_chunk(vec![execution("req-2", 4_000, &["call_1"])])],
        )
        .await;
        assert_eq!(t.tool_calls_deduplicated, 2);
        let sent = sent_calls(dir.path());
        assert_eq!(&sent[2..], [("call_3".to_string(), true)]);
        // The units themselves are still delivered (execution and LLM records).
        assert_eq!(c.state.delivered_count("mlflow:1").unwrap(), 2);
        assert_eq!(c.state.delivered_count(TABLE).unwrap(), 2);
        let text = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
        assert_eq!(text.matches("/invocations").count(), 2);

        // Pruned like other namespaces: nothing older than the horizon stays.
        assert_eq!(c.prune_registries(2_500).unwrap(), 2);
        assert_eq!(c.state.delivered_count(&ns).unwrap(), 1);
        assert_eq!(c.prune_registries(i64::MAX).unwrap(), 1);
        assert!(c
            .state
            .namespaces_with_prefix(TOOL_CALL_PREFIX)
            .unwrap()
            .is_empty());
    }

    /// A row that cannot be read (no id) and is read again by the next cycles is quarantined once.
    #[tokio::test]
    async fn an_unreadable_row_read_again_is_quarantined_once() {
        let dir = tempfile::tempdir().unwrap();
        let c = connector(dir.path());
        let chunk = || Chunk {
            table: TABLE.into(),
            unreadable: vec![
                (
                    "row without a usable databricks_request_id".into(),
                    "[null,\"1\"]".into(),
                ),
                (
                    "row without a usable databricks_request_id".into(),
                    "[null,\"2\"]".into(),
                ),
            ],
            ..Default::default()
        };
        deliver(&c, Vec::new(), vec![chunk()]).await;
        deliver(&c, Vec::new(), vec![chunk(), chunk()]).await;
        let text = std::fs::read_to_string(dir.path().join("state").join("quarantine.jsonl"))
            .unwrap_or_default();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert_eq!(c.quarantine.count.load(Ordering::Relaxed), 2);
        // Forgotten with the registry's horizon.
        assert_eq!(c.prune_registries(i64::MAX).unwrap(), 2);
    }

    /// A unit confirmed only in part: its records went in two requests (over 10 MiB together)
    /// and the second was refused until the retries ran out. The next delivery sends only the
    /// record not confirmed; the tool call confirmed the first time is registered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unit_confirmed_in_part_sends_only_the_rest_again() {
        let dir = tempfile::tempdir().unwrap();
        let (standin, c) = http_connector(dir.path(), |cfg| {
            cfg.retry.max_attempts = 2;
            cfg.retry.max_elapsed = Duration::from_secs(2);
            cfg.retry.base_delay = Duration::from_millis(10);
            cfg.retry.max_delay = Duration::from_millis(50);
        })
        .await;
        // The execution record (its response cut to 5 MiB), then "big" and "poison" with
        // outputs of 3.5 MB each: [execution, big] fit in one request, "poison" needs another.
        let big = "b".repeat(3_500_000);
        let mut exec = execution("req-1", 2_000, &[]);
        exec.response = Some(
            json!({"output": [
                {"type": "function_call", "call_id": "call_big", "name": "big", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_big", "output": big},
                {"type": "function_call", "call_id": "call_p", "name": "poison", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_p", "output": big},
            ]})
            .to_string()
            .into(),
        );
        let run = |exec: Execution| deliver_table(&c, vec![exec]);
        let paths = || -> Vec<String> {
            standin
                .records()
                .iter()
                .map(|r| r["path"].as_str().unwrap_or("").to_string())
                .collect()
        };

        standin.set_behavior(akto_standin::Behavior::RejectMatching {
            needle: "/tools/poison".into(),
            status: 503,
        });
        assert!(
            run(exec.clone()).await.is_err(),
            "the second request failed"
        );
        assert_eq!(
            paths(),
            ["/serving-endpoints/bot/invocations", "/tools/big"]
        );
        assert_eq!(c.state.delivered_count(TABLE).unwrap(), 0, "not committed");
        let ns = tool_call_namespace(HOST);
        assert_eq!(
            c.state
                .delivered_among(
                    &ns,
                    [
                        CallSource::Row.key("call_big"),
                        CallSource::Row.key("call_p")
                    ]
                    .iter()
                    .map(String::as_str)
                )
                .unwrap()
                .len(),
            1
        );

        // The next cycle reads the row again: only "poison" is sent, and the unit committed.
        standin.set_behavior(akto_standin::Behavior::Normal);
        let t = run(exec).await.expect("delivered");
        assert_eq!(t.records_sent, 1);
        assert_eq!(
            paths(),
            [
                "/serving-endpoints/bot/invocations",
                "/tools/big",
                "/tools/poison"
            ]
        );
        assert_eq!(c.state.delivered_count(TABLE).unwrap(), 1);
        // Pruned with the registry.
        assert!(c.prune_registries(i64::MAX).unwrap() >= 3);
        assert!(c
            .state
            .namespaces_with_prefix(PARTLY_SENT_PREFIX)
            .unwrap()
            .is_empty());
    }

    /// A record the sink refused while its quarantine could not be written: what the sink took
    /// in the same batch is still recorded (not sent again), the refused record's unit stays
    /// open, and the next cycle quarantines that record without sending anything twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_quarantine_write_still_records_what_the_sink_took() {
        let dir = tempfile::tempdir().unwrap();
        let (standin, c) = http_connector(dir.path(), |_| {}).await;
        // Akto refuses req-1's tool call record (422); the quarantine file cannot be opened.
        standin.set_behavior(akto_standin::Behavior::RejectMatching {
            needle: "/tools/lookup".into(),
            status: 422,
        });
        let quarantine = dir.path().join("state").join("quarantine.jsonl");
        std::fs::create_dir(&quarantine).unwrap();
        let execs = || {
            vec![
                execution("req-1", 1_000, &["call_bad"]),
                execution("req-2", 2_000, &[]),
            ]
        };
        let run = |execs: Vec<Execution>| deliver_table(&c, execs);
        let Err(err) = run(execs()).await else {
            panic!("the quarantine write failed, the delivery must say so")
        };
        assert!(err.to_string().contains("quarantine"), "{err}");
        assert_eq!(standin.records().len(), 2, "both execution records taken");
        let done = |id: &str, t: i64| c.state.delivered_at(TABLE, [(t, id)]).unwrap()[0];
        assert!(done("req-2", 2_000), "the unit the sink took is recorded");
        assert!(
            !done("req-1", 1_000),
            "the unit with the refused record stays open"
        );

        // Fixed: the next cycle reads req-1 again (req-2 is delivered, reading skips it), sends
        // nothing twice and quarantines the refused record.
        std::fs::remove_dir(&quarantine).unwrap();
        let t = run(execs().into_iter().take(1).collect())
            .await
            .expect("delivered");
        let paths: Vec<String> = standin
            .records()
            .iter()
            .map(|r| format!("{} {}", r["path"], r["requestHeaders"]))
            .collect();
        assert_eq!(standin.records().len(), 2, "nothing sent twice: {paths:#?}");
        assert_eq!(t.records_sent, 0);
        assert!(done("req-1", 1_000));
        let text = std::fs::read_to_string(&quarantine).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("call_bad"), "{text}");
    }

    /// A record confirmed before is recognised by its form before a cut, however a sink's
    /// per-record limit cut it then and now.
    #[test]
    fn a_record_confirmed_before_is_known_by_its_uncut_form() {
        let uncut = "{\"responsePayload\":\"long text\"}";
        let mut partly = PartlySent::default();
        partly
            .units
            .insert((TABLE.to_string(), "req-1".to_string()));
        // Confirmed when it went out whole (no cut: its key is its own JSON's).
        partly.records.insert((
            TABLE.to_string(),
            partly_sent_key("req-1", &record_key(uncut, &None)),
        ));
        let out = |json: &str| OutRecord {
            key: HOST.to_string(),
            json: json.to_string(),
        };
        // Now cut to a smaller limit; a second record, never confirmed, is kept.
        let mut records = vec![out("{\"responsePayload\":\"long\"}"), out("{\"other\":1}")];
        let mut calls: Vec<RecordCall> = vec![(1, "call_1".to_string())];
        let meta = |uncut: Option<String>| RecordMeta { uncut, tool: false };
        let mut keys = vec![meta(Some(content_key(uncut))), meta(None)];
        partly.filter(TABLE, "req-1", &mut records, &mut calls, &mut keys);
        assert_eq!(records, vec![out("{\"other\":1}")]);
        assert_eq!(calls, vec![(0, "call_1".to_string())]);
        assert_eq!(keys, vec![meta(None)]);
        // Another unit is not touched.
        let mut records = vec![out(uncut)];
        let mut keys = vec![meta(None)];
        partly.filter(TABLE, "req-2", &mut records, &mut Vec::new(), &mut keys);
        assert_eq!(records.len(), 1);
    }

    /// A warehouse picked automatically that is gone (deleted, or its CAN USE revoked) is not
    /// kept for the life of the process: the next cycle picks one that works. One still listed
    /// is kept, also when another one is running, and also when the listing fails for a while.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_warehouse_picked_automatically_is_kept_while_it_is_listed() {
        let emu = databricks_emulator::Emulator::start(databricks_emulator::EmulatorConfig {
            agents: 1,
            rows: 5,
            ..Default::default()
        })
        .await
        .unwrap();
        let cfg = databricks_emulator::EmulatorConfig::default();
        let dir = tempfile::tempdir().unwrap();
        let client = DatabricksClient::new(
            &url::Url::parse(&emu.base_url()).unwrap(),
            crate::databricks::Credentials::OAuth {
                client_id: cfg.client_id.clone(),
                client_secret: cfg.client_secret.clone().into(),
            },
            crate::databricks::ClientOptions {
                retry: crate::databricks::RetryPolicy {
                    max_elapsed: Duration::from_secs(2),
                    base_delay: Duration::from_millis(20),
                    max_delay: Duration::from_millis(200),
                },
                ..Default::default()
            },
        )
        .unwrap();
        let sink =
            AnySink::File(crate::sink::FileSink::new(Some(dir.path().join("out.jsonl"))).unwrap());
        let state = StateStore::open(&dir.path().join("state"), false).unwrap();
        let mut settings =
            crate::app::settings_for_demo(&cfg.catalog, &cfg.schema, &dir.path().join("state"));
        settings.collect.lookback = Duration::from_secs(7200);
        let c = Arc::new(Connector::new(client, sink, state, settings));
        let (_t, shutdown) = Shutdown::new();
        let picked = || async { c.warehouse.lock().await.clone().unwrap_or_default() };

        // An earlier cycle picked a warehouse that has been deleted since.
        *c.warehouse.lock().await = Some("0000000000deleted".into());
        let report = c.run_cycle(&shutdown).await;
        assert!(report.ok(), "{:?}", report.errors);
        assert!(report.records_sent > 0);
        assert_ne!(picked().await, "0000000000deleted");

        // The emulator's stopped classic warehouse, still listed, is kept although its
        // serverless one is running (choosing afresh would prefer that one).
        let stopped = "4b9f1c2d3e5a6002";
        *c.warehouse.lock().await = Some(stopped.into());
        emu.generate(3, 0);
        let report = c.run_cycle(&shutdown).await;
        assert!(report.ok(), "{:?}", report.errors);
        assert!(report.records_sent > 0);
        assert_eq!(picked().await, stopped);

        // The listing fails (503 until the retries run out): the cycle keeps its warehouse.
        emu.set_faults("route=/api/2.0/sql/warehouses,method=GET,kind=503,count=unlimited")
            .unwrap();
        emu.generate(3, 0);
        let report = c.run_cycle(&shutdown).await;
        assert!(report.ok(), "{:?}", report.errors);
        assert!(report.records_sent > 0);
        assert_eq!(picked().await, stopped);
        emu.shutdown().await;
    }

    /// A reader that panics (a bug) is reported with the source it was reading.
    #[tokio::test]
    async fn a_reader_that_panics_is_named() {
        let mut readers = Readers::default();
        let sem = Arc::new(Semaphore::new(2));
        let (_t, shutdown) = Shutdown::new();
        spawn_reader(
            &mut readers,
            &sem,
            &shutdown,
            "c.s.broken_payload".into(),
            Box::new(|_| Box::pin(async { panic!("a bug") })),
        );
        spawn_reader(
            &mut readers,
            &sem,
            &shutdown,
            "c.s.fine_payload".into(),
            Box::new(|stats| {
                Box::pin(async move {
                    stats.statements += 2;
                    Ok(())
                })
            }),
        );
        // A reader that fails after some work: what it did still counts.
        spawn_reader(
            &mut readers,
            &sem,
            &shutdown,
            "c.s.failing_payload".into(),
            Box::new(|stats| {
                Box::pin(async move {
                    stats.statements += 3;
                    stats.payloads_cut += 1;
                    Err(CollectError::Databricks(DatabricksError::NoWarehouse(
                        "gone".into(),
                    )))
                })
            }),
        );
        let mut report = CycleReport::default();
        let mut completed = Vec::new();
        join_readers(&mut readers, &mut report, &mut completed).await;
        assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
        assert!(
            report
                .errors
                .iter()
                .any(|e| e.starts_with("c.s.broken_payload: its reader failed")),
            "{:?}",
            report.errors
        );
        assert_eq!(completed, [("c.s.fine_payload".to_string(), None)]);
        assert_eq!(report.statements, 5);
        assert_eq!(report.truncated, 1);
    }

    /// Payloads cut while reading count with those cut while mapping.
    #[test]
    fn payloads_cut_while_reading_count_as_truncated() {
        let mut report = CycleReport::default();
        report.add_table(&TableStats {
            payloads_cut: 3,
            ..Default::default()
        });
        report.add_delivery(DeliveryTotals {
            truncated: 2,
            ..Default::default()
        });
        assert_eq!(report.truncated, 5);
    }

    #[test]
    fn an_unfinished_trace_holds_the_read_mark_back() {
        let (min, lookback) = (60_000_000i64, 3_600_000_000i64);
        let start = 1_000 * min;
        assert_eq!(read_mark_holding(start, None, lookback), start);
        // A trace started 2 hours ago is unfinished: the next window (mark - lookback) starts a
        // minute before it, and so does what pruning keeps.
        let mark = read_mark_holding(start, Some(start - 120 * min), lookback);
        assert_eq!(mark - lookback, start - 121 * min);
        // One started within the lookback changes nothing.
        assert_eq!(
            read_mark_holding(start, Some(start - 10 * min), lookback),
            start
        );
    }

    /// An agent that reuses call ids (`call_0` in every request) makes distinct calls with one
    /// id: a source's calls are all sent, in one unit, one chunk or later cycles; only the other
    /// source's record of a call is merged with them.
    #[tokio::test]
    async fn calls_of_one_source_with_one_id_are_all_sent() {
        let dir = tempfile::tempdir().unwrap();
        let c = connector(dir.path());
        let t = deliver(
            &c,
            vec![trace_chunk(vec![
                trace_unit("tr-1", 1_000, &["call_1", "call_1"]),
                trace_unit("tr-2", 1_500, &["call_1", "call_2"]),
            ])],
            vec![table_chunk(vec![
                execution("req-1", 2_000, &["call_0"]),
                execution("req-2", 2_500, &["call_0"]),
            ])],
        )
        .await;
        assert_eq!(t.tool_calls_deduplicated, 0);
        assert_eq!(t.tool_calls, 6);
        let t = deliver(
            &c,
            Vec::new(),
            vec![table_chunk(vec![execution("req-3", 3_000, &["call_0"])])],
        )
        .await;
        assert_eq!((t.tool_calls_deduplicated, t.tool_calls), (0, 1));
        // The row of a call a trace sent is still merged with it.
        let t = deliver(
            &c,
            Vec::new(),
            vec![table_chunk(vec![execution("req-4", 3_500, &["call_2"])])],
        )
        .await;
        assert_eq!((t.tool_calls_deduplicated, t.tool_calls), (1, 0));
        assert_eq!(
            sent_calls(dir.path()),
            [
                ("call_1".into(), true),
                ("call_1".into(), true),
                ("call_1".into(), true),
                ("call_2".into(), true),
                ("call_0".into(), false),
                ("call_0".into(), false),
                ("call_0".into(), false),
            ]
        );
    }

    /// `tool_calls` counts the tool-call records the sink confirmed: none when it confirmed
    /// nothing, and not the ones left out as already sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tool_calls_counts_the_tool_call_records_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let (standin, c) = http_connector(dir.path(), fast_retry).await;
        standin.set_behavior(akto_standin::Behavior::FailAll { status: 503 });
        let exec = || execution("req-1", 2_000, &["call_1", "call_2"]);
        let (t, r) = deliver_both(&c, Vec::new(), vec![table_chunk(vec![exec()])]).await;
        assert!(r.is_err());
        assert_eq!((t.records_sent, t.tool_calls), (0, 0));
        standin.set_behavior(akto_standin::Behavior::Normal);
        let (t, r) = deliver_both(
            &c,
            vec![trace_chunk(vec![trace_unit("tr-1", 1_000, &["call_1"])])],
            vec![table_chunk(vec![exec()])],
        )
        .await;
        assert!(r.is_ok());
        // call_1 by the trace, call_2 by the row; the row's call_1 left out.
        assert_eq!((t.tool_calls, t.tool_calls_deduplicated), (2, 1));
    }

    fn fast_retry(cfg: &mut crate::sink::HttpSinkConfig) {
        cfg.retry.max_attempts = 2;
        cfg.retry.max_elapsed = Duration::from_secs(2);
        cfg.retry.base_delay = Duration::from_millis(10);
        cfg.retry.max_delay = Duration::from_millis(50);
    }

    /// One delivery of `first` (trace sources) and `tables`, whatever its outcome.
    async fn deliver_both(
        c: &Connector,
        first: Vec<Chunk>,
        tables: Vec<Chunk>,
    ) -> (DeliveryTotals, Result<(), DeliveryError>) {
        let (tx, rx) = mpsc::channel(16);
        for chunk in first {
            tx.send(chunk).await.unwrap();
        }
        drop(tx);
        let (table_tx, table_rx) = mpsc::channel(16);
        for chunk in tables {
            table_tx.send(chunk).await.unwrap();
        }
        drop(table_tx);
        let (_t, shutdown) = Shutdown::new();
        c.deliver(rx, table_rx, bot_agents(), shutdown).await
    }

    /// A record quarantined before (Akto would reject it, or the sink refused it) is neither
    /// quarantined nor sent again when its unit is staged again (a unit is staged again when
    /// other records of it were not confirmed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_is_quarantined_once_however_often_its_unit_is_staged() {
        let dir = tempfile::tempdir().unwrap();
        let (standin, c) = http_connector(dir.path(), fast_retry).await;
        let lines = || {
            std::fs::read_to_string(dir.path().join("state").join("quarantine.jsonl"))
                .unwrap_or_default()
                .lines()
                .count()
        };
        // A trace whose LLM record has a time Akto rejects: quarantined before sending.
        let mut unit = trace_unit("tr-1", 1_000, &["call_1"]);
        unit.records[0].time = "0".into();
        standin.set_behavior(akto_standin::Behavior::FailAll { status: 503 });
        for _ in 0..2 {
            let (_, r) = deliver_both(&c, vec![trace_chunk(vec![unit.clone()])], Vec::new()).await;
            assert!(r.is_err(), "the sink is down: the unit stays open");
            assert_eq!(lines(), 1);
        }
        standin.set_behavior(akto_standin::Behavior::Normal);
        let (t, r) = deliver_both(&c, vec![trace_chunk(vec![unit])], Vec::new()).await;
        assert!(r.is_ok());
        assert_eq!(t.records_sent, 1, "the TOOL record");
        assert_eq!(lines(), 1);
        assert_eq!(c.state.delivered_count("mlflow:1").unwrap(), 1);

        // Akto refuses a tool call record (422): quarantined once; the unit staged again leaves
        // it out.
        standin.set_behavior(akto_standin::Behavior::RejectMatching {
            needle: "/tools/lookup".into(),
            status: 422,
        });
        let exec = || execution("req-9", 9_000, &["call_x"]);
        deliver_table(&c, vec![exec()]).await.expect("delivered");
        assert_eq!(lines(), 2);
        standin.set_behavior(akto_standin::Behavior::Normal);
        let before = standin.records().len();
        let t = deliver_table(&c, vec![exec()]).await.expect("delivered");
        assert_eq!(lines(), 2);
        let again: Vec<String> = standin.records()[before..]
            .iter()
            .map(|r| r["path"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(again, ["/serving-endpoints/bot/invocations"]);
        assert_eq!(t.tool_calls, 0);
        assert_eq!(c.quarantine.count.load(Ordering::Relaxed), 2);
    }

    /// Payloads cut, values masked and tool-call records left out count once, with the commit
    /// of their unit: a delivery that failed counts none of them (the unit is staged again, and
    /// counted, by the cycle that delivers it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn staging_counts_come_with_the_commit_of_their_unit() {
        let dir = tempfile::tempdir().unwrap();
        let (standin, mut c) = http_connector(dir.path(), fast_retry).await;
        c.settings.redactor = Some(Redactor::new(&crate::traffic::RedactKind::ALL));
        c.settings.map.max_string_bytes = 400;
        // A row repeating a call the trace sent, with an e-mail address and a long answer.
        let exec = || {
            let mut e = execution("req-1", 2_000, &["call_1"]);
            e.request = Some(
                json!({"input": [{"role": "user", "content": "write to jane.doe@example.com"}]})
                    .to_string()
                    .into(),
            );
            e.response = Some(
                json!({"output": [
                    {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
                    {"type": "message", "content": "x".repeat(2_000)},
                ]})
                .to_string()
                .into(),
            );
            e
        };
        // The trace sends call_1; then Akto answers 503 to the row's batch until the retries
        // run out, twice.
        let trace = trace_chunk(vec![trace_unit("tr-1", 1_000, &["call_1"])]);
        let (_, r) = deliver_both(&c, vec![trace], Vec::new()).await;
        assert!(r.is_ok());
        standin.set_behavior(akto_standin::Behavior::RejectMatching {
            needle: "req-1".into(),
            status: 503,
        });
        for _ in 0..2 {
            let (t, r) = deliver_both(&c, Vec::new(), vec![table_chunk(vec![exec()])]).await;
            assert!(r.is_err(), "the row's batch failed");
            assert_eq!(
                (t.truncated, t.tool_calls_deduplicated, t.redacted.total()),
                (0, 0, 0),
                "nothing of the unit left open is counted"
            );
        }
        standin.set_behavior(akto_standin::Behavior::Normal);
        let t = deliver_table(&c, vec![exec()]).await.expect("delivered");
        assert_eq!(t.records_sent, 1, "the execution record");
        assert_eq!(t.tool_calls_deduplicated, 1);
        assert!(t.truncated >= 1, "the long answer was cut");
        assert!(t.redacted.total() >= 1, "the address was masked");
        let sent = standin.records();
        assert!(!sent.iter().any(|r| r.to_string().contains("jane.doe@")));
    }

    /// Rows quarantined because they could not be read are kept apart from records quarantined:
    /// a table whose rows lack ids (one key per row for a lookback) neither has those keys
    /// loaded by every delivery nor every one of its records hashed.
    #[tokio::test]
    async fn unreadable_rows_are_kept_apart_from_quarantined_records() {
        let dir = tempfile::tempdir().unwrap();
        let c = connector(dir.path());
        let unreadable = Chunk {
            table: TABLE.into(),
            unreadable: vec![(
                "row without a usable databricks_request_id".into(),
                "[null,\"1\"]".into(),
            )],
            ..Default::default()
        };
        deliver(&c, Vec::new(), vec![unreadable]).await;
        let known = KnownQuarantined::load(&c.state).unwrap();
        assert!(known.units.is_empty() && known.keys.is_empty());

        // A trace's record with a time Akto rejects: quarantined, and known as a record.
        let mut unit = trace_unit("tr-1", 1_000, &["call_1"]);
        unit.records[0].time = "0".into();
        deliver(&c, vec![trace_chunk(vec![unit])], Vec::new()).await;
        let known = KnownQuarantined::load(&c.state).unwrap();
        assert!(
            known.has_unit("mlflow:1", "tr-1"),
            "only that unit's records are hashed"
        );
        assert!(!known.has_unit("mlflow:1", "tr-2"));
        assert_eq!(known.keys.len(), 1);
        // Both pruned with the registries.
        c.prune_registries(i64::MAX).unwrap();
        for prefix in [QUARANTINED_PREFIX, QUARANTINED_RECORD_PREFIX] {
            assert!(c.state.namespaces_with_prefix(prefix).unwrap().is_empty());
        }
    }

    #[test]
    fn ledger_merges_a_call_across_sources_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::open(dir.path(), false).unwrap();
        let ns = tool_call_namespace(HOST);
        let row_key = CallSource::Row.key("by-row");
        let trace_key = CallSource::Trace.key("by-trace");
        // "old": sent by a release that kept bare ids, which the state's upgrade registers
        // under both sources' keys.
        let [old_trace, old_row] = tool_call_keys("old");
        let rows: Vec<DeliveredRow<'_>> = [
            old_trace.as_str(),
            old_row.as_str(),
            row_key.as_str(),
            trace_key.as_str(),
        ]
        .into_iter()
        .map(|id| DeliveredRow {
            table: &ns,
            id,
            time_us: 1,
            by_id: true,
        })
        .collect();
        state.commit_delivered(&rows).unwrap();
        let unit = trace_unit("tr", 5, &["old", "by-row", "by-trace", "new"]);
        let ids = |records: &[traffic::AktoRecord]| -> Vec<String> {
            records.iter().filter_map(tool_call_id).collect()
        };
        let mut ledger = ToolCallLedger::default();
        for (source, kept) in [
            // A trace's call is dropped when a row sent it (or a release that kept bare ids).
            (CallSource::Trace, ["by-trace", "new"]),
            // A row's call is dropped when a trace sent it, not when another row did: an agent
            // may reuse ids across requests.
            (CallSource::Row, ["by-row", "new"]),
        ] {
            ledger.start_chunk();
            ledger
                .prefetch(
                    &state,
                    source,
                    [(HOST, unit.records.as_slice())].into_iter(),
                )
                .unwrap();
            let mut records = unit.records.clone();
            let calls = ledger.filter(HOST, source, &mut records);
            assert_eq!(ids(&records), kept, "{source:?}");
            assert_eq!(
                calls,
                [None, Some(source.key(kept[0])), Some(source.key(kept[1]))],
                "{source:?}: registered under the source's own key"
            );
            // Filtering the same records again in the chunk keeps them: a source sends its
            // calls once by their units, and two calls of one source with one id are two calls.
            let mut again = unit.records.clone();
            assert_eq!(ledger.filter(HOST, source, &mut again).len(), 3);
            // On another host the same ids are other calls.
            let mut other = unit.records.clone();
            assert_eq!(ledger.filter("other.host", source, &mut other).len(), 5);
        }
        assert_eq!(ledger.dropped, 8);
    }
}
