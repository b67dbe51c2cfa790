//! The Kafka sink against a real Kafka-protocol broker (`tansu`, in memory, on loopback).
//!
//! The broker binary is `~/.cargo/bin/tansu` (or `$TANSU_BIN`). When it is missing the tests
//! fail if `CI` is set and otherwise skip with a loud message.

mod common;

use common::kafka::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use databricks_shield::sink::{
    AnySink, KafkaSink, KafkaSinkConfig, OutRecord, DEFAULT_KAFKA_MAX_MESSAGE_BYTES,
};

fn sink_config(brokers: &str, topic: &str, message_timeout: Duration) -> KafkaSinkConfig {
    KafkaSinkConfig {
        brokers: brokers.to_string(),
        topic: topic.to_string(),
        security_protocol: None,
        sasl_mechanism: None,
        sasl_username: None,
        sasl_password: None,
        ca_file: None,
        message_timeout,
        max_message_bytes: Some(DEFAULT_KAFKA_MAX_MESSAGE_BYTES),
    }
}

fn record(i: usize, pad: usize) -> OutRecord {
    // Pseudo-random padding so lz4 cannot shrink big batches to nothing.
    let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut padding = String::with_capacity(pad);
    while padding.len() < pad {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        padding.push_str(&format!("{x:016x}"));
    }
    padding.truncate(pad);
    OutRecord {
        key: format!("agent-{}.ws-1.databricks", i % 3),
        json: format!(
            r#"{{"path":"/serving-endpoints/e/invocations","i":"{i}","pad":"{padding}"}}"#
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_every_record_once_with_keys_and_order() {
    let Some(broker) = start_broker() else { return };
    let brokers = broker.brokers();
    let topic = "akto.api.logs";
    create_topic(&brokers, topic, 2).await;
    let sink = AnySink::Kafka(
        KafkaSink::new(sink_config(&brokers, topic, Duration::from_secs(20))).unwrap(),
    );
    assert_eq!(sink.name(), "kafka");
    assert_eq!(sink.describe(), format!("Kafka topic {topic} at {brokers}"));
    sink.healthcheck().await.expect("healthcheck");

    let records: Vec<OutRecord> = (0..300).map(|i| record(i, 200)).collect();
    for chunk in records.chunks(50) {
        let out = sink.deliver(chunk).await.expect("deliver");
        assert_eq!(out.delivered, (0..chunk.len()).collect::<Vec<_>>());
        assert!(out.rejected.is_empty());
    }
    sink.flush().await.unwrap();

    let got = consume_all(&brokers, topic, 2).await;
    // Every record exactly once, with its key.
    let mut want: Vec<(String, String)> = records
        .iter()
        .map(|r| (r.key.clone(), r.json.clone()))
        .collect();
    let mut have: Vec<(String, String)> =
        got.iter().map(|(_, k, v)| (k.clone(), v.clone())).collect();
    want.sort();
    have.sort();
    assert_eq!(have, want, "every record exactly once");
    // One key stays in one partition, in send order.
    let mut per_key: BTreeMap<String, (HashSet<i32>, Vec<String>)> = BTreeMap::new();
    for (p, k, v) in &got {
        let e = per_key.entry(k.clone()).or_default();
        e.0.insert(*p);
        e.1.push(v.clone());
    }
    for (k, (parts, values)) in per_key {
        assert_eq!(parts.len(), 1, "key {k} spread over partitions {parts:?}");
        let sent: Vec<String> = records
            .iter()
            .filter(|r| r.key == k)
            .map(|r| r.json.clone())
            .collect();
        assert_eq!(values, sent, "order of key {k}");
    }
    sink.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_record_is_rejected_and_the_rest_delivered() {
    let Some(broker) = start_broker() else { return };
    let brokers = broker.brokers();
    let topic = "big.records";
    create_topic(&brokers, topic, 1).await;
    let sink = KafkaSink::new(sink_config(&brokers, topic, Duration::from_secs(20))).unwrap();
    let mut batch: Vec<OutRecord> = (0..5).map(|i| record(i, 100)).collect();
    batch[2] = record(2, DEFAULT_KAFKA_MAX_MESSAGE_BYTES + 1);
    let out = sink.deliver(&batch).await.expect("deliver");
    assert_eq!(out.delivered, vec![0, 1, 3, 4]);
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].0, 2);
    assert!(
        out.rejected[0].1.contains("too large"),
        "{}",
        out.rejected[0].1
    );
    let got = consume_all(&brokers, topic, 1).await;
    let values: Vec<&str> = got.iter().map(|(_, _, v)| v.as_str()).collect();
    let want: Vec<&str> = [0, 1, 3, 4]
        .iter()
        .map(|&i| batch[i].json.as_str())
        .collect();
    assert_eq!(values, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_retriable_and_names_the_broker() {
    let Some(mut broker) = start_broker() else {
        return;
    };
    let brokers = broker.brokers();
    let topic = "akto.api.logs";
    create_topic(&brokers, topic, 1).await;
    let sink = KafkaSink::new(sink_config(&brokers, topic, Duration::from_secs(3))).unwrap();
    broker.kill();

    let err = sink
        .deliver(&[record(0, 10), record(1, 10)])
        .await
        .unwrap_err();
    assert!(err.is_retriable(), "{err}");
    assert!(err.delivered_before_failure().is_empty());
    let msg = err.to_string();
    assert!(msg.contains("No data appearing"), "{msg}");
    assert!(msg.contains(&brokers), "{msg}");
    assert!(msg.contains("KAFKA_BROKER_HOST"), "{msg}");
    // The timed-out delivery reports are explained by the client's connection error.
    assert!(msg.contains("last client error"), "{msg}");
    eprintln!("{msg}");

    let err = sink.healthcheck().await.unwrap_err();
    assert!(err.is_retriable(), "{err}");
    assert!(err.to_string().contains(&brokers), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_delivery_reports_only_acknowledged_records() {
    let Some(mut broker) = start_broker() else {
        return;
    };
    let brokers = broker.brokers();
    let topic = "akto.api.logs";
    create_topic(&brokers, topic, 1).await;
    let sink = KafkaSink::new(sink_config(&brokers, topic, Duration::from_secs(3))).unwrap();
    let records: Vec<OutRecord> = (0..20_000).map(|i| record(i, 1000)).collect();
    let n = records.len();

    let task = tokio::spawn(async move {
        let res = sink.deliver(&records).await;
        (sink, res)
    });
    // Kill the broker once it has stored something of this batch.
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress(&brokers, topic, 1) == 0 {
        assert!(Instant::now() < deadline, "nothing reached the broker");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker.kill();
    let (_sink, res) = task.await.unwrap();
    match res {
        Err(err) => {
            assert!(err.is_retriable(), "{err}");
            assert!(err.to_string().contains(&brokers), "{err}");
            let delivered = err.delivered_before_failure();
            eprintln!(
                "broker killed after {} of {n} records were acknowledged",
                delivered.len()
            );
            assert!(
                delivered.len() < n,
                "everything reported delivered after a kill"
            );
            // One partition, idempotent producer: acknowledgements form a prefix, no repeats.
            assert_eq!(
                delivered,
                (0..delivered.len()).collect::<Vec<_>>().as_slice()
            );
            assert!(err.rejected_before_failure().is_empty());
        }
        Ok(out) => {
            // The whole batch was acknowledged before the kill took effect: then it is complete.
            assert_eq!(out.delivered, (0..n).collect::<Vec<_>>());
            eprintln!("note: the batch completed before the broker was killed");
        }
    }
}

/// How many times each record of `sent` is stored (by its JSON).
fn copies(got: &[(i32, String, String)]) -> HashMap<&str, usize> {
    let mut n: HashMap<&str, usize> = HashMap::new();
    for (_, _, v) in got {
        *n.entry(v.as_str()).or_default() += 1;
    }
    n
}

/// `N` from the error's "; N of them may already be stored", else 0.
fn maybe_stored(msg: &str) -> usize {
    msg.find(" of them may already be stored")
        .and_then(|end| msg[..end].rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_broker_reports_as_delivered_only_what_the_broker_holds() {
    let Some(mut broker) = start_broker() else {
        return;
    };
    let brokers = broker.brokers();
    let topic = "akto.api.logs";
    create_topic(&brokers, topic, 1).await;
    // A short delivery time-out: the broker stays frozen past it.
    let sink = KafkaSink::new(sink_config(&brokers, topic, Duration::from_secs(3))).unwrap();
    // A first batch goes through.
    let first: Vec<OutRecord> = (0..10).map(|i| record(i, 50)).collect();
    assert_eq!(sink.deliver(&first).await.unwrap().delivered.len(), 10);
    let before = progress(&brokers, topic, 1);

    let records: Vec<OutRecord> = (10..10_010).map(|i| record(i, 1000)).collect();
    let n = records.len();
    let sent = records.clone();
    let task = tokio::spawn(async move {
        let res = sink.deliver(&records).await;
        (sink, res)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress(&brokers, topic, 1) <= before {
        assert!(
            Instant::now() < deadline,
            "nothing of the second batch reached the broker"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker.signal("STOP");
    let (sink, res) = task.await.unwrap();
    broker.signal("CONT");
    let (delivered, said_maybe_stored): (Vec<usize>, usize) = match &res {
        Err(err) => {
            assert!(err.is_retriable(), "{err}");
            eprintln!(
                "broker frozen after {} of {n} records were acknowledged: {err}",
                err.delivered_before_failure().len()
            );
            (
                err.delivered_before_failure().to_vec(),
                maybe_stored(&err.to_string()),
            )
        }
        Ok(out) => (out.delivered.clone(), 0),
    };
    if res.is_ok() {
        assert_eq!(delivered.len(), n);
    }

    // The next cycle: the rest goes out again and gets through. Before, the producer stayed
    // fenced after the time-out and refused every later record until a restart.
    let reported: HashSet<usize> = delivered.iter().copied().collect();
    let mut left: Vec<OutRecord> = (0..n)
        .filter(|i| !reported.contains(i))
        .map(|i| sent[i].clone())
        .collect();
    for attempt in 0..3 {
        if left.is_empty() {
            break;
        }
        match sink.deliver(&left).await {
            Ok(out) => {
                assert_eq!(out.delivered.len(), left.len());
                left.clear();
            }
            Err(err) => {
                eprintln!("re-send {attempt}: {err}");
                assert!(err.is_retriable(), "{err}");
                let done: HashSet<usize> = err.delivered_before_failure().iter().copied().collect();
                left = left
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| !done.contains(i))
                    .map(|(_, r)| r)
                    .collect();
            }
        }
    }
    assert!(
        left.is_empty(),
        "{} records still refused after the broker came back",
        left.len()
    );

    // (Read once, at the end: the helper reads up to the first end marker in the topic.)
    let got = consume_all(&brokers, topic, 1).await;
    let copies = copies(&got);
    for (i, r) in sent.iter().enumerate() {
        let c = copies.get(r.json.as_str()).copied().unwrap_or(0);
        // What the sink reported delivered is stored, and was not sent again.
        if reported.contains(&i) {
            assert_eq!(c, 1, "record {i} reported delivered: stored {c} times");
        } else {
            assert!(c >= 1, "record {i} missing after it was sent again");
        }
    }
    // Records stored although not reported delivered were sent again (duplicates): the error
    // said how many that may be, from librdkafka's message status.
    let twice = copies.values().filter(|c| **c > 1).count();
    eprintln!("stored twice: {twice}; the error warned of up to {said_maybe_stored}");
    assert!(
        twice <= said_maybe_stored,
        "{twice} records stored twice, the error warned of {said_maybe_stored}"
    );
    broker.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stall_shorter_than_the_delivery_timeout_leaves_no_duplicates() {
    let Some(broker) = start_broker() else {
        return;
    };
    let brokers = broker.brokers();
    let topic = "akto.api.logs";
    create_topic(&brokers, topic, 1).await;
    // Requests time out after a quarter of this (4 s); records only after all of it.
    let config = sink_config(&brokers, topic, Duration::from_secs(16));
    let stall = config.request_timeout() + Duration::from_secs(2);
    let sink = KafkaSink::new(config).unwrap();
    let first: Vec<OutRecord> = (0..10).map(|i| record(i, 50)).collect();
    assert_eq!(sink.deliver(&first).await.unwrap().delivered.len(), 10);
    let before = progress(&brokers, topic, 1);

    let records: Vec<OutRecord> = (10..5_010).map(|i| record(i, 1000)).collect();
    let sent = records.clone();
    let task = tokio::spawn(async move { sink.deliver(&records).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress(&brokers, topic, 1) <= before {
        assert!(
            Instant::now() < deadline,
            "nothing of the second batch reached the broker"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Frozen longer than a request may take (requests in flight time out and are sent again)
    // but shorter than a record may take: the producer rides it out.
    broker.signal("STOP");
    tokio::time::sleep(stall).await;
    broker.signal("CONT");
    let out = task
        .await
        .unwrap()
        .expect("a stall shorter than the delivery time-out is ridden out");
    assert_eq!(out.delivered, (0..sent.len()).collect::<Vec<_>>());

    let got = consume_all(&brokers, topic, 1).await;
    let copies = copies(&got);
    let twice: Vec<usize> = copies.values().copied().filter(|c| *c > 1).collect();
    assert!(
        twice.is_empty(),
        "{} records stored more than once after the stall",
        twice.len()
    );
    for r in first.iter().chain(&sent) {
        assert_eq!(copies.get(r.json.as_str()), Some(&1), "a record is missing");
    }
    assert_eq!(got.len(), first.len() + sent.len());
}

#[test]
fn config_errors_name_the_setting_and_hide_the_password() {
    let mut cfg = sink_config("", "akto.api.logs", Duration::from_secs(5));
    let e = KafkaSink::new(cfg.clone()).unwrap_err();
    assert!(e.to_string().contains("KAFKA_BROKER_HOST"), "{e}");
    cfg.brokers = "kafka".into();
    let e = KafkaSink::new(cfg.clone()).unwrap_err();
    assert!(e.to_string().contains("kafka:9092"), "{e}");
    cfg.brokers = "127.0.0.1:9".into();
    cfg.security_protocol = Some("sasl_plaintext".into());
    cfg.sasl_mechanism = Some("PLAIN".into());
    cfg.sasl_username = Some("user".into());
    cfg.sasl_password = Some("hunter2-secret".to_string().into());
    let sink = KafkaSink::new(cfg.clone()).unwrap();
    assert!(!format!("{sink:?}").contains("hunter2-secret"));
    assert!(!sink.describe().contains("hunter2-secret"));
    cfg.security_protocol = Some("carrier-pigeon".into());
    let e = KafkaSink::new(cfg).unwrap_err();
    assert!(e.to_string().contains("KAFKA_SECURITY_PROTOCOL"), "{e}");
    assert!(!e.to_string().contains("hunter2-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sasl_credentials_are_reported_as_such_never_as_a_network_problem() {
    // tansu with --authentication: clients must authenticate (SASL); no SCRAM user exists.
    let Some(broker) = start_broker_with(&["--authentication"]) else {
        return;
    };
    let brokers = broker.brokers();
    let password = "pw-do-not-print-4711";
    let mut c = sink_config(&brokers, "akto.api.logs", Duration::from_secs(3));
    c.security_protocol = Some("SASL_PLAINTEXT".into());
    c.sasl_mechanism = Some("SCRAM-SHA-256".into());
    c.sasl_username = Some("akto-connector".into());
    c.sasl_password = Some(password.to_string().into());
    let sink = KafkaSink::new(c).unwrap();

    let check = |err: &databricks_shield::sink::SinkError| {
        let msg = err.to_string();
        assert!(
            !err.is_retriable(),
            "credentials do not fix themselves: {msg}"
        );
        for fix in [
            "KAFKA_SASL_USERNAME",
            "KAFKA_SASL_PASSWORD",
            "KAFKA_SASL_MECHANISM",
        ] {
            assert!(msg.contains(fix), "{fix} missing: {msg}");
        }
        assert!(msg.contains("refused the authentication"), "{msg}");
        assert!(
            !msg.contains("KAFKA_BROKER_HOST"),
            "not a network problem: {msg}"
        );
        assert!(!msg.contains(password), "the password leaked: {msg}");
        eprintln!("{msg}");
    };
    // At start (the health check) and on a later delivery, after librdkafka stopped repeating
    // the error: both say what is wrong.
    check(&sink.healthcheck().await.unwrap_err());
    let err = sink.deliver(&[record(0, 10)]).await.unwrap_err();
    assert!(err.delivered_before_failure().is_empty());
    check(&err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sasl_plain_login_delivers_and_a_wrong_password_is_refused() {
    // The broker is reached only through a SASL_PLAINTEXT front (tests/common/sasl.rs): every
    // connection must log in with PLAIN before the broker answers anything but ApiVersions.
    let password = "pw-sasl-plain-0815";
    let Some((_broker, front)) = common::sasl::fronted_broker(password).await else {
        return;
    };
    let brokers = front.addr.to_string();
    let topic = "akto.api.logs";
    let login = common::sasl::login(password);
    create_topic_as(&brokers, topic, 2, &[], &login).await;

    // What the connector sets from KAFKA_SECURITY_PROTOCOL / KAFKA_SASL_*.
    let sasl = |password: &str, timeout: Duration| {
        let mut c = sink_config(&brokers, topic, timeout);
        c.security_protocol = Some("SASL_PLAINTEXT".into());
        c.sasl_mechanism = Some("PLAIN".into());
        c.sasl_username = Some("akto-connector".into());
        c.sasl_password = Some(password.to_string().into());
        c
    };
    let sink = KafkaSink::new(sasl(password, Duration::from_secs(20))).unwrap();
    sink.healthcheck().await.expect("logged in");
    let records: Vec<OutRecord> = (0..40).map(|i| record(i, 200)).collect();
    let outcome = sink.deliver(&records).await.expect("delivered");
    assert_eq!(outcome.delivered, (0..40).collect::<Vec<_>>());
    assert!(outcome.rejected.is_empty());
    let stored = consume_all_as(&brokers, topic, 2, &login).await;
    let mut got: Vec<&str> = stored.iter().map(|(_, _, v)| v.as_str()).collect();
    let mut want: Vec<&str> = records.iter().map(|r| r.json.as_str()).collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "every record stored once");
    let seen = front.seen();
    assert!(!seen.logins.is_empty());
    assert!(
        seen.logins
            .iter()
            .all(|(user, ok)| user == "akto-connector" && *ok),
        "{seen:?}"
    );
    assert!(seen.refused_before_login.is_empty(), "{seen:?}");
    drop(sink);

    // The wrong password: refused, said so with the settings to fix, never as a network problem.
    let wrong = "pw-wrong-do-not-print-42";
    let sink = KafkaSink::new(sasl(wrong, Duration::from_secs(3))).unwrap();
    let err = sink.healthcheck().await.unwrap_err();
    let msg = err.to_string();
    assert!(!err.is_retriable(), "{msg}");
    assert!(msg.contains("refused the authentication"), "{msg}");
    assert!(msg.contains("KAFKA_SASL_PASSWORD"), "{msg}");
    assert!(!msg.contains("KAFKA_BROKER_HOST"), "{msg}");
    assert!(!msg.contains(wrong) && !msg.contains(password), "{msg}");
    assert!(
        front
            .seen()
            .logins
            .iter()
            .any(|(user, ok)| user == "akto-connector" && !*ok),
        "the front saw the refused login"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_check_waits_for_a_broker_on_a_slow_link() {
    // About 300 ms per round trip, as to a remote managed broker: connecting and asking for
    // metadata takes several round trips, well within the time-out, and must pass.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = listener.local_addr().unwrap();
    let Some(broker) = start_broker_advertising(&[], Some(relay)) else {
        return;
    };
    let _link = slow_link(listener, broker.addr, Duration::from_millis(150));
    let brokers = relay.to_string();
    create_topic(&brokers, "akto.api.logs", 1).await;
    let sink = KafkaSink::new(sink_config(
        &brokers,
        "akto.api.logs",
        Duration::from_secs(20),
    ))
    .unwrap();
    sink.healthcheck()
        .await
        .expect("a broker on a slow link is reachable");
    let outcome = sink.deliver(&[record(0, 100)]).await.expect("delivered");
    assert_eq!(outcome.delivered, vec![0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_logins_deliver_and_a_wrong_scram_password_is_refused() {
    // SCRAM-SHA-256 and -512 against the front, which checks the client's proof (RFC 5802) and
    // sends the server signature librdkafka verifies in turn.
    let password = "pw-scram-4e5f";
    let Some((_broker, front)) = common::sasl::fronted_broker(password).await else {
        return;
    };
    let brokers = front.addr.to_string();
    let topic = "akto.api.logs";
    let login = common::sasl::login(password);
    create_topic_as(&brokers, topic, 1, &[], &login).await;
    let scram = |mechanism: &str, password: &str, timeout: Duration| {
        let mut c = sink_config(&brokers, topic, timeout);
        c.security_protocol = Some("SASL_PLAINTEXT".into());
        c.sasl_mechanism = Some(mechanism.into());
        c.sasl_username = Some(common::sasl::USER.into());
        c.sasl_password = Some(password.to_string().into());
        KafkaSink::new(c).unwrap()
    };
    for (i, mechanism) in ["SCRAM-SHA-256", "SCRAM-SHA-512"].into_iter().enumerate() {
        let sink = scram(mechanism, password, Duration::from_secs(20));
        sink.healthcheck()
            .await
            .unwrap_or_else(|e| panic!("{mechanism}: {e}"));
        let out = sink.deliver(&[record(i, 50)]).await.expect("delivered");
        assert_eq!(out.delivered, vec![0], "{mechanism}");
    }
    let before = front.seen().logins.len();
    assert!(before >= 2 && front.seen().logins.iter().all(|(_, ok)| *ok));

    let wrong = "pw-scram-wrong-77";
    let err = scram("SCRAM-SHA-256", wrong, Duration::from_secs(3))
        .healthcheck()
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(!err.is_retriable(), "{msg}");
    assert!(msg.contains("refused the authentication"), "{msg}");
    assert!(!msg.contains(wrong) && !msg.contains(password), "{msg}");
    assert!(front.seen().logins[before..].iter().any(|(_, ok)| !*ok));
    let stored = consume_all_as(&brokers, topic, 1, &login).await;
    assert_eq!(stored.len(), 2, "one record per mechanism");
}

/// Shutdown with records the broker never took: `flush_within` returns within its bound after
/// purging them (queued for a broker that is gone, or in flight to one that stopped answering),
/// and the runtime then shuts down without a thread of the producer holding it. Before, the
/// shutdown flush waited the whole delivery time-out (120 s by default) on the blocking pool,
/// which the runtime's drop then waited for: past the 300 s an orchestrator gives a process.
///
/// The whole shutdown runs on its own thread; a generous wait for it is the failure signal.
fn shutdown_with_undelivered_records(freeze: bool) {
    let Some(mut broker) = start_broker() else {
        return;
    };
    let brokers = broker.brokers();
    let topic = "akto.api.logs";
    let (tx, rx) = std::sync::mpsc::channel();
    let shutdown = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (sink, flushed) = rt.block_on(async {
            create_topic(&brokers, topic, 1).await;
            // The default delivery time-out: 120 s.
            let sink =
                AnySink::Kafka(KafkaSink::new(KafkaSinkConfig::new(&brokers, topic)).unwrap());
            sink.healthcheck().await.expect("healthcheck");
            let first: Vec<OutRecord> = (0..5).map(|i| record(i, 50)).collect();
            assert_eq!(sink.deliver(&first).await.unwrap().delivered.len(), 5);
            let before = progress(&brokers, topic, 1);
            let records: Vec<OutRecord> = (5..20_005).map(|i| record(i, 1000)).collect();
            let mut deliver = Box::pin(sink.deliver(&records));
            if freeze {
                // Frozen once part of the batch is stored: the rest is queued or in flight.
                tokio::select! {
                    res = &mut deliver => panic!("delivered before the freeze: {res:?}"),
                    _ = async {
                        while progress(&brokers, topic, 1) <= before {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    } => {}
                }
                broker.signal("STOP");
            } else {
                broker.kill();
                // The batch is queued for a broker that is gone.
                let res = tokio::time::timeout(Duration::from_millis(300), &mut deliver).await;
                assert!(
                    res.is_err(),
                    "a delivery to a stopped broker ended: {res:?}"
                );
            }
            // The run stage abandons the batch in flight at shutdown.
            drop(deliver);
            let flushed = sink.flush_within(Duration::from_millis(500)).await;
            (sink, flushed)
        });
        // Dropping the sink joins the producer's threads: off the runtime, as at exit.
        std::thread::spawn(move || drop(sink));
        drop(rt);
        let _ = tx.send(flushed.map_err(|e| e.to_string()));
        broker
    });
    let flushed = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the shutdown flush and the runtime's shutdown did not end");
    let broker = shutdown.join().unwrap();
    broker.signal("CONT");
    let msg = flushed.expect_err("records never delivered cannot flush");
    assert!(msg.contains("purged"), "{msg}");
    assert!(msg.contains("stay pending"), "{msg}");
    eprintln!("{msg}");
}

#[test]
fn flush_within_purges_records_queued_for_a_stopped_broker() {
    shutdown_with_undelivered_records(false);
}

#[test]
fn flush_within_purges_records_in_flight_to_a_frozen_broker() {
    shutdown_with_undelivered_records(true);
}
