use serde_json::{json, Value};

use crate::default_env;

#[tokio::test]
async fn experiments_traces_and_signed_spans() {
    let env = default_env().await;
    let (s, v) = env
        .post(
            "/api/2.0/mlflow/experiments/search",
            json!({"max_results": 100}),
        )
        .await;
    assert_eq!(s, 200);
    let exps = v["experiments"].as_array().unwrap();
    // ResponsesAgent, ChatAgent and app agents (0, 1, 3, 4 of 5) have experiments.
    assert_eq!(exps.len(), 4);
    let exp_id = exps[0]["experiment_id"].as_str().unwrap().to_string();
    assert!(exps[0]["name"].is_string() && exps[0]["tags"].is_array());

    let search = |filter: String, token: Option<String>| {
        let mut b = json!({"locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": exp_id}}],
            "filter": filter, "max_results": 5, "order_by": ["timestamp_ms ASC"]});
        if let Some(t) = token {
            b["page_token"] = json!(t);
        }
        b
    };
    // Page through all traces in ascending time order.
    let mut all: Vec<Value> = Vec::new();
    let mut token = None;
    for _ in 0..20 {
        let (s, v) = env
            .post(
                "/api/3.0/mlflow/traces/search",
                search("trace.timestamp_ms > 0".into(), token.clone()),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        all.extend(v["traces"].as_array().unwrap().iter().cloned());
        match v["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(all.len(), 12);
    let times: Vec<String> = all
        .iter()
        .map(|t| t["request_time"].as_str().unwrap().to_string())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
    let t0 = &all[0];
    for k in [
        "trace_id",
        "client_request_id",
        "request_preview",
        "response_preview",
        "execution_duration",
        "state",
        "trace_metadata",
        "tags",
    ] {
        assert!(!t0[k].is_null(), "{k}");
    }
    assert_eq!(
        t0["trace_location"]["mlflow_experiment"]["experiment_id"],
        exp_id.as_str()
    );
    assert!(t0["execution_duration"].as_str().unwrap().ends_with('s'));
    // The filter really filters.
    let mid = chrono::DateTime::parse_from_rfc3339(&times[8])
        .unwrap()
        .timestamp_millis();
    let (_, v) = env
        .post(
            "/api/3.0/mlflow/traces/search",
            search(format!("trace.timestamp_ms > {mid}"), None),
        )
        .await;
    let n = v["traces"].as_array().unwrap().len();
    assert_eq!(n, 3);
    let (s, _) = env
        .post(
            "/api/3.0/mlflow/traces/search",
            search("trace.colour = 'red'".into(), None),
        )
        .await;
    assert_eq!(s, 400);

    // Spans through the signed URI.
    let id = t0["trace_id"].as_str().unwrap();
    let (s, v) = env
        .get(&format!(
            "/api/2.0/mlflow/traces/{id}/credentials-for-data-download"
        ))
        .await;
    assert_eq!(s, 200);
    let uri = v["credential_info"]["signed_uri"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(v["credential_info"]["headers"].is_array());
    let r = env
        .http
        .get(&uri)
        .bearer_auth(&env.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "must reject the Databricks auth header");
    let r = env.http.get(&uri).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let spans: Value = r.json().await.unwrap();
    let spans = spans["spans"].as_array().unwrap();
    assert!(spans.len() >= 2);
    assert_eq!(spans[0]["attributes"]["mlflow.spanType"], "\"AGENT\"");
    assert!(spans[0]["attributes"]["mlflow.spanInputs"].is_string());
    let r = env
        .http
        .get(uri.replace("X-Amz-Signature=", "X-Amz-Signature=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (s, _) = env
        .get("/api/2.0/mlflow/traces/tr-nope/credentials-for-data-download")
        .await;
    assert_eq!(s, 404);
    env.emu.shutdown().await;
}

/// Some traces describe executions of the agent's inference table: the row's response and the
/// trace's TOOL span carry the same tool call id (and the trace the row's client request id).
#[tokio::test]
async fn some_traces_mirror_inference_rows_tool_calls() {
    let env = default_env().await;
    let mirrored = env.emu.mirrored_tool_calls();
    assert!(
        mirrored.len() >= 4,
        "several mirrored tool calls: {mirrored:?}"
    );
    assert_eq!(mirrored, env.emu.mirrored_tool_calls(), "deterministic");
    let agents: std::collections::BTreeSet<&str> =
        mirrored.iter().map(|m| m.agent.as_str()).collect();
    assert!(agents.len() >= 2, "{agents:?}");
    for m in &mirrored {
        // The inference row holds the call in its response.
        let v = env
            .sql(
                &format!(
                    "SELECT response, client_request_id FROM `workspace`.`default`.`{}_payload` \
                     WHERE request_date >= :d AND databricks_request_id = :id",
                    m.agent
                ),
                json!([{"name": "d", "value": "2000-01-01", "type": "DATE"},
                       {"name": "id", "value": m.databricks_request_id}]),
            )
            .await;
        let rows = env.all_rows(&v).await;
        assert_eq!(rows.len(), 1, "{m:?}");
        let response = rows[0][0].as_str().unwrap_or("");
        assert!(response.contains(&m.tool_call_id), "{m:?}: {response}");

        // The trace is found by search and its TOOL span has the same call id.
        let (s, v) = env
            .post(
                "/api/3.0/mlflow/traces/search",
                json!({"experiment_ids": [m.experiment_id], "filter": "trace.timestamp_ms > 0", "max_results": 100}),
            )
            .await;
        assert_eq!(s, 200);
        let info = v["traces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["trace_id"] == m.trace_id.as_str())
            .cloned()
            .expect("the mirroring trace is searchable");
        assert_eq!(info["state"], "OK");
        if let Some(c) = rows[0][1].as_str() {
            assert_eq!(info["client_request_id"], c);
        }
        let (_, v) = env
            .get(&format!(
                "/api/2.0/mlflow/traces/{}/credentials-for-data-download",
                m.trace_id
            ))
            .await;
        let uri = v["credential_info"]["signed_uri"].as_str().unwrap();
        let spans: Value = env
            .http
            .get(uri)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let tool = spans["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["attributes"]["mlflow.spanType"] == "\"TOOL\"")
            .expect("a TOOL span");
        assert_eq!(
            tool["attributes"]["gen_ai.tool.call.id"],
            json!(m.tool_call_id).to_string()
        );
        assert_eq!(tool["name"], m.tool.as_str());
    }
    env.emu.shutdown().await;
}
