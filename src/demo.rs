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

/// The demo's own output file (`demo --output` default): the one file it replaces.
pub const DEFAULT_OUTPUT: &str = "demo-traffic.jsonl";

/// Why the demo refuses its `--output` path.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "--output {0} exists and is not a regular file; the demo writes only regular files. \
         Fix: choose a new file name with --output"
    )]
    NotAFile(std::path::PathBuf),
    #[error(
        "--output {0} exists; the demo replaces only its own {DEFAULT_OUTPUT}, not another file. \
         Fix: choose a new file name with --output, or remove the file first"
    )]
    Exists(std::path::PathBuf),
    #[error("--output {path}: {detail}. Fix: choose a path this user may write")]
    Unreadable {
        path: std::path::PathBuf,
        detail: String,
    },
}

/// Whether the demo may write `output`: a path that does not exist, or an earlier demo's own
/// output file (a regular file named [`DEFAULT_OUTPUT`]), which it replaces. Anything else (a
/// real file, a device such as `/dev/null`, a folder, a symbolic link) is refused untouched.
/// Returns whether the file exists and must be replaced.
pub fn check_output(output: &Path) -> Result<bool, OutputError> {
    let meta = match std::fs::symlink_metadata(output) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(OutputError::Unreadable {
                path: output.to_path_buf(),
                detail: e.to_string(),
            })
        }
    };
    if !meta.file_type().is_file() {
        return Err(OutputError::NotAFile(output.to_path_buf()));
    }
    if output.file_name() != Some(std::ffi::OsStr::new(DEFAULT_OUTPUT)) {
        return Err(OutputError::Exists(output.to_path_buf()));
    }
    Ok(true)
}

/// Runs the demo; returns whether the cycle delivered everything.
pub async fn run(output: &Path) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    // Before anything starts: a path it may not replace is refused untouched.
    let replace = check_output(output)?;
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
    if replace {
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

#[cfg(test)]
mod tests {
    use super::{check_output, OutputError, DEFAULT_OUTPUT};

    #[test]
    fn only_a_new_path_or_the_demos_own_output_is_written() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!check_output(&dir.path().join("new.jsonl")).unwrap());
        let own = dir.path().join(DEFAULT_OUTPUT);
        std::fs::write(&own, "{}\n").unwrap();
        assert!(check_output(&own).unwrap());
        // A real file of the user's: refused, left as it was.
        let mine = dir.path().join("records.jsonl");
        std::fs::write(&mine, "keep me").unwrap();
        let err = check_output(&mine).unwrap_err();
        assert!(matches!(err, OutputError::Exists(_)), "{err}");
        assert!(err.to_string().contains("--output"), "{err}");
        assert_eq!(std::fs::read_to_string(&mine).unwrap(), "keep me");
        // Not a regular file: a folder, a device, a symbolic link (even to the demo's file).
        assert!(matches!(
            check_output(dir.path()),
            Err(OutputError::NotAFile(_))
        ));
        assert!(matches!(
            check_output(std::path::Path::new("/dev/null")),
            Err(OutputError::NotAFile(_))
        ));
        #[cfg(unix)]
        {
            let sub = dir.path().join("sub");
            std::fs::create_dir(&sub).unwrap();
            let link = sub.join(DEFAULT_OUTPUT);
            std::os::unix::fs::symlink(&mine, &link).unwrap();
            assert!(matches!(check_output(&link), Err(OutputError::NotAFile(_))));
        }
    }
}
