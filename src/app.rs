//! Assembly: turns a validated [`Config`] into a running [`Connector`], and drives it once or on a
//! schedule. Also the logging setup, shared by every command.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::collect::CollectOptions;
use crate::config::{Config, DatabricksAuth, LogFormat, SinkConfig};
use crate::databricks::{ClientOptions, Credentials, DatabricksClient};
use crate::run::{Connector, CycleReport, Settings, Shutdown, IN_FLIGHT_GRACE};
use crate::sink::FileSink;
use crate::sink::{AnySink, SinkError};
use crate::sink::{HttpSink, HttpSinkConfig, KafkaSink, KafkaSinkConfig};
use crate::state::StateStore;
use crate::traffic::{MapOptions, Redactor};

/// Sets up `tracing`: text or one JSON object per line, on stderr. `RUST_LOG` narrows or widens.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}

/// The Databricks client for a configuration.
pub fn client(config: &Config) -> Result<DatabricksClient, crate::databricks::DatabricksError> {
    let credentials = match &config.auth {
        DatabricksAuth::OAuth {
            client_id,
            client_secret,
        } => Credentials::OAuth {
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
        },
        DatabricksAuth::Pat { token } => Credentials::Pat(token.clone()),
    };
    let client = DatabricksClient::with_ca_bundle(
        &config.host,
        credentials,
        ClientOptions::default(),
        config.ca_bundle.as_deref(),
    )?;
    Ok(match &config.auth_secret_file {
        Some((path, variable)) => client.reread_secret_from(path.clone(), variable),
        None => client,
    })
}

/// The sink a configuration asks for.
/// `ca_bundle`: extra CAs the HTTP sink trusts and the setting they came from
/// (`Config::akto_ca_bundle`, `Config::akto_ca_bundle_setting`).
pub fn sink(
    config: &SinkConfig,
    ca_bundle: Option<(&Path, &'static str)>,
) -> Result<AnySink, SinkError> {
    Ok(match config {
        SinkConfig::Http {
            url,
            jwt,
            jwt_file,
            timeout,
            max_record_bytes,
        } => AnySink::Http({
            let sink = HttpSink::new(HttpSinkConfig {
                url: url.clone(),
                jwt: jwt.clone(),
                timeout: *timeout,
                retry: Default::default(),
            })?
            .with_max_record_bytes(*max_record_bytes)?;
            let sink = match ca_bundle {
                Some((path, setting)) => sink.with_ca_bundle_from(path, setting)?,
                None => sink,
            };
            match jwt_file {
                Some(path) => sink.reread_jwt_from(path.clone()),
                None => sink,
            }
        }),
        SinkConfig::File {
            path,
            max_record_bytes,
        } => AnySink::File(FileSink::new(path.clone())?.with_max_record_bytes(*max_record_bytes)?),
        SinkConfig::Kafka {
            brokers,
            topic,
            security_protocol,
            sasl_mechanism,
            sasl_username,
            sasl_password,
            ca_file,
            max_message_bytes,
        } => {
            let mut k = KafkaSinkConfig::new(brokers.clone(), topic.clone());
            k.max_message_bytes = *max_message_bytes;
            k.security_protocol = security_protocol.clone();
            k.sasl_mechanism = sasl_mechanism.clone();
            k.sasl_username = sasl_username.clone();
            k.sasl_password = sasl_password.clone();
            k.ca_file = ca_file.clone();
            AnySink::Kafka(KafkaSink::new(k)?)
        }
    })
}

/// The folder of the state (and the quarantine file): `STATE_DIR` when it is set, else this
/// workspace's folder under `./state` ([`crate::state::default_state_dir`]). Creates nothing.
pub fn state_dir(config: &Config) -> Result<std::path::PathBuf, crate::state::StateError> {
    if config.state_dir_given {
        return Ok(config.state_dir.clone());
    }
    let workspace_host = config.host.host_str().unwrap_or("databricks");
    // Agent hosts are `<agent>.ai-agent.<workspace>`.
    let ours = crate::traffic::host::host_for_label("agent", workspace_host);
    let suffix = ours.strip_prefix("agent").unwrap_or(&ours).to_string();
    crate::state::default_state_dir(
        &config.state_dir,
        &config.workspace_identity(),
        move |host| host.ends_with(&suffix),
    )
}

/// Cycle settings derived from a configuration.
pub fn settings(config: &Config) -> Settings {
    Settings {
        catalog: config.catalog.clone(),
        schema: config.schema.clone(),
        prefix: config.prefix.clone(),
        warehouse_id: config.warehouse_id.clone(),
        account_id: config.akto_account_id.clone(),
        workspace_host: config.host.host_str().unwrap_or("databricks").to_string(),
        batch_size: config.batch_size,
        checkpoint_batches: config.checkpoint_batches,
        table_concurrency: config.table_concurrency,
        collect: CollectOptions {
            lookback: config.lookback,
            max_catchup: config.max_catchup,
            statement_timeout: config.statement_timeout,
            ..Default::default()
        },
        map: MapOptions::default(),
        redactor: config.redact.as_deref().map(Redactor::new),
        state_dir: config.state_dir.clone(),
    }
}

/// Cycle settings for the demo: defaults, state in `state_dir`.
pub fn settings_for_demo(catalog: &str, schema: &str, state_dir: &std::path::Path) -> Settings {
    Settings {
        catalog: catalog.to_string(),
        schema: schema.to_string(),
        prefix: String::new(),
        warehouse_id: None,
        account_id: "1000000".into(),
        workspace_host: "localhost".into(),
        batch_size: 50,
        checkpoint_batches: crate::config::DEFAULT_CHECKPOINT_BATCHES,
        table_concurrency: 4,
        collect: CollectOptions::default(),
        map: MapOptions::default(),
        redactor: None,
        state_dir: state_dir.to_path_buf(),
    }
}

/// Why the connector could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Databricks(#[from] crate::databricks::DatabricksError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("no sink configured: set DATA_INGESTION_SERVICE_URL or KAFKA_BROKER_HOST (or --output PATH)")]
    NoSink,
}

