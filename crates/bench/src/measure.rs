//! The measurements. The emulator (and, for the HTTP sink, the counting stand-in) always run as
//! separate processes; the connector runs in this process (CPU from `getrusage(RUSAGE_SELF)`) or
//! as the release `databricks-shield -once` binary (CPU and peak RSS from `wait4`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use databricks_shield::databricks::sql::Statement;
use databricks_shield::databricks::{ClientOptions, Credentials, DatabricksClient};
use databricks_shield::run::{Connector, CycleReport, Settings, Shutdown};
use databricks_shield::sink::{AnySink, FileSink, HttpSink, HttpSinkConfig};
use databricks_shield::state::StateStore;
use databricks_shield::traffic::{RedactKind, Redactor};
use serde_json::{json, Value};
use tokio::runtime::Runtime;

use crate::procs::{self, median, step_err, BenchError, Service};
use crate::{Out, SinkKind};

pub(crate) const CLIENT_ID: &str = "emulator-client";
pub(crate) const CLIENT_SECRET: &str = "emulator-secret";
/// Approximate request+response bytes per row, as the issue asks (~5 KB).
pub const PAYLOAD_BYTES: usize = 5000;
const SEED: u64 = 7;
/// `BATCH_SIZE` default of the connector.
pub const DEFAULT_BATCH: usize = 50;

/// A scratch directory plus the sibling binaries.
pub(crate) struct Work {
    dir: tempfile::TempDir,
    bins: PathBuf,
}

impl Work {
    pub(crate) fn new() -> Result<Work, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix("shield-bench-")
            .tempdir()
            .map_err(|e| step_err("creating a scratch directory", e))?;
        Ok(Work {
            dir,
            bins: procs::bin_dir(),
        })
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub(crate) fn emulator(&self, rows: usize, agents: usize) -> Result<Service, BenchError> {
        let started = Instant::now();
        let args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--agents",
            &agents.to_string(),
            "--rows",
            &rows.to_string(),
            "--seed",
            &SEED.to_string(),
            "--payload-bytes",
            &PAYLOAD_BYTES.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // `SHIELD_BENCH_EMULATOR`: another build's emulator, so that an A/B of two connector
        // builds reads the same rows (`scripts/bench-ab.sh --same-input`).
        let emulator = std::env::var_os("SHIELD_BENCH_EMULATOR")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.bins.join("databricks-emulator"));
        let s = Service::spawn(&emulator, &args, &self.path("emulator.log"))?;
        eprintln!(
            "  emulator: {rows} rows, {agents} agents, ready in {:.1}s at {}",
            started.elapsed().as_secs_f64(),
            s.url
        );
        Ok(s)
    }
    pub(crate) fn standin(&self) -> Result<Service, BenchError> {
        Service::spawn(
            &self.bins.join("shield-bench"),
            &["standin".to_string()],
            &self.path("standin.log"),
        )
    }
}

pub(crate) fn client(base: &str) -> Result<DatabricksClient, BenchError> {
    let url = url::Url::parse(base).map_err(|e| step_err("emulator URL", e))?;
    DatabricksClient::new(
        &url,
        Credentials::OAuth {
            client_id: CLIENT_ID.to_string(),
            client_secret: CLIENT_SECRET.to_string().into(),
        },
        ClientOptions::default(),
    )
    .map_err(|e| step_err("building the Databricks client", e))
}

fn sink(kind: SinkKind, standin: Option<&Service>, file: &Path) -> Result<AnySink, BenchError> {
    Ok(match kind {
        SinkKind::File => AnySink::File(
            FileSink::new(Some(file.to_path_buf())).map_err(|e| step_err("file sink", e))?,
        ),
        SinkKind::Http => {
            let s = standin.ok_or_else(|| step_err("http sink", "no stand-in running"))?;
            let url = url::Url::parse(&s.url).map_err(|e| step_err("stand-in URL", e))?;
            AnySink::Http(
                HttpSink::new(HttpSinkConfig {
                    url,
                    jwt: None,
                    timeout: Duration::from_secs(30),
                    retry: Default::default(),
                })
                .map_err(|e| step_err("http sink", e))?,
            )
        }
    })
}

/// Records per batch and batches per state commit (`BATCH_SIZE`, `CHECKPOINT_BATCHES`).
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    pub batch_size: usize,
    pub checkpoint_batches: usize,
}

