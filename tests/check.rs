//! `databricks-shield check`: each of the seed's five troubleshooting cases ends in a failing
//! line that names the fix; a healthy setup passes every line.

mod common;

use std::process::Command;

use databricks_emulator::Privilege;

const BIN: &str = env!("CARGO_BIN_EXE_databricks-shield");

struct Setup {
    host: String,
    secret: String,
    sink: String,
    prefix: String,
    extra: Vec<(&'static str, String)>,
}

fn check(s: &Setup) -> (bool, Vec<serde_json::Value>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("DATABRICKS_HOST", s.host.clone()),
        ("DATABRICKS_CLIENT_ID", "emulator-client".to_string()),
        ("DATABRICKS_CLIENT_SECRET", s.secret.clone()),
        ("DATABRICKS_PREFIX", s.prefix.clone()),
        ("DATA_INGESTION_SERVICE_URL", s.sink.clone()),
        ("STATE_DIR", dir.path().display().to_string()),
    ];
    env.extend(s.extra.iter().cloned());
    check_env(&env)
}

fn failed(steps: &[serde_json::Value]) -> Vec<(&str, &str)> {
    steps
        .iter()
        .filter(|s| s["ok"] == false)
        .map(|s| (s["name"].as_str().unwrap(), s["detail"].as_str().unwrap()))
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_setup_passes_every_line_and_each_case_fails_its_own() {
    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    let good = || Setup {
        host: emu.base_url(),
        secret: common::SECRET.into(),
        sink: standin.url(),
        prefix: String::new(),
        extra: Vec::new(),
    };
    let (ok, steps, out) = check(&good());
    assert!(ok, "{out}");
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    for expected in [
        "configuration",
        "DNS",
        "TCP",
        "authentication",
        "catalog and schema access",
        "serving endpoints",
        "inference tables",
        "SQL warehouse",
        "state directory",
        "sink reachable",
    ] {
        assert!(names.contains(&expected), "no {expected} line in {names:?}");
    }
    assert!(names.iter().filter(|n| n.starts_with("SELECT on ")).count() >= 4);

    // 1. cannot connect
    let (ok, steps, _) = check(&Setup {
        host: format!("http://127.0.0.1:{}", free_port()),
        ..good()
    });
    assert!(!ok);
    let f = failed(&steps);
    assert_eq!(f[0].0, "TCP", "{f:?}");
    assert!(f[0].1.contains("Failed to connect to Databricks workspace"));

    // 2. authentication
    let (ok, steps, out) = check(&Setup {
        secret: "not-the-secret-4711".into(),
        ..good()
    });
    assert!(!ok && !out.contains("not-the-secret-4711"));
    let f = failed(&steps);
    assert_eq!(f[0].0, "authentication");
    assert!(f[0].1.contains("Authentication failed"));

    // 3. access denied, with the GRANT statements
    emu.revoke("emulator-client", Privilege::UseCatalog);
    let (ok, steps, _) = check(&good());
    emu.grant("emulator-client", Privilege::UseCatalog);
    assert!(!ok);
    let f = failed(&steps);
    assert_eq!(f[0].0, "catalog and schema access");
    assert!(
        f[0].1
            .contains("GRANT USE CATALOG ON CATALOG `workspace` TO `emulator-client`"),
        "{}",
        f[0].1
    );

    // ... and an agent endpoint's inference table without SELECT: Unity Catalog no longer lists
    // it (it lists only what the principal may read), and check names the GRANT.
    let table = "workspace.default.support_bot_payload".to_string();
    assert!(emu.ground_truth().iter().any(|r| r.table == table));
    emu.revoke(
        "emulator-client",
        Privilege::Select {
            table: table.clone(),
        },
    );
    let (ok, steps, out) = check(&good());
    emu.grant(
        "emulator-client",
        Privilege::Select {
            table: table.clone(),
        },
    );
    assert!(!ok, "{out}");
    let f = failed(&steps);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].0, format!("SELECT on {table}"));
    assert!(f[0].1.contains("GRANT SELECT ON TABLE"), "{}", f[0].1);

    // 4. no data: a prefix that matches nothing, and an unreachable ingestion service
    let (ok, steps, _) = check(&Setup {
        prefix: "nothing_matches_".into(),
        ..good()
    });
    assert!(!ok);
    let f = failed(&steps);
    assert_eq!(f[0].0, "inference tables");
    assert!(f[0].1.contains("DATABRICKS_PREFIX"));
    let dead_sink = format!("http://127.0.0.1:{}", free_port());
    let (ok, steps, _) = check(&Setup {
        sink: dead_sink.clone(),
        ..good()
    });
    assert!(!ok);
    let f = failed(&steps);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].0, "sink reachable");
    assert!(
        f[0].1.contains("No data appearing") && f[0].1.contains(&dead_sink[7..]),
        "{}",
        f[0].1
    );

    // 5. slow: statements outlast STATEMENT_TIMEOUT_SECONDS
    emu.set_faults(&format!(
        "route=/api/2.0/sql/statements,kind=pending,polls=100000,count=unlimited,table={table}"
    ))
    .unwrap_or_else(|_| {
        emu.set_faults("route=/api/2.0/sql/statements,kind=pending,polls=100000,count=unlimited")
            .unwrap()
    });
    let (ok, steps, _) = check(&Setup {
        extra: vec![("STATEMENT_TIMEOUT_SECONDS", "5".into())],
        ..good()
    });
    emu.set_faults("").unwrap();
    assert!(!ok);
    let f = failed(&steps);
    assert!(f[0].0.starts_with("SELECT on "), "{f:?}");
    assert!(
        f[0].1.contains("STATEMENT_TIMEOUT") && f[0].1.contains("warehouse"),
        "{}",
        f[0].1
    );
}

