//! Validated configuration: turns the raw command line ([`Cli`]) into a [`Config`] or one error
//! that lists every problem.
//!
//! This module exists so that a bad setting is found before any network call, and so that the
//! operator sees *all* mistakes at once, each naming the variable (and flag), what is wrong and
//! how to fix it. Sources, highest first: command-line flags, the process environment, the
//! `--env-file` file (the three are merged by [`crate::cli`]), then, for the Databricks host and
//! credentials only, secret files (`*_FILE`) and a Databricks config profile
//! (`DATABRICKS_CONFIG_FILE` / `DATABRICKS_CONFIG_PROFILE`, as the official SDKs read them).
//!
//! Rules worth knowing:
//! - Auth: client id *and* secret -> OAuth M2M; otherwise a token -> PAT; one of id/secret
//!   without the other is an error.
//! - Sink: `--output PATH` -> file; else `AKTO_SINK=http|kafka|file`; unset -> HTTP when
//!   `DATA_INGESTION_SERVICE_URL` is set, else Kafka when `KAFKA_BROKER_HOST` is set, else an
//!   error. A record is never sent both ways.
//! - `DATABRICKS_HOST` must be `https://`, except `http://` for loopback (the local emulator).
//! - Catalog, schema and prefix may not contain `.`, space, `/`, a backtick or control
//!   characters (Unity Catalog's own rule, plus the backtick used to quote names in SQL).
//!
//! Architecture Invariant: no network I/O here (only local files are read), and no secret value
//! ever appears in a [`Problem`], [`Config::summary`] or `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use url::{Host, Url};

use crate::cli::{Cli, SecretArg};

/// Default Unity Catalog catalog (the public docs' default; Akto's dashboard suggests `main`).
pub const DEFAULT_CATALOG: &str = "workspace";
/// Default schema.
pub const DEFAULT_SCHEMA: &str = "default";
/// Default Akto account id.
pub const DEFAULT_AKTO_ACCOUNT_ID: &str = "1000000";
/// Default Kafka topic read by Akto's traffic processor.
pub const DEFAULT_KAFKA_TOPIC: &str = "akto.api.logs";
/// Default metrics / health listener.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
/// Default state folder, relative to the working directory (Akto runs the binary in its folder).
pub const DEFAULT_STATE_DIR: &str = "./state";
/// Default of `CHECKPOINT_BATCHES`: one state commit per 10 confirmed batches (500 records at the
/// default batch size). Measured in BENCHMARKS.md: a commit per batch cost ~40 % of the CPU.
pub const DEFAULT_CHECKPOINT_BATCHES: usize = 10;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Workspace URL (`DATABRICKS_HOST`): https, or http for loopback only; path is `/`.
    pub host: Url,
    /// OAuth M2M or PAT.
    pub auth: DatabricksAuth,
    /// The file the secret of `auth` was read from, and its setting
    /// (`DATABRICKS_CLIENT_SECRET_FILE` / `DATABRICKS_TOKEN_FILE`): read again when a secret is
    /// needed, so that a rotated secret is picked up without a restart.
    pub auth_secret_file: Option<(PathBuf, &'static str)>,
    /// `DATABRICKS_CATALOG`, default `workspace`.
    pub catalog: String,
    /// `DATABRICKS_SCHEMA`, default `default`.
    pub schema: String,
    /// `DATABRICKS_PREFIX`, default empty (every table).
    pub prefix: String,
    /// `DATABRICKS_WAREHOUSE_ID`; `None` = pick one.
    pub warehouse_id: Option<String>,
    /// `DATABRICKS_CA_BUNDLE` (else `SSL_CERT_FILE`): extra trusted CA certificates, PEM.
    pub ca_bundle: Option<PathBuf>,
    /// `AKTO_CA_BUNDLE` as set (validated); [`Config::akto_ca_bundle`] gives the bundle the HTTP
    /// sink trusts, this one else [`Config::ca_bundle`].
    akto_ca_bundle: Option<PathBuf>,
    /// The setting [`Config::ca_bundle`] came from (`DATABRICKS_CA_BUNDLE` or `SSL_CERT_FILE`).
    ca_bundle_setting: &'static str,
    /// `None` only for commands that send nothing ([`Needs::Databricks`]).
    pub sink: Option<SinkConfig>,
    /// `AKTO_ACCOUNT_ID`, digits, default `1000000`.
    pub akto_account_id: String,
    /// `RECURRING_INTERVAL_SECONDS`, default 300, at least 10.
    pub interval: Duration,
    /// `LOOKBACK_MINUTES`, default 60.
    pub lookback: Duration,
    /// `MAX_CATCHUP_HOURS`, default 24.
    pub max_catchup: Duration,
    /// `STATE_DIR`; unset, `./state` ([`DEFAULT_STATE_DIR`]), the folder under which each
    /// workspace's state gets a folder of its own (`state::default_state_dir`).
    pub state_dir: PathBuf,
    /// Whether `STATE_DIR` was set: the state is then in that folder itself.
    pub state_dir_given: bool,
    /// `LOG_FORMAT`, default text.
    pub log_format: LogFormat,
    /// `-once` / `--once`: one cycle, then exit.
    pub once: bool,
    /// `ONCE_TIME_LIMIT_SECONDS`, default 270; `None` = 0 = no limit. Only with `-once`.
    pub once_time_limit: Option<Duration>,
    /// `METRICS_ADDR`, default `127.0.0.1:9464`; `off` = `None`.
    pub metrics_addr: Option<SocketAddr>,
    /// `TABLE_CONCURRENCY`, default 4 (1..=32).
    pub table_concurrency: usize,
    /// `STATEMENT_TIMEOUT_SECONDS`, default 120.
    pub statement_timeout: Duration,
    /// `BATCH_SIZE`, default 50 (1..=1000).
    pub batch_size: usize,
    /// `CHECKPOINT_BATCHES`, default [`DEFAULT_CHECKPOINT_BATCHES`] (1..=100): batches the sink
    /// confirms per state commit.
    pub checkpoint_batches: usize,
    /// `--reset-state`.
    pub reset_state: bool,
    /// `REDACT_SENSITIVE_DATA` with `REDACT_KINDS`: the kinds to mask; `None` = off.
    pub redact: Option<Vec<crate::traffic::RedactKind>>,
}

/// How the connector authenticates to Databricks. `Debug` redacts the secrets.
#[derive(Debug, Clone)]
pub enum DatabricksAuth {
    /// OAuth machine-to-machine with a service principal.
    OAuth {
        /// Application (client) id; not a secret (it appears in `GRANT` statements).
        client_id: String,
        /// OAuth secret.
        client_secret: SecretString,
    },
    /// Personal access token.
    Pat {
        /// The token.
        token: SecretString,
    },
}

impl DatabricksAuth {
    /// `"oauth"` or `"pat"`.
    pub fn kind(&self) -> &'static str {
        match self {
            DatabricksAuth::OAuth { .. } => "oauth",
            DatabricksAuth::Pat { .. } => "pat",
        }
    }

    /// The service principal's client id, when OAuth is used.
    pub fn client_id(&self) -> Option<&str> {
        match self {
            DatabricksAuth::OAuth { client_id, .. } => Some(client_id),
            DatabricksAuth::Pat { .. } => None,
        }
    }
}

