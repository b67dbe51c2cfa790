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

/// `demo --output` never deletes a file that is not its own: an existing file of the user's and
/// a path that is not a regular file are refused untouched (exit 1, the reason and the fix).
#[test]
fn demo_refuses_to_replace_a_file_that_is_not_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mine = dir.path().join("records.jsonl");
    std::fs::write(&mine, "precious\n").unwrap();
    for target in [mine.clone(), dir.path().to_path_buf()] {
        let o = Command::new(BIN)
            .args(["demo", "--output"])
            .arg(&target)
            .env_clear()
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("--output") && stderr.contains("Fix:"),
            "{stderr}"
        );
        assert!(!String::from_utf8_lossy(&o.stdout).contains("Started a Databricks"));
    }
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "precious\n");
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

/// SIGTERM while the workspace is unreachable (authentication retries for up to five minutes)
/// ends the run at once: nothing was read, so nothing is left undelivered, and the log says so.
/// A `-once` cycle stopped by a signal is no success: an ERROR line and exit 1.
#[test]
fn sigterm_while_the_workspace_is_unreachable_stops_the_run() {
    use std::time::Duration;
    // A port nothing listens on: every connection is refused, and retried.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("log");
    let mut cmd = Command::new(BIN);
    cmd.arg("-once")
        .arg("--output")
        .arg(dir.path().join("out.jsonl"))
        .env_clear()
        .env("DATABRICKS_HOST", format!("https://127.0.0.1:{closed}"))
        .env("DATABRICKS_TOKEN", "dapi-unused-token")
        .env("STATE_DIR", dir.path().join("state"))
        .env("METRICS_ADDR", "off");
    let mut run = Logged::spawn(cmd, log_path);
    // Started: the sink is set up, the cycle is retrying the workspace.
    run.wait_for("Sending records to");
    std::thread::sleep(Duration::from_millis(500));
    run.sigterm();
    // Bounded: well below the five-minute retry budget it would otherwise spend.
    let status = run.exit_within(60);
    let text = run.text();
    assert!(status.is_some(), "still retrying after SIGTERM:\n{text}");
    assert!(text.contains("Shutdown requested"), "{text}");
    assert!(text.contains("before anything was read"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{text}");
    assert!(
        text.contains("ERROR -once stopped by a signal before the cycle finished"),
        "{text}"
    );
}

/// `-once` under a time limit shorter than its cycle (a slow Akto) stops cleanly: the WARN and
/// ERROR lines say why, exit 1, what was confirmed is checkpointed; the next run delivers the
/// rest, and every execution arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_stops_cleanly_at_its_time_limit_and_the_next_run_continues() {
    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    standin.set_behavior(akto_standin::Behavior::Slow { delay_ms: 150 });
    let dir = tempfile::tempdir().unwrap();
    let run = |limit: &str| {
        common::shield_command(&emu, &standin, &dir.path().join("state"))
            .arg("-once")
            .env("BATCH_SIZE", "5")
            .env("ONCE_TIME_LIMIT_SECONDS", limit)
            .output()
            .unwrap()
    };
    let first = tokio::task::block_in_place(|| run("3"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(first.status.code(), Some(1), "{text}");
    assert!(text.contains("-once time limit of 3s reached"), "{text}");
    assert!(text.contains("stopped at its time limit"), "{text}");
    assert!(!text.contains("stopped by a signal"), "{text}");
    assert!(
        text.contains("Cycle stopped before it finished in"),
        "{text}"
    );
    let truth: std::collections::BTreeSet<String> = emu
        .ground_truth()
        .into_iter()
        .map(|r| r.databricks_request_id)
        .collect();
    let after_first = common::executions_in(&standin.records());
    // ~70 batches at 150 ms each do not fit in 3 s (how many did depends on the machine).
    assert!(
        after_first.len() < truth.len(),
        "the limit should stop the cycle part way: {} of {}",
        after_first.len(),
        truth.len()
    );

    standin.set_behavior(akto_standin::Behavior::Normal);
    let second = tokio::task::block_in_place(|| run("0"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&second.stdout),
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(second.status.success(), "{text}");
    assert!(
        !text.contains("re-sending"),
        "a clean stop leaves nothing unconfirmed: {text}"
    );
    let all = common::executions_in(&standin.records());
    let ids: std::collections::BTreeSet<String> = all.keys().cloned().collect();
    assert_eq!(ids, truth);
    assert!(
        all.values().all(|n| *n == 1),
        "sent twice: {:?}",
        all.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
}

/// Akto stops answering near the `-once` time limit: the batch in flight is given
/// `IN_FLIGHT_GRACE` (10 s) and then abandoned, so the run ends with its summary well before the
/// runner's 300 s kill instead of waiting out the sink's time-outs and retries. The abandoned
/// batch is not checkpointed; the next run announces it and sends it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_abandons_a_batch_that_never_returns_after_its_grace() {
    use std::io::{Read as _, Write as _};
    let emu = common::emulator(common::emulator_config()).await;
    // Answers the health check, then holds every POST open without a reply.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_url = format!("http://{}", hang.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in hang.incoming().take(50) {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET") {
                    let _ = conn.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK",
                    );
                    return;
                }
                // Until the client gives up on it.
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    let standin = common::standin().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut cmd = common::shield_command(&emu, &standin, &state);
    cmd.arg("-once")
        .env("DATA_INGESTION_SERVICE_URL", &hang_url)
        .env("AKTO_REQUEST_TIMEOUT_SECONDS", "300")
        .env("ONCE_TIME_LIMIT_SECONDS", "5");
    let mut run = Logged::spawn(cmd, dir.path().join("log"));
    // Bounded far below the 300 s the sink alone would wait for one attempt.
    let status = tokio::task::block_in_place(|| run.exit_within(90));
    let text = run.text();
    assert!(
        status.is_some(),
        "still waiting on the batch in flight:\n{text}"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{text}");
    assert!(text.contains("-once time limit of 5s reached"), "{text}");
    assert!(
        text.contains("the batch in flight") && text.contains("not confirmed within 10s"),
        "{text}"
    );
    assert!(text.contains("Cycle stopped before it finished"), "{text}");
    assert!(text.contains("stopped at its time limit"), "{text}");
    assert!(!text.contains("panicked"), "{text}");

    // The next run announces the abandoned batch and delivers everything.
    let next = tokio::task::block_in_place(|| {
        common::shield_command(&emu, &standin, &state)
            .arg("-once")
            .output()
            .unwrap()
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&next.stdout),
        String::from_utf8_lossy(&next.stderr)
    );
    assert!(next.status.success(), "{text}");
    assert!(text.contains("re-sending"), "{text}");
    assert_eq!(
        common::executions_in(&standin.records()).len(),
        emu.ground_truth().len()
    );
}

/// `--reset-state`: the state is moved aside (kept, never deleted) and the last
/// `LOOKBACK_MINUTES` are sent again, as the README says; without it a rerun sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_state_moves_the_state_aside_and_sends_the_lookback_again() {
    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let once = |extra: &'static [&'static str]| {
        let mut c = common::shield_command(&emu, &standin, &state);
        c.arg("-once").args(extra);
        tokio::task::block_in_place(|| c.output().unwrap())
    };
    let truth = emu.ground_truth().len();
    let first = once(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let sent_first = common::executions_in(&standin.records());
    assert_eq!(sent_first.len(), truth);
    let records_first = standin.records().len();

    let rerun = once(&[]);
    assert!(rerun.status.success());
    assert_eq!(
        standin.records().len(),
        records_first,
        "a rerun sends nothing"
    );

    let reset = once(&["--reset-state"]);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&reset.stdout),
        String::from_utf8_lossy(&reset.stderr)
    );
    assert!(reset.status.success(), "{log}");
    assert!(log.contains("--reset-state: moved"), "{log}");
    // Every execution of the lookback once more: each now twice, nothing else.
    let after = common::executions_in(&standin.records());
    assert_eq!(after.len(), truth);
    assert!(after.values().all(|n| *n == 2), "{after:?}");
    assert_eq!(standin.records().len(), 2 * records_first);
    let aside: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".reset-"))
        .collect();
    assert_eq!(aside.len(), 1, "the old state is kept aside: {aside:?}");
}