impl Batching {
    /// The connector's defaults.
    pub const DEFAULT: Batching = Batching {
        batch_size: DEFAULT_BATCH,
        checkpoint_batches: databricks_shield::config::DEFAULT_CHECKPOINT_BATCHES,
    };
}

/// The production defaults (`app::settings_for_demo`, batch 50, 4 tables at once), with a
/// 2-hour lookback so the emulator's initial hour of rows is read completely.
fn settings(state_dir: &Path, redact: bool, lookback: Duration, batching: Batching) -> Settings {
    let mut s = databricks_shield::app::settings_for_demo("workspace", "default", state_dir);
    s.batch_size = batching.batch_size;
    s.checkpoint_batches = batching.checkpoint_batches;
    s.collect.lookback = lookback;
    s.workspace_host = "127.0.0.1".into();
    s.redactor = redact.then(|| Redactor::new(&RedactKind::ALL));
    s
}

fn connector(
    emu: &Service,
    sink: AnySink,
    state_dir: &Path,
    settings: Settings,
) -> Result<Arc<Connector>, BenchError> {
    let state = StateStore::open(state_dir, false).map_err(|e| step_err("state store", e))?;
    Ok(Arc::new(Connector::new(
        client(&emu.url)?,
        sink,
        state,
        settings,
    )))
}

async fn cycle(c: &Arc<Connector>) -> CycleReport {
    let (_trigger, shutdown) = Shutdown::new();
    let report = c.run_cycle(&shutdown).await;
    if let Err(e) = c.sink.flush().await {
        eprintln!("  WARN flushing the sink: {e}");
    }
    report
}

async fn get_json(url: &str) -> Result<Value, BenchError> {
    reqwest::get(url)
        .await
        .map_err(|e| step_err(url, e))?
        .json()
        .await
        .map_err(|e| step_err(url, e))
}

