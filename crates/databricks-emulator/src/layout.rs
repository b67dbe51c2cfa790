//! The deterministic shape of the emulated workspace: agents, serving endpoints, Unity Catalog
//! tables, registered models, functions and MLflow experiments, all derived from the seed.
//!
//! Architecture Invariant: building a layout performs no I/O; two layouts built from the same
//! configuration are identical (apart from the creation clock).

use crate::payload::{Format, Rng};

/// Spark column types used by the emulated tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SparkType {
    String,
    Timestamp,
    Date,
    Int,
    Bigint,
    Double,
    Boolean,
    ArrayString,
    MapStringString,
    /// An OTel span's `events`: `ARRAY<STRUCT<time_unix_nano, name, attributes, ...>>`, which
    /// the SQL API returns as JSON text.
    SpanEvents,
}

impl SparkType {
    /// `type_name` as Databricks reports it (UC ColumnTypeName / SQL ColumnInfoTypeName).
    pub(crate) fn type_name(self) -> &'static str {
        match self {
            SparkType::String => "STRING",
            SparkType::Timestamp => "TIMESTAMP",
            SparkType::Date => "DATE",
            SparkType::Int => "INT",
            SparkType::Bigint => "LONG",
            SparkType::Double => "DOUBLE",
            SparkType::Boolean => "BOOLEAN",
            SparkType::ArrayString => "ARRAY",
            SparkType::MapStringString => "MAP",
            SparkType::SpanEvents => "ARRAY",
        }
    }
    /// `type_text` as Databricks reports it in UC (lowercase Spark DDL).
    pub(crate) fn type_text(self) -> &'static str {
        match self {
            SparkType::String => "string",
            SparkType::Timestamp => "timestamp",
            SparkType::Date => "date",
            SparkType::Int => "int",
            SparkType::Bigint => "bigint",
            SparkType::Double => "double",
            SparkType::Boolean => "boolean",
            SparkType::ArrayString => "array<string>",
            SparkType::MapStringString => "map<string,string>",
            SparkType::SpanEvents => {
                "array<struct<time_unix_nano:bigint,name:string,attributes:map<string,string>,dropped_attributes_count:int>>"
            }
        }
    }
    pub(crate) fn from_sqlite_decl(decl: &str) -> Option<SparkType> {
        Some(match decl.to_ascii_uppercase().as_str() {
            "TEXT" => SparkType::String,
            "TIMESTAMP_TEXT" => SparkType::Timestamp,
            "DATE_TEXT" => SparkType::Date,
            "INT" => SparkType::Int,
            "BIGINT" | "INTEGER" => SparkType::Bigint,
            "DOUBLE" | "REAL" => SparkType::Double,
            "BOOLEAN_INT" => SparkType::Boolean,
            "ARRAY_TEXT" => SparkType::ArrayString,
            "MAP_TEXT" => SparkType::MapStringString,
            "EVENTS_TEXT" => SparkType::SpanEvents,
            _ => return None,
        })
    }
}

/// What a table is, which decides its schema and contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableKind {
    /// AI Gateway inference table (`_payload` schema).
    AiGateway,
    /// Legacy auto-capture inference table.
    Legacy,
    /// A plain business table (distractor).
    Customers,
    /// A SQL view (distractor).
    View,
    /// MLflow OTel spans table (distractor for inference discovery).
    OtelSpans,
}