/// Where records go. `Debug` redacts the secrets.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// Akto's Data Ingestion Service (`DATA_INGESTION_SERVICE_URL`, `AKTO_JWT_TOKEN`).
    Http {
        /// Base URL; the sink appends `/api/ingestData`.
        url: Url,
        /// Sent as the raw `authorization` header when set.
        jwt: Option<SecretString>,
        /// `AKTO_JWT_TOKEN_FILE`, when the token came from it: read again for a rotated token.
        jwt_file: Option<PathBuf>,
        /// `AKTO_REQUEST_TIMEOUT_SECONDS`: base timeout of one request (the sink adds time for
        /// the body's upload).
        timeout: Duration,
        /// `AKTO_MAX_RECORD_BYTES`: the longest record sent; longer ones are cut to fit.
        max_record_bytes: usize,
    },
    /// Akto's Kafka topic.
    Kafka {
        /// Validated, comma-separated `host:port` list.
        brokers: String,
        /// Topic, default `akto.api.logs`.
        topic: String,
        /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL` (upper case); `None` = PLAINTEXT.
        security_protocol: Option<String>,
        /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (upper case).
        sasl_mechanism: Option<String>,
        /// SASL user name.
        sasl_username: Option<String>,
        /// SASL password.
        sasl_password: Option<SecretString>,
        /// CA certificate file (PEM), an existing file.
        ca_file: Option<PathBuf>,
        /// `KAFKA_MAX_MESSAGE_BYTES`: the topic's message size limit; records are cut to fit.
        /// `None`: read from the topic at start (else Kafka's default).
        max_message_bytes: Option<usize>,
    },
    /// JSON lines to a file; `None` = stdout.
    File {
        /// Target file, or `None` for stdout.
        path: Option<PathBuf>,
        /// `AKTO_MAX_RECORD_BYTES`: the file holds what would go to Akto's ingestion service,
        /// cut alike.
        max_record_bytes: usize,
    },
}

impl SinkConfig {
    /// `"http"`, `"kafka"` or `"file"`.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Http { .. } => "http",
            SinkConfig::Kafka { .. } => "kafka",
            SinkConfig::File { .. } => "file",
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// What the command about to run needs, so that e.g. `discover` does not demand a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Databricks only (`discover`): the sink settings are not read.
    Databricks,
    /// Databricks and a sink (`run`, `check`).
    DatabricksAndSink,
}

/// One configuration problem. `message` names the variable (and flag), what is wrong and the fix,
/// and never contains a secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The environment variable (or `--env-file`) the problem is about.
    pub variable: &'static str,
    /// The full, one-line explanation.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Every problem found in the configuration, displayed as ONE line (Akto's job runner forwards
/// only lines containing `ERROR`, and main prints this after `ERROR `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render_problems(&self.problems))]
pub struct ConfigError {
    /// The problems, in the order the settings are checked.
    pub problems: Vec<Problem>,
}

fn render_problems(problems: &[Problem]) -> String {
    let body = match problems {
        [] => "invalid configuration".to_owned(),
        [one] => format!("invalid configuration: {}", one.message),
        many => {
            let items: Vec<String> = many
                .iter()
                .enumerate()
                .map(|(i, p)| format!("({}) {}", i + 1, p.message))
                .collect();
            format!(
                "invalid configuration, {} problems: {}",
                many.len(),
                items.join("; ")
            )
        }
    };
    // Keep it on one line whatever an OS error message contains.
    let body = body.replace(['\n', '\r'], " ");
    format!("{body} (every setting: `databricks-shield --help`)")
}

/// Collects problems while the settings are checked.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, variable: &'static str, message: impl Into<String>) {
        self.0.push(Problem {
            variable,
            message: message.into(),
        });
    }
}

/// A non-empty, trimmed setting.
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn given_path(value: &Option<PathBuf>) -> Option<&Path> {
    value.as_deref().filter(|p| !p.as_os_str().is_empty())
}

/// A secret setting as it is used: surrounding whitespace and line breaks removed (an `echo`
/// into a variable or a copied value often ends in a newline); `None` when nothing is left.
fn given_secret(value: &Option<SecretArg>) -> Option<&str> {
    value
        .as_ref()
        .and_then(|s| crate::secret_file::secret_text(s.expose()))
}

/// A non-secret value for an error message: quoted, escaped, at most 100 characters.
fn shown(value: &str) -> String {
    let cut: String = value.chars().take(100).collect();
    if cut.len() < value.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

impl Config {
    /// Validates `cli`; `Err` lists every problem. Reads only local files (secret files and the
    /// Databricks config file), never the network. `HOME` locates `~/.databrickscfg`.
    pub fn from_cli(cli: &Cli, needs: Needs) -> Result<Config, ConfigError> {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from);
        Self::from_cli_with_home(cli, needs, home.as_deref())
    }

    /// [`Config::from_cli`] with an explicit home folder (`None` = no `~/.databrickscfg`).
    pub fn from_cli_with_home(
        cli: &Cli,
        needs: Needs,
        home: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let mut p = Problems::default();
        p.0.extend(cli.env_file_problems.iter().cloned());

        let profile = load_profile(cli, home, &mut p);
        let d = &cli.databricks;

        let host = match (given(&d.host), profile.host.as_deref(), &profile.source) {
            (Some(raw), _, _) => match parse_host(raw) {
                Ok(url) => Some(url),
                Err(why) => {
                    p.push("DATABRICKS_HOST", format!("DATABRICKS_HOST (--host) {why}"));
                    None
                }
            },
            (None, Some(raw), Some(source)) => match parse_host(raw) {
                Ok(url) => Some(url),
                Err(why) => {
                    p.push(
                        "DATABRICKS_CONFIG_FILE",
                        format!(
                            "{source}: host {why}; fix it in that file, or set DATABRICKS_HOST \
                             (--host), which wins over the profile"
                        ),
                    );
                    None
                }
            },
            _ => {
                p.push(
                    "DATABRICKS_HOST",
                    format!(
                        "DATABRICKS_HOST (--host) is not set: set it to your workspace URL, e.g. \
                         https://your-workspace.cloud.databricks.com{}",
                        profile.note("host")
                    ),
                );
                None
            }
        };

        let auth = resolve_auth(cli, &profile, &mut p);

        let catalog = name_setting(
            &mut p,
            &d.catalog,
            DEFAULT_CATALOG,
            "DATABRICKS_CATALOG",
            "--catalog",
        );
        let schema = name_setting(
            &mut p,
            &d.schema,
            DEFAULT_SCHEMA,
            "DATABRICKS_SCHEMA",
            "--schema",
        );
        let prefix = given(&d.prefix).unwrap_or("").to_owned();
        if !prefix.is_empty() {
            if let Err(why) = check_uc_name(&prefix) {
                p.push(
                    "DATABRICKS_PREFIX",
                    format!(
                        "DATABRICKS_PREFIX (--prefix) {} {why}; leave it empty to read every table",
                        shown(&prefix)
                    ),
                );
            }
        }
        let ca_bundle = given_path(&d.ca_bundle)
            .map(|p| ("DATABRICKS_CA_BUNDLE", p.to_path_buf()))
            .or_else(|| {
                std::env::var_os("SSL_CERT_FILE")
                    .filter(|v| !v.is_empty())
                    .map(|v| ("SSL_CERT_FILE", PathBuf::from(v)))
            });
        if let Some((variable, path)) = &ca_bundle {
            check_ca_bundle(&mut p, variable, path);
        }
        let ca_bundle_setting = ca_bundle
            .as_ref()
            .map_or("DATABRICKS_CA_BUNDLE", |(v, _)| *v);
        let ca_bundle = ca_bundle.map(|(_, path)| path);
        let warehouse_id = given(&d.warehouse_id).map(str::to_owned);
        if let Some(id) = &warehouse_id {
            if id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                p.push(
                    "DATABRICKS_WAREHOUSE_ID",
                    format!(
                        "DATABRICKS_WAREHOUSE_ID (--warehouse-id) {} is not a warehouse id: use \
                         the letters and digits shown under SQL Warehouses > Connection details \
                         (e.g. 1234567890abcdef), or unset it to pick a warehouse automatically",
                        shown(id)
                    ),
                );
            }
        }

        let sink = match needs {
            Needs::Databricks => None,
            Needs::DatabricksAndSink => resolve_sink(cli, &mut p),
        };
        // Read only when records are sent; checked whatever the sink, so that a wrong path is
        // found before AKTO_SINK changes to http.
        let akto_ca_bundle = match needs {
            Needs::Databricks => None,
            Needs::DatabricksAndSink => given_path(&cli.sink.akto_ca_bundle).map(|path| {
                check_ca_bundle(&mut p, "AKTO_CA_BUNDLE", path);
                path.to_path_buf()
            }),
        };

        let s = &cli.sink;
        let akto_account_id = given(&s.akto_account_id)
            .unwrap_or(DEFAULT_AKTO_ACCOUNT_ID)
            .to_owned();
        let account_ok = akto_account_id.chars().all(|c| c.is_ascii_digit())
            && akto_account_id
                .parse::<i32>()
                .map(|n| n > 0)
                .unwrap_or(false);
        if !account_ok {
            p.push(
                "AKTO_ACCOUNT_ID",
                format!(
                    "AKTO_ACCOUNT_ID (--akto-account-id) {} must be a positive whole number up to \
                     2147483647, e.g. 1000000 (the account id shown in Akto's dashboard)",
                    shown(&akto_account_id)
                ),
            );
        }

        let r = &cli.runtime;
        let before_schedule = p.0.len();
        let interval = number(
            &mut p,
            &r.interval_seconds,
            NumberSetting {
                variable: "RECURRING_INTERVAL_SECONDS",
                flag: "--interval-seconds",
                default: 300,
                min: 10,
                max: 86_400,
                unit: "seconds",
                hint: "60 (real time), 300 (standard) or 900 (low frequency)",
            },
        );
        let lookback = number(
            &mut p,
            &r.lookback_minutes,
            NumberSetting {
                variable: "LOOKBACK_MINUTES",
                flag: "--lookback-minutes",
                default: 60,
                min: 1,
                max: 10_080,
                unit: "minutes",
                hint: "60",
            },
        );
        let max_catchup = number(
            &mut p,
            &r.max_catchup_hours,
            NumberSetting {
                variable: "MAX_CATCHUP_HOURS",
                flag: "--max-catchup-hours",
                default: 24,
                min: 1,
                max: 720,
                unit: "hours",
                hint: "24",
            },
        );
        if p.0.len() == before_schedule {
            check_late_rows_window(&mut p, interval, lookback, max_catchup);
        }
        let table_concurrency = number(
            &mut p,
            &r.table_concurrency,
            NumberSetting {
                variable: "TABLE_CONCURRENCY",
                flag: "--table-concurrency",
                default: 4,
                min: 1,
                max: 32,
                unit: "tables",
                hint: "4",
            },
        );
        let statement_timeout = number(
            &mut p,
            &r.statement_timeout_seconds,
            NumberSetting {
                variable: "STATEMENT_TIMEOUT_SECONDS",
                flag: "--statement-timeout-seconds",
                default: 120,
                min: 5,
                max: 3_600,
                unit: "seconds",
                hint: "120",
            },
        );
        let batch_size = number(
            &mut p,
            &r.batch_size,
            NumberSetting {
                variable: "BATCH_SIZE",
                flag: "--batch-size",
                default: 50,
                min: 1,
                max: 1_000,
                unit: "records",
                hint: "50 (what Akto's own connectors send)",
            },
        );
        let once_time_limit = number(
            &mut p,
            &r.once_time_limit_seconds,
            NumberSetting {
                variable: "ONCE_TIME_LIMIT_SECONDS",
                flag: "--once-time-limit-seconds",
                default: 270,
                min: 0,
                max: 86_400,
                unit: "seconds",
                hint: "270 (Akto's job runner stops the binary at 300 s); 0 for no limit",
            },
        );
        let checkpoint_batches = number(
            &mut p,
            &r.checkpoint_batches,
            NumberSetting {
                variable: "CHECKPOINT_BATCHES",
                flag: "--checkpoint-batches",
                default: DEFAULT_CHECKPOINT_BATCHES as u64,
                min: 1,
                max: 100,
                unit: "batches",
                hint: "10 (1 commits after every batch: the smallest re-send after a crash, the most CPU)",
            },
        );

        let redact = match given(&r.redact_sensitive_data)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("false") | Some("0") | Some("no") | Some("off") => None,
            Some("true") | Some("1") | Some("yes") | Some("on") => {
                match crate::traffic::parse_kinds(given(&r.redact_kinds).unwrap_or("")) {
                    Ok(kinds) => Some(kinds),
                    Err(e) => {
                        p.push(
                            "REDACT_KINDS",
                            format!(
                                "REDACT_KINDS (--redact-kinds): {e}; use a comma-separated list of email, \
                                 phone, card, ssn, iban, aws_key, databricks_token, jwt, private_key, \
                                 password (or secrets, or all)"
                            ),
                        );
                        None
                    }
                }
            }
            Some(other) => {
                p.push(
                    "REDACT_SENSITIVE_DATA",
                    format!(
                        "REDACT_SENSITIVE_DATA (--redact-sensitive-data) {} is not true or false",
                        shown(other)
                    ),
                );
                None
            }
        };

        let state_dir_given = given_path(&r.state_dir).is_some();
        let state_dir = given_path(&r.state_dir)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));

        let log_format = match given(&r.log_format).map(str::to_ascii_lowercase).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                p.push(
                    "LOG_FORMAT",
                    format!(
                        "LOG_FORMAT (--log-format) {} is not a log format: use text or json",
                        shown(other)
                    ),
                );
                LogFormat::Text
            }
        };

        let metrics_addr = match given(&r.metrics_addr).unwrap_or(DEFAULT_METRICS_ADDR) {
            off if off.eq_ignore_ascii_case("off") => None,
            raw => match raw.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    p.push(
                        "METRICS_ADDR",
                        format!(
                            "METRICS_ADDR (--metrics-addr) {} is not an IP:PORT address: use \
                             e.g. 127.0.0.1:9464 (this machine only), 0.0.0.0:9464 (every \
                             interface, e.g. in a container) or off",
                            shown(raw)
                        ),
                    );
                    None
                }
            },
        };

        if !p.0.is_empty() {
            return Err(ConfigError { problems: p.0 });
        }
        let (Some(host), Some(auth)) = (host, auth) else {
            // Unreachable in practice: a missing host or auth always records a problem.
            return Err(ConfigError {
                problems: vec![Problem {
                    variable: "DATABRICKS_HOST",
                    message: "DATABRICKS_HOST and the Databricks credentials must be set".into(),
                }],
            });
        };
        let auth_secret_file = match &auth {
            DatabricksAuth::OAuth { .. } => given_path(&cli.databricks.client_secret_file)
                .map(|p| (p.to_path_buf(), "DATABRICKS_CLIENT_SECRET_FILE")),
            DatabricksAuth::Pat { .. } => given_path(&cli.databricks.token_file)
                .map(|p| (p.to_path_buf(), "DATABRICKS_TOKEN_FILE")),
        };
        Ok(Config {
            host,
            auth,
            auth_secret_file,
            catalog,
            schema,
            prefix,
            warehouse_id,
            ca_bundle,
            akto_ca_bundle,
            ca_bundle_setting,
            sink,
            akto_account_id,
            interval: Duration::from_secs(interval),
            lookback: Duration::from_secs(lookback * 60),
            max_catchup: Duration::from_secs(max_catchup * 3600),
            state_dir,
            state_dir_given,
            log_format,
            once: cli.once,
            once_time_limit: (once_time_limit > 0).then(|| Duration::from_secs(once_time_limit)),
            metrics_addr,
            table_concurrency: table_concurrency as usize,
            statement_timeout: Duration::from_secs(statement_timeout),
            batch_size: batch_size as usize,
            checkpoint_batches: checkpoint_batches as usize,
            reset_state: cli.reset_state,
            redact,
        })
    }

    /// The PEM bundle of extra CA certificates the HTTP sink (`DATA_INGESTION_SERVICE_URL`)
    /// trusts besides the built-in roots: `AKTO_CA_BUNDLE`, else the workspace's bundle
    /// ([`Config::ca_bundle`]: `DATABRICKS_CA_BUNDLE`, else `SSL_CERT_FILE`), since a
    /// TLS-inspecting proxy signs both. Validated at configuration (a readable PEM file holding
    /// at least one certificate).
    pub fn akto_ca_bundle(&self) -> Option<&Path> {
        self.akto_ca_bundle.as_deref().or(self.ca_bundle.as_deref())
    }

    /// [`Config::akto_ca_bundle`] with [`Config::akto_ca_bundle_setting`].
    pub fn akto_ca_bundle_with_setting(&self) -> Option<(&Path, &'static str)> {
        self.akto_ca_bundle()
            .map(|p| (p, self.akto_ca_bundle_setting()))
    }

    /// The setting [`Config::akto_ca_bundle`] came from, to name in errors: `AKTO_CA_BUNDLE`,
    /// `DATABRICKS_CA_BUNDLE` or `SSL_CERT_FILE`.
    pub fn akto_ca_bundle_setting(&self) -> &'static str {
        if self.akto_ca_bundle.is_some() {
            "AKTO_CA_BUNDLE"
        } else {
            self.ca_bundle_setting
        }
    }

    /// The workspace a state belongs to (`StateStore::bind_workspace`): `DATABRICKS_HOST`'s host,
    /// lowercase, without a trailing dot, with its port when it is not the scheme's default.
    pub fn workspace_identity(&self) -> String {
        let host = self
            .host
            .host_str()
            .unwrap_or("")
            .trim_end_matches('.')
            .to_ascii_lowercase();
        match self.host.port() {
            Some(port) => format!("{host}:{port}"),
            None => host,
        }
    }

    /// One line for the startup log: every setting, no secret (only whether one is set).
    pub fn summary(&self) -> String {
        let auth = match &self.auth {
            DatabricksAuth::OAuth { client_id, .. } => format!("oauth(client_id={client_id})"),
            DatabricksAuth::Pat { .. } => "pat".to_owned(),
        };
        let sink = match &self.sink {
            None => "none".to_owned(),
            Some(SinkConfig::Http {
                url,
                jwt,
                timeout,
                max_record_bytes,
                ..
            }) => format!(
                "http(url={url} jwt={} request_timeout={}s max_record_bytes={max_record_bytes}{})",
                if jwt.is_some() { "set" } else { "unset" },
                timeout.as_secs(),
                match self.akto_ca_bundle() {
                    Some(path) => format!(" ca_bundle={}", path.display()),
                    None => String::new(),
                }
            ),
            Some(SinkConfig::Kafka {
                brokers,
                topic,
                security_protocol,
                sasl_mechanism,
                sasl_username,
                sasl_password,
                ca_file,
                max_message_bytes,
            }) => {
                let mut text = format!(
                    "kafka(brokers={brokers} topic={topic} max_message_bytes={} \
                     security_protocol={}",
                    max_message_bytes.map_or("topic's".to_owned(), |n| n.to_string()),
                    security_protocol.as_deref().unwrap_or("PLAINTEXT")
                );
                if let Some(mechanism) = sasl_mechanism {
                    text.push_str(&format!(
                        " sasl_mechanism={mechanism} sasl_username={} sasl_password={}",
                        sasl_username.as_deref().unwrap_or("unset"),
                        if sasl_password.is_some() {
                            "set"
                        } else {
                            "unset"
                        }
                    ));
                }
                if let Some(ca) = ca_file {
                    text.push_str(&format!(" ca_file={}", ca.display()));
                }
                text.push(')');
                text
            }
            Some(SinkConfig::File {
                path,
                max_record_bytes,
            }) => match path {
                Some(path) => format!(
                    "file({} max_record_bytes={max_record_bytes})",
                    path.display()
                ),
                None => format!("file(stdout max_record_bytes={max_record_bytes})"),
            },
        };
        format!(
            "host={} auth={auth} catalog={} schema={} prefix={:?} warehouse={} sink={sink} \
             akto_account_id={} interval={}s lookback={}m max_catchup={}h state_dir={} \
             log_format={} metrics={} table_concurrency={} statement_timeout={}s batch_size={} \
             checkpoint_batches={} once={} once_time_limit={} reset_state={}",
            self.host,
            self.catalog,
            self.schema,
            self.prefix,
            self.warehouse_id.as_deref().unwrap_or("auto"),
            self.akto_account_id,
            self.interval.as_secs(),
            self.lookback.as_secs() / 60,
            self.max_catchup.as_secs() / 3600,
            if self.state_dir_given {
                self.state_dir.display().to_string()
            } else {
                format!("{}/<workspace host>", self.state_dir.display())
            },
            self.log_format,
            self.metrics_addr
                .map(|a| a.to_string())
                .unwrap_or_else(|| "off".to_owned()),
            self.table_concurrency,
            self.statement_timeout.as_secs(),
            self.batch_size,
            self.checkpoint_batches,
            self.once,
            self.once_time_limit
                .map(|d| format!("{}s", d.as_secs()))
                .unwrap_or_else(|| "none".to_owned()),
            self.reset_state,
        )
    }
}

/// Bounds and wording for one numeric setting.
struct NumberSetting {
    variable: &'static str,
    flag: &'static str,
    default: u64,
    min: u64,
    max: u64,
    unit: &'static str,
    hint: &'static str,
}

fn number(p: &mut Problems, raw: &Option<String>, s: NumberSetting) -> u64 {
    let Some(raw) = given(raw) else {
        return s.default;
    };
    match raw.parse::<u64>() {
        Ok(n) if (s.min..=s.max).contains(&n) => n,
        _ => {
            p.push(
                s.variable,
                format!(
                    "{} ({}) {} must be a whole number of {} from {} to {}: e.g. {} (default {})",
                    s.variable,
                    s.flag,
                    shown(raw),
                    s.unit,
                    s.min,
                    s.max,
                    s.hint,
                    s.default
                ),
            );
            s.default
        }
    }
}

fn name_setting(
    p: &mut Problems,
    raw: &Option<String>,
    default: &str,
    variable: &'static str,
    flag: &str,
) -> String {
    let value = given(raw).unwrap_or(default).to_owned();
    if let Err(why) = check_uc_name(&value) {
        p.push(
            variable,
            format!(
                "{variable} ({flag}) {} {why}; use the name exactly as Catalog Explorer shows it",
                shown(&value)
            ),
        );
    }
    value
}

/// The late pass of a cycle re-reads from a lookback before the previous read, but never before
/// `now - MAX_CATCHUP_HOURS`: when a cycle's gap plus the lookback is longer than the catch-up,
/// late rows in between would never be read, and nothing would say so. Refused here, naming the
/// three settings and the smallest `MAX_CATCHUP_HOURS` that works.
fn check_late_rows_window(p: &mut Problems, interval_s: u64, lookback_min: u64, catchup_h: u64) {
    let needed_s = interval_s + lookback_min * 60;
    if needed_s <= catchup_h * 3600 {
        return;
    }
    let needed_h = needed_s.div_ceil(3600);
    p.push(
        "MAX_CATCHUP_HOURS",
        format!(
            "RECURRING_INTERVAL_SECONDS ({interval_s} s) plus LOOKBACK_MINUTES ({lookback_min} \
             min) is longer than MAX_CATCHUP_HOURS ({catchup_h} h): each cycle re-reads the last \
             LOOKBACK_MINUTES for late rows but never further back than MAX_CATCHUP_HOURS, so \
             rows landing late would be skipped without a word: raise MAX_CATCHUP_HOURS \
             (--max-catchup-hours) to at least {needed_h}, or lower LOOKBACK_MINUTES or \
             RECURRING_INTERVAL_SECONDS"
        ),
    );
}

/// Checks a CA bundle setting: a readable file holding at least one PEM certificate.
fn check_ca_bundle(p: &mut Problems, variable: &'static str, path: &Path) {
    let pem = std::fs::read(path).unwrap_or_default();
    if crate::databricks::parse_ca_bundle(&pem).is_err() {
        let flag = match variable {
            "DATABRICKS_CA_BUNDLE" => " (--ca-bundle)",
            "AKTO_CA_BUNDLE" => " (--akto-ca-bundle)",
            _ => "",
        };
        p.push(
            variable,
            format!(
                "{variable}{flag} {} is not a readable PEM file with at least one CA \
                 certificate: give the path of the CA bundle (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        );
    }
}

/// Unity Catalog's naming rule (no `.`, space, `/`, control characters, at most 255
/// characters), plus no backtick, because names are quoted with backticks in SQL.
fn check_uc_name(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("is empty".to_owned());
    }
    if value.chars().count() > 255 {
        return Err("is longer than 255 characters".to_owned());
    }
    let quoted = value.len() >= 2
        && ((value.starts_with('\'') && value.ends_with('\''))
            || (value.starts_with('"') && value.ends_with('"')));
    if quoted {
        return Err(
            "is wrapped in quotes: remove the quotes (docker's --env-file and \
                    env_file keep them as part of the value)"
                .to_owned(),
        );
    }
    if let Some(bad) = value
        .chars()
        .find(|c| matches!(c, '.' | ' ' | '/' | '`') || c.is_control())
    {
        return Err(format!(
            "contains {bad:?}, which Unity Catalog names cannot contain (no '.', space, '/', \
             backtick or control characters)"
        ));
    }
    Ok(())
}

