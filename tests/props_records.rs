//! Property tests of the whole row -> record path as the connector runs it: a SQL result row as the
//! warehouse returns it (cells NULL, malformed, huge, invalid UTF-8 already replaced, extra
//! columns, columns in any order) -> `collect::execution_from_row` -> `traffic::map_execution` ->
//! `validate` / `encode` -> a batch body checked by the independent strict Akto stand-in.
//!
//! The property: nothing panics; a row is either keyed (id and time usable) or handed back for
//! quarantine with a reason; every record of a keyed row either satisfies Akto's contract (the
//! stand-in accepts the batch) or is refused by `validate` (quarantined and counted).
//! `src/traffic/tests.rs` covers the mapping of arbitrary `Execution`s; this file covers what the
//! collector builds them from. `fuzz/` runs the same path with cargo-fuzz for longer.

use databricks_shield::collect::{
    execution_from_row, format_timestamp, parse_timestamp, RowColumns,
};
use databricks_shield::databricks::sql::{Cell, Row};
use databricks_shield::json::JsonString;
use databricks_shield::traffic::{
    agent_host, encode, for_akto_runtime, invocation_path, map_execution, validate, AgentContext,
    MapOptions, TableFormat,
};
use proptest::prelude::*;
use serde_json::{json, Value};

const AI_COLUMNS: [&str; 10] = [
    "databricks_request_id",
    "client_request_id",
    "request_time",
    "status_code",
    "execution_duration_ms",
    "request",
    "response",
    "logging_error_codes",
    "served_entity_id",
    "requester",
];
const LEGACY_COLUMNS: [&str; 8] = [
    "databricks_request_id",
    "client_request_id",
    "timestamp_ms",
    "status_code",
    "execution_time_ms",
    "request",
    "response",
    "request_metadata",
];

/// Any text a warehouse may hand back: plain, control characters, U+FFFD from invalid UTF-8,
/// long runs.
fn arb_text() -> BoxedStrategy<String> {
    prop_oneof![
        any::<String>(),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        "[\\x00-\\x1f\"\\\\{}\\[\\]]{0,16}",
        (any::<char>(), 0usize..20_000).prop_map(|(c, n)| c.to_string().repeat(n)),
    ]
    .boxed()
}

fn arb_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        arb_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(8, 64, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((arb_text(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Payloads in the shapes agents log (chat completions, ChatAgent, ResponsesAgent) with arbitrary
/// values in every slot, plus arbitrary JSON, non-JSON text, truncated JSON and deep nesting.
fn arb_payload() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        Just(None),
        arb_text().prop_map(Some),
        arb_json().prop_map(|v| Some(v.to_string())),
        (arb_json(), arb_json(), arb_text()).prop_map(|(args, content, name)| Some(
            json!({"choices": [{"message": {"role": "assistant", "content": content,
                "tool_calls": [{"id": name, "type": "function",
                    "function": {"name": name, "arguments": args}}]}}]})
            .to_string()
        )),
        (arb_json(), arb_text(), arb_json()).prop_map(|(args, id, out)| Some(
            json!({"messages": [
                {"role": "assistant", "content": "", "tool_calls": [{"id": id, "type": "function",
                    "function": {"name": id, "arguments": args}}]},
                {"role": "tool", "tool_call_id": id, "content": out}]})
            .to_string()
        )),
        (arb_json(), arb_text(), arb_json()).prop_map(|(args, id, out)| Some(
            json!({"output": [
                {"type": "function_call", "call_id": id, "name": id, "arguments": args},
                {"type": "function_call_output", "call_id": id, "output": out}]})
            .to_string()
        )),
        (1usize..3000).prop_map(|n| Some(format!("{}1{}", "[".repeat(n), "]".repeat(n)))),
        arb_json().prop_map(|v| {
            let s = v.to_string();
            let cut = (0..=s.len() / 2)
                .rev()
                .find(|i| s.is_char_boundary(*i))
                .unwrap_or(0);
            Some(s[..cut].to_string())
        }),
    ]
    .boxed()
}

fn arb_time(legacy: bool) -> BoxedStrategy<Option<String>> {
    let valid = (0i64..4_102_444_800_000_000).prop_map(move |us| {
        if legacy {
            (us / 1000).to_string()
        } else {
            format_timestamp(us)
        }
    });
    prop_oneof![
        4 => valid.prop_map(Some),
        1 => Just(None),
        1 => arb_text().prop_map(Some),
        1 => any::<i64>().prop_map(|n| Some(n.to_string())),
        1 => Just(Some("2026-02-30T25:61:00Z".to_string())),
    ]
    .boxed()
}

fn arb_number() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        Just(None),
        any::<i64>().prop_map(|n| Some(n.to_string())),
        arb_text().prop_map(Some),
        Just(Some("1e400".to_string())),
    ]
    .boxed()
}

/// A result row: the schema's columns (each NULL or any text), extra unknown columns, in a
/// shuffled order; and the name -> index lookup the collector would get from the manifest.
#[derive(Debug, Clone)]
struct ArbRow {
    legacy: bool,
    names: Vec<String>,
    cells: Vec<Option<String>>,
}

