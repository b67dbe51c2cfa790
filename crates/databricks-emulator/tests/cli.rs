//! The binary: first stdout line is `listening on http://127.0.0.1:PORT`, it serves, and
//! `--help` documents the options and the fault syntax.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn help_documents_options_and_faults() {
    let out = Command::new(env!("CARGO_BIN_EXE_databricks-emulator"))
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--listen",
        "--agents",
        "--rows",
        "--seed",
        "--client-id",
        "--client-secret",
        "--pat",
        "--catalog",
        "--schema",
        "--table-prefix",
        "--faults",
        "--token-ttl-secs",
        "--chunk-rows",
        "--payload-bytes",
        "kind=429",
        "retry_after",
        "/_emulator/generate",
    ] {
        assert!(text.contains(opt), "--help lacks {opt}");
    }
}

#[test]
fn prints_listening_line_and_serves() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_databricks-emulator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--agents",
            "2",
            "--rows",
            "10",
            "--client-id",
            "cid",
            "--client-secret",
            "csecret",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    let result = (|| {
        read.map_err(|e| e.to_string())?;
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or(format!("bad first line {line:?}"))?
            .to_string();
        if !url.starts_with("http://127.0.0.1:") {
            return Err(format!("bad url {url}"));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let r = reqwest::Client::new()
                .post(format!("{url}/oidc/v1/token"))
                .basic_auth("cid", Some("csecret"))
                .form(&[("grant_type", "client_credentials"), ("scope", "all-apis")])
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status() != 200 {
                return Err(format!("token status {}", r.status()));
            }
            Ok(())
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result.unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn bad_faults_exit_with_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_databricks-emulator"))
        .args(["--faults", "kind=explode"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown kind"));
}

#[cfg(unix)]
#[test]
fn sigterm_stops_it_cleanly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_databricks-emulator"))
        .args(["--agents", "1", "--rows", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    assert!(
        line.starts_with("listening on http://127.0.0.1:"),
        "{line:?}"
    );
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(sent.is_ok_and(|s| s.success()));
    let mut status = None;
    for _ in 0..100 {
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "did not exit cleanly on SIGTERM: {status:?}"
    );
}
