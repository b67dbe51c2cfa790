//! MLflow traces and OTel span tables against the emulator: every LLM, TOOL and RETRIEVER span
//! once, on its agent's host, linked to its trace; nothing again on a second read once the
//! units were delivered; new traces are picked up; app agents are discovered with their traces.
//!
//! And the faults that must not lose or repeat a trace: span-table results cut at the statement
//! byte limit, span data not uploaded yet (404) or refused (403), a trace logged while the search
//! is paged, and trace storage behind a TLS-inspecting proxy (DATABRICKS_CA_BUNDLE).
//!
//! Also the first windows of an inference table's reader (`collect::TableReader`, with the
//! cycle's clock set by the test): cycles that fail before a complete read neither slide the
//! first window nor narrow the late pass.

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

fn response_header(rec: &databricks_shield::traffic::AktoRecord, key: &str) -> Option<String> {
    let m: BTreeMap<String, String> = serde_json::from_str(&rec.response_headers).ok()?;
    m.get(key).cloned()
}

/// The trace reader of a test: account 1000000, unknown agents on 127.0.0.1.
fn reader<'a>(
    client: &'a databricks_shield::databricks::DatabricksClient,
    state: &'a StateStore,
    opts: &'a CollectOptions,
    now_us: i64,
) -> traces::TraceReader<'a> {
    traces::TraceReader {
        client,
        state,
        opts,
        account_id: "1000000",
        workspace_host: "127.0.0.1",
        now_us,
    }
}