pub(crate) type Column = (&'static str, SparkType, bool);

pub(crate) const AI_GATEWAY_COLUMNS: &[Column] = &[
    ("databricks_request_id", SparkType::String, false),
    ("request_date", SparkType::Date, false),
    ("client_request_id", SparkType::String, true),
    ("request_time", SparkType::Timestamp, false),
    ("status_code", SparkType::Int, false),
    ("sampling_fraction", SparkType::Double, true),
    ("execution_duration_ms", SparkType::Bigint, true),
    ("request", SparkType::String, true),
    ("response", SparkType::String, true),
    ("logging_error_codes", SparkType::ArrayString, true),
    ("served_entity_id", SparkType::String, true),
    ("requester", SparkType::String, true),
];

pub(crate) const LEGACY_COLUMNS: &[Column] = &[
    ("databricks_request_id", SparkType::String, false),
    ("client_request_id", SparkType::String, true),
    ("date", SparkType::Date, false),
    ("timestamp_ms", SparkType::Bigint, false),
    ("status_code", SparkType::Int, false),
    ("execution_time_ms", SparkType::Bigint, true),
    ("request", SparkType::String, true),
    ("response", SparkType::String, true),
    ("sampling_fraction", SparkType::Double, true),
    ("request_metadata", SparkType::MapStringString, true),
];

pub(crate) const CUSTOMER_COLUMNS: &[Column] = &[
    ("customer_id", SparkType::Bigint, false),
    ("name", SparkType::String, true),
    ("email", SparkType::String, true),
    ("created_at", SparkType::Timestamp, true),
];

pub(crate) const VIEW_COLUMNS: &[Column] = &[
    ("customer_id", SparkType::Bigint, false),
    ("email", SparkType::String, true),
];

pub(crate) const OTEL_COLUMNS: &[Column] = &[
    ("trace_id", SparkType::String, false),
    ("span_id", SparkType::String, false),
    ("parent_span_id", SparkType::String, true),
    ("name", SparkType::String, true),
    ("kind", SparkType::String, true),
    ("start_time_unix_nano", SparkType::Bigint, true),
    ("end_time_unix_nano", SparkType::Bigint, true),
    ("attributes", SparkType::MapStringString, true),
    ("status", SparkType::String, true),
    ("events", SparkType::SpanEvents, true),
];

/// The legacy Agent Framework's `<model>_payload_request_logs` (derived from the payload table):
/// it has every column of a legacy inference table, and more.
pub(crate) const REQUEST_LOG_COLUMNS: &[Column] = &[
    ("client_request_id", SparkType::String, true),
    ("databricks_request_id", SparkType::String, false),
    ("date", SparkType::Date, false),
    ("timestamp_ms", SparkType::Bigint, false),
    ("timestamp", SparkType::Timestamp, true),
    ("status_code", SparkType::Int, false),
    ("execution_time_ms", SparkType::Bigint, true),
    ("conversation_id", SparkType::String, true),
    ("request", SparkType::String, true),
    ("response", SparkType::String, true),
    ("request_raw", SparkType::String, true),
    ("response_raw", SparkType::String, true),
    ("trace", SparkType::String, true),
    ("request_metadata", SparkType::MapStringString, true),
    ("schema_version", SparkType::String, true),
];

/// The legacy Agent Framework's `<model>_payload_assessment_logs` (Review App feedback).
pub(crate) const ASSESSMENT_LOG_COLUMNS: &[Column] = &[
    ("request_id", SparkType::String, false),
    ("step_id", SparkType::String, true),
    ("source", SparkType::MapStringString, true),
    ("timestamp", SparkType::Timestamp, true),
    ("text_assessment", SparkType::String, true),
    ("retrieval_assessment", SparkType::String, true),
    ("schema_version", SparkType::String, true),
];

/// A table of the emulated schema.
#[derive(Debug, Clone)]
pub(crate) struct TableDef {
    pub name: String,
    pub kind: TableKind,
    /// The agent writing into it, if any.
    pub agent: Option<usize>,
    /// Whether its rows belong to the ground truth (agent inference tables only).
    pub ground_truth: bool,
    pub columns: &'static [Column],
    /// Physical SQLite table holding the compact rows.
    pub phys: String,
    pub created_at: i64,
}

impl TableDef {
    pub(crate) fn table_type(&self) -> &'static str {
        if self.kind == TableKind::View {
            "VIEW"
        } else {
            "MANAGED"
        }
    }
}

/// How an agent is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AgentKind {
    /// ResponsesAgent endpoint with an AI Gateway table.
    Responses,
    /// ChatAgent endpoint with an AI Gateway table.
    ChatAgent,
    /// Chat-completions agent endpoint with a legacy auto-capture table.
    LegacyChat,
    /// Deployed as an app: only the AI Gateway-shaped table exists.
    App,
}

/// One agent of the workspace.
#[derive(Debug, Clone)]
pub(crate) struct Agent {
    pub name: String,
    pub kind: AgentKind,
    pub format: Format,
    /// Index into `Layout::tables`.
    pub table: usize,
    pub endpoint: Option<String>,
    pub model_full_name: Option<String>,
    pub model_versions: u32,
    pub tools: Vec<String>,
    pub served_entity_id: String,
}

/// A UC function used as an agent tool.
#[derive(Debug, Clone)]
pub(crate) struct FunctionDef {
    pub name: &'static str,
    pub comment: &'static str,
    pub param: &'static str,
}

/// What a serving endpoint serves.
#[derive(Debug, Clone)]
pub(crate) enum Served {
    Agent(usize),
    Foundation {
        model: &'static str,
    },
    External {
        provider: &'static str,
        model: &'static str,
    },
}

/// A serving endpoint; tags may change at run time.
#[derive(Debug, Clone)]
pub(crate) struct EndpointDef {
    pub name: String,
    pub id: String,
    pub task: &'static str,
    pub served: Served,
    pub tags: Vec<(String, String)>,
    pub creator: String,
    pub creation_timestamp: i64,
    pub config_version: u64,
}

/// An MLflow experiment holding traces of one agent.
#[derive(Debug, Clone)]
pub(crate) struct Experiment {
    pub id: String,
    pub name: String,
    pub agent: usize,
}

