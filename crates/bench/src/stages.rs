//! The connector's CPU stages alone: real result pages of the emulator, run through the
//! connector's own page parsing, row reading, mapping (tool calls included), validation and
//! encoding on one thread, with no network, no state and no scheduling. Each pass adds one stage,
//! so the differences are what each stage costs per row; the serde_json floor is measured on the
//! same thread in the same run. Compared with a full in-process cycle (`throughput`), the rest is
//! what transport, state and orchestration cost (BENCHMARKS.md, "Where the time goes").

use std::time::Duration;

use databricks_shield::collect::{execution_from_row, RowColumns};
use databricks_shield::databricks::sql::{Row, Statement};
use databricks_shield::discovery::TableKind;
use databricks_shield::traffic::{self, AgentContext, MapOptions, TableFormat};
use serde_json::{json, Value};
use tokio::runtime::Runtime;

use crate::measure::{connect, floor, sample_payloads, Work, DEFAULT_BATCH};
use crate::procs::{self, median, step_err, BenchError};
use crate::Out;

/// Rows per page, about what the connector's statements return per chunk at ~5 KB a row.
const PAGE_ROWS: usize = 250;
/// Distinct rows read from each of the 5 tables.
const PER_TABLE: usize = 2000;

/// How far a pass goes; each includes the ones before it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Stage {
    /// A result page's JSON into rows of literal cells.
    Parse,
    /// Each row into an execution (`collect::execution_from_row`).
    Rows,
    /// Each execution into its Akto records, tool calls included (`traffic::map_execution_taking`).
    Map,
    /// Each record checked against Akto's rules (`traffic::validate`).
    Validate,
    /// Each record encoded and appended to a batch body of `BATCH_SIZE` records.
    Encode,
}

const STAGES: [(Stage, &str); 5] = [
    (Stage::Parse, "parse result pages"),
    (Stage::Rows, "+ rows into executions"),
    (Stage::Map, "+ map (tool calls included)"),
    (Stage::Validate, "+ validate records"),
    (Stage::Encode, "+ encode into batch bodies"),
];

/// The pages of one table, as the warehouse sends them.
struct TablePages {
    table: String,
    format: TableFormat,
    cols: RowColumns,
    agent: String,
    host: String,
    path: String,
    /// (page JSON, rows in it).
    pages: Vec<(String, usize)>,
}

impl TablePages {
    /// The mapping context of the table's agent.
    fn ctx(&self) -> AgentContext<'_> {
        AgentContext {
            agent: &self.agent,
            host: &self.host,
            path: &self.path,
            account_id: "1000000",
        }
    }
}

#[derive(serde::Deserialize)]
struct PageDoc {
    data_array: Vec<Row>,
}

/// The JSON of a result chunk holding `rows` (JSON_ARRAY format: every value a string or null).
fn page_text(rows: &[Row]) -> String {
    let mut out = String::from("{\"data_array\":[");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('[');
        for (j, cell) in row.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            match &cell.0 {
                Some(lit) => out.push_str(lit.literal()),
                None => out.push_str("null"),
            }
        }
        out.push(']');
    }
    out.push_str("]}");
    out
}

/// Reads up to `per_table` rows of every inference table through the connector's client.
/// Also returns the warehouse's id.
async fn fetch_pages(url: &str, per_table: usize) -> Result<(Vec<TablePages>, String), BenchError> {
    let (c, inv, warehouse_id) = connect(url).await?;
    let mut out = Vec::new();
    for (agent, t) in inv.readable() {
        let format = match t.kind {
            TableKind::AiGatewayPayload => TableFormat::AiGateway,
            TableKind::LegacyPayload => TableFormat::Legacy,
            _ => continue,
        };
        let st = Statement {
            warehouse_id: warehouse_id.clone(),
            statement: format!("SELECT * FROM {} LIMIT {per_table}", t.full_name),
            parameters: vec![],
            table: t.full_name.clone(),
            timeout: Duration::from_secs(120),
        };
        let result = c
            .execute(&st)
            .await
            .map_err(|e| step_err("reading a table", e))?;
        let cols = RowColumns::locate(format, |n| result.column(n));
        let rows = result
            .collect_all()
            .await
            .map_err(|e| step_err("reading a table", e))?;
        let pages = rows
            .chunks(PAGE_ROWS)
            .map(|c| (page_text(c), c.len()))
            .collect();
        out.push(TablePages {
            table: t.full_name.clone(),
            format,
            cols,
            agent: agent.name.clone(),
            host: inv.agent_host(&agent.name, "workspace.cloud.databricks.com"),
            path: traffic::invocation_path(agent.endpoint.as_deref(), &t.full_name),
            pages,
        });
    }
    if out.iter().all(|t| t.pages.is_empty()) {
        return Err(step_err("reading tables", "the emulator returned no rows"));
    }
    Ok((out, warehouse_id))
}

