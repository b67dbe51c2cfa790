//! Process-level tests of configuration and the command line: they run the real binary with a
//! cleared environment (as Akto's job runner does: no HOME, only the connector's variables) and
//! check what an operator sees. `--print-config` validates the configuration and prints
//! `Config::summary()` without any network call; a bad configuration exits with code 2.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_databricks-shield");

/// Secret values used below; none may ever be printed.
const CLIENT_SECRET: &str = "dose-client-secret-7f3a9c";
const TOKEN: &str = "dapi-token-value-51bd0e";
const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.jwt-secret-payload.sig";
const KAFKA_PASSWORD: &str = "kafka-password-9d8e7f";

/// Runs the binary in `dir` with exactly `env` as its environment. A run that does not end
/// within 60 s is killed and fails the test (a guard against hangs, not a speed check).
fn shield(args: &[&str], env: &[(&str, &str)], dir: &Path) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start databricks-shield");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(output) => output.expect("wait for databricks-shield"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("databricks-shield {args:?} did not exit within 60 s");
        }
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A complete, valid configuration. The host is a closed loopback port, so even an unexpected
/// network call fails fast instead of reaching anything real.
fn valid_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("DATABRICKS_HOST", "http://127.0.0.1:9"),
        ("DATABRICKS_CLIENT_ID", "sp-application-id"),
        ("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET),
        ("DATA_INGESTION_SERVICE_URL", "http://127.0.0.1:9"),
        ("AKTO_JWT_TOKEN", JWT),
    ]
}

fn assert_no_secret(output: &Output) {
    let all = text(output);
    for secret in [CLIENT_SECRET, TOKEN, JWT, KAFKA_PASSWORD] {
        assert!(!all.contains(secret), "secret printed:\n{all}");
    }
}

#[test]
fn print_config_accepts_single_dash_once_as_akto_runs_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = shield(&["-once", "--print-config"], &valid_env(), dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("once=true"), "{all}");
    assert!(
        all.contains("host=http://127.0.0.1:9/") && all.contains("auth=oauth"),
        "{all}"
    );
    assert!(all.contains("catalog=workspace schema=default"), "{all}");
    assert!(all.contains("jwt=set"), "{all}");
    assert_no_secret(&out);

    let out = shield(&["--print-config"], &valid_env(), dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("once=false"), "{}", text(&out));

    let out = shield(&["--print-config", "--once"], &valid_env(), dir.path());
    assert!(text(&out).contains("once=true"), "{}", text(&out));
}

