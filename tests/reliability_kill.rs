//! Crash safety of the real binary: `databricks-shield -once` is SIGKILLed at seeded random points
//! (starting up, reading, sending, right after the sink confirmed a batch, while the state is
//! written), restarted, again and again; then it runs to completion and the Akto stand-in's
//! records are compared with the emulator's ground truth.
//!
//! The promise checked: nothing lost, no panic, and duplicates only from the one physical window
//! (a batch the sink confirmed just before the kill, not yet recorded): at most one batch per
//! kill, each announced at the next start by `WARN re-sending N records of an unconfirmed batch`.
//!
//! `RELIABILITY_KILLS` (default 30) and `RELIABILITY_SEED` (default fixed) tune the run;
//! `scripts/soak.sh --iterations N` runs it long.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use akto_standin::{Behavior, StandIn};
use databricks_emulator::Emulator;
use rand::{Rng, SeedableRng};

const BATCH_SIZE: u64 = 10;
/// Batches per state commit: a kill may re-send up to this many batches.
const CHECKPOINT_BATCHES: u64 = 3;

fn spawn(emu: &Emulator, standin: &StandIn, state: &Path, log: &Path) -> Child {
    let log_file = std::fs::File::create(log).expect("log file");
    let log_err = log_file.try_clone().expect("log file");
    common::shield_command(emu, standin, state)
        .arg("-once")
        .env("BATCH_SIZE", BATCH_SIZE.to_string())
        .env("CHECKPOINT_BATCHES", CHECKPOINT_BATCHES.to_string())
        .env("TABLE_CONCURRENCY", "2")
        .env("STATEMENT_TIMEOUT_SECONDS", "30")
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(log_err))
        .spawn()
        .expect("the binary starts")
}

/// The `N` of every `re-sending N records of an unconfirmed batch` line.
fn resent_counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("re-sending ").nth(1)?;
            let (n, tail) = rest.split_once(' ')?;
            tail.starts_with("records of an unconfirmed batch")
                .then(|| n.parse().ok())
                .flatten()
        })
        .collect()
}

/// A key per distinct record: two equal keys are the same record sent twice.
fn record_key(r: &serde_json::Value) -> String {
    let h = |k: &str| common::header(r, "requestHeaders", k).unwrap_or_default();
    format!(
        "{}|{}|{}|{}|{}",
        r["path"].as_str().unwrap_or(""),
        h("x-databricks-request-id"),
        h("x-tool-call-id"),
        h("host"),
        r["time"].as_str().unwrap_or("")
    )
}

#[derive(Debug, Clone, Copy)]
enum Point {
    /// A random delay after start: auth, discovery, warehouse, first reads.
    Startup,
    /// Right after the sink confirmed the k-th batch: during the state commit.
    AfterConfirm,
    /// The stand-in answers slowly: killed while a batch is in flight.
    MidSend,
    /// Statements are slow: killed while reading.
    MidRead,
    /// Anywhere in the cycle.
    Anytime,
}

struct Outcome {
    killed: bool,
    log: String,
}

