//! One tool call, two descriptions: when an MLflow trace's TOOL span and an inference row's
//! response describe the same tool call (same call id, same agent), Akto receives it once, and
//! it is the trace's record (it has timing and errors). Whole cycles: emulator -> connector ->
//! strict Akto stand-in.

mod common;

use std::collections::BTreeMap;

use common::*;

/// Tool-call records received, by (host, call id).
fn tool_records(
    records: &[serde_json::Value],
) -> BTreeMap<(String, String), Vec<serde_json::Value>> {
    let mut out: BTreeMap<(String, String), Vec<serde_json::Value>> = BTreeMap::new();
    for r in records {
        if !r["path"].as_str().unwrap_or("").starts_with("/tools/") {
            continue;
        }
        let (Some(host), Some(id)) = (
            header(r, "requestHeaders", "host"),
            header(r, "requestHeaders", "x-tool-call-id"),
        ) else {
            continue;
        };
        out.entry((host, id)).or_default().push(r.clone());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_in_a_trace_and_an_inference_row_arrives_once_as_the_trace_record() {
    let rig = Rig::new(emulator_config()).await;
    let mirrored = rig.emulator.mirrored_tool_calls();
    assert!(
        mirrored.len() >= 4,
        "the emulator mirrors tool calls in traces: {mirrored:?}"
    );

    let first = rig.cycle().await;
    assert!(first.ok(), "{:?}", first.errors);
    let records = rig.standin.records();
    assert_eq!(first.records_sent as usize, records.len());
    let tools = tool_records(&records);

    // No tool call reaches Akto twice on one host, whatever its source.
    let twice: Vec<_> = tools
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, v)| (k, v.len()))
        .collect();
    assert!(twice.is_empty(), "tool calls sent twice: {twice:?}");

    let executions = executions_in(&records);
    for m in &mirrored {
        let found: Vec<_> = tools
            .iter()
            .filter(|((_, id), _)| id == &m.tool_call_id)
            .flat_map(|(_, v)| v)
            .collect();
        assert_eq!(found.len(), 1, "{m:?}");
        let r = found[0];
        // The trace's record: linked to the trace, with the span's timing.
        assert_eq!(
            header(r, "requestHeaders", "x-mlflow-trace-id").as_deref(),
            Some(m.trace_id.as_str()),
            "{m:?}: {r}"
        );
        assert_eq!(
            header(r, "requestHeaders", "x-mlflow-span-type").as_deref(),
            Some("TOOL")
        );
        assert!(header(r, "responseHeaders", "x-span-duration-ms").is_some());
        assert_eq!(header(r, "requestHeaders", "x-databricks-request-id"), None);
        assert_eq!(r["path"].as_str().unwrap(), format!("/tools/{}", m.tool));
        // The row's own execution record still arrives, once.
        assert_eq!(executions.get(&m.databricks_request_id), Some(&1), "{m:?}");
    }
    assert!(
        first.tool_calls_deduplicated >= mirrored.len() as u64,
        "{} deduplicated, {} mirrored",
        first.tool_calls_deduplicated,
        mirrored.len()
    );
    // Inference rows' other tool calls are still sent (their records carry the request id).
    assert!(tools.values().flatten().any(|r| header(
        r,
        "requestHeaders",
        "x-databricks-request-id"
    )
    .is_some()));

    // A second cycle sends nothing: neither the units nor the tool calls.
    let second = rig.cycle().await;
    assert!(second.ok(), "{:?}", second.errors);
    assert_eq!(second.records_sent, 0);
    assert_eq!(second.tool_calls_deduplicated, 0);
    assert_eq!(rig.standin.records().len(), records.len());
    rig.emulator.shutdown().await;
}
