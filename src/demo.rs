//! `databricks-shield demo`: the whole pipeline against an in-process Databricks workspace
//! emulator, writing the records it would send to Akto into a JSON-lines file.

use std::path::Path;
use std::sync::Arc;

use databricks_emulator::{Emulator, EmulatorConfig};

use crate::databricks::{ClientOptions, Credentials, DatabricksClient};
use crate::discovery;
use crate::run::{Connector, Shutdown};
use crate::sink::AnySink;
use crate::sink::FileSink;
use crate::state::StateStore;

/// Runs the demo; returns whether the cycle delivered everything.
pub async fn run(output: &Path) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    let cfg = EmulatorConfig::default();
    println!(
        "Started a Databricks workspace emulator at {} (sample agents and executions)",
        emulator.base_url()
    );
    let host = url::Url::parse(&emulator.base_url())?;
    let client = DatabricksClient::new(
        &host,
        Credentials::OAuth {
            client_id: cfg.client_id.clone(),
            client_secret: cfg.client_secret.clone().into(),
        },
        ClientOptions::default(),
    )?;
    if output.exists() {
        std::fs::remove_file(output)?;
    }
    let sink = AnySink::File(FileSink::new(Some(output.to_path_buf()))?);
    let state_dir = tempfile_dir()?;
    let state = StateStore::open(&state_dir, false)?;
    let mut settings = crate::app::settings_for_demo(&cfg.catalog, &cfg.schema, &state_dir);
    settings.workspace_host = host.host_str().unwrap_or("localhost").to_string();
    let connector = Arc::new(Connector::new(client, sink, state, settings));
    let (_trigger, shutdown) = Shutdown::new();
    let report = connector.run_cycle(&shutdown).await;
    if let Some(inv) = &report.inventory {
        println!("\nAgent inventory of {}.{}:\n", inv.catalog, inv.schema);
        println!("{}", discovery::render_table(inv));
    }
    crate::app::log_report(&report);
    println!("{}", report.summary_line());
    println!(
        "\nThe {} records Akto would receive are in {} (one JSON record per line).\n\
         Look at one with: head -n 1 {} | python3 -m json.tool\n\
         Next: configure your workspace (README, Configuration) and run `databricks-shield check`.",
        report.records_sent,
        output.display(),
        output.display()
    );
    let _ = std::fs::remove_dir_all(&state_dir);
    emulator.shutdown().await;
    Ok(report.ok())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "databricks-shield-demo-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_micros()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
