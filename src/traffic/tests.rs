//! Data-driven tests of the traffic mapping: each test reads as input and expected output.

use std::collections::BTreeMap;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::json::JsonString;

const HOST: &str = "bot.ai-agent.ws.cloud.databricks.com";

fn ctx() -> AgentContext<'static> {
    AgentContext {
        agent: "bot",
        host: HOST,
        path: "/serving-endpoints/bot/invocations",
        account_id: "1000000",
    }
}

fn exec(request: Option<&str>, response: Option<&str>) -> Execution {
    Execution {
        table: "main.default.bot_payload".into(),
        format: TableFormat::AiGateway,
        request_id: "req-1".into(),
        client_request_id: None,
        request_time: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        status_code: Some(200),
        duration_ms: Some(42),
        request: request.map(JsonString::from),
        response: response.map(JsonString::from),
        logging_error_codes: vec![],
        served_entity_id: None,
        requester: None,
        request_metadata: None,
    }
}

/// A record as a JSON value with headers and tag decoded, for readable expectations.
fn readable(r: &AktoRecord) -> Value {
    let mut v: Value = serde_json::from_str(&encode(r)).unwrap();
    for k in ["requestHeaders", "responseHeaders", "tag"] {
        let s = v[k].as_str().unwrap().to_string();
        v[k] = serde_json::from_str(&s).unwrap();
    }
    v
}

/// Fields every record of `ctx()` shares; `over` replaces or adds fields.
fn rec(over: Value) -> Value {
    let mut base = json!({
        "method": "POST", "ip": "10.0.0.1", "destIp": "", "time": "1700000000",
        "statusCode": "200", "status": "OK", "type": "HTTP/1.1", "akto_account_id": "1000000",
        "akto_vxlan_id": "0", "is_pending": "false", "source": "MIRRORING",
    });
    for (k, v) in over.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// Map with default options; every record, as sent ([`for_akto_runtime`]), must validate;
/// compare the whole list as built.
fn check(e: &Execution, expected: Value) -> Mapped {
    let m = map_execution(&ctx(), e, &MapOptions::default());
    for r in &m.records {
        validate(&for_akto_runtime(r)).unwrap_or_else(|v| panic!("{v}: {r:?}"));
    }
    let got: Vec<Value> = m.records.iter().map(readable).collect();
    assert_eq!(Value::Array(got), expected);
    m
}

fn main_headers(ct: &str) -> Value {
    json!({"host": HOST, "content-type": ct, "x-databricks-request-id": "req-1",
           "x-databricks-table": "main.default.bot_payload"})
}

fn tool(name: &str, id: &str, args: &str, out: &str, code: &str, status: &str) -> Value {
    let mut resp_h = json!({"content-type": "application/json"});
    if out.is_empty() {
        resp_h["x-tool-output"] = json!("missing");
    } else if !out.trim_start().starts_with(['{', '[']) {
        resp_h["content-type"] = json!("text/plain");
    }
    rec(json!({
        "path": format!("/tools/{name}"),
        "requestHeaders": {"host": HOST, "content-type": "application/json",
            "x-databricks-request-id": "req-1", "x-tool-call-id": id,
            "x-databricks-table": "main.default.bot_payload"},
        "responseHeaders": resp_h,
        "requestPayload": args, "responsePayload": out,
        "statusCode": code, "status": status,
        "tag": {"gen-ai": "Gen AI", "ai-agent": "bot", "tool": name},
    }))
}

#[test]
fn plain_chat_execution() {
    let req = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let resp = r#"{"choices":[{"message":{"role":"assistant","content":"hello"}}]}"#;
    let mut e = exec(Some(req), Some(resp));
    e.client_request_id = Some("client-7".into());
    e.served_entity_id = Some("se-1".into());
    e.requester = Some("a@b.com".into());
    let mut h = main_headers("application/json");
    h["x-client-request-id"] = json!("client-7");
    h["x-databricks-served-entity-id"] = json!("se-1");
    h["x-databricks-requester"] = json!("a@b.com");
    let m = check(
        &e,
        json!([rec(json!({
            "path": "/serving-endpoints/bot/invocations",
            "requestHeaders": h,
            "responseHeaders": {"content-type": "application/json",
                                "x-databricks-execution-duration-ms": "42"},
            "requestPayload": req, "responsePayload": resp,
            "tag": {"gen-ai": "Gen AI", "ai-agent": "bot"},
        }))]),
    );
    assert_eq!((m.tool_calls, m.truncated_payloads), (0, 0));
}

#[test]
fn chat_completions_tool_calls_go_out_without_outputs_which_come_with_the_next_request() {
    // The assistant asks for two tools: their results come in the client's next request, so the
    // records carry the arguments alone. The request already carries an older tool result,
    // which must not produce a record of its own nor be taken for these calls' outputs.
    let req = r#"{"messages":[{"role":"user","content":"weather?"},
        {"role":"assistant","tool_calls":[{"id":"old","type":"function","function":{"name":"old_tool","arguments":"{}"}}]},
        {"role":"tool","tool_call_id":"old","content":"old result"}]}"#;
    let resp = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[
        {"id":"c1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}},
        {"id":"c2","type":"function","function":{"name":"main.tools.lookup","arguments":"{\"q\":1}"}}]},
        "finish_reason":"tool_calls"}]}"#;
    let e = exec(Some(req), Some(resp));
    let m = map_execution(&ctx(), &e, &MapOptions::default());
    let got: Vec<Value> = m.records.iter().skip(1).map(readable).collect();
    assert_eq!(
        Value::Array(got),
        json!([
            tool("get_weather", "c1", r#"{"city":"Paris"}"#, "", "200", "OK"),
            tool("main.tools.lookup", "c2", r#"{"q":1}"#, "", "200", "OK"),
        ])
    );
    assert_eq!(m.tool_calls, 2);
}

#[test]
fn chat_agent_tool_calls_matched_by_tool_call_id() {
    let resp = r#"{"messages":[
        {"role":"assistant","content":"","id":"m1","tool_calls":[
            {"id":"t1","type":"function","function":{"name":"search","arguments":"{\"q\":\"x\"}"}},
            {"id":"t2","type":"function","function":{"name":"python_exec","arguments":"{\"code\":\"1/0\"}"}}]},
        {"role":"tool","name":"search","tool_call_id":"t1","content":"{\"hits\":3}"},
        {"role":"tool","name":"python_exec","tool_call_id":"t2","content":"Error: ZeroDivisionError"},
        {"role":"assistant","content":"done","id":"m2"}]}"#;
    let e = exec(
        Some(r#"{"messages":[{"role":"user","content":"go"}]}"#),
        Some(resp),
    );
    let m = map_execution(&ctx(), &e, &MapOptions::default());
    let got: Vec<Value> = m.records.iter().skip(1).map(readable).collect();
    assert_eq!(
        Value::Array(got),
        json!([
            tool("search", "t1", r#"{"q":"x"}"#, r#"{"hits":3}"#, "200", "OK"),
            tool(
                "python_exec",
                "t2",
                r#"{"code":"1/0"}"#,
                "Error: ZeroDivisionError",
                "500",
                "Internal Server Error"
            ),
        ])
    );
}

/// A user's request without history.
const GO: &str = r#"{"messages":[{"role":"user","content":"go"}]}"#;

/// The tool records of an execution: each one's tool name and `field` (a payload).
fn tools_with(request: &str, response: &str, field: &str) -> Vec<(String, String)> {
    let e = exec(Some(request), Some(response));
    let m = map_execution(&ctx(), &e, &MapOptions::default());
    m.records
        .iter()
        .skip(1)
        .map(readable)
        .map(|r| {
            (
                r["tag"]["tool"].as_str().unwrap_or("").to_string(),
                r[field].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// An agent that numbers its calls per step (`call_0` at every step): two calls with one id but
/// other names or arguments are two calls, each taking that id's outputs in order.
#[test]
fn calls_that_reuse_an_id_are_kept_apart_and_take_their_outputs_in_order() {
    let resp = r#"{"messages":[
        {"role":"assistant","content":"","tool_calls":[
            {"id":"call_0","type":"function","function":{"name":"search","arguments":"{\"q\":\"x\"}"}}]},
        {"role":"tool","tool_call_id":"call_0","content":"first"},
        {"role":"assistant","content":"","tool_calls":[
            {"id":"call_0","type":"function","function":{"name":"fetch","arguments":"{\"url\":1}"}}]},
        {"role":"tool","tool_call_id":"call_0","content":"second"},
        {"role":"assistant","content":"","tool_calls":[
            {"id":"call_0","type":"function","function":{"name":"search","arguments":"{\"q\":\"y\"}"}}]},
        {"role":"assistant","content":"done"}]}"#;
    let (got, calls) = tool_records(GO, resp);
    assert_eq!(
        got,
        json!([
            tool("search", "call_0", r#"{"q":"x"}"#, "first", "200", "OK"),
            tool("fetch", "call_0", r#"{"url":1}"#, "second", "200", "OK"),
            tool("search", "call_0", r#"{"q":"y"}"#, "", "200", "OK"),
        ])
    );
    assert_eq!(calls, 3);
}

/// Streamed responses logged as their chunks or events, and a pyfunc model's `predictions`:
/// the same tool call records as the whole response would give.
#[test]
fn streamed_and_wrapped_responses_give_their_tool_calls() {
    let calls = |resp: &str| tool_records(GO, resp).0;
    // Chat completion chunks: a call's arguments come in fragments of its index.
    let chunks = r#"[
        {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","tool_calls":[
            {"index":0,"id":"c1","type":"function","function":{"name":"get_weather","arguments":""}}]}}]},
        {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[
            {"index":0,"function":{"arguments":"{\"city\":"}}]}}]},
        {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[
            {"index":0,"function":{"arguments":"\"Paris\"}"}},
            {"index":1,"id":"c2","type":"function","function":{"name":"lookup","arguments":"{}"}}]}}]},
        {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}]"#;
    assert_eq!(
        calls(chunks),
        json!([
            tool("get_weather", "c1", r#"{"city":"Paris"}"#, "", "200", "OK"),
            tool("lookup", "c2", "{}", "", "200", "OK"),
        ])
    );
    // ChatAgent chunks: each delta a message, the tool's result one of them.
    let chat_agent = r#"[
        {"delta":{"role":"assistant","content":"","id":"m1","tool_calls":[
            {"id":"t1","type":"function","function":{"name":"search","arguments":"{\"q\":1}"}}]}},
        {"delta":{"role":"tool","name":"search","tool_call_id":"t1","content":"3 hits","id":"m2"}},
        {"delta":{"role":"assistant","content":"done","id":"m3"}}]"#;
    assert_eq!(
        calls(chat_agent),
        json!([tool("search", "t1", r#"{"q":1}"#, "3 hits", "200", "OK")])
    );
    // ResponsesAgent events: the done items (an added item has no arguments yet).
    let events = r#"[
        {"type":"response.output_item.added","item":{"type":"function_call","call_id":"f1","name":"get_time","arguments":""}},
        {"type":"response.function_call_arguments.delta","item_id":"i1","delta":"{\"tz\""},
        {"type":"response.output_item.done","item":{"type":"function_call","call_id":"f1","name":"get_time","arguments":"{\"tz\":1}"}},
        {"type":"response.output_item.done","item":{"type":"function_call_output","call_id":"f1","output":"12:00"}},
        {"type":"response.output_text.delta","item_id":"i2","delta":"It is noon"}]"#;
    assert_eq!(
        calls(events),
        json!([tool("get_time", "f1", r#"{"tz":1}"#, "12:00", "200", "OK")])
    );
    // A pyfunc model's predictions, a list or one object.
    for wrapped in [
        r#"{"predictions":[{"choices":[{"message":{"role":"assistant","tool_calls":[
            {"id":"p1","type":"function","function":{"name":"f","arguments":"{}"}}]}}]}]}"#,
        r#"{"predictions":{"choices":[{"message":{"role":"assistant","tool_calls":[
            {"id":"p1","type":"function","function":{"name":"f","arguments":"{}"}}]}}]}}"#,
    ] {
        assert_eq!(
            calls(wrapped),
            json!([tool("f", "p1", "{}", "", "200", "OK")])
        );
    }
    // Arrays of anything else give no calls, and stay JSON.
    for other in ["[1, 2, [3]]", r#"[{"embedding":[0.1]}]"#, "[]"] {
        let e = exec(Some("{}"), Some(other));
        let m = map_execution(&ctx(), &e, &MapOptions::default());
        assert_eq!(m.tool_calls, 0, "{other}");
        let r = readable(&m.records[0]);
        assert_eq!(
            r["responseHeaders"]["content-type"], "application/json",
            "{other}"
        );
    }
}