async fn read_all(
    c: &databricks_shield::databricks::DatabricksClient,
    state: &StateStore,
    sources: &[TraceSource],
) -> Vec<Chunk> {
    let mut all = Vec::new();
    for s in sources {
        let (r, chunks) =
            chunks_of(
                |tx| async move { reader(c, state, &opts(), now_us()).experiment(s, &tx).await },
            )
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
            // As sent (`traffic::for_akto_runtime`, applied to every record on the way out).
            databricks_shield::traffic::validate(&databricks_shield::traffic::for_akto_runtime(r))
                .unwrap();
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
    // Failed traces carry their error: built as 500, sent as 200 with the code in a header
    // (Akto's runtime drops any other status).
    let failed = got
        .iter()
        .flat_map(|(_, u)| &u.records)
        .find(|r| r.status_code == "500" && r.response_payload.text().contains("timed out"))
        .expect("a failed span record");
    let sent = databricks_shield::traffic::for_akto_runtime(failed);
    assert_eq!(sent.status_code, "200");
    assert_eq!(
        response_header(&sent, "x-databricks-status-code").as_deref(),
        Some("500")
    );
    assert!(response_header(&sent, "x-span-error").is_some());

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

/// An emulator, a client, its inventory, the first OTel span table and the warehouse to read it.
async fn otel_table() -> (
    databricks_emulator::Emulator,
    databricks_shield::databricks::DatabricksClient,
    Inventory,
    String,
    databricks_shield::databricks::sql::Warehouse,
) {
    otel_table_of(emulator_config()).await
}

/// [`otel_table`] of an emulator configured as `cfg`.
async fn otel_table_of(
    cfg: databricks_emulator::EmulatorConfig,
) -> (
    databricks_emulator::Emulator,
    databricks_shield::databricks::DatabricksClient,
    Inventory,
    String,
    databricks_shield::databricks::sql::Warehouse,
) {
    let emu = emulator(cfg).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let inv = discover(&emu).await;
    let table = inv
        .otel_span_tables
        .first()
        .expect("an OTel span table")
        .clone();
    let (wh, _) = c.choose_warehouse(None).await.unwrap();
    (emu, c, inv, table, wh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_span_tables_are_read_through_sql_exactly_once() {
    let (emu, c, inv, table, wh) = otel_table().await;
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let read = || {
        let (c, inv, table, wh, state) = (&c, &inv, &table, &wh.id, &state);
        chunks_of(move |tx| async move {
            reader(c, state, &opts(), now_us())
                .otel_table(wh, table, inv, &tx)
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
        databricks_shield::traffic::validate(&databricks_shield::traffic::for_akto_runtime(r))
            .unwrap();
    }
    // A trace with two root spans (the emulator gives its oldest trace a second one, ending
    // 2.9 minutes ago, after every other root) is one unit, kept as long as its newest root is in
    // the window: its time is that root's end.
    let newest = got.iter().map(|(_, u)| u.time_us).max().unwrap();
    assert!(
        newest > now_us() - 200_000_000,
        "the two-root trace carries its newest root's end"
    );
    // Roots stored with a '' parent are roots too (the emulator writes every other one so), and
    // a struct `status` of STATUS_CODE_ERROR fails its span, with the status message as the body.
    let failed: Vec<_> = got
        .iter()
        .filter(|(_, u)| u.records[0].status_code == "500")
        .collect();
    assert_eq!(failed.len(), 1, "one tool span failed");
    let sent = databricks_shield::traffic::for_akto_runtime(&failed[0].1.records[0]);
    assert_eq!(sent.status_code, "200", "sent as Akto's runtime keeps it");
    assert_eq!(
        response_header(&sent, "x-databricks-status-code").as_deref(),
        Some("500")
    );
    assert!(failed[0].1.records[0]
        .response_payload
        .text()
        .contains("upstream timeout"));
    deliver(&state, &first);
    let (r, second) = read().await;
    r.unwrap();
    assert_eq!(units(&second).len(), 0);
    emu.shutdown().await;
}

async fn read_one(
    c: &databricks_shield::databricks::DatabricksClient,
    state: &StateStore,
    s: &TraceSource,
    o: &CollectOptions,
    now: i64,
) -> (
    Result<databricks_shield::collect::TableStats, databricks_shield::collect::CollectError>,
    Vec<Chunk>,
) {
    chunks_of(|tx| async move { reader(c, state, o, now).experiment(s, &tx).await }).await
}

async fn read_otel(
    c: &databricks_shield::databricks::DatabricksClient,
    state: &StateStore,
    wh: &str,
    table: &str,
    inv: &Inventory,
) -> (
    databricks_shield::collect::TableStats,
    Vec<(String, usize, String)>,
) {
    let (r, chunks) = chunks_of(|tx| async move {
        reader(c, state, &opts(), now_us())
            .otel_table(wh, table, inv, &tx)
            .await
    })
    .await;
    let stats = r.unwrap_or_else(|e| panic!("the span table is read: {e}"));
    let mut got: Vec<(String, usize, String)> = units(&chunks)
        .iter()
        .map(|(_, u)| {
            (
                u.id.clone(),
                u.records.len(),
                u.records
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {} {}",
                            r.path,
                            r.request_payload.text(),
                            r.response_payload.text()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("|"),
            )
        })
        .collect();
    got.sort();
    (stats, got)
}

/// A span-table read whose results are cut at the statement byte limit (`truncated`) reads the
/// same traces with the same spans as an uncut one: a cut `IN (...)` result is asked again in
/// halves, a trace larger than the limit is paged, a page of root spans cut short is continued.
/// Never a trace with its spans cut off (it would be committed with fewer or no records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_span_results_cut_at_the_byte_limit_lose_no_span() {
    let (emu, c, inv, table, wh) = otel_table().await;

    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let (plain, want) = read_otel(&c, &state, &wh.id, &table, &inv).await;
    assert_eq!(want.len(), 5);
    assert!(want.iter().all(|(_, n, _)| *n == 1), "{want:?}");
    // Whether the table has `events` comes from Unity Catalog's listing (discovery): no probe.
    assert_eq!(
        plain.statements, 2,
        "one root page, one span read: {}",
        plain.statements
    );

    // 1000 bytes: the roots (5 small rows) fit, the spans of 2+ traces do not.
    // 450 bytes: no trace's 2 spans fit either: each is paged.
    // 150 bytes for the first statement: the first page of roots is cut after 2 of 5 (the
    // oldest trace's second root span, the newest root, is then in another page: still one unit).
    for spec in [
        format!("kind=byte_limit,bytes=1000,table={table},count=unlimited"),
        format!("kind=byte_limit,bytes=450,table={table},count=unlimited"),
        format!(
            "kind=byte_limit,bytes=150,table={table},count=1;\
             kind=byte_limit,bytes=450,table={table},count=unlimited"
        ),
    ] {
        emu.set_faults(&spec).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::open(dir.path(), false).unwrap();
        let (stats, got) = read_otel(&c, &state, &wh.id, &table, &inv).await;
        assert_eq!(got, want, "{spec}: the same traces and spans");
        assert!(
            stats.statements > plain.statements + 2,
            "{spec}: the cut results were read again ({} statements)",
            stats.statements
        );
    }
    emu.set_faults("").unwrap();
    emu.shutdown().await;
}

/// A span larger than one statement may return (here every span, the warehouse's byte limit
/// lowered below them) is read with its attribute values cut: the same traces with the same
/// span records, each payload either whole or its start followed by the marker naming its full
/// size. Before, such a span stopped the table on every cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_spans_larger_than_a_statement_are_read_with_their_attributes_cut() {
    // One TOOL span returned a 3 KB document; the limit holds every other span alone.
    let mut cfg = emulator_config();
    cfg.otel_output_bytes = 3000;
    let (emu, c, inv, table, wh) = otel_table_of(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let (_, want) = read_otel(&c, &state, &wh.id, &table, &inv).await;
    assert_eq!(want.len(), 5);

    emu.set_faults(
        &format!("kind=byte_limit,bytes=BYTES,table={table},count=unlimited")
            .replace("BYTES", &SPAN_LIMIT.to_string()),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let (stats, got) = read_otel(&c, &state, &wh.id, &table, &inv).await;
    emu.set_faults("").unwrap();
    assert!(stats.payloads_cut > 0, "some attribute was cut: {stats:?}");
    assert_eq!(got.len(), want.len(), "{got:?}");
    const MARKER: &str = "...[truncated by databricks-shield: original ";
    let mut cut = 0;
    for ((id, n, records), (wid, wn, wrecords)) in got.iter().zip(&want) {
        assert_eq!((id, n), (wid, wn), "the same traces with as many records");
        for (r, w) in records.split('|').zip(wrecords.split('|')) {
            if r == w {
                continue;
            }
            let at = r
                .find(MARKER)
                .unwrap_or_else(|| panic!("{r} differs from {w} without a marker"));
            assert!(w.starts_with(&r[..at]), "{r} is a start of {w}");
            cut += 1;
        }
    }
    assert_eq!(
        cut, 1,
        "the large span's record carries a cut payload, no other"
    );
    emu.shutdown().await;
}

/// A byte limit below the large span, above every other span alone.
const SPAN_LIMIT: usize = 700;

/// A result cut at the byte limit is refused by `collect_all` (never taken for the whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_all_refuses_a_result_cut_at_the_byte_limit() {
    let (emu, c, _inv, table, wh) = otel_table().await;
    emu.set_faults(&format!(
        "kind=byte_limit,bytes=500,table={table},count=unlimited"
    ))
    .unwrap();
    let st = databricks_shield::databricks::sql::Statement {
        warehouse_id: wh.id.clone(),
        statement: format!("SELECT trace_id, span_id, attributes FROM {table}"),
        parameters: vec![],
        table: table.clone(),
        timeout: std::time::Duration::from_secs(20),
    };
    let rows = c.execute(&st).await.unwrap();
    assert!(rows.truncated);
    let e = rows
        .collect_all()
        .await
        .expect_err("a cut result is an error");
    assert!(e.to_string().contains("RESULT_TRUNCATED"), "{e}");
    assert!(!e.is_retriable());
    let (some, cut) = c
        .execute(&st)
        .await
        .unwrap()
        .collect_prefix()
        .await
        .unwrap();
    assert!(cut && !some.is_empty() && some.len() < 10, "{}", some.len());
    emu.set_faults("").unwrap();
    emu.shutdown().await;
}

/// An emulator, a client, the trace sources (the first is read) and a fresh state.
async fn first_experiment() -> (
    databricks_emulator::Emulator,
    databricks_shield::databricks::DatabricksClient,
    Vec<TraceSource>,
    tempfile::TempDir,
    StateStore,
) {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let inv = discover(&emu).await;
    let sources = traces::trace_sources(&inv, "127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    (emu, c, sources, dir, state)
}

/// Spans not uploaded yet (storage answers 404, a race with the trace's end) are not a reason to
/// commit the trace as a summary: it is left for the next cycle's late window, and read in full
/// once its spans are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_not_uploaded_yet_leave_the_trace_for_the_next_cycle() {
    let (emu, c, sources, _dir, state) = first_experiment().await;
    let src = &sources[0];

    for route in ["/_signed/traces/", "/api/2.0/mlflow/traces/"] {
        emu.set_faults(&format!("route={route},kind=404,count=unlimited"))
            .unwrap();
        let (r, chunks) = read_one(&c, &state, src, &opts(), now_us()).await;
        r.unwrap_or_else(|e| panic!("{route}: a 404 does not fail the source: {e}"));
        assert_eq!(
            units(&chunks).len(),
            0,
            "{route}: no trace committed while its spans may still come"
        );
        deliver(&state, &chunks);
    }

    emu.set_faults("").unwrap();
    let (r, chunks) = read_one(&c, &state, src, &opts(), now_us()).await;
    r.unwrap();
    let got = units(&chunks);
    assert_eq!(got.len(), 12, "every trace read once its spans are there");
    for (_, u) in &got {
        assert_eq!(
            u.records
                .iter()
                .filter(|r| r.path.starts_with("/llm/"))
                .count(),
            1,
            "{}: its spans, not a summary",
            u.id
        );
    }
    emu.shutdown().await;
}

/// A trace whose spans are still missing when it is about to leave the lookback window (this is
/// its last read) is sent as its summary, once; the others wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_missing_at_the_window_edge_send_the_summary() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let inv = discover(&emu).await;
    let sources = traces::trace_sources(&inv, "127.0.0.1");
    let mut src = sources[0].clone();
    src.execution_path = Some("/agents/edge/invocations".into());
    let now = now_us();

    // The traces' times, from a read with its own state (a first read pins where reading
    // begins; the read under test has its own, shorter lookback).
    let probe = tempfile::tempdir().unwrap();
    let probe = StateStore::open(probe.path(), false).unwrap();
    let (r, chunks) = read_one(&c, &probe, &src, &opts(), now).await;
    r.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let mut times: Vec<(i64, String)> = units(&chunks)
        .iter()
        .map(|(_, u)| (u.time_us, u.id.clone()))
        .collect();
    times.sort();
    assert_eq!(times.len(), 12);
    // The second oldest trace is 1 s inside the window; the next one minutes later.
    let (edge_t, edge_id) = times[1].clone();
    let edge = CollectOptions {
        lookback: std::time::Duration::from_micros((now - edge_t + 1_000_000) as u64),
        ..Default::default()
    };

    emu.set_faults("route=/_signed/traces/,kind=404,count=unlimited")
        .unwrap();
    let (r, chunks) = read_one(&c, &state, &src, &edge, now).await;
    r.unwrap();
    let got = units(&chunks);
    assert_eq!(got.len(), 1, "only the trace at the window's edge");
    let u = got[0].1;
    assert_eq!(u.id, edge_id);
    assert_eq!(u.records.len(), 1, "its summary");
    assert_eq!(u.records[0].path, "/agents/edge/invocations");
    assert!(!u.records[0].request_payload.text().is_empty());
    emu.set_faults("").unwrap();
    emu.shutdown().await;
}

/// Span data refused (403: no CAN READ on the experiment, or storage refusing the signed URL)
/// fails the experiment's source with the fix; no summary is committed instead of the spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_data_refused_fails_the_source_naming_the_fix() {
    let (emu, c, sources, _dir, state) = first_experiment().await;
    let src = &sources[0];

    for (route, fix) in [
        ("/api/2.0/mlflow/traces/", "CAN READ"),
        ("/_signed/traces/", "artifact storage"),
    ] {
        emu.set_faults(&format!("route={route},kind=403,count=unlimited"))
            .unwrap();
        let (r, chunks) = read_one(&c, &state, src, &opts(), now_us()).await;
        let e = r
            .err()
            .unwrap_or_else(|| panic!("{route}: a 403 fails the source"));
        let msg = e.to_string();
        assert!(msg.contains("Access denied"), "{route}: {msg}");
        assert!(msg.contains(fix), "{route}: {msg}");
        assert!(msg.contains(&src.experiment_id), "{route}: {msg}");
        assert!(!msg.contains("X-Amz-Signature"), "{route}: {msg}");
        assert_eq!(units(&chunks).len(), 0, "{route}: nothing committed");
    }
    emu.set_faults("").unwrap();
    emu.shutdown().await;
}

/// The trace search pages by offset: a trace logged while it pages (an older start, exported
/// when it ended) shifts the results, and the last trace of page 1 comes again on page 2. It is
/// sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_logged_while_paging_sends_no_trace_twice() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let inv = discover(&emu).await;
    let sources = traces::trace_sources(&inv, "127.0.0.1");
    let src = &sources[0];
    // 112 traces: two pages of the search.
    emu.add_traces(100);
    let at_ms = chrono::Utc::now().timestamp_millis() - 90 * 60_000;
    emu.set_faults(&format!(
        "route=/api/3.0/mlflow/traces/search,kind=insert_trace,at_ms={at_ms},after=1"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let (r, chunks) = read_one(&c, &state, src, &opts(), now_us()).await;
    let stats = r.unwrap();
    assert_eq!(
        emu.stats()["faults_fired"],
        1,
        "the trace was logged between the pages"
    );
    let got = units(&chunks);
    let ids: BTreeSet<&str> = got.iter().map(|(_, u)| u.id.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "no trace twice in one cycle");
    assert_eq!(got.len(), 112);
    assert!(stats.duplicates_skipped >= 1);
    emu.shutdown().await;
}

/// Behind a TLS-inspecting proxy the span downloads from cloud storage trust the same
/// DATABRICKS_CA_BUNDLE as the API calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_downloads_trust_the_ca_bundle() {
    use std::sync::atomic::Ordering;
    let emu = emulator(emulator_config()).await;
    let inv = discover(&emu).await;
    let sources = traces::trace_sources(&inv, "127.0.0.1");
    let front = common::tls::tls_front(&emu.base_url()).await;
    emu.set_storage_url(Some(&front.url));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &front.ca_pem).unwrap();
    let c = databricks_shield::databricks::DatabricksClient::with_ca_bundle(
        &url::Url::parse(&emu.base_url()).unwrap(),
        databricks_shield::databricks::Credentials::OAuth {
            client_id: "emulator-client".into(),
            client_secret: SECRET.to_string().into(),
        },
        fast_retry(),
        Some(&ca),
    )
    .unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let (r, chunks) = read_one(&c, &state, &sources[0], &opts(), now_us()).await;
    r.unwrap_or_else(|e| panic!("spans downloaded through the TLS proxy: {e}"));
    let got = units(&chunks);
    assert_eq!(got.len(), 12);
    assert!(got
        .iter()
        .all(|(_, u)| u.records.iter().any(|r| r.path.starts_with("/llm/"))));
    assert!(
        front.handshakes.load(Ordering::SeqCst) > 0,
        "storage was reached through TLS"
    );
    emu.shutdown().await;
}

/// One cycle of a fresh connector on `state_dir` with a lookback of 2 s (what a long agent run
/// outlives), delivering to `standin`.
async fn short_lookback_cycle(
    emu: &databricks_emulator::Emulator,
    standin: &akto_standin::StandIn,
    state_dir: &std::path::Path,
) {
    use databricks_shield::run::{Connector, Shutdown};
    let mut s = settings(state_dir);
    s.collect.lookback = std::time::Duration::from_secs(2);
    let c = std::sync::Arc::new(Connector::new(
        client(&emu.base_url(), "emulator-client", SECRET),
        http_sink(&standin.url()),
        StateStore::open(state_dir, false).unwrap(),
        s,
    ));
    let (_t, shutdown) = Shutdown::new();
    let r = c.run_cycle(&shutdown).await;
    assert!(r.ok(), "{:?}", r.errors);
}

/// Trace ids of the experiment records `standin` received from index `from` on.
fn experiment_traces_from(standin: &akto_standin::StandIn, from: usize) -> BTreeSet<String> {
    standin.records()[from..]
        .iter()
        .filter(|r| {
            common::header(r, "requestHeaders", "x-mlflow-location")
                .is_some_and(|l| l.starts_with("mlflow:"))
        })
        .filter_map(|r| common::header(r, "requestHeaders", "x-mlflow-trace-id"))
        .collect()
}

/// An agent run that outlives the lookback: its trace is `IN_PROGRESS` over several cycles and
/// ends after its start has left the window a read mark at the last cycle would give. The trace
/// still holds its experiment's window open, so it is sent when it has ended, once. When its
/// spans are not uploaded yet at the first read after its end (404), it is waited for (a
/// lookback after its end, not its start): its spans are sent, not a summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_that_ends_after_the_lookback_is_still_sent_once() {
    for late_upload in [false, true] {
        let emu = emulator(emulator_config()).await;
        let standin = standin().await;
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let cycle = || short_lookback_cycle(&emu, &standin, &state_dir);
        let traces_from = |from: usize| experiment_traces_from(&standin, from);

        // One finished trace per experiment (the cursor) and one long run still going.
        let start_ms = chrono::Utc::now().timestamp_millis() - 500;
        emu.add_traces(1);
        let running = emu.start_trace(start_ms);
        cycle().await;
        let experiments = traces_from(0).len();
        assert!(experiments >= 1, "no experiment trace delivered");
        // Later cycles while it runs: its start falls out of (now - lookback).
        std::thread::sleep(std::time::Duration::from_millis(2_600));
        let before = standin.records().len();
        cycle().await;
        assert!(
            traces_from(before).is_empty(),
            "an unfinished trace was sent"
        );

        emu.finish_trace(running);
        if late_upload {
            // Its spans are not in storage yet at the next read.
            emu.set_faults("route=/_signed/traces/,kind=404,count=unlimited")
                .unwrap();
            let before = standin.records().len();
            cycle().await;
            assert!(
                traces_from(before).is_empty(),
                "late_upload: sent without its spans"
            );
            emu.set_faults("").unwrap();
        }
        let before = standin.records().len();
        cycle().await;
        let ended = traces_from(before);
        assert_eq!(
            ended.len(),
            experiments,
            "late_upload={late_upload}: the long run's trace, once per experiment"
        );
        let before = standin.records().len();
        cycle().await;
        assert!(traces_from(before).is_empty(), "sent again");
    }
}

/// An MLflow 3 client logs a trace only when its root span ends, already final, with its start
/// as `request_time` (`start_trace` and `finish_trace` back to back: never seen IN_PROGRESS). A
/// run longer than the lookback is then found by the long-run search, sent once, and not again
/// by later cycles of fresh connectors on the same state (a restart each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlflow_3_trace_of_a_run_longer_than_the_lookback_is_sent_once() {
    let emu = emulator(emulator_config()).await;
    let standin = standin().await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let cycle = || short_lookback_cycle(&emu, &standin, &state_dir);
    let traces_from = |from: usize| experiment_traces_from(&standin, from);

    emu.add_traces(1);
    cycle().await;
    let experiments = traces_from(0).len();
    assert!(experiments >= 1, "no experiment trace delivered");

    // A run that started a minute ago (the lookback is 2 s) and was logged when it ended.
    let start_ms = chrono::Utc::now().timestamp_millis() - 60_000;
    let run = emu.start_trace(start_ms);
    emu.finish_trace(run);
    let before = standin.records().len();
    cycle().await;
    let ended = traces_from(before);
    assert_eq!(
        ended.len(),
        experiments,
        "the long run's trace, once per experiment"
    );
    for _ in 0..2 {
        let before = standin.records().len();
        cycle().await;
        assert!(traces_from(before).is_empty(), "sent again");
    }
}

