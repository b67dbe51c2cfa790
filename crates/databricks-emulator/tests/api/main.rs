//! Raw-HTTP tests of the emulator: every shape is checked field by field with reqwest and
//! serde_json::Value, never through the connector's client, so a shared mistake cannot hide.

mod auth;
mod catalog;
mod faults_admin;
mod mlflow;
mod serving;
mod statements;

use databricks_emulator::{Emulator, EmulatorConfig};
use serde_json::{json, Value};

pub const WAREHOUSE: &str = "4b9f1c2d3e5a6001";

pub struct Env {
    pub emu: Emulator,
    pub base: String,
    pub http: reqwest::Client,
    pub token: String,
}

pub async fn start(cfg: EmulatorConfig) -> Env {
    let emu = Emulator::start(cfg.clone()).await.expect("emulator starts");
    let base = emu.base_url();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let token = get_token(&http, &base, &cfg.client_id, &cfg.client_secret).await;
    Env {
        emu,
        base,
        http,
        token,
    }
}

pub async fn default_env() -> Env {
    start(EmulatorConfig::default()).await
}

pub async fn get_token(http: &reqwest::Client, base: &str, id: &str, secret: &str) -> String {
    let r = http
        .post(format!("{base}/oidc/v1/token"))
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials"), ("scope", "all-apis")])
        .send()
        .await
        .expect("token request");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("token json");
    v["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

impl Env {
    /// Sends `req` and returns the status and the JSON body (`Null` when it is not JSON).
    async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = req.send().await.expect("request");
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// GET without a token (discovery documents, the `/_emulator/` admin API).
    pub async fn get_open(&self, path: &str) -> (u16, Value) {
        Self::send(self.http.get(format!("{}{path}", self.base))).await
    }

    /// POST a JSON body without a token (the `/_emulator/` admin API).
    pub async fn post_open(&self, path: &str, body: Value) -> (u16, Value) {
        Self::send(self.http.post(format!("{}{path}", self.base)).json(&body)).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let req = self.http.get(format!("{}{path}", self.base));
        Self::send(req.bearer_auth(&self.token)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let req = self.http.post(format!("{}{path}", self.base)).json(&body);
        Self::send(req.bearer_auth(&self.token)).await
    }

    /// Run a statement to completion (polling), returning the final response.
    pub async fn sql(&self, statement: &str, params: Value) -> Value {
        let (s, mut v) = self
            .post(
                "/api/2.0/sql/statements",
                json!({"warehouse_id": WAREHOUSE, "statement": statement, "parameters": params, "wait_timeout": "10s",
                    "catalog": "workspace", "schema": "default"}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        for _ in 0..200 {
            let st = v["status"]["state"].as_str().unwrap_or("").to_string();
            if st != "PENDING" && st != "RUNNING" {
                return v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            let id = v["statement_id"].as_str().expect("id").to_string();
            v = self.get(&format!("/api/2.0/sql/statements/{id}")).await.1;
        }
        panic!("statement did not finish: {v}");
    }

    /// All rows of a SUCCEEDED statement, following chunk links.
    pub async fn all_rows(&self, v: &Value) -> Vec<Vec<Value>> {
        assert_eq!(v["status"]["state"], "SUCCEEDED", "{v}");
        let mut rows = Vec::new();
        let mut chunk = v["result"].clone();
        for _ in 0..10_000 {
            if let Some(a) = chunk["data_array"].as_array() {
                rows.extend(a.iter().map(|r| r.as_array().cloned().unwrap_or_default()));
            }
            match chunk["next_chunk_internal_link"].as_str() {
                Some(link) => chunk = self.get(link).await.1,
                None => break,
            }
        }
        rows
    }
}
