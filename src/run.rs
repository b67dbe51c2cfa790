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

use std::collections::BTreeMap;
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
    warehouse: tokio::sync::Mutex<Option<String>>,
    quarantine: Quarantine,
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
    pub truncated: u64,
    pub tool_calls: u64,
    pub errors: Vec<String>,
    pub duration: Duration,
    pub stopped: bool,
    pub per_agent: BTreeMap<String, u64>,
    /// Values masked, by kind (redaction on).
    pub redacted: RedactionCounts,
    pub inventory: Option<Inventory>,
}

impl CycleReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// The line Akto's job runner forwards to its operators.
    pub fn summary_line(&self) -> String {
        format!(
            "Cycle completed in {:.1}s. Results: agents={} tables={} rows_read={} records_sent={} \
             duplicates_skipped={} quarantined={} errors={}{}",
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

    fn add_table(&mut self, s: &TableStats) {
        self.rows_read += s.rows_returned;
        self.bytes_read += s.bytes_returned;
        self.statements += s.statements;
        self.executions += s.executions;
        self.duplicates_skipped += s.duplicates_skipped;
        self.late_found += s.late_found;
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
            "WARN quarantined a record of {table} (request {request_id}): {reason}; kept in {}",
            self.path.display()
        );
        Ok(())
    }
}

type Readers = tokio::task::JoinSet<(String, Result<TableStats, CollectError>)>;

/// Runs one source's reader under the concurrency bound; shutdown stops it at once (a statement
/// may poll for minutes): what it already handed to delivery is delivered or left unconfirmed,
/// never lost.
fn spawn_reader(
    readers: &mut Readers,
    sem: &Arc<Semaphore>,
    shutdown: &Shutdown,
    name: String,
    work: impl std::future::Future<Output = Result<TableStats, CollectError>> + Send + 'static,
) {
    let sem = sem.clone();
    let mut shutdown = shutdown.clone();
    readers.spawn(async move {
        let _permit = sem.acquire_owned().await;
        if shutdown.is_triggered() {
            return (name, Err(CollectError::Closed));
        }
        let result = tokio::select! {
            r = work => r,
            _ = shutdown.wait() => Err(CollectError::Closed),
        };
        (name, result)
    });
}

/// The agent a table belongs to, as records need it.
struct AgentInfo {
    name: String,
    host: String,
    path: String,
}