/// The whole workspace shape.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub catalog: String,
    pub schema: String,
    pub workspace_id: String,
    pub agents: Vec<Agent>,
    /// Sorted by name.
    pub tables: Vec<TableDef>,
    pub functions: Vec<FunctionDef>,
    pub endpoints: Vec<EndpointDef>,
    pub experiments: Vec<Experiment>,
}

pub(crate) const AGENT_NAMES: &[&str] = &[
    "support_bot",
    "sales_assistant",
    "hr_helper",
    "code_reviewer",
    "travel_planner",
    "claims_agent",
    "billing_helper",
    "onboarding_guide",
    "research_analyst",
    "it_helpdesk",
    "legal_reviewer",
    "marketing_writer",
];

pub(crate) const FUNCTIONS: &[FunctionDef] = &[
    FunctionDef {
        name: "lookup_order",
        comment: "Look up an order by id",
        param: "order_id",
    },
    FunctionDef {
        name: "search_docs",
        comment: "Search the knowledge base",
        param: "query",
    },
    FunctionDef {
        name: "get_weather",
        comment: "Weather forecast for a city",
        param: "city",
    },
    FunctionDef {
        name: "create_ticket",
        comment: "Open a support ticket",
        param: "summary",
    },
    FunctionDef {
        name: "get_customer_profile",
        comment: "Fetch a customer profile",
        param: "email",
    },
    FunctionDef {
        name: "book_flight",
        comment: "Book a flight",
        param: "route",
    },
    FunctionDef {
        name: "check_policy_status",
        comment: "Insurance policy status",
        param: "policy_id",
    },
    FunctionDef {
        name: "get_pto_balance",
        comment: "Remaining vacation days",
        param: "employee_id",
    },
];

fn agent_name(i: usize) -> String {
    let base = AGENT_NAMES[i % AGENT_NAMES.len()];
    let round = i / AGENT_NAMES.len();
    if round == 0 {
        base.to_string()
    } else {
        format!("{base}_{}", round + 1)
    }
}