#[test]
fn help_mentions_every_variable_and_never_a_secret_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = valid_env();
    env.push(("DATABRICKS_TOKEN", TOKEN));
    env.push(("KAFKA_SASL_PASSWORD", KAFKA_PASSWORD));
    let out = shield(&["--help"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    for name in [
        "DATABRICKS_HOST",
        "DATABRICKS_CLIENT_ID",
        "DATABRICKS_CLIENT_SECRET",
        "DATABRICKS_CLIENT_SECRET_FILE",
        "DATABRICKS_TOKEN",
        "DATABRICKS_TOKEN_FILE",
        "DATABRICKS_CONFIG_FILE",
        "DATABRICKS_CONFIG_PROFILE",
        "DATABRICKS_CATALOG",
        "DATABRICKS_SCHEMA",
        "DATABRICKS_PREFIX",
        "DATABRICKS_WAREHOUSE_ID",
        "AKTO_SINK",
        "DATA_INGESTION_SERVICE_URL",
        "AKTO_JWT_TOKEN",
        "AKTO_JWT_TOKEN_FILE",
        "AKTO_REQUEST_TIMEOUT_SECONDS",
        "KAFKA_BROKER_HOST",
        "AKTO_KAFKA_TOPIC_NAME",
        "KAFKA_SECURITY_PROTOCOL",
        "KAFKA_SASL_MECHANISM",
        "KAFKA_SASL_USERNAME",
        "KAFKA_SASL_PASSWORD",
        "KAFKA_CA_FILE",
        "KAFKA_MAX_MESSAGE_BYTES",
        "OUTPUT_PATH",
        "AKTO_ACCOUNT_ID",
        "RECURRING_INTERVAL_SECONDS",
        "LOOKBACK_MINUTES",
        "MAX_CATCHUP_HOURS",
        "STATE_DIR",
        "LOG_FORMAT",
        "METRICS_ADDR",
        "TABLE_CONCURRENCY",
        "STATEMENT_TIMEOUT_SECONDS",
        "BATCH_SIZE",
        "CHECKPOINT_BATCHES",
        "REDACT_SENSITIVE_DATA",
        "REDACT_KINDS",
        "DATABRICKS_CA_BUNDLE",
        "AKTO_CA_BUNDLE",
    ] {
        assert!(all.contains(name), "{name} missing from --help:\n{all}");
    }
    assert!(all.contains("[default: workspace]") && all.contains("[default: 300]"));
    assert!(all.contains("databricks-shield check"), "{all}");
    assert!(all.contains("--print-config"), "{all}");
    assert_no_secret(&out);
}

#[test]
fn missing_configuration_exits_2_naming_every_missing_variable_in_one_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = shield(&["-once", "--print-config"], &[], dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    let error_lines: Vec<&str> = all.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(
        error_lines.len(),
        1,
        "expected ONE error line (Akto forwards only lines with ERROR):\n{all}"
    );
    let line = error_lines[0];
    for name in [
        "DATABRICKS_HOST",
        "DATABRICKS_CLIENT_ID",
        "DATABRICKS_CLIENT_SECRET",
        "DATABRICKS_TOKEN",
        "DATA_INGESTION_SERVICE_URL",
        "KAFKA_BROKER_HOST",
    ] {
        assert!(line.contains(name), "{name} missing from: {line}");
    }
    assert!(
        line.contains("https://your-workspace.cloud.databricks.com"),
        "{line}"
    );
    // The job runner's last line, as for every exit.
    assert!(all.contains("databricks-shield stopped"), "{all}");
}

#[test]
fn invalid_values_are_all_reported_and_secrets_stay_hidden() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = valid_env();
    env[0] = ("DATABRICKS_HOST", "http://workspace.example.com");
    env.push(("RECURRING_INTERVAL_SECONDS", "5"));
    env.push(("DATABRICKS_CATALOG", "bad.catalog"));
    env.push(("KAFKA_SASL_PASSWORD", KAFKA_PASSWORD));
    env.push(("DATABRICKS_TOKEN", TOKEN));
    let out = shield(&["-once", "--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    for name in [
        "DATABRICKS_HOST",
        "RECURRING_INTERVAL_SECONDS",
        "DATABRICKS_CATALOG",
    ] {
        assert!(all.contains(name), "{name} missing:\n{all}");
    }
    assert!(all.contains("https://"), "{all}");
    assert_no_secret(&out);
}

/// `AKTO_REQUEST_TIMEOUT_SECONDS`: 30 s by default, shown by `--print-config`; 0 (or anything
/// not a whole number of seconds from 1 to 3600) is a configuration error naming the variable,
/// its flag and the fix, exit 2.
#[test]
fn akto_request_timeout_is_configurable_and_validated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = shield(&["--print-config"], &valid_env(), dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("request_timeout=30s"), "{all}");

    let mut env = valid_env();
    env.push(("AKTO_REQUEST_TIMEOUT_SECONDS", "180"));
    let out = shield(&["--print-config"], &env, dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("request_timeout=180s"),
        "{}",
        text(&out)
    );
    let out = shield(
        &["--print-config", "--akto-request-timeout-seconds", "45"],
        &env,
        dir.path(),
    );
    assert!(text(&out).contains("request_timeout=45s"), "{}", text(&out));

    for bad in ["0", "-1", "ten"] {
        let mut env = valid_env();
        env.push(("AKTO_REQUEST_TIMEOUT_SECONDS", bad));
        let out = shield(&["-once", "--print-config"], &env, dir.path());
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{bad}: {all}");
        let line = all
            .lines()
            .find(|l| l.contains("ERROR"))
            .unwrap_or_else(|| panic!("no ERROR line for {bad}:\n{all}"));
        assert!(
            line.contains("AKTO_REQUEST_TIMEOUT_SECONDS (--akto-request-timeout-seconds)")
                && line.contains("from 1 to 3600")
                && line.contains("default 30"),
            "{line}"
        );
        assert_no_secret(&out);
    }
}

