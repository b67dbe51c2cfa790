//! Whole cycles into Akto's Kafka topic on a real Kafka-protocol broker (tansu), compared with
//! the emulator's ground truth.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::kafka::*;
use common::*;
use databricks_shield::run::{Connector, Shutdown};
use databricks_shield::sink::{AnySink, KafkaSink, KafkaSinkConfig};
use databricks_shield::state::StateStore;

const TOPIC: &str = "akto.api.logs";

fn kafka_connector(
    rig_state: &std::path::Path,
    emulator_url: &str,
    brokers: &str,
) -> Arc<Connector> {
    let mut k = KafkaSinkConfig::new(brokers.to_string(), TOPIC.to_string());
    k.message_timeout = Duration::from_secs(5);
    Arc::new(Connector::new(
        client(emulator_url, "emulator-client", SECRET),
        AnySink::Kafka(KafkaSink::new(k).unwrap()),
        StateStore::open(rig_state, false).unwrap(),
        settings(rig_state),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_execution_lands_in_the_topic_once_keyed_by_agent_host() {
    let Some(broker) = start_broker() else { return };
    create_topic(&broker.brokers(), TOPIC, 2).await;
    let emu = emulator(emulator_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let (_t, shutdown) = Shutdown::new();
    for round in 0..3 {
        if round == 2 {
            emu.generate(40, 5);
        }
        let c = kafka_connector(dir.path(), &emu.base_url(), &broker.brokers());
        let report = c.run_cycle(&shutdown).await;
        assert!(report.ok(), "{:?}", report.errors);
        if round == 1 {
            assert_eq!(report.records_sent, 0, "a rerun sends nothing");
        }
    }
    let stored = consume_all(&broker.brokers(), TOPIC, 2).await;
    let values: Vec<serde_json::Value> = stored
        .iter()
        .map(|(_, _, v)| serde_json::from_str(v).expect("a flat JSON record"))
        .collect();
    for ((_, key, _), v) in stored.iter().zip(&values) {
        assert_eq!(
            Some(key.clone()),
            header(v, "requestHeaders", "host"),
            "key = the agent's host"
        );
        assert_eq!(v["source"], "MIRRORING");
        akto_standin::check_record(v).expect("the record satisfies Akto's contract");
    }
    let got = executions_in(&values);
    let truth: std::collections::BTreeMap<String, String> = emu
        .ground_truth()
        .into_iter()
        .map(|r| (r.databricks_request_id, r.table))
        .collect();
    assert_eq!(got.len(), truth.len());
    assert!(got.keys().all(|id| truth.contains_key(id)));
    assert!(got.values().all(|n| *n == 1), "duplicates in the topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_the_cycle_naming_it_and_keeps_state() {
    let emu = emulator(emulator_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let brokers = format!("127.0.0.1:{port}");
    let c = kafka_connector(dir.path(), &emu.base_url(), &brokers);
    let (_t, shutdown) = Shutdown::new();
    let report = c.run_cycle(&shutdown).await;
    assert!(!report.ok());
    assert_eq!(report.records_sent, 0);
    let all = report.errors.join(" ");
    assert!(all.contains(&brokers), "{all}");
    drop(c);
    let state = StateStore::open(dir.path(), false).unwrap();
    let truth = emu.ground_truth();
    assert_eq!(
        state.cursor(&truth[0].table).unwrap(),
        None,
        "nothing checkpointed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_over_the_topic_message_limit_are_cut_to_fit_not_refused() {
    let Some(broker) = start_broker() else { return };
    let topic = "akto.small.messages";
    // The topic says its limit; KAFKA_MAX_MESSAGE_BYTES is unset.
    create_topic_with(
        &broker.brokers(),
        topic,
        1,
        &[("max.message.bytes", "65536")],
    )
    .await;
    // Rows of about 150 KB against a topic limit of 64 KiB.
    let emu = emulator(databricks_emulator::EmulatorConfig {
        rows: 12,
        payload_bytes: 150_000,
        ..emulator_config()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut k = KafkaSinkConfig::new(broker.brokers(), topic.to_string());
    k.message_timeout = Duration::from_secs(5);
    let sink = KafkaSink::new(k).unwrap();
    sink.healthcheck().await.expect("the topic is there");
    assert_eq!(sink.message_limit(), 65_536, "read from the topic");
    let limit = sink.max_record_bytes();
    // KAFKA_MAX_MESSAGE_BYTES, when set, is what counts.
    let mut explicit = KafkaSinkConfig::new(broker.brokers(), topic.to_string());
    explicit.max_message_bytes = Some(200_000);
    let explicit = KafkaSink::new(explicit).unwrap();
    explicit.healthcheck().await.expect("the topic is there");
    assert_eq!(explicit.message_limit(), 200_000);
    assert_eq!(explicit.max_record_bytes(), 200_000 - 1024);
    let c = Arc::new(Connector::new(
        client(&emu.base_url(), "emulator-client", SECRET),
        AnySink::Kafka(sink),
        StateStore::open(dir.path(), false).unwrap(),
        settings(dir.path()),
    ));
    let (_t, shutdown) = Shutdown::new();
    let report = c.run_cycle(&shutdown).await;
    assert!(report.ok(), "{:?}", report.errors);
    assert_eq!(report.quarantined, 0, "nothing refused");
    assert!(report.truncated > 0, "the large payloads were cut");

    let stored = consume_all(&broker.brokers(), topic, 1).await;
    let values: Vec<serde_json::Value> = stored
        .iter()
        .map(|(_, _, v)| serde_json::from_str(v).expect("a flat JSON record"))
        .collect();
    assert_eq!(values.len() as u64, report.records_sent);
    let mut cut = 0;
    for ((_, _, raw), v) in stored.iter().zip(&values) {
        assert!(raw.len() <= limit, "{} > {limit}", raw.len());
        akto_standin::check_record(v).expect("the record satisfies Akto's contract");
        let payload = v["responsePayload"].as_str().unwrap_or_default();
        if payload.contains("...[truncated by databricks-shield: original ") {
            cut += 1;
        }
    }
    assert!(cut > 0, "some records carry the cut marker");
    let got = executions_in(&values);
    assert_eq!(
        got.len(),
        emu.ground_truth().len(),
        "every execution arrived"
    );
    assert!(got.values().all(|n| *n == 1), "duplicates in the topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_in_with_sasl_from_its_environment_and_delivers_once() {
    // The broker is reached only through a SASL_PLAINTEXT/PLAIN front (tests/common/sasl.rs).
    let password = "Kafka-Sasl-Secret-5c4b3a";
    let Some((_broker, front)) = common::sasl::fronted_broker(password).await else {
        return;
    };
    let brokers = front.addr.to_string();
    let login = common::sasl::login(password);
    create_topic_as(&brokers, TOPIC, 2, &[], &login).await;
    let emu = emulator(emulator_config()).await;
    let dir = tempfile::tempdir().unwrap();
    // Only what an operator sets: the Kafka settings from the environment, no Akto URL.
    let run = |args: &'static [&'static str], password: &str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_databricks-shield"));
        c.args(args)
            .env_clear()
            .env("DATABRICKS_HOST", emu.base_url())
            .env("DATABRICKS_CLIENT_ID", "emulator-client")
            .env("DATABRICKS_CLIENT_SECRET", SECRET)
            .env("KAFKA_BROKER_HOST", &brokers)
            .env("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
            .env("KAFKA_SASL_MECHANISM", "PLAIN")
            .env("KAFKA_SASL_USERNAME", "akto-connector")
            .env("STATE_DIR", dir.path().join("state"))
            .env("LOOKBACK_MINUTES", "120")
            .env("METRICS_ADDR", "off");
        // The password as a mounted secret file for the run, as a variable for `check`.
        if args == ["-once"] {
            let file = dir.path().join("kafka_sasl_password");
            std::fs::write(&file, format!("{password}\n")).unwrap();
            c.env("KAFKA_SASL_PASSWORD_FILE", file);
        } else {
            c.env("KAFKA_SASL_PASSWORD", password);
        }
        tokio::task::spawn_blocking(move || c.output().unwrap())
    };
    let out = run(&["-once"], password).await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains(password), "the password leaked: {text}");

    let stored = consume_all_as(&brokers, TOPIC, 2, &login).await;
    let values: Vec<serde_json::Value> = stored
        .iter()
        .map(|(_, _, v)| serde_json::from_str(v).expect("a flat JSON record"))
        .collect();
    let got = executions_in(&values);
    let truth: std::collections::BTreeSet<String> = emu
        .ground_truth()
        .into_iter()
        .map(|r| r.databricks_request_id)
        .collect();
    assert_eq!(
        got.keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        truth
    );
    assert!(got.values().all(|n| *n == 1), "duplicates in the topic");
    let seen = front.seen();
    assert!(
        !seen.logins.is_empty()
            && seen
                .logins
                .iter()
                .all(|(u, ok)| u == "akto-connector" && *ok),
        "{seen:?}"
    );
    assert!(seen.refused_before_login.is_empty(), "{seen:?}");

    // `check` with a wrong password: fails, names the setting to fix, shows no secret.
    let wrong = "Wrong-Sasl-Secret-1a2b3c";
    let out = run(&["check"], wrong).await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("KAFKA_SASL_PASSWORD"), "{text}");
    assert!(!text.contains(wrong) && !text.contains(password), "{text}");
}
