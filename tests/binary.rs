//! The real binary, end to end: `demo`, and `-once` / `check` / `discover` against the emulator,
//! with distinctive secrets that must never appear in any output.

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_databricks-shield");

#[test]
fn demo_writes_records_and_prints_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo.jsonl");
    let o = Command::new(BIN)
        .args(["demo", "--output"])
        .arg(&out)
        .env_clear()
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("Cycle completed in") && stdout.contains("AGENT"),
        "{stdout}"
    );
    let lines = std::fs::read_to_string(&out).unwrap();
    assert!(lines.lines().count() >= 200);
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["source"], "MIRRORING");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_check_and_discover_against_the_emulator_leak_no_secret() {
    let secret = "Sup3r-Secret-Value-9f8e7d";
    let jwt = "eyJhbGciOiJIUzI1NiJ9.secret-jwt-payload.sig";
    let mut cfg = common::emulator_config();
    cfg.client_secret = secret.into();
    let emu = common::emulator(cfg).await;
    let standin = common::standin().await;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env_clear()
            .env("DATABRICKS_HOST", emu.base_url())
            .env("DATABRICKS_CLIENT_ID", "emulator-client")
            .env("DATABRICKS_CLIENT_SECRET", secret)
            .env("DATA_INGESTION_SERVICE_URL", standin.url())
            .env("AKTO_JWT_TOKEN", jwt)
            .env("STATE_DIR", dir.path().join("state"))
            .env("LOOKBACK_MINUTES", "120")
            .env("METRICS_ADDR", "off")
            .output()
            .unwrap()
    };
    let mut all_output = String::new();
    for args in [
        &["-once"][..],
        &["-once"][..],
        &["check"][..],
        &["discover", "--json"][..],
    ] {
        let o = tokio::task::block_in_place(|| run(args));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{args:?} failed:\n{text}");
        all_output.push_str(&text);
    }
    assert!(all_output.contains("Starting databricks-shield"));
    assert!(all_output.contains("Results: agents="));
    assert!(all_output.contains("[PASS] authentication"));
    assert!(all_output.contains("\"agents\""));
    // The second -once sent nothing new.
    let received = common::executions_in(&standin.records());
    assert!(received.values().all(|n| *n == 1) && received.len() >= 200);
    for s in [secret, jwt] {
        assert!(!all_output.contains(s), "a secret leaked into the output");
        for r in standin.records() {
            assert!(!r.to_string().contains(s), "a secret leaked into a record");
        }
    }
    let state_bytes = std::fs::read(dir.path().join("state/databricks-shield.redb")).unwrap();
    assert!(!String::from_utf8_lossy(&state_bytes).contains(secret));
}