/// The seed's case 3's other half: Unity Catalog not enabled (no metastore assigned). The check
/// says so, and what an account admin does about it, instead of blaming the catalog's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unity_catalog_not_enabled_is_named_with_its_fix() {
    let mut cfg = common::emulator_config();
    cfg.no_metastore = true;
    let emu = common::emulator(cfg).await;
    let standin = common::standin().await;
    let (ok, steps, out) = check(&Setup {
        host: emu.base_url(),
        secret: common::SECRET.into(),
        sink: standin.url(),
        prefix: String::new(),
        extra: Vec::new(),
    });
    assert!(!ok, "{out}");
    let f = failed(&steps);
    assert_eq!(f[0].0, "catalog and schema access", "{f:?}");
    assert!(
        f[0].1.contains("Unity Catalog is not enabled"),
        "{}",
        f[0].1
    );
    assert!(
        f[0].1.contains("assign a Unity Catalog metastore"),
        "{}",
        f[0].1
    );
    assert!(!f[0].1.contains("set DATABRICKS_CATALOG"), "{}", f[0].1);
}

/// `check` changes nothing: a state file of an older format is reported, not upgraded (an
/// upgrade is one-way, and a diagnostic run must not prevent going back to the older release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_state_format_is_reported_and_left_as_it_is() {
    const META: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("meta");
    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("databricks-shield.redb");
    let format_of = |file: &std::path::Path| {
        use redb::ReadableDatabase as _;
        let db = redb::Database::create(file).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        let v = meta.get("format").unwrap().unwrap().value().to_string();
        v
    };
    {
        let db = redb::Database::create(&file).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("format", "1").unwrap();
        txn.commit().unwrap();
    }
    let (ok, steps, out) = check(&Setup {
        host: emu.base_url(),
        secret: common::SECRET.into(),
        sink: standin.url(),
        prefix: String::new(),
        extra: vec![("STATE_DIR", state.path().display().to_string())],
    });
    assert!(ok, "{out}");
    let line = steps
        .iter()
        .find(|s| s["name"] == "state directory")
        .expect("a state directory line");
    let detail = line["detail"].as_str().unwrap();
    assert!(
        detail.contains("state format 1") && detail.contains("next run upgrades it"),
        "{detail}"
    );
    assert_eq!(format_of(&file), "1", "check upgraded the state file");
}