/// A complete read at `now` as `run` records it: the read mark (held back by an unfinished
/// trace) and ids pruned a lookback and 10 minutes behind it.
fn complete_read(
    state: &StateStore,
    ns: &str,
    o: &CollectOptions,
    now: i64,
    stats: &databricks_shield::collect::TableStats,
) {
    let lookback = o.lookback.as_micros() as i64;
    let mark = stats
        .hold_from
        .map_or(now, |h| now.min(h + lookback - 60_000_000));
    state
        .record_complete_read(ns, mark, lookback + 600_000_000)
        .unwrap();
}

/// Long runs and the two searches of an experiment, with the cycle's clock set by the test: a
/// run logged when it ended, hours after its start, is read once by the long-run search; a run
/// read by the main search while its start was in the window is not read again by the long-run
/// search once its start has left it, nor after its id would have been pruned by its start; a
/// long run delivered by a version that kept every trace by its start is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_runs_are_read_once_by_either_search() {
    let (emu, c, sources, _dir, state) = first_experiment().await;
    let src = &sources[0];
    let ns = traces::experiment_namespace(&src.experiment_id);
    let o = CollectOptions {
        lookback: std::time::Duration::from_secs(600),
        ..Default::default()
    };
    let now0 = now_us();
    // Run A: 3 hours, logged when it ended. Run B: 8 minutes (longer than half the lookback),
    // its start in the window of the first read.
    let a = emu.start_trace((now0 - 3 * 3_600_000_000).div_euclid(1000));
    let b = emu.start_trace((now0 - 8 * MIN).div_euclid(1000));
    emu.finish_trace(a);
    emu.finish_trace(b);
    let read = |now: i64| {
        let (c, state, src, o) = (&c, &state, src, &o);
        async move {
            let (r, chunks) = read_one(c, state, src, o, now).await;
            let stats = r.unwrap();
            deliver(state, &chunks);
            complete_read(
                state,
                &traces::experiment_namespace(&src.experiment_id),
                o,
                now,
                &stats,
            );
            let got: Vec<(String, i64)> = units(&chunks)
                .iter()
                .map(|(_, u)| (u.id.clone(), u.time_us))
                .collect();
            (stats, got)
        }
    };
    let (_, first) = read(now0).await;
    // Keyed by their ends (about now0), not their starts.
    let long: Vec<&(String, i64)> = first
        .iter()
        .filter(|(_, t)| *t > now0 - 60_000_000)
        .collect();
    assert_eq!(long.len(), 2, "both runs read once: {first:?}");
    let ids: BTreeSet<String> = long.iter().map(|(id, _)| id.clone()).collect();
    // Later reads: B's start leaves the main search's window (the long-run search finds it and
    // A, both delivered), then both ends leave the window and their ids are pruned.
    for minutes in [1, 9, 12, 30, 31, 40] {
        let (stats, got) = read(now0 + minutes * MIN).await;
        assert!(got.is_empty(), "+{minutes} min: sent again: {got:?}");
        if minutes == 12 {
            assert!(stats.duplicates_skipped >= 2, "+{minutes} min: {stats:?}");
        }
    }

    // A version that kept every trace by its start delivered the long runs (ids not pruned
    // yet): they are looked up under their starts too, and not sent again.
    let page = c
        .search_traces(
            &src.experiment_id,
            "trace.execution_time_ms > 300000",
            100,
            None,
        )
        .await
        .unwrap();
    let starts: Vec<(String, i64)> = page
        .traces
        .iter()
        .map(|t| (t.trace_id.clone(), t.time_us().unwrap()))
        .collect();
    assert_eq!(
        starts
            .iter()
            .map(|(id, _)| id.clone())
            .collect::<BTreeSet<_>>(),
        ids,
        "the emulator's search filters on the execution time"
    );
    let dir = tempfile::tempdir().unwrap();
    let old = StateStore::open(dir.path(), false).unwrap();
    let rows: Vec<DeliveredRow<'_>> = starts
        .iter()
        .map(|(id, t)| DeliveredRow {
            table: &ns,
            id,
            time_us: *t,
            by_id: false,
        })
        .collect();
    old.commit_delivered(&rows).unwrap();
    let (r, chunks) = read_one(&c, &old, src, &o, now0).await;
    r.unwrap();
    let again: Vec<&str> = units(&chunks)
        .iter()
        .map(|(_, u)| u.id.as_str())
        .filter(|id| ids.contains(*id))
        .collect();
    assert!(again.is_empty(), "sent again after an upgrade: {again:?}");
    emu.shutdown().await;
}