impl Layout {
    pub(crate) fn build(
        catalog: &str,
        schema: &str,
        prefix: &str,
        agents: usize,
        seed: u64,
        now_ms: i64,
    ) -> Layout {
        let mut rng = Rng::new(seed);
        let mut tables: Vec<TableDef> = Vec::new();
        let mut out_agents = Vec::new();
        let mut endpoints = Vec::new();
        let mut experiments = Vec::new();
        let created = |rng: &mut Rng| now_ms - 86_400_000 * (1 + rng.below(90) as i64);
        for i in 0..agents {
            let name = agent_name(i);
            let kind = match i % 4 {
                0 => AgentKind::Responses,
                1 => AgentKind::ChatAgent,
                2 => AgentKind::LegacyChat,
                _ => AgentKind::App,
            };
            let format = match kind {
                AgentKind::Responses | AgentKind::App => Format::Responses,
                AgentKind::ChatAgent => Format::ChatAgent,
                AgentKind::LegacyChat => Format::ChatCompletions,
            };
            let table_kind = if kind == AgentKind::LegacyChat {
                TableKind::Legacy
            } else {
                TableKind::AiGateway
            };
            let created_at = created(&mut rng);
            tables.push(TableDef {
                name: format!("{prefix}{name}_payload"),
                kind: table_kind,
                agent: Some(i),
                ground_truth: true,
                columns: if table_kind == TableKind::Legacy {
                    LEGACY_COLUMNS
                } else {
                    AI_GATEWAY_COLUMNS
                },
                phys: String::new(),
                created_at,
            });
            let ntools = 1 + rng.below(3) as usize;
            let first = rng.below(FUNCTIONS.len() as u64) as usize;
            let tools = (0..ntools)
                .map(|k| {
                    let f = &FUNCTIONS[(first + k) % FUNCTIONS.len()];
                    format!("{catalog}__{schema}__{}", f.name)
                })
                .collect();
            let has_endpoint = kind != AgentKind::App;
            let endpoint = has_endpoint.then(|| format!("agents_{catalog}-{schema}-{name}"));
            let versions = 1 + rng.below(3) as u32;
            if let Some(ep) = &endpoint {
                endpoints.push(EndpointDef {
                    name: ep.clone(),
                    id: rng.hex(32),
                    task: match kind {
                        AgentKind::Responses => "agent/v1/responses",
                        AgentKind::ChatAgent => "agent/v2/chat",
                        _ => "agent/v1/chat",
                    },
                    served: Served::Agent(i),
                    tags: vec![
                        (
                            "team".into(),
                            rng.pick(&["support", "sales", "platform", "hr"]).into(),
                        ),
                        ("env".into(), "prod".into()),
                    ],
                    creator: format!("{}@example.com", rng.pick(&["alice", "bob", "carol"])),
                    creation_timestamp: created_at,
                    config_version: 1,
                });
            }
            if matches!(
                kind,
                AgentKind::Responses | AgentKind::ChatAgent | AgentKind::App
            ) {
                experiments.push(Experiment {
                    id: format!("{}", 1_000_000 + i * 7 + 3),
                    name: format!("/Users/owner@example.com/{name}"),
                    agent: i,
                });
            }
            out_agents.push(Agent {
                model_full_name: has_endpoint.then(|| format!("{catalog}.{schema}.{name}")),
                model_versions: versions,
                name,
                kind,
                format,
                table: 0,
                endpoint,
                tools,
                served_entity_id: rng.hex(32),
            });
        }
        endpoints.push(EndpointDef {
            name: "databricks-meta-llama-3-3-70b-instruct".into(),
            id: rng.hex(32),
            task: "llm/v1/chat",
            served: Served::Foundation {
                model: "databricks-meta-llama-3-3-70b-instruct",
            },
            tags: vec![],
            creator: "system".into(),
            creation_timestamp: created(&mut rng),
            config_version: 1,
        });
        endpoints.push(EndpointDef {
            name: "openai-gpt-4o".into(),
            id: rng.hex(32),
            task: "llm/v1/chat",
            served: Served::External {
                provider: "openai",
                model: "gpt-4o",
            },
            tags: vec![("owner".into(), "platform".into())],
            creator: "carol@example.com".into(),
            creation_timestamp: created(&mut rng),
            config_version: 1,
        });
        let distractor =
            |name: String, kind: TableKind, columns: &'static [Column], rng: &mut Rng| TableDef {
                name,
                kind,
                agent: None,
                ground_truth: false,
                columns,
                phys: String::new(),
                created_at: now_ms - 86_400_000 * (1 + rng.below(90) as i64),
            };
        tables.push(distractor(
            format!("{prefix}customers"),
            TableKind::Customers,
            CUSTOMER_COLUMNS,
            &mut rng,
        ));
        tables.push(distractor(
            format!("{prefix}customer_emails_v"),
            TableKind::View,
            VIEW_COLUMNS,
            &mut rng,
        ));
        tables.push(distractor(
            format!("{prefix}agent_traces_otel_spans"),
            TableKind::OtelSpans,
            OTEL_COLUMNS,
            &mut rng,
        ));
        // Older `databricks-agents` `deploy()` created two tables derived from the payload table
        // of the agent (here the legacy-era `hr_helper`): not agents, their rows repeat the
        // payload table's. Empty, and only in the unprefixed layout (as `legacy_bot_payload` is
        // only in a prefixed one), so a prefixed listing keeps its tables.
        if prefix.is_empty() && agents > 2 {
            let base = agent_name(2);
            tables.push(distractor(
                format!("{base}_payload_request_logs"),
                TableKind::Legacy,
                REQUEST_LOG_COLUMNS,
                &mut rng,
            ));
            tables.push(distractor(
                format!("{base}_payload_assessment_logs"),
                TableKind::Legacy,
                ASSESSMENT_LOG_COLUMNS,
                &mut rng,
            ));
        }
        if !prefix.is_empty() {
            tables.push(distractor(
                "legacy_bot_payload".into(),
                TableKind::AiGateway,
                AI_GATEWAY_COLUMNS,
                &mut rng,
            ));
        }
        tables.sort_by(|a, b| a.name.cmp(&b.name));
        for (k, t) in tables.iter_mut().enumerate() {
            t.phys = format!("p{k}");
            if let Some(a) = t.agent {
                out_agents[a].table = k;
            }
        }
        Layout {
            catalog: catalog.to_string(),
            schema: schema.to_string(),
            workspace_id: format!("{}", 1_000_000_000_000_000u64 + seed % 1_000_000_000),
            agents: out_agents,
            tables,
            functions: FUNCTIONS.to_vec(),
            endpoints,
            experiments,
        }
    }

    pub(crate) fn full_name(&self, table: &str) -> String {
        format!("{}.{}.{}", self.catalog, self.schema, table)
    }

    pub(crate) fn table_by_name(&self, name: &str) -> Option<&TableDef> {
        self.tables.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_hundred_agents_have_unique_tables() {
        let l = Layout::build("workspace", "default", "p_", 200, 42, 0);
        let mut names: Vec<_> = l.tables.iter().map(|t| t.name.clone()).collect();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n);
        assert_eq!(l.agents.len(), 200);
        assert!(l.tables.iter().any(|t| t.name == "legacy_bot_payload"));
        assert_eq!(l.endpoints.len(), 150 + 2);
        for a in &l.agents {
            assert_eq!(
                l.tables[a.table].agent,
                Some(
                    l.agents
                        .iter()
                        .position(|x| x.name == a.name)
                        .unwrap_or(usize::MAX)
                )
            );
        }
    }
}
