//! Security promises of the real binary: proxies from HTTP(S)_PROXY / NO_PROXY are honoured, a
//! custom CA bundle (DATABRICKS_CA_BUNDLE, else SSL_CERT_FILE) is validated and TLS is never
//! skipped, and distinctive secrets appear nowhere: not in stdout or stderr (even at trace level,
//! in JSON logs), not in the state directory (state and quarantine files), not in the records.
//!
//! TLS end to end: a test-only TLS front (CA and certificate generated at runtime with rcgen,
//! rustls with ring) terminates HTTPS for `localhost` and relays to the emulator's plain port, so
//! the real binary is exercised as behind a TLS-inspecting proxy: with the CA bundle (given as
//! DATABRICKS_CA_BUNDLE or SSL_CERT_FILE, for `discover`, `check` and `-once`), without it, with
//! the bundle of another CA of the same name, and through a CONNECT proxy (HTTPS_PROXY).

mod common;

use common::tls::{test_ca, tls_front, PROXIED_HOST};

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use akto_standin::Behavior;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_databricks-shield");

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A minimal forward proxy: absolute-form HTTP requests and CONNECT tunnels, counted.
async fn proxy() -> (String, Arc<AtomicUsize>) {
    let (url, hits, _tunnels) = proxy_with_tunnels().await;
    (url, hits)
}

