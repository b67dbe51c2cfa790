//! `akto-standin`: run the strict Akto ingestion stand-in as a process, for manual runs and
//! demos (`akto-standin --listen 127.0.0.1:0 [--require-jwt X] [--max-record-bytes N]`).

use std::net::SocketAddr;

use akto_standin::{StandIn, StandInConfig};
use clap::Parser;

/// A strict local stand-in for Akto's Data Ingestion Service.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Require `authorization: <JWT>` on every batch.
    #[arg(long, env = "AKTO_STANDIN_JWT", hide_env_values = true)]
    require_jwt: Option<String>,
    /// Longest record accepted (re-serialized), as Akto's ingestion producer's
    /// max.request.size: 5242880 (AKTO_KAFKA_MAX_REQUEST_SIZE's default), 1048576 for Akto
    /// releases whose producer keeps Kafka's default. A batch with a longer record gets 422.
    #[arg(
        long,
        env = "AKTO_STANDIN_MAX_RECORD_BYTES",
        default_value_t = akto_standin::DEFAULT_MAX_RECORD_BYTES
    )]
    max_record_bytes: usize,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let args = Args::parse();
    let cfg = StandInConfig {
        listen: args.listen,
        require_jwt: args.require_jwt,
    };
    let standin = match StandIn::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ERROR cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    standin.set_max_record_bytes(args.max_record_bytes);
    println!("listening on {}", standin.url());
    wait_for_stop().await;
    let (ok, bad, n) = (
        standin.accepted_batches(),
        standin.rejected_batches(),
        standin.records().len(),
    );
    standin.shutdown().await;
    println!("stopped: accepted_batches={ok} rejected_batches={bad} records={n}");
    std::process::ExitCode::SUCCESS
}

/// Wait for Ctrl-C (SIGINT) or, on Unix, SIGTERM.
async fn wait_for_stop() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                eprintln!("WARN cannot listen for SIGTERM ({e}); stop with Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