/// `AKTO_MAX_RECORD_BYTES`: Akto's ingestion producer drops (after answering 200) a record over
/// its `max.request.size`; the connector's per-record limit defaults to 5 MiB less a margin for
/// Akto's re-encoding, comes from the flag, the environment or the env file, applies to the file
/// sink too, and a bad value names the setting, its range and the 1 MB advice.
#[test]
fn akto_max_record_bytes_is_configurable_and_validated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = shield(&["--print-config"], &valid_env(), dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("max_record_bytes=5177344"), "{all}");

    let mut env = valid_env();
    env.push(("AKTO_MAX_RECORD_BYTES", "1000000"));
    let out = shield(&["--print-config"], &env, dir.path());
    assert!(
        text(&out).contains("max_record_bytes=1000000)"),
        "{}",
        text(&out)
    );
    let out = shield(
        &["--print-config", "--akto-max-record-bytes", "2000000"],
        &env,
        dir.path(),
    );
    assert!(
        text(&out).contains("max_record_bytes=2000000"),
        "flag beats env: {}",
        text(&out)
    );
    std::fs::write(
        dir.path().join("shield.env"),
        "AKTO_MAX_RECORD_BYTES=900000\n",
    )
    .expect("write env file");
    let out = shield(
        &["--env-file", "shield.env", "--print-config"],
        &valid_env(),
        dir.path(),
    );
    assert!(
        text(&out).contains("max_record_bytes=900000"),
        "{}",
        text(&out)
    );
    // The file sink holds what would go to Akto: the same limit.
    let out = shield(
        &["--print-config", "--output", "out.jsonl"],
        &env,
        dir.path(),
    );
    assert!(
        text(&out).contains("file(out.jsonl max_record_bytes=1000000)"),
        "{}",
        text(&out)
    );

    for bad in ["65535", "10485745", "5MB", "-1"] {
        let mut env = valid_env();
        env.push(("AKTO_MAX_RECORD_BYTES", bad));
        let out = shield(&["--print-config"], &env, dir.path());
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{bad}: {all}");
        let line = error_line(&all);
        for part in [
            "AKTO_MAX_RECORD_BYTES (--akto-max-record-bytes)",
            "from 65536 to 10485744",
            "1000000 for Akto releases whose ingestion producer keeps Kafka's 1 MB default",
            "default 5177344",
        ] {
            assert!(line.contains(part), "{bad}: {part:?} missing: {line}");
        }
        assert_no_secret(&out);
    }
    // The extremes are accepted.
    for good in ["65536", "10485744"] {
        let mut env = valid_env();
        env.push(("AKTO_MAX_RECORD_BYTES", good));
        let out = shield(&["--print-config"], &env, dir.path());
        assert_eq!(out.status.code(), Some(0), "{good}: {}", text(&out));
    }
}

#[test]
fn env_file_has_the_lowest_precedence() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("databricks-cron.env"),
        "# seed format\n\
         DATABRICKS_HOST=http://127.0.0.1:9\n\
         DATABRICKS_CLIENT_ID=file-client-id\n\
         DATABRICKS_CLIENT_SECRET=\"dose-client-secret-7f3a9c\" # quoted\n\
         DATABRICKS_CATALOG=file_catalog\n\
         DATABRICKS_SCHEMA=file_schema\n\
         DATABRICKS_PREFIX=file_\n\
         DATABRICKS_WAREHOUSE_ID=\n\
         DATA_INGESTION_SERVICE_URL=http://127.0.0.1:9\n\
         RECURRING_INTERVAL_SECONDS=900 # low frequency\n\
         export LOOKBACK_MINUTES=30\n",
    )
    .expect("write env file");
    let env = [
        ("DATABRICKS_SCHEMA", "env_schema"),
        ("DATABRICKS_PREFIX", "env_"),
    ];
    let out = shield(
        &[
            "--env-file",
            "databricks-cron.env",
            "--prefix",
            "flag_",
            "--print-config",
            "-once",
        ],
        &env,
        dir.path(),
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("catalog=file_catalog"), "file value: {all}");
    assert!(all.contains("schema=env_schema"), "env beats file: {all}");
    assert!(all.contains("prefix=\"flag_\""), "flag beats env: {all}");
    assert!(all.contains("client_id=file-client-id"), "{all}");
    assert!(
        all.contains("interval=900s") && all.contains("lookback=30m"),
        "{all}"
    );
    assert!(all.contains("warehouse=auto"), "empty value = unset: {all}");
    assert_no_secret(&out);
}

