//! Discovery: the agent inventory of one catalog.schema.
//!
//! Joins what Unity Catalog and Model Serving say: which tables are inference tables (classified
//! by their columns, not their names; only the legacy Agent Framework's tables derived from an
//! inference table, `*_payload_request_logs` and `*_payload_assessment_logs`, are ruled out by
//! name, as they repeat its requests), which serving endpoint logs to which table (AI Gateway
//! config first, legacy auto-capture second), which models and versions each endpoint serves, and
//! which UC functions (tools) the schema offers. An inference table with no endpoint still yields
//! an agent, since agents may run outside Model Serving (e.g. as Databricks Apps).
//!
//! Discovery also decides each agent's Akto host: the agent-name slug of
//! [`crate::traffic::agent_host`], unless another agent of the inventory would get the same one;
//! then each of them gets a suffix derived from its exact name (scheme in [`crate::traffic::host`]).
//! Whatever builds a record for an agent must take its host from [`Inventory::agent_host`], never
//! from [`crate::traffic::agent_host`] of its name alone.
//!
//! Scope: one instance reads what its DATABRICKS_CATALOG.DATABRICKS_SCHEMA and DATABRICKS_PREFIX
//! (compared case-insensitively, as Unity Catalog names are) hold. Endpoints and apps are listed
//! from the whole workspace, so an agent whose Unity Catalog anchor lies elsewhere is listed with
//! a note but gets no MLflow experiment (nor an inventory record, [`Inventory::out_of_scope`]):
//! the instance of that scope reads its traces. The anchor of an endpoint is the inference table
//! it names, else its served UC models; of an app, the inference tables of the agent endpoints it
//! queries (those named after it first: [`resource_scope`]), else the inference tables named
//! after it ([`name_anchor`]: one in this instance's scope, exactly or after its prefix, always
//! wins; only when none is may one outside, exactly or after a prefix of whole words, leave the
//! app to another instance, with a WARN). Two instances whose own tables are both named after an
//! app or experiment both read it. An agent with no anchor at all stays in scope, in every
//! instance; so does an app whose table is in another schema, which this instance cannot see.
//! Serving endpoints, UC functions or UC models that cannot be listed (refused, not found) cost
//! a WARN naming the fix, not the discovery: the inference tables alone find the agents. Unity
//! Catalog lists only the models and functions the principal may EXECUTE, as empty lists rather
//! than refusals: served UC models of the schema missing from the listing are named with the
//! GRANT ([`Inventory::unlisted_models`]); a model version's run refused by MLflow (no CAN READ on
//! its experiment) is named with the agent ([`Inventory::unreadable_runs`]).
//!
//! Architecture Invariant: discovery only reads; it never touches state or sinks, and it returns
//! the same inventory (same order) for the same workspace.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::Serialize;

use crate::databricks::serving::ServingEndpoint;
use crate::databricks::unity_catalog::{FunctionInfo, TableInfo};
use crate::databricks::{DatabricksClient, DatabricksError};
use crate::traffic::host::{agent_host, agent_label, host_for_label, unique_agent_labels};

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

/// Name endings of the tables the legacy Agent Framework (`databricks-agents` `deploy()`) derived
/// from an agent's `<model>_payload` table. `_payload_request_logs` has the legacy payload columns
/// (`databricks_request_id`, `date`, `timestamp_ms`, `request`, ...), yet its rows are the payload
/// table's requests again, reformatted: reading it as an agent would send each request twice.
const DERIVED_TABLE_SUFFIXES: &[&str] = &["_payload_request_logs", "_payload_assessment_logs"];

/// Classifies a table by the columns it has; the tables derived from an inference table
/// ([`DERIVED_TABLE_SUFFIXES`], compared ignoring case) are [`TableKind::Other`] whatever their
/// columns.
pub fn classify(table: &TableInfo) -> TableKind {
    let name = table.name.to_ascii_lowercase();
    if DERIVED_TABLE_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        return TableKind::Other;
    }
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
    /// The table's column names, lowercase (from Unity Catalog): a read selects only the
    /// optional columns the table has. Empty when unknown (then every column is selected).
    #[serde(skip)]
    pub columns: Vec<String>,
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
    /// The MLflow experiment holding the agent's traces (from its UC model version's run, its
    /// app's experiment resource, or an experiment named after it).
    #[serde(default)]
    pub experiment_id: Option<String>,
    /// The Databricks App the agent is deployed as, when it is one.
    #[serde(default)]
    pub app: Option<AppEntry>,
}

/// An agent deployed as a Databricks App.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AppEntry {
    pub name: String,
    pub url: Option<String>,
    pub description: Option<String>,
    /// `app_status.state`, e.g. `RUNNING`.
    pub state: Option<String>,
    /// `compute_status.state`, e.g. `ACTIVE`.
    pub compute_state: Option<String>,
    /// Serving endpoints the app may query (its LLMs or other agents).
    pub serving_endpoints: Vec<String>,
    /// SQL warehouses the app may use.
    pub sql_warehouses: Vec<String>,
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
    /// Agent name -> its Akto host label, for the agents whose plain label
    /// ([`crate::traffic::host::agent_label`]) another agent of the inventory also has (or whose
    /// suffixed label is it); every other agent keeps its plain label. Read it through
    /// [`Inventory::agent_host`].
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub host_labels: BTreeMap<String, String>,
    /// The agents out of this instance's scope (their Unity Catalog anchor lies outside
    /// catalog.schema and prefix), as `endpoint:<name>` or `app:<name>`: listed, but this
    /// instance sends neither their traces nor their inventory records; the instance of their
    /// scope does. Read it through [`Inventory::is_out_of_scope`].
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub out_of_scope: BTreeSet<String>,
    /// Inference tables in scope that an agent endpoint's configuration names but Unity Catalog
    /// did not list (endpoint name -> table): not created yet, or (usually) no SELECT on it, since
    /// Unity Catalog lists only the tables the principal may read. `check` names the GRANT.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unseen_tables: BTreeMap<String, String>,
    /// Every table Unity Catalog listed in catalog.schema, in the prefix or not, by full name in
    /// lowercase: a table read before that is missing here was dropped, renamed or made
    /// unreadable ([`Inventory::vanished`]).
    #[serde(skip)]
    pub listed_tables: BTreeSet<String>,
    /// Endpoints whose inference table another endpoint also names (agent -> the agent that
    /// reads the table, [`share_tables_once`]): their rows reach Akto as that agent's records, so
    /// their traces must not be sent as executions too.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub shared_tables: BTreeMap<String, String>,
    /// The OTel span tables (of [`Inventory::otel_span_tables`]) that have an `events` column, as
    /// Unity Catalog lists them each cycle: their spans are read with their events.
    #[serde(skip)]
    pub otel_events: BTreeSet<String>,
    /// UC models of catalog.schema that serving endpoints in this instance's scope serve but that
    /// Unity Catalog did not list (model full name -> the first such endpoint, by name). Unity
    /// Catalog lists only the models, model versions and functions the principal may EXECUTE (or
    /// owns), and answers an empty list rather than a refusal: without EXECUTE the model
    /// versions' runs cannot lead to the agents' MLflow experiments and no tool is listed.
    /// `check` names the GRANT ([`execute_fix`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unlisted_models: BTreeMap<String, String>,
    /// The MLflow runs that logged an agent's served model version whose `runs/get` was refused
    /// (403): no CAN READ on the experiment holding the run, so that experiment (where an agent
    /// deployed with `agents.deploy()` logs its traces) is unknown. In agent order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable_runs: Vec<UnreadableRun>,
}

/// A run that logged an agent's served UC model version, not readable by the service principal.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UnreadableRun {
    pub agent: String,
    /// The UC model's full name.
    pub model: String,
    pub version: String,
    pub run_id: String,
    /// The experiment the agent's traces are read from anyway (found by name), if any.
    pub experiment_id: Option<String>,
}

impl UnreadableRun {
    /// What is lost and the fix, for the run's WARN and `check`.
    pub fn describe(&self, principal: &str) -> String {
        let lost = match &self.experiment_id {
            None => "its MLflow traces are not read".to_string(),
            Some(e) => format!(
                "its traces are read from experiment {e} (found by another run or by name), \
                 which may not be the one this run logged to"
            ),
        };
        format!(
            "agent {}: MLflow run {} (which logged its model {} version {}) is not readable by \
             the service principal (403 PERMISSION_DENIED), so the experiment holding it, where \
             an agent deployed with agents.deploy() logs its traces, is unknown: {lost}. Fix: give \
             {} CAN READ on the experiment of run {} (Catalog Explorer: model {} version {} -> \
             its source run -> experiment -> Permissions)",
            self.agent,
            self.run_id,
            self.model,
            self.version,
            principal,
            self.run_id,
            self.model,
            self.version,
        )
    }
}

impl Inventory {
    /// Agents that have a table to read.
    pub fn readable(&self) -> impl Iterator<Item = (&Agent, &InferenceTable)> {
        self.agents
            .iter()
            .filter_map(|a| a.table.as_ref().map(|t| (a, t)))
    }