/// A configuration that does not parse is still reported as `check`'s first line, failed, and
/// `--json` still prints JSON (a machine reading it gets the reason); the exit code is 2.
#[test]
fn a_bad_configuration_is_the_failed_first_line() {
    for json in [true, false] {
        let mut cmd = Command::new(BIN);
        cmd.arg("check")
            .env_clear()
            .env("DATABRICKS_HOST", "not a url");
        if json {
            cmd.arg("--json");
        }
        let o = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        assert_eq!(o.status.code(), Some(2), "{stdout}");
        if json {
            let steps: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
            assert_eq!(steps.len(), 1, "{stdout}");
            assert_eq!(steps[0]["name"], "configuration");
            assert_eq!(steps[0]["ok"], false);
            assert!(
                steps[0]["detail"]
                    .as_str()
                    .unwrap()
                    .contains("DATABRICKS_HOST"),
                "{stdout}"
            );
        } else {
            assert!(
                stdout.starts_with("[FAIL] configuration: ") && stdout.contains("DATABRICKS_HOST"),
                "{stdout}"
            );
        }
    }
}

/// Runs `check --json` with exactly `env` (a cleared environment otherwise).
fn check_env(env: &[(&str, String)]) -> (bool, Vec<serde_json::Value>, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["check", "--json"]).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = tokio::task::block_in_place(|| cmd.output().unwrap());
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let steps: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "check --json printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.success(), steps, stdout)
}

fn step<'a>(steps: &'a [serde_json::Value], name: &str) -> (bool, &'a str) {
    let s = steps
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} line in {steps:?}"));
    (s["ok"] == true, s["detail"].as_str().unwrap_or_default())
}

/// A personal access token is tried with a real request (a PAT needs no token exchange, so
/// without one a wrong token passed `check` and failed the run); a trailing newline in it, as
/// `echo` leaves, is trimmed and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_personal_access_token_is_verified_and_trimmed() {
    let mut cfg = common::emulator_config();
    cfg.pat = Some("dapi-emulator-pat-4242".into());
    let emu = common::emulator(cfg).await;
    let standin = common::standin().await;
    let state = tempfile::tempdir().unwrap();
    let env = |token: &str| {
        vec![
            ("DATABRICKS_HOST", emu.base_url()),
            ("DATABRICKS_TOKEN", token.to_string()),
            ("DATA_INGESTION_SERVICE_URL", standin.url()),
            ("STATE_DIR", state.path().display().to_string()),
        ]
    };
    let (ok, steps, out) = check_env(&env("dapi-wrong-token-1717"));
    assert!(!ok, "{out}");
    assert!(!out.contains("dapi-wrong-token-1717"), "{out}");
    let f = failed(&steps);
    assert_eq!(f[0].0, "authentication", "{f:?}");
    assert!(f[0].1.contains("Authentication failed"), "{}", f[0].1);

    let (ok, steps, out) = check_env(&env("dapi-emulator-pat-4242\n"));
    assert!(ok, "{out}");
    let (_, detail) = step(&steps, "authentication");
    assert!(detail.contains("pat") && detail.contains("GET"), "{detail}");
}

/// `GET /healthCheck` ignores the token; the `sink token` line posts an empty batch with it, so
/// a wrong AKTO_JWT_TOKEN fails `check` instead of every delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_akto_token_fails_check() {
    let emu = common::emulator(common::emulator_config()).await;
    let standin = akto_standin::StandIn::start(akto_standin::StandInConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        require_jwt: Some("right-jwt-value".into()),
    })
    .await
    .unwrap();
    let setup = |jwt: &str| Setup {
        host: emu.base_url(),
        secret: common::SECRET.into(),
        sink: standin.url(),
        prefix: String::new(),
        extra: vec![("AKTO_JWT_TOKEN", jwt.to_string())],
    };
    let (ok, steps, out) = check(&setup("wrong-jwt-value-5150"));
    assert!(!ok, "{out}");
    assert!(!out.contains("wrong-jwt-value-5150"), "{out}");
    let f = failed(&steps);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].0, "sink token");
    assert!(
        f[0].1.contains("HTTP 401") && f[0].1.contains("AKTO_JWT_TOKEN"),
        "{}",
        f[0].1
    );
    assert!(step(&steps, "sink reachable").0);

    let (ok, steps, out) = check(&setup("right-jwt-value"));
    assert!(ok, "{out}");
    assert!(step(&steps, "sink token").1.contains("accepted"), "{out}");
    // The probe stored nothing.
    assert!(standin.records().is_empty());
}