/// A second SIGTERM while the first one waits for a batch the sink never answers exits at once
/// (code 130) instead of waiting out the retry budget; the log says what happens to the records
/// sent but not checkpointed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_exits_at_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    let emu = common::emulator(common::emulator_config()).await;
    // A sink that accepts connections and never answers them.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let holder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok((conn, _)) = listener.accept() {
                    held.push(conn);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("DATABRICKS_HOST", emu.base_url())
        .env("DATABRICKS_CLIENT_ID", "emulator-client")
        .env("DATABRICKS_CLIENT_SECRET", common::SECRET)
        .env("DATA_INGESTION_SERVICE_URL", format!("http://{sink_addr}"))
        .env("AKTO_REQUEST_TIMEOUT_SECONDS", "1")
        .env("RECURRING_INTERVAL_SECONDS", "3600")
        .env("LOOKBACK_MINUTES", "120")
        .env("STATE_DIR", dir.path().join("state"))
        .env("METRICS_ADDR", "off");
    let mut run = Logged::spawn(cmd, dir.path().join("log"));
    let status = tokio::task::block_in_place(|| {
        // A batch is being retried against the silent sink.
        run.wait_for("delivery to Akto ingestion failed");
        run.sigterm();
        run.wait_for("Shutdown requested");
        run.sigterm();
        // Bounded: far below the minute of retries the first signal alone would wait for.
        run.exit_within(30)
    });
    stop.store(true, Ordering::SeqCst);
    holder.join().unwrap();
    let text = run.text();
    assert_eq!(status.and_then(|s| s.code()), Some(130), "{text}");
    assert!(text.contains("Second stop signal: exiting now"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

/// A Kafka broker that stalls (SIGSTOP) during a `-once` run: at the time limit the batch in
/// flight gets its grace and is abandoned, and the producer's queue is flushed for at most the
/// same grace, then purged. The process exits long before Akto's 300 s kill; before, the
/// producer's flush waited out its 120 s message timeout on a blocking thread, and dropping the
/// runtime at exit waited for it. The next run announces the abandoned batch and delivers all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_against_a_stalled_kafka_broker_exits_well_before_the_kill() {
    use common::kafka::{consume_all, create_topic, start_broker};
    let Some(broker) = start_broker() else { return };
    let topic = "akto.api.logs";
    create_topic(&broker.brokers(), topic, 1).await;
    let emu = common::emulator(common::emulator_config()).await;
    // Slower statements: the cycle is still reading when the broker stalls.
    emu.set_faults("route=/api/2.0/sql/statements,kind=latency,ms=200")
        .unwrap();
    let standin = common::standin().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let kafka = |mut c: Command| {
        c.env_remove("DATA_INGESTION_SERVICE_URL")
            .env("KAFKA_BROKER_HOST", broker.brokers())
            .env("AKTO_KAFKA_TOPIC_NAME", topic)
            .arg("-once");
        c
    };
    let mut cmd = kafka(common::shield_command(&emu, &standin, &state));
    cmd.env("ONCE_TIME_LIMIT_SECONDS", "8");
    let mut run = Logged::spawn(cmd, dir.path().join("log"));
    let status = tokio::task::block_in_place(|| {
        // Past the health check and discovery: the broker stops answering.
        run.wait_for("Using SQL warehouse");
        broker.signal("STOP");
        // Bounded far below the 120 s message timeout the old flush waited out.
        run.exit_within(90)
    });
    broker.signal("CONT");
    let text = run.text();
    assert!(status.is_some(), "still running:\n{text}");
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{text}");
    assert!(text.contains("-once time limit of 8s reached"), "{text}");
    assert!(
        text.contains("the batch in flight") && text.contains("not confirmed within 10s"),
        "{text}"
    );
    assert!(text.contains("purged"), "{text}");
    assert!(!text.contains("panicked"), "{text}");

    // The next run announces the abandoned batch and delivers every execution.
    let next = tokio::task::block_in_place(|| {
        kafka(common::shield_command(&emu, &standin, &state))
            .output()
            .unwrap()
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&next.stdout),
        String::from_utf8_lossy(&next.stderr)
    );
    assert!(next.status.success(), "{text}");
    assert!(text.contains("re-sending"), "{text}");
    let values: Vec<serde_json::Value> = consume_all(&broker.brokers(), topic, 1)
        .await
        .iter()
        .map(|(_, _, v)| serde_json::from_str(v).expect("a flat JSON record"))
        .collect();
    let got = common::executions_in(&values);
    for row in emu.ground_truth() {
        assert!(
            got.contains_key(&row.databricks_request_id),
            "{} never reached the topic",
            row.databricks_request_id
        );
    }
}

/// The binary's stdout and stderr, gathered in one file.
struct Logged {
    child: std::process::Child,
    path: std::path::PathBuf,
}

impl Logged {
    fn spawn(mut cmd: Command, path: std::path::PathBuf) -> Logged {
        let log = std::fs::File::create(&path).unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Logged { child, path }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }

    /// Waits (at most 60 s) until the log holds `needle`.
    fn wait_for(&self, needle: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !self.text().contains(needle) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(
            self.text().contains(needle),
            "never logged {needle:?}:\n{}",
            self.text()
        );
    }

    fn sigterm(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// The exit status within `secs` seconds, else `None` (the process is killed then).
    fn exit_within(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// When what the sink confirmed cannot be checkpointed (here the state file may not grow: a
/// file size limit, as a full disk would do), the service stops with the cause and the fix
/// instead of sending the same records again every cycle; the next start announces them and
/// sends them again, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_cannot_be_written_stops_the_service() {
    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = state.join(databricks_shield::state::FILE_NAME);
    let once = || {
        let mut c = common::shield_command(&emu, &standin, &state);
        c.arg("-once");
        tokio::task::block_in_place(|| c.output().unwrap())
    };
    assert!(once().status.success());
    let first = standin.records().len();
    // Enough new rows that the state file must grow to checkpoint them.
    emu.generate(3000, 0);

    // The file may not grow past its present size.
    let limit_kib = std::fs::metadata(&file).unwrap().len() / 1024;
    let mut cmd = size_limited(
        common::shield_command(&emu, &standin, &state),
        limit_kib,
        "",
    );
    cmd.env("RECURRING_INTERVAL_SECONDS", "10")
        .env("CHECKPOINT_BATCHES", "1");
    let mut run = Logged::spawn(cmd, dir.path().join("log"));
    // Without the stop, the service would go on (a cycle every 10 s), sending the same records.
    let status = tokio::task::block_in_place(|| run.exit_within(60));
    let text = run.text();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{text}");
    assert!(text.contains("could not be checkpointed"), "{text}");
    assert!(
        text.contains("Fix: free space on the disk of STATE_DIR"),
        "{text}"
    );
    assert!(
        text.contains("Stopping: records sent may not be checkpointed"),
        "{text}"
    );
    assert_eq!(
        text.matches("Results:").count(),
        1,
        "one cycle, then the stop: {text}"
    );
    let sent = standin.records().len();
    assert!(
        sent > first,
        "the failed group was delivered before its checkpoint failed"
    );
    let counts = common::executions_in(&standin.records());
    assert!(counts.values().all(|n| *n == 1), "nothing sent twice yet");

    // The next start, with room again: the group is announced and sent once more, the rest
    // once; then every execution has arrived.
    let again = once();
    let log = String::from_utf8_lossy(&again.stderr).into_owned()
        + &String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{log}");
    assert!(log.contains("re-sending"), "{log}");
    let counts = common::executions_in(&standin.records());
    assert_eq!(counts.len(), emu.ground_truth().len());
    assert!(counts.values().all(|n| *n <= 2), "{counts:?}");

    // A state file that cannot even be created (the same limit on a new STATE_DIR) is a disk
    // problem, not a damaged file: no advice to reset.
    let fresh = dir.path().join("fresh");
    let mut cmd = size_limited(common::shield_command(&emu, &standin, &fresh), 64, "-once");
    let out = tokio::task::block_in_place(|| cmd.output().unwrap());
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("Fix: free space on its disk"), "{log}");
    assert!(!log.contains("--reset-state"), "{log}");
}

/// `inner` (its program and environment) under a file size limit of `kib` KiB, with `args`:
/// bash sets the limit and ignores SIGXFSZ, so a write past it fails with EFBIG (as on a full
/// disk) instead of killing the process; `exec` keeps both for the connector.
fn size_limited(inner: Command, kib: u64, args: &str) -> Command {
    let mut cmd = Command::new("/bin/bash");
    cmd.env_clear();
    for (k, v) in inner.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    cmd.arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {kib} && exec \"$0\" {args}"
        ))
        .arg(inner.get_program());
    cmd
}

