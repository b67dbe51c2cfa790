//! The `databricks-shield` binary: parses the command line, then runs the chosen command.
//! Exit codes: 0 success, 1 a cycle or check failed (or a `-once` cycle was stopped by a signal
//! or its time limit before it finished), 2 bad configuration, 130 a second stop signal (exit at
//! once, without waiting for the batch in flight).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use databricks_shield::cli::{self, Command};
use databricks_shield::config::{Config, LogFormat, Needs};
use databricks_shield::ops::{self, Metrics, OpsServer, ServiceInfo};
use databricks_shield::run::{self, Connector, Shutdown};
use databricks_shield::{app, discovery};

fn main() -> ExitCode {
    let cli = match cli::parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Before any thread starts: the --env-file's proxy, SSL_CERT_FILE and RUST_LOG variables.
    cli.export_env_file_variables();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ERROR cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async_main(cli));
    // Dropping the runtime would wait for every blocking task, however long: a sink call left
    // behind at shutdown (a Kafka flush waiting out its message timeout) would hold the exit
    // past Akto's 300 s kill. Everything delivered was checkpointed before this point.
    runtime.shutdown_timeout(EXIT_GRACE);
    code
}

/// How long tasks still running when `main` returns (a Kafka producer's threads winding down,
/// a statement cancel) get before the process exits without them.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

async fn async_main(cli: cli::Cli) -> ExitCode {
    let command = cli.command.clone().unwrap_or(Command::Run);
    if let Command::Demo { output } = &command {
        app::init_logging(LogFormat::Text);
        return match databricks_shield::demo::run(output).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("ERROR demo failed: {e}");
                ExitCode::from(1)
            }
        };
    }
    let needs = match command {
        Command::Discover { .. } => Needs::Databricks,
        _ => Needs::DatabricksAndSink,
    };
    let config = match Config::from_cli(&cli, needs) {
        Ok(c) => c,
        Err(e) => {
            // A misspelt key in --env-file is often why a setting is missing: say so first.
            for w in &cli.env_file_warnings {
                eprintln!("WARN {w}");
            }
            if let Command::Check { json } = command {
                // check's own report still comes out (its first line, configuration, failed),
                // so that `check --json` always prints JSON.
                let steps = [databricks_shield::check::Step {
                    name: "configuration".into(),
                    ok: false,
                    detail: e.to_string(),
                    warning: false,
                }];
                print_steps(&steps, json);
            } else {
                eprintln!("ERROR {e}");
                // The line Akto's job runner shows for every exit.
                eprintln!("databricks-shield stopped (configuration refused, exit code 2)");
            }
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        for w in &cli.env_file_warnings {
            eprintln!("WARN {w}");
        }
        println!("{}", config.summary());
        return ExitCode::SUCCESS;
    }
    app::init_logging(config.log_format);
    for w in &cli.env_file_warnings {
        tracing::warn!("{w}");
    }
    match command {
        Command::Discover { json } => discover(&config, json).await,
        Command::Check { json } => check(&config, json).await,
        Command::Run | Command::Demo { .. } => run(config).await,
    }
}