/// One pass over `rows` rows up to `stage`: the thread's CPU seconds. Errors if the stages did
/// not do their work (a row unreadable, a record refused), so a broken pass cannot look fast.
fn pass(tables: &[TablePages], stage: Stage, rows: usize) -> Result<f64, BenchError> {
    let opts = MapOptions::default();
    let mut body = String::new();
    let mut in_body = 0usize;
    let (mut done, mut records, mut bytes) = (0usize, 0usize, 0usize);
    let t0 = procs::thread_cpu();
    'outer: loop {
        for t in tables {
            let ctx = t.ctx();
            for (text, n) in &t.pages {
                if done >= rows {
                    break 'outer;
                }
                done += n;
                let page: PageDoc =
                    serde_json::from_str(text).map_err(|e| step_err("parsing a page", e))?;
                if stage < Stage::Rows {
                    bytes += page.data_array.len();
                    std::hint::black_box(page);
                    continue;
                }
                for row in page.data_array {
                    let (_, mut exec) = execution_from_row(&t.table, t.format, &t.cols, row)
                        .map_err(|(why, _)| step_err("reading a row", why))?;
                    if stage < Stage::Map {
                        std::hint::black_box(&exec);
                        continue;
                    }
                    let mapped = traffic::map_execution_taking(&ctx, &mut exec, &opts);
                    for rec in &mapped.records {
                        records += 1;
                        // As the connector sends it (`run`'s staging does the same).
                        let rec = traffic::for_akto_runtime(rec);
                        if stage >= Stage::Validate {
                            traffic::validate(&rec)
                                .map_err(|v| step_err("validating a record", v))?;
                        }
                        if stage >= Stage::Encode {
                            if in_body == 0 {
                                body.clear();
                                body.push_str("{\"batchData\":[");
                            } else {
                                body.push(',');
                            }
                            body.push_str(&traffic::encode(&rec));
                            in_body += 1;
                            if in_body == DEFAULT_BATCH {
                                body.push_str("]}");
                                bytes += body.len();
                                in_body = 0;
                            }
                        }
                    }
                    std::hint::black_box(mapped);
                }
            }
        }
    }
    std::hint::black_box((records, bytes, &body));
    Ok((procs::thread_cpu() - t0).max(1e-9))
}

/// The batch bodies of every distinct row, as the HTTP sink would post them: (body, rows in it).
fn bodies(tables: &[TablePages]) -> Result<Vec<(String, usize)>, BenchError> {
    let opts = MapOptions::default();
    let mut out = Vec::new();
    let (mut body, mut in_body, mut rows) = (String::new(), 0usize, 0usize);
    for t in tables {
        let ctx = t.ctx();
        for (text, _) in &t.pages {
            let page: PageDoc =
                serde_json::from_str(text).map_err(|e| step_err("parsing a page", e))?;
            for row in page.data_array {
                let (_, mut exec) = execution_from_row(&t.table, t.format, &t.cols, row)
                    .map_err(|(why, _)| step_err("reading a row", why))?;
                rows += 1;
                for rec in traffic::map_execution_taking(&ctx, &mut exec, &opts).records {
                    // As the connector sends it (a failed row's status rewritten, ...).
                    let rec = traffic::for_akto_runtime(&rec);
                    body.push_str(if in_body == 0 {
                        "{\"batchData\":["
                    } else {
                        ","
                    });
                    body.push_str(&traffic::encode(&rec));
                    in_body += 1;
                    if in_body == DEFAULT_BATCH {
                        body.push_str("]}");
                        out.push((std::mem::take(&mut body), std::mem::take(&mut rows)));
                        in_body = 0;
                    }
                }
            }
        }
    }
    if in_body > 0 {
        body.push_str("]}");
        out.push((body, rows));
    }
    Ok(out)
}

