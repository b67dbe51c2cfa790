//! Discovery: the agent inventory of one catalog.schema.
//!
//! Joins what Unity Catalog and Model Serving say: which tables are inference tables (classified
//! by their columns, not their names), which serving endpoint logs to which table (AI Gateway
//! config first, legacy auto-capture second), which models and versions each endpoint serves, and
//! which UC functions (tools) the schema offers. An inference table with no endpoint still yields
//! an agent, since agents may run outside Model Serving (e.g. as Databricks Apps).
//!
//! Architecture Invariant: discovery only reads; it never touches state or sinks, and it returns
//! the same inventory (same order) for the same workspace.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::databricks::serving::ServingEndpoint;
use crate::databricks::unity_catalog::{FunctionInfo, TableInfo};
use crate::databricks::{DatabricksClient, DatabricksError};

/// What a table is, judged by its columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    /// AI Gateway inference table (`request_time`, `request`, `response`, ...).
    AiGatewayPayload,
    /// Legacy auto-capture inference table (`timestamp_ms`, `request_metadata`, ...).
    LegacyPayload,
    /// MLflow traces exported as OTel spans.
    OtelSpans,
    /// Anything else: not read.
    Other,
}

const AI_GATEWAY_COLUMNS: &[&str] = &[
    "databricks_request_id",
    "request_date",
    "request_time",
    "status_code",
    "request",
    "response",
];
const LEGACY_COLUMNS: &[&str] = &[
    "databricks_request_id",
    "date",
    "timestamp_ms",
    "status_code",
    "request",
    "response",
];
const OTEL_COLUMNS: &[&str] = &[
    "trace_id",
    "span_id",
    "parent_span_id",
    "name",
    "start_time_unix_nano",
    "end_time_unix_nano",
];

/// Classifies a table by the columns it has.
pub fn classify(table: &TableInfo) -> TableKind {
    let cols: BTreeSet<String> = table
        .columns
        .iter()
        .map(|c| c.name.to_ascii_lowercase())
        .collect();
    let has_all = |need: &[&str]| need.iter().all(|c| cols.contains(*c));
    if has_all(AI_GATEWAY_COLUMNS) {
        TableKind::AiGatewayPayload
    } else if has_all(LEGACY_COLUMNS) {
        TableKind::LegacyPayload
    } else if has_all(OTEL_COLUMNS) {
        TableKind::OtelSpans
    } else {
        TableKind::Other
    }
}

/// A model an agent or endpoint serves.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServedModel {
    /// UC model full name, foundation model name or `provider/name` of an external model.
    pub name: String,
    pub version: Option<String>,
    /// `uc_model`, `foundation_model` or `external_model`.
    pub kind: &'static str,
}

/// An inference table the connector reads.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InferenceTable {
    pub full_name: String,
    pub kind: TableKind,
}

/// One agent of the inventory.
#[derive(Debug, Clone, Serialize)]
pub struct Agent {
    /// The endpoint name, or for table-only agents the table name without `_payload`.
    pub name: String,
    pub endpoint: Option<String>,
    pub task: Option<String>,
    /// True for agent endpoints (agent task or Agent Framework name) and table-only agents;
    /// false for plain LLM endpoints whose traffic is also logged.
    pub is_agent: bool,
    pub models: Vec<ServedModel>,
    pub table: Option<InferenceTable>,
    /// Why there is no table to read, when there is none.
    pub table_note: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// A registered model with its versions.
#[derive(Debug, Clone, Serialize)]
pub struct ModelEntry {
    pub full_name: String,
    pub versions: Vec<String>,
}

/// Everything discovery found.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Inventory {
    pub catalog: String,
    pub schema: String,
    pub prefix: String,
    pub agents: Vec<Agent>,
    /// LLM endpoints with no inference table in scope (listed, not read).
    pub llm_endpoints: Vec<Agent>,
    /// UC functions of the schema: the tools agents can call.
    pub tools: Vec<String>,
    pub models: Vec<ModelEntry>,
    pub otel_span_tables: Vec<String>,
    pub tables_total: usize,
    pub tables_matching_prefix: usize,
    /// Tables outside the prefix (a few, for "no data" troubleshooting).
    pub filtered_out_examples: Vec<String>,
}