/// Ids reused across steps: an output in the request's history belongs to the call the history
/// shows with that id, not to this response's new call; a call made again with the same id,
/// name and arguments and answered twice is two calls.
#[test]
fn reused_ids_never_take_another_calls_output() {
    let names_outputs = |req: &str, resp: &str| tools_with(req, resp, "responsePayload");
    // The history's call_0 was another call (search "old"): its result is not this one's.
    let req = r#"{"messages":[{"role":"user","content":"go"},
        {"role":"assistant","tool_calls":[{"id":"call_0","type":"function","function":{"name":"search","arguments":"{\"q\":\"old\"}"}}]},
        {"role":"tool","tool_call_id":"call_0","content":"OLD RESULT"}]}"#;
    let resp = r#"{"choices":[{"message":{"role":"assistant","tool_calls":[
        {"id":"call_0","type":"function","function":{"name":"search","arguments":"{\"q\":\"new\"}"}}]}}]}"#;
    assert_eq!(names_outputs(req, resp), [("search".into(), String::new())]);
    // The history shows no other call with that id and one output for it: it is this call's
    // (a client that ran the tool and sent its result along).
    let req = r#"{"input":[{"role":"user","content":"go"},
        {"type":"function_call_output","call_id":"call_0","output":"RESULT"}]}"#;
    let resp = r#"{"output":[{"type":"function_call","call_id":"call_0","name":"search","arguments":"{}"}]}"#;
    assert_eq!(
        names_outputs(req, resp),
        [("search".into(), "RESULT".into())]
    );
    // Two outputs there for that id: which one is unknown, none is taken.
    let req = r#"{"input":[{"type":"function_call_output","call_id":"call_0","output":"A"},
        {"type":"function_call_output","call_id":"call_0","output":"B"}]}"#;
    assert_eq!(names_outputs(req, resp), [("search".into(), String::new())]);
    // The same call made again (a retry), answered twice: two calls, each with its output.
    let resp = r#"{"messages":[
        {"role":"assistant","tool_calls":[{"id":"call_0","type":"function","function":{"name":"search","arguments":"{}"}}]},
        {"role":"tool","tool_call_id":"call_0","content":"Error: timeout"},
        {"role":"assistant","tool_calls":[{"id":"call_0","type":"function","function":{"name":"search","arguments":"{}"}}]},
        {"role":"tool","tool_call_id":"call_0","content":"3 hits"}]}"#;
    assert_eq!(
        names_outputs("{}", resp),
        [
            ("search".into(), "Error: timeout".into()),
            ("search".into(), "3 hits".into())
        ]
    );
}

/// Chat completion chunks of several choices, and parallel calls whose fragments carry no
/// index or id: each call's arguments stay its own.
#[test]
fn stream_fragments_are_joined_per_choice_and_call() {
    let calls = |resp: &str| tools_with("{}", resp, "requestPayload");
    let two_choices = r#"[
        {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"fa","arguments":""}}]}}]},
        {"choices":[{"index":1,"delta":{"tool_calls":[{"index":0,"id":"b","function":{"name":"fb","arguments":""}}]}}]},
        {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":1}"}}]}}]},
        {"choices":[{"index":1,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"b\":2}"}}]}}]}]"#;
    assert_eq!(
        calls(two_choices),
        [
            ("fa".into(), r#"{"a":1}"#.into()),
            ("fb".into(), r#"{"b":2}"#.into())
        ]
    );
    // A server that repeats the name in every fragment of a call (same index, no id).
    let repeated_name = r#"[
        {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"fa","arguments":"{\"a\":"}}]}}]},
        {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"fa","arguments":"1}"}}]}}]}]"#;
    assert_eq!(calls(repeated_name), [("fa".into(), r#"{"a":1}"#.into())]);
    // Every call at index 0 without an id (a known server bug): told apart by name.
    let index_0 = r#"[
        {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"fa","arguments":"{\"a\":1}"}}]}}]},
        {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"fb","arguments":"{\"b\":2}"}}]}}]}]"#;
    assert_eq!(
        calls(index_0),
        [
            ("fa".into(), r#"{"a":1}"#.into()),
            ("fb".into(), r#"{"b":2}"#.into())
        ]
    );
    let no_index = r#"[
        {"choices":[{"delta":{"tool_calls":[{"id":"","function":{"name":"fa","arguments":"{\"a\":"}}]}}]},
        {"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"1}"}}]}}]},
        {"choices":[{"delta":{"tool_calls":[{"id":"","function":{"name":"fb","arguments":"{\"b\":2}"}}]}}]}]"#;
    assert_eq!(
        calls(no_index),
        [
            ("fa".into(), r#"{"a":1}"#.into()),
            ("fb".into(), r#"{"b":2}"#.into())
        ]
    );
}

#[test]
fn responses_agent_function_calls_matched_by_call_id_in_response_and_request() {
    let req = r#"{"input":[{"role":"user","content":"hi"},
        {"type":"function_call_output","call_id":"fc2","output":"{\"error\":\"timeout\"}"}]}"#;
    let resp = r#"{"object":"response","output":[
        {"type":"message","role":"assistant","content":[{"type":"output_text","text":"ok"}]},
        {"type":"function_call","id":"item1","call_id":"fc1","name":"get_time","arguments":"{}"},
        {"type":"function_call_output","call_id":"fc1","output":"12:00"},
        {"type":"function_call","call_id":"fc2","name":"slow tool/v2","arguments":"{\"a\":[1,2]}"},
        {"type":"function_call","call_id":"fc1","name":"get_time","arguments":"{}"}],
        "usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}}"#;
    let e = exec(Some(req), Some(resp));
    let m = map_execution(&ctx(), &e, &MapOptions::default());
    let got: Vec<Value> = m.records.iter().skip(1).map(readable).collect();
    assert_eq!(
        Value::Array(got),
        json!([
            tool("get_time", "fc1", "{}", "12:00", "200", "OK"),
            tool(
                "slow%20tool%2Fv2",
                "fc2",
                r#"{"a":[1,2]}"#,
                r#"{"error":"timeout"}"#,
                "500",
                "Internal Server Error"
            ),
        ])
        .as_array()
        .map(|a| {
            let mut a = a.clone();
            a[1]["tag"]["tool"] = json!("slow tool/v2");
            Value::Array(a)
        })
        .unwrap()
    );
    assert_eq!(m.tool_calls, 2, "fc1 seen twice is sent once");
}

#[test]
fn tool_calls_without_ids_and_odd_shapes() {
    // Arguments as an object, missing ids and names, wrong types: nothing fails.
    let resp = r#"{"choices":[{"message":{"tool_calls":[
        {"function":{"name":"f","arguments":{"x":1}}},
        {"function":{"arguments":"{}"}},
        "not an object", 7, null, {}, {"function":{}}]}}, "junk"], "messages": "not a list", "output": {"x":1}}"#;
    let e = exec(None, Some(resp));
    let m = map_execution(&ctx(), &e, &MapOptions::default());
    let got: Vec<Value> = m.records.iter().skip(1).map(readable).collect();
    assert_eq!(
        Value::Array(got),
        json!([
            tool("f", "req-1#0", r#"{"x":1}"#, "", "200", "OK"),
            tool("unknown", "req-1#1", "{}", "", "200", "OK"),
        ])
    );
}

#[test]
fn blank_tool_call_ids_are_no_ids() {
    // Two calls with `"id": ""` are two calls, not one; the blank key matches no output.
    let req = r#"{"messages":[{"role":"tool","tool_call_id":"","content":"stale"}]}"#;
    let resp = r#"{"choices":[{"message":{"tool_calls":[
        {"id":"","type":"function","function":{"name":"a","arguments":"{}"}},
        {"id":" ","call_id":"cx","type":"function","function":{"name":"b","arguments":"{}"}}]}}]}"#;
    let (got, calls) = tool_records(req, resp);
    assert_eq!(
        got,
        json!([
            tool("a", "req-1#0", "{}", "", "200", "OK"),
            tool("b", "cx", "{}", "", "200", "OK"),
        ])
    );
    assert_eq!(calls, 2);
}

/// The tool-call records (readable) of an execution with `req` and `resp`, and their count.
fn tool_records(req: &str, resp: &str) -> (Value, u32) {
    let m = map_execution(&ctx(), &exec(Some(req), Some(resp)), &MapOptions::default());
    let got: Vec<Value> = m.records.iter().skip(1).map(readable).collect();
    (Value::Array(got), m.tool_calls)
}

#[test]
fn tool_calls_can_be_turned_off() {
    let resp = r#"{"output":[{"type":"function_call","call_id":"a","name":"t","arguments":"{}"}]}"#;
    let e = exec(None, Some(resp));
    let opts = MapOptions {
        tool_calls: false,
        ..MapOptions::default()
    };
    let m = map_execution(&ctx(), &e, &opts);
    assert_eq!((m.records.len(), m.tool_calls), (1, 0));
    let m = map_execution(&ctx(), &e, &MapOptions::default());
    assert_eq!((m.records.len(), m.tool_calls), (2, 1));
}