fn wait_and_kill(
    child: &mut Child,
    log: &Path,
    standin: &StandIn,
    point: Point,
    rng: &mut rand::rngs::StdRng,
) -> Outcome {
    let start = Instant::now();
    let batches0 = standin.accepted_batches();
    let deadline = start + Duration::from_secs(60);
    let delay = match point {
        Point::Startup => Some(Duration::from_millis(rng.random_range(0..400))),
        Point::MidRead => Some(Duration::from_millis(rng.random_range(100..1500))),
        Point::Anytime => Some(Duration::from_millis(rng.random_range(0..2500))),
        Point::AfterConfirm | Point::MidSend => None,
    };
    let k = rng.random_range(1..=4usize);
    let extra = Duration::from_millis(rng.random_range(0..150));
    let mut kill_at: Option<Instant> = delay.map(|d| start + d);
    let mut killed = false;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        let now = Instant::now();
        if kill_at.is_none() && standin.accepted_batches() >= batches0 + k {
            kill_at = Some(match point {
                Point::MidSend => now + extra,
                _ => now,
            });
        }
        if kill_at.is_some_and(|t| now >= t) || now >= deadline {
            // Child::kill is SIGKILL on Unix.
            let _ = child.kill();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    let _ = child.wait();
    Outcome {
        killed,
        log: std::fs::read_to_string(log).unwrap_or_default(),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_nothing_and_duplicates_only_the_announced_batch() {
    let kills = env_u64("RELIABILITY_KILLS", 30) as usize;
    let seed = env_u64("RELIABILITY_SEED", 0x5eed_6b11);
    println!("kill test: {kills} kill points, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut cfg = common::emulator_config();
    cfg.rows = 150;
    cfg.chunk_rows = 40;
    let emu = common::emulator(cfg).await;
    let standin = common::standin().await;
    let dir = tempfile::tempdir().unwrap();
    let state: PathBuf = dir.path().join("state");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();

    let points = [
        Point::Startup,
        Point::AfterConfirm,
        Point::MidSend,
        Point::MidRead,
        Point::Anytime,
    ];
    let mut killed_runs = 0usize;
    let mut by_point: BTreeMap<String, usize> = BTreeMap::new();
    let mut announced: u64 = 0;
    let mut announcements = 0usize;
    let mut all_logs = String::new();
    let mut run_no = 0usize;
    let mut attempts = 0usize;
    while killed_runs < kills {
        attempts += 1;
        assert!(attempts <= kills * 3, "could not reach {kills} kill points");
        // Fresh work every round: new rows and a few late ones behind the cursor.
        emu.generate(20, 3);
        let point = points[rng.random_range(0..points.len())];
        standin.set_behavior(match point {
            Point::MidSend => Behavior::Slow { delay_ms: 120 },
            _ => Behavior::Normal,
        });
        emu.set_faults(match point {
            Point::MidRead => "route=/api/2.0/sql/statements,kind=latency,ms=120,count=unlimited",
            _ => "",
        })
        .unwrap();
        run_no += 1;
        let log = logs.join(format!("run-{run_no}.log"));
        let mut child = tokio::task::block_in_place(|| spawn(&emu, &standin, &state, &log));
        let out = tokio::task::block_in_place(|| {
            wait_and_kill(&mut child, &log, &standin, point, &mut rng)
        });
        let resent = resent_counts(&out.log);
        announcements += resent.len();
        announced += resent.iter().sum::<u64>();
        assert!(
            resent.len() <= 1,
            "one unconfirmed batch at most per start:\n{}",
            out.log
        );
        assert!(
            !out.log.contains("panicked"),
            "run {run_no} panicked:\n{}",
            out.log
        );
        if out.killed {
            killed_runs += 1;
            *by_point.entry(format!("{point:?}")).or_default() += 1;
        }
        all_logs.push_str(&out.log);
    }

    // Then it runs undisturbed until a cycle succeeds and the next one finds nothing to send.
    standin.set_behavior(Behavior::Normal);
    emu.set_faults("").unwrap();
    let mut clean = 0;
    loop {
        clean += 1;
        assert!(clean <= 4, "did not converge after the kills:\n{all_logs}");
        run_no += 1;
        let log = logs.join(format!("run-{run_no}.log"));
        let before = standin.records().len();
        let status = tokio::task::block_in_place(|| {
            spawn(&emu, &standin, &state, &log).wait().expect("wait")
        });
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let resent = resent_counts(&text);
        announcements += resent.len();
        announced += resent.iter().sum::<u64>();
        assert!(!text.contains("panicked"), "{text}");
        all_logs.push_str(&text);
        if status.success() && standin.records().len() == before {
            break;
        }
    }

    // Ground truth.
    let truth = common::executions_in(&standin.records());
    let expected: Vec<String> = emu
        .ground_truth()
        .into_iter()
        .map(|r| r.databricks_request_id)
        .collect();
    let lost: Vec<&String> = expected
        .iter()
        .filter(|id| !truth.contains_key(*id))
        .collect();
    let records = standin.records();
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for r in &records {
        *seen.entry(record_key(r)).or_default() += 1;
    }
    let duplicates: u64 = seen.values().map(|n| n - 1).sum();
    println!(
        "kill test: seed={seed} kill_points={killed_runs} runs={run_no} by_point={by_point:?} \
         executions={} records={} duplicates={duplicates} announced_resends={announcements} \
         announced_records={announced}",
        expected.len(),
        records.len()
    );
    assert!(
        lost.is_empty(),
        "{} executions lost after {killed_runs} kills (seed {seed}), e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(3)]
    );
    assert!(
        duplicates <= announced,
        "{duplicates} records sent twice but only {announced} announced by \
         `re-sending N records` lines (seed {seed})"
    );
    assert!(
        announcements <= killed_runs,
        "more unconfirmed batches ({announcements}) than kills ({killed_runs})"
    );
    assert!(
        announced <= killed_runs as u64 * (CHECKPOINT_BATCHES * BATCH_SIZE + 20),
        "an announced re-send is larger than one checkpoint ({CHECKPOINT_BATCHES} batches) per \
         kill: {announced}"
    );
}
