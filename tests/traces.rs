//! MLflow traces and OTel span tables against the emulator: every LLM, TOOL and RETRIEVER span
//! once, on its agent's host, linked to its trace; nothing again on a second read once the
//! units were delivered; new traces are picked up; app agents are discovered with their traces.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use databricks_shield::collect::{Chunk, CollectOptions, Prepared};
use databricks_shield::discovery::{self, Inventory};
use databricks_shield::state::{DeliveredRow, StateStore};
use databricks_shield::traces::{self, TraceSource};
use tokio::sync::mpsc;

fn opts() -> CollectOptions {
    CollectOptions {
        lookback: std::time::Duration::from_secs(7200),
        ..Default::default()
    }
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Runs `f` with a channel and returns the chunks it sent.
async fn chunks_of<F, Fut, T>(f: F) -> (T, Vec<Chunk>)
where
    F: FnOnce(mpsc::Sender<Chunk>) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let (tx, mut rx) = mpsc::channel::<Chunk>(1024);
    let r = f(tx).await;
    let mut out = Vec::new();
    while let Ok(c) = rx.try_recv() {
        out.push(c);
    }
    (r, out)
}

fn deliver(state: &StateStore, chunks: &[Chunk]) {
    let rows: Vec<DeliveredRow<'_>> = chunks
        .iter()
        .flat_map(|c| {
            c.prepared.iter().map(|u| DeliveredRow {
                table: &c.table,
                id: &u.id,
                time_us: u.time_us,
                by_id: c.by_id,
            })
        })
        .collect();
    state.commit_delivered(&rows).unwrap();
}

fn header(rec: &databricks_shield::traffic::AktoRecord, key: &str) -> Option<String> {
    let m: BTreeMap<String, String> = serde_json::from_str(&rec.request_headers).ok()?;
    m.get(key).cloned()
}

async fn read_all(
    c: &databricks_shield::databricks::DatabricksClient,
    state: &StateStore,
    sources: &[TraceSource],
) -> Vec<Chunk> {
    let mut all = Vec::new();
    for s in sources {
        let (r, chunks) = chunks_of(|tx| async move {
            traces::collect_experiment(c, state, s, &opts(), "1000000", now_us(), &tx).await
        })
        .await;
        let stats = r.unwrap();
        assert_eq!(
            stats.executions as usize,
            chunks.iter().map(|c| c.prepared.len()).sum::<usize>()
        );
        all.extend(chunks);
    }
    all
}

fn units(chunks: &[Chunk]) -> Vec<(&str, &Prepared)> {
    chunks
        .iter()
        .flat_map(|c| c.prepared.iter().map(move |u| (c.table.as_str(), u)))
        .collect()
}