/// A span document larger than the cap is not read (nor held): `TooLarge` with its length; one
/// within it comes back with its spans and its length (what the reader counts, not a second
/// serialization).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_documents_over_the_cap_are_not_read() {
    use databricks_shield::databricks::mlflow::SpanDownload;
    let (emu, c, sources, _dir, _state) = first_experiment().await;
    let page = c
        .search_traces(&sources[0].experiment_id, "", 1, None)
        .await
        .unwrap();
    let id = &page.traces[0].trace_id;
    let dl = c.trace_download(id).await.unwrap();
    let (spans, bytes) = match c.download_spans(id, &dl).await.unwrap() {
        SpanDownload::Spans { spans, bytes } => (spans, bytes),
        other => panic!("a small document is read: {other:?}"),
    };
    assert!(spans.len() >= 2 && bytes > 100, "{bytes}");
    match c.download_spans_capped(id, &dl, bytes - 1).await.unwrap() {
        SpanDownload::TooLarge { bytes: b, .. } => assert!(b >= bytes - 1, "{b}"),
        other => panic!("over the cap: {other:?}"),
    }
    match c.download_spans_capped(id, &dl, bytes).await.unwrap() {
        SpanDownload::Spans { bytes: b, .. } => assert_eq!(b, bytes),
        other => panic!("at the cap: {other:?}"),
    }
    emu.shutdown().await;
}