/// The two hops, set up for [`transport_pass`].
struct Transport {
    http: reqwest::Client,
    /// The emulator's base URL and a token of its service principal.
    emu: String,
    token: String,
    warehouse: String,
    /// (table, rows a statement reads from it).
    reads: Vec<(String, usize)>,
    /// The stand-in's ingestion URL and the bodies posted to it: (body, rows in it).
    ingest: String,
    bodies: Vec<(String, usize)>,
}

/// What the transport alone costs, both hops, with the connector's HTTP client library
/// (reqwest, one current-thread runtime on the measuring thread): statements reading the same
/// tables are started and their result chunks fetched as bytes, and the same batch bodies are
/// posted to the stand-in, until `rows` rows went each way. Nothing is parsed beyond finding
/// the next chunk's link. Returns the thread's CPU seconds.
async fn transport_pass(t: &Transport, rows: usize) -> Result<f64, BenchError> {
    let Transport {
        http,
        emu,
        token,
        warehouse,
        reads: tables,
        ingest,
        bodies,
    } = t;
    let t0 = procs::thread_cpu();
    let mut read = 0usize;
    'read: loop {
        for (table, n) in tables {
            if read >= rows {
                break 'read;
            }
            let started = http
                .post(format!("{emu}/api/2.0/sql/statements"))
                .bearer_auth(token)
                .json(&json!({
                    "warehouse_id": warehouse,
                    "statement": format!("SELECT * FROM {table} LIMIT {n}"),
                    "wait_timeout": "30s",
                    "disposition": "INLINE",
                    "format": "JSON_ARRAY",
                }))
                .send()
                .await
                .map_err(|e| step_err("starting a statement", e))?;
            let mut page = started
                .bytes()
                .await
                .map_err(|e| step_err("reading a statement", e))?;
            // Polled until it ran (as the connector does), at most 30 s.
            for _ in 0..300 {
                let text = std::str::from_utf8(&page).unwrap_or_default();
                if text.contains("\"SUCCEEDED\"") {
                    break;
                }
                let id = string_field(text, "statement_id")
                    .ok_or_else(|| {
                        step_err("a statement", text.chars().take(300).collect::<String>())
                    })?
                    .to_string();
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                let url = format!("{emu}/api/2.0/sql/statements/{id}");
                page = get_bytes(http, &url, token, "polling a statement").await?;
            }
            if !String::from_utf8_lossy(&page).contains("\"SUCCEEDED\"") {
                return Err(step_err("a statement", "did not succeed within 30 s"));
            }
            loop {
                let text = std::str::from_utf8(&page).unwrap_or_default();
                let Some(link) = string_field(text, "next_chunk_internal_link") else {
                    break;
                };
                page = get_bytes(http, &format!("{emu}{link}"), token, "reading a chunk").await?;
                std::hint::black_box(&page);
            }
            read += n;
        }
    }
    let mut sent = 0usize;
    'send: loop {
        for (body, n) in bodies {
            if sent >= rows {
                break 'send;
            }
            let resp = http
                .post(ingest)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .map_err(|e| step_err("posting a batch", e))?;
            if !resp.status().is_success() {
                return Err(step_err("posting a batch", resp.status()));
            }
            resp.bytes()
                .await
                .map_err(|e| step_err("posting a batch", e))?;
            sent += n;
        }
    }
    Ok((procs::thread_cpu() - t0).max(1e-9))
}

/// `GET url` with the token: the body as bytes (an error status is an error of `what`).
async fn get_bytes(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    what: &str,
) -> Result<bytes::Bytes, BenchError> {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| step_err(what, e))?
        .bytes()
        .await
        .map_err(|e| step_err(what, e))
}

/// The last string field `key` of a statement answer, found without parsing the page (the
/// fields looked up hold ids and links, never escapes).
fn string_field<'a>(page: &'a str, key: &str) -> Option<&'a str> {
    let key = format!("\"{key}\":\"");
    let at = page.rfind(&key)? + key.len();
    let len = page[at..].find('"')?;
    Some(&page[at..at + len])
}