/// [`proxy`], also recording the target (`host:port`) of every CONNECT tunnel it opened.
async fn proxy_with_tunnels() -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let tunnels = Arc::new(Mutex::new(Vec::new()));
    let h = hits.clone();
    let t = tunnels.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            let h = h.clone();
            let t = t.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                h.fetch_add(1, Ordering::SeqCst);
                let head_text = String::from_utf8_lossy(&head).to_string();
                let first = head_text.lines().next().unwrap_or("").to_string();
                let mut parts = first.split_whitespace();
                let method = parts.next().unwrap_or("");
                let target = parts.next().unwrap_or("");
                if method == "CONNECT" {
                    // A name only the proxy can resolve (no DNS entry on this machine).
                    let dial = target.replace(PROXIED_HOST, "127.0.0.1");
                    let Ok(mut up) = tokio::net::TcpStream::connect(dial).await else {
                        return;
                    };
                    t.lock().unwrap().push(target.to_string());
                    let _ = client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                } else {
                    // Absolute form: http://host:port/path -> forward the request as is.
                    let Some(rest) = target.strip_prefix("http://") else {
                        return;
                    };
                    let authority = rest.split('/').next().unwrap_or("");
                    let Ok(mut up) = tokio::net::TcpStream::connect(authority).await else {
                        return;
                    };
                    let path = &rest[authority.len()..];
                    let rewritten =
                        head_text.replacen(target, if path.is_empty() { "/" } else { path }, 1);
                    // One request per connection keeps the relay simple.
                    let rewritten = rewritten.replacen("\r\n", "\r\nconnection: close\r\n", 1);
                    if up.write_all(rewritten.as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    (format!("http://{addr}"), hits, tunnels)
}

fn discover(emu_url: &str, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(["discover", "--json"])
        .env_clear()
        .env("DATABRICKS_HOST", emu_url)
        .env("DATABRICKS_CLIENT_ID", "emulator-client")
        .env("DATABRICKS_CLIENT_SECRET", common::SECRET)
        .env("METRICS_ADDR", "off");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_is_used_and_no_proxy_bypasses_it() {
    let emu = common::emulator(common::emulator_config()).await;
    let (proxy_url, hits) = proxy().await;
    let url = emu.base_url();
    let through = tokio::task::block_in_place(|| {
        discover(
            &url,
            &[("HTTP_PROXY", &proxy_url), ("HTTPS_PROXY", &proxy_url)],
        )
    });
    assert!(through.status.success(), "{}", text(&through));
    let via_proxy = hits.load(Ordering::SeqCst);
    assert!(via_proxy > 0, "the proxy saw no request");

    let bypass = tokio::task::block_in_place(|| {
        discover(
            &url,
            &[
                ("HTTP_PROXY", &proxy_url),
                ("HTTPS_PROXY", &proxy_url),
                ("NO_PROXY", "127.0.0.1,localhost"),
            ],
        )
    });
    assert!(bypass.status.success(), "{}", text(&bypass));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        via_proxy,
        "NO_PROXY was not honoured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_ca_bundle_is_a_configuration_error_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let junk = junk.to_str().unwrap();
    for var in ["DATABRICKS_CA_BUNDLE", "SSL_CERT_FILE"] {
        let o = discover("https://adb-1.azuredatabricks.net", &[(var, junk)]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains(var), "{}", text(&o));
    }
    // A missing file too.
    let o = discover(
        "https://adb-1.azuredatabricks.net",
        &[("DATABRICKS_CA_BUNDLE", "/nonexistent/ca.pem")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinctive_secrets_appear_nowhere() {
    let secret = "Zq9-client-secret-7f3e1d0c";
    let jwt = "eyJhbGciOiJIUzI1NiJ9.Zq9-jwt-body-55aa.Zq9sig";
    let mut cfg = common::emulator_config();
    cfg.client_secret = secret.into();
    let emu = common::emulator(cfg).await;
    let standin = akto_standin::StandIn::start(akto_standin::StandInConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        require_jwt: Some(jwt.into()),
    })
    .await
    .unwrap();
    // One record refused by the sink, so the quarantine file exists too.
    let poison = emu.ground_truth()[0].databricks_request_id.clone();
    standin.set_behavior(Behavior::Reject422Matching {
        needle: poison.clone(),
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, secret).unwrap();
    let mut all = String::new();
    for (format, level) in [("text", "trace"), ("json", "debug")] {
        let o = tokio::task::block_in_place(|| {
            Command::new(BIN)
                .arg("-once")
                .env_clear()
                .env("DATABRICKS_HOST", emu.base_url())
                .env("DATABRICKS_CLIENT_ID", "emulator-client")
                .env("DATABRICKS_CLIENT_SECRET_FILE", &secret_file)
                .env("DATA_INGESTION_SERVICE_URL", standin.url())
                .env("AKTO_JWT_TOKEN", jwt)
                .env("STATE_DIR", &state)
                .env("LOOKBACK_MINUTES", "120")
                .env("METRICS_ADDR", "off")
                .env("LOG_FORMAT", format)
                .env("RUST_LOG", level)
                .output()
                .unwrap()
        });
        assert!(o.status.success(), "{}", text(&o));
        all.push_str(&text(&o));
    }
    assert!(
        all.contains("quarantined"),
        "the poison record was not quarantined"
    );
    let mut files = String::new();
    let mut count = 0;
    for e in std::fs::read_dir(&state).unwrap() {
        let p = e.unwrap().path();
        files.push_str(&String::from_utf8_lossy(&std::fs::read(&p).unwrap()));
        count += 1;
    }
    assert!(count >= 2, "state and quarantine files expected");
    assert!(files.contains(&poison), "quarantine kept the record");
    let records: String = standin.records().iter().map(|r| r.to_string()).collect();
    assert!(!records.is_empty());
    for s in [secret, jwt, "Zq9"] {
        assert!(!all.contains(s), "a secret leaked into stdout/stderr");
        assert!(!files.contains(s), "a secret leaked into STATE_DIR");
        assert!(!records.contains(s), "a secret leaked into a record");
    }
}

/// Runs `-once` with the file sink (`--output`), bounded: killed after two minutes (it takes
/// seconds). Returns the output and the records written.
fn once_to_file(
    host: &str,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (Output, Vec<serde_json::Value>) {
    let out = dir.join("records.jsonl");
    let log = dir.join("log.txt");
    let mut c = Command::new(BIN);
    c.arg("-once")
        .arg("--output")
        .arg(&out)
        .env_clear()
        .env("DATABRICKS_HOST", host)
        .env("DATABRICKS_CLIENT_ID", "emulator-client")
        .env("DATABRICKS_CLIENT_SECRET", common::SECRET)
        .env("STATE_DIR", dir.join("state"))
        .env("LOOKBACK_MINUTES", "120")
        .env("METRICS_ADDR", "off")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("err.txt")).unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let o = Output {
        status,
        stdout: std::fs::read(&log).unwrap_or_default(),
        stderr: std::fs::read(dir.join("err.txt")).unwrap_or_default(),
    };
    let records = std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (o, records)
}

/// Every emulated execution in the lookback arrived exactly once, and nothing else.
fn assert_all_executions(emu: &databricks_emulator::Emulator, records: &[serde_json::Value]) {
    let truth: std::collections::BTreeSet<String> = emu
        .ground_truth()
        .into_iter()
        .map(|r| r.databricks_request_id)
        .collect();
    assert!(!truth.is_empty());
    let got = common::executions_in(records);
    assert!(got.values().all(|n| *n == 1), "duplicates: {got:?}");
    let got: std::collections::BTreeSet<String> = got.into_keys().collect();
    assert_eq!(got, truth, "the records are not the emulator's executions");
}

/// Each record's `host` request header is derived from the workspace host (DATABRICKS_HOST).
fn assert_records_name_the_workspace(records: &[serde_json::Value], workspace_host: &str) {
    assert!(!records.is_empty());
    for r in records {
        let host = common::header(r, "requestHeaders", "host")
            .unwrap_or_else(|| panic!("no host header: {r}"));
        assert!(
            host.ends_with(&format!(".{workspace_host}")),
            "host {host} is not under {workspace_host}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_custom_ca_bundle_discovers_and_delivers_every_record() {
    let emu = common::emulator(common::emulator_config()).await;
    let front = tls_front(&emu.base_url()).await;
    // Trace data from storage over https too (presigned URLs are https), through the front.
    emu.set_storage_url(Some(&front.url));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &front.ca_pem).unwrap();
    let ca = ca.to_str().unwrap().to_string();

    let d = tokio::task::block_in_place(|| {
        discover(&front.url, &[("DATABRICKS_CA_BUNDLE", ca.as_str())])
    });
    assert!(d.status.success(), "{}", text(&d));
    let inventory: serde_json::Value = serde_json::from_slice(&d.stdout)
        .unwrap_or_else(|e| panic!("discover --json printed no JSON ({e}): {}", text(&d)));
    assert!(!inventory.is_null());
    let after_discover = front.handshakes.load(Ordering::SeqCst);
    assert!(
        after_discover > 0,
        "discover did not go through the TLS front"
    );

    let (o, records) = tokio::task::block_in_place(|| {
        once_to_file(&front.url, dir.path(), &[("DATABRICKS_CA_BUNDLE", &ca)])
    });
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("errors=0"), "{}", text(&o));
    assert_all_executions(&emu, &records);
    assert_records_name_the_workspace(&records, "localhost");
    assert!(front.handshakes.load(Ordering::SeqCst) > after_discover);
}

/// A workspace reached over https whose signed trace URIs are plain http: the connector does not
/// send a presigned URL in clear text. The experiment's source fails naming why (retried next
/// cycle, no summary committed in place of the spans); the inference tables still deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_signed_uri_under_an_https_workspace_is_refused_not_followed() {
    let emu = common::emulator(common::emulator_config()).await;
    let front = tls_front(&emu.base_url()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &front.ca_pem).unwrap();
    let ca = ca.to_str().unwrap().to_string();
    let (o, records) = tokio::task::block_in_place(|| {
        once_to_file(&front.url, dir.path(), &[("DATABRICKS_CA_BUNDLE", &ca)])
    });
    let t = text(&o);
    assert!(t.contains("is only followed to https storage"), "{t}");
    assert!(
        !t.contains("after 8 attempts"),
        "refused at once, not retried: {t}"
    );
    assert_all_executions(&emu, &records);
    // No record of an MLflow experiment's trace (not even a summary in place of its spans);
    // span tables are read with SQL and still deliver.
    let from_experiments = records
        .iter()
        .filter(|r| {
            common::header(r, "requestHeaders", "x-mlflow-location")
                .is_some_and(|l| l.starts_with("mlflow:"))
        })
        .count();
    assert_eq!(
        from_experiments, 0,
        "records of experiment traces were sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_the_ca_bundle_fails_as_an_untrusted_certificate() {
    let emu = common::emulator(common::emulator_config()).await;
    let front = tls_front(&emu.base_url()).await;
    // Trace data from storage over https too (presigned URLs are https), through the front.
    emu.set_storage_url(Some(&front.url));
    let d = tokio::task::block_in_place(|| discover(&front.url, &[]));
    let dir = tempfile::tempdir().unwrap();
    let (o, records) = tokio::task::block_in_place(|| once_to_file(&front.url, dir.path(), &[]));
    for (what, out) in [("discover", &d), ("-once", &o)] {
        let t = text(out);
        assert_eq!(out.status.code(), Some(1), "{what}: {t}");
        // The kind, rustls' reason, and the fix naming the variable to set.
        assert!(t.contains("TLS handshake failed"), "{what}: {t}");
        assert!(t.contains("invalid peer certificate"), "{what}: {t}");
        assert!(t.contains("TLS certificate is trusted"), "{what}: {t}");
        assert!(t.contains("set DATABRICKS_CA_BUNDLE"), "{what}: {t}");
        assert_eq!(
            t.matches("invalid peer certificate").count(),
            1,
            "{what}: the error is logged once: {t}"
        );
    }
    assert!(records.is_empty(), "records written without trusted TLS");
    // `check` stops at its TLS step, with the same reason and fix.
    let (code, steps, out) = check(&front.url, &[]).await;
    assert_eq!(code, Some(1), "check: {out}");
    assert_eq!(
        steps.last().map(|s| &s["name"]),
        Some(&"TLS".into()),
        "{out}"
    );
    let detail = steps
        .last()
        .map(|s| s["detail"].to_string())
        .unwrap_or_default();
    assert!(detail.contains("invalid peer certificate"), "check: {out}");
    assert!(detail.contains("set DATABRICKS_CA_BUNDLE"), "check: {out}");
    // All three runs reached the front, and no handshake ever completed: verification was not
    // skipped.
    assert!(front.accepted.load(Ordering::SeqCst) >= 3);
    assert_eq!(front.handshakes.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_through_a_connect_proxy_with_the_ca_bundle_delivers_every_record() {
    let emu = common::emulator(common::emulator_config()).await;
    let front = tls_front(&emu.base_url()).await;
    // Trace data from storage over https too (presigned URLs are https), through the front.
    emu.set_storage_url(Some(&front.url));
    let (proxy_url, _hits, tunnels) = proxy_with_tunnels().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &front.ca_pem).unwrap();
    let ca = ca.to_str().unwrap().to_string();
    let env = [
        ("DATABRICKS_CA_BUNDLE", ca.as_str()),
        ("HTTPS_PROXY", proxy_url.as_str()),
    ];

    let d = tokio::task::block_in_place(|| discover(&front.url, &env));
    assert!(d.status.success(), "{}", text(&d));
    let (o, records) = tokio::task::block_in_place(|| once_to_file(&front.url, dir.path(), &env));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("errors=0"), "{}", text(&o));
    assert_all_executions(&emu, &records);
    assert_records_name_the_workspace(&records, "localhost");

    let tunnels = tunnels.lock().unwrap().clone();
    assert!(!tunnels.is_empty(), "no CONNECT tunnel was opened");
    let target = format!("localhost:{}", front.port);
    assert!(
        tunnels.iter().all(|t| *t == target),
        "CONNECT to {tunnels:?}, expected only {target}"
    );
    // Every connection the TLS front accepted came through a tunnel: none bypassed the proxy.
    assert_eq!(front.accepted.load(Ordering::SeqCst), tunnels.len());
    assert!(front.handshakes.load(Ordering::SeqCst) > 0);
}

/// `check --json` against `host` with a healthy sink and a fresh state directory: the exit code,
/// the steps, and everything printed (for failure messages).
async fn check(host: &str, env: &[(&str, &str)]) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let standin = common::standin().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Command::new(BIN);
    c.args(["check", "--json"])
        .env_clear()
        .env("DATABRICKS_HOST", host)
        .env("DATABRICKS_CLIENT_ID", "emulator-client")
        .env("DATABRICKS_CLIENT_SECRET", common::SECRET)
        .env("DATA_INGESTION_SERVICE_URL", standin.url())
        .env("STATE_DIR", dir.path())
        .env("METRICS_ADDR", "off");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = tokio::task::block_in_place(|| c.output().unwrap());
    let steps: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}): {}", text(&o)));
    (o.status.code(), steps, text(&o))
}

/// The step named `name`, if `check` got that far.
fn step<'a>(steps: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    steps.iter().find(|s| s["name"] == name)
}

/// Writes `pem` as `<name>.pem` in `dir` and returns the path as text.
fn write_pem(dir: &std::path::Path, name: &str, pem: &str) -> String {
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, pem).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified_even_with_a_ca_bundle() {
    // The bundle holds a CA with the very same name as the one that signed the front's
    // certificate, but another key: a CA bundle only adds trust anchors, it never turns
    // verification off, so nothing gets past the handshake.
    let emu = common::emulator(common::emulator_config()).await;
    let front = tls_front(&emu.base_url()).await;
    // Trace data from storage over https too (presigned URLs are https), through the front.
    emu.set_storage_url(Some(&front.url));
    let (other_ca, _) = test_ca();
    assert_ne!(other_ca.pem(), front.ca_pem);
    let dir = tempfile::tempdir().unwrap();
    let wrong = write_pem(dir.path(), "other-ca", &other_ca.pem());

    let d = tokio::task::block_in_place(|| {
        discover(&front.url, &[("DATABRICKS_CA_BUNDLE", wrong.as_str())])
    });
    let t = text(&d);
    assert_eq!(d.status.code(), Some(1), "discover: {t}");
    assert!(t.contains("TLS handshake failed"), "discover: {t}");
    assert!(t.contains("invalid peer certificate"), "discover: {t}");
    assert!(d.stdout.is_empty(), "discover printed an inventory: {t}");

    let (code, steps, out) = check(&front.url, &[("DATABRICKS_CA_BUNDLE", wrong.as_str())]).await;
    assert_eq!(code, Some(1), "check: {out}");
    for passed in ["DNS", "TCP"] {
        assert_eq!(
            step(&steps, passed).map(|s| &s["ok"]),
            Some(&true.into()),
            "{out}"
        );
    }
    let tls = step(&steps, "TLS").unwrap_or_else(|| panic!("no TLS step: {out}"));
    assert_eq!(tls["ok"], false, "{out}");
    let detail = tls["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("invalid peer certificate"), "{out}");
    assert!(
        detail.contains(&wrong),
        "the fix names the bundle in use: {out}"
    );
    // `check` stops at the TLS step: nothing after it was attempted.
    assert_eq!(
        steps.last().map(|s| &s["name"]),
        Some(&"TLS".into()),
        "{out}"
    );

    // Both commands reached the front, no handshake completed, and the workspace behind it never
    // saw a request: verification happened, and failed.
    assert!(front.accepted.load(Ordering::SeqCst) >= 2);
    assert_eq!(front.handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(emu.stats()["requests_total"], 0, "{}", emu.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_trusts_the_same_ca_bundle_as_the_client() {
    // Behind a TLS-inspecting proxy whose CA is given as DATABRICKS_CA_BUNDLE (or SSL_CERT_FILE),
    // `check` passes its TLS step and every later one, exactly where `discover` works.
    let emu = common::emulator(common::emulator_config()).await;
    let front = tls_front(&emu.base_url()).await;
    // Trace data from storage over https too (presigned URLs are https), through the front.
    emu.set_storage_url(Some(&front.url));
    let dir = tempfile::tempdir().unwrap();
    let ca = write_pem(dir.path(), "ca", &front.ca_pem);

    let d = tokio::task::block_in_place(|| {
        discover(&front.url, &[("DATABRICKS_CA_BUNDLE", ca.as_str())])
    });
    assert!(d.status.success(), "discover: {}", text(&d));
    let after_discover = front.handshakes.load(Ordering::SeqCst);
    assert!(
        after_discover > 0,
        "discover did not go through the TLS front"
    );

    for var in ["DATABRICKS_CA_BUNDLE", "SSL_CERT_FILE"] {
        let before = front.handshakes.load(Ordering::SeqCst);
        let (code, steps, out) = check(&front.url, &[(var, ca.as_str())]).await;
        let tls = step(&steps, "TLS").unwrap_or_else(|| panic!("{var}: no TLS step: {out}"));
        assert_eq!(tls["ok"], true, "{var}: {out}");
        assert!(
            tls["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("verified"),
            "{var}: {out}"
        );
        assert_eq!(code, Some(0), "{var}: {out}");
        assert!(steps.iter().all(|s| s["ok"] == true), "{var}: {out}");
        for later in [
            "authentication",
            "catalog and schema access",
            "SQL warehouse",
        ] {
            assert!(
                step(&steps, later).is_some(),
                "{var}: no {later} step: {out}"
            );
        }
        assert!(
            front.handshakes.load(Ordering::SeqCst) > before,
            "{var}: check did not go through the TLS front"
        );
    }
}

/// Behind a proxy the workspace may not resolve, nor be reachable, from this machine: `check`
/// then tests DNS and TCP towards the proxy (the path the client takes) and TLS through it,
/// instead of failing where the connector works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_tests_the_path_through_the_proxy() {
    let emu = common::emulator(common::emulator_config()).await;
    let front = tls_front(&emu.base_url()).await;
    // Trace data from storage over https too (presigned URLs are https), through the front.
    emu.set_storage_url(Some(&front.url));
    let (proxy_url, _hits, tunnels) = proxy_with_tunnels().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = write_pem(dir.path(), "ca.pem", &front.ca_pem);
    let host = format!("https://{PROXIED_HOST}:{}", front.port);
    let env = [
        ("DATABRICKS_CA_BUNDLE", ca.as_str()),
        ("HTTPS_PROXY", proxy_url.as_str()),
    ];
    let (code, steps, out) = check(&host, &env).await;
    assert_eq!(code, Some(0), "{out}");
    let dns = step(&steps, "DNS").expect("a DNS line");
    assert!(
        dns["detail"]
            .as_str()
            .unwrap()
            .contains("the proxy of HTTPS_PROXY"),
        "{out}"
    );
    let tcp = step(&steps, "TCP").expect("a TCP line");
    assert!(
        tcp["detail"].as_str().unwrap().contains(&proxy_url[7..]),
        "{out}"
    );
    let tunnels = tunnels.lock().unwrap().clone();
    assert!(!tunnels.is_empty(), "check went through no tunnel");
    assert!(
        tunnels
            .iter()
            .all(|t| *t == format!("{PROXIED_HOST}:{}", front.port)),
        "{tunnels:?}"
    );

    // Without the proxy the name does not resolve here, and check says so at DNS.
    let (code, steps, out) = check(&host, &[("DATABRICKS_CA_BUNDLE", ca.as_str())]).await;
    assert_eq!(code, Some(1), "{out}");
    let dns = step(&steps, "DNS").expect("a DNS line");
    assert_eq!(dns["ok"], false, "{out}");
    assert!(
        dns["detail"].as_str().unwrap().contains("DATABRICKS_HOST"),
        "{out}"
    );
}