/// How long after its anchor the emulator's OTel scenario traces land (its
/// `OTEL_SCENARIO_OFFSET_US`): `tr-long-run` (3 hours, root row at +2 s) and `tr-late-child`
/// (root row at +1 s, its failed TOOL span exported after it, at +4 s).
const OTEL_SCENARIO_OFFSET_US: i64 = 30 * 86_400_000_000;

/// Waits (bounded) until the span `span_id` of `table` is visible, as a writer's row lands.
async fn wait_landed(
    c: &databricks_shield::databricks::DatabricksClient,
    wh: &str,
    table: &str,
    span_id: &str,
) {
    for _ in 0..200 {
        let st = databricks_shield::databricks::sql::Statement {
            warehouse_id: wh.to_string(),
            statement: format!("SELECT span_id FROM {table} WHERE span_id = :s"),
            parameters: vec![databricks_shield::databricks::sql::Param::new(
                "s", span_id, "STRING",
            )],
            table: table.to_string(),
            timeout: std::time::Duration::from_secs(20),
        };
        let rows = c.execute(&st).await.unwrap().collect_all().await.unwrap();
        if !rows.is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("span {span_id} never landed");
}

/// OTel span tables: a trace is read once its root row has landed and settled (ended 2 minutes
/// before the read): a span exported after its root is not lost. A long run's root lands hours
/// after its start, beyond the lookback: roots are listed by their end, so it is read, once,
/// also by later reads after its id would have been pruned by its start. A failed tool span's
/// `exception` event (the `events` column) is its error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_traces_are_read_once_their_root_has_landed_and_settled() {
    let mut cfg = emulator_config();
    let at = now_us();
    cfg.anchor_us = Some(at - OTEL_SCENARIO_OFFSET_US);
    let (emu, c, inv, table, wh) = otel_table_of(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let o = CollectOptions {
        lookback: std::time::Duration::from_secs(600),
        ..Default::default()
    };
    let read = |now: i64| {
        let (c, state, inv, table, wh, o) = (&c, &state, &inv, &table, &wh.id, &o);
        async move {
            let (r, chunks) = chunks_of(|tx| async move {
                reader(c, state, o, now)
                    .otel_table(wh, table, inv, &tx)
                    .await
            })
            .await;
            let stats = r.unwrap_or_else(|e| panic!("the span table is read: {e}"));
            deliver(state, &chunks);
            complete_read(state, table, o, now, &stats);
            let got: BTreeMap<String, Vec<databricks_shield::traffic::AktoRecord>> = units(&chunks)
                .iter()
                .map(|(_, u)| (u.id.clone(), u.records.clone()))
                .collect();
            (stats, got)
        }
    };

    // The late child's root has landed; its TOOL span has not, or just has: a read now (by the
    // connector's clock, the root ended under 2 minutes ago) takes nothing and holds the window.
    wait_landed(&c, &wh.id, &table, "late-root").await;
    let (stats, got) = read(now_us()).await;
    assert!(got.is_empty(), "read before its root settled: {got:?}");
    assert!(
        stats.hold_from.is_some(),
        "the unsettled trace holds the window"
    );

    // Both roots and the late TOOL span have landed; 3 minutes later by the connector's clock.
    wait_landed(&c, &wh.id, &table, "late-tool").await;
    wait_landed(&c, &wh.id, &table, "long-root").await;
    let (_, got) = read(at + 3 * MIN).await;
    let ids: BTreeSet<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        BTreeSet::from(["tr-late-child", "tr-long-run"]),
        "both traces, once"
    );
    let late = &got["tr-late-child"];
    assert_eq!(
        late.len(),
        1,
        "the TOOL span exported after its root: {late:?}"
    );
    assert_eq!(late[0].status_code, "500");
    let body = late[0].response_payload.text();
    assert!(
        body.contains("ValueError") && body.contains("order 42 not found"),
        "the exception event is the error: {body}"
    );
    assert_eq!(got["tr-long-run"].len(), 1, "the long run's TOOL span");

    // Later reads (a restart reads the same state): never again, also once ids are pruned.
    for minutes in [4, 9, 15, 25, 40, 41] {
        let (_, got) = read(at + minutes * MIN).await;
        assert!(got.is_empty(), "+{minutes} min: sent again: {got:?}");
    }
    emu.shutdown().await;
}