/// The first start of this release on a state an earlier release wrote (one without this
/// release's mark) says once what may be sent again; a new state and later starts say nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_on_an_earlier_releases_state_announces_what_may_come_again() {
    const META: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("meta");
    const NOTE: &str = "this release keys long MLflow and OTel traces";
    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let once_with = |lookback: &str| {
        let mut c = common::shield_command(&emu, &standin, &state);
        c.arg("-once").env("LOOKBACK_MINUTES", lookback);
        let out = tokio::task::block_in_place(|| c.output().unwrap());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let once = || once_with("120");
    assert!(
        !once().contains(NOTE),
        "a new state has nothing to send again"
    );
    // The state as an earlier release left it: delivered rows, no mark.
    {
        let db = redb::Database::create(state.join(databricks_shield::state::FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        let removed = txn
            .open_table(META)
            .unwrap()
            .remove("mark:traces-keyed-by-end")
            .unwrap()
            .is_some();
        assert!(removed, "the first start set the mark");
        txn.commit().unwrap();
    }
    let log = once();
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains(NOTE)),
        "{log}"
    );
    assert!(!once().contains(NOTE), "said once");

    // A lower LOOKBACK_MINUTES than at the previous start: said too (a higher one is safe).
    let lowered = once_with("60");
    assert!(
        lowered.lines().any(|l| l.contains("WARN")
            && l.contains("LOOKBACK_MINUTES is 60, 120 at the previous start")),
        "{lowered}"
    );
    assert!(!once_with("90").contains("at the previous start"));
}