/// An OAuth token of the emulator's service principal.
async fn token(http: &reqwest::Client, emu: &str) -> Result<String, BenchError> {
    let v: Value = http
        .post(format!("{emu}/oidc/v1/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "all-apis"),
            ("client_id", crate::measure::CLIENT_ID),
            ("client_secret", crate::measure::CLIENT_SECRET),
        ])
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| step_err("token", e))?
        .json()
        .await
        .map_err(|e| step_err("token", e))?;
    v["access_token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| step_err("token", "no access_token in the answer"))
}

/// `shield-bench stages`: every pass `reps` times on one dedicated thread (interleaved), then
/// the floor on the same thread.
pub fn stages(rt: &Runtime, out: &mut Out, rows: usize, reps: usize) -> Result<(), BenchError> {
    let work = Work::new()?;
    // 2,000 distinct rows per table (5 tables): about 50 MB of pages, larger than any cache.
    let emu = work.emulator(10_000, 5)?;
    let standin = work.standin()?;
    let (tables, warehouse) = rt.block_on(fetch_pages(&emu.url, PER_TABLE))?;
    let samples = rt.block_on(sample_payloads(&emu, 400))?;
    let bodies = bodies(&tables)?;
    let distinct: usize = bodies.iter().map(|b| b.1).sum();
    let reads: Vec<(String, usize)> = tables
        .iter()
        .map(|t| (t.table.clone(), t.pages.iter().map(|p| p.1).sum()))
        .collect();
    let ingest = format!("{}/api/ingestData", standin.url);
    let emu_url = emu.url.clone();
    eprintln!("stages: {distinct} distinct rows, {rows} rows per pass x {reps}");
    let handle = std::thread::spawn(move || -> Result<Vec<Vec<f64>>, BenchError> {
        let local = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| step_err("runtime", e))?;
        let http = reqwest::Client::new();
        let token = local.block_on(token(&http, &emu_url))?;
        let transport = Transport {
            http,
            emu: emu_url,
            token,
            warehouse,
            reads,
            ingest,
            bodies,
        };
        let mut cpu = vec![Vec::new(); STAGES.len() + 1];
        // Interleaved: machine noise hits every pass alike.
        for _ in 0..reps.max(1) {
            for (i, (stage, _)) in STAGES.iter().enumerate() {
                cpu[i].push(pass(&tables, *stage, rows)?);
            }
            cpu[STAGES.len()].push(local.block_on(transport_pass(&transport, rows))?);
        }
        Ok(cpu)
    });
    let cpu = handle
        .join()
        .map_err(|_| step_err("stages", "the stage thread panicked"))??;
    emu.stop();
    standin.stop();
    let floor_v = floor(samples, rows, reps)?;
    let floor_rate = floor_v["rows_per_cpu_s"].as_f64().unwrap_or(f64::NAN);
    out.emit(&floor_v);
    let floor_us = 1e6 / floor_rate;
    eprintln!("  floor: {floor_us:.2} µs per row ({floor_rate:.0} rows per CPU-s)");
    let us = |runs: &Vec<f64>| median(runs) / rows as f64 * 1e6;
    let mut before = 0.0;
    let mut list = Vec::new();
    for ((stage, what), runs) in STAGES.iter().zip(&cpu) {
        let us = us(runs);
        eprintln!(
            "  {what:<30} {us:6.2} µs per row (+{:5.2}), {:.2} of the floor",
            us - before,
            floor_us / us
        );
        list.push(json!({
            "stage": format!("{stage:?}").to_lowercase(),
            "what": what,
            "us_per_row": us,
            "us_added": us - before,
            "floor_ratio_cpu": floor_us / us,
            "cpu_s_each": runs,
        }));
        before = us;
    }
    let transport = us(&cpu[STAGES.len()]);
    eprintln!(
        "  transport alone (both hops)    {transport:6.2} µs per row; with the stages {:6.2}, {:.2} of the floor",
        before + transport,
        floor_us / (before + transport)
    );
    out.emit(&json!({
        "kind": "stages",
        "rows": rows,
        "reps": reps,
        "distinct_rows": distinct,
        "floor_us_per_row": floor_us,
        "stages": Value::Array(list),
        "transport_us_per_row": transport,
        "transport_cpu_s_each": cpu[STAGES.len()],
        "stages_and_transport_floor_ratio_cpu": floor_us / (before + transport),
    }));
    Ok(())
}
