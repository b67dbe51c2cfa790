//! Fuzz target: bytes -> a SQL result row (cells split on 0xFF, 0xFE = NULL, invalid UTF-8
//! replaced as the JSON decoder would) -> `collect::execution_from_row` -> `traffic::map_execution`
//! -> `validate` / `encode`; whatever `validate` passes must be accepted by the strict Akto
//! stand-in. The property test `tests/props_records.rs` runs the same path in CI.
#![no_main]

use databricks_shield::collect::{execution_from_row, RowColumns};
use databricks_shield::databricks::sql::{Cell, Row};
use databricks_shield::traffic::{
    agent_host, encode, for_akto_runtime, invocation_path, map_execution, validate, AgentContext,
    MapOptions, TableFormat,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let format = if selector & 1 == 0 {
        TableFormat::AiGateway
    } else {
        TableFormat::Legacy
    };
    let row: Row = rest
        .split(|b| *b == 0xFF)
        .map(|c| {
            if c == [0xFE] {
                Cell(None)
            } else {
                Cell(Some(databricks_shield::json::JsonString::encode(
                    &String::from_utf8_lossy(c),
                )))
            }
        })
        .collect();
    // Column positions chosen by the selector byte, so missing and shuffled columns occur.
    let n = row.len();
    let cols = RowColumns::locate(format, |name| {
        let h = name
            .bytes()
            .fold(selector as usize, |a, b| a.wrapping_mul(31) ^ b as usize);
        (h % 8 != 7 && n > 0).then(|| h % n)
    });
    let Ok((_, exec)) = execution_from_row("c.s.t", format, &cols, row) else {
        return;
    };
    let host = agent_host("fuzz_agent", "adb-1.azuredatabricks.net");
    let path = invocation_path(None, "c.s.t");
    let ctx = AgentContext {
        agent: "fuzz_agent",
        host: &host,
        path: &path,
        account_id: "1000000",
    };
    let max = if selector & 2 == 0 {
        64
    } else {
        databricks_shield::traffic::MAX_STRING_BYTES
    };
    let m = map_execution(
        &ctx,
        &exec,
        &MapOptions {
            tool_calls: true,
            max_string_bytes: max,
        },
    );
    assert!(!m.records.is_empty());
    for r in &m.records {
        // As the connector sends it.
        let r = for_akto_runtime(r);
        if validate(&r).is_ok() {
            let body = format!("{{\"batchData\":[{}]}}", encode(&r));
            assert!(akto_standin::check_batch(body.as_bytes()).is_ok());
        }
    }
});
