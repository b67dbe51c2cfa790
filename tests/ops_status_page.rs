//! Operations over real sockets: real cycles against the emulator feed the metrics registry; the
//! listener serves `/healthz`, `/readyz`, `/metrics` and the status page; a real headless
//! Chromium renders the page (screenshot + DOM). Also the binary in service mode, stopped by
//! SIGTERM.
//!
//! Chromium: Debian's `chromium` (or `CHROMIUM_BIN`). Missing: the browser test fails when `CI`
//! is set and skips loudly otherwise.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use databricks_shield::app;
use databricks_shield::ops::{Metrics, OpsServer, ServiceInfo};
use databricks_shield::run::{Connector, Shutdown};

fn info(c: &Connector) -> ServiceInfo {
    ServiceInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        workspace: "127.0.0.1".into(),
        catalog: "workspace".into(),
        schema: "default".into(),
        prefix: String::new(),
        sink: c.sink.name(),
        sink_target: c.sink.describe(),
        interval: Duration::from_secs(60),
    }
}

async fn get(url: &str) -> (u16, String, reqwest::header::HeaderMap) {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.text().await.unwrap(), headers)
}

/// The value of the one sample `name_and_labels` in a Prometheus exposition.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Every sample line is `name{labels} value` with a declared family; nothing else.
fn assert_valid_exposition(text: &str) {
    let mut declared: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "bad TYPE: {line}"
            );
            assert!(
                declared.insert(name.into(), kind.into()).is_none(),
                "family declared twice: {name}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line: {line:?}"
        );
        let name: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        assert!(name.starts_with("databricks_shield_"), "{line}");
        let family = declared
            .keys()
            .find(|f| {
                name == **f
                    || (declared[*f] == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name == format!("{f}{s}")))
            })
            .unwrap_or_else(|| panic!("sample before its TYPE: {line}"));
        assert!(!family.is_empty());
        let rest = &line[name.len()..];
        let value = if let Some(labels) = rest.strip_prefix('{') {
            let end = labels.rfind("} ").expect("closing brace");
            for pair in split_labels(&labels[..end]) {
                let (k, v) = pair.split_once('=').expect("label k=v");
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                assert!(v.starts_with('"') && v.ends_with('"'), "label {pair}");
            }
            &labels[end + 2..]
        } else {
            rest.strip_prefix(' ').expect("space before value")
        };
        assert!(
            value == "+Inf" || value.parse::<f64>().is_ok(),
            "bad value in {line}"
        );
    }
}

/// Splits `a="x",b="y\",z"` at the commas between pairs.
fn split_labels(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut cur, mut quoted, mut escaped) = (String::new(), false, false);
    for c in s.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The agent of a record, from its `ai-agent` tag.
fn agent_of(record: &serde_json::Value) -> Option<String> {
    let tag: serde_json::Value = serde_json::from_str(record.get("tag")?.as_str()?).ok()?;
    tag.get("ai-agent")?.as_str().map(str::to_string)
}

fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Runs headless Chromium on `url` with `extra` flags; returns stdout.
async fn chromium(bin: &Path, profile: &Path, url: &str, extra: &[String]) -> String {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--window-size=1280,1500",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    // A bound, not a timing assertion: a wedged browser must not hang CI.
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
        .await
        .expect("chromium finished within 240 s")
        .expect("chromium starts");
    assert!(
        out.status.success(),
        "chromium failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Decodes a PNG into (width, height, RGB pixels).
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<[u8; 3]>) {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let frame = reader.next_frame(&mut buf).expect("a frame");
    let channels = match frame.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    let pixels = buf[..frame.buffer_size()]
        .chunks_exact(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (frame.width, frame.height, pixels)
}

fn count_near(pixels: &[[u8; 3]], rgb: [u8; 3]) -> usize {
    pixels
        .iter()
        .filter(|p| p.iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= 6))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_of_real_cycles_in_a_headless_browser() {
    let rig = common::Rig::new(common::emulator_config()).await;
    let connector = rig.connector();
    let metrics = Arc::new(Metrics::new(info(&connector)));
    let (_trigger, shutdown) = Shutdown::new();

    // Two real cycles through the service loop's observer; new rows in between.
    assert!(
        app::run_loop_observed(
            connector.clone(),
            Duration::from_secs(60),
            true,
            shutdown.clone(),
            Some(metrics.clone()),
        )
        .await
    );
    rig.emulator.generate(30, 0);
    assert!(
        app::run_loop_observed(
            connector.clone(),
            Duration::from_secs(60),
            true,
            shutdown.clone(),
            Some(metrics.clone()),
        )
        .await
    );
    let snap = metrics.snapshot();
    let inv = snap.inventory.clone().expect("an inventory");
    assert!(inv.agents.len() >= 2, "the emulator has several agents");
    let records = rig.standin.records();
    assert_eq!(snap.records_sent as usize, records.len());
    assert_eq!(snap.history.len(), 2);
    assert!(
        snap.history[1].records_sent > 0,
        "the second cycle sent the new rows"
    );

    let server = OpsServer::start("127.0.0.1:0".parse().unwrap(), metrics.clone(), shutdown)
        .await
        .unwrap();
    let base = format!("http://{}", server.local_addr());

    let (status, body, _) = get(&format!("{base}/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body, _) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = get(&format!("{base}/nope")).await;
    assert_eq!(status, 404);

    // /metrics agrees with what Akto's stand-in received and with the emulator.
    let (status, text, headers) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_valid_exposition(&text);
    let m = |k: &str| sample(&text, k).unwrap_or_else(|| panic!("no sample {k} in\n{text}"));
    assert_eq!(
        m("databricks_shield_records_sent_total{sink=\"http\"}") as usize,
        records.len()
    );
    assert_eq!(m("databricks_shield_cycles_total{result=\"success\"}"), 2.0);
    assert_eq!(m("databricks_shield_cycles_total{result=\"failure\"}"), 0.0);
    assert_eq!(m("databricks_shield_cycle_duration_seconds_count"), 2.0);
    assert_eq!(
        m("databricks_shield_cycle_duration_seconds_bucket{le=\"+Inf\"}"),
        2.0
    );
    assert_eq!(
        m("databricks_shield_agents_discovered") as usize,
        inv.agents.len()
    );
    assert_eq!(m("databricks_shield_ready"), 1.0);
    assert!(m("databricks_shield_last_success_timestamp_seconds") > 1.0e9);
    assert_eq!(
        m("databricks_shield_rows_read_total") as u64,
        snap.rows_read
    );
    assert!(m("databricks_shield_rows_read_total") >= 200.0);
    assert!(
        m("databricks_shield_databricks_requests_total{method=\"POST\",route=\"/api/2.0/sql/statements\",status=\"200\"}")
            >= 2.0
    );
    // The page itself, as served.
    let (status, html, headers) = get(&format!("{base}/")).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
    assert!(!html.contains(" src="), "no external (or any) asset");

    // A real browser.
    let Some(bin) = find_chromium() else {
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!("chromium is missing but CI is set: install it (apt-get install -y chromium) or set CHROMIUM_BIN");
        }
        eprintln!(
            "\n!!!!!!!! SKIPPED the headless-browser part of the status page test: no chromium \
             (apt-get install -y chromium, or set CHROMIUM_BIN). In CI this fails. !!!!!!!!\n"
        );
        server.stop().await;
        return;
    };
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ops-status-page.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    chromium(
        &bin,
        profile.path(),
        &format!("{base}/"),
        &[format!("--screenshot={}", shot.display())],
    )
    .await;
    let profile = tempfile::tempdir().unwrap();
    let dom = chromium(
        &bin,
        profile.path(),
        &format!("{base}/"),
        &["--dump-dom".to_string()],
    )
    .await;
    server.stop().await;

    // Text checks on the DOM the browser built.
    assert!(
        dom.contains("<title>databricks-shield status</title>"),
        "{dom}"
    );
    assert!(dom.contains(">Ready</span>"));
    assert!(dom.contains("Last cycle") && dom.contains("No errors."));
    assert!(dom.contains("Cycle #2 <span class=\"badge ok\" data-result=\"success\">"));
    assert!(dom.contains(&format!("<h2>Agents ({})</h2>", inv.agents.len())));
    assert_eq!(
        dom.matches("<svg class=\"chart\"").count(),
        inv.agents.len()
    );
    for a in &inv.agents {
        assert!(
            dom.contains(&format!("data-agent=\"{}\"", a.name)),
            "{}",
            a.name
        );
        if let Some(t) = &a.table {
            assert!(dom.contains(&t.full_name), "{}", t.full_name);
        }
        for model in &a.models {
            assert!(dom.contains(&model.name), "{}", model.name);
        }
    }
    for t in &inv.tools {
        assert!(dom.contains(t.as_str()), "tool {t}");
    }
    let bars = dom.matches("<rect class=\"bar\"").count();
    let expected_bars: usize = snap
        .history
        .iter()
        .map(|c| {
            inv.agents
                .iter()
                .filter(|a| c.per_agent.get(&a.name).copied().unwrap_or(0) > 0)
                .count()
        })
        .sum();
    assert_eq!(bars, expected_bars);
    assert!(
        bars >= inv.agents.len(),
        "every agent sent in the first cycle"
    );

    // The screenshot shows the page: the dark header and the blue bars were painted.
    let bytes = std::fs::read(&shot).expect("chromium wrote the screenshot");
    let (w, h, pixels) = decode_png(&bytes);
    assert_eq!((w, h), (1280, 1500));
    assert!(
        count_near(&pixels, [0x11, 0x18, 0x27]) > 1280 * 40,
        "header painted"
    );
    assert!(
        count_near(&pixels, [0x25, 0x63, 0xeb]) >= bars * 14 * 2,
        "bar charts painted"
    );
    eprintln!("status page screenshot: {}", shot.display());
    // Per agent, /metrics agrees with the records the sink received with that agent's tag
    // (execution, tool-call, trace and inventory records alike). Checked last so that the
    // screenshot exists whatever this says.
    let mut per_agent: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        *per_agent
            .entry(agent_of(r).expect("every record names its agent"))
            .or_default() += 1;
    }
    for (agent, n) in &per_agent {
        let key = format!("databricks_shield_agent_records_sent_total{{agent=\"{agent}\"}}");
        assert_eq!(
            m(&key) as usize,
            *n,
            "records of {agent}: /metrics (CycleReport.per_agent) vs the sink's ai-agent tags"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cycle_makes_readyz_503_and_shows_the_error() {
    let rig = common::Rig::new(common::emulator_config()).await;
    let state = databricks_shield::state::StateStore::open(&rig.state_path(), false).unwrap();
    let connector = Arc::new(Connector::new(
        common::client(
            &rig.emulator.base_url(),
            "emulator-client",
            "a-wrong-secret",
        ),
        common::http_sink(&rig.standin.url()),
        state,
        common::settings(&rig.state_path()),
    ));
    let metrics = Arc::new(Metrics::new(info(&connector)));
    let (trigger, shutdown) = Shutdown::new();
    assert!(
        !app::run_loop_observed(
            connector.clone(),
            Duration::from_secs(60),
            true,
            shutdown.clone(),
            Some(metrics.clone()),
        )
        .await
    );
    let server = OpsServer::start("127.0.0.1:0".parse().unwrap(), metrics.clone(), shutdown)
        .await
        .unwrap();
    let base = format!("http://{}", server.local_addr());
    let (status, body, _) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 503);
    assert!(body.contains("no cycle has succeeded yet"), "{body}");
    let (_, text, _) = get(&format!("{base}/metrics")).await;
    assert_valid_exposition(&text);
    assert_eq!(
        sample(&text, "databricks_shield_cycles_total{result=\"failure\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "databricks_shield_ready"), Some(0.0));
    assert_eq!(
        sample(&text, "databricks_shield_last_success_timestamp_seconds"),
        Some(0.0)
    );
    assert!(sample(&text, "databricks_shield_cycle_errors_total").unwrap_or(0.0) >= 1.0);
    let (_, html, _) = get(&format!("{base}/")).await;
    assert!(html.contains("data-result=\"failure\""));
    assert!(html.contains(">Not ready</span>"));
    let errors = &metrics.snapshot().history[0].errors;
    assert!(!errors.is_empty());
    assert!(html.contains("error(s):"));
    assert!(!html.contains("a-wrong-secret") && !text.contains("a-wrong-secret"));
    // The shared Shutdown stops the listener.
    trigger.trigger();
    server.stop().await;
    assert!(reqwest::Client::new()
        .get(format!("{base}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_err());
}

/// The binary in service mode: listener on a free port, ready after the first cycle, clean stop.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_binary_serves_metrics_and_stops_on_sigterm() {
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};

    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = common::shield_command(&emu, &standin, &dir.path().join("state"))
        .env("RECURRING_INTERVAL_SECONDS", "3600")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    let mut addr = None;
    while addr.is_none() {
        let line = tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(60)))
            .unwrap_or_else(|_| panic!("no listener line; log so far:\n{log}"));
        log.push_str(&line);
        log.push('\n');
        addr = line
            .split_once("/metrics on http://")
            .map(|(_, a)| a.trim().to_string());
    }
    let base = format!("http://{}", addr.unwrap());
    let (status, _, _) = get(&format!("{base}/healthz")).await;
    assert_eq!(status, 200);
    // Ready once the first cycle succeeded (or, before, once the sink confirmed records of it);
    // bounded wait: the cycle reads 200 rows.
    let mut ready = false;
    for _ in 0..600 {
        let (status, _, _) = get(&format!("{base}/readyz")).await;
        let (_, text, _) = get(&format!("{base}/metrics")).await;
        let done = sample(&text, "databricks_shield_cycles_total{result=\"success\"}");
        if status == 200 && done == Some(1.0) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "never ready after a successful cycle; log:\n{log}");
    let (_, text, _) = get(&format!("{base}/metrics")).await;
    assert_eq!(
        sample(&text, "databricks_shield_cycles_total{result=\"success\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "databricks_shield_records_sent_total{sink=\"http\"}"),
        Some(standin.records().len() as f64)
    );
    let (_, html, _) = get(&format!("{base}/")).await;
    assert!(html.contains("Cycle #1"), "{html}");
    assert!(html.contains("workspace <b>127.0.0.1</b>"), "{html}");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    let _ = reader.join();
    log.extend(rx.try_iter().map(|l| l + "\n"));
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(log.contains("databricks-shield stopped"), "{log}");
    assert!(!log.contains(common::SECRET));
}

/// A taken METRICS_ADDR stops the service at start with the setting and the fix named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_stops_the_service_with_the_fix() {
    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_databricks-shield"))
            .env_clear()
            .env("DATABRICKS_HOST", emu.base_url())
            .env("DATABRICKS_CLIENT_ID", "emulator-client")
            .env("DATABRICKS_CLIENT_SECRET", common::SECRET)
            .env("DATA_INGESTION_SERVICE_URL", standin.url())
            .env("STATE_DIR", dir.path().join("state"))
            .env("METRICS_ADDR", addr.to_string())
            .output()
            .unwrap()
    });
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("METRICS_ADDR {addr}: cannot listen"))
            && err.contains("METRICS_ADDR=off"),
        "{err}"
    );
    assert!(standin.records().is_empty(), "no cycle ran");
    drop(taken);
}