/// Checks a workspace URL; the error completes "DATABRICKS_HOST (--host) ...".
///
/// A bare host name gets `https://` (as the Databricks SDKs do). `http://` is accepted only for
/// loopback hosts (127.0.0.0/8, ::1, localhost). No credentials, path, query or fragment.
fn parse_host(raw: &str) -> Result<Url, String> {
    let with_scheme = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("https://{raw}")
    };
    let example = "e.g. https://your-workspace.cloud.databricks.com";
    let url = Url::parse(&with_scheme).map_err(|e| {
        if raw.contains('@') {
            format!("is not a valid URL ({e}): set it to your workspace URL, {example}")
        } else {
            format!(
                "{} is not a valid URL ({e}): set it to your workspace URL, {example}",
                shown(raw)
            )
        }
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "must not contain a user name or password: use only the workspace URL, {example}, \
             and give credentials in DATABRICKS_CLIENT_ID/DATABRICKS_CLIENT_SECRET or \
             DATABRICKS_TOKEN"
        ));
    }
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return Err(format!(
                "{} uses http://: use https:// ({example}); plain http is accepted only for \
                 loopback addresses such as a local emulator",
                shown(raw)
            ))
        }
        other => {
            return Err(format!(
                "{} has the scheme {other:?}: use https://, {example}",
                shown(raw)
            ))
        }
    }
    if url.host().is_none() {
        return Err(format!("{} has no host name: {example}", shown(raw)));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        let mut base = url.clone();
        base.set_path("/");
        base.set_query(None);
        base.set_fragment(None);
        return Err(format!(
            "{} must be only the workspace URL, without a path or query: use {}",
            shown(raw),
            base.as_str().trim_end_matches('/')
        ));
    }
    Ok(url)
}

/// 127.0.0.0/8, ::1 or `localhost`.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(name)) => {
            name.eq_ignore_ascii_case("localhost") || name.eq_ignore_ascii_case("localhost.")
        }
        None => false,
    }
}

/// Checks `DATA_INGESTION_SERVICE_URL`; the error completes "DATA_INGESTION_SERVICE_URL ...".
/// Plain http is fine here: Akto runs the service inside private networks.
fn parse_ingestion_url(raw: &str) -> Result<Url, String> {
    let example = "e.g. http://akto-ingestion-service:9000";
    if !raw.contains("://") {
        return Err(format!(
            "{} must start with http:// or https://, {example}",
            shown(raw)
        ));
    }
    let url = Url::parse(raw).map_err(|e| {
        if raw.contains('@') {
            format!("is not a valid URL ({e}): {example}")
        } else {
            format!("{} is not a valid URL ({e}): {example}", shown(raw))
        }
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "must not contain a user name or password: use the service URL alone, {example}, \
             and give the token in AKTO_JWT_TOKEN or AKTO_JWT_TOKEN_FILE"
        ));
    }
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{} must use http:// or https://, {example}",
            shown(raw)
        ));
    }
    if url.host().is_none() {
        return Err(format!("{} has no host name: {example}", shown(raw)));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{} must not have a query or fragment: {example}",
            shown(raw)
        ));
    }
    if url
        .path()
        .trim_end_matches('/')
        .to_ascii_lowercase()
        .ends_with("/api/ingestdata")
    {
        return Err(format!(
            "{} ends with /api/ingestData: give only the service's base URL ({example}); the \
             connector adds /api/ingestData itself",
            shown(raw)
        ));
    }
    Ok(url)
}

/// Checks a comma-separated `host:port` list and returns it normalised (no spaces).
fn parse_brokers(raw: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let example = "e.g. your-kafka-broker:9092";
        if entry.contains('@') {
            // Never echoed: it most likely holds a password.
            return Err(format!(
                "has an entry with credentials (user:password@): put credentials in \
                 KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD and give host:port only, {example}"
            ));
        }
        if entry.contains("://") {
            return Err(format!(
                "entry {} has a scheme: give host:port only, {example}; the protocol goes in \
                 KAFKA_SECURITY_PROTOCOL",
                shown(entry)
            ));
        }
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            match rest.split_once("]:") {
                Some((ip, port)) if ip.parse::<std::net::Ipv6Addr>().is_ok() => (ip, port),
                _ => {
                    return Err(format!(
                        "entry {} is not [IPv6]:port, e.g. [::1]:9092",
                        shown(entry)
                    ))
                }
            }
        } else {
            match entry.rsplit_once(':') {
                Some((host, port)) => (host, port),
                None => {
                    return Err(format!(
                        "entry {} has no port: add it, {example}",
                        shown(entry)
                    ))
                }
            }
        };
        let host_ok = entry.starts_with('[')
            || (!host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
        if !host_ok {
            return Err(format!(
                "entry {} has an invalid host name: {example}",
                shown(entry)
            ));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => {
                return Err(format!(
                    "entry {} has an invalid port (1-65535): {example}",
                    shown(entry)
                ))
            }
        }
        out.push(entry.to_owned());
    }
    if out.is_empty() {
        return Err("holds no host:port entry: e.g. your-kafka-broker:9092".to_owned());
    }
    Ok(out.join(","))
}

