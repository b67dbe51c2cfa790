//! Security promises of the real binary: proxies from HTTP(S)_PROXY / NO_PROXY are honoured, a
//! custom CA bundle (DATABRICKS_CA_BUNDLE, else SSL_CERT_FILE) is validated and TLS is never
//! skipped, and distinctive secrets appear nowhere: not in stdout or stderr (even at trace level,
//! in JSON logs), not in the state directory (state and quarantine files), not in the records.

mod common;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            let h = h.clone();
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
                    let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
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
    (format!("http://{addr}"), hits)
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
async fn tls_is_verified_even_with_a_ca_bundle() {
    // A TLS client hello to a server that is not the workspace (plain HTTP here) fails: there is
    // no option to skip verification, and a CA bundle only adds trust anchors.
    let emu = common::emulator(common::emulator_config()).await;
    let https = emu
        .base_url()
        .replace("http://127.0.0.1", "https://localhost");
    let system_bundle = "/etc/ssl/certs/ca-certificates.crt";
    let mut envs: Vec<(&str, &str)> = vec![];
    if std::path::Path::new(system_bundle).is_file() {
        envs.push(("DATABRICKS_CA_BUNDLE", system_bundle));
    }
    let o = tokio::task::block_in_place(|| discover(&https, &envs));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("Failed to connect") || text(&o).contains("TLS"),
        "{}",
        text(&o)
    );
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