impl Inventory {
    /// Agents that have a table to read.
    pub fn readable(&self) -> impl Iterator<Item = (&Agent, &InferenceTable)> {
        self.agents
            .iter()
            .filter_map(|a| a.table.as_ref().map(|t| (a, t)))
    }
}

/// Whether an endpoint runs an agent rather than a plain model.
pub fn is_agent_endpoint(ep: &ServingEndpoint) -> bool {
    ep.task.as_deref().is_some_and(|t| t.starts_with("agent/")) || ep.name.starts_with("agents_")
}

fn served_models(ep: &ServingEndpoint) -> Vec<ServedModel> {
    ep.served()
        .filter_map(|s| {
            if let Some(fm) = &s.foundation_model {
                let name = fm.name.clone().or_else(|| s.entity_name.clone())?;
                return Some(ServedModel {
                    name,
                    version: s.entity_version.clone(),
                    kind: "foundation_model",
                });
            }
            if let Some(em) = &s.external_model {
                let name = match (&em.provider, &em.name) {
                    (Some(p), Some(n)) => format!("{p}/{n}"),
                    (None, Some(n)) => n.clone(),
                    _ => s.entity_name.clone()?,
                };
                return Some(ServedModel {
                    name,
                    version: None,
                    kind: "external_model",
                });
            }
            let name = s.entity_name.clone().or_else(|| s.model_name.clone())?;
            let kind = if name.starts_with("system.ai.") || name.starts_with("databricks-") {
                "foundation_model"
            } else {
                "uc_model"
            };
            Some(ServedModel {
                name,
                version: s.entity_version.clone().or_else(|| s.model_version.clone()),
                kind,
            })
        })
        .collect()
}

fn table_agent_name(table: &str) -> String {
    table.strip_suffix("_payload").unwrap_or(table).to_string()
}