impl StartError {
    /// Whether the settings must change before a start can succeed (exit code 2, like a
    /// configuration refused before any start): a sink setting found wrong when the sink is
    /// built, no sink, or a `STATE_DIR` that holds another workspace's state.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            StartError::Sink(SinkError::Config { .. })
                | StartError::NoSink
                | StartError::State(crate::state::StateError::OtherWorkspace { .. })
        )
    }
}

/// Builds the connector: client, sink (health-checked), state (locked).
pub async fn connector(config: &Config) -> Result<Arc<Connector>, StartError> {
    let client = client(config)?;
    let sink_config = config.sink.as_ref().ok_or(StartError::NoSink)?;
    let sink = sink(sink_config, config.akto_ca_bundle_with_setting())?;
    tracing::info!(
        "Sending records to {} (sink {})",
        sink.describe(),
        sink.name()
    );
    match sink.healthcheck().await {
        Ok(()) => {}
        // In service mode an unreachable sink is retried every cycle (state is untouched until
        // it accepts data); a one-shot run and configuration errors fail now.
        Err(e) if e.is_retriable() && !config.once => {
            tracing::error!("{e} (retrying every cycle)")
        }
        Err(e) => return Err(e.into()),
    }
    let state_dir = state_dir(config)?;
    if !config.state_dir_given {
        tracing::info!("State in {}", state_dir.display());
    }
    let state = StateStore::open(&state_dir, config.reset_state)?;
    state.bind_workspace(&config.workspace_identity())?;
    let mut settings = settings(config);
    settings.state_dir = state_dir;
    let connector = Arc::new(Connector::new(client, sink, state, settings));
    connector.report_unconfirmed()?;
    connector.announce_upgrade()?;
    Ok(connector)
}

/// Logs a cycle's outcome the way Akto's job runner forwards it.
pub fn log_report(report: &CycleReport) {
    if report.ok() {
        tracing::info!("{}", report.summary_line());
    } else {
        for e in &report.errors {
            tracing::error!("{e}");
        }
        tracing::warn!("{}", report.summary_line());
    }
}

/// Runs cycles every `interval` until shutdown; cycles never overlap. With `once`, one cycle.
/// Returns whether the last cycle succeeded.
pub async fn run_loop(
    connector: Arc<Connector>,
    interval: Duration,
    once: bool,
    shutdown: Shutdown,
) -> bool {
    run_loop_observed(connector, interval, once, shutdown, None).await
}

/// [`run_loop`] that also feeds `metrics` (the `/metrics` registry and status page) after every
/// cycle, from the cycle's report and the Databricks client's request counters.
pub async fn run_loop_observed(
    connector: Arc<Connector>,
    interval: Duration,
    once: bool,
    shutdown: Shutdown,
    metrics: Option<Arc<crate::ops::Metrics>>,
) -> bool {
    run_loop_outcome(connector, interval, once, shutdown, metrics)
        .await
        .ok
}

/// How [`run_loop_outcome`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopOutcome {
    /// The last cycle had no error.
    pub ok: bool,
    /// The last cycle was stopped (a signal or the `-once` time limit) before it finished:
    /// what it had not delivered yet is left for the next cycle or run.
    pub stopped: bool,
}

/// How a `run` ended, which decides its exit code and its last `ERROR` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The last cycle finished without an error (exit 0).
    Success,
    /// The last cycle had an error (exit 1).
    Failed,
    /// A `-once` cycle stopped at `ONCE_TIME_LIMIT_SECONDS` before it finished (exit 1).
    TimeLimited,
    /// A `-once` cycle stopped by SIGTERM or Ctrl-C before it finished (exit 1).
    Signalled,
}