/// Kafka's topic rule: 1-249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
fn check_topic(topic: &str) -> Result<(), String> {
    let ok = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a valid Kafka topic (1-249 letters, digits, '.', '_' or '-'): Akto reads \
             akto.api.logs",
            shown(topic)
        ))
    }
}

/// Names used in messages about one secret and its `_FILE` variant.
struct SecretNames {
    variable: &'static str,
    flag: &'static str,
    file_variable: &'static str,
    file_flag: &'static str,
}

/// What was found for one secret.
enum SecretFound {
    Missing,
    Given(SecretString),
    /// A problem was already recorded (unreadable file, both forms set, ...).
    Failed,
}

fn resolve_secret(
    p: &mut Problems,
    direct: &Option<SecretArg>,
    file: &Option<PathBuf>,
    names: &SecretNames,
) -> SecretFound {
    let direct = given_secret(direct);
    let file = given_path(file);
    // A control character inside a secret (a line break in the middle) can never be sent in a
    // header: refused now, naming the setting and never the value.
    let control = |p: &mut Problems, variable: &'static str, what: String| {
        p.push(
            variable,
            format!(
                "{what} contains a control character (e.g. a line break or tab inside the \
                 value): set it to the secret alone, on one line"
            ),
        );
        SecretFound::Failed
    };
    match (direct, file) {
        (Some(_), Some(_)) => {
            p.push(
                names.file_variable,
                format!(
                    "both {} ({}) and {} ({}) are set: keep only one",
                    names.variable, names.flag, names.file_variable, names.file_flag
                ),
            );
            SecretFound::Failed
        }
        (Some(secret), None) if crate::secret_file::has_control(secret) => control(
            p,
            names.variable,
            format!("{} ({})", names.variable, names.flag),
        ),
        (Some(secret), None) => SecretFound::Given(SecretString::from(secret.to_owned())),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(text) => match crate::secret_file::secret_text(&text) {
                None => {
                    p.push(
                        names.file_variable,
                        format!(
                            "{} ({}) {} is empty: write the secret into the file",
                            names.file_variable,
                            names.file_flag,
                            path.display()
                        ),
                    );
                    SecretFound::Failed
                }
                Some(value) if crate::secret_file::has_control(value) => control(
                    p,
                    names.file_variable,
                    format!(
                        "{} ({}) {}",
                        names.file_variable,
                        names.file_flag,
                        path.display()
                    ),
                ),
                Some(value) => SecretFound::Given(SecretString::from(value.to_owned())),
            },
            Err(err) => {
                p.push(
                    names.file_variable,
                    format!(
                        "{} ({}) {}: cannot read the file ({err}): check the path and that this \
                         user may read it",
                        names.file_variable,
                        names.file_flag,
                        path.display()
                    ),
                );
                SecretFound::Failed
            }
        },
        (None, None) => SecretFound::Missing,
    }
}

/// Values found in a Databricks config profile.
#[derive(Default)]
struct ProfileValues {
    host: Option<String>,
    client_id: Option<String>,
    client_secret: Option<SecretString>,
    token: Option<SecretString>,
    /// Where the values come from, for messages: `profile [NAME] of FILE`; `None` when no
    /// profile was read.
    source: Option<String>,
    /// Why an explicitly named config file gave nothing (it lacks the `DEFAULT` profile, listing
    /// the ones it has), added to a "not set" message.
    skipped: Option<String>,
}

impl ProfileValues {
    /// A note for a "not set" message: the profile that was read (and lacked `what`), or why
    /// the named config file gave nothing; empty otherwise.
    fn note(&self, what: &str) -> String {
        match (&self.source, &self.skipped) {
            (Some(source), _) => format!(" ({source} has no {what} either)"),
            (None, Some(why)) => format!(" ({why})"),
            (None, None) => String::new(),
        }
    }
}

/// `a, b` or `none`, for a list of profile names.
fn profile_list(sections: &BTreeMap<String, BTreeMap<String, String>>) -> String {
    let known: Vec<&str> = sections.keys().map(String::as_str).collect();
    if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    }
}

/// Reads `DATABRICKS_CONFIG_FILE` (default `~/.databrickscfg` when there is a home folder) and
/// returns the values of `DATABRICKS_CONFIG_PROFILE` (default `DEFAULT`). A missing default
/// file or missing `DEFAULT` profile is fine; an explicitly named file or profile must exist.
fn load_profile(cli: &Cli, home: Option<&Path>, p: &mut Problems) -> ProfileValues {
    let d = &cli.databricks;
    let explicit_profile = given(&d.profile).filter(|name| *name != "DEFAULT");
    let profile = explicit_profile.unwrap_or("DEFAULT");
    let explicit_file = given_path(&d.config_file).map(|f| expand_home(f, home));
    let path = match (&explicit_file, home) {
        (Some(path), _) => path.clone(),
        (None, Some(home)) => home.join(".databrickscfg"),
        (None, None) => {
            if let Some(name) = explicit_profile {
                p.push(
                    "DATABRICKS_CONFIG_PROFILE",
                    format!(
                        "DATABRICKS_CONFIG_PROFILE (--profile) is {} but there is no config file \
                         to read it from (no HOME): set DATABRICKS_CONFIG_FILE to the file, or \
                         unset DATABRICKS_CONFIG_PROFILE",
                        shown(name)
                    ),
                );
            }
            return ProfileValues::default();
        }
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) => {
            if explicit_file.is_some() || explicit_profile.is_some() || path.exists() {
                p.push(
                    "DATABRICKS_CONFIG_FILE",
                    format!(
                        "DATABRICKS_CONFIG_FILE (--config-file) {}: cannot read the file \
                         ({err}): fix the path, or unset DATABRICKS_CONFIG_FILE and \
                         DATABRICKS_CONFIG_PROFILE to use only environment variables",
                        path.display()
                    ),
                );
            }
            return ProfileValues::default();
        }
    };
    let sections = parse_databricks_cfg(&text);
    let Some(values) = sections.get(profile) else {
        if explicit_profile.is_some() {
            p.push(
                "DATABRICKS_CONFIG_PROFILE",
                format!(
                    "DATABRICKS_CONFIG_PROFILE (--profile) {} is not a profile of {} (it has: \
                     {}): use one of those names",
                    shown(profile),
                    path.display(),
                    profile_list(&sections)
                ),
            );
        } else if explicit_file.is_some() {
            // Named on purpose but without [DEFAULT]: not an error while the variables give
            // everything, but said wherever a value is then missing.
            return ProfileValues {
                skipped: Some(format!(
                    "DATABRICKS_CONFIG_FILE {} has no [DEFAULT] profile and was not used; it has: \
                     {}: set DATABRICKS_CONFIG_PROFILE (--profile) to one of those",
                    path.display(),
                    profile_list(&sections)
                )),
                ..ProfileValues::default()
            };
        }
        return ProfileValues::default();
    };
    let get = |key: &str| values.get(key).filter(|v| !v.is_empty()).cloned();
    ProfileValues {
        host: get("host"),
        client_id: get("client_id"),
        client_secret: get("client_secret").map(SecretString::from),
        token: get("token").map(SecretString::from),
        source: Some(format!("profile [{profile}] of {}", path.display())),
        skipped: None,
    }
}

fn expand_home(path: &Path, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_path_buf(),
    }
}

/// Parses the INI format of `.databrickscfg`: `[profile]` headers, `key = value` (or
/// `key: value`) lines, `#`/`;` comment lines. Keys are lower-cased; profile names are kept as
/// written. Lines outside a section are ignored.
fn parse_databricks_cfg(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().to_owned();
            sections.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let Some(section) = &current else { continue };
        let split = match (line.find('='), line.find(':')) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = split {
            let key = line[..at].trim().to_ascii_lowercase();
            let value = line[at + 1..].trim().to_owned();
            sections
                .entry(section.clone())
                .or_default()
                .insert(key, value);
        }
    }
    sections
}

/// Both id and secret -> OAuth; else a token -> PAT; one of id/secret alone is an error.
///
/// Credentials come from one place: when any credential variable (id, secret, token or their
/// `_FILE` forms) is set, the config profile's credentials are not used at all, so a profile's
/// secret is never mixed with, or preferred to, what the operator set explicitly.
fn resolve_auth(cli: &Cli, profile: &ProfileValues, p: &mut Problems) -> Option<DatabricksAuth> {
    let d = &cli.databricks;
    let explicit = given(&d.client_id).is_some()
        || given_secret(&d.client_secret).is_some()
        || given_path(&d.client_secret_file).is_some()
        || given_secret(&d.token).is_some()
        || given_path(&d.token_file).is_some();
    let none = ProfileValues::default();
    let profile = if explicit { &none } else { profile };
    // The credentials came from the profile (none was set explicitly): problems name it.
    let from_profile = profile.source.as_deref();
    let client_id = given(&d.client_id)
        .map(str::to_owned)
        .or_else(|| profile.client_id.clone());
    let secret = match resolve_secret(
        p,
        &d.client_secret,
        &d.client_secret_file,
        &SecretNames {
            variable: "DATABRICKS_CLIENT_SECRET",
            flag: "--client-secret",
            file_variable: "DATABRICKS_CLIENT_SECRET_FILE",
            file_flag: "--client-secret-file",
        },
    ) {
        SecretFound::Missing => match &profile.client_secret {
            Some(s) => SecretFound::Given(s.clone()),
            None => SecretFound::Missing,
        },
        other => other,
    };
    let token = match resolve_secret(
        p,
        &d.token,
        &d.token_file,
        &SecretNames {
            variable: "DATABRICKS_TOKEN",
            flag: "--token",
            file_variable: "DATABRICKS_TOKEN_FILE",
            file_flag: "--token-file",
        },
    ) {
        SecretFound::Missing => match &profile.token {
            Some(s) => SecretFound::Given(s.clone()),
            None => SecretFound::Missing,
        },
        other => other,
    };
    match (client_id, secret, token) {
        (Some(client_id), SecretFound::Given(client_secret), _) => Some(DatabricksAuth::OAuth {
            client_id,
            client_secret,
        }),
        (_, SecretFound::Failed, _) => None,
        (Some(_), SecretFound::Missing, _) if from_profile.is_some() => {
            p.push(
                "DATABRICKS_CONFIG_FILE",
                format!(
                    "{} has client_id but no client_secret: add the service principal's OAuth \
                     secret as client_secret there, or set DATABRICKS_CLIENT_ID and \
                     DATABRICKS_CLIENT_SECRET (or DATABRICKS_TOKEN), which replace the profile's \
                     credentials",
                    from_profile.unwrap_or_default()
                ),
            );
            None
        }
        (None, SecretFound::Given(_), _) if from_profile.is_some() => {
            p.push(
                "DATABRICKS_CONFIG_FILE",
                format!(
                    "{} has client_secret but no client_id: add the service principal's \
                     application (client) id as client_id there, or set DATABRICKS_CLIENT_ID and \
                     DATABRICKS_CLIENT_SECRET, which replace the profile's credentials",
                    from_profile.unwrap_or_default()
                ),
            );
            None
        }
        (Some(_), SecretFound::Missing, _) => {
            p.push(
                "DATABRICKS_CLIENT_SECRET",
                "DATABRICKS_CLIENT_ID is set but DATABRICKS_CLIENT_SECRET (--client-secret) is \
                 not: set it (or DATABRICKS_CLIENT_SECRET_FILE) to the service principal's OAuth \
                 secret, or unset DATABRICKS_CLIENT_ID to use DATABRICKS_TOKEN",
            );
            None
        }
        (None, SecretFound::Given(_), _) => {
            p.push(
                "DATABRICKS_CLIENT_ID",
                "DATABRICKS_CLIENT_SECRET is set but DATABRICKS_CLIENT_ID (--client-id) is not: \
                 set it to the service principal's application (client) id",
            );
            None
        }
        (None, SecretFound::Missing, SecretFound::Given(token)) => {
            Some(DatabricksAuth::Pat { token })
        }
        (None, SecretFound::Missing, SecretFound::Failed) => None,
        (None, SecretFound::Missing, SecretFound::Missing) => {
            p.push(
                "DATABRICKS_CLIENT_ID",
                format!(
                    "no Databricks credentials: set DATABRICKS_CLIENT_ID (--client-id) and \
                     DATABRICKS_CLIENT_SECRET (--client-secret, or DATABRICKS_CLIENT_SECRET_FILE) \
                     to a service principal's id and OAuth secret (recommended), or \
                     DATABRICKS_TOKEN (--token, or DATABRICKS_TOKEN_FILE) to a personal access \
                     token{}",
                    profile.note("client_id/client_secret or token")
                ),
            );
            None
        }
    }
}