fn arb_row() -> impl Strategy<Value = ArbRow> {
    any::<bool>().prop_flat_map(|legacy| {
        (
            (
                Just(legacy),
                prop::option::weighted(0.9, arb_text()),
                prop::option::of(arb_text()),
                arb_time(legacy),
                arb_number(),
                arb_number(),
                arb_payload(),
                arb_payload(),
                prop::option::of(prop_oneof![
                    arb_text(),
                    Just("[\"MAX_REQUEST_SIZE_EXCEEDED\"]".to_string())
                ]),
                prop::option::of(arb_text()),
                prop::option::of(arb_text()),
            ),
            prop::collection::vec((arb_text(), prop::option::of(arb_text())), 0..3),
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<bool>(), 10),
        )
            .prop_map(
                |(
                    (legacy, id, client, time, status, dur, req, resp, codes, entity, who),
                    extra,
                    rot,
                    drop,
                )| {
                    let (names, mut values): (Vec<&str>, Vec<Option<String>>) = if legacy {
                        (
                            LEGACY_COLUMNS.to_vec(),
                            vec![id, client, time, status, dur, req, resp, codes],
                        )
                    } else {
                        (
                            AI_COLUMNS.to_vec(),
                            vec![id, client, time, status, dur, req, resp, codes, entity, who],
                        )
                    };
                    let mut names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
                    // Optional columns may be missing from the result entirely.
                    for i in (3..names.len()).rev() {
                        if drop[i] && i % 3 == 0 {
                            names.remove(i);
                            values.remove(i);
                        }
                    }
                    for (n, v) in extra {
                        names.push(format!("x_{n}"));
                        values.push(v);
                    }
                    let k = rot.index(names.len());
                    names.rotate_left(k);
                    values.rotate_left(k);
                    ArbRow {
                        legacy,
                        names,
                        cells: values,
                    }
                },
            )
    })
}

