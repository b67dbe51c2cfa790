//! Rows larger than one statement may return (a span with huge attributes, or any row once the
//! warehouse's byte limit is below it) are read with their payloads cut, marked as cut, and
//! delivered once: they never stop the table (before, every later row of the table was stuck
//! behind such a row, cycle after cycle).

mod common;

use common::*;

const MARKER: &str = "...[truncated by databricks-shield: original ";

/// Request and response payloads of the records received for `table`'s rows.
fn payloads(rig: &Rig) -> Vec<(String, String)> {
    rig.standin
        .records()
        .iter()
        .filter(|r| {
            r.get("path")
                .and_then(|p| p.as_str())
                .is_some_and(|p| p.ends_with("/invocations"))
        })
        .map(|r| {
            let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
            (s("requestPayload"), s("responsePayload"))
        })
        .collect()
}

fn assert_each_row_once(rig: &Rig) {
    let truth = rig.truth();
    let got = rig.received_executions();
    let missing: Vec<_> = truth.keys().filter(|id| !got.contains_key(*id)).collect();
    assert!(missing.is_empty(), "rows never delivered: {missing:?}");
    let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "rows delivered twice: {twice:?}");
}

/// Every row of the table is larger than the warehouse's byte limit (lowered by a fault): the
/// head read and the late pass read each row cut, the payloads carry the marker naming their
/// full size, and the next cycles send nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_larger_than_a_statement_are_read_cut_and_delivered_once() {
    let mut cfg = emulator_config();
    cfg.agents = 1;
    cfg.rows = 6;
    cfg.payload_bytes = 40_000;
    let rig = Rig::new(cfg).await;
    let table = rig.truth().into_values().next().expect("a table");
    rig.emulator
        .set_faults(&format!(
            "kind=byte_limit,bytes=12000,table={table},count=unlimited"
        ))
        .unwrap();

    let first = rig.cycle().await;
    assert!(first.ok(), "{:?}", first.errors);
    assert_each_row_once(&rig);
    let cut: Vec<_> = payloads(&rig)
        .into_iter()
        .filter(|(q, r)| q.contains(MARKER) || r.contains(MARKER))
        .collect();
    assert_eq!(cut.len(), 6, "every row was read cut");
    for (q, r) in &cut {
        for p in [q, r] {
            if let Some(at) = p.find(MARKER) {
                let full: usize = p[at + MARKER.len()..]
                    .trim_end_matches(" bytes]")
                    .parse()
                    .expect("the marker names the full size");
                assert!(
                    full > at,
                    "the full size {full} is larger than what was kept ({at})"
                );
                assert!(p.ends_with(" bytes]"), "the marker ends the payload");
            }
        }
    }
    assert!(first.truncated >= 6, "cut payloads are counted: {first:?}");

    // Late rows behind the cursor, each also too large: found, read cut, delivered once.
    rig.emulator.generate(0, 3);
    let late = rig.cycle().await;
    assert!(late.ok(), "{:?}", late.errors);
    assert_each_row_once(&rig);
    assert_eq!(rig.truth().len(), 9);

    // Nothing again.
    let before = rig.standin.records().len();
    let quiet = rig.cycle().await;
    assert!(quiet.ok(), "{:?}", quiet.errors);
    assert_eq!(rig.standin.records().len(), before);
    rig.emulator.set_faults("").unwrap();
}