#[test]
fn legacy_table_with_request_metadata() {
    let mut e = exec(Some(r#"{"inputs":[1]}"#), Some(r#"{"predictions":[2]}"#));
    e.format = TableFormat::Legacy;
    e.status_code = Some(404);
    let mut md = BTreeMap::new();
    md.insert("endpoint_name".to_string(), "bot".to_string());
    md.insert("Model Version".to_string(), "3".to_string());
    e.request_metadata = Some(md);
    let mut h = main_headers("application/json");
    h["x-databricks-metadata-endpoint-name"] = json!("bot");
    h["x-databricks-metadata-model-version"] = json!("3");
    check(
        &e,
        json!([rec(json!({
            "path": "/serving-endpoints/bot/invocations",
            "requestHeaders": h,
            "responseHeaders": {"content-type": "application/json",
                                "x-databricks-execution-duration-ms": "42"},
            "requestPayload": r#"{"inputs":[1]}"#, "responsePayload": r#"{"predictions":[2]}"#,
            "statusCode": "404", "status": "Not Found",
            "tag": {"gen-ai": "Gen AI", "ai-agent": "bot"},
        }))]),
    );
}

#[test]
fn null_payloads_with_logging_error_codes_are_sent_with_the_reason() {
    let mut e = exec(None, None);
    e.logging_error_codes = vec![
        "MAX_REQUEST_SIZE_EXCEEDED".into(),
        "MAX_RESPONSE_SIZE_EXCEEDED".into(),
    ];
    e.duration_ms = None;
    let note = r#"{"databricks_shield_note":"payload not logged by Databricks","logging_error_codes":["MAX_REQUEST_SIZE_EXCEEDED","MAX_RESPONSE_SIZE_EXCEEDED"]}"#;
    check(
        &e,
        json!([rec(json!({
            "path": "/serving-endpoints/bot/invocations",
            "requestHeaders": main_headers("application/json"),
            "responseHeaders": {"content-type": "application/json",
                "x-databricks-logging-error-codes": "MAX_REQUEST_SIZE_EXCEEDED,MAX_RESPONSE_SIZE_EXCEEDED"},
            "requestPayload": note, "responsePayload": note,
            "tag": {"gen-ai": "Gen AI", "ai-agent": "bot"},
        }))]),
    );
}

#[test]
fn missing_status_code_defaults_are_documented() {
    // (status_code, response, expected statusCode, expected x-databricks-status-code)
    type Case = (
        Option<i64>,
        Option<&'static str>,
        &'static str,
        Option<&'static str>,
    );
    let cases: [Case; 5] = [
        (None, Some("{}"), "200", Some("missing")),
        (None, None, "500", Some("missing")),
        (Some(0), Some("{}"), "200", Some("0")),
        (Some(-5), None, "500", Some("-5")),
        (Some(503), None, "503", None),
    ];
    for (code, resp, want, note) in cases {
        let mut e = exec(Some("{}"), resp);
        e.status_code = code;
        let m = map_execution(&ctx(), &e, &MapOptions::default());
        let r = readable(&m.records[0]);
        assert_eq!(r["statusCode"], json!(want), "{code:?}");
        assert_eq!(
            r["responseHeaders"]["x-databricks-status-code"].as_str(),
            note,
            "{code:?}"
        );
        // As sent: a code Akto's runtime drops goes as 200, the header naming it (a note the
        // mapping set is kept).
        let sent = readable(&for_akto_runtime(&m.records[0]));
        validate(&for_akto_runtime(&m.records[0])).unwrap();
        let kept = want != "500" && want != "503";
        assert_eq!(sent["statusCode"], json!("200"), "{code:?}");
        let header = sent["responseHeaders"]["x-databricks-status-code"].as_str();
        assert_eq!(header, if kept { note } else { note.or(Some(want)) });
    }
}

#[test]
fn non_json_payloads_are_sent_verbatim_as_text() {
    let e = exec(Some("plain text prompt"), Some("{not json"));
    let m = map_execution(&ctx(), &e, &MapOptions::default());
    let r = readable(&m.records[0]);
    assert_eq!(r["requestPayload"], json!("plain text prompt"));
    assert_eq!(r["responsePayload"], json!("{not json"));
    assert_eq!(r["requestHeaders"]["content-type"], json!("text/plain"));
    assert_eq!(r["responseHeaders"]["content-type"], json!("text/plain"));
    validate(&m.records[0]).unwrap();
}

#[test]
fn time_is_epoch_seconds_clamped_to_a_positive_i32() {
    for (secs, want) in [
        (1_700_000_000i64, "1700000000"),
        (0, "1"),
        (-100, "1"),
        (3_000_000_000, "2147483647"),
    ] {
        let mut e = exec(None, None);
        e.request_time = Utc.timestamp_opt(secs, 999_000_000).unwrap();
        let m = map_execution(&ctx(), &e, &MapOptions::default());
        assert_eq!(m.records[0].time, want);
    }
}

#[test]
fn oversized_payloads_are_cut_at_a_char_boundary_with_a_marker() {
    let big = "é".repeat(400); // 800 bytes
    let resp = format!(
        r#"{{"output":[{{"type":"function_call","call_id":"a","name":"t","arguments":"{big}"}}]}}"#
    );
    let e = exec(Some(&big), Some(&resp));
    let opts = MapOptions {
        tool_calls: true,
        max_string_bytes: 301,
    };
    let m = map_execution(&ctx(), &e, &opts);
    assert_eq!(m.truncated_payloads, 3);
    let marker = "...[truncated by databricks-shield: original 800 bytes]";
    let r = &m.records[0].request_payload.text();
    assert!(r.len() <= 301 && r.ends_with(marker), "{r}");
    assert!(r.strip_suffix(marker).unwrap().chars().all(|c| c == 'é'));
    assert!(m.records[0].response_payload.text().len() <= 301);
    assert!(m.records[1].request_payload.text().ends_with(marker));
    // A limit smaller than the marker keeps just the cut prefix.
    let tiny = MapOptions {
        tool_calls: false,
        max_string_bytes: 5,
    };
    let m = map_execution(&ctx(), &exec(Some(&big), None), &tiny);
    assert_eq!(m.records[0].request_payload, "éé");
    // Exactly at the limit is not cut.
    let m = map_execution(
        &ctx(),
        &exec(Some(&big), None),
        &MapOptions {
            tool_calls: false,
            max_string_bytes: 800,
        },
    );
    assert_eq!(
        (
            m.truncated_payloads,
            m.records[0].request_payload.text().len()
        ),
        (0, 800)
    );
}

#[test]
fn host_scheme() {
    let check_host = |agent: &str, ws: &str, want: &str| {
        assert_eq!(agent_host(agent, ws), want, "{agent:?} {ws:?}");
    };
    check_host(
        "Support_Bot",
        "https://Adb-123.4.azuredatabricks.net:443/",
        "support-bot.ai-agent.adb-123.4.azuredatabricks.net",
    );
    check_host("my.agent", "127.0.0.1:8080", "my-agent.ai-agent.127.0.0.1");
    check_host(
        "agents_main-default-bot",
        "dbc-1.cloud.databricks.com",
        "agents-main-default-bot.ai-agent.dbc-1.cloud.databricks.com",
    );
    check_host(
        "--a__b--",
        "http://user:pw@Host_Name.com/path?x=1",
        "a-b.ai-agent.host-name.com",
    );
    check_host("x", "[::1]:8080", "x.ai-agent.1");
    check_host("x", "..a..b..", "x.ai-agent.a.b");
    check_host("x", "", "x.ai-agent.unknown-workspace");
    let h = agent_host("エージェント", "ws");
    assert!(
        h.starts_with("agent-") && h.ends_with(".ai-agent.ws"),
        "{h}"
    );
    assert_ne!(h, agent_host("別", "ws"));
    let long_a = agent_host(&"a".repeat(100), "ws");
    let long_b = agent_host(&format!("{}b", "a".repeat(99)), "ws");
    assert!(long_a.split('.').all(|l| l.len() <= 63), "{long_a}");
    assert_ne!(long_a, long_b);
    assert_eq!(long_a, agent_host(&"a".repeat(100), "ws"));
    let long_ws = agent_host("bot", &format!("{}.databricks.com", "x.".repeat(200)));
    assert!(
        long_ws.len() <= 253 && long_ws.ends_with(".databricks.com"),
        "{long_ws}"
    );
    assert!(long_ws.starts_with("bot.ai-agent.ws-"), "{long_ws}");
}

#[test]
fn invocation_paths() {
    let t = "main.default.bot_payload";
    for (endpoint, want) in [
        (Some("bot"), "/serving-endpoints/bot/invocations"),
        (
            Some("agents_main-default-m"),
            "/serving-endpoints/agents_main-default-m/invocations",
        ),
        (Some("a b/c"), "/serving-endpoints/a%20b%2Fc/invocations"),
        (Some(".."), "/serving-endpoints/%2E%2E/invocations"),
        (Some(""), "/tables/main.default.bot_payload/invocations"),
        (None, "/tables/main.default.bot_payload/invocations"),
    ] {
        assert_eq!(invocation_path(endpoint, t), want, "{endpoint:?}");
    }
    assert_eq!(invocation_path(None, ""), "/tables/unknown/invocations");
}

#[test]
fn tool_output_error_heuristic() {
    use super::tools::output_says_error;
    for (out, want) in [
        ("Error: boom", true),
        ("  exception raised", true),
        ("Traceback (most recent call last):\n  File", true),
        (r#"{"error":"x"}"#, true),
        (r#"{"error":{"code":1}}"#, true),
        (r#"{"isError":true,"content":[]}"#, true),
        (r#"{"status":"FAILED"}"#, true),
        (r#"{"error":null,"result":1}"#, false),
        (r#"{"error":false}"#, false),
        (r#"{"status":"ok"}"#, false),
        ("the error rate is 2%", false),
        ("Errors: none", false),
        ("FAILED: permission denied", true),
        ("error", true),
        ("{broken", false),
        ("", false),
    ] {
        assert_eq!(output_says_error(out), want, "{out:?}");
    }
}

fn good() -> AktoRecord {
    map_execution(
        &ctx(),
        &exec(Some("{}"), Some("{}")),
        &MapOptions::default(),
    )
    .records
    .remove(0)
}

#[test]
fn validate_names_the_field_akto_would_reject() {
    type Edit = fn(&mut AktoRecord);
    let cases: [(Edit, &str); 17] = [
        (|r| r.time = "1700000000000".into(), "time"),
        (|r| r.time = "0".into(), "time"),
        (|r| r.time = "-5".into(), "time"),
        (|r| r.time = "12a".into(), "time"),
        (|r| r.status_code = "OK".into(), "statusCode"),
        (|r| r.source = "DATABRICKS".into(), "source"),
        (|r| r.request_headers = "[]".into(), "requestHeaders"),
        (|r| r.request_headers = "{".into(), "requestHeaders"),
        (
            |r| r.request_headers = r#"{"Host":"a"}"#.into(),
            "requestHeaders",
        ),
        (
            |r| r.request_headers = r#"{"content-type":"x"}"#.into(),
            "requestHeaders",
        ),
        (
            |r| r.request_headers = r#"{"host":"A_B"}"#.into(),
            "requestHeaders",
        ),
        (
            |r| r.request_headers = r#"{"host":"a","x":1}"#.into(),
            "requestHeaders",
        ),
        (|r| r.response_headers = "null".into(), "responseHeaders"),
        (|r| r.tag = "gen-ai".into(), "tag"),
        (
            |r| r.response_payload = "x".repeat(MAX_STRING_BYTES + 1).into(),
            "responsePayload",
        ),
        (|r| r.akto_account_id = "acct".into(), "akto_account_id"),
        (|r| r.path = "no-slash".into(), "path"),
    ];
    assert_eq!(validate(&good()), Ok(()));
    for (edit, field) in cases {
        let mut r = good();
        edit(&mut r);
        let err = validate(&r).expect_err(field);
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().contains(field));
    }
}

#[test]
fn encode_gives_exactly_akto_field_names() {
    let v: Value = serde_json::from_str(&encode(&good())).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "akto_account_id",
            "akto_vxlan_id",
            "destIp",
            "ip",
            "is_pending",
            "method",
            "path",
            "requestHeaders",
            "requestPayload",
            "responseHeaders",
            "responsePayload",
            "source",
            "status",
            "statusCode",
            "tag",
            "time",
            "type"
        ]
    );
    assert!(v.as_object().unwrap().values().all(Value::is_string));
    let back: AktoRecord = serde_json::from_value(v).unwrap();
    assert_eq!(back, good());
}

// ---------------------------------------------------------------------------------------------
// Properties.

/// Arbitrary JSON biased towards the keys the tool-call scanner reads.
fn arb_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("choices".to_string()),
        Just("message".to_string()),
        Just("messages".to_string()),
        Just("tool_calls".to_string()),
        Just("function".to_string()),
        Just("name".to_string()),
        Just("arguments".to_string()),
        Just("id".to_string()),
        Just("call_id".to_string()),
        Just("tool_call_id".to_string()),
        Just("role".to_string()),
        Just("type".to_string()),
        Just("output".to_string()),
        Just("input".to_string()),
        Just("content".to_string()),
        "[a-zA-Z_ ]{0,6}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop_oneof![
            Just("tool".to_string()),
            Just("function_call".to_string()),
            Just("function_call_output".to_string()),
            Just("c1".to_string()),
            Just("Error: x".to_string()),
            any::<String>(),
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn arb_payload() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        arb_json().prop_map(|v| Some(v.to_string())),
        any::<String>().prop_map(Some),
        // Truncated JSON.
        arb_json().prop_map(|v| {
            let s = v.to_string();
            let mut cut = s.len() / 2;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            Some(s[..cut].to_string())
        }),
    ]
}

prop_compose! {
    fn arb_exec()(
        req in arb_payload(),
        resp in arb_payload(),
        request_id in any::<String>(),
        client in proptest::option::of(any::<String>()),
        secs in any::<i64>().prop_map(|s| s % 10_000_000_000),
        status in proptest::option::of(any::<i64>()),
        dur in proptest::option::of(any::<i64>()),
        codes in prop::collection::vec(any::<String>(), 0..3),
        requester in proptest::option::of(any::<String>()),
        meta in proptest::option::of(prop::collection::btree_map(any::<String>(), any::<String>(), 0..3)),
        table in any::<String>(),
    ) -> Execution {
        Execution {
            table,
            format: if meta.is_some() { TableFormat::Legacy } else { TableFormat::AiGateway },
            request_id,
            client_request_id: client,
            request_time: Utc.timestamp_opt(secs, 0).single().unwrap_or_default(),
            status_code: status,
            duration_ms: dur,
            request: req.map(JsonString::from),
            response: resp.map(JsonString::from),
            logging_error_codes: codes,
            served_entity_id: None,
            requester,
            request_metadata: meta,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mapping_never_panics_and_every_record_validates(
        e in arb_exec(),
        agent in any::<String>(),
        ws in any::<String>(),
        endpoint in proptest::option::of(any::<String>()),
        max in prop_oneof![Just(MAX_STRING_BYTES), 0usize..200],
        tools in any::<bool>(),
    ) {
        let host = agent_host(&agent, &ws);
        let path = invocation_path(endpoint.as_deref(), &e.table);
        let c = AgentContext { agent: &agent, host: &host, path: &path, account_id: "1000000" };
        let m = map_execution(&c, &e, &MapOptions { tool_calls: tools, max_string_bytes: max });
        prop_assert!(!m.records.is_empty());
        prop_assert_eq!(m.records.len(), 1 + m.tool_calls as usize);
        for r in &m.records {
            // As sent: every record validates, and the independent stand-in agrees.
            let sent = for_akto_runtime(r);
            prop_assert!(validate(&sent).is_ok(), "{:?}: {:?}", validate(&sent), r);
            let v: Value = serde_json::from_str(&encode(&sent)).unwrap();
            prop_assert!(akto_standin::check_record(&v).is_ok(), "{:?}", akto_standin::check_record(&v));
            prop_assert!(r.request_payload.text().len() <= max);
            prop_assert!(r.response_payload.text().len() <= max);
            let v: Value = serde_json::from_str(&encode(r)).unwrap();
            prop_assert!(v.is_object());
        }
    }

    #[test]
    fn host_is_always_a_valid_stable_name(agent in any::<String>(), ws in any::<String>()) {
        let h = agent_host(&agent, &ws);
        prop_assert_eq!(&h, &agent_host(&agent, &ws));
        prop_assert!(h.len() <= 253, "{}", h);
        prop_assert!(h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'));
        for label in h.split('.') {
            prop_assert!(!label.is_empty() && label.len() <= 63, "{}", h);
            prop_assert!(!label.starts_with('-') && !label.ends_with('-'), "{}", h);
        }
        prop_assert!(h.contains(".ai-agent."));
    }

    #[test]
    fn paths_are_url_safe(endpoint in proptest::option::of(any::<String>()), table in any::<String>()) {
        let p = invocation_path(endpoint.as_deref(), &table);
        prop_assert!(p.starts_with('/') && p.ends_with("/invocations"));
        prop_assert_eq!(p.matches('/').count(), 3);
        prop_assert!(p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%/".contains(&b)));
    }
}

#[test]
fn hostile_payloads_do_not_panic() {
    let deep_array = "[".repeat(100_000);
    let deep_resp = format!(
        r#"{{"choices":[{{"message":{}"#,
        "{\"message\":".repeat(50_000)
    );
    let deep_ok = format!(
        r#"{{"output":[{{"type":"function_call","call_id":"a","name":"t","arguments":{}1{}}}]}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let cases = [
        (Some(deep_array.as_str()), Some(deep_array.as_str())),
        (Some(deep_resp.as_str()), Some(deep_resp.as_str())),
        (None, Some(deep_ok.as_str())),
        (Some("\u{0}\u{1f}\"\\"), Some("{\"choices\":\"\u{0}\"}")),
        (Some(""), Some("")),
        (Some("   "), Some("null")),
    ];
    for (req, resp) in cases {
        let m = map_execution(&ctx(), &exec(req, resp), &MapOptions::default());
        for r in &m.records {
            validate(&for_akto_runtime(r)).unwrap();
        }
    }
    // Nesting under serde_json's limit still finds the call.
    let m = map_execution(&ctx(), &exec(None, Some(&deep_ok)), &MapOptions::default());
    assert_eq!(m.tool_calls, 1);
    assert_eq!(
        m.records[1].request_payload,
        format!("{}1{}", "[".repeat(100), "]".repeat(100))
    );
}

/// Which payload format a generated response uses.
#[derive(Debug, Clone, Copy)]
enum Format {
    Completions,
    ChatAgent,
    Responses,
}

/// Build a response with the given calls `(id, name, args, output)`; ids may repeat.
fn build_response(format: Format, calls: &[(String, String, String, Option<String>)]) -> String {
    match format {
        Format::Completions => {
            let tcs: Vec<Value> = calls
                .iter()
                .map(|(id, n, a, _)| json!({"id": id, "type": "function", "function": {"name": n, "arguments": a}}))
                .collect();
            json!({"choices": [{"message": {"role": "assistant", "tool_calls": tcs}}]}).to_string()
        }
        Format::ChatAgent => {
            let mut msgs = vec![];
            for (id, n, a, o) in calls {
                msgs.push(
                    json!({"role": "assistant", "content": "thinking", "tool_calls": [
                    {"id": id, "type": "function", "function": {"name": n, "arguments": a}}]}),
                );
                if let Some(o) = o {
                    msgs.push(json!({"role": "tool", "name": n, "tool_call_id": id, "content": o}));
                }
            }
            json!({"messages": msgs}).to_string()
        }
        Format::Responses => {
            let mut out = vec![
                json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]}),
            ];
            for (id, n, a, o) in calls {
                out.push(
                    json!({"type": "function_call", "call_id": id, "name": n, "arguments": a}),
                );
                if let Some(o) = o {
                    out.push(json!({"type": "function_call_output", "call_id": id, "output": o}));
                }
            }
            json!({"object": "response", "output": out}).to_string()
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_distinct_tool_call_becomes_exactly_one_record(
        format in prop_oneof![Just(Format::Completions), Just(Format::ChatAgent), Just(Format::Responses)],
        calls in prop::collection::vec(
            // Few ids, names and arguments: calls listed again, and ids reused by other calls.
            (
                "c[0-3]",
                "(a|b|[a-z_.]{1,8})",
                prop_oneof![Just("{}".to_string()), any::<String>()],
                proptest::option::of("[a-z ]{0,10}"),
            ),
            0..8,
        ),
    ) {
        let response = build_response(format, &calls);
        let m = map_execution(&ctx(), &exec(Some("{}"), Some(&response)), &MapOptions::default());
        // Distinct calls: the same id, name and arguments twice is one call, unless the
        // response holds an output for each listing of that id (completions hold none).
        let outputs_of = |id: &str| match format {
            Format::Completions => 0,
            _ => calls.iter().filter(|c| c.0 == id && c.3.is_some()).count(),
        };
        let listed = |id: &str| calls.iter().filter(|c| c.0 == id).count();
        let mut first: Vec<&(String, String, String, Option<String>)> = vec![];
        for c in &calls {
            let again = first.iter().any(|f| (&f.0, &f.1, &f.2) == (&c.0, &c.1, &c.2));
            if !again || outputs_of(&c.0) >= listed(&c.0) {
                first.push(c);
            }
        }
        prop_assert_eq!(m.tool_calls as usize, first.len());
        for (k, (rec, (id, name, args, _))) in m.records.iter().skip(1).zip(&first).enumerate() {
            let r = readable(rec);
            prop_assert_eq!(&r["requestHeaders"]["x-tool-call-id"], &json!(id));
            prop_assert_eq!(&r["tag"]["tool"], &json!(name));
            prop_assert_eq!(&r["path"], &json!(format!("/tools/{}", super::host::encode_segment(name))));
            prop_assert_eq!(&r["requestPayload"], &json!(args));
            // The outputs given for an id go to its distinct calls in order (completions carry
            // none).
            let nth = first[..k].iter().filter(|f| &f.0 == id).count();
            let want = match format {
                Format::Completions => String::new(),
                _ => calls
                    .iter()
                    .filter(|c| &c.0 == id)
                    .filter_map(|c| c.3.clone())
                    .nth(nth)
                    .unwrap_or_default(),
            };
            prop_assert_eq!(&r["responsePayload"], &json!(want));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redaction.

/// Redact with all kinds; `None` in `want` means unchanged.
fn check_redact(input: &str, want: &str) {
    let mut counts = RedactionCounts::default();
    let got = Redactor::default().redact_text(input, &mut counts);
    assert_eq!(got.as_deref().unwrap_or(input), want, "input {input:?}");
    assert_eq!(got.is_some(), counts.total() > 0);
    if input.trim_start().starts_with(['{', '[']) && serde_json::from_str::<Value>(input).is_ok() {
        let out = got.as_deref().unwrap_or(input);
        assert!(
            serde_json::from_str::<Value>(out).is_ok(),
            "JSON broken: {out}"
        );
    }
}

#[test]
fn redaction_of_each_kind_in_text() {
    for (input, want) in [
        (
            "mail john.doe+x@example.co.uk now",
            "mail [REDACTED:email] now",
        ),
        (
            "not an email: a@b, @x.com, x@y.c",
            "not an email: a@b, @x.com, x@y.c",
        ),
        (
            "call (555) 123-4567 or 555.123.4567",
            "call [REDACTED:phone] or [REDACTED:phone]",
        ),
        (
            "intl +44 20 7946 0958 and +15551234567",
            "intl [REDACTED:phone] and [REDACTED:phone]",
        ),
        (
            "not phones: 1700000000, 3.141592653589793, 2024-01-15, 10.0.0.1",
            "not phones: 1700000000, 3.141592653589793, 2024-01-15, 10.0.0.1",
        ),
        (
            "uuid 123e4567-e89b-12d3-a456-426614174000",
            "uuid 123e4567-e89b-12d3-a456-426614174000",
        ),
        (
            "card 4111 1111 1111 1111 / 4111-1111-1111-1111 / 4111111111111111",
            "card [REDACTED:card] / [REDACTED:card] / [REDACTED:card]",
        ),
        ("not a card 4111111111111112", "not a card 4111111111111112"),
        (
            "4111111111111111 12 and 4111 1111 1111 1111 12",
            "[REDACTED:card] 12 and [REDACTED:card] 12",
        ),
        (
            "amex 3782 822463 10005, two 4111 1111 1111 1111 4111 1111 1111 1111",
            "amex [REDACTED:card], two [REDACTED:card] [REDACTED:card]",
        ),
        (
            "too long 41111111111111111111111",
            "too long 41111111111111111111111",
        ),
        ("ssn 123-45-6789", "ssn [REDACTED:ssn]"),
        (
            "not ssn 000-12-3456 666-12-3456",
            "not ssn 000-12-3456 666-12-3456",
        ),
        (
            "iban DE89 3704 0044 0532 0130 00 and GB82WEST12345698765432",
            "iban [REDACTED:iban] and [REDACTED:iban]",
        ),
        (
            "not iban DE00370400440532013000",
            "not iban DE00370400440532013000",
        ),
        ("key AKIAIOSFODNN7EXAMPLE!", "key [REDACTED:aws_key]!"),
        (
            "pat dapi0123456789abcdef0123456789abcdef-2 x",
            "pat [REDACTED:databricks_token] x",
        ),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.abc_-123 end",
            "jwt [REDACTED:jwt] end",
        ),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\nafter",
            "[REDACTED:private_key]\nafter",
        ),
        (
            "-----BEGIN PRIVATE KEY-----\nMIIBcut",
            "[REDACTED:private_key]",
        ),
        (
            "password=hunter2&user=bob",
            "password=[REDACTED:password]&user=bob",
        ),
        (
            "db_password: s3cr3t next",
            "db_password: [REDACTED:password] next",
        ),
        ("API_KEY = 'abc def'", "API_KEY = '[REDACTED:password]'"),
        (
            "passwordless: true, password_hint=x",
            "passwordless: true, password_hint=x",
        ),
        ("plain words only", "plain words only"),
        ("", ""),
    ] {
        check_redact(input, want);
    }
}

#[test]
fn redaction_keeps_json_valid() {
    for (input, want) in [
        (
            r#"{"email":"a.b@corp.com","n":1}"#,
            r#"{"email":"[REDACTED:email]","n":1}"#,
        ),
        (
            r#"{"t":"line\na.b@corp.com\u0041"}"#,
            r#"{"t":"line\n[REDACTED:email]\u0041"}"#,
        ),
        (r#"{"t":"x\\a@b.io"}"#, r#"{"t":"x\\[REDACTED:email]"}"#),
        (
            // A JSON number is a card number only under a card key (else a timestamp or an id).
            r#"{"card":4111111111111111,"card_neg":-4111111111111111,"f":4111111111111111.5,"id":4111111111111111}"#,
            r#"{"card":"[REDACTED:card]","card_neg":"[REDACTED:card]","f":4111111111111111.5,"id":4111111111111111}"#,
        ),
        (
            // Keys are matched on whole tokens: `discard` names no card, `paid` no id.
            r#"{"discard":4111111111111111,"cardNumber":4111111111111111,"paid":"4111111111111111","spanId":"4111111111111111"}"#,
            r#"{"discard":4111111111111111,"cardNumber":"[REDACTED:card]","paid":"[REDACTED:card]","spanId":"4111111111111111"}"#,
        ),
        (
            r#"{"password": "p\"w\\d", "client_secret":"abc","max_tokens":100}"#,
            r#"{"password": "[REDACTED:password]", "client_secret":"[REDACTED:password]","max_tokens":100}"#,
        ),
        (
            r#"{"arguments":"{\"api_key\":\"sk-123\",\"q\":1}"}"#,
            r#"{"arguments":"{\"api_key\":\"[REDACTED:password]\",\"q\":1}"}"#,
        ),
        (
            r#"{"k":"-----BEGIN EC PRIVATE KEY-----\nAAA\n-----END EC PRIVATE KEY-----"}"#,
            r#"{"k":"[REDACTED:private_key]"}"#,
        ),
        (
            r#"{"k":"-----BEGIN PRIVATE KEY-----\nAAA","z":"ok"}"#,
            r#"{"k":"[REDACTED:private_key]","z":"ok"}"#,
        ),
        (
            r#"["token: eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "+1 555 123 4567"]"#,
            r#"["token: [REDACTED:jwt]", "[REDACTED:phone]"]"#,
        ),
        (
            r#"{"u":"https://x.com/a?password=abc\u0026b=1"}"#,
            r#"{"u":"https://x.com/a?password=[REDACTED:password]\u0026b=1"}"#,
        ),
    ] {
        check_redact(input, want);
    }
}

#[test]
fn redact_kinds_narrow_and_parse() {
    assert_eq!(parse_kinds("").unwrap(), RedactKind::ALL.to_vec());
    assert_eq!(
        parse_kinds(" email , secret ").unwrap(),
        vec![
            RedactKind::Email,
            RedactKind::AwsKey,
            RedactKind::DatabricksToken,
            RedactKind::Jwt,
            RedactKind::PrivateKey,
            RedactKind::Password
        ]
    );
    let err = parse_kinds("email,creditcard").unwrap_err();
    assert!(err.to_string().contains("creditcard") && err.to_string().contains("REDACT_KINDS"));
    let only_email = Redactor::new(&parse_kinds("email").unwrap());
    let mut c = RedactionCounts::default();
    let out = only_email
        .redact_text("a@b.io 4111111111111111 password=x", &mut c)
        .unwrap();
    assert_eq!(out, "[REDACTED:email] 4111111111111111 password=x");
    assert_eq!((c.get(RedactKind::Email), c.total()), (1, 1));
    assert_eq!(Redactor::new(&[]).redact_text("a@b.io", &mut c), None);
}

#[test]
fn redact_mapped_records_keeps_structure() {
    let req = r#"{"messages":[{"role":"user","content":"I am jane@corp.com, card 4111 1111 1111 1111"}]}"#;
    let resp = r#"{"output":[{"type":"function_call","call_id":"c1","name":"pay","arguments":"{\"iban\":\"GB82WEST12345698765432\"}"},
        {"type":"function_call_output","call_id":"c1","output":"ok, ssn 123-45-6789"}]}"#;
    let mut e = exec(Some(req), Some(resp));
    e.requester = Some("jane@corp.com".into());
    e.request_id = "4111111111111111".into(); // structural headers are never touched
    let mut m = map_execution(&ctx(), &e, &MapOptions::default());
    let counts = Redactor::default().redact_mapped(&mut m, MAX_STRING_BYTES);
    assert_eq!(counts.get(RedactKind::Email), 2);
    assert_eq!(counts.get(RedactKind::Card), 1);
    assert_eq!(counts.get(RedactKind::Iban), 2);
    assert_eq!(counts.get(RedactKind::Ssn), 2);
    for r in &m.records {
        validate(r).unwrap();
        let all = encode(r);
        for planted in ["jane@corp.com", "4111 1111", "GB82WEST", "123-45-6789"] {
            assert!(!all.contains(planted), "{planted} in {all}");
        }
        serde_json::from_str::<Value>(&r.request_payload.text()).unwrap();
    }
    let main = readable(&m.records[0]);
    assert_eq!(
        main["requestHeaders"]["x-databricks-requester"],
        json!("[REDACTED:email]")
    );
    assert_eq!(
        main["requestHeaders"]["x-databricks-request-id"],
        json!("4111111111111111")
    );
    assert_eq!(main["requestHeaders"]["host"], json!(HOST));
    // Growth past the limit is cut again.
    let mut m = map_execution(
        &ctx(),
        &exec(Some("a@b.io ".repeat(20).as_str()), None),
        &MapOptions::default(),
    );
    Redactor::default().redact_mapped(&mut m, 100);
    assert!(m.records[0].request_payload.text().len() <= 100);
    assert_eq!(m.truncated_payloads, 1);
}

/// Strings mixing planted values with JSON-hostile characters.
fn arb_text() -> impl Strategy<Value = String> {
    let frag = prop_oneof![
        Just("jane.doe@example.com".to_string()),
        Just("4111 1111 1111 1111".to_string()),
        Just("555-123-4567".to_string()),
        Just("123-45-6789".to_string()),
        Just("GB82WEST12345698765432".to_string()),
        Just("AKIAIOSFODNN7EXAMPLE".to_string()),
        Just("dapi0123456789abcdef0123456789abcdef".to_string()),
        Just("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig".to_string()),
        Just("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY-----".to_string()),
        Just("password=hunter2".to_string()),
        Just("{\"api_key\":\"zq9secretzq9\"}".to_string()),
        Just("\"".to_string()),
        Just("\\".to_string()),
        Just("\n".to_string()),
        Just("\u{1}".to_string()),
        Just(":".to_string()),
        Just("=".to_string()),
        Just(" ".to_string()),
        Just("-".to_string()),
        "[a-zA-Z0-9@.+()_-]{0,8}",
        any::<char>().prop_map(String::from),
    ];
    let sep = prop_oneof![
        Just(" "),
        Just("\n"),
        Just("\""),
        Just("\\"),
        Just(","),
        Just(":"),
        Just("="),
        Just("\t"),
        Just("("),
        Just("/"),
    ];
    prop::collection::vec((frag, sep), 0..12)
        .prop_map(|v| v.into_iter().map(|(f, s)| f + s).collect())
}

/// `json` (as serde_json writes it) re-escaped the way .NET's System.Text.Json writes strings:
/// `"` as `\u0022`, and `+`, `'`, `<`, `>`, `&` as `\u00XX`.
fn dotnet_escaped(json: &str) -> String {
    let mut out = String::with_capacity(json.len() * 2);
    let mut in_string = false;
    let mut chars = json.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_string = !in_string;
                out.push(c);
            }
            '\\' if in_string => match chars.next() {
                Some('"') => out.push_str("\\u0022"),
                Some(e) => {
                    out.push('\\');
                    out.push(e);
                }
                None => out.push('\\'),
            },
            '+' | '\'' | '<' | '>' | '&' if in_string => {
                out.push_str(&format!("\\u{:04X}", u32::from(c)));
            }
            _ => out.push(c),
        }
    }
    out
}

fn arb_text_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        arb_text().prop_map(Value::String),
        any::<i64>().prop_map(Value::from),
        Just(json!({ "card_number": 4_111_111_111_111_111i64 })),
        Just(json!({ "cardNumber": -4_111_111_111_111_111i64 })),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (prop_oneof![arb_text(), Just("password".to_string())], inner),
                0..5
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// JSON documents whose strings end in backslashes and quotes (`"C:\\keys\\"`), with
/// `hunter2...` planted only as values of secret names.
fn arb_backslashed_json() -> impl Strategy<Value = Value> {
    let text = prop_oneof![
        Just("x\\".to_string()),
        Just("C:\\keys\\".to_string()),
        Just("\\".to_string()),
        Just("\\\\\\".to_string()),
        Just("a\"".to_string()),
        Just("\\\"".to_string()),
        Just("\"\\".to_string()),
        Just("weather in Paris".to_string()),
        "[a-z\\\\\"{}:, ]{0,8}",
    ];
    let secret = text
        .clone()
        .prop_map(|t| Value::String(format!("hunter2{t}")));
    let leaf = prop_oneof![
        text.prop_map(Value::String),
        any::<i32>().prop_map(Value::from),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        let plain = (
            prop_oneof![Just("q"), Just("dir"), Just("n")],
            inner.clone(),
        );
        let hidden = (
            prop_oneof![Just("password"), Just("credentials"), Just("api_key")],
            prop_oneof![secret.clone(), inner.clone()],
        );
        prop_oneof![
            prop::collection::vec(inner, 0..4).prop_map(Value::Array),
            (
                prop::collection::vec(plain, 0..4),
                prop::collection::vec(hidden, 0..2)
            )
                .prop_map(|(a, b)| {
                    Value::Object(
                        a.into_iter()
                            .chain(b)
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                    )
                }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn redaction_keeps_json_inside_strings_parseable_at_every_level(
        v in arb_backslashed_json(),
        levels in 1usize..=3,
    ) {
        // `{"arguments": "<v as JSON>"}`, one to three levels deep.
        let mut text = v.to_string();
        for _ in 0..levels {
            text = json!({ "arguments": text }).to_string();
        }
        let mut c = RedactionCounts::default();
        let out = Redactor::default().redact_text(&text, &mut c).unwrap_or_else(|| text.clone());
        prop_assert!(!out.contains("hunter2"), "hunter2 left in {} from {}", out, text);
        let mut doc = out.clone();
        for level in 0..levels {
            let outer: Result<Value, _> = serde_json::from_str(&doc);
            prop_assert!(outer.is_ok(), "level {} broken: {} from {}", level, out, text);
            let inner = outer.unwrap_or_default()["arguments"].as_str().map(str::to_string);
            prop_assert!(inner.is_some(), "level {} lost its string: {}", level, out);
            doc = inner.unwrap_or_default();
        }
        let innermost: Result<Value, _> = serde_json::from_str(&doc);
        prop_assert!(innermost.is_ok(), "innermost JSON broken: {} from {}", out, text);
    }

    #[test]
    fn redaction_never_breaks_json_and_removes_planted_values(v in arb_text_json(), pretty in any::<bool>()) {
        let text = if pretty { serde_json::to_string_pretty(&v).unwrap() } else { v.to_string() };
        let mut c = RedactionCounts::default();
        let out = Redactor::default().redact_text(&text, &mut c).unwrap_or_else(|| text.clone());
        let back: Result<Value, _> = serde_json::from_str(&out);
        prop_assert!(back.is_ok(), "broken JSON {} from {}", out, text);
        for planted in ["jane.doe@example.com", "4111 1111 1111 1111", "123-45-6789",
                        "GB82WEST12345698765432", "AKIAIOSFODNN7EXAMPLE", "dapi0123456789abcdef",
                        "eyJhbGciOiJIUzI1NiJ9", "MIIEvQIBADANBg", "hunter2", "4111111111111111",
                        "zq9secretzq9"] {
            prop_assert!(!out.contains(planted), "{} left in {}", planted, out);
        }
    }

    #[test]
    fn redaction_of_json_escaped_the_dotnet_way_removes_planted_values(v in arb_text_json()) {
        let text = dotnet_escaped(&v.to_string());
        prop_assert_eq!(serde_json::from_str::<Value>(&text).ok(), Some(v));
        let mut c = RedactionCounts::default();
        let out = Redactor::default().redact_text(&text, &mut c).unwrap_or_else(|| text.clone());
        let back: Result<Value, _> = serde_json::from_str(&out);
        prop_assert!(back.is_ok(), "broken JSON {} from {}", out, text);
        for planted in ["jane.doe@example.com", "4111 1111 1111 1111", "123-45-6789",
                        "GB82WEST12345698765432", "AKIAIOSFODNN7EXAMPLE", "dapi0123456789abcdef",
                        "eyJhbGciOiJIUzI1NiJ9", "MIIEvQIBADANBg", "hunter2", "4111111111111111",
                        "zq9secretzq9"] {
            prop_assert!(!out.contains(planted), "{} left in {}", planted, out);
        }
    }

    #[test]
    fn redaction_of_any_text_never_panics(s in any::<String>(), t in arb_text()) {
        let mut c = RedactionCounts::default();
        let r = Redactor::default();
        let _ = r.redact_text(&s, &mut c);
        let out = r.redact_text(&t, &mut c).unwrap_or(t.clone());
        prop_assert!(!out.contains("jane.doe@example.com"));
    }
}

/// Strings rich in what JSON escapes: quotes, backslashes, every control character, multi-byte
/// characters at every offset of an eight-byte word.
fn arb_escapable() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("\"".to_string()),
        Just("\\".to_string()),
        (0u8..0x20).prop_map(|b| char::from(b).to_string()),
        Just("\u{7f}".to_string()),
        Just("é".to_string()),
        Just("€".to_string()),
        Just("😀".to_string()),
        "[a-z{}:,\\[\\] ]{0,12}",
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn json_strings_are_escaped_exactly_as_serde_json_does(s in prop_oneof![arb_escapable(), any::<String>()]) {
        let mut out = String::new();
        crate::json::write_json_str(&mut out, &s);
        prop_assert_eq!(&out, &serde_json::to_string(&s).unwrap());
        let back: String = serde_json::from_str(&out).unwrap();
        prop_assert_eq!(back, s);
    }

    #[test]
    fn records_encode_to_the_bytes_serde_json_writes(req in arb_escapable(), resp in any::<String>(), tag in arb_escapable()) {
        let mut r = good();
        r.request_payload = req.into();
        r.response_payload = resp.into();
        r.tag = tag;
        prop_assert_eq!(encode(&r), serde_json::to_string(&r).unwrap());
    }
}

proptest! {
    #[test]
    fn header_objects_encode_like_a_sorted_map(kv in prop::collection::vec(("[A-Za-z-]{0,6}", arb_escapable()), 0..8)) {
        let mut o = super::record::JsonObject::default();
        let mut want: BTreeMap<String, String> = BTreeMap::new();
        let mut cut = 0;
        for (k, v) in &kv {
            o.set(k, v, &mut cut);
            let mut c2 = 0;
            want.insert(k.to_ascii_lowercase(), super::record::fit(v, 4096, &mut c2));
        }
        prop_assert_eq!(o.encode(), serde_json::to_string(&want).unwrap());
    }
}

#[test]
fn taking_the_payloads_maps_exactly_like_borrowing_them() {
    let resp = json!({"output": [
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{\"q\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "{\"ok\":true}"}
    ]})
    .to_string();
    let big = format!("{{\"input\":\"{}\"}}", "x".repeat(300));
    for (req, resp, max) in [
        (
            Some("{\"input\":[]}"),
            Some(resp.as_str()),
            MAX_STRING_BYTES,
        ),
        (Some(big.as_str()), Some(resp.as_str()), 100),
        (None, None, MAX_STRING_BYTES),
        (Some("not json"), Some("{broken"), MAX_STRING_BYTES),
    ] {
        let opts = MapOptions {
            tool_calls: true,
            max_string_bytes: max,
        };
        let mut e = exec(req, resp);
        let want = map_execution(&ctx(), &e, &opts);
        let got = map_execution_taking(&ctx(), &mut e, &opts);
        assert_eq!(got, want, "{req:?} {resp:?} {max}");
        assert!(e.request.is_none() && e.response.is_none());
    }
}

#[test]
fn the_record_payload_budget_is_akto_body_limit_less_room_for_the_other_fields() {
    assert_eq!(
        super::record::MAX_RECORD_PAYLOAD_BYTES,
        crate::sink::MAX_BODY_BYTES - (64 << 10)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_pair_of_payloads_is_cut_to_the_budget_with_markers_naming_the_originals(
        a in arb_escapable(), b in arb_escapable(), reps_a in 1usize..400, reps_b in 1usize..400,
        budget in 400usize..20_000,
    ) {
        let (a, b) = (a.repeat(reps_a), b.repeat(reps_b));
        let mut cut = 0;
        let (x, y) = super::record::fit_pair((a.as_str().into(), a.len()), (b.as_str().into(), b.len()), budget, &mut cut);
        // Escaped length is what serde_json writes, quotes aside.
        prop_assert_eq!(x.literal(), serde_json::to_string(&x.text()).unwrap());
        let total = x.escaped_len() + y.escaped_len();
        prop_assert!(total <= budget, "{} > {}", total, budget);
        let (x, y) = (x.text().into_owned(), y.text().into_owned());
        for (orig, got) in [(&a, &x), (&b, &y)] {
            if got == orig {
                continue;
            }
            let marker = super::record::truncation_marker(orig.len());
            prop_assert!(got.ends_with(&marker) || got.len() < marker.len(), "{}", got);
            let prefix = got.strip_suffix(&marker).unwrap_or(got);
            prop_assert!(orig.starts_with(prefix));
        }
        prop_assert_eq!(cut as usize, usize::from(x != a) + usize::from(y != b));
    }
}

#[test]
fn an_execution_with_two_huge_payloads_still_fits_one_akto_request() {
    // Request and response of 6 MiB each, JSON full of quotes: each is cut to Akto's 5 MiB string
    // limit, and then both further so the record fits alone in a 10 MiB body.
    let big = |k: &str| format!("{{\"{k}\":[{}\"end\"]}}", "\"q\",".repeat(3 << 19));
    let (req, resp) = (big("input"), big("output"));
    let e = exec(Some(&req), Some(&resp));
    let m = map_execution(&ctx(), &e, &MapOptions::default());
    let r = &m.records[0];
    validate(r).unwrap();
    let body = format!("{{\"batchData\":[{}]}}", encode(r));
    assert!(body.len() <= crate::sink::MAX_BODY_BYTES, "{}", body.len());
    assert!(akto_standin::check_batch(body.as_bytes()).is_ok());
    assert_eq!(m.truncated_payloads, 2);
    assert!(r
        .request_payload
        .text()
        .ends_with(&super::record::truncation_marker(req.len())));
    assert!(r
        .response_payload
        .text()
        .ends_with(&super::record::truncation_marker(resp.len())));
}

#[test]
fn a_record_over_a_sink_limit_is_cut_to_fit_and_markers_keep_the_first_original() {
    // A 900 KB response and 300 KB request, e.g. for a Kafka topic limited to 200 KB.
    let resp = format!("{{\"output\":\"{}\"}}", "\"x\" ".repeat(300_000 / 4));
    let req = format!("{{\"input\":\"{}\"}}", "y".repeat(300_000));
    let m = map_execution(
        &ctx(),
        &exec(Some(&req), Some(&resp)),
        &MapOptions::default(),
    );
    let mut r = m.records[0].clone();
    let len = encode(&r).len();
    let mut cuts = 0;
    assert!(fit_record(&mut r, len, len, &mut cuts), "fits already");
    assert_eq!(
        (cuts, encode(&r).len()),
        (0, len),
        "nothing cut when it fits"
    );

    assert!(fit_record(&mut r, len, 200_000, &mut cuts));
    let once = encode(&r);
    assert!(once.len() <= 200_000, "{}", once.len());
    assert_eq!(cuts, 2);
    validate(&r).unwrap();
    let resp_text = r.response_payload.text().into_owned();
    assert!(resp_text.ends_with(&super::record::truncation_marker(resp.len())));
    assert!(resp.starts_with(resp_text.split("...[truncated").next().unwrap()));
    assert!(r
        .request_payload
        .text()
        .ends_with(&super::record::truncation_marker(req.len())));
    // Cut again (a smaller limit): the markers still name the first original sizes, and a
    // payload cut before is not counted again.
    assert!(fit_record(&mut r, once.len(), 100_000, &mut cuts));
    assert!(encode(&r).len() <= 100_000);
    assert_eq!(cuts, 2);
    assert!(r
        .response_payload
        .text()
        .ends_with(&super::record::truncation_marker(resp.len())));
    // No room for payloads at all: left as it was, and the caller quarantines it.
    let before = r.clone();
    let len = encode(&r).len();
    assert!(!fit_record(&mut r, len, 300, &mut cuts));
    assert_eq!(r, before);
}

#[test]
fn a_short_payload_next_to_a_huge_one_is_never_cut() {
    // A prompt of a few bytes and a 2 MB response against a 1 MB limit: only the response is cut.
    let resp = format!("{{\"output\":\"{}\"}}", "z".repeat(2_000_000));
    let req = "{\"input\":\"hi\"}";
    let m = map_execution(
        &ctx(),
        &exec(Some(req), Some(&resp)),
        &MapOptions::default(),
    );
    let mut r = m.records[0].clone();
    let len = encode(&r).len();
    let mut cuts = 0;
    assert!(fit_record(&mut r, len, 1_000_000, &mut cuts));
    assert_eq!(r.request_payload, req);
    assert_eq!(cuts, 1);
    let out = encode(&r);
    assert!(
        out.len() <= 1_000_000 && out.len() > 900_000,
        "{}",
        out.len()
    );
}

#[test]
fn a_payload_escaped_longer_than_serde_json_would_is_measured_as_serde_json_writes_it() {
    // 300k × "é": 600 KB of text, 1.8 MB as `\u00e9` escapes, 600 KB as serde_json writes it.
    let literal = format!("\"{}\"", "\\u00e9".repeat(300_000));
    let mut d = serde_json::Deserializer::from_str(&literal);
    let long = crate::json::deserialize_literal(&mut d).unwrap().unwrap();
    let mut cuts = 0;
    let (x, y) = super::record::fit_pair(
        (long.clone(), long.text_len()),
        (JsonString::empty(), 0),
        1_000_000,
        &mut cuts,
    );
    assert_eq!(cuts, 0, "it fits once escaped the usual way");
    assert_eq!(x, long);
    assert!(x.escaped_len() <= 1_000_000);
    assert!(y.text().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Cut JSON requests: Akto drops a request it takes for incomplete JSON when it is sent as JSON.

/// The request `content-type` of a record.
fn request_content_type(r: &AktoRecord) -> Option<String> {
    readable(r)["requestHeaders"]["content-type"]
        .as_str()
        .map(str::to_string)
}

/// The record passes `validate` and the strict stand-in (which refuses what Akto drops).
fn akto_keeps(r: &AktoRecord) {
    validate(r).unwrap_or_else(|v| panic!("{v}"));
    let v: Value = serde_json::from_str(&encode(r)).unwrap();
    akto_standin::check_record(&v).unwrap_or_else(|e| panic!("the stand-in refused: {e}"));
}

#[test]
fn a_cut_json_request_goes_out_as_text_and_akto_keeps_it() {
    let req = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(800)
    );
    let args = serde_json::to_string(&json!({"q": "y".repeat(800)})).unwrap();
    let resp = json!({"output": [{"type": "function_call", "call_id": "c1", "name": "search",
        "arguments": args}]})
    .to_string();
    let opts = MapOptions {
        tool_calls: true,
        max_string_bytes: 301,
    };
    let m = map_execution(&ctx(), &exec(Some(&req), Some(&resp)), &opts);
    assert_eq!(m.records.len(), 2);
    for r in &m.records {
        assert!(r.request_payload.text().starts_with('{'));
        assert!(r.request_payload.text().ends_with(" bytes]"));
        assert_eq!(request_content_type(r).as_deref(), Some("text/plain"));
        akto_keeps(r);
    }
    // Uncut, the same execution stays JSON.
    let m = map_execution(
        &ctx(),
        &exec(Some(&req), Some(&resp)),
        &MapOptions::default(),
    );
    for r in &m.records {
        assert_eq!(request_content_type(r).as_deref(), Some("application/json"));
        akto_keeps(r);
    }
    // Whole JSON followed by a newline (Akto without a trim sees it end with `\n`), and JSON a
    // model broke in its tool-call arguments: text too.
    let resp = json!({"output": [{"type": "function_call", "call_id": "c1", "name": "search",
        "arguments": "{\"q\": \"unfinished"}]})
    .to_string();
    let m = map_execution(
        &ctx(),
        &exec(Some("{\"a\":1}\n"), Some(&resp)),
        &MapOptions::default(),
    );
    assert_eq!(m.records.len(), 2);
    for r in &m.records {
        assert_eq!(request_content_type(r).as_deref(), Some("text/plain"));
        akto_keeps(r);
    }
}

#[test]
fn a_json_request_cut_for_a_sink_limit_goes_out_as_text() {
    // A Kafka topic limited to 200 KB: the 300 KB JSON request is cut by `fit_record`.
    let req = format!("{{\"input\":\"{}\"}}", "y".repeat(300_000));
    let m = map_execution(
        &ctx(),
        &exec(Some(&req), Some("{\"output\":\"ok\"}")),
        &MapOptions::default(),
    );
    let mut r = m.records[0].clone();
    assert_eq!(
        request_content_type(&r).as_deref(),
        Some("application/json")
    );
    let mut cuts = 0;
    let len = encode(&r).len();
    assert!(fit_record(&mut r, len, 200_000, &mut cuts));
    assert_eq!(cuts, 1);
    assert!(encode(&r).len() <= 200_000);
    assert_eq!(request_content_type(&r).as_deref(), Some("text/plain"));
    akto_keeps(&r);
    // The other headers are kept as they were.
    let before = readable(&m.records[0])["requestHeaders"].clone();
    let mut after = readable(&r)["requestHeaders"].clone();
    after["content-type"] = json!("application/json");
    assert_eq!(after, before);
}

#[test]
fn a_json_request_cut_again_after_redaction_goes_out_as_text() {
    let req = format!("{{\"input\":\"{}\"}}", "a@b.io ".repeat(20));
    let mut m = map_execution(&ctx(), &exec(Some(&req), None), &MapOptions::default());
    assert_eq!(
        request_content_type(&m.records[0]).as_deref(),
        Some("application/json")
    );
    Redactor::default().redact_mapped(&mut m, 100);
    assert_eq!(m.truncated_payloads, 1);
    assert_eq!(
        request_content_type(&m.records[0]).as_deref(),
        Some("text/plain")
    );
    akto_keeps(&m.records[0]);
}

#[test]
fn settling_the_content_type_changes_only_a_json_one_of_an_incomplete_request() {
    let with = |payload: &str, headers: &str| {
        let mut r = good();
        r.request_payload = payload.into();
        r.request_headers = headers.into();
        let changed = settle_request_content_type(&mut r);
        (changed, r.request_headers)
    };
    let json_ct = format!(r#"{{"content-type":"application/json","host":"{HOST}"}}"#);
    let text_ct = format!(r#"{{"content-type":"text/plain","host":"{HOST}"}}"#);
    let no_ct = format!(r#"{{"host":"{HOST}"}}"#);
    let html = format!(r#"{{"content-type":"text/html","host":"{HOST}"}}"#);
    assert_eq!(with("{\"a\":", &json_ct), (true, text_ct.clone()));
    assert_eq!(with("[1,", &no_ct), (true, text_ct.clone()));
    assert_eq!(with("{\"a\":", &html), (false, html.clone()));
    assert_eq!(with("{\"a\":1}", &json_ct), (false, json_ct.clone()));
    assert_eq!(with("", &no_ct), (false, no_ct.clone()));
    assert_eq!(with("plain", &json_ct), (false, json_ct.clone()));
}

#[test]
fn validate_refuses_a_json_request_akto_would_drop_as_incomplete() {
    for payload in ["{\"a\":", "[1,", "{\"a\":1}\n", " {\"a\":"] {
        for headers in [
            format!(r#"{{"content-type":"application/json","host":"{HOST}"}}"#),
            format!(r#"{{"host":"{HOST}"}}"#),
        ] {
            let mut r = good();
            r.request_payload = payload.into();
            r.request_headers = headers;
            let err = validate(&r).expect_err(payload);
            assert_eq!(err.field, "requestPayload", "{err}");
            assert!(err.to_string().contains("incomplete JSON"), "{err}");
            assert!(err.to_string().contains("text/plain"), "{err}");
        }
        let mut r = good();
        r.request_payload = payload.into();
        r.request_headers = format!(r#"{{"content-type":"text/plain","host":"{HOST}"}}"#);
        assert_eq!(validate(&r), Ok(()));
    }
    // The response body is not checked by Akto.
    let mut r = good();
    r.response_payload = "{\"a\":".into();
    assert_eq!(validate(&r), Ok(()));
}

// ---- What Akto's runtime keeps (`for_akto_runtime`) ----

/// `r` as sent, decoded for expectations; and whether it was rewritten.
fn as_sent(r: &AktoRecord) -> (Value, bool) {
    let sent = for_akto_runtime(r);
    let owned = matches!(sent, std::borrow::Cow::Owned(_));
    (readable(&sent), owned)
}

/// The record as sent validates and the independent stand-in accepts it.
fn sent_is_kept(r: &AktoRecord) {
    let sent = for_akto_runtime(r);
    validate(&sent).unwrap_or_else(|v| panic!("{v}: {sent:?}"));
    let v: Value = serde_json::from_str(&encode(&sent)).unwrap();
    akto_standin::check_record(&v).unwrap_or_else(|e| panic!("the stand-in refused: {e}"));
    // Applying it again changes nothing.
    assert!(matches!(
        for_akto_runtime(&sent),
        std::borrow::Cow::Borrowed(_)
    ));
}

/// Percent-decodes the escapes of RFC 3986 unreserved characters (the normalization under which
/// two URLs are equivalent).
fn normalized(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        if let (b'%', Some(h), Some(l)) = (b[i], b.get(i + 1), b.get(i + 2)) {
            if let (Some(h), Some(l)) = (hex(*h), hex(*l)) {
                let v = (h * 16 + l) as u8;
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    out.push(v);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn a_common_record_is_sent_as_is_without_a_copy() {
    let e = exec(
        Some(r#"{"messages":[{"role":"user","content":"hi"}]}"#),
        Some(
            r#"{"output":[{"type":"function_call","call_id":"c1","name":"lookup","arguments":"{\"q\":1}"},{"type":"function_call_output","call_id":"c1","output":"ok"}]}"#,
        ),
    );
    let m = map_execution(&ctx(), &e, &MapOptions::default());
    assert_eq!(m.records.len(), 2);
    for r in &m.records {
        let sent = for_akto_runtime(r);
        assert!(matches!(sent, std::borrow::Cow::Borrowed(_)), "{r:?}");
        assert!(std::ptr::eq(&*sent, r));
        validate(r).unwrap();
    }
}

#[test]
fn a_status_akto_drops_goes_out_as_200_with_the_real_code_in_a_header() {
    // (row status, response, sent x-databricks-status-code)
    let cases: [(Option<i64>, Option<&str>, Option<&str>); 9] = [
        (Some(200), Some("{}"), None),
        (Some(204), Some("{}"), None),
        (Some(302), Some("{}"), None),
        (Some(301), Some("{}"), Some("301")),
        (
            Some(400),
            Some(r#"{"error_code":"BAD_REQUEST"}"#),
            Some("400"),
        ),
        (
            Some(429),
            Some(r#"{"error_code":"REQUEST_LIMIT_EXCEEDED"}"#),
            Some("429"),
        ),
        (Some(500), None, Some("500")),
        (Some(199), Some("{}"), Some("199")),
        // No response and no code: built as 500, the header already says `missing`: kept.
        (None, None, Some("missing")),
    ];
    for (code, resp, header) in cases {
        let mut e = exec(Some("{}"), resp);
        e.status_code = code;
        let m = map_execution(&ctx(), &e, &MapOptions::default());
        let (sent, owned) = as_sent(&m.records[0]);
        assert_eq!(owned, header.is_some(), "{code:?}");
        let want_code = if header.is_some() {
            "200".to_string()
        } else {
            code.unwrap_or(200).to_string()
        };
        assert_eq!(sent["statusCode"], json!(want_code), "{code:?}");
        if header.is_some() {
            assert_eq!(sent["status"], json!("OK"));
        }
        assert_eq!(
            sent["responseHeaders"]["x-databricks-status-code"].as_str(),
            header,
            "{code:?}"
        );
        // The rest of the record is untouched.
        let built = readable(&m.records[0]);
        for k in [
            "path",
            "requestHeaders",
            "requestPayload",
            "responsePayload",
            "time",
            "tag",
        ] {
            assert_eq!(sent[k], built[k], "{k}");
        }
        let mut rest = built["responseHeaders"].as_object().unwrap().clone();
        rest.remove("x-databricks-status-code");
        for (k, v) in rest {
            assert_eq!(sent["responseHeaders"][&k], v, "{k}");
        }
        sent_is_kept(&m.records[0]);
    }
}

#[test]
fn an_error_tool_call_keeps_its_error_headers_and_goes_out_as_200() {
    let resp = r#"{"output":[{"type":"function_call","call_id":"c1","name":"pay","arguments":"{}"},
        {"type":"function_call_output","call_id":"c1","output":"{\"error\":\"card declined\"}"},
        {"type":"function_call","call_id":"c2","name":"lookup","arguments":"{}"}]}"#;
    let m = map_execution(
        &ctx(),
        &exec(Some("{}"), Some(resp)),
        &MapOptions::default(),
    );
    assert_eq!(m.records.len(), 3);
    assert_eq!(m.records[1].status_code, "500", "built with the error code");
    let (sent, owned) = as_sent(&m.records[1]);
    assert!(owned);
    assert_eq!(sent["statusCode"], json!("200"));
    assert_eq!(
        sent["responseHeaders"]["x-databricks-status-code"],
        json!("500")
    );
    // The call without output keeps its `x-tool-output: missing`.
    let (missing, _) = as_sent(&m.records[2]);
    assert_eq!(
        missing["responseHeaders"]["x-tool-output"],
        json!("missing")
    );
    for r in &m.records {
        sent_is_kept(r);
    }
}

#[test]
fn health_and_static_file_paths_are_encoded_to_an_equivalent_url() {
    // (path as built, path as sent)
    let cases = [
        (
            "/serving-endpoints/healthcare-assistant/invocations",
            "/serving-endpoints/%68ealthcare-assistant/invocations",
        ),
        ("/tools/health_check", "/tools/%68ealth_check"),
        ("/tools/HEALTH", "/tools/%48EALTH"),
        (
            "/tables/c.health.t/invocations",
            "/tables/c.health.t/invocations",
        ),
        ("/health/x/Health/y", "/%68ealth/x/%48ealth/y"),
        ("/tables/c.s.json", "/tables/c.s%2Ejson"),
        ("/tools/app.JS", "/tools/app%2EJS"),
        ("/tools/bundle.js.map", "/tools/bundle%2Ejs.map"),
        ("/tools/x..json", "/tools/x%2E%2Ejson"),
        ("/tools/a.png?x=1", "/tools/a%2Epng?x=1"),
        ("/tools/healthy.html", "/tools/%68ealthy%2Ehtml"),
        ("/tools/lookup.jsx", "/tools/lookup.jsx"),
        ("/tools/x.json.bak", "/tools/x.json.bak"),
    ];
    for (built, want) in cases {
        let mut r = good();
        r.path = built.to_string();
        let (sent, owned) = as_sent(&r);
        assert_eq!(sent["path"], json!(want), "{built}");
        assert_eq!(owned, built != want, "{built}");
        assert_eq!(normalized(want), built, "equivalent URL");
        if built != want {
            let err = validate(&r).expect_err(built);
            assert_eq!(err.field, "path", "{err}");
            assert!(
                err.reason.contains("filterHttpResponseParams")
                    || err.reason.contains("allowRedundantEndpointsList"),
                "{err}"
            );
        }
        sent_is_kept(&r);
    }
}

proptest! {
    #[test]
    fn no_path_is_left_for_akto_to_drop(
        segs in proptest::collection::vec(
            prop_oneof![
                Just("health".to_string()),
                Just("HEALTH".to_string()),
                Just("Health_check".to_string()),
                Just("healthcare-assistant".to_string()),
                Just("x.json".to_string()),
                Just("a.JSON".to_string()),
                Just("m.js.map".to_string()),
                Just("deck..pptx".to_string()),
                Just("i.png?s=1".to_string()),
                Just("f.woff2".to_string()),
                Just("ok.jsx".to_string()),
                Just(".".to_string()),
                "[a-zA-Z0-9._~%-]{0,12}",
                any::<String>(),
            ],
            1..6,
        ),
        tail in prop_oneof![Just(""), Just("/"), Just(".html"), Just(".js"), Just("/health"), Just("?q")],
    ) {
        let built = format!("/{}{tail}", segs.join("/"));
        let mut r = good();
        r.path = built.clone();
        let sent = for_akto_runtime(&r);
        let path = sent.path.clone();
        prop_assert!(!path.to_lowercase().contains("/health"), "{}", path);
        prop_assert!(super::runtime::static_extension_dot(&path).is_none(), "{}", path);
        prop_assert!(!akto_standin::redundant_endpoint(&path), "{}", path);
        prop_assert_eq!(normalized(&path), normalized(&built));
        prop_assert!(validate(&sent).is_ok(), "{:?}", validate(&sent));
        let v: Value = serde_json::from_str(&encode(&sent)).unwrap();
        prop_assert!(akto_standin::check_record(&v).is_ok(), "{:?}", akto_standin::check_record(&v));
        // Untouched when nothing matched.
        let matched = built.to_lowercase().contains("/health")
            || super::runtime::static_extension_dot(&built).is_some();
        prop_assert_eq!(matches!(sent, std::borrow::Cow::Owned(_)), matched);
    }
}

#[test]
fn an_empty_request_body_goes_out_as_text() {
    let with = |payload: &str, headers: String| {
        let mut r = good();
        r.request_payload = payload.into();
        r.request_headers = headers;
        r
    };
    let json_ct = format!(r#"{{"content-type":"application/json","host":"{HOST}"}}"#);
    let no_ct = format!(r#"{{"host":"{HOST}"}}"#);
    let text_ct = format!(r#"{{"content-type":"text/plain","host":"{HOST}"}}"#);
    let other_ct = format!(r#"{{"content-type":"application/xml","host":"{HOST}"}}"#);
    // Akto trims the body first: a `[` followed by whitespace ends it too.
    for payload in [
        "",
        " ",
        "\n\t ",
        "\r\n",
        "see [",
        "[1,[",
        "\u{3000}[a, [\n",
        "[ \t",
    ] {
        for headers in [&json_ct, &no_ct] {
            let r = with(payload, headers.clone());
            let err = validate(&r).expect_err(payload);
            assert_eq!(err.field, "requestPayload", "{err}");
            assert!(err.reason.contains("018552b4"), "{err}");
            let (sent, owned) = as_sent(&r);
            assert!(owned);
            assert_eq!(sent["requestHeaders"]["content-type"], json!("text/plain"));
            assert_eq!(sent["requestHeaders"]["host"], json!(HOST));
            assert_eq!(sent["requestPayload"], json!(payload));
            sent_is_kept(&r);
        }
        for headers in [&text_ct, &other_ct] {
            let r = with(payload, headers.clone());
            assert_eq!(validate(&r), Ok(()));
            assert!(matches!(
                for_akto_runtime(&r),
                std::borrow::Cow::Borrowed(_)
            ));
        }
    }
    // Escapes that decode to whitespace, or to `[`, count too.
    let mut r = with("", no_ct.clone());
    r.request_payload = JsonString::from_raw(serde_json::from_str(r#""\u0020\n""#).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        as_sent(&r).0["requestHeaders"]["content-type"],
        json!("text/plain")
    );
    r.request_payload = JsonString::from_raw(serde_json::from_str(r#""a \u005b""#).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        as_sent(&r).0["requestHeaders"]["content-type"],
        json!("text/plain")
    );
    // A body with content stays as it is.
    for payload in ["{}", "x", " {}", "[1]", r#"{"q":"say \"hi\""}"#, "a\\u005b"] {
        let r = with(payload, json_ct.clone());
        assert!(
            matches!(for_akto_runtime(&r), std::borrow::Cow::Borrowed(_)),
            "{payload:?}"
        );
    }
}

#[test]
fn a_row_with_no_request_reaches_akto() {
    // A NULL request: empty body, built as JSON; sent as text.
    let m = map_execution(&ctx(), &exec(None, Some("{}")), &MapOptions::default());
    let (sent, owned) = as_sent(&m.records[0]);
    assert!(owned);
    assert_eq!(sent["requestHeaders"]["content-type"], json!("text/plain"));
    sent_is_kept(&m.records[0]);
}

#[test]
fn validate_refuses_what_akto_runtime_drops() {
    type Edit = fn(&mut AktoRecord);
    let cases: [(Edit, &str, &str); 5] = [
        (
            |r| r.status_code = "500".into(),
            "statusCode",
            "validHttpResponseCode",
        ),
        (
            |r| r.status_code = "404".into(),
            "statusCode",
            "x-databricks-status-code",
        ),
        (|r| r.path = "/tools/Health".into(), "path", "/health"),
        (
            |r| r.path = "/tools/x.svg".into(),
            "path",
            "redundant-endpoint",
        ),
        (
            |r| r.request_payload = "".into(),
            "requestPayload",
            "text/plain",
        ),
    ];
    for (edit, field, says) in cases {
        let mut r = good();
        edit(&mut r);
        let err = validate(&r).expect_err(field);
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().contains(says), "{err}");
        // ... and the stand-in, independently.
        let v: Value = serde_json::from_str(&encode(&r)).unwrap();
        assert!(akto_standin::check_record(&v).is_err(), "{field}");
        sent_is_kept(&r);
    }
}

#[test]
fn headers_that_are_not_an_object_are_left_for_validate() {
    let mut r = good();
    r.status_code = "500".into();
    r.response_headers = "not json".into();
    let sent = for_akto_runtime(&r);
    assert_eq!(
        sent.status_code, "500",
        "no header to carry the code: left as is"
    );
    assert_eq!(validate(&sent).unwrap_err().field, "statusCode");
}