/// `--output` -> file; else `AKTO_SINK`; else HTTP if its URL is set, else Kafka if a broker is
/// set, else a problem.
fn resolve_sink(cli: &Cli, p: &mut Problems) -> Option<SinkConfig> {
    let s = &cli.sink;
    if let Some(out) = given_path(&cli.output) {
        let max_record_bytes = akto_max_record_bytes(cli, p);
        return Some(file_sink(out, max_record_bytes));
    }
    let kind = match given(&s.kind).map(str::to_ascii_lowercase).as_deref() {
        Some("http") => "http",
        Some("kafka") => "kafka",
        Some("file") => "file",
        Some(other) => {
            p.push(
                "AKTO_SINK",
                format!(
                    "AKTO_SINK (--sink) {} is not a sink: use http (Akto's Data Ingestion \
                     Service), kafka (Akto's Kafka topic) or file (JSON lines)",
                    shown(other)
                ),
            );
            return None;
        }
        None if given(&s.ingestion_url).is_some() => "http",
        None if given(&s.kafka_brokers).is_some() => "kafka",
        None => {
            p.push(
                "DATA_INGESTION_SERVICE_URL",
                "no destination for the traffic: set DATA_INGESTION_SERVICE_URL \
                 (--ingestion-url) to Akto's Data Ingestion Service, e.g. \
                 http://akto-ingestion-service:9000, or KAFKA_BROKER_HOST (--kafka-brokers) to \
                 Akto's Kafka broker, e.g. your-kafka-broker:9092 (or --output PATH to write \
                 JSON lines)",
            );
            return None;
        }
    };
    match kind {
        "http" => http_sink(cli, p),
        "kafka" => kafka_sink(cli, p),
        _ => {
            let max_record_bytes = akto_max_record_bytes(cli, p);
            Some(file_sink(
                given_path(&s.output_path).unwrap_or(Path::new("-")),
                max_record_bytes,
            ))
        }
    }
}

fn file_sink(path: &Path, max_record_bytes: usize) -> SinkConfig {
    let path = (path != Path::new("-")).then(|| path.to_path_buf());
    SinkConfig::File {
        path,
        max_record_bytes,
    }
}

/// `AKTO_MAX_RECORD_BYTES`, for the HTTP and file sinks.
fn akto_max_record_bytes(cli: &Cli, p: &mut Problems) -> usize {
    number(
        p,
        &cli.sink.akto_max_record_bytes,
        NumberSetting {
            variable: "AKTO_MAX_RECORD_BYTES",
            flag: "--akto-max-record-bytes",
            default: crate::sink::DEFAULT_AKTO_MAX_RECORD_BYTES as u64,
            min: crate::sink::MIN_AKTO_MAX_RECORD_BYTES as u64,
            max: crate::sink::MAX_AKTO_MAX_RECORD_BYTES as u64,
            unit: "bytes",
            hint: "1000000 for Akto releases whose ingestion producer keeps Kafka's 1 MB default \
                   (no AKTO_KAFKA_MAX_REQUEST_SIZE); at most Akto's AKTO_KAFKA_MAX_REQUEST_SIZE \
                   less 64 KiB",
        },
    ) as usize
}

fn http_sink(cli: &Cli, p: &mut Problems) -> Option<SinkConfig> {
    let s = &cli.sink;
    let url = match given(&s.ingestion_url) {
        None => {
            p.push(
                "DATA_INGESTION_SERVICE_URL",
                "AKTO_SINK is http but DATA_INGESTION_SERVICE_URL (--ingestion-url) is not set: \
                 set it to Akto's Data Ingestion Service, e.g. http://akto-ingestion-service:9000",
            );
            None
        }
        Some(raw) => match parse_ingestion_url(raw) {
            Ok(url) => Some(url),
            Err(why) => {
                p.push(
                    "DATA_INGESTION_SERVICE_URL",
                    format!("DATA_INGESTION_SERVICE_URL (--ingestion-url) {why}"),
                );
                None
            }
        },
    };
    let jwt = match resolve_secret(
        p,
        &s.jwt,
        &s.jwt_file,
        &SecretNames {
            variable: "AKTO_JWT_TOKEN",
            flag: "--jwt",
            file_variable: "AKTO_JWT_TOKEN_FILE",
            file_flag: "--jwt-file",
        },
    ) {
        SecretFound::Given(jwt) => Some(jwt),
        SecretFound::Missing => None,
        SecretFound::Failed => return None,
    };
    let jwt_file = jwt
        .as_ref()
        .and_then(|_| given_path(&s.jwt_file))
        .map(Path::to_path_buf);
    let timeout = number(
        p,
        &s.akto_request_timeout_seconds,
        NumberSetting {
            variable: "AKTO_REQUEST_TIMEOUT_SECONDS",
            flag: "--akto-request-timeout-seconds",
            default: crate::sink::DEFAULT_REQUEST_TIMEOUT.as_secs(),
            min: 1,
            max: 3_600,
            unit: "seconds",
            hint: "30, or more on a slow link to Akto (each request also gets 1 s per 256 KiB \
                   of body)",
        },
    );
    let max_record_bytes = akto_max_record_bytes(cli, p);
    url.map(|url| SinkConfig::Http {
        url,
        jwt,
        jwt_file,
        timeout: Duration::from_secs(timeout),
        max_record_bytes,
    })
}

const KAFKA_PROTOCOLS: [&str; 4] = ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];
const KAFKA_MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