async fn discover(config: &Config, json: bool) -> ExitCode {
    let result = async {
        let client = app::client(config)?;
        client.authenticate().await?;
        discovery::discover(&client, &config.catalog, &config.schema, &config.prefix).await
    }
    .await;
    match result {
        Ok(inv) => {
            if json {
                match serde_json::to_string_pretty(&inv) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("ERROR {e}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                print!("{}", discovery::render_table(&inv));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

async fn check(config: &Config, json: bool) -> ExitCode {
    let steps = databricks_shield::check::run(config).await;
    print_steps(&steps, json);
    if steps.iter().all(|s| s.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `check`'s report: one `[PASS]`/`[FAIL]` line per step, or a JSON array with `--json`.
fn print_steps(steps: &[databricks_shield::check::Step], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(steps).unwrap_or_default()
        );
    } else {
        print!("{}", databricks_shield::check::render(steps));
    }
}

async fn run(config: Config) -> ExitCode {
    tracing::info!(
        "Starting databricks-shield {} ({}): {}",
        env!("CARGO_PKG_VERSION"),
        if config.once { "one cycle" } else { "service" },
        config.summary()
    );
    let (trigger, shutdown) = Shutdown::new();
    let trigger = Arc::new(trigger);
    {
        let (trigger, mut signals) = (trigger.clone(), stop_signals());
        tokio::spawn(async move {
            if signals.recv().await.is_none() {
                return;
            }
            tracing::info!(
                "Shutdown requested: the batch in flight gets up to {}s to be confirmed (a second \
                 signal stops at once)",
                run::IN_FLIGHT_GRACE.as_secs()
            );
            trigger.trigger();
            if signals.recv().await.is_some() {
                tracing::warn!(
                    "Second stop signal: exiting now. Records sent but not yet checkpointed are \
                     sent again at the next start, which says how many"
                );
                std::process::exit(130);
            }
        });
    }
    // With -once, a clean stop before Akto's job runner kills the binary (its timeout is 300 s):
    // what was delivered is checkpointed and the log says why the cycle ended.
    let time_limited = Arc::new(AtomicBool::new(false));
    let mut limit_timer = None;
    if let (true, Some(limit)) = (config.once, config.once_time_limit) {
        let (trigger, flag) = (trigger.clone(), time_limited.clone());
        limit_timer = Some(tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            flag.store(true, Ordering::SeqCst);
            tracing::warn!(
                "-once time limit of {}s reached (ONCE_TIME_LIMIT_SECONDS): stopping; the batch \
                 in flight gets up to {}s to be confirmed",
                limit.as_secs(),
                run::IN_FLIGHT_GRACE.as_secs()
            );
            trigger.trigger();
        }));
    }
    let connector = match app::connector(&config).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            tracing::info!("databricks-shield stopped");
            return ExitCode::from(if e.is_configuration() { 2 } else { 1 });
        }
    };
    let (ops, metrics) = match start_ops(&config, &connector, &shutdown).await {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("{e}");
            tracing::info!("databricks-shield stopped");
            return ExitCode::from(1);
        }
    };
    let outcome =
        app::run_loop_outcome(connector, config.interval, config.once, shutdown, metrics).await;
    if let Some(server) = ops {
        server.stop().await;
    }
    if let Some(timer) = limit_timer {
        timer.abort();
    }
    let end = app::RunEnd::of(outcome, config.once, time_limited.load(Ordering::SeqCst));
    match end {
        app::RunEnd::TimeLimited => tracing::error!(
            "-once stopped at its time limit before the cycle finished: what was delivered is \
             checkpointed and the next run continues from there. A large backlog takes several \
             runs; if every run stops here without records, run `databricks-shield check`"
        ),
        app::RunEnd::Signalled => tracing::error!(
            "-once stopped by a signal before the cycle finished; what was not delivered is \
             sent by the next run"
        ),
        app::RunEnd::Success | app::RunEnd::Failed => {}
    }
    tracing::info!("databricks-shield stopped");
    if end == app::RunEnd::Success {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// In service mode with `METRICS_ADDR` set: the metrics registry and its HTTP listener.
async fn start_ops(
    config: &Config,
    connector: &Arc<Connector>,
    shutdown: &Shutdown,
) -> Result<(Option<OpsServer>, Option<Arc<Metrics>>), ops::OpsError> {
    let addr = match config.metrics_addr {
        Some(addr) if !config.once => addr,
        _ => return Ok((None, None)),
    };
    let metrics = Arc::new(
        Metrics::new(ServiceInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            workspace: config.host.host_str().unwrap_or("databricks").to_string(),
            catalog: config.catalog.clone(),
            schema: config.schema.clone(),
            prefix: config.prefix.clone(),
            sink: connector.sink.name(),
            sink_target: connector.sink.describe(),
            interval: config.interval,
        })
        .with_progress(connector.progress.clone()),
    );
    let server = OpsServer::start(addr, metrics.clone(), shutdown.clone()).await?;
    tracing::info!(
        "Serving the status page, /healthz, /readyz and /metrics on http://{}",
        server.local_addr()
    );
    Ok((Some(server), Some(metrics)))
}

/// Registers the SIGTERM and Ctrl-C handlers now (so a signal that arrives while the connector
/// starts is not fatal) and yields one message per signal: the first asks for a clean stop, a
/// second one (an impatient operator, or an orchestrator's escalation) exits at once.
fn stop_signals() -> tokio::sync::mpsc::UnboundedReceiver<()> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = int.recv() => {}
                        }
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                });
            }
            _ => {
                tokio::spawn(async move {
                    while tokio::signal::ctrl_c().await.is_ok() {
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                });
            }
        }
    }
    #[cfg(not(unix))]
    {
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                if tx.send(()).is_err() {
                    return;
                }
            }
        });
    }
    rx
}