impl RunEnd {
    /// `time_limit_fired`: the `-once` timer went off. It counts only when it stopped the cycle:
    /// a cycle that had finished (the timer fired while the sink was flushed or statement
    /// cancels settled) is no time-limited run.
    pub fn of(outcome: LoopOutcome, once: bool, time_limit_fired: bool) -> RunEnd {
        if time_limit_fired && outcome.stopped {
            RunEnd::TimeLimited
        } else if once && outcome.stopped {
            RunEnd::Signalled
        } else if outcome.ok {
            RunEnd::Success
        } else {
            RunEnd::Failed
        }
    }
}

/// [`run_loop_observed`], also saying whether the last cycle was cut short by shutdown, so that
/// a `-once` run stopped by a signal does not pass for a finished one.
pub async fn run_loop_outcome(
    connector: Arc<Connector>,
    interval: Duration,
    once: bool,
    mut shutdown: Shutdown,
    metrics: Option<Arc<crate::ops::Metrics>>,
) -> LoopOutcome {
    loop {
        let mut report = connector.run_cycle(&shutdown).await;
        // A failed flush (a file's fsync) fails the cycle: what it held is not known durable.
        if let Err(e) = flush(&connector, shutdown.is_triggered()).await {
            report
                .errors
                .push(format!("flushing {}: {e}", connector.sink.name()));
        }
        log_report(&report);
        if let Some(m) = &metrics {
            m.observe(&report, &connector.client.stats());
        }
        let outcome = LoopOutcome {
            ok: report.ok(),
            stopped: report.stopped,
        };
        if report.fatal {
            tracing::error!(
                "Stopping: records sent may not be checkpointed (the error above says why), \
                 and going on could send them again every cycle. Restart once the cause is fixed"
            );
            settle_cancels(&connector).await;
            return outcome;
        }
        if once || shutdown.is_triggered() {
            settle_cancels(&connector).await;
            return outcome;
        }
        let next = interval.saturating_sub(report.duration);
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = shutdown.wait() => {
                settle_cancels(&connector).await;
                // The last cycle had finished: waiting for the next one is no unfinished work.
                return LoopOutcome { stopped: false, ..outcome };
            }
        }
    }
}

/// Flushes the sink after a cycle. At shutdown bounded by [`IN_FLIGHT_GRACE`]
/// ([`AnySink::flush_within`]): what a Kafka producer still holds then (its queue after a batch
/// was abandoned) is purged, so that no producer thread keeps the process alive past Akto's
/// kill; it was never confirmed, so it is not checkpointed and the next run sends it again. What
/// was checkpointed was made durable before (`AnySink::sync_confirmed`), so the purge is a
/// warning, not a failed cycle; a file that cannot be flushed still fails it.
async fn flush(connector: &Connector, stopping: bool) -> Result<(), SinkError> {
    if !stopping {
        return connector.sink.flush().await;
    }
    match connector.sink.flush_within(IN_FLIGHT_GRACE).await {
        Err(e) if matches!(connector.sink, AnySink::Kafka(_)) => {
            tracing::warn!("at shutdown: {e}");
            Ok(())
        }
        r => r,
    }
}

/// Before the process exits: lets the cancels of statements left running (a reader stopped by
/// shutdown or the once time limit) reach the warehouse, for at most 10 s.
async fn settle_cancels(connector: &Connector) {
    let left = connector
        .client
        .stats()
        .settle_background(Duration::from_secs(10))
        .await;
    if left > 0 {
        tracing::warn!(
            "{left} SQL statement cancel(s) still in flight at exit; the warehouse ends those \
             statements at their own timeout"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{LoopOutcome, RunEnd};

    #[test]
    fn the_time_limit_counts_only_when_it_stopped_the_cycle() {
        let finished = LoopOutcome {
            ok: true,
            stopped: false,
        };
        let stopped = LoopOutcome {
            ok: true,
            stopped: true,
        };
        // The timer went off after the cycle had finished (while flushing): a success.
        assert_eq!(RunEnd::of(finished, true, true), RunEnd::Success);
        assert_eq!(RunEnd::of(stopped, true, true), RunEnd::TimeLimited);
        assert_eq!(RunEnd::of(stopped, true, false), RunEnd::Signalled);
        assert_eq!(
            RunEnd::of(
                LoopOutcome {
                    ok: false,
                    ..finished
                },
                true,
                true
            ),
            RunEnd::Failed
        );
        // The service loop: a stop between cycles is no failure.
        assert_eq!(RunEnd::of(finished, false, false), RunEnd::Success);
        assert_eq!(RunEnd::of(stopped, false, false), RunEnd::Success);
    }
}