    /// The tables of this instance's scope that delivered rows since `since_us` (their state
    /// cursor, `cursors`, says so) but that Unity Catalog no longer lists: dropped, renamed, or
    /// no longer readable by the service principal (it lists only the tables it may SELECT). Their
    /// agents are no longer read, and nothing else would say so. Names as the state holds them,
    /// with the time of their newest delivered row (µs).
    pub fn vanished(
        &self,
        cursors: &[(String, crate::state::Cursor)],
        since_us: i64,
    ) -> Vec<(String, i64)> {
        cursors
            .iter()
            .filter(|(ns, c)| {
                c.time_us >= since_us
                    && !ns.contains(':')
                    && in_scope(ns, &self.catalog, &self.schema, &self.prefix)
                    && !self.listed_tables.contains(&ns.to_ascii_lowercase())
            })
            .map(|(ns, c)| (ns.clone(), c.time_us))
            .collect()
    }

    /// The agent whose Akto host a trace of `agent` goes to: the agent reading its inference
    /// table ([`Inventory::shared_tables`]) when another endpoint reads it, so that a tool call
    /// seen in a trace and in a row is told apart on one host; else `agent` itself.
    pub fn trace_agent<'a>(&'a self, agent: &'a str) -> &'a str {
        self.shared_tables.get(agent).map_or(agent, String::as_str)
    }

    /// Whether `agent` is out of this instance's scope (see [`Inventory::out_of_scope`]): its
    /// traces and inventory record are another instance's to send.
    pub fn is_out_of_scope(&self, agent: &Agent) -> bool {
        scope_key(agent).is_some_and(|k| self.out_of_scope.contains(&k))
    }

    /// The Akto `host` header (= collection) of the agent named `agent`: [`agent_host`], unless
    /// discovery gave that agent another label because its plain one collides with another
    /// agent's. A name the inventory does not know gets [`agent_host`].
    pub fn agent_host(&self, agent: &str, workspace_host: &str) -> String {
        match self.host_labels.get(agent) {
            Some(label) => host_for_label(label, workspace_host),
            None => agent_host(agent, workspace_host),
        }
    }
}

/// Decides the Akto host of every agent of `inv` (fills [`Inventory::host_labels`]) and returns
/// one warning per collision, naming the agents and their hosts on `workspace_host`.
pub fn assign_hosts(inv: &mut Inventory, workspace_host: &str) -> Vec<String> {
    let decided = unique_agent_labels(inv.agents.iter().map(|a| a.name.as_str()));
    let plain: BTreeMap<&str, String> = decided
        .keys()
        .map(|n| (n.as_str(), agent_label(n)))
        .collect();
    inv.host_labels = decided
        .iter()
        .filter(|(n, l)| plain.get(n.as_str()) != Some(*l))
        .map(|(n, l)| (n.clone(), l.clone()))
        .collect();
    let host = |label: &str| host_for_label(label, workspace_host);

    let mut warnings = Vec::new();
    // One warning per wanted plain label: every agent that wanted it or holds it now.
    let wanted: BTreeSet<&str> = inv
        .host_labels
        .keys()
        .filter_map(|n| plain.get(n.as_str()).map(String::as_str))
        .collect();
    for label in wanted {
        let involved: Vec<&str> = decided
            .iter()
            .filter(|(n, l)| {
                plain.get(n.as_str()).map(String::as_str) == Some(label) || l.as_str() == label
            })
            .map(|(n, _)| n.as_str())
            .collect();
        let moved: Vec<String> = involved
            .iter()
            .filter_map(|n| {
                inv.host_labels
                    .get(*n)
                    .map(|l| format!("{n} -> {}", host(l)))
            })
            .collect();
        warnings.push(format!(
            "agents {} would share the Akto host {}: each gets its own host, derived from its exact name ({}); the Akto collection of these agents changes to the new host",
            involved.join(", "),
            host(label),
            moved.join(", ")
        ));
    }
    // Agents with the very same name cannot be told apart by name.
    let mut seen: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for a in &inv.agents {
        let what = match (&a.endpoint, &a.app, &a.table) {
            (Some(e), _, _) => format!("serving endpoint {e}"),
            (None, Some(app), _) => format!("app {}", app.name),
            (None, None, Some(t)) => format!("table {}", t.full_name),
            (None, None, None) => "no endpoint, app or table".to_string(),
        };
        seen.entry(a.name.as_str()).or_default().push(what);
    }
    for (name, whats) in seen.iter().filter(|(_, w)| w.len() > 1) {
        warnings.push(format!(
            "{} agents are named {name} ({}): they share the Akto host {} and the ai-agent tag; rename one of them to tell them apart",
            whats.len(),
            whats.join("; "),
            inv.agent_host(name, workspace_host)
        ));
    }
    warnings
}

/// Host warnings already logged by this process: a collision is reported once, not every cycle.
static HOST_WARNINGS_LOGGED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn warn_once(message: String) {
    let mut logged = HOST_WARNINGS_LOGGED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if logged.len() >= 1024 {
        // A bound, not a policy: forgetting only means a collision is reported once more.
        logged.clear();
    }
    if logged.insert(message.clone()) {
        tracing::warn!("{message}");
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

/// `name` without `prefix`, compared ASCII case-insensitively (Unity Catalog names are
/// case-insensitive and stored lowercase: `PROD_` is the prefix of `prod_bot_payload`); `None`
/// when `name` does not start with it.
pub fn strip_prefix_ci<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let n = prefix.len();
    let head = name.as_bytes().get(..n)?;
    if head.eq_ignore_ascii_case(prefix.as_bytes()) {
        name.get(n..)
    } else {
        None
    }
}

/// Whether the Unity Catalog object `full_name` (`catalog.schema.name`) is in this instance's
/// scope: in `catalog.schema`, its name starting with `prefix` (all ASCII case-insensitive).
pub fn in_scope(full_name: &str, catalog: &str, schema: &str, prefix: &str) -> bool {
    let mut parts = full_name.splitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(c), Some(s), Some(n)) => {
            c.eq_ignore_ascii_case(catalog)
                && s.eq_ignore_ascii_case(schema)
                && strip_prefix_ci(n, prefix).is_some()
        }
        _ => false,
    }
}

/// How a table out of scope ([`in_scope`] is false) is out: outside `catalog.schema`, or in it
/// with a name `DATABRICKS_PREFIX` does not match.
fn outside(full_name: &str, catalog: &str, schema: &str, prefix: &str) -> String {
    let mut parts = full_name.splitn(3, '.');
    match (parts.next(), parts.next()) {
        (Some(c), Some(s)) if c.eq_ignore_ascii_case(catalog) && s.eq_ignore_ascii_case(schema) => {
            format!("does not match DATABRICKS_PREFIX '{prefix}'")
        }
        _ => format!("is outside {catalog}.{schema}"),
    }
}

/// Why an endpoint's agent is out of this instance's scope, or `None` when it is in scope.
///
/// The agent's Unity Catalog anchor decides: the inference table its config names (whether or
/// not the table is visible; `DATABRICKS_PREFIX` applies, it filters tables), else its served UC
/// models (in scope when any one is in `catalog.schema`; the table prefix does not apply to
/// model names, so a prefix set for tables never drops a table-less agent's traces). An agent
/// with no anchor at all (no inference table, only foundation or external models) is in scope:
/// nothing ties it to another instance, and finding every agent matters more.
fn endpoint_out_of_scope(
    target: Option<&str>,
    models: &[ServedModel],
    (catalog, schema, prefix): (&str, &str, &str),
) -> Option<String> {
    if let Some(t) = target {
        return (!in_scope(t, catalog, schema, prefix)).then(|| {
            format!(
                "inference table {t} {}: {OUT_OF_SCOPE}",
                outside(t, catalog, schema, prefix)
            )
        });
    }
    let uc: Vec<&str> = models
        .iter()
        .filter(|m| m.kind == "uc_model")
        .map(|m| m.name.as_str())
        .collect();
    if uc.is_empty() || uc.iter().any(|m| in_scope(m, catalog, schema, "")) {
        return None;
    }
    Some(format!(
        "no inference table enabled on this endpoint; its UC models ({}) are outside \
         {catalog}.{schema}: {OUT_OF_SCOPE}",
        uc.join(", ")
    ))
}

/// How the out-of-scope set names an agent: `endpoint:<name>`, else `app:<name>` (the only
/// agents that can be out of scope; table agents are in scope by construction).
fn scope_key(a: &Agent) -> Option<String> {
    match (&a.endpoint, &a.app) {
        (Some(e), _) => Some(format!("endpoint:{e}")),
        (None, Some(app)) => Some(format!("app:{}", app.name)),
        (None, None) => None,
    }
}

/// Gives an inference table that several endpoints name to one of them only: the endpoint the
/// table is named after (`support_bot` for `prod_support_bot_payload` with prefix `prod_`), else
/// the first by name. One reader per table, or every row of it would be read and sent twice in
/// one cycle. The others keep a note naming the agent whose records carry their rows, are listed
/// in [`Inventory::shared_tables`] (their traces then send no execution records, which their
/// rows already are), and a WARN says so.
fn share_tables_once(inv: &mut Inventory) {
    let named_after = |a: &Agent, t: &InferenceTable| {
        let short = t.full_name.rsplit('.').next().unwrap_or(&t.full_name);
        let own = normalize_name(&a.name);
        own == normalize_name(&table_agent_name(short))
            || strip_prefix_ci(short, &inv.prefix)
                .is_some_and(|rest| own == normalize_name(&table_agent_name(rest)))
    };
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for a in &inv.agents {
        let Some(t) = &a.table else { continue };
        let key = t.full_name.to_ascii_lowercase();
        if !owner.contains_key(&key) || named_after(a, t) {
            let keep_first = owner.get(&key).is_some_and(|o| {
                inv.agents
                    .iter()
                    .any(|b| &b.name == o && b.table.as_ref().is_some_and(|bt| named_after(b, bt)))
            });
            if !keep_first {
                owner.insert(key, a.name.clone());
            }
        }
    }
    let mut shared = BTreeMap::new();
    for a in inv.agents.iter_mut() {
        let Some(t) = &a.table else { continue };
        let Some(first) = owner.get(&t.full_name.to_ascii_lowercase()) else {
            continue;
        };
        if *first == a.name {
            continue;
        }
        let note = format!(
            "inference table {} is also the table of endpoint {first}: its rows, this \
             endpoint's too, are read once and sent as {first}'s",
            t.full_name
        );
        warn_once(format!("endpoint {}: {note}", a.name));
        shared.insert(a.name.clone(), first.clone());
        a.table = None;
        a.table_note = Some(note);
    }
    inv.shared_tables = shared;
}

