//! `shield-bench`: measures the real connector (`databricks_shield::run::Connector`, or the release
//! `databricks-shield -once` binary) against the Databricks emulator running as a separate
//! process, so every number is the connector's own: throughput and CPU per 100k rows (file and
//! HTTP sinks), the serde_json floor, peak RSS, warehouse cost per steady-state cycle, a
//! 200-agent cycle, and redaction on/off. Results are JSON lines on stdout; method and numbers
//! are written up in BENCHMARKS.md. `scripts/bench.sh` builds everything and runs `all`.

mod measure;
mod procs;
mod stages;
mod standin;

use std::io::Write as _;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Benchmarks of databricks-shield against the Databricks emulator (see BENCHMARKS.md).
#[derive(Parser)]
#[command(name = "shield-bench", version, about)]
struct Cli {
    /// Also append every JSON result line to this file.
    #[arg(long, global = true, value_name = "PATH")]
    out: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Which sink a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// JSON lines file (fsync per batch).
    File,
    /// HTTP to a strict Akto stand-in (counting variant, separate process).
    Http,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything, in order: floor, throughput + redaction (in-process), the run with a state
    /// commit per batch (CHECKPOINT_BATCHES=1), the stages and transport alone,
    /// warehouse cost, 1M-row process runs (peak RSS, file sink; the 200-agent scale cycle, HTTP
    /// sink), the state store alone, and peak RSS vs statement page size.
    All {
        /// Rows of the in-process throughput runs.
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        /// Repetitions of each in-process configuration (medians are reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Rows of the process runs (peak RSS, scale).
        #[arg(long, default_value_t = 1_000_000)]
        large_rows: usize,
        /// Skip the large process runs.
        #[arg(long)]
        skip_large: bool,
    },
    /// The floor: parse + re-serialize the emulator's payloads with serde_json on one thread.
    Floor {
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// In-process connector cycles over `rows` fresh rows: file and HTTP sinks, redaction off
    /// and on, interleaved, `reps` times; plus the floor measured in the same run.
    Throughput {
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[arg(long, default_value_t = 5)]
        agents: usize,
        /// Sinks to measure.
        #[arg(long, value_delimiter = ',', value_enum, default_values = ["file", "http"])]
        sinks: Vec<SinkKind>,
        /// Also measure with redaction on (all kinds).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        redact: bool,
        /// Records per sink batch (the connector's BATCH_SIZE; default 50).
        #[arg(long, default_value_t = measure::DEFAULT_BATCH)]
        batch_size: usize,
        /// Batches per state commit (the connector's CHECKPOINT_BATCHES; default 10).
        #[arg(long, default_value_t = measure::Batching::DEFAULT.checkpoint_batches)]
        checkpoint_batches: usize,
    },
    /// Steady-state warehouse cost: `cycles` cycles, each after generating `rows` new and `late`
    /// late rows.
    Cost {
        #[arg(long, default_value_t = 12)]
        cycles: usize,
        #[arg(long, default_value_t = 5000)]
        rows: usize,
        #[arg(long, default_value_t = 250)]
        late: usize,
        /// Rows already in the tables before the first (catch-up) cycle.
        #[arg(long, default_value_t = 20_000)]
        initial: usize,
        #[arg(long, default_value_t = 5)]
        agents: usize,
    },
    /// One `databricks-shield -once` process over `rows` rows: wall, CPU, peak RSS.
    Process {
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        #[arg(long, default_value_t = 5)]
        agents: usize,
        #[arg(long, value_enum, default_value_t = SinkKind::File)]
        sink: SinkKind,
        #[arg(long)]
        redact: bool,
    },
    /// Memory experiment: one in-process cycle (HTTP sink) with a given statement page size and
    /// table concurrency; reports this process's peak RSS.
    RssCycle {
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
        #[arg(long, default_value_t = 8)]
        statement_mib: usize,
        #[arg(long, default_value_t = 4)]
        table_concurrency: usize,
    },
    /// Memory experiment: the state store alone, `rows` delivered rows committed in batches of 50.
    RssState {
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
    },
    /// The connector's CPU stages alone on one thread (page parse, rows, map, validate, encode),
    /// each pass adding one, next to the floor: what mapping costs without network and state.
    Stages {
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// (internal) The counting strict Akto stand-in, as a process.
    Standin {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

/// Where results go: stdout and, optionally, a file.
pub struct Out {
    file: Option<std::fs::File>,
}

impl Out {
    /// Emits one result as a JSON line.
    pub fn emit(&mut self, value: &serde_json::Value) {
        let line = value.to_string();
        println!("{line}");
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{line}");
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ERROR cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Cmd::Standin { listen } = cli.cmd {
        return match rt.block_on(standin::serve(listen)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ERROR stand-in on {listen}: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let file = match &cli.out {
        Some(p) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("ERROR --out {}: {e}", p.display());
                return std::process::ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let mut out = Out { file };
    let result = match cli.cmd {
        Cmd::All {
            rows,
            reps,
            large_rows,
            skip_large,
        } => measure::all(&rt, &mut out, rows, reps, large_rows, skip_large),
        Cmd::Floor { rows, reps } => measure::floor_cmd(&rt, &mut out, rows, reps),
        Cmd::Throughput {
            rows,
            reps,
            agents,
            sinks,
            redact,
            batch_size,
            checkpoint_batches,
        } => measure::throughput(
            &rt,
            &mut out,
            rows,
            reps,
            agents,
            &sinks,
            redact,
            measure::Batching {
                batch_size,
                checkpoint_batches,
            },
        ),
        Cmd::Cost {
            cycles,
            rows,
            late,
            initial,
            agents,
        } => measure::cost(&rt, &mut out, cycles, rows, late, initial, agents),
        Cmd::Process {
            rows,
            agents,
            sink,
            redact,
        } => measure::process(&rt, &mut out, rows, agents, sink, redact).map(|_| ()),
        Cmd::RssCycle {
            rows,
            statement_mib,
            table_concurrency,
        } => measure::rss_cycle(&rt, &mut out, rows, statement_mib, table_concurrency),
        Cmd::RssState { rows } => measure::rss_state(&mut out, rows),
        Cmd::Stages { rows, reps } => stages::stages(&rt, &mut out, rows, reps),
        Cmd::Standin { .. } => Ok(()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ERROR {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
