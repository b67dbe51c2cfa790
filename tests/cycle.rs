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
    // Rows that failed (the emulator logs 400, 429, 500 and 503) reach Akto: as 200, the only
    // kind its runtime keeps, with the real code in `x-databricks-status-code`.
    let mut real_codes = std::collections::BTreeSet::new();
    for r in rig.standin.records() {
        assert_eq!(r["statusCode"], "200", "{}", r["path"]);
        assert_eq!(r["status"], "OK");
        if let Some(code) = header(&r, "responseHeaders", "x-databricks-status-code") {
            let row = r["path"].as_str().unwrap().ends_with("/invocations");
            if row && code.parse::<u16>().is_ok_and(|c| c >= 400) {
                // The row's error body, as logged.
                assert!(r["responsePayload"]
                    .as_str()
                    .unwrap()
                    .contains("error_code"));
            }
            real_codes.insert(code);
        }
    }
    let class = |c: &str| real_codes.iter().any(|r| r.starts_with(c) && r.len() == 3);
    assert!(class("4") && class("5"), "{real_codes:?}");
    assert_eq!(report.quarantined, 0, "nothing refused on the way out");
}

/// Every tool call an inference row made reaches Akto once as its own record, whatever the
/// response's form: whole, or streamed and logged as its chunks or events (about a quarter of
/// the rows: chat completion chunks with the arguments in fragments, ChatAgent deltas,
/// ResponsesAgent events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_call_of_every_row_arrives_once_streamed_or_not() {
    let rig = Rig::new(emulator_config()).await;
    let report = rig.cycle().await;
    assert!(report.ok(), "{:?}", report.errors);
    let truth = rig.emulator.row_tool_calls();
    let streamed = truth.iter().filter(|c| c.streamed).count();
    assert!(
        streamed >= 10 && streamed < truth.len(),
        "both forms are exercised: {streamed} of {}",
        truth.len()
    );
    // By call id (the emulator's are unique): a call a trace mirrors comes as the trace's
    // record, which names the trace, not the row.
    let mut got: std::collections::HashMap<String, Vec<serde_json::Value>> = Default::default();
    for r in rig.standin.records() {
        if let Some(id) = header(&r, "requestHeaders", "x-tool-call-id") {
            got.entry(id).or_default().push(r);
        }
    }
    // No call joined wrongly from stream fragments into a nameless one.
    let unknown = rig
        .standin
        .records()
        .into_iter()
        .filter(|r| r["path"] == "/tools/unknown")
        .count();
    assert_eq!(unknown, 0);
    for call in &truth {
        let records = got
            .get(&call.tool_call_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert_eq!(records.len(), 1, "{call:?}: {records:?}");
        let r = &records[0];
        let tag: serde_json::Value = serde_json::from_str(r["tag"].as_str().unwrap()).unwrap();
        assert_eq!(tag["tool"], call.tool.as_str(), "{call:?}");
        assert_eq!(r["requestPayload"], call.arguments.as_str(), "{call:?}");
    }
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

/// A cycle that fails part way (Akto answers 503 to one batch until the retries run out) still
/// reports what the sink confirmed before the failure: those records were sent and checkpointed,
/// and the summary, the metrics and the status page count them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_that_fails_after_confirmed_batches_reports_them_sent() {
    let rig = Rig::new(emulator_config()).await;
    let truth = rig.truth();
    let stuck = truth.keys().last().unwrap().clone();
    rig.standin
        .set_behavior(akto_standin::Behavior::RejectMatching {
            needle: stuck.clone(),
            status: 503,
        });
    let failed = rig.cycle().await;
    assert!(!failed.ok(), "the batch holding {stuck} failed");
    let stored = rig.standin.records().len() as u64;
    // The agent inventory records go first, so some batches were confirmed before the failure.
    assert!(stored > 0, "nothing was confirmed before the failure");
    assert_eq!(failed.records_sent, stored, "{:?}", failed.summary_line());
    assert_eq!(failed.per_agent.values().sum::<u64>(), stored);
    assert!(failed
        .summary_line()
        .contains(&format!("records_sent={stored} ")));

    // The next cycle sends the rest, and counts only those.
    rig.standin.set_behavior(akto_standin::Behavior::Normal);
    let next = rig.cycle().await;
    assert!(next.ok(), "{:?}", next.errors);
    assert_eq!(
        next.records_sent,
        rig.standin.records().len() as u64 - stored
    );
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

/// Planted sensitive values found in a text: `dapi` tokens, AWS key ids, Luhn-valid 16-digit
/// cards, e-mail addresses.
fn planted(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut found = Vec::new();
    for i in 0..b.len() {
        let rest = &text[i..];
        if rest.starts_with("dapi")
            && rest.len() >= 36
            && rest[4..36].bytes().all(|c| c.is_ascii_hexdigit())
        {
            found.push(rest[..36].to_string());
        }
        if rest.starts_with("AKIA")
            && rest.len() >= 20
            && rest[4..20]
                .bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        {
            found.push(rest[..20].to_string());
        }
        let starts_run = i == 0 || !b[i - 1].is_ascii_digit();
        if starts_run
            && rest.len() >= 16
            && rest[..16].bytes().all(|c| c.is_ascii_digit())
            && rest.as_bytes().get(16).is_none_or(|c| !c.is_ascii_digit())
        {
            let digits: Vec<u32> = rest[..16].bytes().map(|c| u32::from(c - b'0')).collect();
            let sum: u32 = digits
                .iter()
                .rev()
                .enumerate()
                .map(|(k, d)| {
                    if k % 2 == 1 {
                        let v = d * 2;
                        if v > 9 {
                            v - 9
                        } else {
                            v
                        }
                    } else {
                        *d
                    }
                })
                .sum();
            if sum.is_multiple_of(10) {
                found.push(rest[..16].to_string());
            }
        }
        if b[i] == b'@'
            && i > 0
            && b[i - 1].is_ascii_alphanumeric()
            && b.get(i + 1).is_some_and(|c| c.is_ascii_alphabetic())
        {
            found.push(format!("email at {i}"));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_masks_every_planted_value_and_keeps_json_valid() {
    // Without redaction the planted values reach Akto (so this test can fail)...
    let raw = Rig::new(emulator_config()).await;
    assert!(raw.cycle().await.ok());
    let leaked: usize = raw
        .standin
        .records()
        .iter()
        .map(|r| planted(&r.to_string()).len())
        .sum();
    assert!(
        leaked > 5,
        "the emulator should plant sensitive values ({leaked} found)"
    );

    // ...with redaction none does, and every JSON payload is still JSON.
    let rig = Rig::new(emulator_config()).await;
    let state = databricks_shield::state::StateStore::open(&rig.state_path(), false).unwrap();
    let mut s = settings(&rig.state_path());
    s.redactor = Some(databricks_shield::traffic::Redactor::new(
        &databricks_shield::traffic::RedactKind::ALL,
    ));
    let c = std::sync::Arc::new(databricks_shield::run::Connector::new(
        client(&rig.emulator.base_url(), "emulator-client", SECRET),
        http_sink(&rig.standin.url()),
        state,
        s,
    ));
    let (_t, shutdown) = databricks_shield::run::Shutdown::new();
    let report = c.run_cycle(&shutdown).await;
    assert!(report.ok(), "{:?}", report.errors);
    assert!(report.redacted.total() > 0);
    assert!(report.summary_line().contains("redacted="));
    let records = rig.standin.records();
    assert_eq!(records.len(), raw.standin.records().len());
    let key = |r: &serde_json::Value| {
        (
            r["path"].as_str().unwrap_or("").to_string(),
            header(r, "requestHeaders", "x-databricks-request-id"),
            header(r, "requestHeaders", "x-tool-call-id"),
        )
    };
    let originals: std::collections::HashMap<_, _> = raw
        .standin
        .records()
        .into_iter()
        .map(|r| (key(&r), r))
        .collect();
    for r in &records {
        let original = &originals[&key(r)];
        let hits = planted(&r.to_string());
        assert!(hits.is_empty(), "planted values left: {hits:?}");
        for field in ["requestPayload", "responsePayload"] {
            let was_json =
                serde_json::from_str::<serde_json::Value>(original[field].as_str().unwrap())
                    .is_ok();
            let is_json =
                serde_json::from_str::<serde_json::Value>(r[field].as_str().unwrap()).is_ok();
            assert!(!was_json || is_json, "{field} stopped being JSON");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_inventory_records_arrive_once_and_again_after_a_config_change() {
    let rig = Rig::new(emulator_config()).await;
    let first = rig.cycle().await;
    assert!(first.ok(), "{:?}", first.errors);
    let records = rig.standin.records();
    let inventory: Vec<_> = records.iter().filter(|r| r["method"] == "GET").collect();
    assert_eq!(
        inventory.len(),
        first.agents,
        "one inventory record per agent"
    );
    let inventory: Vec<_> = inventory
        .into_iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .unwrap_or("")
                .starts_with("/serving-endpoints/")
        })
        .collect();
    let spans = records
        .iter()
        .filter(|r| header(r, "requestHeaders", "x-mlflow-trace-id").is_some())
        .count();
    assert!(spans > 0, "MLflow trace spans are sent");

    let second = rig.cycle().await;
    assert!(second.ok(), "{:?}", second.errors);
    assert_eq!(second.records_sent, 0, "nothing is sent twice");

    let endpoint = inventory[0]["path"]
        .as_str()
        .unwrap()
        .trim_start_matches("/serving-endpoints/")
        .to_string();
    rig.emulator
        .set_endpoint_tag(&endpoint, "owner", "someone-else");
    let third = rig.cycle().await;
    assert!(third.ok(), "{:?}", third.errors);
    assert_eq!(
        third.records_sent, 1,
        "only the changed agent's inventory record"
    );
    let last = rig.standin.records().pop().unwrap();
    assert_eq!(
        last["path"].as_str().unwrap(),
        format!("/serving-endpoints/{endpoint}")
    );
    assert!(last["responsePayload"]
        .as_str()
        .unwrap()
        .contains("someone-else"));
}

/// Akto refuses every record (HTTP 422 to each, also sent alone): the records are quarantined
/// (not kept pending: a unit alone in its batch would otherwise stop its source for good), but
/// the cycle fails, with one error that names the refusal and the fix, so that the operator
/// looks (and `-once` exits 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_refusing_every_record_fails_the_cycle_with_them_quarantined() {
    let rig = Rig::new(databricks_emulator::EmulatorConfig {
        agents: 2,
        rows: 20,
        seed: 7,
        ..Default::default()
    })
    .await;
    rig.standin
        .set_behavior(akto_standin::Behavior::FailAll { status: 422 });
    let report = rig.cycle().await;
    assert!(
        !report.ok(),
        "a destination refusing everything fails the cycle"
    );
    assert!(!report.fatal, "{:?}", report.errors);
    let refused: Vec<&String> = report
        .errors
        .iter()
        .filter(|e| e.contains("refused every record"))
        .collect();
    assert_eq!(refused.len(), 1, "once per cycle: {:?}", report.errors);
    assert!(
        refused[0].contains("422") && refused[0].contains("quarantine.jsonl"),
        "{}",
        refused[0]
    );
    assert_eq!(report.records_sent, 0);
    assert!(report.quarantined > 0);
    let q = std::fs::read_to_string(rig.state_path().join("quarantine.jsonl")).unwrap();
    assert_eq!(q.lines().count() as u64, report.quarantined);
    for id in rig.truth().keys() {
        assert!(q.contains(id.as_str()), "{id} is not in quarantine");
    }

    // Settled: the next cycle sends nothing again and quarantines nothing twice.
    rig.standin.set_behavior(akto_standin::Behavior::Normal);
    let next = rig.cycle().await;
    assert!(next.ok(), "{:?}", next.errors);
    assert_eq!((next.records_sent, next.quarantined), (0, 0));
    assert!(rig.received_executions().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_read_before_that_unity_catalog_no_longer_lists_is_named() {
    use databricks_emulator::Privilege;
    let rig = Rig::new(emulator_config()).await;
    let first = rig.cycle().await;
    assert!(first.ok(), "{:?}", first.errors);
    assert!(
        first.vanished_tables.is_empty(),
        "{:?}",
        first.vanished_tables
    );
    let delivered = rig.standin.records().len();

    // SELECT revoked: Unity Catalog stops listing the table, its agent is no longer read, and
    // the report names it (the WARN says why and gives the GRANT).
    let table = rig.truth().into_values().max().unwrap();
    let select = || Privilege::Select {
        table: table.clone(),
    };
    rig.emulator.revoke("emulator-client", select());
    let second = rig.cycle().await;
    assert!(second.ok(), "{:?}", second.errors);
    assert_eq!(second.vanished_tables, vec![table.clone()]);
    assert_eq!(second.tables + 1, first.tables);
    // (The agent's inventory record may change: its table is gone from its description.)
    assert!(executions_in(&rig.standin.records()[delivered..]).is_empty());

    // Granted again: listed, read, nothing missing and nothing twice.
    rig.emulator.grant("emulator-client", select());
    rig.emulator.generate(20, 0);
    let third = rig.cycle().await;
    assert!(third.ok(), "{:?}", third.errors);
    assert!(
        third.vanished_tables.is_empty(),
        "{:?}",
        third.vanished_tables
    );
    assert_eq!(third.tables, first.tables);
    assert_exactly_once(&rig);
}