/// The end of every out-of-scope note.
const OUT_OF_SCOPE: &str = "out of scope, its MLflow traces are not read by this instance \
     (the instance for that catalog.schema and prefix reads them)";

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
        listed_tables: tables
            .iter()
            .map(|t| {
                t.full_name
                    .clone()
                    .unwrap_or_else(|| format!("{catalog}.{schema}.{}", t.name))
                    .to_ascii_lowercase()
            })
            .collect(),
        ..Default::default()
    };

    // Inference tables in scope, by full name (lowercase: UC names are case-insensitive).
    let mut payload_tables: BTreeMap<String, InferenceTable> = BTreeMap::new();
    // Every inference table of the schema, in the prefix or not: what an app or an experiment
    // named after an agent belongs to is decided from these ([`name_anchor`]).
    let mut schema_tables: Vec<SchemaTable> = Vec::new();
    for t in &tables {
        if matches!(
            classify(t),
            TableKind::AiGatewayPayload | TableKind::LegacyPayload
        ) {
            let agent = table_agent_name(&t.name);
            schema_tables.push(SchemaTable {
                full: t
                    .full_name
                    .clone()
                    .unwrap_or_else(|| format!("{catalog}.{schema}.{}", t.name)),
                agent: normalize_name(&agent),
                stripped: strip_prefix_ci(&t.name, prefix)
                    .map(|rest| normalize_name(&table_agent_name(rest))),
            });
        }
        if strip_prefix_ci(&t.name, prefix).is_none() {
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
                        columns: t
                            .columns
                            .iter()
                            .map(|c| c.name.to_ascii_lowercase())
                            .collect(),
                    },
                );
            }
            // Sorted below: the inventory entries (and their hashes) must not depend on the
            // order Unity Catalog lists tables in.
            TableKind::OtelSpans => {
                if t.columns
                    .iter()
                    .any(|c| c.name.eq_ignore_ascii_case("events"))
                {
                    inv.otel_events.insert(full.clone());
                }
                inv.otel_span_tables.push(full)
            }
            TableKind::Other => {
                tracing::debug!(table = %full, "not an inference or trace table; ignored")
            }
        }
    }

    let endpoints = match client.list_serving_endpoints().await {
        Ok(e) => e,
        Err(e) if e.is_listing_refused() => {
            tracing::warn!(
                "cannot list serving endpoints ({e}); agents are found from inference tables and \
                 apps only this cycle. Fix: give the service principal CAN_VIEW (or CAN_QUERY) on \
                 the serving endpoints of its agents, or the workspace access to list them"
            );
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let mut claimed: BTreeSet<String> = BTreeSet::new();
    // Agent endpoint -> the inference table its config names (visible or not, in scope or not):
    // an app querying that endpoint belongs with that table.
    let mut endpoint_tables: BTreeMap<String, String> = BTreeMap::new();
    for listed in endpoints {
        // The list omits legacy auto-capture settings: fetch the endpoint when needed.
        let ep = if listed.inference_table().is_none() {
            match client.get_serving_endpoint(&listed.name).await {
                Ok(full) => full,
                Err(e) if !e.is_retriable() => {
                    tracing::warn!("cannot read serving endpoint {}: {e}", listed.name);
                    listed
                }
                Err(e) => return Err(e),
            }
        } else {
            listed
        };
        let is_agent = is_agent_endpoint(&ep);
        let target = ep.inference_table();
        if let (true, Some(t)) = (is_agent, &target) {
            endpoint_tables.insert(ep.name.clone(), t.clone());
        }
        let table = target
            .as_ref()
            .and_then(|t| payload_tables.get(&t.to_ascii_lowercase()).cloned());
        let models = served_models(&ep);
        let scope_note =
            endpoint_out_of_scope(target.as_deref(), &models, (catalog, schema, prefix));
        let table_note = match (&target, &table) {
            _ if scope_note.is_some() => {
                inv.out_of_scope.insert(format!("endpoint:{}", ep.name));
                scope_note
            }
            (None, _) => Some("no inference table enabled on this endpoint".to_string()),
            (Some(t), None) => {
                inv.unseen_tables.insert(ep.name.clone(), t.clone());
                Some(format!(
                    "inference table {t} is not visible in {catalog}.{schema} (not created yet, \
                     no SELECT on it, or not an inference table)"
                ))
            }
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
            models,
            table,
            table_note,
            tags: ep
                .tags
                .iter()
                .map(|t| (t.key.clone(), t.value.clone().unwrap_or_default()))
                .collect(),
            experiment_id: None,
            app: None,
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
            experiment_id: None,
            app: None,
        });
    }
    inv.agents.sort_by(|a, b| a.name.cmp(&b.name));
    inv.llm_endpoints.sort_by(|a, b| a.name.cmp(&b.name));
    share_tables_once(&mut inv);

    let principal = client.principal();
    let functions: Vec<FunctionInfo> = match client.list_functions(catalog, schema).await {
        Ok(f) => f,
        Err(e) if e.is_listing_refused() => {
            tracing::warn!(
                "cannot list the UC functions of {catalog}.{schema} ({e}); agent tools are not \
                 listed this cycle. Fix: {}",
                uc_objects_fix(catalog, schema, &principal)
            );
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    inv.tools = functions.into_iter().map(|f| f.full_name).collect();
    inv.tools.sort();
    inv.otel_span_tables.sort();

    // Whether the listing answered: a refused one is its own WARN, not a missing EXECUTE.
    let (models, models_listed) = match client.list_models(catalog, schema).await {
        Ok(m) => (m, true),
        Err(e) if e.is_listing_refused() => {
            tracing::warn!(
                "cannot list the UC models of {catalog}.{schema} ({e}); model versions are not \
                 listed and experiments are not found through them this cycle. Fix: {}",
                uc_objects_fix(catalog, schema, &principal)
            );
            (Vec::new(), false)
        }
        Err(e) => return Err(e),
    };
    let mut run_ids: BTreeMap<(String, String), String> = BTreeMap::new();
    for m in models {
        let versions = match client.list_model_versions(&m.full_name).await {
            Ok(v) => v
                .into_iter()
                .map(|v| {
                    if let Some(r) = v.run_id.as_ref().filter(|r| !r.is_empty()) {
                        run_ids.insert(
                            (m.full_name.to_ascii_lowercase(), v.version.clone()),
                            r.clone(),
                        );
                    }
                    v.version
                })
                .collect(),
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
    if models_listed {
        // A served name the listing left out is a missing EXECUTE only when Unity Catalog says so
        // for that model: not when it was deleted, or is no model (a Feature Serving spec).
        for (model, endpoint) in unlisted_models(&inv) {
            match client.get_model(&model).await {
                Err(DatabricksError::PermissionDenied { .. }) => {
                    inv.unlisted_models.insert(model, endpoint);
                }
                // Only a WARN depends on it: a transient failure skips it this cycle.
                Err(e) if e.is_retriable() => {
                    tracing::debug!("cannot tell why served model {model} is not listed: {e}")
                }
                Ok(_) | Err(_) => {
                    tracing::debug!("served model {model} is not listed, but not for a grant")
                }
            }
        }
    }
    if !inv.unlisted_models.is_empty() {
        warn_once(unlisted_models_warning(&inv, &principal));
    }

    let anchors = Anchors {
        schema_tables: &schema_tables,
        endpoint_tables: &endpoint_tables,
    };
    add_apps(client, &mut inv, &anchors).await?;
    find_experiments(client, &mut inv, &run_ids, &schema_tables).await?;
    for w in assign_hosts(&mut inv, client.base_url()) {
        warn_once(w);
    }
    Ok(inv)
}

/// The UC models of catalog.schema that the endpoints in scope serve and Unity Catalog did not
/// list ([`Inventory::unlisted_models`]), compared case-insensitively.
fn unlisted_models(inv: &Inventory) -> BTreeMap<String, String> {
    let listed: BTreeSet<String> = inv
        .models
        .iter()
        .map(|m| m.full_name.to_ascii_lowercase())
        .collect();
    let mut endpoints: Vec<&Agent> = inv
        .agents
        .iter()
        .chain(inv.llm_endpoints.iter())
        .filter(|a| a.endpoint.is_some() && !inv.is_out_of_scope(a))
        .collect();
    endpoints.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for a in endpoints {
        for m in a.models.iter().filter(|m| m.kind == "uc_model") {
            let key = m.name.to_ascii_lowercase();
            if in_scope(&key, &inv.catalog, &inv.schema, "")
                && !listed.contains(&key)
                && !out.keys().any(|k| k.eq_ignore_ascii_case(&key))
            {
                out.insert(m.name.clone(), a.endpoint.clone().unwrap_or_default());
            }
        }
    }
    out
}

/// The WARN (and `check` line) for [`Inventory::unlisted_models`].
pub fn unlisted_models_warning(inv: &Inventory, principal: &str) -> String {
    let served: Vec<String> = inv
        .unlisted_models
        .iter()
        .map(|(m, e)| format!("{m} (served by endpoint {e})"))
        .collect();
    let tools = if inv.tools.is_empty() {
        "its UC functions (agent tools) are not listed either (the list came back empty)"
    } else {
        "UC functions (agent tools) the principal may not EXECUTE are not listed either"
    };
    format!(
        "Unity Catalog did not list the UC model(s) {} of {}.{}: it lists only the models, model \
         versions and functions the service principal may EXECUTE (an empty list, not an \
         error), so these models' versions cannot lead to the MLflow experiments their runs \
         logged to (an agent deployed with agents.deploy() logs its traces to its notebook's \
         experiment: those traces are not read unless an experiment is named after the agent), \
         and {tools}. Fix: {}",
        served.join(", "),
        inv.catalog,
        inv.schema,
        execute_fix(&inv.catalog, &inv.schema, principal)
    )
}

/// The GRANT of EXECUTE on the schema, names quoted to be pasted as they are.
pub fn execute_fix(catalog: &str, schema: &str, principal: &str) -> String {
    use crate::databricks::error::quote_ident;
    format!(
        "`GRANT EXECUTE ON SCHEMA {}.{} TO {};`",
        quote_ident(catalog),
        quote_ident(schema),
        quote_ident(principal)
    )
}

/// The grants that let the service principal see a schema's UC functions and models.
fn uc_objects_fix(catalog: &str, schema: &str, principal: &str) -> String {
    use crate::databricks::error::quote_ident;
    let c = quote_ident(catalog);
    let s = format!("{c}.{}", quote_ident(schema));
    let p = quote_ident(principal);
    format!(
        "the service principal needs USE CATALOG, USE SCHEMA and EXECUTE to see the schema's \
         functions and models: `GRANT USE CATALOG ON CATALOG {c} TO {p}; \
         GRANT USE SCHEMA ON SCHEMA {s} TO {p}; GRANT EXECUTE ON SCHEMA {s} TO {p};`"
    )
}

/// Lowercase, every run of characters outside `[a-z0-9]` as one `_`, trimmed: `Code-Reviewer`
/// and `code_reviewer` compare equal.
pub fn normalize_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

/// The names an agent may be known by elsewhere (app, experiment): its own name, that name
/// without the table prefix, its app's name, and its UC model's short name.
fn agent_aliases(a: &Agent, prefix: &str) -> Vec<String> {
    aliases(a, prefix, |_| true)
}

/// [`agent_aliases`], the name without the prefix only when `keep_stripped` accepts it.
fn aliases(a: &Agent, prefix: &str, keep_stripped: impl Fn(&str) -> bool) -> Vec<String> {
    let mut names = vec![normalize_name(&a.name)];
    if !prefix.is_empty() {
        if let Some(short) = strip_prefix_ci(&a.name, prefix).map(normalize_name) {
            if keep_stripped(&short) {
                names.push(short);
            }
        }
    }
    if let Some(app) = &a.app {
        names.push(normalize_name(&app.name));
    }
    for m in a.models.iter().filter(|m| m.kind == "uc_model") {
        names.push(normalize_name(m.name.rsplit('.').next().unwrap_or(&m.name)));
    }
    names.retain(|n| !n.is_empty());
    names.dedup();
    names
}

/// An inference table of the schema listing, in this instance's prefix or not.
#[derive(Debug, Clone)]
struct SchemaTable {
    /// Its full name, as listed.
    full: String,
    /// Its agent's name ([`table_agent_name`]), normalized ([`normalize_name`]).
    agent: String,
    /// That name without this instance's prefix, normalized; `None` when the table is outside
    /// the prefix.
    stripped: Option<String>,
}

impl SchemaTable {
    fn in_scope(&self) -> bool {
        self.stripped.is_some()
    }
}

/// What ties an app to a Unity Catalog scope.
struct Anchors<'a> {
    /// Every inference table of the schema ([`SchemaTable`]).
    schema_tables: &'a [SchemaTable],
    /// Agent endpoint name -> the inference table its config names.
    endpoint_tables: &'a BTreeMap<String, String>,
}

/// What the inference tables of the schema say about an app or experiment named `key`
/// (normalized), seen from this instance ([`name_anchor`]).
#[derive(Debug)]
enum NameAnchor<'a> {
    /// Tables in this instance's scope named `key`, exactly or once this instance's prefix is
    /// stripped: the name is this instance's, whatever other tables are named so. The first
    /// (the exact name, then the first by full name) is the anchor.
    InScope(Vec<&'a SchemaTable>),
    /// No table in scope is named `key`, but these tables outside it are: exactly, or once a
    /// prefix of whole `_`-separated words is stripped (`test_hr_assistant` for `assistant`).
    /// The first (the shortest name, then the first by full name) is the anchor.
    OutOfScope(Vec<&'a SchemaTable>),
    /// No inference table is named `key`.
    Unknown,
}

/// Where an app or experiment named `key` (normalized) belongs, from the schema listing: a table
/// inside this instance's scope named `key` (exactly, or after this instance's prefix) always
/// wins; only when there is none may tables outside the scope named `key` (exactly, or after a
/// prefix of whole words) make it another instance's. Two instances whose own tables are both
/// named so both claim it: the documented limit (README "Which agents' traces are read").
fn name_anchor<'a>(key: &str, tables: &'a [SchemaTable]) -> NameAnchor<'a> {
    if key.is_empty() {
        return NameAnchor::Unknown;
    }
    let order = |a: &&SchemaTable, b: &&SchemaTable| {
        a.agent.len().cmp(&b.agent.len()).then_with(|| {
            a.full
                .to_ascii_lowercase()
                .cmp(&b.full.to_ascii_lowercase())
        })
    };
    let mut ours: Vec<&SchemaTable> = tables
        .iter()
        .filter(|t| t.in_scope() && (t.agent == key || t.stripped.as_deref() == Some(key)))
        .collect();
    if !ours.is_empty() {
        // The exact name first, then the first by full name.
        ours.sort_by(|a, b| {
            (a.agent != key)
                .cmp(&(b.agent != key))
                .then_with(|| order(a, b))
        });
        return NameAnchor::InScope(ours);
    }
    let suffix = format!("_{key}");
    let mut theirs: Vec<&SchemaTable> = tables
        .iter()
        .filter(|t| !t.in_scope() && (t.agent == key || t.agent.ends_with(&suffix)))
        .collect();
    if theirs.is_empty() {
        return NameAnchor::Unknown;
    }
    theirs.sort_by(order);
    NameAnchor::OutOfScope(theirs)
}

/// [`agent_aliases`] as used to find an agent's MLflow experiment by name: the name without the
/// table prefix counts only when the agent's own inference table is the one that name belongs to
/// in this instance ([`name_anchor`]: a table in scope always wins over tables outside it, such
/// as `dev_support_bot_payload` next to this instance's `prod_support_bot_payload`). An agent
/// with no table of its own has nothing to tell: its name without the prefix is not used.
fn experiment_aliases(a: &Agent, prefix: &str, tables: &[SchemaTable]) -> Vec<String> {
    let Some(own) = a.table.as_ref().map(|t| t.full_name.to_ascii_lowercase()) else {
        return aliases(a, prefix, |_| false);
    };
    aliases(a, prefix, |short| match name_anchor(short, tables) {
        NameAnchor::InScope(ts) => ts
            .first()
            .is_some_and(|t| t.full.to_ascii_lowercase() == own),
        NameAnchor::OutOfScope(_) | NameAnchor::Unknown => false,
    })
}

/// Whether an agent endpoint or its inference table is named after the app `key` (normalized):
/// exactly, or after a prefix of whole `_`-separated words (`agents_main-prod-support_bot`).
fn named_after(key: &str, endpoint: &str, table: &str) -> bool {
    let suffix = format!("_{key}");
    let short = table.rsplit('.').next().unwrap_or(table);
    [
        normalize_name(endpoint),
        normalize_name(&table_agent_name(short)),
    ]
    .iter()
    .any(|n| n == key || n.ends_with(&suffix))
}

/// The scope of an app, decided from its agent-endpoint resources (`(endpoint, inference
/// table)`, known from the endpoint listing every instance sees): `None` when it has none with
/// a known table (its name decides, [`name_anchor`]), `Some(None)` when it is in scope,
/// `Some(Some(note))` when it is out of scope, the note saying why. The resources named after
/// the app ([`named_after`]) decide when there are any, the others are then shared endpoints (a
/// guardrail, a retriever); among the deciding ones, any table in scope puts the app in scope.
/// The second value is a WARN when the resource tables lie in several scopes.
fn resource_scope(
    app: &str,
    key: &str,
    resources: &[(&str, &str)],
    (catalog, schema, prefix): (&str, &str, &str),
) -> (Option<Option<String>>, Option<String>) {
    if resources.is_empty() {
        return (None, None);
    }
    let here = |t: &str| in_scope(t, catalog, schema, prefix);
    let scope = format!("{catalog}.{schema} with prefix '{prefix}'");
    let named: Vec<(&str, &str)> = resources
        .iter()
        .copied()
        .filter(|(e, t)| named_after(key, e, t))
        .collect();
    let deciding = if named.is_empty() {
        resources.to_vec()
    } else {
        named.clone()
    };
    let mut by_table = deciding.clone();
    by_table.sort_by_key(|(_, t)| t.to_ascii_lowercase());
    let ours = by_table.iter().find(|(_, t)| here(t));
    let verdict = match (ours, by_table.first()) {
        (Some(_), _) | (None, None) => None,
        (None, Some((e, t))) => Some(format!(
            "deployed as a Databricks App querying agent endpoint {e}, whose inference table {t} \
             {}: {OUT_OF_SCOPE}",
            outside(t, catalog, schema, prefix)
        )),
    };
    // Several scopes: other catalog.schema pairs, or in and out of this instance's prefix.
    let scopes: BTreeSet<(String, bool)> = resources
        .iter()
        .map(|(_, t)| {
            let cs = t.rsplit_once('.').map_or(*t, |(cs, _)| cs);
            (cs.to_ascii_lowercase(), here(t))
        })
        .collect();
    let tables_of = |rs: &[(&str, &str)]| {
        let mut ts: Vec<&str> = rs.iter().map(|(_, t)| *t).collect();
        ts.sort();
        ts.join(", ")
    };
    let warning = (scopes.len() > 1).then(|| {
        let mut listed: Vec<String> = resources
            .iter()
            .map(|(e, t)| format!("{e} -> {t}"))
            .collect();
        listed.sort();
        let decided = match (&verdict, named.is_empty()) {
            (None, true) => format!(
                "none is named after the app, so every instance whose scope holds one of their \
                 tables reads its MLflow traces; this instance ({scope}) does. Fix: name the app \
                 after its own agent's endpoint or inference table, so that it belongs with that \
                 one alone"
            ),
            (Some(_), true) => format!(
                "none is named after the app and none is in this instance's scope ({scope}), so \
                 the instances whose scope holds one of them read its MLflow traces. Fix: name \
                 the app after its own agent's endpoint or inference table, so that it belongs \
                 with that one alone"
            ),
            (None, false) => format!(
                "it belongs with {}, named after it, in this instance's scope ({scope}): this \
                 instance reads its MLflow traces",
                tables_of(&named)
            ),
            (Some(_), false) => format!(
                "it belongs with {}, named after it, outside this instance's scope ({scope}): \
                 the instance whose scope holds that table reads its MLflow traces",
                tables_of(&named)
            ),
        };
        format!(
            "app {app} queries agent endpoints whose inference tables lie in several scopes ({}): \
             {decided}",
            listed.join(", ")
        )
    });
    (Some(verdict), warning)
}

/// Lists Databricks Apps: an app whose name matches a table-only agent is that agent; an app
/// with a serving-endpoint or experiment resource is an agent of its own (its executions come
/// from its MLflow traces); other apps (dashboards, ...) are not agents. An apps API that is
/// not available (disabled, no permission) only costs a WARN.
///
/// An app's scope anchor: the inference tables of the agent endpoints it queries (its
/// serving-endpoint resources: those named after it when some are, else all of them; any one
/// of them in scope puts the app in scope, [`resource_scope`]), else the inference tables named
/// after it
/// ([`name_anchor`]: one in scope wins; only when none is may one outside make it out of scope,
/// with a WARN), else none (the app is in scope). An app out of scope is listed, without its
/// experiment, and added to [`Inventory::out_of_scope`]; an app is matched to a table-only agent only when
/// that agent's table is its anchor by name.
async fn add_apps(
    client: &DatabricksClient,
    inv: &mut Inventory,
    anchors: &Anchors<'_>,
) -> Result<(), DatabricksError> {
    let apps = match client.list_apps().await {
        Ok(a) => a,
        Err(e) if !e.is_retriable() => {
            tracing::warn!("cannot list Databricks Apps (agents deployed as apps are found from their tables only): {e}");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for app in apps {
        let entry = AppEntry {
            name: app.name.clone(),
            url: app.url.clone(),
            description: app.description.clone(),
            state: app.app_status.as_ref().and_then(|s| s.state.clone()),
            compute_state: app.compute_status.as_ref().and_then(|s| s.state.clone()),
            serving_endpoints: app
                .resources
                .iter()
                .filter_map(|r| r.serving_endpoint.as_ref().map(|e| e.name.clone()))
                .collect(),
            sql_warehouses: app
                .resources
                .iter()
                .filter_map(|r| r.sql_warehouse.as_ref().map(|w| w.id.clone()))
                .collect(),
        };
        let experiment = app
            .resources
            .iter()
            .find_map(|r| r.experiment.as_ref())
            .map(|e| e.experiment_id.clone())
            .filter(|e| !e.is_empty());
        let key = normalize_name(&app.name);
        let prefix = inv.prefix.clone();
        let scope = format!(
            "{}.{} with prefix '{}'",
            inv.catalog, inv.schema, inv.prefix
        );
        let resources: Vec<(&str, &str)> = entry
            .serving_endpoints
            .iter()
            .filter_map(|e| {
                anchors
                    .endpoint_tables
                    .get(e)
                    .map(|t| (e.as_str(), t.as_str()))
            })
            .collect();
        let (by_resource, resource_warning) = resource_scope(
            &app.name,
            &key,
            &resources,
            (&inv.catalog, &inv.schema, &inv.prefix),
        );
        if let Some(w) = resource_warning {
            warn_once(w);
        }
        let by_name = name_anchor(&key, anchors.schema_tables);
        let out_note = match (by_resource, &by_name) {
            (Some(verdict), _) => verdict,
            (None, NameAnchor::OutOfScope(ts)) => {
                let listed: Vec<&str> = ts.iter().map(|t| t.full.as_str()).collect();
                let first = listed.first().copied().unwrap_or_default();
                warn_once(format!(
                    "app {} is named after inference table(s) {} outside this instance's scope \
                     ({scope}) and after none in it: its MLflow traces are left to the instance \
                     whose DATABRICKS_PREFIX covers {first}. Fix: if this instance should read \
                     them, set DATABRICKS_PREFIX to cover that table, or add the agent's serving \
                     endpoint to the app's resources",
                    app.name,
                    listed.join(", "),
                ));
                Some(format!(
                    "deployed as a Databricks App named after inference table {first}, outside \
                     {scope}: {OUT_OF_SCOPE}"
                ))
            }
            (None, _) => None,
        };
        let anchor = match &by_name {
            NameAnchor::InScope(ts) if out_note.is_none() => {
                ts.first().map(|t| t.full.to_ascii_lowercase())
            }
            _ => None,
        };
        let matched = inv.agents.iter_mut().find(|a| {
            a.endpoint.is_none()
                && a.app.is_none()
                && anchor.is_some()
                && a.table.as_ref().map(|t| t.full_name.to_ascii_lowercase()) == anchor
                && agent_aliases(a, &prefix).contains(&key)
        });
        match matched {
            Some(a) => {
                a.app = Some(entry);
                if a.experiment_id.is_none() {
                    a.experiment_id = experiment;
                }
            }
            None if !entry.serving_endpoints.is_empty() || experiment.is_some() => {
                let out = out_note.is_some();
                if out {
                    inv.out_of_scope.insert(format!("app:{}", app.name));
                }
                let table_note = out_note.unwrap_or_else(|| {
                    "deployed as a Databricks App: executions come from its MLflow traces"
                        .to_string()
                });
                let experiment_id = if out { None } else { experiment };
                inv.agents.push(Agent {
                    name: app.name.clone(),
                    endpoint: None,
                    task: None,
                    is_agent: true,
                    models: Vec::new(),
                    table: None,
                    table_note: Some(table_note),
                    tags: BTreeMap::new(),
                    experiment_id,
                    app: Some(entry),
                });
            }
            None => tracing::debug!(app = %app.name, "app without agent resources; not an agent"),
        }
    }
    inv.agents.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(())
}

/// Finds each agent's MLflow experiment: the run that logged its served UC model version
/// (`runs/get` -> `experiment_id`), else an experiment whose name (last path segment) or
/// `agent`/`agent_name` tag names the agent. An experiment belongs to one agent only (the first
/// in inventory order; a second claimant gets a WARN), so this instance sends no trace twice.
///
/// This is where the scope of the traces is decided: the agents in [`Inventory::out_of_scope`] (by
/// [`scope_key`]: their Unity Catalog anchor is outside catalog.schema and prefix) get no
/// experiment, so [`crate::traces::trace_sources`] never reads their traces; the instance whose
/// scope they are in does. An experiment found by name uses the agent's name without the table
/// prefix only when [`experiment_aliases`] allows it. What this guarantees, and where instances
/// may still read the same traces (agents with no anchor, names their own tables share), is in
/// README "Which agents' traces are read".
async fn find_experiments(
    client: &DatabricksClient,
    inv: &mut Inventory,
    run_ids: &BTreeMap<(String, String), String>,
    schema_tables: &[SchemaTable],
) -> Result<(), DatabricksError> {
    let out_of_scope = &inv.out_of_scope;
    let skipped = |a: &Agent| scope_key(a).is_some_and(|k| out_of_scope.contains(&k));
    for a in inv.agents.iter_mut().filter(|a| skipped(a)) {
        a.experiment_id = None;
    }
    let wanted = |a: &Agent| a.experiment_id.is_none() && !skipped(a);
    // Run id -> its experiment, or whether reading it was refused (403) rather than failed
    // otherwise (deleted run: 404).
    let mut by_run: BTreeMap<String, Result<String, bool>> = BTreeMap::new();
    let mut denied: Vec<UnreadableRun> = Vec::new();
    for a in inv.agents.iter_mut().filter(|a| wanted(a)) {
        for m in a.models.iter().filter(|m| m.kind == "uc_model") {
            let Some(v) = &m.version else { continue };
            let Some(run) = run_ids.get(&(m.name.to_ascii_lowercase(), v.clone())) else {
                continue;
            };
            let exp = match by_run.get(run) {
                Some(e) => e.clone(),
                None => {
                    let e = match client.run_experiment(run).await {
                        Ok(e) => Ok(e),
                        Err(e @ DatabricksError::PermissionDenied { .. }) => {
                            tracing::debug!("run {run} of {} v{v} refused: {e}", m.name);
                            Err(true)
                        }
                        Err(e) if !e.is_retriable() => {
                            tracing::debug!("run {run} of {} v{v} not readable: {e}", m.name);
                            Err(false)
                        }
                        Err(e) => return Err(e),
                    };
                    by_run.insert(run.clone(), e.clone());
                    e
                }
            };
            match exp {
                Ok(e) => {
                    a.experiment_id = Some(e);
                    break;
                }
                Err(true) => denied.push(UnreadableRun {
                    agent: a.name.clone(),
                    model: m.name.clone(),
                    version: v.clone(),
                    run_id: run.clone(),
                    experiment_id: None,
                }),
                Err(false) => {}
            }
        }
    }
    if inv.agents.iter().any(|a| wanted(a) && a.is_agent) {
        match client.search_experiments().await {
            Ok(exps) => {
                let prefix = inv.prefix.clone();
                for a in inv.agents.iter_mut().filter(|a| wanted(a) && a.is_agent) {
                    a.experiment_id =
                        match_experiment(&experiment_aliases(a, &prefix, schema_tables), &exps);
                }
            }
            Err(e) if !e.is_retriable() => {
                tracing::warn!("cannot search MLflow experiments (traces of agents without a logged model are not read): {e}");
            }
            Err(e) => return Err(e),
        }
    }
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for a in inv.agents.iter_mut() {
        let Some(e) = a.experiment_id.clone() else {
            continue;
        };
        if let Some(first) = owner.get(&e) {
            tracing::warn!(
                "MLflow experiment {e} belongs to agent {first}; agent {} shares it and its traces are attributed to {first}",
                a.name
            );
            a.experiment_id = None;
        } else {
            owner.insert(e, a.name.clone());
        }
    }
    // A refused run is named once the agent's experiment is settled: an agent that found one by
    // name is still told, since that one may not be where the run logged to.
    let principal = client.principal();
    for mut r in denied {
        r.experiment_id = inv
            .agents
            .iter()
            .find(|a| a.name == r.agent)
            .and_then(|a| a.experiment_id.clone());
        warn_once(r.describe(&principal));
        inv.unreadable_runs.push(r);
    }
    Ok(())
}

/// The experiment named after (or tagged with) one of `aliases`, if exactly one matches.
pub fn match_experiment(
    aliases: &[String],
    exps: &[crate::databricks::mlflow::Experiment],
) -> Option<String> {
    let hits: Vec<&str> = exps
        .iter()
        .filter(|e| {
            let by_name = e
                .name
                .as_deref()
                .map(|n| normalize_name(n.rsplit('/').next().unwrap_or(n)))
                .is_some_and(|n| aliases.contains(&n));
            let by_tag = e.tags.iter().any(|t| {
                matches!(t.key.as_str(), "agent" | "agent_name")
                    && t.value
                        .as_deref()
                        .is_some_and(|v| aliases.contains(&normalize_name(v)))
            });
            by_name || by_tag
        })
        .map(|e| e.experiment_id.as_str())
        .collect();
    match hits.as_slice() {
        [one] => Some(one.to_string()),
        _ => None,
    }
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
            a.endpoint
                .clone()
                .or_else(|| a.app.as_ref().map(|p| format!("app:{}", p.name)))
                .unwrap_or_else(|| "-".into()),
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
         tables: {} in {}.{}, {} matching prefix '{}'; {} UC functions (tools), {} UC models, {} OTel span tables; \
         {} apps, {} MLflow experiments",
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
        inv.otel_span_tables.len(),
        inv.agents.iter().filter(|a| a.app.is_some()).count(),
        inv.agents.iter().filter(|a| a.experiment_id.is_some()).count()
    );
    if !inv.tools.is_empty() {
        let _ = writeln!(out, "tools: {}", inv.tools.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, endpoint: bool, app: Option<&str>) -> Agent {
        Agent {
            name: name.into(),
            endpoint: endpoint.then(|| name.to_string()),
            task: None,
            is_agent: true,
            models: Vec::new(),
            table: (!endpoint && app.is_none()).then(|| InferenceTable {
                full_name: format!("c.s.{name}_payload"),
                kind: TableKind::AiGatewayPayload,
                columns: Vec::new(),
            }),
            table_note: None,
            tags: BTreeMap::new(),
            experiment_id: None,
            app: app.map(|a| AppEntry {
                name: a.into(),
                url: None,
                description: None,
                state: None,
                compute_state: None,
                serving_endpoints: Vec::new(),
                sql_warehouses: Vec::new(),
            }),
        }
    }

    fn inventory(agents: Vec<Agent>) -> Inventory {
        Inventory {
            agents,
            ..Default::default()
        }
    }

    const WS: &str = "https://adb-1.azuredatabricks.net";

    #[test]
    fn a_table_named_by_two_endpoints_is_read_by_the_first_only() {
        let shared = |name: &str| {
            let mut a = agent(name, true, None);
            a.table = Some(InferenceTable {
                full_name: "c.s.Shared_payload".into(),
                kind: TableKind::AiGatewayPayload,
                columns: Vec::new(),
            });
            a
        };
        let mut agents = vec![shared("alpha"), agent("solo", false, None), shared("beta")];
        agents[2].table.as_mut().unwrap().full_name = "C.S.shared_payload".into();
        let mut inv = inventory(agents);
        share_tables_once(&mut inv);
        let agents = &inv.agents;
        assert!(agents[0].table.is_some() && agents[0].table_note.is_none());
        assert!(agents[1].table.is_some());
        assert!(agents[2].table.is_none());
        let note = agents[2].table_note.as_deref().unwrap();
        assert!(
            note.contains("endpoint alpha") && note.contains("C.S.shared_payload"),
            "{note}"
        );
        assert_eq!(inv.readable().count(), 2);
        assert_eq!(
            inv.shared_tables,
            BTreeMap::from([("beta".to_string(), "alpha".to_string())])
        );

        // The endpoint the table is named after keeps it, whatever the name order.
        let mut inv = inventory(vec![shared("a_canary"), shared("shared"), shared("zeta")]);
        inv.prefix = "prod_".into();
        for a in &mut inv.agents {
            a.table.as_mut().unwrap().full_name = "c.s.prod_shared_payload".into();
        }
        share_tables_once(&mut inv);
        let with_table: Vec<&str> = inv.readable().map(|(a, _)| a.name.as_str()).collect();
        assert_eq!(with_table, vec!["shared"]);
        assert_eq!(inv.shared_tables.len(), 2);
    }

    #[test]
    fn endpoint_and_app_with_colliding_names_get_their_own_hosts() {
        let mut inv = inventory(vec![
            agent("support_bot", true, None),
            agent("support-bot", false, Some("support-bot")),
            agent("Support_Bot", false, None),
            agent("hr_helper", true, None),
            agent("bot-ü", true, None),
            agent("bot-ö", false, Some("bot-ö")),
        ]);
        let warnings = assign_hosts(&mut inv, WS);
        let hosts: BTreeMap<&str, String> = inv
            .agents
            .iter()
            .map(|a| (a.name.as_str(), inv.agent_host(&a.name, WS)))
            .collect();
        let distinct: BTreeSet<&String> = hosts.values().collect();
        assert_eq!(distinct.len(), inv.agents.len(), "{hosts:?}");
        // Not colliding: the host is the one it always was.
        assert_eq!(hosts["hr_helper"], agent_host("hr_helper", WS));
        assert!(!inv.host_labels.contains_key("hr_helper"));
        for n in [
            "support_bot",
            "support-bot",
            "Support_Bot",
            "bot-ü",
            "bot-ö",
        ] {
            assert_ne!(hosts[n], agent_host(n, WS), "{n}");
            assert!(hosts[n].ends_with(".ai-agent.adb-1.azuredatabricks.net"));
        }
        // One WARN per collision, naming every agent involved and its new host.
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        let support = warnings
            .iter()
            .find(|w| w.contains("support-bot.ai-agent."))
            .unwrap();
        for n in ["support_bot", "support-bot", "Support_Bot"] {
            assert!(
                support.contains(&format!("{n} -> {}", hosts[n])),
                "{support}"
            );
        }
        assert!(!support.contains("hr_helper"), "{support}");
    }

    #[test]
    fn hosts_do_not_depend_on_inventory_order() {
        let agents = vec![
            agent("support_bot", true, None),
            agent("hr_helper", true, None),
            agent("support-bot", false, Some("support-bot")),
            agent("SUPPORT_BOT", false, None),
        ];
        let mut a = inventory(agents.clone());
        assign_hosts(&mut a, WS);
        assert_eq!(a.host_labels.len(), 3, "{:?}", a.host_labels);
        for k in 1..agents.len() {
            let mut rotated = agents.clone();
            rotated.rotate_left(k);
            let mut b = inventory(rotated);
            assign_hosts(&mut b, WS);
            assert_eq!(b.host_labels, a.host_labels, "rotated by {k}");
        }
    }

    #[test]
    fn a_new_app_changes_the_hosts_of_the_colliding_agents_only() {
        let mut inv = inventory(vec![
            agent("support_bot", true, None),
            agent("hr_helper", false, Some("hr-helper")),
            agent("エージェント", false, None),
        ]);
        // Before discovery decided anything: the plain host.
        assert_eq!(
            inv.agent_host("support_bot", WS),
            agent_host("support_bot", WS)
        );
        // No collision: every host is the one it always was, the JSON of `discover` too.
        assert!(assign_hosts(&mut inv, WS).is_empty());
        assert!(inv.host_labels.is_empty());
        for a in &inv.agents {
            assert_eq!(inv.agent_host(&a.name, WS), agent_host(&a.name, WS));
        }
        assert_eq!(inv.agent_host("unknown", WS), agent_host("unknown", WS));
        let json = serde_json::to_value(&inv).unwrap();
        assert!(json.get("host_labels").is_none(), "{json}");
        let before: Vec<String> = ["support_bot", "hr_helper"]
            .iter()
            .map(|n| inv.agent_host(n, WS))
            .collect();
        inv.agents
            .push(agent("support-bot", false, Some("support-bot")));
        let warnings = assign_hosts(&mut inv, WS);
        assert_eq!(inv.agent_host("hr_helper", WS), before[1]);
        assert_ne!(inv.agent_host("support_bot", WS), before[0]);
        assert_ne!(
            inv.agent_host("support-bot", WS),
            inv.agent_host("support_bot", WS)
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("support_bot") && warnings[0].contains("support-bot ->"),
            "{}",
            warnings[0]
        );
    }

    #[test]
    fn agents_with_the_very_same_name_are_warned_about() {
        let mut inv = inventory(vec![
            agent("support-bot", true, None),
            agent("support-bot", false, Some("support-bot")),
        ]);
        let warnings = assign_hosts(&mut inv, WS);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("serving endpoint support-bot")
                && warnings[0].contains("app support-bot"),
            "{}",
            warnings[0]
        );
    }

    fn model(name: &str, kind: &'static str) -> ServedModel {
        ServedModel {
            name: name.into(),
            version: Some("1".into()),
            kind,
        }
    }

    #[test]
    fn served_uc_models_of_the_schema_missing_from_the_listing_are_named() {
        let mut bot = agent("bot", true, None);
        bot.models.push(model("Main.Agents.Bot", "uc_model"));
        bot.models.push(model(
            "databricks-meta-llama-3-3-70b-instruct",
            "foundation_model",
        ));
        let mut other_schema = agent("other", true, None);
        other_schema
            .models
            .push(model("main.elsewhere.other", "uc_model"));
        let mut listed = agent("listed", true, None);
        listed.models.push(model("main.agents.listed", "uc_model"));
        let mut out = agent("far", true, None);
        out.models.push(model("main.agents.far", "uc_model"));
        let mut twice = agent("a_second_endpoint", true, None);
        twice.models.push(model("main.agents.bot", "uc_model"));
        let mut plain = agent("plain_llm", true, None);
        plain.is_agent = false;
        plain
            .models
            .push(model("main.agents.finetuned", "uc_model"));
        let mut inv = Inventory {
            catalog: "main".into(),
            schema: "agents".into(),
            prefix: "prod_".into(),
            agents: vec![bot, other_schema, listed, out, twice],
            llm_endpoints: vec![plain],
            models: vec![ModelEntry {
                full_name: "main.agents.listed".into(),
                versions: vec!["1".into()],
            }],
            out_of_scope: ["endpoint:far".to_string()].into(),
            ..Default::default()
        };
        // Compared case-insensitively, named once (by the first endpoint by name); the table
        // prefix does not apply to model names; out-of-scope endpoints and other schemas do
        // not count.
        let expected: BTreeMap<String, String> = [
            (
                "main.agents.bot".to_string(),
                "a_second_endpoint".to_string(),
            ),
            ("main.agents.finetuned".to_string(), "plain_llm".to_string()),
        ]
        .into();
        assert_eq!(unlisted_models(&inv), expected);
        inv.unlisted_models = expected;
        let w = unlisted_models_warning(&inv, "sp-1");
        assert!(
            w.contains("main.agents.bot (served by endpoint a_second_endpoint)")
                && w.contains("GRANT EXECUTE ON SCHEMA `main`.`agents` TO `sp-1`;")
                && w.contains("functions (agent tools) are not listed either"),
            "{w}"
        );
        // Every served model listed: nothing to say.
        inv.models = [
            "main.agents.bot",
            "main.agents.finetuned",
            "main.agents.listed",
        ]
        .iter()
        .map(|m| ModelEntry {
            full_name: (*m).into(),
            versions: Vec::new(),
        })
        .collect();
        assert!(unlisted_models(&inv).is_empty());
        assert_eq!(
            execute_fix("prod-agents", "ai", "we`ird"),
            "`GRANT EXECUTE ON SCHEMA `prod-agents`.`ai` TO `we``ird`;`"
        );
    }

    #[test]
    fn an_unreadable_run_names_the_agent_the_run_and_the_fix() {
        let mut r = UnreadableRun {
            agent: "support_bot".into(),
            model: "main.agents.support_bot".into(),
            version: "3".into(),
            run_id: "abc123".into(),
            experiment_id: None,
        };
        let d = r.describe("sp-1");
        assert!(
            d.contains("agent support_bot")
                && d.contains("run abc123")
                && d.contains("version 3")
                && d.contains("traces are not read")
                && d.contains("sp-1 CAN READ on the experiment of run abc123"),
            "{d}"
        );
        r.experiment_id = Some("42".into());
        assert!(r.describe("sp-1").contains("read from experiment 42"));
    }

    #[test]
    fn the_prefix_is_compared_case_insensitively() {
        assert_eq!(
            strip_prefix_ci("prod_x_payload", "PROD_"),
            Some("x_payload")
        );
        assert_eq!(strip_prefix_ci("Prod_x", "pROD_"), Some("x"));
        assert_eq!(strip_prefix_ci("prod_x", ""), Some("prod_x"));
        assert_eq!(strip_prefix_ci("dev_x", "PROD_"), None);
        assert_eq!(strip_prefix_ci("pro", "PROD_"), None);
        // Non-ASCII characters compare exactly; a prefix longer than the name matches nothing.
        assert_eq!(strip_prefix_ci("é_x", "É"), None);
        assert_eq!(strip_prefix_ci("é_x", "é"), Some("_x"));
        assert_eq!(strip_prefix_ci("é", "ée"), None);
        // Aliases strip it alike: an app or experiment named without the prefix is found.
        let a = agent("PROD_Support_Bot", false, None);
        assert!(agent_aliases(&a, "prod_").contains(&"support_bot".to_string()));
    }

    fn table(full: &str, prefix: &str) -> SchemaTable {
        let name = full.rsplit('.').next().unwrap_or(full);
        SchemaTable {
            full: full.into(),
            agent: normalize_name(&table_agent_name(name)),
            stripped: strip_prefix_ci(name, prefix).map(|r| normalize_name(&table_agent_name(r))),
        }
    }

    /// `(whether the name is this instance's, the anchor tables in order)`.
    fn anchored(key: &str, prefix: &str, fulls: &[&str]) -> (Option<bool>, Vec<String>) {
        let tables: Vec<SchemaTable> = fulls.iter().map(|f| table(f, prefix)).collect();
        match name_anchor(key, &tables) {
            NameAnchor::InScope(ts) => (Some(true), ts.iter().map(|t| t.full.clone()).collect()),
            NameAnchor::OutOfScope(ts) => {
                (Some(false), ts.iter().map(|t| t.full.clone()).collect())
            }
            NameAnchor::Unknown => (None, Vec::new()),
        }
    }

    #[test]
    fn a_table_in_scope_named_after_the_key_always_wins() {
        let fulls = [
            "c.s.prod_support_bot_payload",
            "c.s.dev_support_bot_payload",
            "c.s.prod_old_support_bot_payload",
            "c.s.code_reviewer_payload",
            "c.s.prod_code_reviewer_payload",
            "c.s.test_hr_assistant_payload",
        ];
        let a = |key: &str, prefix: &str| anchored(key, prefix, &fulls);
        // Each instance's own table, though `dev_support_bot` is shorter and other tables match.
        assert_eq!(
            a("support_bot", "prod_"),
            (Some(true), vec!["c.s.prod_support_bot_payload".into()])
        );
        assert_eq!(
            a("support_bot", "dev_"),
            (Some(true), vec!["c.s.dev_support_bot_payload".into()])
        );
        // In scope after the prefix beats an exact name outside it.
        assert_eq!(
            a("code_reviewer", "prod_"),
            (Some(true), vec!["c.s.prod_code_reviewer_payload".into()])
        );
        // No prefix: the exact name only; a longer name in scope is another agent.
        assert_eq!(
            a("code_reviewer", ""),
            (Some(true), vec!["c.s.code_reviewer_payload".into()])
        );
        assert_eq!(a("support_bot", ""), (None, Vec::new()));
        // No table in scope: the tables outside named so, the shortest first.
        assert_eq!(
            a("support_bot", "qa_"),
            (
                Some(false),
                vec![
                    "c.s.dev_support_bot_payload".into(),
                    "c.s.prod_support_bot_payload".into(),
                    "c.s.prod_old_support_bot_payload".into(),
                ]
            )
        );
        // A prefix of whole words outside the scope (announced with a WARN by add_apps).
        assert_eq!(
            a("assistant", "prod_"),
            (Some(false), vec!["c.s.test_hr_assistant_payload".into()])
        );
        // After a `_` only, not inside a word; an empty name is nobody's.
        assert_eq!(a("ort_bot", "qa_"), (None, Vec::new()));
        assert_eq!(a("", "prod_"), (None, Vec::new()));
        // Two tables in scope: the exact name first.
        assert_eq!(
            anchored(
                "prod_x",
                "prod_",
                &["c.s.prod_prod_x_payload", "c.s.prod_x_payload"]
            ),
            (
                Some(true),
                vec![
                    "c.s.prod_x_payload".into(),
                    "c.s.prod_prod_x_payload".into()
                ]
            )
        );
    }

    #[test]
    fn the_name_without_the_prefix_finds_an_experiment_for_a_table_in_scope() {
        let tables = |prefix: &str| -> Vec<SchemaTable> {
            [
                "c.s.prod_support_bot_payload",
                "c.s.dev_support_bot_payload",
            ]
            .iter()
            .map(|f| table(f, prefix))
            .collect()
        };
        let mut prod = agent("prod_support_bot", false, None);
        prod.table.as_mut().unwrap().full_name = "c.s.prod_support_bot_payload".into();
        let mut dev = agent("dev_support_bot", false, None);
        dev.table.as_mut().unwrap().full_name = "c.s.dev_support_bot_payload".into();
        // Each instance keeps its own agent's short name (both read an experiment named so:
        // the documented limit), whatever the table outside its prefix.
        assert_eq!(
            experiment_aliases(&prod, "prod_", &tables("prod_")),
            ["prod_support_bot", "support_bot"]
        );
        assert_eq!(
            experiment_aliases(&dev, "dev_", &tables("dev_")),
            ["dev_support_bot", "support_bot"]
        );
        // Another in-scope table with the exact short name owns it.
        let mut x = agent("prod_prod_x", false, None);
        x.table.as_mut().unwrap().full_name = "c.s.prod_prod_x_payload".into();
        let both = [
            table("c.s.prod_prod_x_payload", "prod_"),
            table("c.s.prod_x_payload", "prod_"),
        ];
        assert_eq!(experiment_aliases(&x, "prod_", &both), ["prod_prod_x"]);
        // No table to anchor it: the short name of an endpoint agent finds nothing.
        let mut ep = agent("prod_support_bot", true, None);
        ep.models.push(model("c.s.support_bot_model", "uc_model"));
        assert_eq!(
            experiment_aliases(&ep, "prod_", &tables("prod_")),
            ["prod_support_bot", "support_bot_model"]
        );
        // agent_aliases (app matching) is unchanged.
        assert!(agent_aliases(&ep, "prod_").contains(&"support_bot".to_string()));
    }

    #[test]
    fn an_app_is_named_after_an_endpoint_or_table_by_whole_words() {
        assert!(named_after(
            "support_bot",
            "agents_main-prod-support_bot",
            "main.prod.x_payload"
        ));
        assert!(named_after("bot", "guard", "main.prod.prod_bot_payload"));
        assert!(!named_after(
            "ort_bot",
            "agents_support_bot",
            "c.s.support_bot_payload"
        ));
        assert!(!named_after("bot", "agents_guard", "main.g.safety_payload"));
    }

    #[test]
    fn an_app_querying_several_agent_endpoints_is_in_scope_with_any_it_belongs_with() {
        let own = ("agents_bot", "main.prod.bot_payload");
        let guard = ("agents_guard", "main.guardrails.safety_payload");
        let scope = |schema: &'static str| ("main", schema, "");
        // Named after one: that one decides, in its scope only.
        let (v, w) = resource_scope("bot", "bot", &[guard, own], scope("prod"));
        assert_eq!(v, Some(None));
        let w = w.expect("several scopes");
        assert!(
            w.contains("agents_bot -> main.prod.bot_payload")
                && w.contains("agents_guard -> main.guardrails.safety_payload")
                && w.contains("this instance reads"),
            "{w}"
        );
        let (v, w) = resource_scope("bot", "bot", &[own, guard], scope("guardrails"));
        let note = v
            .flatten()
            .expect("out of scope with the guardrail's instance");
        assert!(
            note.contains("agents_bot") && note.contains("main.prod.bot_payload"),
            "{note}"
        );
        assert!(w.is_some_and(|w| w.contains("outside this instance's scope")));
        // Named after none: any one in scope puts the app in scope, with a WARN saying so.
        for schema in ["prod", "guardrails"] {
            let (v, w) = resource_scope("front", "front", &[own, guard], scope(schema));
            assert_eq!(v, Some(None), "{schema}");
            assert!(
                w.is_some_and(|w| w.contains("every instance") && w.contains("Fix:")),
                "{schema}"
            );
        }
        let (v, _) = resource_scope("front", "front", &[own, guard], scope("dev"));
        assert!(v
            .flatten()
            .is_some_and(|n| n.contains("main.guardrails.safety_payload")));
        // One scope: no WARN; in and out of the prefix within one schema: a WARN.
        assert_eq!(
            resource_scope("bot", "bot", &[own], scope("prod")),
            (Some(None), None)
        );
        let split = [
            ("agents_bot", "main.s.prod_bot_payload"),
            ("agents_guard", "main.s.dev_guard_payload"),
        ];
        let (v, w) = resource_scope("bot", "bot", &split, ("main", "s", "prod_"));
        assert_eq!(v, Some(None));
        assert!(w.is_some());
        // No resource with a known table: the name decides.
        assert_eq!(
            resource_scope("bot", "bot", &[], scope("prod")),
            (None, None)
        );
    }

    #[test]
    fn tables_derived_from_an_inference_table_are_not_inference_tables() {
        use crate::databricks::unity_catalog::ColumnInfo;
        let t = |name: &str| TableInfo {
            name: name.into(),
            columns: LEGACY_COLUMNS
                .iter()
                .chain(["timestamp", "trace", "request_raw"].iter())
                .map(|c| ColumnInfo {
                    name: (*c).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(classify(&t("bot_payload")), TableKind::LegacyPayload);
        for n in [
            "bot_payload_request_logs",
            "BOT_PAYLOAD_REQUEST_LOGS",
            "bot_payload_assessment_logs",
        ] {
            assert_eq!(classify(&t(n)), TableKind::Other, "{n}");
        }
        // Only the exact endings: an agent named `..._logs` is still an agent.
        assert_eq!(
            classify(&t("request_logs_payload")),
            TableKind::LegacyPayload
        );
    }

    #[test]
    fn scope_is_catalog_schema_and_prefix() {
        let s = ("Main", "Agents", "PROD_");
        assert!(in_scope("main.agents.prod_bot_payload", s.0, s.1, s.2));
        assert!(in_scope("MAIN.AGENTS.Prod_Bot_payload", s.0, s.1, s.2));
        assert!(!in_scope("main.other.prod_bot_payload", s.0, s.1, s.2));
        assert!(!in_scope("dev.agents.prod_bot_payload", s.0, s.1, s.2));
        assert!(!in_scope("main.agents.dev_bot_payload", s.0, s.1, s.2));
        assert!(!in_scope("prod_bot_payload", s.0, s.1, s.2));
        // No prefix: the whole schema.
        assert!(in_scope("main.agents.anything", "main", "agents", ""));
    }

    #[test]
    fn an_agent_is_out_of_scope_when_its_uc_anchor_is() {
        let s = ("main", "agents", "prod_");
        let uc_in = model("main.agents.prod_bot", "uc_model");
        let uc_other_schema = model("main.other.prod_bot", "uc_model");
        let foundation = model("databricks-meta-llama-3-3-70b-instruct", "foundation_model");
        let external = model("openai/gpt-4o", "external_model");

        // The inference table decides when the endpoint names one (visible or not).
        assert_eq!(
            endpoint_out_of_scope(Some("main.agents.prod_bot_payload"), &[], s),
            None
        );
        for (t, why) in [
            ("main.other.prod_bot_payload", "is outside main.agents:"),
            (
                "main.agents.dev_bot_payload",
                "does not match DATABRICKS_PREFIX 'prod_':",
            ),
        ] {
            let note = endpoint_out_of_scope(Some(t), std::slice::from_ref(&uc_in), s).unwrap();
            assert!(note.contains(&format!("{t} {why}")), "{note}");
            assert!(note.contains("out of scope"), "{note}");
        }
        // No table: the served UC models decide, in scope when any one is.
        assert_eq!(
            endpoint_out_of_scope(None, &[uc_other_schema.clone(), uc_in.clone()], s),
            None
        );
        let note =
            endpoint_out_of_scope(None, &[uc_other_schema.clone(), foundation.clone()], s).unwrap();
        assert!(
            note.contains("main.other.prod_bot") && note.contains("out of scope"),
            "{note}"
        );
        // The table prefix does not apply to model names.
        let uc_unprefixed = model("main.agents.support_bot", "uc_model");
        assert_eq!(endpoint_out_of_scope(None, &[uc_unprefixed], s), None);
        // No Unity Catalog anchor at all: in scope.
        assert_eq!(endpoint_out_of_scope(None, &[], s), None);
        assert_eq!(
            endpoint_out_of_scope(None, &[foundation, external], s),
            None
        );
    }
}