/// Why a cycle's delivery stopped early.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    State(#[from] StateError),
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
            warehouse: tokio::sync::Mutex::new(None),
            quarantine,
        }
    }

    /// Reports a batch left unconfirmed by the previous run (it will be sent again).
    pub fn report_unconfirmed(&self) -> Result<(), StateError> {
        if let Some(n) = self.state.unconfirmed_batch()? {
            tracing::warn!(
                "WARN re-sending {n} records of an unconfirmed batch: the previous run stopped between \
                 sending it and recording the sink's confirmation"
            );
            self.state.clear_in_flight()?;
        }
        Ok(())
    }

    async fn warehouse_id(&self) -> Result<String, DatabricksError> {
        let mut w = self.warehouse.lock().await;
        if let Some(id) = w.as_ref() {
            return Ok(id.clone());
        }
        let (wh, why) = self
            .client
            .choose_warehouse(self.settings.warehouse_id.as_deref())
            .await?;
        tracing::info!(
            "Using SQL warehouse {} ({}) [{}]",
            wh.id,
            wh.name.as_deref().unwrap_or("unnamed"),
            why
        );
        *w = Some(wh.id.clone());
        Ok(wh.id)
    }

    /// Runs one cycle. Never panics on bad data; every problem ends up in `errors`.
    pub async fn run_cycle(self: &Arc<Self>, shutdown: &Shutdown) -> CycleReport {
        let started = Instant::now();
        let cycle_start_us = chrono::Utc::now().timestamp_micros();
        let mut report = CycleReport::default();
        let q_before = self.quarantine.count.load(Ordering::Relaxed);
        if let Err(e) = self
            .cycle_inner(shutdown, cycle_start_us, &mut report)
            .await
        {
            tracing::error!("ERROR {e}");
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
        self.client.authenticate().await?;
        let s = &self.settings;
        let inv = discovery::discover(&self.client, &s.catalog, &s.schema, &s.prefix).await?;
        report.agents = inv.agents.len();
        report.tables = inv.readable().count();
        let trace_sources = crate::traces::trace_sources(&inv, &s.workspace_host);
        if report.tables == 0 && trace_sources.is_empty() {
            tracing::warn!(
                "WARN no inference tables or MLflow traces to read in {}.{} (prefix '{}'): {} tables found, \
                 {} match the prefix. Run `databricks-shield discover` to see what was found",
                s.catalog,
                s.schema,
                s.prefix,
                inv.tables_total,
                inv.tables_matching_prefix
            );
        }
        // A warehouse only when there are tables to read with SQL.
        let warehouse = if report.tables > 0 || !inv.otel_span_tables.is_empty() {
            Some(self.warehouse_id().await?)
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
                        host: traffic::agent_host(&a.name, &s.workspace_host),
                        path: traffic::invocation_path(a.endpoint.as_deref(), &t.full_name),
                    }),
                )
            })
            .collect();

        let (tx, rx) = mpsc::channel::<Chunk>(4);
        let delivery = {
            let this = self.clone();
            let agents = agents.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { this.deliver(rx, agents, shutdown).await })
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
                ..Default::default()
            };
            if tx.send(chunk).await.is_err() {
                tracing::debug!("delivery stopped before the inventory records");
            }
        }

        let sem = Arc::new(Semaphore::new(s.table_concurrency.max(1)));
        let mut readers = Readers::new();
        let inv_arc = Arc::new(inv.clone());
        for (_, table) in inv.readable() {
            let (this, tx, table) = (self.clone(), tx.clone(), table.clone());
            let warehouse = warehouse.clone().unwrap_or_default();
            let name = table.full_name.clone();
            spawn_reader(&mut readers, &sem, shutdown, name, async move {
                let reader = TableReader {
                    client: &this.client,
                    state: &this.state,
                    warehouse_id: &warehouse,
                    table: &table,
                    opts: &this.settings.collect,
                    now_us: cycle_start_us,
                };
                reader.collect(&tx).await
            });
        }
        for src in trace_sources {
            let (this, tx) = (self.clone(), tx.clone());
            let name = crate::traces::experiment_namespace(&src.experiment_id);
            spawn_reader(&mut readers, &sem, shutdown, name, async move {
                let st = &this.settings;
                crate::traces::collect_experiment(
                    &this.client,
                    &this.state,
                    &src,
                    &st.collect,
                    &st.account_id,
                    cycle_start_us,
                    &tx,
                )
                .await
            });
        }
        for table in inv.otel_span_tables.clone() {
            let (this, tx, inv) = (self.clone(), tx.clone(), inv_arc.clone());
            let warehouse = warehouse.clone().unwrap_or_default();
            let name = table.clone();
            spawn_reader(&mut readers, &sem, shutdown, name, async move {
                let st = &this.settings;
                crate::traces::collect_otel_table(
                    &this.client,
                    &this.state,
                    &warehouse,
                    &table,
                    &inv,
                    &st.workspace_host,
                    &st.account_id,
                    &st.collect,
                    cycle_start_us,
                    &tx,
                )
                .await
            });
        }
        drop(tx);

        let mut completed: Vec<String> = Vec::new();
        while let Some(joined) = readers.join_next().await {
            match joined {
                Ok((table, Ok(stats))) => {
                    report.add_table(&stats);
                    completed.push(table);
                }
                Ok((_, Err(CollectError::Closed))) => {}
                Ok((table, Err(e))) => {
                    let msg = format!("{table}: {e}");
                    tracing::error!("ERROR reading {msg}");
                    report.errors.push(msg);
                }
                Err(e) => report.errors.push(format!("a table reader failed: {e}")),
            }
        }
        let delivered = match delivery.await {
            Ok(r) => r,
            Err(e) => Err(DeliveryError::State(StateError::Io {
                path: self.state.path().to_path_buf(),
                detail: format!("delivery task failed: {e}"),
            })),
        };
        match delivered {
            Ok(d) => {
                report.records_sent += d.records_sent;
                report.truncated += d.truncated;
                report.tool_calls += d.tool_calls;
                report.per_agent = d.per_agent;
                report.redacted = d.redacted;
                // Tables read completely and delivered: remember when, and forget old ids.
                if !shutdown.is_triggered() {
                    let keep = (s.collect.lookback + Duration::from_secs(600)).as_micros() as i64;
                    for table in &completed {
                        if let Err(e) = self
                            .state
                            .set_read_mark(table, cycle_start_us)
                            .and_then(|_| self.state.prune(table, cycle_start_us - keep))
                        {
                            report.errors.push(format!("{table}: {e}"));
                        }
                    }
                }
            }
            Err(e) => {
                let msg = match &e {
                    DeliveryError::Sink(se) => format!(
                        "delivery to {} failed: {se}. Nothing unconfirmed was checkpointed; the next cycle retries",
                        self.sink.describe()
                    ),
                    DeliveryError::State(se) => se.to_string(),
                };
                tracing::error!("ERROR {msg}");
                report.errors.push(msg);
            }
        }
        report.inventory = Some(inv);
        Ok(())
    }

    /// The delivery stage: map, batch, send, checkpoint.
    async fn deliver(
        &self,
        mut rx: mpsc::Receiver<Chunk>,
        agents: BTreeMap<String, Arc<AgentInfo>>,
        shutdown: Shutdown,
    ) -> Result<DeliveryTotals, DeliveryError> {
        let mut totals = DeliveryTotals::default();
        while let Some(chunk) = rx.recv().await {
            if shutdown.is_triggered() {
                return Ok(totals);
            }
            for (reason, raw) in &chunk.unreadable {
                self.quarantine.put(&chunk.table, "", reason, raw)?;
            }
            let mut batch = Batch::default();
            // Units with ready records (traces, inventory): validated, batched, checkpointed alike.
            for unit in &chunk.prepared {
                let mut mapped = traffic::Mapped {
                    records: unit.records.clone(),
                    truncated_payloads: 0,
                    tool_calls: 0,
                };
                if let Some(r) = &self.settings.redactor {
                    let counts = r.redact_mapped(&mut mapped, self.settings.map.max_string_bytes);
                    totals.redacted.add(&counts);
                }
                let records =
                    self.accept(&chunk.table, &unit.id, &unit.host, mapped.records.iter())?;
                let key = (unit.id.as_str(), unit.time_us);
                if self
                    .add_unit(
                        &mut batch,
                        &chunk.table,
                        &unit.agent,
                        key,
                        records,
                        &mut totals,
                    )
                    .await?
                    && shutdown.is_triggered()
                {
                    return Ok(totals);
                }
            }
            if !batch.is_empty() {
                let agent = chunk
                    .prepared
                    .first()
                    .map(|u| u.agent.clone())
                    .unwrap_or_default();
                self.flush(&mut batch, &chunk.table, &agent, &mut totals)
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
            for exec in &chunk.executions {
                let mut mapped = traffic::map_execution(&ctx, exec, &self.settings.map);
                if let Some(r) = &self.settings.redactor {
                    let counts = r.redact_mapped(&mut mapped, self.settings.map.max_string_bytes);
                    totals.redacted.add(&counts);
                }
                totals.truncated += u64::from(mapped.truncated_payloads);
                totals.tool_calls += u64::from(mapped.tool_calls);
                let records = self.accept(
                    &chunk.table,
                    &exec.request_id,
                    &agent.host,
                    mapped.records.iter(),
                )?;
                let key = (
                    exec.request_id.as_str(),
                    exec.request_time.timestamp_micros(),
                );
                if self
                    .add_unit(
                        &mut batch,
                        &chunk.table,
                        &agent.name,
                        key,
                        records,
                        &mut totals,
                    )
                    .await?
                    && shutdown.is_triggered()
                {
                    return Ok(totals);
                }
            }
            if !batch.is_empty() {
                self.flush(&mut batch, &chunk.table, &agent.name, &mut totals)
                    .await?;
            }
        }
        Ok(totals)
    }

    /// Validates and encodes records; what Akto would reject goes to quarantine.
    fn accept<'r>(
        &self,
        table: &str,
        id: &str,
        host: &str,
        records: impl Iterator<Item = &'r traffic::AktoRecord>,
    ) -> Result<Vec<OutRecord>, StateError> {
        let mut out = Vec::new();
        for rec in records {
            match traffic::validate(rec) {
                Ok(()) => out.push(OutRecord {
                    key: host.to_string(),
                    json: traffic::encode(rec),
                }),
                Err(v) => self
                    .quarantine
                    .put(table, id, &v.to_string(), &traffic::encode(rec))?,
            }
        }
        Ok(out)
    }

    /// Adds one unit's records to the batch, sending the batch first when the unit would not
    /// fit. Returns whether a batch was sent.
    async fn add_unit(
        &self,
        batch: &mut Batch,
        table: &str,
        agent: &str,
        (id, time_us): (&str, i64),
        records: Vec<OutRecord>,
        totals: &mut DeliveryTotals,
    ) -> Result<bool, DeliveryError> {
        let max_records = self.settings.batch_size.max(1);
        let max_bytes = MAX_BODY_BYTES - BODY_WRAPPER_BYTES - 1024;
        let bytes: usize = records.iter().map(|r| r.json.len() + 1).sum();
        let mut sent = false;
        if !batch.is_empty()
            && (batch.records.len() + records.len() > max_records
                || batch.bytes + bytes > max_bytes)
        {
            self.flush(batch, table, agent, totals).await?;
            sent = true;
        }
        batch.push(agent, id, time_us, records, bytes);
        Ok(sent)
    }

    /// Sends one batch and checkpoints the executions whose records were all confirmed.
    async fn flush(
        &self,
        batch: &mut Batch,
        table: &str,
        agent: &str,
        totals: &mut DeliveryTotals,
    ) -> Result<(), DeliveryError> {
        let b = std::mem::take(batch);
        if !b.records.is_empty() {
            self.state.mark_in_flight(b.records.len())?;
        }
        let result = if b.records.is_empty() {
            Ok(Default::default())
        } else {
            self.sink.deliver(&b.records).await
        };
        let (done, rejected, failure): (Vec<usize>, Vec<(usize, String)>, Option<SinkError>) =
            match result {
                Ok(outcome) => (outcome.delivered, outcome.rejected, None),
                Err(e) => (
                    e.delivered_before_failure().to_vec(),
                    e.rejected_before_failure().to_vec(),
                    Some(e),
                ),
            };
        let mut settled = vec![false; b.records.len()];
        for i in &done {
            if let Some(s) = settled.get_mut(*i) {
                *s = true;
            }
        }
        for (i, reason) in &rejected {
            if let (Some(s), Some(rec)) = (settled.get_mut(*i), b.records.get(*i)) {
                *s = true;
                let owner = b.owner_of(*i).map(|e| e.0.as_str()).unwrap_or("");
                self.quarantine.put(
                    table,
                    owner,
                    &format!("the sink refused it: {reason}"),
                    &rec.json,
                )?;
            }
        }
        let rows: Vec<DeliveredRow<'_>> = b
            .execs
            .iter()
            .filter(|(_, _, range)| range.clone().all(|i| settled[i]))
            .map(|(id, t, _)| DeliveredRow {
                table,
                id,
                time_us: *t,
            })
            .collect();
        self.state.commit_delivered(&rows)?;
        totals.records_sent += done.len() as u64;
        for i in &done {
            let owner = b.execs.iter().position(|(_, _, r)| r.contains(i));
            let who = owner
                .and_then(|k| b.agents.get(k))
                .map(String::as_str)
                .unwrap_or(agent);
            *totals.per_agent.entry(who.to_string()).or_default() += 1;
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

#[derive(Default)]
struct DeliveryTotals {
    redacted: RedactionCounts,
    records_sent: u64,
    truncated: u64,
    tool_calls: u64,
    per_agent: BTreeMap<String, u64>,
}

/// Records of whole executions, sent together so an execution is checkpointed as a unit.
#[derive(Default)]
struct Batch {
    records: Vec<OutRecord>,
    /// (request id, time µs, its records' indices)
    execs: Vec<(String, i64, std::ops::Range<usize>)>,
    /// The agent of each entry of `execs` (a prepared-units batch mixes agents).
    agents: Vec<String>,
    bytes: usize,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.execs.is_empty()
    }
    fn push(&mut self, agent: &str, id: &str, time_us: i64, records: Vec<OutRecord>, bytes: usize) {
        self.agents.push(agent.to_string());
        let start = self.records.len();
        self.records.extend(records);
        self.execs
            .push((id.to_string(), time_us, start..self.records.len()));
        self.bytes += bytes;
    }
    fn owner_of(&self, i: usize) -> Option<&(String, i64, std::ops::Range<usize>)> {
        self.execs.iter().find(|(_, _, r)| r.contains(&i))
    }
}