/// Two workspaces on one `STATE_DIR` (Akto's job runner starts every job in the same folder):
/// the second is refused before it reads anything, exit 2, with the fix; `check` says the same;
/// the first workspace goes on using its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_of_another_workspace_is_refused_before_anything_is_read() {
    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let output = |c: &mut Command| {
        let out = tokio::task::block_in_place(|| c.output().unwrap());
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = output(common::shield_command(&emu, &standin, &state).arg("-once"));
    assert_eq!(code, Some(0), "{text}");
    let sent = standin.records().len();
    // Another workspace, with the same table names.
    let other = common::emulator(common::emulator_config()).await;
    let (code, text) = output(common::shield_command(&other, &standin, &state).arg("-once"));
    assert_eq!(code, Some(2), "{text}");
    let host =
        |e: &databricks_emulator::Emulator| e.base_url().trim_start_matches("http://").to_string();
    for want in [
        format!(
            "belongs to the workspace {}, not to DATABRICKS_HOST {}",
            host(&emu),
            host(&other)
        ),
        "Fix: give each workspace its own STATE_DIR".to_string(),
        "databricks-shield stopped".to_string(),
    ] {
        assert!(text.contains(&want), "{want}:\n{text}");
    }
    assert_eq!(standin.records().len(), sent, "nothing sent");
    assert_eq!(other.stats()["requests_total"], 0, "nothing read");
    let (code, text) = output(common::shield_command(&other, &standin, &state).arg("check"));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("[FAIL] state directory") && text.contains("belongs to the workspace"),
        "{text}"
    );
    let (code, text) = output(common::shield_command(&emu, &standin, &state).arg("-once"));
    assert_eq!(code, Some(0), "{text}");
}