/// Builds the inventory of `catalog.schema`, tables filtered by `prefix`.
pub async fn discover(
    client: &DatabricksClient,
    catalog: &str,
    schema: &str,
    prefix: &str,
) -> Result<Inventory, DatabricksError> {
    let tables = client.list_tables(catalog, schema).await?;
    let mut inv = Inventory {
        catalog: catalog.to_string(),
        schema: schema.to_string(),
        prefix: prefix.to_string(),
        tables_total: tables.len(),
        ..Default::default()
    };

    // Inference tables in scope, by full name (lowercase: UC names are case-insensitive).
    let mut payload_tables: BTreeMap<String, InferenceTable> = BTreeMap::new();
    for t in &tables {
        if !t.name.starts_with(prefix) {
            if inv.filtered_out_examples.len() < 5 {
                inv.filtered_out_examples.push(t.name.clone());
            }
            continue;
        }
        inv.tables_matching_prefix += 1;
        let full = t
            .full_name
            .clone()
            .unwrap_or_else(|| format!("{catalog}.{schema}.{}", t.name));
        match classify(t) {
            k @ (TableKind::AiGatewayPayload | TableKind::LegacyPayload) => {
                payload_tables.insert(
                    full.to_ascii_lowercase(),
                    InferenceTable {
                        full_name: full,
                        kind: k,
                    },
                );
            }
            TableKind::OtelSpans => inv.otel_span_tables.push(full),
            TableKind::Other => {
                tracing::debug!(table = %full, "not an inference or trace table; ignored")
            }
        }
    }

    let endpoints = client.list_serving_endpoints().await?;
    let mut claimed: BTreeSet<String> = BTreeSet::new();
    for listed in endpoints {
        // The list omits legacy auto-capture settings: fetch the endpoint when needed.
        let ep = if listed.inference_table().is_none() {
            match client.get_serving_endpoint(&listed.name).await {
                Ok(full) => full,
                Err(e) if !e.is_retriable() => {
                    tracing::warn!("WARN cannot read serving endpoint {}: {e}", listed.name);
                    listed
                }
                Err(e) => return Err(e),
            }
        } else {
            listed
        };
        let is_agent = is_agent_endpoint(&ep);
        let target = ep.inference_table();
        let table = target
            .as_ref()
            .and_then(|t| payload_tables.get(&t.to_ascii_lowercase()).cloned());
        let table_note = match (&target, &table) {
            (None, _) => Some("no inference table enabled on this endpoint".to_string()),
            (Some(t), None) => Some(format!(
                "inference table {t} is not in {catalog}.{schema} with prefix '{prefix}' (or not visible)"
            )),
            _ => None,
        };
        if let Some(t) = &table {
            claimed.insert(t.full_name.to_ascii_lowercase());
        }
        let agent = Agent {
            name: ep.name.clone(),
            endpoint: Some(ep.name.clone()),
            task: ep.task.clone(),
            is_agent,
            models: served_models(&ep),
            table,
            table_note,
            tags: ep
                .tags
                .iter()
                .map(|t| (t.key.clone(), t.value.clone().unwrap_or_default()))
                .collect(),
        };
        if agent.is_agent || agent.table.is_some() {
            inv.agents.push(agent);
        } else {
            inv.llm_endpoints.push(agent);
        }
    }

    // Tables no endpoint claims are agents of their own (apps, jobs, deleted endpoints).
    for (key, t) in &payload_tables {
        if claimed.contains(key) {
            continue;
        }
        let short = t.full_name.rsplit('.').next().unwrap_or(&t.full_name);
        inv.agents.push(Agent {
            name: table_agent_name(short),
            endpoint: None,
            task: None,
            is_agent: true,
            models: Vec::new(),
            table: Some(t.clone()),
            table_note: None,
            tags: BTreeMap::new(),
        });
    }
    inv.agents.sort_by(|a, b| a.name.cmp(&b.name));
    inv.llm_endpoints.sort_by(|a, b| a.name.cmp(&b.name));

    let functions: Vec<FunctionInfo> = client.list_functions(catalog, schema).await?;
    inv.tools = functions.into_iter().map(|f| f.full_name).collect();
    inv.tools.sort();

    for m in client.list_models(catalog, schema).await? {
        let versions = match client.list_model_versions(&m.full_name).await {
            Ok(v) => v.into_iter().map(|v| v.version).collect(),
            Err(e) if !e.is_retriable() => {
                tracing::debug!("versions of {} not readable: {e}", m.full_name);
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        inv.models.push(ModelEntry {
            full_name: m.full_name,
            versions,
        });
    }
    inv.models.sort_by(|a, b| a.full_name.cmp(&b.full_name));
    Ok(inv)
}

/// The inventory as a readable table for `databricks-shield discover`.
pub fn render_table(inv: &Inventory) -> String {
    use std::fmt::Write as _;
    let mut rows: Vec<[String; 6]> = vec![[
        "AGENT".into(),
        "ENDPOINT".into(),
        "TASK".into(),
        "MODELS".into(),
        "INFERENCE TABLE".into(),
        "TOOLS".into(),
    ]];
    let tools = if inv.tools.is_empty() {
        "-".to_string()
    } else {
        format!("{} UC functions", inv.tools.len())
    };
    for a in inv.agents.iter().chain(inv.llm_endpoints.iter()) {
        let models = if a.models.is_empty() {
            "-".to_string()
        } else {
            a.models
                .iter()
                .map(|m| match &m.version {
                    Some(v) => format!("{} v{v}", m.name),
                    None => m.name.clone(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        rows.push([
            a.name.clone(),
            a.endpoint.clone().unwrap_or_else(|| "-".into()),
            a.task.clone().unwrap_or_else(|| "-".into()),
            models,
            a.table
                .as_ref()
                .map(|t| t.full_name.clone())
                .or_else(|| a.table_note.as_ref().map(|n| format!("({n})")))
                .unwrap_or_else(|| "-".into()),
            tools.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let _ = writeln!(
        out,
        "\n{} agents ({} with an inference table), {} LLM endpoints without a table in scope; \
         tables: {} in {}.{}, {} matching prefix '{}'; {} UC functions (tools), {} UC models, {} OTel span tables",
        inv.agents.len(),
        inv.readable().count(),
        inv.llm_endpoints.len(),
        inv.tables_total,
        inv.catalog,
        inv.schema,
        inv.tables_matching_prefix,
        inv.prefix,
        inv.tools.len(),
        inv.models.len(),
        inv.otel_span_tables.len()
    );
    if !inv.tools.is_empty() {
        let _ = writeln!(out, "tools: {}", inv.tools.join(", "));
    }
    out
}