/// The emulator, a client, its first inference table, a warehouse and a fresh state: for the
/// reader tests below, which set the cycle's clock themselves.
struct TableRig {
    emu: databricks_emulator::Emulator,
    c: databricks_shield::databricks::DatabricksClient,
    table: databricks_shield::discovery::InferenceTable,
    warehouse: String,
    state: StateStore,
    _dir: tempfile::TempDir,
}

const MIN: i64 = 60_000_000;

impl TableRig {
    async fn new() -> TableRig {
        let emu = emulator(emulator_config()).await;
        let c = client(&emu.base_url(), "emulator-client", SECRET);
        let inv = discover(&emu).await;
        let (_, table) = inv.readable().next().expect("an inference table");
        let (wh, _) = c.choose_warehouse(None).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        TableRig {
            table: table.clone(),
            state: StateStore::open(dir.path(), false).unwrap(),
            warehouse: wh.id,
            emu,
            c,
            _dir: dir,
        }
    }

    /// The rows (id -> time) one reader of the table emits at the cycle time `now`, with a
    /// 30-minute lookback (the emulator's rows span the past hour, so rows lie on both sides of
    /// every window start), on `state`.
    async fn read_on(&self, state: &StateStore, now: i64) -> BTreeMap<String, i64> {
        let o = CollectOptions {
            lookback: std::time::Duration::from_secs(1800),
            ..Default::default()
        };
        let (r, chunks) = chunks_of(|tx| async move {
            databricks_shield::collect::TableReader {
                client: &self.c,
                state,
                warehouse_id: &self.warehouse,
                table: &self.table,
                opts: &o,
                now_us: now,
            }
            .collect(&tx)
            .await
        })
        .await;
        r.unwrap_or_else(|e| panic!("the table is read: {e}"));
        chunks
            .iter()
            .flat_map(|c| c.executions.iter())
            .map(|e| (e.request_id.clone(), e.request_time.timestamp_micros()))
            .collect()
    }

    async fn read(&self, now: i64) -> BTreeMap<String, i64> {
        self.read_on(&self.state, now).await
    }

    /// Commits `rows` as delivered, on `state`.
    fn deliver_on<'a>(
        &self,
        state: &StateStore,
        rows: impl Iterator<Item = (&'a String, &'a i64)>,
    ) {
        let rows: Vec<DeliveredRow<'_>> = rows
            .map(|(id, t)| DeliveredRow {
                table: &self.table.full_name,
                id,
                time_us: *t,
                by_id: false,
            })
            .collect();
        state.commit_delivered(&rows).unwrap();
    }

    /// The table's rows in the emulator (id -> time).
    fn truth(&self) -> BTreeMap<String, i64> {
        self.emu
            .ground_truth()
            .into_iter()
            .filter(|r| r.table == self.table.full_name)
            .map(|r| {
                let t = databricks_shield::collect::parse_timestamp(&r.request_time).unwrap();
                (r.databricks_request_id, t)
            })
            .collect()
    }
}

/// Nothing delivered yet (Akto unreachable at the first deploy, say): the next cycle, ten
/// minutes later, starts where the first one did, not a lookback before its own time, so the
/// rows of those ten minutes are not skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycles_that_deliver_nothing_do_not_slide_the_first_window() {
    let rig = TableRig::new().await;
    let t0 = now_us();
    let first = rig.read(t0).await;
    assert!(
        first.values().any(|t| *t < t0 - 20 * MIN),
        "rows in the first window's first ten minutes"
    );
    // Not delivered. Ten minutes later:
    let second = rig.read(t0 + 10 * MIN).await;
    assert_eq!(
        second.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>()
    );
    rig.emu.shutdown().await;
}

/// The first cycle delivered its newest rows (stamped after the cycle started) and failed
/// before its read completed: the next cycle has a cursor but no complete read. Its late pass
/// reaches back to where reading began, so the older rows not delivered yet are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_cycle_that_delivered_only_its_newest_rows_loses_none_of_the_others() {
    let rig = TableRig::new().await;
    // The cycle started five minutes ago: rows of the last five minutes are after its start.
    let t0 = now_us() - 5 * MIN;
    let first = rig.read(t0).await;
    assert!(
        first.values().any(|t| *t > t0),
        "rows stamped after the cycle's start"
    );
    assert!(
        first.values().any(|t| *t < t0 - 25 * MIN),
        "rows in the first window's first five minutes"
    );
    rig.deliver_on(&rig.state, first.iter().filter(|(_, t)| **t > t0));
    // The next cycle, ten minutes after the first started: everything else of the first
    // window, the rows in its first five minutes included (a lookback before the cursor would
    // start after them).
    let second = rig.read(t0 + 10 * MIN).await;
    let want: Vec<&String> = first
        .iter()
        .filter(|(_, t)| **t <= t0)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(second.keys().collect::<Vec<_>>(), want);
    rig.emu.shutdown().await;
}