fn kafka_sink(cli: &Cli, p: &mut Problems) -> Option<SinkConfig> {
    let s = &cli.sink;
    let before = p.0.len();
    let brokers = match given(&s.kafka_brokers) {
        None => {
            p.push(
                "KAFKA_BROKER_HOST",
                "AKTO_SINK is kafka but KAFKA_BROKER_HOST (--kafka-brokers) is not set: set it \
                 to Akto's Kafka broker(s), e.g. your-kafka-broker:9092",
            );
            String::new()
        }
        Some(raw) => parse_brokers(raw).unwrap_or_else(|why| {
            p.push(
                "KAFKA_BROKER_HOST",
                format!("KAFKA_BROKER_HOST (--kafka-brokers) {why}"),
            );
            String::new()
        }),
    };
    let topic = given(&s.kafka_topic)
        .unwrap_or(DEFAULT_KAFKA_TOPIC)
        .to_owned();
    if let Err(why) = check_topic(&topic) {
        p.push(
            "AKTO_KAFKA_TOPIC_NAME",
            format!("AKTO_KAFKA_TOPIC_NAME (--kafka-topic) {why}"),
        );
    }
    let security_protocol = given(&s.kafka_security_protocol).map(str::to_ascii_uppercase);
    if let Some(protocol) = &security_protocol {
        if !KAFKA_PROTOCOLS.contains(&protocol.as_str()) {
            p.push(
                "KAFKA_SECURITY_PROTOCOL",
                format!(
                    "KAFKA_SECURITY_PROTOCOL (--kafka-security-protocol) {} is not supported: \
                     use {}",
                    shown(protocol),
                    KAFKA_PROTOCOLS.join(", ")
                ),
            );
        }
    }
    let sasl_mechanism = given(&s.kafka_sasl_mechanism).map(str::to_ascii_uppercase);
    if let Some(mechanism) = &sasl_mechanism {
        if !KAFKA_MECHANISMS.contains(&mechanism.as_str()) {
            p.push(
                "KAFKA_SASL_MECHANISM",
                format!(
                    "KAFKA_SASL_MECHANISM (--kafka-sasl-mechanism) {} is not supported: use {}",
                    shown(mechanism),
                    KAFKA_MECHANISMS.join(", ")
                ),
            );
        }
    }
    let sasl_username = given(&s.kafka_sasl_username).map(str::to_owned);
    let sasl_password = resolve_secret(
        p,
        &s.kafka_sasl_password,
        &s.kafka_sasl_password_file,
        &SecretNames {
            variable: "KAFKA_SASL_PASSWORD",
            flag: "--kafka-sasl-password",
            file_variable: "KAFKA_SASL_PASSWORD_FILE",
            file_flag: "--kafka-sasl-password-file",
        },
    );
    // A file that could not be read was reported already: not "missing" again.
    let password_failed = matches!(sasl_password, SecretFound::Failed);
    let sasl_password = match sasl_password {
        SecretFound::Given(secret) => Some(secret),
        SecretFound::Missing | SecretFound::Failed => None,
    };
    let protocol_name = security_protocol.as_deref().unwrap_or("PLAINTEXT");
    let uses_sasl = protocol_name.starts_with("SASL_");
    let uses_tls = matches!(protocol_name, "SSL" | "SASL_SSL");
    // With an unknown protocol the cross-checks below would only repeat the same problem.
    let protocol_known = KAFKA_PROTOCOLS.contains(&protocol_name);
    if !protocol_known {
    } else if uses_sasl {
        let mut missing = Vec::new();
        if sasl_mechanism.is_none() {
            missing.push("KAFKA_SASL_MECHANISM (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)");
        }
        if sasl_username.is_none() {
            missing.push("KAFKA_SASL_USERNAME");
        }
        if sasl_password.is_none() && !password_failed {
            missing.push("KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE)");
        }
        if !missing.is_empty() {
            p.push(
                "KAFKA_SASL_MECHANISM",
                format!(
                    "KAFKA_SECURITY_PROTOCOL is {protocol_name}, which also needs {}: set them",
                    missing.join(", ")
                ),
            );
        }
    } else if sasl_mechanism.is_some() || sasl_username.is_some() || sasl_password.is_some() {
        p.push(
            "KAFKA_SECURITY_PROTOCOL",
            format!(
                "KAFKA_SASL_* settings are set but KAFKA_SECURITY_PROTOCOL \
                 (--kafka-security-protocol) is {protocol_name}: set it to SASL_SSL (or \
                 SASL_PLAINTEXT), or remove the KAFKA_SASL_* settings"
            ),
        );
    }
    let ca_file = given_path(&s.kafka_ca_file).map(Path::to_path_buf);
    if let Some(ca) = &ca_file {
        // Read and parsed now, like DATABRICKS_CA_BUNDLE: librdkafka would only refuse it when
        // the sink is created, as a failure of the run rather than of the configuration.
        let pem = std::fs::read(ca).unwrap_or_default();
        if crate::databricks::parse_ca_bundle(&pem).is_err() {
            p.push(
                "KAFKA_CA_FILE",
                format!(
                    "KAFKA_CA_FILE (--kafka-ca-file) {} is not a readable PEM file with at least \
                     one CA certificate: give the path of the brokers' CA certificate \
                     (-----BEGIN CERTIFICATE-----)",
                    ca.display()
                ),
            );
        }
        if protocol_known && !uses_tls {
            p.push(
                "KAFKA_CA_FILE",
                format!(
                    "KAFKA_CA_FILE is set but KAFKA_SECURITY_PROTOCOL is {protocol_name}, which \
                     does not use TLS: set KAFKA_SECURITY_PROTOCOL to SSL or SASL_SSL, or remove \
                     KAFKA_CA_FILE"
                ),
            );
        }
    }
    let max_message_bytes = given(&s.kafka_max_message_bytes).map(|_| {
        number(
        p,
        &s.kafka_max_message_bytes,
        NumberSetting {
            variable: "KAFKA_MAX_MESSAGE_BYTES",
            flag: "--kafka-max-message-bytes",
            default: crate::sink::DEFAULT_KAFKA_MAX_MESSAGE_BYTES as u64,
            min: 65_536,
            max: crate::sink::MAX_BODY_BYTES as u64,
            unit: "bytes",
            hint: "the topic's max.message.bytes (kafka-configs --describe --entity-type topics); \
                   larger records are cut to fit",
        },
    ) as usize
    });
    if p.0.len() != before {
        return None;
    }
    Some(SinkConfig::Kafka {
        brokers,
        topic,
        security_protocol,
        sasl_mechanism,
        sasl_username,
        sasl_password,
        ca_file,
        max_message_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    /// A minimal valid command line: host, OAuth, HTTP sink.
    fn valid_cli() -> Cli {
        let mut cli = Cli::default();
        cli.databricks.host = s("https://example.cloud.databricks.com");
        cli.databricks.client_id = s("sp-client-id");
        cli.databricks.client_secret = Some(SecretArg::from("oauth-secret-value"));
        cli.sink.ingestion_url = s("http://akto-ingest:9000");
        cli
    }

    fn build(cli: &Cli) -> Result<Config, ConfigError> {
        Config::from_cli_with_home(cli, Needs::DatabricksAndSink, None)
    }

    fn problems_of(cli: &Cli) -> Vec<&'static str> {
        match build(cli) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| p.variable).collect(),
        }
    }

    #[test]
    fn defaults_apply_when_only_required_settings_are_given() {
        let config = build(&valid_cli()).expect("valid");
        assert_eq!(
            config.host.as_str(),
            "https://example.cloud.databricks.com/"
        );
        assert_eq!(config.catalog, "workspace");
        assert_eq!(config.schema, "default");
        assert_eq!(config.prefix, "");
        assert_eq!(config.warehouse_id, None);
        assert_eq!(config.akto_account_id, "1000000");
        assert_eq!(config.interval, Duration::from_secs(300));
        assert_eq!(config.lookback, Duration::from_secs(3600));
        assert_eq!(config.max_catchup, Duration::from_secs(24 * 3600));
        assert_eq!(config.state_dir, PathBuf::from("./state"));
        assert!(!config.state_dir_given);
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(
            config.metrics_addr,
            Some("127.0.0.1:9464".parse().expect("addr"))
        );
        assert_eq!(config.table_concurrency, 4);
        assert_eq!(config.statement_timeout, Duration::from_secs(120));
        assert_eq!(config.batch_size, 50);
        assert_eq!(config.checkpoint_batches, DEFAULT_CHECKPOINT_BATCHES);
        assert_eq!(config.once_time_limit, Some(Duration::from_secs(270)));
        assert!(!config.once && !config.reset_state);
        assert_eq!(config.auth.kind(), "oauth");
        assert_eq!(config.auth.client_id(), Some("sp-client-id"));
        match &config.sink {
            Some(SinkConfig::Http { url, jwt, .. }) => {
                assert_eq!(url.as_str(), "http://akto-ingest:9000/");
                assert!(jwt.is_none());
            }
            other => panic!("expected http sink, got {other:?}"),
        }
    }

    #[test]
    fn akto_max_record_bytes_defaults_parses_and_applies_to_http_and_file() {
        let limit_of = |c: &Config| match &c.sink {
            Some(SinkConfig::Http {
                max_record_bytes, ..
            })
            | Some(SinkConfig::File {
                max_record_bytes, ..
            }) => *max_record_bytes,
            other => panic!("expected an http or file sink, got {other:?}"),
        };
        assert_eq!(
            limit_of(&build(&valid_cli()).expect("valid")),
            crate::sink::DEFAULT_AKTO_MAX_RECORD_BYTES
        );
        assert_eq!(crate::sink::DEFAULT_AKTO_MAX_RECORD_BYTES, 5_177_344);
        let mut cli = valid_cli();
        cli.sink.akto_max_record_bytes = s(" 1000000 ");
        assert_eq!(limit_of(&build(&cli).expect("valid")), 1_000_000);
        cli.output = Some(PathBuf::from("-"));
        assert_eq!(limit_of(&build(&cli).expect("valid")), 1_000_000);
        for bad in ["65535", "10485745", "1e6", "", "-3"] {
            cli.sink.akto_max_record_bytes = s(bad);
            if bad.is_empty() {
                // Empty means unset: the default.
                assert_eq!(
                    limit_of(&build(&cli).expect("valid")),
                    crate::sink::DEFAULT_AKTO_MAX_RECORD_BYTES
                );
                continue;
            }
            let err = build(&cli).expect_err(bad);
            assert_eq!(problems_of(&cli), vec!["AKTO_MAX_RECORD_BYTES"], "{bad}");
            let msg = err.to_string();
            assert!(
                msg.contains("AKTO_MAX_RECORD_BYTES (--akto-max-record-bytes)")
                    && msg.contains("from 65536 to 10485744")
                    && msg.contains("1000000 for Akto releases"),
                "{msg}"
            );
        }
        // The Kafka sink has its own limit (KAFKA_MAX_MESSAGE_BYTES): not checked there.
        let mut cli = valid_cli();
        cli.sink.ingestion_url = None;
        cli.sink.kafka_brokers = s("kafka:9092");
        cli.sink.akto_max_record_bytes = s("1");
        assert!(build(&cli).is_ok());
    }

    #[test]
    fn akto_request_timeout_defaults_parses_and_refuses_zero() {
        let timeout_of = |c: &Config| match &c.sink {
            Some(SinkConfig::Http { timeout, .. }) => *timeout,
            other => panic!("expected http sink, got {other:?}"),
        };
        assert_eq!(
            timeout_of(&build(&valid_cli()).expect("valid")),
            Duration::from_secs(30)
        );
        let mut cli = valid_cli();
        cli.sink.akto_request_timeout_seconds = s(" 300 ");
        assert_eq!(
            timeout_of(&build(&cli).expect("valid")),
            Duration::from_secs(300)
        );
        for bad in ["0", "-5", "1.5", "thirty", "3601"] {
            cli.sink.akto_request_timeout_seconds = s(bad);
            let err = build(&cli).expect_err(bad);
            assert_eq!(
                problems_of(&cli),
                vec!["AKTO_REQUEST_TIMEOUT_SECONDS"],
                "{bad}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("AKTO_REQUEST_TIMEOUT_SECONDS (--akto-request-timeout-seconds)")
                    && msg.contains("from 1 to 3600")
                    && msg.contains("e.g. 30"),
                "{msg}"
            );
        }
    }

    /// One workspace is one identity however its URL is written; another port is another one.
    #[test]
    fn a_workspace_has_one_identity_however_its_url_is_written() {
        let identity = |host: &str| {
            let mut cli = valid_cli();
            cli.databricks.host = s(host);
            build(&cli).expect("valid").workspace_identity()
        };
        for host in [
            "https://dbc-1.cloud.databricks.com",
            "https://DBC-1.cloud.databricks.com/",
            "https://dbc-1.cloud.databricks.com:443",
            "dbc-1.cloud.databricks.com",
            "https://dbc-1.cloud.databricks.com.",
        ] {
            assert_eq!(identity(host), "dbc-1.cloud.databricks.com", "{host}");
        }
        assert_eq!(
            identity("https://dbc-1.cloud.databricks.com:8443"),
            "dbc-1.cloud.databricks.com:8443"
        );
    }

    #[test]
    fn explicit_values_are_parsed() {
        let mut cli = valid_cli();
        cli.once = true;
        cli.reset_state = true;
        cli.databricks.catalog = s("main");
        cli.databricks.schema = s("agents");
        cli.databricks.prefix = s("production_");
        cli.databricks.warehouse_id = s("abc123DEF");
        cli.sink.akto_account_id = s("1718042191");
        cli.runtime.interval_seconds = s(" 60 ");
        cli.runtime.lookback_minutes = s("15");
        cli.runtime.max_catchup_hours = s("2");
        cli.runtime.state_dir = Some(PathBuf::from("/var/lib/shield"));
        cli.runtime.log_format = s("JSON");
        cli.runtime.metrics_addr = s("off");
        cli.runtime.table_concurrency = s("32");
        cli.runtime.statement_timeout_seconds = s("30");
        cli.runtime.batch_size = s("1000");
        cli.runtime.checkpoint_batches = s("1");
        cli.runtime.once_time_limit_seconds = s("0");
        let c = build(&cli).expect("valid");
        assert!(c.once && c.reset_state);
        assert_eq!(
            (c.catalog.as_str(), c.schema.as_str(), c.prefix.as_str()),
            ("main", "agents", "production_")
        );
        assert_eq!(c.warehouse_id.as_deref(), Some("abc123DEF"));
        assert_eq!(c.akto_account_id, "1718042191");
        assert_eq!(c.interval, Duration::from_secs(60));
        assert_eq!(c.lookback, Duration::from_secs(15 * 60));
        assert_eq!(c.max_catchup, Duration::from_secs(2 * 3600));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/shield"));
        assert!(c.state_dir_given);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.table_concurrency, 32);
        assert_eq!(c.statement_timeout, Duration::from_secs(30));
        assert_eq!(c.batch_size, 1000);
        assert_eq!(c.checkpoint_batches, 1);
        assert_eq!(c.once_time_limit, None);
    }

    #[test]
    fn empty_values_mean_unset() {
        let mut cli = valid_cli();
        cli.databricks.catalog = s("");
        cli.databricks.prefix = s("");
        cli.databricks.warehouse_id = s("  ");
        cli.runtime.interval_seconds = s("");
        cli.runtime.metrics_addr = s("");
        let c = build(&cli).expect("valid");
        assert_eq!(c.catalog, "workspace");
        assert_eq!(c.warehouse_id, None);
        assert_eq!(c.interval, Duration::from_secs(300));
        assert!(c.metrics_addr.is_some());
        // Empty credentials are missing credentials.
        cli.databricks.client_secret = Some(SecretArg::from(""));
        assert_eq!(problems_of(&cli), vec!["DATABRICKS_CLIENT_SECRET"]);
    }

    #[test]
    fn host_rule() {
        let ok = [
            (
                "https://x.cloud.databricks.com",
                "https://x.cloud.databricks.com/",
            ),
            (
                "https://x.cloud.databricks.com/",
                "https://x.cloud.databricks.com/",
            ),
            ("x.cloud.databricks.com", "https://x.cloud.databricks.com/"),
            (
                "https://adb-1.2.azuredatabricks.net:443",
                "https://adb-1.2.azuredatabricks.net/",
            ),
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/"),
            ("http://127.1.2.3:8080/", "http://127.1.2.3:8080/"),
            ("http://[::1]:8080", "http://[::1]:8080/"),
            ("http://localhost:8080", "http://localhost:8080/"),
            ("http://LOCALHOST:8080", "http://localhost:8080/"),
        ];
        for (raw, expected) in ok {
            assert_eq!(
                parse_host(raw).map(|u| u.to_string()),
                Ok(expected.to_owned()),
                "{raw}"
            );
        }
        let bad = [
            "http://x.cloud.databricks.com",
            "http://10.0.0.1:8080",
            "http://128.0.0.1",
            "http://localhost.example.com",
            "ftp://x.cloud.databricks.com",
            "https://x.cloud.databricks.com/?o=123",
            "https://x.cloud.databricks.com/browse",
            "https://x.cloud.databricks.com/#frag",
            "https://",
            "not a url at all",
        ];
        for raw in bad {
            assert!(parse_host(raw).is_err(), "{raw} should be rejected");
        }
        let err = parse_host("https://user:pw-value@x.cloud.databricks.com").unwrap_err();
        assert!(!err.contains("pw-value"), "{err}");
        let err = parse_host("https://x.cloud.databricks.com/?o=1").unwrap_err();
        assert!(err.contains("use https://x.cloud.databricks.com"), "{err}");
    }

    #[test]
    fn ingestion_url_allows_plain_http_anywhere() {
        for raw in [
            "http://10.1.2.3:9000",
            "http://akto-ingest:9000/",
            "https://ingest.example.com/akto",
        ] {
            assert!(parse_ingestion_url(raw).is_ok(), "{raw}");
        }
        for raw in [
            "akto-ingest:9000",
            "ftp://x:9000",
            "http://x:9000/api/ingestData",
            "http://x:9000/api/ingestData/",
            "http://x:9000/?a=b",
            "http://user:pw@x:9000",
        ] {
            assert!(parse_ingestion_url(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn uc_names_and_prefix() {
        for good in ["main", "my_catalog", "Ünïcode-name", "a1"] {
            assert!(check_uc_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a.b", "a b", "a/b", "a`b", "a\tb", &"x".repeat(256)] {
            assert!(check_uc_name(bad).is_err(), "{bad:?}");
        }
        let mut cli = valid_cli();
        cli.databricks.catalog = s("main.x");
        cli.databricks.schema = s("bad`name");
        cli.databricks.prefix = s("prod ");
        // Trailing space is trimmed, so "prod " is fine; an inner space is not.
        assert_eq!(
            problems_of(&cli),
            vec!["DATABRICKS_CATALOG", "DATABRICKS_SCHEMA"]
        );
        cli.databricks.prefix = s("prod uction_");
        assert_eq!(problems_of(&cli).len(), 3);
    }

    #[test]
    fn auth_choice() {
        // id + secret -> OAuth, even when a token is also set.
        let mut cli = valid_cli();
        cli.databricks.token = Some(SecretArg::from("dapi-token"));
        assert_eq!(build(&cli).expect("valid").auth.kind(), "oauth");

        // token only -> PAT
        cli.databricks.client_id = None;
        cli.databricks.client_secret = None;
        let config = build(&cli).expect("valid");
        match &config.auth {
            DatabricksAuth::Pat { token } => assert_eq!(token.expose_secret(), "dapi-token"),
            other => panic!("expected PAT, got {other:?}"),
        }

        // one of id/secret alone is an error even with a token
        cli.databricks.client_id = s("id-only");
        assert_eq!(problems_of(&cli), vec!["DATABRICKS_CLIENT_SECRET"]);
        cli.databricks.client_id = None;
        cli.databricks.client_secret = Some(SecretArg::from("secret-only"));
        assert_eq!(problems_of(&cli), vec!["DATABRICKS_CLIENT_ID"]);

        // nothing -> one problem naming both options
        cli.databricks.client_secret = None;
        cli.databricks.token = None;
        let err = build(&cli).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        let text = err.to_string();
        for name in [
            "DATABRICKS_CLIENT_ID",
            "DATABRICKS_CLIENT_SECRET",
            "DATABRICKS_TOKEN",
        ] {
            assert!(text.contains(name), "{text}");
        }
    }

    #[test]
    fn secret_files_are_read_and_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret_path = dir.path().join("client_secret");
        std::fs::write(&secret_path, "from-file-secret\n").expect("write");
        let mut cli = valid_cli();
        cli.databricks.client_secret = None;
        cli.databricks.client_secret_file = Some(secret_path.clone());
        let jwt_path = dir.path().join("jwt");
        std::fs::write(&jwt_path, "jwt-from-file\r\n").expect("write");
        cli.sink.jwt_file = Some(jwt_path);
        let c = build(&cli).expect("valid");
        match &c.auth {
            DatabricksAuth::OAuth { client_secret, .. } => {
                assert_eq!(client_secret.expose_secret(), "from-file-secret")
            }
            other => panic!("expected OAuth, got {other:?}"),
        }
        // The file is kept, to be read again for a rotated secret; not for a direct value.
        assert_eq!(
            c.auth_secret_file,
            Some((secret_path.clone(), "DATABRICKS_CLIENT_SECRET_FILE"))
        );
        assert_eq!(build(&valid_cli()).unwrap().auth_secret_file, None);
        match &c.sink {
            Some(SinkConfig::Http {
                jwt: Some(jwt),
                jwt_file: Some(file),
                ..
            }) => {
                assert_eq!(jwt.expose_secret(), "jwt-from-file");
                assert!(file.ends_with("jwt"), "{}", file.display())
            }
            other => panic!("expected http with jwt, got {other:?}"),
        }

        // Both forms set -> problem; missing file -> problem naming the path; empty -> problem.
        cli.databricks.client_secret = Some(SecretArg::from("direct"));
        assert_eq!(problems_of(&cli), vec!["DATABRICKS_CLIENT_SECRET_FILE"]);
        cli.databricks.client_secret = None;
        cli.databricks.client_secret_file = Some(dir.path().join("missing"));
        let err = build(&cli).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
        std::fs::write(&secret_path, "\n").expect("write");
        cli.databricks.client_secret_file = Some(secret_path);
        assert_eq!(problems_of(&cli), vec!["DATABRICKS_CLIENT_SECRET_FILE"]);
    }

    #[test]
    fn databricks_config_profile_fills_in_below_explicit_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(".databrickscfg"),
            "; comment\n[DEFAULT]\nhost = https://default.cloud.databricks.com\n\
             token = dapi-default\n\n[prod]\nhost: https://prod.cloud.databricks.com/\n\
             client_id = prod-id\nclient_secret = prod-secret\n",
        )
        .expect("write");
        let mut cli = Cli::default();
        cli.sink.ingestion_url = s("http://akto-ingest:9000");

        // DEFAULT profile from ~/.databrickscfg
        let c = Config::from_cli_with_home(&cli, Needs::DatabricksAndSink, Some(dir.path()))
            .expect("valid");
        assert_eq!(c.host.as_str(), "https://default.cloud.databricks.com/");
        assert_eq!(c.auth.kind(), "pat");

        // Named profile; an explicit host wins over the profile's.
        cli.databricks.profile = s("prod");
        cli.databricks.host = s("https://explicit.cloud.databricks.com");
        let c = Config::from_cli_with_home(&cli, Needs::DatabricksAndSink, Some(dir.path()))
            .expect("valid");
        assert_eq!(c.host.as_str(), "https://explicit.cloud.databricks.com/");
        assert_eq!(c.auth.client_id(), Some("prod-id"));

        // Explicit config file via DATABRICKS_CONFIG_FILE with "~".
        cli.databricks.config_file = Some(PathBuf::from("~/.databrickscfg"));
        assert!(
            Config::from_cli_with_home(&cli, Needs::DatabricksAndSink, Some(dir.path())).is_ok()
        );

        // Unknown profile -> problem listing the known ones.
        cli.databricks.profile = s("staging");
        let err = Config::from_cli_with_home(&cli, Needs::DatabricksAndSink, Some(dir.path()))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("staging") && text.contains("DEFAULT, prod"),
            "{text}"
        );

        // No HOME and no file: a missing default file is not a problem.
        let mut cli = valid_cli();
        cli.databricks.profile = s("DEFAULT");
        assert!(build(&cli).is_ok());
        // An explicit file that does not exist is.
        cli.databricks.config_file = Some(dir.path().join("nope.cfg"));
        assert_eq!(problems_of(&cli), vec!["DATABRICKS_CONFIG_FILE"]);
    }

    #[test]
    fn quoted_catalog_and_schema_say_remove_the_quotes() {
        let mut cli = valid_cli();
        cli.databricks.catalog = s("'workspace'");
        cli.databricks.schema = s("\"default\"");
        cli.databricks.prefix = s("'prod_'");
        let err = build(&cli).unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
        for p in &err.problems {
            assert!(p.message.contains("remove the quotes"), "{}", p.message);
        }
        // A quote inside a name is Unity Catalog's business, not a wrapping mistake.
        assert!(check_uc_name("o'neil").is_ok());
    }

    #[test]
    fn secrets_from_the_environment_are_trimmed_and_control_characters_refused() {
        let mut cli = valid_cli();
        cli.databricks.client_secret = Some(SecretArg::from("oauth-secret-value\r\n"));
        cli.sink.jwt = Some(SecretArg::from("  jwt-value\n"));
        let c = build(&cli).expect("valid");
        match &c.auth {
            DatabricksAuth::OAuth { client_secret, .. } => {
                assert_eq!(client_secret.expose_secret(), "oauth-secret-value")
            }
            other => panic!("expected OAuth, got {other:?}"),
        }
        match &c.sink {
            Some(SinkConfig::Http { jwt: Some(jwt), .. }) => {
                assert_eq!(jwt.expose_secret(), "jwt-value")
            }
            other => panic!("expected http with jwt, got {other:?}"),
        }
        // Only whitespace: not set.
        cli.databricks.client_secret = Some(SecretArg::from(" \n"));
        assert_eq!(problems_of(&cli), vec!["DATABRICKS_CLIENT_SECRET"]);
        // A line break or tab inside: refused, naming the variable, never the value.
        let mut cli = valid_cli();
        cli.databricks.client_id = None;
        cli.databricks.client_secret = None;
        cli.databricks.token = Some(SecretArg::from("dapi-first\nsecond-half-7781"));
        cli.sink.jwt = Some(SecretArg::from("jwt\tvalue-7782"));
        cli.sink.kafka_sasl_password = Some(SecretArg::from("irrelevant"));
        let err = build(&cli).unwrap_err();
        assert_eq!(
            err.problems.iter().map(|p| p.variable).collect::<Vec<_>>(),
            vec!["DATABRICKS_TOKEN", "AKTO_JWT_TOKEN"],
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("control character"), "{text}");
        assert!(!text.contains("7781") && !text.contains("7782"), "{text}");
        // The same rule for a secret file.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "dapi-a\nb-7783\n").expect("write");
        cli.databricks.token = None;
        cli.databricks.token_file = Some(path);
        cli.sink.jwt = None;
        let err = build(&cli).unwrap_err();
        assert_eq!(
            err.problems.iter().map(|p| p.variable).collect::<Vec<_>>(),
            vec!["DATABRICKS_TOKEN_FILE"]
        );
        assert!(!err.to_string().contains("7783"));
    }

    #[test]
    fn profile_credentials_never_override_explicit_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(".databrickscfg"),
            "[DEFAULT]\nhost = https://profile.cloud.databricks.com\n\
             client_id = profile-id\nclient_secret = profile-secret-7790\ntoken = dapi-profile\n",
        )
        .expect("write");
        let home = Some(dir.path());
        let mut cli = Cli::default();
        cli.sink.ingestion_url = s("http://akto-ingest:9000");
        cli.databricks.host = s("https://explicit.cloud.databricks.com");
        // An explicit token: the profile's OAuth credentials are not used, and not mixed in.
        cli.databricks.token = Some(SecretArg::from("dapi-explicit"));
        let c = Config::from_cli_with_home(&cli, Needs::DatabricksAndSink, home).expect("valid");
        assert_eq!(c.host.as_str(), "https://explicit.cloud.databricks.com/");
        match &c.auth {
            DatabricksAuth::Pat { token } => assert_eq!(token.expose_secret(), "dapi-explicit"),
            other => panic!("expected the explicit PAT, got {other:?}"),
        }
        // An explicit client id alone: its secret is missing (not taken from the profile).
        cli.databricks.token = None;
        cli.databricks.client_id = s("explicit-id");
        let err = Config::from_cli_with_home(&cli, Needs::DatabricksAndSink, home).unwrap_err();
        assert_eq!(
            err.problems[0].variable, "DATABRICKS_CLIENT_SECRET",
            "{err}"
        );
        // A token file counts as explicit too.
        let token_path = dir.path().join("token");
        std::fs::write(&token_path, "dapi-from-file\n").expect("write");
        cli.databricks.client_id = None;
        cli.databricks.token_file = Some(token_path);
        let c = Config::from_cli_with_home(&cli, Needs::DatabricksAndSink, home).expect("valid");
        assert_eq!(c.auth.kind(), "pat");
        // No credential variable: the profile's credentials (OAuth first), host as set.
        cli.databricks.token_file = Some(PathBuf::new());
        let c = Config::from_cli_with_home(&cli, Needs::DatabricksAndSink, home).expect("valid");
        assert_eq!(c.auth.client_id(), Some("profile-id"));
        assert_eq!(c.host.as_str(), "https://explicit.cloud.databricks.com/");
    }

    #[test]
    fn kafka_brokers_with_credentials_are_never_echoed() {
        let mut cli = valid_cli();
        cli.sink.ingestion_url = None;
        for raw in [
            "sasl_ssl://alice:KPASSLEAK@broker:9092",
            "alice:KPASSLEAK@broker:9092",
            "ok-broker:9092, bob:KPASSLEAK@other:9093",
        ] {
            cli.sink.kafka_brokers = s(raw);
            let err = build(&cli).unwrap_err();
            let text = err.to_string();
            assert!(
                !text.contains("KPASSLEAK") && !text.contains("alice"),
                "{text}"
            );
            assert!(
                text.contains("KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD"),
                "{text}"
            );
        }
    }

    #[test]
    fn sink_choice() {
        let base = {
            let mut cli = valid_cli();
            cli.sink.ingestion_url = None;
            cli
        };
        let kind = |cli: &Cli| build(cli).map(|c| c.sink.map(|s| s.kind()));

        // Nothing -> problem naming both variables.
        let err = build(&base).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("DATA_INGESTION_SERVICE_URL") && text.contains("KAFKA_BROKER_HOST"),
            "{text}"
        );
        // ...unless the command needs no sink.
        let c = Config::from_cli_with_home(&base, Needs::Databricks, None).expect("valid");
        assert!(c.sink.is_none());

        // URL only -> http; broker only -> kafka; both -> http (never both ways).
        let mut cli = base.clone();
        cli.sink.ingestion_url = s("http://akto:9000");
        assert_eq!(kind(&cli).unwrap(), Some("http"));
        let mut cli = base.clone();
        cli.sink.kafka_brokers = s("kafka1:9092, kafka2:9093");
        match build(&cli).expect("valid").sink {
            Some(SinkConfig::Kafka { brokers, topic, .. }) => {
                assert_eq!(brokers, "kafka1:9092,kafka2:9093");
                assert_eq!(topic, "akto.api.logs");
            }
            other => panic!("expected kafka, got {other:?}"),
        }
        cli.sink.ingestion_url = s("http://akto:9000");
        assert_eq!(kind(&cli).unwrap(), Some("http"));

        // AKTO_SINK overrides the inference.
        cli.sink.kind = s("KAFKA");
        assert_eq!(kind(&cli).unwrap(), Some("kafka"));
        cli.sink.kind = s("file");
        cli.sink.output_path = Some(PathBuf::from("/tmp/out.jsonl"));
        match build(&cli).expect("valid").sink {
            Some(SinkConfig::File { path, .. }) => {
                assert_eq!(path, Some(PathBuf::from("/tmp/out.jsonl")))
            }
            other => panic!("expected file, got {other:?}"),
        }
        cli.sink.output_path = None;
        assert!(matches!(
            build(&cli).expect("valid").sink,
            Some(SinkConfig::File { path: None, .. })
        ));
        cli.sink.kind = s("carrier-pigeon");
        assert_eq!(problems_of(&cli), vec!["AKTO_SINK"]);

        // AKTO_SINK=http without a URL / kafka without a broker.
        let mut cli = base.clone();
        cli.sink.kind = s("http");
        assert_eq!(problems_of(&cli), vec!["DATA_INGESTION_SERVICE_URL"]);
        cli.sink.kind = s("kafka");
        assert_eq!(problems_of(&cli), vec!["KAFKA_BROKER_HOST"]);

        // --output wins over everything.
        let mut cli = base.clone();
        cli.sink.kind = s("kafka");
        cli.output = Some(PathBuf::from("-"));
        assert!(matches!(
            build(&cli).expect("valid").sink,
            Some(SinkConfig::File { path: None, .. })
        ));
    }

    #[test]
    fn kafka_settings() {
        for good in [
            "a:1",
            "kafka.example.com:9092",
            "10.0.0.1:9092,[::1]:9093",
            "b_1:9092,",
        ] {
            assert!(parse_brokers(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ",",
            "kafka",
            "kafka:",
            "kafka:0",
            "kafka:99999",
            "PLAINTEXT://k:9092",
            "k k:1",
            "[zz]:1",
        ] {
            assert!(parse_brokers(bad).is_err(), "{bad}");
        }
        assert!(check_topic("akto.api.logs").is_ok());
        assert!(check_topic("bad topic").is_err());
        assert!(check_topic("..").is_err());

        let mut cli = valid_cli();
        cli.sink.ingestion_url = None;
        cli.sink.kafka_brokers = s("k:9092");
        cli.sink.kafka_security_protocol = s("sasl_ssl");
        cli.sink.kafka_sasl_mechanism = s("scram-sha-512");
        cli.sink.kafka_sasl_username = s("user");
        cli.sink.kafka_sasl_password = Some(SecretArg::from("kafka-pw-value"));
        let c = build(&cli).expect("valid");
        let summary = c.summary();
        assert!(!summary.contains("kafka-pw-value"), "{summary}");
        assert!(
            summary.contains("SASL_SSL") && summary.contains("SCRAM-SHA-512"),
            "{summary}"
        );
        assert!(!format!("{c:?}").contains("kafka-pw-value"));

        // SASL protocol without its settings; SASL settings without a SASL protocol.
        cli.sink.kafka_sasl_password = None;
        assert_eq!(problems_of(&cli), vec!["KAFKA_SASL_MECHANISM"]);
        cli.sink.kafka_sasl_password = Some(SecretArg::from("kafka-pw-value"));
        cli.sink.kafka_security_protocol = None;
        assert_eq!(problems_of(&cli), vec!["KAFKA_SECURITY_PROTOCOL"]);
        cli.sink.kafka_security_protocol = s("TLS");
        assert_eq!(problems_of(&cli), vec!["KAFKA_SECURITY_PROTOCOL"]);
        cli.sink.kafka_security_protocol = s("SASL_SSL");
        cli.sink.kafka_sasl_mechanism = s("GSSAPI");
        assert_eq!(problems_of(&cli), vec!["KAFKA_SASL_MECHANISM"]);

        // The password from a file, like the other secrets; both forms set is a problem.
        let dir = tempfile::tempdir().unwrap();
        let pw_file = dir.path().join("kafka_password");
        std::fs::write(&pw_file, "kafka-pw-from-file\n").unwrap();
        let mut cli = valid_cli();
        cli.sink.kind = s("kafka");
        cli.sink.kafka_brokers = s("k:9092");
        cli.sink.kafka_security_protocol = s("SASL_SSL");
        cli.sink.kafka_sasl_mechanism = s("SCRAM-SHA-512");
        cli.sink.kafka_sasl_username = s("akto");
        cli.sink.kafka_sasl_password_file = Some(pw_file.clone());
        match build(&cli).expect("valid").sink {
            Some(SinkConfig::Kafka {
                sasl_password: Some(pw),
                ..
            }) => assert_eq!(pw.expose_secret(), "kafka-pw-from-file"),
            other => panic!("expected Kafka with a password, got {other:?}"),
        }
        cli.sink.kafka_sasl_password = Some(SecretArg::from("direct"));
        assert_eq!(problems_of(&cli), vec!["KAFKA_SASL_PASSWORD_FILE"]);
        cli.sink.kafka_sasl_password = None;
        cli.sink.kafka_sasl_password_file = Some(dir.path().join("missing"));
        assert_eq!(problems_of(&cli), vec!["KAFKA_SASL_PASSWORD_FILE"]);

        // CA file must exist and needs TLS.
        let mut cli = valid_cli();
        cli.sink.kind = s("kafka");
        cli.sink.kafka_brokers = s("k:9092");
        cli.sink.kafka_ca_file = Some(PathBuf::from("/nonexistent/ca.pem"));
        cli.sink.kafka_security_protocol = s("SSL");
        assert_eq!(problems_of(&cli), vec!["KAFKA_CA_FILE"]);
        cli.sink.kafka_security_protocol = None;
        assert_eq!(problems_of(&cli), vec!["KAFKA_CA_FILE", "KAFKA_CA_FILE"]);
        // A file that is not PEM is refused at configuration; a CA certificate is taken.
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.der");
        std::fs::write(&not_pem, b"\x30\x82 not a PEM certificate").unwrap();
        cli.sink.kafka_security_protocol = s("SSL");
        cli.sink.kafka_ca_file = Some(not_pem);
        assert_eq!(problems_of(&cli), vec!["KAFKA_CA_FILE"]);
        let ca = rcgen::generate_simple_self_signed(vec!["kafka.test".into()]).unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, ca.cert.pem()).unwrap();
        cli.sink.kafka_ca_file = Some(pem);
        assert!(problems_of(&cli).is_empty(), "{:?}", problems_of(&cli));

        // The message size limit: Kafka's default, a number in range, or a clear error.
        let mut cli = valid_cli();
        cli.sink.kind = s("kafka");
        cli.sink.kafka_brokers = s("k:9092");
        let limit = |cli: &Cli| match build(cli).ok().and_then(|c| c.sink) {
            Some(SinkConfig::Kafka {
                max_message_bytes, ..
            }) => Some(max_message_bytes),
            _ => None,
        };
        assert_eq!(limit(&cli), Some(None), "unset: read from the topic");
        cli.sink.kafka_max_message_bytes = s("5242880");
        assert_eq!(limit(&cli), Some(Some(5_242_880)));
        for bad in ["1000", "20000000", "1MB"] {
            cli.sink.kafka_max_message_bytes = s(bad);
            assert_eq!(problems_of(&cli), vec!["KAFKA_MAX_MESSAGE_BYTES"], "{bad}");
        }
    }

    #[test]
    fn the_sink_trusts_akto_ca_bundle_else_the_workspace_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let (akto, proxy) = (dir.path().join("akto.pem"), dir.path().join("proxy.pem"));
        std::fs::write(&akto, ca.cert.pem()).unwrap();
        std::fs::write(&proxy, ca.cert.pem()).unwrap();
        // (Unset, the answer depends on SSL_CERT_FILE in this process: not checked here.)
        let mut cli = valid_cli();
        cli.databricks.ca_bundle = Some(proxy.clone());
        assert_eq!(
            build(&cli).expect("valid").akto_ca_bundle_with_setting(),
            Some((proxy.as_path(), "DATABRICKS_CA_BUNDLE"))
        );
        cli.sink.akto_ca_bundle = Some(akto.clone());
        let c = build(&cli).expect("valid");
        assert_eq!(c.akto_ca_bundle(), Some(akto.as_path()));
        assert_eq!(c.akto_ca_bundle_setting(), "AKTO_CA_BUNDLE");
        assert_eq!(c.ca_bundle.as_deref(), Some(proxy.as_path()));
        // A command that sends nothing does not read it.
        cli.sink.akto_ca_bundle = Some(dir.path().join("missing.pem"));
        assert!(Config::from_cli_with_home(&cli, Needs::Databricks, None).is_ok());
        assert_eq!(problems_of(&cli), vec!["AKTO_CA_BUNDLE"]);
    }

    #[test]
    fn late_rows_window_must_fit_in_the_catchup() {
        let mut cli = valid_cli();
        // 600 s + 50 min = 1 h exactly: fits.
        cli.runtime.max_catchup_hours = s("1");
        cli.runtime.interval_seconds = s("600");
        cli.runtime.lookback_minutes = s("50");
        assert!(problems_of(&cli).is_empty(), "{:?}", problems_of(&cli));
        cli.runtime.interval_seconds = s("601");
        assert_eq!(problems_of(&cli), vec!["MAX_CATCHUP_HOURS"]);
        // A bad value is reported alone, not again as a window problem.
        cli.runtime.lookback_minutes = s("lots");
        assert_eq!(problems_of(&cli), vec!["LOOKBACK_MINUTES"]);
    }

    #[test]
    fn every_problem_is_listed_in_one_line() {
        let mut cli = Cli::default();
        cli.env_file_problems.push(Problem {
            variable: "--env-file",
            message: "--env-file x.env line 3: expected KEY=value".into(),
        });
        cli.databricks.catalog = s("a.b");
        cli.sink.akto_account_id = s("12ab");
        cli.runtime.interval_seconds = s("5");
        cli.runtime.lookback_minutes = s("-1");
        cli.runtime.max_catchup_hours = s("lots");
        cli.runtime.table_concurrency = s("0");
        cli.runtime.statement_timeout_seconds = s("1");
        cli.runtime.batch_size = s("5000");
        cli.runtime.checkpoint_batches = s("0");
        cli.runtime.log_format = s("xml");
        cli.runtime.metrics_addr = s("localhost:9464");
        cli.databricks.warehouse_id = s("../etc");
        let err = build(&cli).unwrap_err();
        let names: Vec<&str> = err.problems.iter().map(|p| p.variable).collect();
        assert_eq!(
            names,
            vec![
                "--env-file",
                "DATABRICKS_HOST",
                "DATABRICKS_CLIENT_ID",
                "DATABRICKS_CATALOG",
                "DATABRICKS_WAREHOUSE_ID",
                "DATA_INGESTION_SERVICE_URL",
                "AKTO_ACCOUNT_ID",
                "RECURRING_INTERVAL_SECONDS",
                "LOOKBACK_MINUTES",
                "MAX_CATCHUP_HOURS",
                "TABLE_CONCURRENCY",
                "STATEMENT_TIMEOUT_SECONDS",
                "BATCH_SIZE",
                "CHECKPOINT_BATCHES",
                "LOG_FORMAT",
                "METRICS_ADDR",
            ]
        );
        let text = err.to_string();
        assert!(!text.contains('\n'));
        assert!(
            text.starts_with("invalid configuration, 16 problems: (1) "),
            "{text}"
        );
        for name in &names {
            assert!(text.contains(name), "{name} missing from {text}");
        }
        // Each problem says how to fix it and names its flag.
        assert!(text.contains("--interval-seconds") && text.contains("from 10 to 86400"));
        assert!(text.contains("e.g. https://your-workspace.cloud.databricks.com"));
    }

    #[test]
    fn secrets_never_show_in_summary_debug_or_errors() {
        let mut cli = valid_cli();
        cli.sink.jwt = Some(SecretArg::from("jwt-secret-value"));
        let c = build(&cli).expect("valid");
        let summary = c.summary();
        let debug = format!("{c:?}");
        for text in [&summary, &debug] {
            assert!(!text.contains("oauth-secret-value"), "{text}");
            assert!(!text.contains("jwt-secret-value"), "{text}");
        }
        assert!(summary.contains("client_id=sp-client-id") && summary.contains("jwt=set"));
        assert!(!summary.contains('\n'));

        // An error elsewhere does not drag secrets into the message.
        cli.runtime.batch_size = s("0");
        cli.databricks.host = s("http://user:host-pw@example.com");
        let text = build(&cli).unwrap_err().to_string();
        for secret in ["oauth-secret-value", "jwt-secret-value", "host-pw"] {
            assert!(!text.contains(secret), "{text}");
        }
    }
}