async fn discover(emu: &databricks_emulator::Emulator) -> Inventory {
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    discovery::discover(&c, "workspace", "default", "")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiment_traces_become_span_records_exactly_once() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let inv = discover(&emu).await;

    // Experiments found for endpoint agents (through their model's run) and the app agent.
    let with_exp: BTreeSet<&str> = inv
        .agents
        .iter()
        .filter(|a| a.experiment_id.is_some())
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(with_exp.len(), 4, "{with_exp:?}");
    let app = inv
        .agents
        .iter()
        .find(|a| a.app.is_some())
        .expect("the app agent is discovered");
    assert!(app.endpoint.is_none() && app.table.is_some() && app.experiment_id.is_some());
    let entry = app.app.as_ref().unwrap();
    assert_eq!(entry.state.as_deref(), Some("RUNNING"));
    assert!(entry.serving_endpoints.iter().any(|e| e.contains("llama")));
    assert!(!inv.agents.iter().any(|a| a.name == "ops-dashboard"));
    assert_eq!(
        inv.agents.len(),
        5,
        "apps matched to their tables add no agent"
    );

    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let sources = traces::trace_sources(&inv, "127.0.0.1");
    assert_eq!(sources.len(), 4);
    assert!(sources.iter().all(|s| s.execution_path.is_none()));

    let first = read_all(&c, &state, &sources).await;
    let got = units(&first);
    // 12 traces per experiment, each once.
    assert_eq!(got.len(), 4 * 12);
    let ids: BTreeSet<&str> = got.iter().map(|(_, u)| u.id.as_str()).collect();
    assert_eq!(ids.len(), got.len());
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (ns, u) in &got {
        let src = sources
            .iter()
            .find(|s| traces::experiment_namespace(&s.experiment_id) == *ns)
            .unwrap();
        assert_eq!(u.agent, src.agent);
        assert_eq!(u.host, src.host);
        assert!(!u.records.is_empty(), "every trace has an LLM span");
        for r in &u.records {
            databricks_shield::traffic::validate(r).unwrap();
            assert_eq!(header(r, "host").as_deref(), Some(src.host.as_str()));
            assert_eq!(
                header(r, "x-mlflow-trace-id").as_deref(),
                Some(u.id.as_str())
            );
            assert!(r.tag.contains("\"gen-ai\":\"Gen AI\""));
            assert!(r.tag.contains(&format!("\"ai-agent\":\"{}\"", src.agent)));
            let kind = header(r, "x-mlflow-span-type").unwrap();
            if kind == "TOOL" {
                assert!(r.path.starts_with("/tools/"));
                assert!(header(r, "x-tool-call-id").is_some_and(|id| id.starts_with("call_")));
            }
            *kinds.entry(kind).or_default() += 1;
        }
        // Exactly one LLM span per trace.
        assert_eq!(
            u.records
                .iter()
                .filter(|r| r.path.starts_with("/llm/"))
                .count(),
            1
        );
    }
    assert!(
        kinds.contains_key("CHAT_MODEL")
            && kinds.contains_key("TOOL")
            && kinds.contains_key("RETRIEVER"),
        "{kinds:?}"
    );
    assert!(
        !kinds.contains_key("AGENT"),
        "root spans are not records when a table exists"
    );
    // Failed traces carry their error.
    assert!(got
        .iter()
        .flat_map(|(_, u)| &u.records)
        .any(|r| r.status_code == "500" && r.response_payload.text().contains("timed out")));

    // Nothing again once delivered.
    deliver(&state, &first);
    let second = read_all(&c, &state, &sources).await;
    assert_eq!(units(&second).len(), 0);

    // New traces are read, and only they.
    emu.add_traces(2);
    let third = read_all(&c, &state, &sources).await;
    let new = units(&third);
    assert_eq!(new.len(), 4 * 2);
    assert!(new.iter().all(|(_, u)| !ids.contains(u.id.as_str())));
    // Not delivered: read again (at-least-once until confirmed), then never after delivery.
    let again = read_all(&c, &state, &sources).await;
    assert_eq!(units(&again).len(), 8);
    deliver(&state, &third);
    assert_eq!(units(&read_all(&c, &state, &sources).await).len(), 0);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_span_tables_are_read_through_sql_exactly_once() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let inv = discover(&emu).await;
    let table = inv
        .otel_span_tables
        .first()
        .expect("an OTel span table")
        .clone();
    let (wh, _) = c.choose_warehouse(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let read = || {
        let (c, inv, table, wh, state) = (&c, &inv, &table, &wh.id, &state);
        chunks_of(move |tx| async move {
            traces::collect_otel_table(
                c,
                state,
                wh,
                table,
                inv,
                "127.0.0.1",
                "1000000",
                &opts(),
                now_us(),
                &tx,
            )
            .await
        })
    };
    let (r, first) = read().await;
    r.unwrap();
    let got = units(&first);
    // The emulator writes one trace per agent (5), each a root AGENT span and a TOOL span.
    assert_eq!(got.len(), 5);
    let names: BTreeSet<&str> = inv.agents.iter().map(|a| a.name.as_str()).collect();
    for (ns, u) in &got {
        assert_eq!(*ns, table.as_str());
        assert!(
            names.contains(u.agent.as_str()),
            "attributed to an agent: {}",
            u.agent
        );
        assert_eq!(u.records.len(), 1);
        let r = &u.records[0];
        assert!(r.path.starts_with("/tools/"));
        assert_eq!(
            header(r, "x-mlflow-trace-id").as_deref(),
            Some(u.id.as_str())
        );
        assert_eq!(r.request_payload, "{\"query\":\"status\"}");
        databricks_shield::traffic::validate(r).unwrap();
    }
    deliver(&state, &first);
    let (r, second) = read().await;
    r.unwrap();
    assert_eq!(units(&second).len(), 0);
    emu.shutdown().await;
}