/// A clock that ran an hour ahead, then was set right. The cycle on the fast clock keeps the
/// delivered ids behind the newest delivered row (source time), so the corrected clock's late
/// pass neither sends them again nor misses rows that land late. Ids pruned by the fast clock
/// anyway (as a plain prune does) are guarded: no read reaches below them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_set_back_neither_re_sends_nor_skips_late_rows() {
    let rig = TableRig::new().await;
    let now = now_us();
    let first = rig.read(now).await;
    assert!(!first.is_empty());
    rig.deliver_on(&rig.state, first.iter());
    // What a cycle at `now + 60 min` (the fast clock) records: its read, and the ids kept a
    // lookback and 10 minutes back.
    let fast = now + 60 * MIN;
    let name = &rig.table.full_name;
    rig.state
        .record_complete_read(name, fast, 40 * MIN)
        .unwrap();
    // The same state with every id pruned by the fast clock.
    let dir = tempfile::tempdir().unwrap();
    let pruned = StateStore::open(dir.path(), false).unwrap();
    rig.deliver_on(&pruned, first.iter());
    pruned.set_read_mark(name, fast).unwrap();
    pruned.prune(name, fast - 40 * MIN).unwrap();
    // The clock is right again: nothing is sent twice, from either state.
    for state in [&rig.state, &pruned] {
        let again = rig.read_on(state, now + MIN).await;
        assert!(again.is_empty(), "{} rows sent again", again.len());
    }
    // Rows landing late, inside the lookback of the right clock, are still read: the fast
    // clock's cycle moved no bound past them.
    let before = rig.truth();
    rig.emu.generate(0, 100);
    let at = now + 2 * MIN;
    let want: Vec<String> = rig
        .truth()
        .into_iter()
        .filter(|(id, t)| !before.contains_key(id) && *t >= at - 30 * MIN)
        .map(|(id, _)| id)
        .collect();
    assert!(!want.is_empty(), "late rows inside the lookback");
    let late = rig.read(at).await;
    assert_eq!(late.into_keys().collect::<Vec<_>>(), want);
    rig.emu.shutdown().await;
}

/// The rows of a SQL statement on `table` (the test's own look at the emulator's data).
async fn sql_rows(
    c: &databricks_shield::databricks::DatabricksClient,
    wh: &str,
    table: &str,
    sql: String,
    params: Vec<databricks_shield::databricks::sql::Param>,
) -> Vec<Vec<String>> {
    let st = databricks_shield::databricks::sql::Statement {
        warehouse_id: wh.to_string(),
        statement: sql,
        parameters: params,
        table: table.to_string(),
        timeout: std::time::Duration::from_secs(20),
    };
    c.execute(&st)
        .await
        .unwrap()
        .collect_all()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            r.iter()
                .map(|cell| cell.text().map(|t| t.into_owned()).unwrap_or_default())
                .collect()
        })
        .collect()
}

/// A span too large for one statement because of its `events` column, its attributes small: a
/// streamed generation, which MLflow records chunk by chunk as span events. The cut read with
/// events is still too large (cutting attributes does not help), so the span is read without
/// them: its record is sent once, the same as an uncut read's (its events hold no
/// `exception`), no attribute cut, and the table does not fail.
///
/// Catches: removing the `is_row_too_large` fallback of `fetch_trace_spans` (the cut read with
/// events answers ROW_TOO_LARGE, the table fails on every cycle and the read here panics), or a
/// fallback that drops the span instead of reading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_spans_too_large_by_their_events_are_read_without_them() {
    let (emu, c, inv, table, wh) = otel_table().await;
    let id = emu
        .add_streamed_otel_trace(20 * SPAN_LIMIT, now_us() - 5 * MIN)
        .unwrap();
    // Its events alone are over the lowered limit; its attributes far under it.
    let rows = sql_rows(
        &c,
        &wh.id,
        &table,
        format!("SELECT attributes, events FROM {table} WHERE trace_id = :t AND parent_span_id IS NOT NULL"),
        vec![databricks_shield::databricks::sql::Param::new(
            "t", id.as_str(), "STRING",
        )],
    )
    .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0][0].len() < SPAN_LIMIT / 2, "{}", rows[0][0]);
    assert!(rows[0][1].len() > 10 * SPAN_LIMIT, "{}", rows[0][1].len());

    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let (_, want) = read_otel(&c, &state, &wh.id, &table, &inv).await;
    assert_eq!(want.len(), 6, "{want:?}");
    let streamed = want
        .iter()
        .find(|(t, _, _)| *t == id)
        .expect("the streamed generation's trace");
    assert_eq!(streamed.1, 1, "its CHAT_MODEL span: {streamed:?}");
    assert!(streamed.2.starts_with("/llm/"), "{streamed:?}");

    emu.set_faults(&format!(
        "kind=byte_limit,bytes={SPAN_LIMIT},table={table},count=unlimited"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let (stats, got) = read_otel(&c, &state, &wh.id, &table, &inv).await;
    emu.set_faults("").unwrap();
    assert_eq!(
        got, want,
        "every trace once, the streamed generation's record as an uncut read's"
    );
    assert_eq!(stats.payloads_cut, 0, "no attribute was cut: {stats:?}");
    emu.shutdown().await;
}

/// One read of an OTel span table at `now` (the connector's clock), delivered and recorded as
/// `run` records a complete read: the stats and the units by trace id.
async fn read_otel_at(
    c: &databricks_shield::databricks::DatabricksClient,
    state: &StateStore,
    wh: &str,
    table: &str,
    inv: &Inventory,
    now: i64,
) -> (
    databricks_shield::collect::TableStats,
    BTreeMap<String, Prepared>,
) {
    let o = opts();
    let (r, chunks) = chunks_of(|tx| async move {
        reader(c, state, &opts(), now)
            .otel_table(wh, table, inv, &tx)
            .await
    })
    .await;
    let stats = r.unwrap_or_else(|e| panic!("the span table is read: {e}"));
    deliver(state, &chunks);
    complete_read(state, table, &o, now, &stats);
    let mut got = BTreeMap::new();
    for (_, u) in units(&chunks) {
        assert!(
            got.insert(u.id.clone(), u.clone()).is_none(),
            "{} twice in one read",
            u.id
        );
    }
    (stats, got)
}

/// OTel: a trace with two root spans, the first ended long ago, the second 90 s before the read
/// (under the 2 minutes a root settles in: its children may still be landing). The trace is not
/// sent by that read, which holds the window back to the second root's end; a later read, both
/// roots settled, sends it once, with all its spans, keyed by its newest root's end.
///
/// Catches: removing the `newest_root > settled_before` hold of
/// `TraceReader::otel_table_into` (the trace would be sent by the first read, from its settled
/// first root, before the second root's children have landed), or holding it without `hold`
/// (the read mark would move past it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_otel_trace_waits_until_its_newest_root_has_settled() {
    const SETTLE_US: i64 = 120_000_000;
    let (emu, c, inv, table, wh) = otel_table().await;
    // The roots' ends (µs) by trace, from the table: the emulator gives one trace two roots.
    let mut roots: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in sql_rows(
        &c,
        &wh.id,
        &table,
        format!(
            "SELECT trace_id, end_time_unix_nano FROM {table} \
             WHERE parent_span_id IS NULL OR parent_span_id = ''"
        ),
        Vec::new(),
    )
    .await
    {
        let end: i64 = r[1].parse().unwrap();
        roots
            .entry(r[0].clone())
            .or_default()
            .push(end.div_euclid(1000));
    }
    let (id, ends) = roots
        .iter()
        .find(|(_, e)| e.len() == 2)
        .map(|(id, e)| (id.clone(), e.clone()))
        .expect("a trace with two root spans");
    let (first, second) = (*ends.iter().min().unwrap(), *ends.iter().max().unwrap());
    // The read's clock: the second root ended 90 s before; the first root, and every other
    // trace's root, settled before.
    let at = second + 90_000_000;
    assert!(first <= at - SETTLE_US - 60_000_000, "{ends:?}");
    let others: BTreeSet<String> = roots.keys().filter(|t| **t != id).cloned().collect();
    assert!(roots
        .iter()
        .filter(|(t, _)| others.contains(*t))
        .all(|(_, e)| e.iter().all(|end| *end <= at - SETTLE_US)));

    let dir = tempfile::tempdir().unwrap();
    let state = StateStore::open(dir.path(), false).unwrap();
    let (stats, got) = read_otel_at(&c, &state, &wh.id, &table, &inv, at).await;
    assert!(
        !got.contains_key(&id),
        "sent before its second root settled"
    );
    assert_eq!(
        got.keys().cloned().collect::<BTreeSet<_>>(),
        others,
        "the settled traces are sent"
    );
    assert_eq!(
        stats.hold_from,
        Some(second),
        "the window is held back to the unsettled root's end"
    );

    // Both roots settled (the connector's clock at the real time, minutes later).
    let (_, got) = read_otel_at(&c, &state, &wh.id, &table, &inv, now_us()).await;
    assert_eq!(
        got.keys().map(String::as_str).collect::<Vec<_>>(),
        [id.as_str()],
        "the held trace, once"
    );
    let u = &got[&id];
    assert_eq!(u.time_us, second, "keyed by its newest root's end");
    assert_eq!(u.records.len(), 1, "its TOOL span");
    for _ in 0..2 {
        let (_, got) = read_otel_at(&c, &state, &wh.id, &table, &inv, now_us()).await;
        assert!(got.is_empty(), "sent again: {:?}", got.keys());
    }
    emu.shutdown().await;
}