#[test]
fn unreadable_env_file_is_a_configuration_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = shield(
        &[
            "--env-file",
            "no-such-databricks-cron.env",
            "--print-config",
        ],
        &valid_env(),
        dir.path(),
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("no-such-databricks-cron.env"), "{all}");
}

#[test]
fn secret_files_and_pat_work_without_home() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).expect("write token");
    std::fs::write(dir.path().join("jwt"), JWT).expect("write jwt");
    let env = [
        ("DATABRICKS_HOST", "http://localhost:9"),
        ("DATABRICKS_TOKEN_FILE", "token"),
        ("AKTO_JWT_TOKEN_FILE", "jwt"),
        ("DATA_INGESTION_SERVICE_URL", "http://127.0.0.1:9"),
    ];
    let out = shield(&["--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("auth=pat") && all.contains("jwt=set"), "{all}");
    assert_no_secret(&out);
}

#[test]
fn kafka_sink_is_chosen_from_the_broker_and_its_password_stays_hidden() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("DATABRICKS_HOST", "http://127.0.0.1:9"),
        ("DATABRICKS_TOKEN", TOKEN),
        ("KAFKA_BROKER_HOST", "127.0.0.1:9,127.0.0.2:9"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
        ("KAFKA_SASL_MECHANISM", "PLAIN"),
        ("KAFKA_SASL_USERNAME", "akto"),
        ("KAFKA_SASL_PASSWORD", KAFKA_PASSWORD),
    ];
    let out = shield(&["--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("sink=kafka(brokers=127.0.0.1:9,127.0.0.2:9 topic=akto.api.logs"),
        "{all}"
    );
    assert_no_secret(&out);
}

/// docker's env_file turns `STATE_DIR=` into an empty variable; the env template says empty
/// means unset. Every path setting accepts it (clap refused it, exit 2, naming no variable).
#[test]
fn empty_path_variables_mean_unset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = valid_env();
    env.extend([
        ("STATE_DIR", ""),
        ("DATABRICKS_CA_BUNDLE", ""),
        ("DATABRICKS_CLIENT_SECRET_FILE", ""),
        ("DATABRICKS_TOKEN_FILE", ""),
        ("DATABRICKS_CONFIG_FILE", ""),
        ("AKTO_JWT_TOKEN_FILE", ""),
        ("KAFKA_SASL_PASSWORD_FILE", ""),
        ("KAFKA_CA_FILE", ""),
        ("OUTPUT_PATH", ""),
    ]);
    let out = shield(&["-once", "--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("state_dir=./state"), "{all}");
    assert!(
        all.contains("auth=oauth") && all.contains("jwt=set"),
        "{all}"
    );
    assert_no_secret(&out);
}

/// A key of the env file that is no setting is named in a WARN (with the likely setting), and
/// the file's process variables (proxies, SSL_CERT_FILE, RUST_LOG) are applied: here
/// SSL_CERT_FILE, whose missing file configuration then reports.
#[test]
fn env_file_names_unknown_keys_and_applies_process_variables() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("databricks-cron.env"),
        "DATABRICKS_CATLOG=main\n\
         HTTPS_PROXY=http://user:PROXYPW-31@127.0.0.1:9\n\
         NO_PROXY=127.0.0.1\n",
    )
    .expect("write env file");
    let args = ["--env-file", "databricks-cron.env", "--print-config"];
    let out = shield(&args, &valid_env(), dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("WARN") && all.contains("DATABRICKS_CATLOG is not a setting"),
        "{all}"
    );
    assert!(all.contains("did you mean DATABRICKS_CATALOG?"), "{all}");
    assert!(all.contains("catalog=workspace"), "{all}");
    assert!(!all.contains("PROXYPW-31"), "{all}");

    std::fs::write(
        dir.path().join("databricks-cron.env"),
        "SSL_CERT_FILE=/nonexistent/corporate-ca.pem\n",
    )
    .expect("write env file");
    let out = shield(&args, &valid_env(), dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(
        all.contains("SSL_CERT_FILE /nonexistent/corporate-ca.pem"),
        "{all}"
    );
    assert!(!all.contains("is not a setting"), "{all}");
}

/// Kafka credentials written into KAFKA_BROKER_HOST are refused without being echoed.
#[test]
fn kafka_broker_credentials_are_never_echoed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("DATABRICKS_HOST", "http://127.0.0.1:9"),
        ("DATABRICKS_TOKEN", TOKEN),
        (
            "KAFKA_BROKER_HOST",
            "sasl_ssl://alice:KPASSLEAK@broker:9092",
        ),
    ];
    let out = shield(&["--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(!all.contains("KPASSLEAK"), "{all}");
    assert!(all.contains("KAFKA_SASL_PASSWORD"), "{all}");
    assert_no_secret(&out);
}

/// The first line holding `ERROR`, or a panic showing everything.
fn error_line(all: &str) -> &str {
    all.lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no ERROR line:\n{all}"))
}

/// A PEM file with one self-signed CA certificate.
fn write_ca(path: &Path) {
    let ca = rcgen::generate_simple_self_signed(vec!["akto.internal".into()]).expect("cert");
    std::fs::write(path, ca.cert.pem()).expect("write CA");
}

/// AKTO_CA_BUNDLE (--akto-ca-bundle): extra CAs for the HTTP sink, checked at configuration like
/// DATABRICKS_CA_BUNDLE; unset, the workspace's bundle applies to the sink too.
#[test]
fn akto_ca_bundle_is_validated_and_defaults_to_the_workspace_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_ca(&dir.path().join("akto-ca.pem"));
    write_ca(&dir.path().join("proxy-ca.pem"));
    std::fs::write(dir.path().join("not-pem.txt"), "not a certificate").expect("write");

    // Nothing set: no bundle for the sink.
    let out = shield(&["--print-config"], &valid_env(), dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(!all.contains("ca_bundle="), "{all}");

    // Its own bundle.
    let mut env = valid_env();
    env.push(("AKTO_CA_BUNDLE", "akto-ca.pem"));
    let out = shield(&["--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("request_timeout=30s max_record_bytes=5177344 ca_bundle=akto-ca.pem)"),
        "{all}"
    );

    // The flag, over DATABRICKS_CA_BUNDLE.
    let mut env = valid_env();
    env.push(("DATABRICKS_CA_BUNDLE", "proxy-ca.pem"));
    let out = shield(
        &["--print-config", "--akto-ca-bundle", "akto-ca.pem"],
        &env,
        dir.path(),
    );
    assert!(
        text(&out).contains(" ca_bundle=akto-ca.pem)"),
        "{}",
        text(&out)
    );
    // Unset: DATABRICKS_CA_BUNDLE (a TLS-inspecting proxy signs both).
    let out = shield(&["--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains(" ca_bundle=proxy-ca.pem)"), "{all}");

    // A missing file or one without a certificate: exit 2 naming the setting and its flag.
    for bad in ["no-such-ca.pem", "not-pem.txt"] {
        let mut env = valid_env();
        env.push(("AKTO_CA_BUNDLE", bad));
        let out = shield(&["-once", "--print-config"], &env, dir.path());
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{bad}: {all}");
        let line = error_line(&all);
        assert!(
            line.contains(&format!("AKTO_CA_BUNDLE (--akto-ca-bundle) {bad}"))
                && line.contains("PEM"),
            "{line}"
        );
        assert_no_secret(&out);
    }
}

/// --help says what is true of TLS trust: rustls with the built-in roots, SSL_CERT_FILE only as
/// the stand-in for DATABRICKS_CA_BUNDLE (no longer "SSL_CERT_FILE adds trusted CAs").
#[test]
fn help_describes_which_cas_are_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = shield(&["--help"], &[], dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(!all.contains("SSL_CERT_FILE adds trusted CAs"), "{all}");
    assert!(all.contains("built-in Mozilla roots"), "{all}");
    assert!(all.contains("--akto-ca-bundle"), "{all}");
}

/// Each cycle re-reads the last LOOKBACK_MINUTES for late rows, never further back than
/// MAX_CATCHUP_HOURS: a setting where interval + lookback exceeds the catch-up would skip late
/// rows silently, so it is refused naming all three settings and the fix.
#[test]
fn a_catchup_shorter_than_interval_plus_lookback_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = valid_env();
    env.push(("MAX_CATCHUP_HOURS", "1"));
    // Defaults: 300 s + 60 min = 65 min > 1 h.
    let out = shield(&["--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    let line = error_line(&all);
    for name in [
        "RECURRING_INTERVAL_SECONDS",
        "LOOKBACK_MINUTES",
        "MAX_CATCHUP_HOURS",
    ] {
        assert!(line.contains(name), "{name} missing from {line}");
    }
    assert!(
        line.contains("raise MAX_CATCHUP_HOURS (--max-catchup-hours) to at least 2"),
        "{line}"
    );
    // Within it: accepted.
    let mut ok = env.clone();
    ok.push(("LOOKBACK_MINUTES", "50"));
    let out = shield(&["--print-config"], &ok, dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("max_catchup=1h"), "{}", text(&out));
    // 900 s + 24 h = 24.25 h: the default catch-up is too short for a day-long lookback.
    let mut env = valid_env();
    env.push(("RECURRING_INTERVAL_SECONDS", "900"));
    env.push(("LOOKBACK_MINUTES", "1440"));
    let out = shield(&["--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(error_line(&all).contains("to at least 25"), "{all}");
}

/// Both sinks set and AKTO_SINK unset: the ingestion service is used (as documented) and a WARN
/// names the ignored KAFKA_BROKER_HOST; AKTO_SINK makes the choice explicit and silences it.
#[test]
fn both_sinks_set_warns_that_the_kafka_broker_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = valid_env();
    env.push(("KAFKA_BROKER_HOST", "127.0.0.1:9"));
    let out = shield(&["--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("sink=http("), "{all}");
    let warn = all
        .lines()
        .find(|l| l.contains("WARN") && l.contains("KAFKA_BROKER_HOST is ignored"))
        .unwrap_or_else(|| panic!("no WARN about KAFKA_BROKER_HOST:\n{all}"));
    assert!(
        warn.contains("DATA_INGESTION_SERVICE_URL") && warn.contains("AKTO_SINK=kafka"),
        "{warn}"
    );

    env.push(("AKTO_SINK", "kafka"));
    let out = shield(&["--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("sink=kafka("), "{all}");
    assert!(!all.contains("is ignored"), "{all}");

    // AKTO_MAX_RECORD_BYTES with Kafka: it does nothing there, and a WARN says so.
    env.push(("AKTO_MAX_RECORD_BYTES", "1000000"));
    let out = shield(&["--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.lines().any(|l| l.contains("WARN")
            && l.contains("AKTO_MAX_RECORD_BYTES is ignored")
            && l.contains("KAFKA_MAX_MESSAGE_BYTES")),
        "{all}"
    );
    // ... but with --output the file sink wins, and the limit applies to it: no WARN.
    let out = shield(
        &["--print-config", "--output", "out.jsonl"],
        &env,
        dir.path(),
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(!all.contains("AKTO_MAX_RECORD_BYTES is ignored"), "{all}");
}

/// The shipped env template leaves the sink to fill in: a placeholder ingestion URL would win
/// over a KAFKA_BROKER_HOST the operator sets (records sent to a host that does not exist).
#[test]
fn env_template_sets_no_sink_placeholder() {
    let template = include_str!("../databricks-cron.env");
    for key in ["DATA_INGESTION_SERVICE_URL", "KAFKA_BROKER_HOST"] {
        let line = template
            .lines()
            .find(|l| l.starts_with(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing from databricks-cron.env"));
        assert_eq!(line, format!("{key}="), "{key} must ship empty");
    }
}

/// A secret and its `_FILE` form are one setting for precedence: the higher source wins and the
/// lower gets a WARN naming it and where it came from, never its value. Here the lower value is
/// unusable (a missing file; a secret with a tab inside), so using it would exit 2.
#[test]
fn a_secret_and_its_file_form_follow_the_source_precedence() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("client_secret"), CLIENT_SECRET).expect("write");
    let base = [
        ("DATABRICKS_HOST", "http://127.0.0.1:9"),
        ("DATABRICKS_CLIENT_ID", "sp-application-id"),
        ("DATA_INGESTION_SERVICE_URL", "http://127.0.0.1:9"),
    ];

    // The environment's _FILE beats the env file's direct secret.
    std::fs::write(
        dir.path().join("low.env"),
        "DATABRICKS_CLIENT_SECRET=\"bad\\tsecret-LOWVALUE\"\n",
    )
    .expect("write env file");
    let mut env = base.to_vec();
    env.push(("DATABRICKS_CLIENT_SECRET_FILE", "client_secret"));
    let out = shield(
        &["--env-file", "low.env", "--print-config"],
        &env,
        dir.path(),
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("auth=oauth"), "{all}");
    assert!(
        all.lines().any(|l| l.contains("WARN")
            && l.contains("DATABRICKS_CLIENT_SECRET in --env-file low.env is ignored")
            && l.contains("DATABRICKS_CLIENT_SECRET_FILE in the environment")),
        "{all}"
    );
    assert!(!all.contains("LOWVALUE"), "{all}");
    assert_no_secret(&out);

    // The environment's direct secret beats the env file's _FILE (a missing file).
    std::fs::write(
        dir.path().join("low.env"),
        "DATABRICKS_CLIENT_SECRET_FILE=/nonexistent/secret\n",
    )
    .expect("write env file");
    let mut env = base.to_vec();
    env.push(("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET));
    let out = shield(
        &["--env-file", "low.env", "--print-config"],
        &env,
        dir.path(),
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("DATABRICKS_CLIENT_SECRET_FILE in --env-file low.env is ignored"),
        "{all}"
    );
    assert_no_secret(&out);

    // A flag beats the environment.
    let mut env = base.to_vec();
    env.push(("DATABRICKS_CLIENT_SECRET_FILE", "/nonexistent/secret"));
    let out = shield(
        &["--print-config", "--client-secret", CLIENT_SECRET],
        &env,
        dir.path(),
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("DATABRICKS_CLIENT_SECRET_FILE in the environment is ignored")
            && all.contains("--client-secret on the command line"),
        "{all}"
    );

    // Both from the same source: still refused, naming both.
    let mut env = base.to_vec();
    env.push(("DATABRICKS_CLIENT_SECRET", CLIENT_SECRET));
    env.push(("DATABRICKS_CLIENT_SECRET_FILE", "client_secret"));
    let out = shield(&["--print-config"], &env, dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(error_line(&all).contains("keep only one"), "{all}");
    assert_no_secret(&out);
}

/// Problems with values from a Databricks config profile name the profile and its file, not the
/// environment variables the operator never set; a named config file without [DEFAULT] says so.
#[test]
fn profile_problems_name_the_profile_and_its_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().to_str().expect("utf-8 path").to_owned();
    let sink = ("DATA_INGESTION_SERVICE_URL", "http://127.0.0.1:9");
    // Writes `file` with `cfg`, runs `--print-config` with `env`: the refusal's error line and
    // the whole output.
    let refused = |file: &str, cfg: &str, env: &[(&str, &str)]| {
        std::fs::write(dir.path().join(file), cfg).expect("write cfg");
        let out = shield(&["--print-config"], env, dir.path());
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{all}");
        (error_line(&all).to_string(), all)
    };

    let (line, all) = refused(
        ".databrickscfg",
        "[DEFAULT]\nhost = https://adb-1.azuredatabricks.net/?o=1\ntoken = dapi-profile-token-77\n",
        &[("HOME", home.as_str()), sink],
    );
    assert!(
        line.contains("profile [DEFAULT] of ")
            && line.contains(".databrickscfg: host")
            && line.contains("https://adb-1.azuredatabricks.net"),
        "{line}"
    );
    assert!(!line.contains("DATABRICKS_HOST (--host) \""), "{line}");
    assert!(!all.contains("dapi-profile-token-77"), "{all}");

    let (line, _) = refused(
        ".databrickscfg",
        "[DEFAULT]\nhost = https://adb-1.azuredatabricks.net\nclient_id = profile-sp\n",
        &[("HOME", home.as_str()), sink],
    );
    assert!(
        line.contains("profile [DEFAULT] of ")
            && line.contains("has client_id but no client_secret"),
        "{line}"
    );
    assert!(!line.contains("unset DATABRICKS_CLIENT_ID"), "{line}");

    // An explicitly named file without [DEFAULT]: its profiles are listed.
    let (line, _) = refused(
        "team.cfg",
        "[prod]\nhost = https://adb-1.azuredatabricks.net\ntoken = dapi-x\n[staging]\n",
        &[("DATABRICKS_CONFIG_FILE", "team.cfg"), sink],
    );
    assert!(
        line.contains("DATABRICKS_CONFIG_FILE team.cfg has no [DEFAULT] profile")
            && line.contains("it has: prod, staging")
            && line.contains("DATABRICKS_CONFIG_PROFILE"),
        "{line}"
    );
    // ...and naming one of them works.
    let out = shield(
        &["--print-config"],
        &[
            ("DATABRICKS_CONFIG_FILE", "team.cfg"),
            ("DATABRICKS_CONFIG_PROFILE", "prod"),
            sink,
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("auth=pat"), "{}", text(&out));
}
