//! End to end over real sockets: emulated workspace -> connector -> strict Akto stand-in.
//! Ground truth comes from the emulator; "received" from the stand-in.

mod common;

use common::*;

fn assert_exactly_once(rig: &Rig) {
    let truth = rig.truth();
    let got = rig.received_executions();
    let missing: Vec<_> = truth.keys().filter(|id| !got.contains_key(*id)).collect();
    let dupes: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    let extra: Vec<_> = got.keys().filter(|id| !truth.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} executions never arrived, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    assert!(
        dupes.is_empty(),
        "duplicates: {:?}",
        &dupes[..dupes.len().min(3)]
    );
    assert!(
        extra.is_empty(),
        "records for rows that do not exist: {extra:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_execution_once_then_nothing_then_only_new_and_late_rows() {
    let rig = Rig::new(emulator_config()).await;
    let first = rig.cycle().await;
    assert!(first.ok(), "{:?}", first.errors);
    assert!(first.agents >= 4, "agents: {}", first.agents);
    assert_exactly_once(&rig);
    let after_first = rig.standin.records().len();
    assert!(first.records_sent as usize == after_first && after_first >= 200);
    assert!(first.summary_line().starts_with("Cycle completed in "));

    // A second run right after sends nothing.
    let second = rig.cycle().await;
    assert!(second.ok(), "{:?}", second.errors);
    assert_eq!(second.records_sent, 0);
    assert_eq!(rig.standin.records().len(), after_first);

    // 50 new rows: exactly those 50 executions.
    rig.emulator.generate(50, 0);
    let third = rig.cycle().await;
    assert!(third.ok(), "{:?}", third.errors);
    let new_execs = executions_in(&rig.standin.records()[after_first..]);
    assert_eq!(new_execs.len(), 50, "{new_execs:?}");
    assert_exactly_once(&rig);

    // Late rows (older request_time, visible only now) are found behind the cursor, once.
    let before_late = rig.standin.records().len();
    rig.emulator.generate(0, 12);
    let fourth = rig.cycle().await;
    assert!(fourth.ok(), "{:?}", fourth.errors);
    assert_eq!(
        executions_in(&rig.standin.records()[before_late..]).len(),
        12
    );
    assert_exactly_once(&rig);

    // And the steady state reads little: a cycle with nothing new returns few rows.
    let quiet = rig.cycle().await;
    assert_eq!(quiet.records_sent, 0);
    assert!(
        quiet.rows_read < 20,
        "a quiet cycle re-read {} rows",
        quiet.rows_read
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_down_holds_the_checkpoint_and_the_next_cycle_delivers_once() {
    let rig = Rig::new(emulator_config()).await;
    rig.standin.set_behavior(akto_standin::Behavior::FailNext {
        count: 1000,
        status: 503,
    });
    let failed = rig.cycle().await;
    assert!(
        !failed.ok(),
        "a cycle whose sink is down must report failure"
    );
    assert!(
        failed.errors.iter().any(|e| e.contains("delivery")),
        "{:?}",
        failed.errors
    );
    assert_eq!(rig.standin.records().len(), 0);
    rig.standin.set_behavior(akto_standin::Behavior::Normal);
    let ok = rig.cycle().await;
    assert!(ok.ok(), "{:?}", ok.errors);
    assert_exactly_once(&rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_satisfies_the_contract() {
    let rig = Rig::new(emulator_config()).await;
    let report = rig.cycle().await;
    assert!(report.ok(), "{:?}", report.errors);
    // The stand-in rejects anything Akto would reject, so acceptance is the contract check;
    // here the parts the stand-in cannot know: one collection per agent, tags naming it.
    let mut hosts = std::collections::BTreeSet::new();
    for r in rig.standin.records() {
        let host = header(&r, "requestHeaders", "host").unwrap();
        assert!(host.contains(".ai-agent.127.0.0.1"), "{host}");
        let tag: serde_json::Value = serde_json::from_str(r["tag"].as_str().unwrap()).unwrap();
        assert_eq!(tag["gen-ai"], "Gen AI");
        assert!(tag["ai-agent"].as_str().is_some_and(|a| !a.is_empty()));
        assert_eq!(r["source"], "MIRRORING");
        hosts.insert(host);
    }
    assert_eq!(
        hosts.len(),
        report.tables,
        "one Akto collection per agent table"
    );
    assert_eq!(rig.standin.rejected_batches(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_fails_some_batches_loses_nothing_across_restarts() {
    let rig = Rig::new(emulator_config()).await;
    // Every third batch fails: retried inside the sink or, when retries run out, the cycle stops
    // at the failed batch with only confirmed batches checkpointed; each cycle is a fresh
    // connector, as after a restart.
    rig.standin.set_behavior(akto_standin::Behavior::FailEvery {
        every: 3,
        status: 503,
    });
    let mut cycles = 0;
    loop {
        cycles += 1;
        assert!(cycles <= 40, "did not converge");
        if rig.cycle().await.ok() {
            break;
        }
    }
    assert!(
        rig.standin.rejected_batches() > 0,
        "the sink should have failed some batches"
    );
    rig.standin.set_behavior(akto_standin::Behavior::Normal);
    assert!(rig.cycle().await.ok());
    assert_exactly_once(&rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_sink_refuses_is_quarantined_and_the_rest_delivered() {
    let rig = Rig::new(emulator_config()).await;
    let truth = rig.truth();
    let poison = truth.keys().next().unwrap().clone();
    rig.standin
        .set_behavior(akto_standin::Behavior::Reject422Matching {
            needle: poison.clone(),
        });
    let report = rig.cycle().await;
    assert!(report.ok(), "{:?}", report.errors);
    assert!(report.quarantined >= 1, "{report:?}");
    let got = rig.received_executions();
    assert!(!got.contains_key(&poison));
    assert_eq!(got.len(), truth.len() - 1);
    let q = std::fs::read_to_string(rig.state_path().join("quarantine.jsonl")).unwrap();
    assert!(q.contains(&poison));
    // Quarantined counts as handled: the next cycle neither re-sends nor re-quarantines it.
    let again = rig.cycle().await;
    assert_eq!((again.records_sent, again.quarantined), (0, 0));
}