/// Log lines written by a `tracing_subscriber` under test.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Cloud storage answering without a Content-Length (chunked transfer encoding): the span
/// document is counted while it is read and dropped past the cap (`TooLarge`, not exact); one
/// within the cap comes back whole, the same spans and length as with a Content-Length. A
/// document over the 64 MiB read per trace sends the trace's summary, with a WARN.
///
/// Catches: a read of a body without Content-Length that ignores the cap (`read_capped`), which
/// would hold any document in memory and send its spans here; an emulator answer that kept its
/// Content-Length (then `exact` would be true).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_documents_without_a_content_length_are_capped_while_read() {
    use databricks_shield::databricks::mlflow::{SpanDownload, MAX_SPAN_DOCUMENT_BYTES};
    use tracing::instrument::WithSubscriber;
    let (emu, c, sources, _dir, state) = first_experiment().await;
    let mut src = sources[0].clone();
    src.execution_path = Some("/agents/streamed/invocations".into());
    let page = c
        .search_traces(&src.experiment_id, "", 1, None)
        .await
        .unwrap();
    let info = &page.traces[0];
    let id = info.trace_id.clone();
    let dl = c.trace_download(&id).await.unwrap();
    let (spans, bytes) = match c.download_spans(&id, &dl).await.unwrap() {
        SpanDownload::Spans { spans, bytes } => (spans, bytes),
        other => panic!("a small document is read: {other:?}"),
    };
    assert!(spans.len() >= 2 && bytes > 100, "{bytes}");

    emu.stream_span_document(&id, 0);
    match c.download_spans_capped(&id, &dl, bytes).await.unwrap() {
        SpanDownload::Spans { spans: s, bytes: b } => {
            assert_eq!((s, b), (spans, bytes), "the same document, read to its end")
        }
        other => panic!("at the cap: {other:?}"),
    }
    for cap in [bytes - 1, 10] {
        match c.download_spans_capped(&id, &dl, cap).await.unwrap() {
            SpanDownload::TooLarge { bytes: b, exact } => {
                assert!(!exact, "no Content-Length: the length is not known");
                assert_eq!(b, cap, "what was read before the cap was passed");
            }
            other => panic!("over the cap {cap}: {other:?}"),
        }
    }

    // Over the 64 MiB read per trace: its summary (the search's previews), with a WARN.
    emu.stream_span_document(&id, MAX_SPAN_DOCUMENT_BYTES as usize + (1 << 20));
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let (r, chunks) = read_one(&c, &state, &src, &opts(), now_us())
        .with_subscriber(subscriber)
        .await;
    r.unwrap();
    let got = units(&chunks);
    assert_eq!(got.len(), 12, "every trace once");
    for (_, u) in &got {
        if u.id == id {
            assert_eq!(u.records.len(), 1, "its summary: {:?}", u.records);
            assert_eq!(u.records[0].path, "/agents/streamed/invocations");
            assert_eq!(
                u.records[0].request_payload.text(),
                info.request_preview.clone().unwrap_or_default()
            );
        } else {
            assert!(
                u.records.iter().any(|r| r.path.starts_with("/llm/")),
                "{}: its spans",
                u.id
            );
        }
    }
    let logs = logs.text();
    let warn = logs
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("a WARN names the trace: {logs}"));
    assert!(
        warn.contains("WARN") && warn.contains("not read") && warn.contains("over 64 MiB"),
        "{warn}"
    );
    emu.shutdown().await;
}