fn ctx_parts(table: &str) -> (String, String) {
    (
        agent_host("support_bot", "adb-1.azuredatabricks.net"),
        invocation_path(Some("agents_main-default-support_bot"), table),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn any_row_is_keyed_or_quarantined_and_its_records_meet_the_contract(
        r in arb_row(),
        max in prop_oneof![Just(databricks_shield::traffic::MAX_STRING_BYTES), 16usize..4096],
    ) {
        let format = if r.legacy { TableFormat::Legacy } else { TableFormat::AiGateway };
        let names = r.names.clone();
        let cols = RowColumns::locate(format, |n| names.iter().position(|c| c.eq_ignore_ascii_case(n)));
        let row: Row = r.cells.iter().map(|c| Cell(c.as_deref().map(JsonString::from))).collect();
        let id_cell = cols.id.and_then(|i| r.cells[i].clone());
        let table = "main.default.support_bot_payload";
        match execution_from_row(table, format, &cols, row) {
            Err((reason, raw)) => {
                prop_assert!(reason.contains("databricks_request_id"));
                prop_assert!(serde_json::from_str::<Value>(&raw).is_ok(), "quarantine keeps the row as JSON");
            }
            Ok((time_us, exec)) => {
                prop_assert_eq!(Some(&exec.request_id), id_cell.as_ref());
                prop_assert_eq!(exec.table.as_str(), table);
                if !r.legacy {
                    prop_assert_eq!(Some(exec.request_time.timestamp_micros()), Some(time_us));
                }
                let (host, path) = ctx_parts(table);
                let ctx = AgentContext { agent: "support_bot", host: &host, path: &path, account_id: "1000000" };
                let mapped = map_execution(&ctx, &exec, &MapOptions { tool_calls: true, max_string_bytes: max });
                prop_assert!(!mapped.records.is_empty(), "every execution gives its own record");
                let mut batch = Vec::new();
                let mut quarantined = 0;
                for rec in &mapped.records {
                    // As the connector sends it: in the form Akto's runtime keeps.
                    let rec = for_akto_runtime(rec);
                    match validate(&rec) {
                        Ok(()) => batch.push(serde_json::from_str::<Value>(&encode(&rec)).unwrap()),
                        Err(v) => {
                            // A cut, broken or empty JSON request is sent as text, an error status
                            // as 200 with a header, never refused.
                            prop_assert_ne!(v.field, "requestPayload", "{}", v);
                            prop_assert_ne!(v.field, "statusCode", "{}", v);
                            quarantined += 1;
                        }
                    }
                }
                prop_assert_eq!(batch.len() + quarantined, mapped.records.len());
                if !batch.is_empty() {
                    let body = serde_json::to_vec(&json!({ "batchData": batch })).unwrap();
                    let accepted = akto_standin::check_batch(&body);
                    prop_assert!(accepted.is_ok(), "the stand-in refused what validate passed: {:?}", accepted.err());
                    prop_assert_eq!(accepted.unwrap().len(), batch.len());
                }
            }
        }
    }

    #[test]
    fn timestamps_never_panic_and_round_trip(raw in arb_text(), us in 0i64..253_402_300_799_000_000) {
        let _ = parse_timestamp(&raw);
        prop_assert_eq!(parse_timestamp(&format_timestamp(us)), Some(us));
        let spaced = format_timestamp(us).replace('T', " ").trim_end_matches('Z').to_string();
        prop_assert_eq!(parse_timestamp(&spaced), Some(us));
    }
}

/// An AI Gateway row whose request is a chat message holding `content`, mapped.
fn map_huge_request(content: &str) -> databricks_shield::traffic::Mapped {
    let names: Vec<String> = AI_COLUMNS.iter().map(|s| s.to_string()).collect();
    let cols = RowColumns::locate(TableFormat::AiGateway, |n| {
        names.iter().position(|c| c == n)
    });
    let huge = format!("{{\"messages\":[{{\"role\":\"user\",\"content\":\"{content}\"}}]}}");
    let mut row: Row = vec![Cell(None); AI_COLUMNS.len()];
    row[0] = Cell(Some("id-1".into()));
    row[2] = Cell(Some("2026-01-01T00:00:00.000001Z".into()));
    row[5] = Cell(Some(huge.as_str().into()));
    row[6] = Cell(Some("{\"choices\":[]}".into()));
    let (_, exec) = execution_from_row("c.s.t", TableFormat::AiGateway, &cols, row).unwrap();
    let (host, path) = ctx_parts("c.s.t");
    let ctx = AgentContext {
        agent: "support_bot",
        host: &host,
        path: &path,
        account_id: "1000000",
    };
    map_execution(&ctx, &exec, &MapOptions::default())
}

#[test]
fn a_payload_over_akto_limit_is_cut_not_refused() {
    // 6 MiB of text in the request cell: over Akto's 5 MiB string limit. (Both request and
    // response that large are cut further to fit one 10 MiB body: `traffic` unit tests.)
    let m = map_huge_request(&"é".repeat(3 << 20));
    assert_eq!(m.truncated_payloads, 1);
    for rec in &m.records {
        validate(rec).unwrap();
    }
    let body = format!("{{\"batchData\":[{}]}}", encode(&m.records[0]));
    let checked = akto_standin::check_batch(body.as_bytes());
    assert!(checked.is_ok(), "{} bytes: {:?}", body.len(), checked.err());
}

/// The request `content-type` of an encoded record.
fn request_content_type(rec: &Value) -> Option<String> {
    let headers: Value = serde_json::from_str(rec["requestHeaders"].as_str()?).ok()?;
    headers["content-type"].as_str().map(str::to_string)
}

#[test]
fn a_cut_json_request_row_goes_out_as_text_and_akto_keeps_it() {
    // The same 6 MiB JSON request as above: cut, it starts with `{` but ends with the marker.
    let m = map_huge_request(&"x".repeat(6 << 20));
    assert_eq!(m.truncated_payloads, 1);
    let rec: Value = serde_json::from_str(&encode(&m.records[0])).unwrap();
    let payload = rec["requestPayload"].as_str().unwrap();
    assert!(payload.starts_with("{\"messages\"") && payload.ends_with(" bytes]"));
    assert_eq!(request_content_type(&rec).as_deref(), Some("text/plain"));
    validate(&m.records[0]).unwrap();
    akto_standin::check_record(&rec).unwrap();
}

#[test]
fn a_span_with_huge_json_inputs_goes_out_as_text_and_akto_keeps_it() {
    use databricks_shield::traces::{span_records, Span, TraceMeta, TraceSource};
    let inputs = json!({"messages": [{"role": "user", "content": "y".repeat(6 << 20)}]});
    let span = Span::from_json(&json!({
        "trace_id": "tr-1", "span_id": "s1", "name": "chat",
        "start_time_unix_nano": 1_700_000_000_000_000_000i64,
        "attributes": {
            "mlflow.spanType": "\"LLM\"",
            "mlflow.spanInputs": inputs.to_string(),
            "mlflow.spanOutputs": "{\"choices\":[]}",
        },
    }));
    let source = TraceSource {
        experiment_id: "1".into(),
        agent: "support_bot".into(),
        host: agent_host("support_bot", "adb-1.azuredatabricks.net"),
        execution_path: None,
    };
    let meta = TraceMeta {
        trace_id: "tr-1".into(),
        ..Default::default()
    };
    let records = span_records(&source, "1000000", &meta, &[span]);
    assert_eq!(records.len(), 1);
    let rec: Value = serde_json::from_str(&encode(&records[0])).unwrap();
    assert!(rec["requestPayload"]
        .as_str()
        .is_some_and(|p| p.starts_with("{\"messages\"") && p.ends_with(" bytes]")));
    assert_eq!(request_content_type(&rec).as_deref(), Some("text/plain"));
    validate(&records[0]).unwrap();
    akto_standin::check_record(&rec).unwrap();
}