/// Without a state file, `check` creates nothing: not STATE_DIR, not the file; it only tests
/// that the first run could create them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_creates_no_state() {
    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("not/yet");
    let (ok, steps, out) = check(&Setup {
        host: emu.base_url(),
        secret: common::SECRET.into(),
        sink: standin.url(),
        prefix: String::new(),
        extra: vec![("STATE_DIR", state.display().to_string())],
    });
    assert!(ok, "{out}");
    let (ok, detail) = step(&steps, "state directory");
    assert!(ok && detail.contains("does not exist yet"), "{detail}");
    assert!(!root.path().join("not").exists(), "check created STATE_DIR");
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

/// A proxy that refuses to open the tunnel (407) is a proxy-credentials problem, not a
/// certificate one: the fix points at HTTPS_PROXY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_refusing_connect_points_at_its_credentials() {
    use std::io::{Read as _, Write as _};
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    // Answers every CONNECT with 407; lives as long as the test process.
    std::thread::spawn(move || {
        for conn in proxy.incoming().take(20) {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = conn.write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                  Proxy-Authenticate: Basic realm=\"corp\"\r\ncontent-length: 0\r\n\r\n",
            );
        }
    });
    let state = tempfile::tempdir().unwrap();
    let (ok, steps, out) = check_env(&[
        (
            "DATABRICKS_HOST",
            format!("https://127.0.0.1:{}", free_port()),
        ),
        ("DATABRICKS_TOKEN", "dapi-unused".into()),
        ("DATA_INGESTION_SERVICE_URL", "http://127.0.0.1:9".into()),
        ("STATE_DIR", state.path().display().to_string()),
        ("HTTPS_PROXY", format!("http://127.0.0.1:{proxy_port}")),
    ]);
    assert!(!ok, "{out}");
    let f = failed(&steps);
    assert_eq!(f[0].0, "TLS", "{f:?}");
    assert!(
        f[0].1.contains("tunnel") && f[0].1.contains("credentials: put them in HTTPS_PROXY"),
        "{}",
        f[0].1
    );
    assert!(!f[0].1.contains("DATABRICKS_CA_BUNDLE"), "{}", f[0].1);
}

/// The service principal may not list serving endpoints (no CAN_VIEW): a run warns and finds its
/// agents from the inference tables, so `check` says so with a `[WARN]` line and goes on to the
/// warehouse, the SELECTs, the state directory and the sink, and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_endpoint_listing_warns_and_check_goes_on() {
    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    emu.set_faults("route=/api/2.0/serving-endpoints,kind=403,count=unlimited")
        .unwrap();
    let (ok, steps, out) = check(&Setup {
        host: emu.base_url(),
        secret: common::SECRET.into(),
        sink: standin.url(),
        prefix: String::new(),
        extra: Vec::new(),
    });
    assert!(ok, "{out}");
    let line = steps
        .iter()
        .find(|s| s["name"] == "serving endpoints")
        .expect("a serving endpoints line");
    assert_eq!(line["warning"], true, "{out}");
    assert!(
        line["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("CAN_VIEW"),
        "{out}"
    );
    for later in ["SQL warehouse", "state directory", "sink reachable"] {
        assert!(step(&steps, later).0, "{later}: {out}");
    }
    assert!(
        steps.iter().any(|s| s["name"]
            .as_str()
            .unwrap_or_default()
            .starts_with("SELECT on ")),
        "{out}"
    );
}