/// A sink setting found wrong when the sink is built is a configuration error like any other:
/// exit 2, and the log's last line says the connector stopped.
#[test]
fn a_sink_setting_refused_at_start_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("records.jsonl");
    // Not a file of records this connector wrote (no line end): never appended to.
    std::fs::write(&out, "abc").unwrap();
    let o = Command::new(BIN)
        .arg("-once")
        .arg("--output")
        .arg(&out)
        .env_clear()
        .env("DATABRICKS_HOST", "https://127.0.0.1:9")
        .env("DATABRICKS_TOKEN", "dapi-unused-token")
        .env("STATE_DIR", dir.path().join("state"))
        .env("METRICS_ADDR", "off")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("invalid sink configuration"), "{text}");
    assert!(text.contains("databricks-shield stopped"), "{text}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "abc");
}

/// Akto's job runner starts every job in the binary's folder and cannot set `STATE_DIR`: without
/// it, each workspace keeps its state in a folder of its own under `./state`, so the jobs of two
/// workspaces both deliver everything, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_state_dir_each_workspace_keeps_its_own_state() {
    let first = common::emulator(common::emulator_config()).await;
    let second = common::emulator(common::emulator_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut standins = Vec::new();
    for emu in [&first, &second] {
        standins.push(common::standin().await);
        let standin = standins.last().unwrap();
        for _ in 0..2 {
            let mut c = common::shield_command(emu, standin, &dir.path().join("unused"));
            c.arg("-once")
                .env_remove("STATE_DIR")
                .current_dir(dir.path());
            let out = tokio::task::block_in_place(|| c.output().unwrap());
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let host = emu
            .base_url()
            .trim_start_matches("http://")
            .replace(':', "_");
        assert!(dir
            .path()
            .join("state")
            .join(host)
            .join(databricks_shield::state::FILE_NAME)
            .exists());
        let got = common::executions_in(&standin.records());
        assert_eq!(got.len(), emu.ground_truth().len());
        assert!(got.values().all(|n| *n == 1), "each once");
    }
    assert!(!dir.path().join("unused").exists());
}