async fn post_json(url: &str, body: &Value) -> Result<(), BenchError> {
    let resp = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| step_err(url, e))?;
    if !resp.status().is_success() {
        return Err(step_err(url, format!("answered {}", resp.status())));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Floor

/// The connector's client to the emulator at `url`, authenticated, with the inventory of its
/// default schema and the warehouse statements run on.
pub(crate) async fn connect(
    url: &str,
) -> Result<
    (
        DatabricksClient,
        databricks_shield::discovery::Inventory,
        String,
    ),
    BenchError,
> {
    let c = client(url)?;
    c.authenticate()
        .await
        .map_err(|e| step_err("authenticate", e))?;
    let inv = databricks_shield::discovery::discover(&c, "workspace", "default", "")
        .await
        .map_err(|e| step_err("discover", e))?;
    let (wh, _) = c
        .choose_warehouse(None)
        .await
        .map_err(|e| step_err("warehouse", e))?;
    Ok((c, inv, wh.id))
}

/// Request and response payloads as the tables hold them (`None` = SQL NULL).
pub(crate) async fn sample_payloads(
    emu: &Service,
    per_table: usize,
) -> Result<Vec<(Option<String>, Option<String>)>, BenchError> {
    let (c, inv, warehouse_id) = connect(&emu.url).await?;
    let mut out = Vec::new();
    for (_, t) in inv.readable() {
        let st = Statement {
            warehouse_id: warehouse_id.clone(),
            statement: format!(
                "SELECT request, response FROM {} LIMIT {per_table}",
                t.full_name
            ),
            parameters: vec![],
            table: t.full_name.clone(),
            timeout: Duration::from_secs(120),
        };
        let rows = c
            .execute(&st)
            .await
            .map_err(|e| step_err("sample query", e))?
            .collect_all()
            .await
            .map_err(|e| step_err("sample query", e))?;
        for r in rows {
            let cell = |i: usize| r.get(i).and_then(|c| c.text()).map(|t| t.into_owned());
            out.push((cell(0), cell(1)));
        }
    }
    if out.is_empty() {
        return Err(step_err(
            "sampling payloads",
            "the emulator returned no rows",
        ));
    }
    Ok(out)
}

/// Parses and re-serializes `rows` rows' payloads on the calling thread: (rows per CPU second,
/// rows per wall second).
fn floor_once(samples: &[(Option<String>, Option<String>)], rows: usize) -> (f64, f64) {
    let (t0, w0) = (procs::thread_cpu(), Instant::now());
    let mut total = 0usize;
    for i in 0..rows {
        let (req, resp) = &samples[i % samples.len()];
        for s in [req, resp].into_iter().flatten() {
            let v: Value = match serde_json::from_str(s) {
                Ok(v) => v,
                Err(_) => Value::String(s.clone()),
            };
            total += serde_json::to_string(&v).map(|o| o.len()).unwrap_or(0);
        }
    }
    std::hint::black_box(total);
    let cpu = (procs::thread_cpu() - t0).max(1e-9);
    let wall = w0.elapsed().as_secs_f64().max(1e-9);
    (rows as f64 / cpu, rows as f64 / wall)
}

/// The floor, `reps` times on one dedicated thread; medians.
pub(crate) fn floor(
    samples: Vec<(Option<String>, Option<String>)>,
    rows: usize,
    reps: usize,
) -> Result<Value, BenchError> {
    let bytes: usize = samples
        .iter()
        .map(|(a, b)| a.as_ref().map_or(0, |s| s.len()) + b.as_ref().map_or(0, |s| s.len()))
        .sum();
    let n = samples.len();
    let handle = std::thread::spawn(move || {
        (0..reps.max(1))
            .map(|_| floor_once(&samples, rows))
            .collect::<Vec<_>>()
    });
    let runs = handle
        .join()
        .map_err(|_| step_err("floor", "the floor thread panicked"))?;
    let cpu: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let wall: Vec<f64> = runs.iter().map(|r| r.1).collect();
    Ok(json!({
        "kind": "floor",
        "rows": rows,
        "reps": reps,
        "sample_rows": n,
        "mean_payload_bytes_per_row": bytes as f64 / n as f64,
        "rows_per_cpu_s": median(&cpu),
        "rows_per_wall_s": median(&wall),
        "rows_per_cpu_s_each": cpu,
    }))
}

pub fn floor_cmd(rt: &Runtime, out: &mut Out, rows: usize, reps: usize) -> Result<(), BenchError> {
    let work = Work::new()?;
    let emu = work.emulator(2000, 5)?;
    let samples = rt.block_on(sample_payloads(&emu, 400))?;
    emu.stop();
    eprintln!("floor: {} sample rows, {rows} rows x {reps}", samples.len());
    let v = floor(samples, rows, reps)?;
    out.emit(&v);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Throughput (in-process connector)

struct RunNumbers {
    v: Value,
    rows_per_s: f64,
    rows_per_cpu_s: f64,
    cpu_per_100k: f64,
}

/// One fresh-state cycle over every row of the emulator.
#[allow(clippy::too_many_arguments)]
fn throughput_run(
    rt: &Runtime,
    work: &Work,
    emu: &Service,
    standin: Option<&Service>,
    kind: SinkKind,
    redact: bool,
    expect_rows: usize,
    batching: Batching,
    tag: &str,
) -> Result<RunNumbers, BenchError> {
    let state_dir = work.path(&format!("state-{tag}"));
    let file = work.path(&format!("out-{tag}.jsonl"));
    let standin = standin.filter(|_| kind == SinkKind::Http);
    let sink = sink(kind, standin, &file)?;
    let c = connector(
        emu,
        sink,
        &state_dir,
        settings(&state_dir, redact, Duration::from_secs(7200), batching),
    )?;
    let standin_before = match standin {
        Some(s) => rt.block_on(get_json(&format!("{}/_bench/stats", s.url)))?["records"]
            .as_u64()
            .unwrap_or(0),
        None => 0,
    };
    let (e0, s0) = (emu.cpu(), standin.map_or(0.0, Service::cpu));
    let (c0, w0) = (procs::self_cpu(), Instant::now());
    let report = rt.block_on(cycle(&c));
    let wall = w0.elapsed().as_secs_f64();
    let cpu = procs::self_cpu() - c0;
    let (emu_cpu, standin_cpu) = (emu.cpu() - e0, standin.map_or(0.0, Service::cpu) - s0);
    let received = match standin {
        Some(s) => {
            rt.block_on(get_json(&format!("{}/_bench/stats", s.url)))?["records"]
                .as_u64()
                .unwrap_or(0)
                - standin_before
        }
        None => report.records_sent,
    };
    let api_calls = c.client.stats().total();
    drop(c);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir_all(&state_dir);
    if !report.ok() {
        return Err(step_err("cycle", report.errors.join("; ")));
    }
    // Executions also count other units of the cycle (e.g. MLflow traces): at least the rows.
    let rows = expect_rows as u64;
    if report.executions < rows || received != report.records_sent {
        return Err(step_err(
            "cycle",
            format!(
                "moved {} executions (expected at least {expect_rows}), sink received {received} of {} records",
                report.executions, report.records_sent
            ),
        ));
    }
    let rows_f = rows as f64;
    let n = RunNumbers {
        rows_per_s: rows_f / wall,
        rows_per_cpu_s: rows_f / cpu.max(1e-9),
        cpu_per_100k: cpu / rows_f * 100_000.0,
        v: json!({
            "kind": "throughput_run",
            "sink": kind,
            "redact": redact,
            "batch_size": batching.batch_size,
            "checkpoint_batches": batching.checkpoint_batches,
            "rows": rows,
            "executions": report.executions,
            "records": report.records_sent,
            "tool_calls": report.tool_calls,
            "redacted_values": report.redacted.total(),
            "wall_s": wall,
            "connector_cpu_s": cpu,
            "emulator_cpu_s": emu_cpu,
            "standin_cpu_s": standin_cpu,
            "statements": report.statements,
            "rows_read": report.rows_read,
            "bytes_read": report.bytes_read,
            "api_calls": api_calls,
        }),
    };
    eprintln!(
        "  {tag}: {rows} rows in {wall:.1}s = {:.0} rows/s; connector {cpu:.1} CPU-s ({:.2} per 100k), emulator {emu_cpu:.1} CPU-s",
        n.rows_per_s, n.cpu_per_100k
    );
    Ok(n)
}

#[allow(clippy::too_many_arguments)]
pub fn throughput(
    rt: &Runtime,
    out: &mut Out,
    rows: usize,
    reps: usize,
    agents: usize,
    sinks: &[SinkKind],
    redact: bool,
    batching: Batching,
) -> Result<(), BenchError> {
    let work = Work::new()?;
    eprintln!("throughput: {rows} rows, {agents} agents, {reps} reps, sinks {sinks:?}, redaction compare {redact}");
    let emu = work.emulator(rows, agents)?;
    let standin = if sinks.contains(&SinkKind::Http) {
        Some(work.standin()?)
    } else {
        None
    };
    let samples = rt.block_on(sample_payloads(&emu, 400))?;
    let floor_v = floor(samples, rows.min(100_000), 3)?;
    let floor_rate = floor_v["rows_per_cpu_s"].as_f64().unwrap_or(f64::NAN);
    let floor_wall = floor_v["rows_per_wall_s"].as_f64().unwrap_or(f64::NAN);
    eprintln!("  floor: {floor_rate:.0} rows per CPU-s (one thread)");
    out.emit(&floor_v);
    let redacts: Vec<bool> = if redact {
        vec![false, true]
    } else {
        vec![false]
    };
    // (sink, redact) -> per-rep numbers; configurations interleaved within each rep.
    let mut results: Vec<((SinkKind, bool), Vec<RunNumbers>)> = Vec::new();
    for &k in sinks {
        for &r in &redacts {
            results.push(((k, r), Vec::new()));
        }
    }
    for rep in 0..reps.max(1) {
        for ((k, r), runs) in results.iter_mut() {
            let tag = format!("{k:?}-{}-{rep}", if *r { "redact" } else { "plain" }).to_lowercase();
            let n = throughput_run(
                rt,
                &work,
                &emu,
                standin.as_ref(),
                *k,
                *r,
                rows,
                batching,
                &tag,
            )?;
            out.emit(&n.v);
            runs.push(n);
        }
    }
    for ((k, r), runs) in &results {
        let rps: Vec<f64> = runs.iter().map(|n| n.rows_per_s).collect();
        let rpc: Vec<f64> = runs.iter().map(|n| n.rows_per_cpu_s).collect();
        let c100: Vec<f64> = runs.iter().map(|n| n.cpu_per_100k).collect();
        let mut v = json!({
            "kind": "throughput",
            "sink": k,
            "redact": r,
            "batch_size": batching.batch_size,
            "checkpoint_batches": batching.checkpoint_batches,
            "rows": rows,
            "reps": runs.len(),
            "rows_per_s": median(&rps),
            "rows_per_s_each": rps,
            "connector_cpu_s_per_100k_rows": median(&c100),
            "connector_rows_per_cpu_s": median(&rpc),
            "floor_ratio_cpu": median(&rpc) / floor_rate,
            "floor_ratio_wall": median(&rps) / floor_wall,
        });
        if *r {
            if let Some((_, plain)) = results.iter().find(|((k2, r2), _)| k2 == k && !r2) {
                // Ratios per rep (same rep = same machine conditions), then the median.
                let wall: Vec<f64> = runs
                    .iter()
                    .zip(plain)
                    .map(|(a, b)| a.rows_per_s / b.rows_per_s)
                    .collect();
                let cpu: Vec<f64> = runs
                    .iter()
                    .zip(plain)
                    .map(|(a, b)| a.rows_per_cpu_s / b.rows_per_cpu_s)
                    .collect();
                v["redaction_ratio_wall"] = json!(median(&wall));
                v["redaction_ratio_cpu"] = json!(median(&cpu));
                v["redaction_ratio_wall_each"] = json!(wall);
            }
        }
        eprintln!("  => {v}");
        out.emit(&v);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Warehouse cost

fn api_requests(stats: &Value) -> u64 {
    stats["requests"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.contains("/_emulator"))
                .filter_map(|(_, v)| v.as_u64())
                .sum()
        })
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
pub fn cost(
    rt: &Runtime,
    out: &mut Out,
    cycles: usize,
    rows: usize,
    late: usize,
    initial: usize,
    agents: usize,
) -> Result<(), BenchError> {
    let work = Work::new()?;
    eprintln!(
        "cost: {initial} initial rows, then {cycles} cycles of {rows} new + {late} late rows"
    );
    let emu = work.emulator(initial, agents)?;
    let standin = work.standin()?;
    let state_dir = work.path("state-cost");
    // Production lookback (60 minutes): late rows land 5-55 minutes back, inside it.
    let s = settings(
        &state_dir,
        false,
        Duration::from_secs(3600),
        Batching::DEFAULT,
    );
    let c = connector(
        &emu,
        sink(SinkKind::Http, Some(&standin), &work.path("unused"))?,
        &state_dir,
        s,
    )?;
    let stats_url = format!("{}/_emulator/stats", emu.url);
    let gen_url = format!("{}/_emulator/generate", emu.url);
    let api = c.client.stats();
    let catchup = rt.block_on(cycle(&c));
    if !catchup.ok() {
        return Err(step_err("catch-up cycle", catchup.errors.join("; ")));
    }
    let bytes_per_row = catchup.bytes_read as f64 / catchup.executions.max(1) as f64;
    eprintln!(
        "  catch-up: {} executions, {} rows / {} bytes returned by {} statements ({bytes_per_row:.0} bytes per row)",
        catchup.executions, catchup.rows_read, catchup.bytes_read, catchup.statements
    );
    out.emit(&json!({
        "kind": "cost_catchup",
        "executions": catchup.executions,
        "rows_read": catchup.rows_read,
        "bytes_read": catchup.bytes_read,
        "statements": catchup.statements,
        "bytes_per_row": bytes_per_row,
    }));
    let mut rows_ratio = Vec::new();
    let mut bytes_ratio = Vec::new();
    let mut emu_rows_ratio = Vec::new();
    let mut calls = Vec::new();
    let mut emu_calls = Vec::new();
    let mut stmts = Vec::new();
    for i in 0..cycles {
        rt.block_on(post_json(&gen_url, &json!({"rows": rows, "late": late})))?;
        let e0 = rt.block_on(get_json(&stats_url))?;
        let a0 = api.total();
        let r = rt.block_on(cycle(&c));
        let a1 = api.total();
        let e1 = rt.block_on(get_json(&stats_url))?;
        if !r.ok() {
            return Err(step_err(&format!("cycle {i}"), r.errors.join("; ")));
        }
        let new = (rows + late) as f64;
        let d = |k: &str| e1[k].as_u64().unwrap_or(0) - e0[k].as_u64().unwrap_or(0);
        let emu_api = api_requests(&e1) - api_requests(&e0);
        let v = json!({
            "kind": "cost_cycle",
            "cycle": i + 1,
            "new_rows": rows,
            "late_rows": late,
            "executions": r.executions,
            "late_found": r.late_found,
            "duplicates_skipped": r.duplicates_skipped,
            "rows_read": r.rows_read,
            "bytes_read": r.bytes_read,
            "statements": r.statements,
            "rows_ratio": r.rows_read as f64 / new,
            "bytes_ratio": r.bytes_read as f64 / (new * bytes_per_row),
            "connector_api_calls": a1 - a0,
            "emulator_api_requests": emu_api,
            "emulator_statements_executed": d("statements_executed"),
            "emulator_rows_returned": d("rows_returned"),
            "emulator_chunks_served": d("chunks_served"),
            "emulator_rows_ratio": d("rows_returned") as f64 / new,
            "wall_s": r.duration.as_secs_f64(),
        });
        eprintln!("  {v}");
        rows_ratio.push(r.rows_read as f64 / new);
        bytes_ratio.push(r.bytes_read as f64 / (new * bytes_per_row));
        emu_rows_ratio.push(d("rows_returned") as f64 / new);
        calls.push((a1 - a0) as f64);
        emu_calls.push(emu_api as f64);
        stmts.push(r.statements as f64);
        if r.executions != (rows + late) as u64 {
            eprintln!(
                "  WARN cycle {}: {} executions delivered, {} generated",
                i + 1,
                r.executions,
                rows + late
            );
        }
        out.emit(&v);
    }
    let v = json!({
        "kind": "cost",
        "cycles": cycles,
        "new_rows_per_cycle": rows,
        "late_rows_per_cycle": late,
        "rows_ratio_median": median(&rows_ratio),
        "rows_ratio_max": rows_ratio.iter().cloned().fold(f64::NAN, f64::max),
        "bytes_ratio_median": median(&bytes_ratio),
        "bytes_ratio_max": bytes_ratio.iter().cloned().fold(f64::NAN, f64::max),
        "emulator_rows_ratio_median": median(&emu_rows_ratio),
        "connector_api_calls_per_cycle_median": median(&calls),
        "emulator_api_requests_per_cycle_median": median(&emu_calls),
        "statements_per_cycle_median": median(&stmts),
    });
    eprintln!("  => {v}");
    out.emit(&v);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The connector binary as a process

fn summary_field(log: &str, key: &str) -> Option<u64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("Cycle ") && l.contains(". Results: "))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

pub fn process(
    rt: &Runtime,
    out: &mut Out,
    rows: usize,
    agents: usize,
    kind: SinkKind,
    redact: bool,
) -> Result<Value, BenchError> {
    let work = Work::new()?;
    eprintln!("process: databricks-shield -once, {rows} rows, {agents} agents, {kind:?} sink, redaction {redact}");
    let emu = work.emulator(rows, agents)?;
    let standin = match kind {
        SinkKind::Http => Some(work.standin()?),
        SinkKind::File => None,
    };
    let state_dir = work.path("state-process");
    let log_path = work.path("connector.log");
    let file = work.path("out-process.jsonl");
    let log = std::fs::File::create(&log_path).map_err(|e| step_err("connector log", e))?;
    let log2 = log.try_clone().map_err(|e| step_err("connector log", e))?;
    let mut cmd = Command::new(work.bins.join("databricks-shield"));
    cmd.arg("-once")
        .env("DATABRICKS_HOST", &emu.url)
        .env("DATABRICKS_CLIENT_ID", CLIENT_ID)
        .env("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET)
        .env("DATABRICKS_CATALOG", "workspace")
        .env("DATABRICKS_SCHEMA", "default")
        .env("STATE_DIR", &state_dir)
        .env("LOOKBACK_MINUTES", "120")
        .env(
            "REDACT_SENSITIVE_DATA",
            if redact { "true" } else { "false" },
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    for k in [
        "DATABRICKS_TOKEN",
        "DATABRICKS_CONFIG_PROFILE",
        "AKTO_SINK",
        "KAFKA_BROKER_HOST",
    ] {
        cmd.env_remove(k);
    }
    match (kind, &standin) {
        (SinkKind::Http, Some(s)) => {
            cmd.env("DATA_INGESTION_SERVICE_URL", &s.url);
        }
        _ => {
            cmd.arg("--output").arg(&file);
        }
    }
    let (e0, s0) = (emu.cpu(), standin.as_ref().map_or(0.0, Service::cpu));
    let usage = procs::run_measured(cmd)?;
    let (emu_cpu, standin_cpu) = (
        emu.cpu() - e0,
        standin.as_ref().map_or(0.0, Service::cpu) - s0,
    );
    let received = match &standin {
        Some(s) => rt.block_on(get_json(&format!("{}/_bench/stats", s.url)))?["records"].as_u64(),
        None => None,
    };
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    if usage.exit_code != 0 {
        let tail: Vec<&str> = text.lines().rev().take(10).collect();
        return Err(step_err(
            "databricks-shield -once",
            format!("exit code {}; last log lines: {:?}", usage.exit_code, tail),
        ));
    }
    let cpu = usage.user_s + usage.sys_s;
    let rows_read = summary_field(&text, "rows_read");
    let records = summary_field(&text, "records_sent");
    let v = json!({
        "kind": "process",
        "sink": kind,
        "redact": redact,
        "rows": rows,
        "agents": agents,
        "rows_read": rows_read,
        "records_sent": records,
        "standin_records": received,
        "wall_s": usage.wall_s,
        "connector_user_s": usage.user_s,
        "connector_sys_s": usage.sys_s,
        "connector_cpu_s": cpu,
        "connector_cpu_s_per_100k_rows": cpu / rows as f64 * 100_000.0,
        "rows_per_s": rows as f64 / usage.wall_s,
        "connector_cores_used": cpu / usage.wall_s,
        "connector_share_of_cpu": cpu / (cpu + emu_cpu + standin_cpu),
        "emulator_cpu_s": emu_cpu,
        "standin_cpu_s": standin_cpu,
        "peak_rss_kib": usage.max_rss_kib,
        "ru_maxrss_kib": usage.ru_maxrss_kib,
        "peak_rss_mib": usage.max_rss_kib as f64 / 1024.0,
    });
    eprintln!("  => {v}");
    out.emit(&v);
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Memory experiments (in-process, one fresh process per configuration)

/// `VmHWM` (peak resident set) of this process in KiB.
fn self_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One in-process cycle (HTTP sink) with a given statement page size and table concurrency;
/// reports this process's peak RSS, to separate read buffers from state growth.
pub fn rss_cycle(
    rt: &Runtime,
    out: &mut Out,
    rows: usize,
    statement_mib: usize,
    concurrency: usize,
) -> Result<(), BenchError> {
    let work = Work::new()?;
    let emu = work.emulator(rows, 5)?;
    let standin = work.standin()?;
    let state_dir = work.path("state-rss");
    let mut s = settings(
        &state_dir,
        false,
        Duration::from_secs(7200),
        Batching::DEFAULT,
    );
    s.collect.target_statement_bytes = statement_mib << 20;
    s.table_concurrency = concurrency;
    let c = connector(
        &emu,
        sink(SinkKind::Http, Some(&standin), &work.path("unused"))?,
        &state_dir,
        s,
    )?;
    let before = self_hwm_kib();
    let r = rt.block_on(cycle(&c));
    if !r.ok() {
        return Err(step_err("cycle", r.errors.join("; ")));
    }
    let v = json!({
        "kind": "rss_cycle",
        "rows": rows,
        "statement_mib": statement_mib,
        "table_concurrency": concurrency,
        "statements": r.statements,
        "hwm_before_kib": before,
        "peak_rss_mib": self_hwm_kib() as f64 / 1024.0,
    });
    eprintln!("  => {v}");
    out.emit(&v);
    Ok(())
}

/// The state store alone: commits `rows` delivered rows (batches of 50, as the connector does)
/// and reports this process's peak RSS against the state file's size.
pub fn rss_state(out: &mut Out, total: usize) -> Result<(), BenchError> {
    let work = Work::new()?;
    let dir = work.path("state-only");
    let state = StateStore::open(&dir, false).map_err(|e| step_err("state store", e))?;
    let before = self_hwm_kib();
    let ids: Vec<String> = (0..total)
        .map(|i| format!("{i:08x}-0000-4000-8000-{i:012x}"))
        .collect();
    let t0 = 1_700_000_000_000_000i64;
    let started = Instant::now();
    let quarter = (total / 4).max(1);
    let mut report_at = quarter;
    for (b, chunk) in ids.chunks(DEFAULT_BATCH).enumerate() {
        let rows: Vec<databricks_shield::state::DeliveredRow<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(k, id)| databricks_shield::state::DeliveredRow {
                table: "workspace.default.support_bot_payload",
                id,
                time_us: t0 + ((b * DEFAULT_BATCH + k) as i64) * 1000,
                by_id: false,
            })
            .collect();
        state
            .commit_delivered(&rows)
            .map_err(|e| step_err("commit_delivered", e))?;
        if (b + 1) * DEFAULT_BATCH >= report_at {
            let size = std::fs::metadata(state.path())
                .map(|m| m.len())
                .unwrap_or(0);
            let v = json!({
                "kind": "rss_state",
                "rows_committed": (b + 1) * DEFAULT_BATCH,
                "state_file_mib": size as f64 / 1048576.0,
                "hwm_before_mib": before as f64 / 1024.0,
                "peak_rss_mib": self_hwm_kib() as f64 / 1024.0,
                "elapsed_s": started.elapsed().as_secs_f64(),
            });
            eprintln!("  {v}");
            out.emit(&v);
            report_at += quarter;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Everything

pub fn all(
    rt: &Runtime,
    out: &mut Out,
    rows: usize,
    reps: usize,
    large_rows: usize,
    skip_large: bool,
) -> Result<(), BenchError> {
    throughput(
        rt,
        out,
        rows,
        reps,
        5,
        &[SinkKind::File, SinkKind::Http],
        true,
        Batching::DEFAULT,
    )?;
    // The cost of a state commit per batch (CHECKPOINT_BATCHES=1): same rows, HTTP sink.
    throughput(
        rt,
        out,
        rows,
        reps,
        5,
        &[SinkKind::Http],
        false,
        Batching {
            checkpoint_batches: 1,
            ..Batching::DEFAULT
        },
    )?;
    // The same work split into the mapping stages and the transport, each alone on one thread.
    crate::stages::stages(rt, out, rows, reps)?;
    cost(rt, out, 12, 5000, 250, 20_000, 5)?;
    if !skip_large {
        process(rt, out, large_rows, 5, SinkKind::File, false)?;
        process(rt, out, large_rows, 200, SinkKind::Http, false)?;
        // Measured on this process's own high-water mark: each in a fresh process.
        fresh(out, &["rss-state", "--rows", &large_rows.to_string()])?;
    }
    // Read buffers vs statement page size and table concurrency (BENCHMARKS.md, peak RSS).
    for (mib, conc) in [(8, 4), (2, 4), (8, 1), (2, 1)] {
        fresh(
            out,
            &[
                "rss-cycle",
                "--rows",
                "50000",
                "--statement-mib",
                &mib.to_string(),
                "--table-concurrency",
                &conc.to_string(),
            ],
        )?;
    }
    Ok(())
}

/// Runs `shield-bench <args>` as a fresh process (whose peak RSS is its own) and forwards its
/// JSON result lines.
fn fresh(out: &mut Out, args: &[&str]) -> Result<(), BenchError> {
    let exe = std::env::current_exe().map_err(|e| step_err("shield-bench path", e))?;
    let output = Command::new(&exe)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| step_err("shield-bench subprocess", e))?;
    if !output.status.success() {
        return Err(step_err(
            "shield-bench subprocess",
            format!("{args:?} exited with {}", output.status),
        ));
    }
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            out.emit(&v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_fields_come_from_the_last_cycle_line() {
        let log = "x\nINFO Cycle completed in 1.0s. Results: agents=5 tables=5 rows_read=10 records_sent=7 errors=0\n\
                   INFO Cycle completed in 2.0s. Results: agents=5 tables=5 rows_read=1200 records_sent=1500 errors=0\n";
        assert_eq!(summary_field(log, "rows_read"), Some(1200));
        assert_eq!(summary_field(log, "records_sent"), Some(1500));
        assert_eq!(summary_field(log, "nope"), None);
        assert_eq!(summary_field("no summary", "rows_read"), None);
    }

    #[test]
    fn api_requests_skip_admin_routes() {
        let v = json!({"requests": {"POST /api/2.0/sql/statements": 4, "GET /_emulator/stats": 9, "POST /oidc/v1/token": 1}});
        assert_eq!(api_requests(&v), 5);
    }

    #[test]
    fn floor_counts_rows() {
        let s = vec![(Some("{\"a\":[1,2]}".to_string()), None)];
        let (cpu, wall) = floor_once(&s, 1000);
        assert!(cpu > 0.0 && wall > 0.0);
    }
}
