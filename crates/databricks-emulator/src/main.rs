//! The `databricks-emulator` binary: runs the emulated Databricks workspace until killed.

use std::io::Write;
use std::net::SocketAddr;

use clap::Parser;
use databricks_emulator::{Emulator, EmulatorConfig};

const AFTER_HELP: &str = "\
FAULT SPEC (--faults): rules separated by ';', each a comma-separated list of key=value:
  route=PREFIX        path prefix the rule applies to (default '/'); /_emulator/ is never faulted
  method=GET|POST     only requests of that method (default any)
  kind=429            answer 429 REQUEST_LIMIT_EXCEEDED with Retry-After (retry_after=SECONDS, default 1)
  kind=503            answer 503 TEMPORARILY_UNAVAILABLE
  kind=403|404        answer 403/404 (storage routes /_signed/... with S3-style XML, others as the API)
  kind=insert_trace   before answering, log a trace started at at_ms=EPOCH_MS to every experiment
  kind=latency        add ms=MILLISECONDS before answering (count defaults to unlimited)
  kind=drop           close the connection without any response (the request is not handled)
  kind=drop_after     handle the request (e.g. create the statement), then close the connection
                      without the response
  kind=expire_tokens  expire every issued OAuth token (the triggering request then gets 401)
  kind=slow           new statements run at least ms=MILLISECONDS (a cancel stops them)
  kind=pending        new statements stay PENDING for polls=K polls (default 3)
  kind=fail           new statements FAIL (optionally only those reading table=catalog.schema.table)
  kind=byte_limit     new statements get byte_limit at most bytes=N (results past it come back
                      truncated; optionally only those reading table=catalog.schema.table)
  count=N|unlimited   how many times the rule fires (default 1)
  after=N             let N matching requests pass before the rule starts firing
Example: --faults 'route=/api/2.0/sql/statements,kind=429,count=3,retry_after=1;route=/oidc,kind=503,count=2'

ADMIN API (no auth, loopback only): POST /_emulator/generate {\"rows\":N,\"late\":M},
GET /_emulator/requests, GET /_emulator/stats, POST /_emulator/faults {\"spec\":\"...\"},
POST /_emulator/permissions {\"principal\":\"ID\",\"revoke\"|\"grant\":\"USE_CATALOG|USE_SCHEMA|SELECT\",\"table\":\"c.s.t\"},
POST /_emulator/endpoint-tags {\"endpoint\":\"NAME\",\"key\":\"K\",\"value\":\"V\"}.";

/// An emulated Databricks workspace: OAuth, Unity Catalog, Model Serving, SQL statements
/// (executed by SQLite) and MLflow traces, over real HTTP.
#[derive(Parser)]
#[command(name = "databricks-emulator", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0", env = "EMULATOR_LISTEN")]
    listen: SocketAddr,
    /// Number of agents (kinds cycle: ResponsesAgent, ChatAgent, legacy chat, app-only).
    #[arg(long, default_value_t = 5)]
    agents: usize,
    /// Initial executions spread over the past 60 minutes.
    #[arg(long, default_value_t = 200)]
    rows: usize,
    /// Seed of all generated data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// OAuth client id accepted by /oidc/v1/token.
    #[arg(long, default_value = "emulator-client", env = "EMULATOR_CLIENT_ID")]
    client_id: String,
    /// OAuth client secret accepted by /oidc/v1/token.
    #[arg(
        long,
        default_value = "emulator-secret",
        env = "EMULATOR_CLIENT_SECRET",
        hide_env_values = true
    )]
    client_secret: String,
    /// A personal access token also accepted as Bearer (principal "pat-user").
    #[arg(long, env = "EMULATOR_PAT", hide_env_values = true)]
    pat: Option<String>,
    /// Unity Catalog catalog.
    #[arg(long, default_value = "workspace")]
    catalog: String,
    /// Unity Catalog schema.
    #[arg(long, default_value = "default")]
    schema: String,
    /// Prefix of the agents' tables (distractor tables sit outside it).
    #[arg(long, default_value = "")]
    table_prefix: String,
    /// Faults to inject (syntax below).
    #[arg(long, default_value = "")]
    faults: String,
    /// OAuth token lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    token_ttl_secs: u64,
    /// Rows per statement result chunk.
    #[arg(long, default_value_t = 1000)]
    chunk_rows: usize,
    /// Approximate bytes of each request+response payload.
    #[arg(long, default_value_t = 1500)]
    payload_bytes: usize,
    /// End of the generated initial hour, in ms since the epoch (default: now). A restart with
    /// the same seed and anchor holds the same rows at the same times.
    #[arg(long)]
    anchor_unix_ms: Option<i64>,
    /// No Unity Catalog metastore (Unity Catalog not enabled): Unity Catalog routes answer 404
    /// METASTORE_DOES_NOT_EXIST.
    #[arg(long)]
    no_metastore: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let c = Cli::parse();
    let cfg = EmulatorConfig {
        listen: c.listen,
        agents: c.agents,
        rows: c.rows,
        seed: c.seed,
        client_id: c.client_id,
        client_secret: c.client_secret,
        pat: c.pat,
        catalog: c.catalog,
        schema: c.schema,
        table_prefix: c.table_prefix,
        faults: c.faults,
        token_ttl_secs: c.token_ttl_secs,
        chunk_rows: c.chunk_rows,
        payload_bytes: c.payload_bytes,
        otel_output_bytes: 0,
        anchor_us: c.anchor_unix_ms.map(|ms| ms.saturating_mul(1000)),
        no_metastore: c.no_metastore,
    };
    let emu = match Emulator::start(cfg).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("databricks-emulator: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Handlers first: a SIGTERM sent as soon as the line below is read must not kill us.
    let stop = stop_signal();
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening on {}", emu.base_url());
    let _ = out.flush();
    stop.await;
    emu.shutdown().await;
    std::process::ExitCode::SUCCESS
}

/// Registers the SIGTERM and SIGINT handlers now and returns a future that resolves on either.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