/// Tables this state delivered rows from that Unity Catalog no longer lists (here: SELECT
/// revoked) are named once each: an agent endpoint's table by its failing `SELECT on` line, any
/// other (an app's) by a `[WARN]` line with the GRANT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_read_before_and_no_longer_listed_are_named_once() {
    let rig = common::Rig::new(common::emulator_config()).await;
    let first = rig.cycle().await;
    assert!(first.ok(), "{:?}", first.errors);
    let tables: std::collections::BTreeSet<String> = rig.truth().into_values().collect();
    assert!(tables.len() >= 4, "{tables:?}");
    for t in &tables {
        rig.emulator
            .revoke("emulator-client", Privilege::Select { table: t.clone() });
    }
    let (_, steps, out) = check(&Setup {
        host: rig.emulator.base_url(),
        secret: common::SECRET.into(),
        sink: rig.standin.url(),
        prefix: String::new(),
        extra: vec![("STATE_DIR", rig.state_path().display().to_string())],
    });
    let mut warned = 0;
    for t in &tables {
        let failing = steps
            .iter()
            .filter(|s| s["ok"] == false && s["name"] == format!("SELECT on {t}"))
            .count();
        let warnings: Vec<&serde_json::Value> = steps
            .iter()
            .filter(|s| s["warning"] == true && s["name"] == format!("{t} no longer listed"))
            .collect();
        assert_eq!(failing + warnings.len(), 1, "{t}: {out}");
        if let Some(w) = warnings.first() {
            let detail = w["detail"].as_str().unwrap_or_default();
            assert!(
                detail.contains("GRANT SELECT ON TABLE") && detail.contains("emulator-client"),
                "{detail}"
            );
            warned += 1;
        }
    }
    assert!(warned >= 1, "no table-only agent among {tables:?}: {out}");
}

/// Without EXECUTE on the schema Unity Catalog lists no model or function: `check` passes with a
/// `[WARN]` line `EXECUTE on <catalog>.<schema>` quoting the GRANT. A run in an experiment the
/// principal may not read gets a `[WARN]` line naming the run and CAN READ. With the grants back,
/// neither line shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_execute_or_experiment_read_are_warned_with_the_fix() {
    let emu = common::emulator(common::emulator_config()).await;
    let standin = common::standin().await;
    let setup = || Setup {
        host: emu.base_url(),
        secret: common::SECRET.into(),
        sink: standin.url(),
        prefix: String::new(),
        extra: Vec::new(),
    };
    let warnings = |steps: &[serde_json::Value]| -> Vec<(String, String)> {
        steps
            .iter()
            .filter(|s| s["warning"] == true)
            .map(|s| {
                (
                    s["name"].as_str().unwrap_or_default().to_string(),
                    s["detail"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let (ok, steps, out) = check(&setup());
    assert!(ok, "{out}");
    assert!(warnings(&steps).is_empty(), "{out}");

    emu.revoke("emulator-client", Privilege::Execute);
    let (ok, steps, out) = check(&setup());
    assert!(ok, "a run lives without EXECUTE: {out}");
    let w = warnings(&steps);
    assert_eq!(w.len(), 1, "{out}");
    assert_eq!(w[0].0, "EXECUTE on workspace.default");
    assert!(
        w[0].1
            .contains("GRANT EXECUTE ON SCHEMA `workspace`.`default` TO `emulator-client`;")
            && w[0]
                .1
                .contains("workspace.default.support_bot (served by endpoint"),
        "{}",
        w[0].1
    );
    emu.grant("emulator-client", Privilege::Execute);

    // The experiment of support_bot's runs, by the name the emulator gives it.
    let c = common::client(&emu.base_url(), "emulator-client", common::SECRET);
    let exp = c
        .search_experiments()
        .await
        .unwrap()
        .into_iter()
        .find(|e| {
            e.name
                .as_deref()
                .is_some_and(|n| n.ends_with("/support_bot"))
        })
        .expect("support_bot's experiment")
        .experiment_id;
    let read = Privilege::ReadExperiment { experiment_id: exp };
    emu.revoke("emulator-client", read.clone());
    let (ok, steps, out) = check(&setup());
    assert!(ok, "{out}");
    let w = warnings(&steps);
    assert_eq!(w.len(), 1, "{out}");
    assert!(
        w[0].0.starts_with("CAN READ on the experiment of run "),
        "{out}"
    );
    assert!(
        w[0].1
            .contains("agent agents_workspace-default-support_bot")
            && w[0].1.contains("CAN READ on the experiment of run"),
        "{}",
        w[0].1
    );
    emu.grant("emulator-client", read);
    let (ok, steps, out) = check(&setup());
    assert!(ok && warnings(&steps).is_empty(), "{out}");
}
