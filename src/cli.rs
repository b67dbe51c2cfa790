//! The command line: every setting as a flag with its environment variable, plus the subcommands.
//!
//! This module exists so that *where* a setting comes from is decided in one place, before any
//! validation: command-line flags beat the process environment, which beats the `--env-file`
//! file (the seed's `databricks-cron.env` format). It performs no validation beyond what clap
//! needs to split the arguments; [`crate::config::Config::from_cli`] turns a [`Cli`] into a
//! validated configuration and reports every problem at once.
//!
//! Two quirks are handled here explicitly:
//! - Akto's job runner starts the binary as `databricks-shield -once` (one dash). clap would read
//!   that as the short flags `-o -n -c -e`, so [`normalize_args`] rewrites it to `--once` first.
//! - Settings are kept as raw strings so that a bad value is reported together with every other
//!   problem instead of clap stopping at the first one. Secret settings use [`SecretArg`], whose
//!   `Debug` is redacted, and `--help` never shows their values.
//!
//! Architecture Invariant: this module never performs network I/O and never prints a secret.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::builder::TypedValueParser;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};

use crate::config::Problem;

/// Text shown after `--help`.
const AFTER_HELP: &str = "\
Settings are read from command-line flags first, then environment variables, then the file given
with --env-file (KEY=value lines, as in databricks-cron.env). Secrets can also come from files
(DATABRICKS_CLIENT_SECRET_FILE, DATABRICKS_TOKEN_FILE, AKTO_JWT_TOKEN_FILE) or a Databricks
config profile (DATABRICKS_CONFIG_FILE, DATABRICKS_CONFIG_PROFILE); prefer them to flags.
Network: HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY route the workspace and the HTTP sink
through a proxy; RUST_LOG tunes the log filter. HTTPS to the workspace and to the HTTP sink
trusts the built-in Mozilla roots (not the system's certificate store) plus DATABRICKS_CA_BUNDLE
(workspace) and AKTO_CA_BUNDLE (HTTP sink; unset: DATABRICKS_CA_BUNDLE); SSL_CERT_FILE stands
in for DATABRICKS_CA_BUNDLE when that is unset, so it then applies to both. Kafka uses
KAFKA_CA_FILE. These are read from the environment, and from --env-file when the environment
does not set them.

First step when something does not work: `databricks-shield check` tests every prerequisite
(configuration, network, authentication, grants, tables, warehouse, sink) and prints the fix for
each failure. `databricks-shield --print-config` only validates the configuration and prints it.
The README's configuration table describes every setting.";

/// A secret given on the command line or in the environment.
///
/// Its `Debug` output is `[REDACTED]`, so a `Cli` can be debug-printed safely.
#[derive(Clone)]
pub struct SecretArg(SecretString);

impl SecretArg {
    /// The secret, for [`crate::config`] only.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// A copy as a [`SecretString`].
    pub fn to_secret(&self) -> SecretString {
        self.0.clone()
    }
}

impl fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl FromStr for SecretArg {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretArg(SecretString::from(s.to_owned())))
    }
}

impl From<&str> for SecretArg {
    fn from(s: &str) -> Self {
        SecretArg(SecretString::from(s.to_owned()))
    }
}

/// The value parser of every path setting: like clap's own, but an empty value is accepted
/// (docker's `env_file` turns `STATE_DIR=` into an empty variable, and the env template says an
/// empty value means unset); [`crate::config`] then treats the empty path as not set.
fn path_parser() -> impl TypedValueParser<Value = PathBuf> {
    clap::builder::OsStringValueParser::new().map(PathBuf::from)
}

/// The parsed command line (flags and environment; the env file is already folded in).
///
/// Settings are raw, unvalidated strings: `None` or an empty string both mean "not set".
/// Fields are public so tests can build a `Cli` directly (`Cli { host: Some(..), ..Default::default() }`).
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "databricks-shield",
    version,
    about = "Brings a Databricks workspace's AI agents and their traffic into Akto",
    long_about = "Brings a Databricks workspace's AI agents and their traffic into Akto.\n\n\
        Without a subcommand it runs as a service: one collection cycle every \
        RECURRING_INTERVAL_SECONDS. With -once / --once it runs a single cycle and exits \
        (non-zero when the cycle failed).",
    after_help = AFTER_HELP,
    max_term_width = 100
)]
pub struct Cli {
    /// What to do; `None` means `run`.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Run one collection cycle and exit (also accepted as `-once`, as Akto's job runner passes it)
    #[arg(long, global = true)]
    pub once: bool,

    /// Read settings from this file (KEY=value lines); flags and environment variables win over it
    #[arg(value_parser = path_parser(), long, value_name = "PATH", global = true)]
    pub env_file: Option<PathBuf>,

    /// Write records as JSON lines to PATH ("-" = stdout) instead of sending them to Akto
    #[arg(value_parser = path_parser(), long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// Forget the saved read positions (STATE_DIR) and start again from LOOKBACK_MINUTES ago
    #[arg(long, global = true)]
    pub reset_state: bool,

    /// Validate configuration and print it (no network calls), then exit
    #[arg(long, global = true)]
    pub print_config: bool,

    /// Databricks settings.
    #[command(flatten)]
    pub databricks: DatabricksArgs,

    /// Where records go.
    #[command(flatten)]
    pub sink: SinkArgs,

    /// Schedule, state and runtime settings.
    #[command(flatten)]
    pub runtime: RuntimeArgs,

    /// Problems found while reading `--env-file` (reported by `Config::from_cli` with the rest).
    #[arg(skip)]
    pub env_file_problems: Vec<Problem>,

    /// Warnings about where settings come from, for main to log as WARN: `--env-file` keys that
    /// are no setting, a secret whose other form (`_FILE` or direct) a higher source sets, a
    /// sink setting that the other one makes unused. Never a value.
    #[arg(skip)]
    pub env_file_warnings: Vec<String>,

    /// Process variables the `--env-file` sets ([`ENV_FILE_PROCESS_VARIABLES`]: proxies,
    /// `SSL_CERT_FILE`, `RUST_LOG`) that the process environment does not; main applies them
    /// with [`Cli::export_env_file_variables`] before any thread starts.
    #[arg(skip)]
    pub env_file_exports: EnvExports,
}

/// Variables an `--env-file` may set that are no setting of the connector but are read from the
/// process environment by what it uses: the HTTP proxies (reqwest), `SSL_CERT_FILE` (the CA
/// bundle fallback) and `RUST_LOG` (the log filter). Copied into the process environment.
pub const ENV_FILE_PROCESS_VARIABLES: [&str; 10] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
    "SSL_CERT_FILE",
    "RUST_LOG",
];

/// Variables Akto's job runner sets besides the connector's settings: known, not used, no WARN.
const ENV_FILE_IGNORED_VARIABLES: [&str; 3] = ["AKTO_JOB_ID", "AKTO_JOB_TYPE", "AKTO_JOB_SUB_TYPE"];

/// `KEY=value` pairs to put into the process environment. `Debug` shows the keys only (a proxy
/// URL may hold a password).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EnvExports(pub Vec<(String, String)>);

impl fmt::Debug for EnvExports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

impl Cli {
    /// Sets the `--env-file`'s process variables ([`Cli::env_file_exports`]) in the process
    /// environment. Call it before any thread starts (main does, before the async runtime):
    /// changing the environment while another thread reads it is undefined behaviour on some
    /// platforms.
    pub fn export_env_file_variables(&self) {
        for (key, value) in &self.env_file_exports.0 {
            std::env::set_var(key, value);
        }
    }
}

/// Databricks workspace, credentials and what to read.
// The example URL is --help text, printed as is: no link markup.
#[allow(rustdoc::bare_urls)]
#[derive(Args, Debug, Default, Clone)]
#[command(next_help_heading = "Databricks")]
pub struct DatabricksArgs {
    /// Workspace URL, e.g. https://your-workspace.cloud.databricks.com (http:// only for loopback)
    #[arg(long, env = "DATABRICKS_HOST", value_name = "URL", global = true)]
    pub host: Option<String>,

    /// Extra CA certificates (PEM bundle) trusted for the workspace, e.g. a corporate TLS proxy's,
    /// besides the built-in Mozilla roots; also for the HTTP sink unless AKTO_CA_BUNDLE is set
    /// [default: SSL_CERT_FILE]. TLS is always verified
    #[arg(value_parser = path_parser(), long, env = "DATABRICKS_CA_BUNDLE", value_name = "PATH", global = true)]
    pub ca_bundle: Option<PathBuf>,

    /// Service principal application (client) id, for OAuth machine-to-machine
    #[arg(long, env = "DATABRICKS_CLIENT_ID", value_name = "ID", global = true)]
    pub client_id: Option<String>,

    /// Service principal OAuth secret (prefer the environment or DATABRICKS_CLIENT_SECRET_FILE)
    #[arg(
        long,
        env = "DATABRICKS_CLIENT_SECRET",
        value_name = "SECRET",
        hide_env_values = true,
        hide_default_value = true,
        global = true
    )]
    pub client_secret: Option<SecretArg>,

    /// File holding the service principal secret (a mounted container secret)
    #[arg(
        value_parser = path_parser(),
        long,
        env = "DATABRICKS_CLIENT_SECRET_FILE",
        value_name = "PATH",
        global = true
    )]
    pub client_secret_file: Option<PathBuf>,

    /// Personal access token, used when no client id and secret are set
    #[arg(
        long,
        env = "DATABRICKS_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        hide_default_value = true,
        global = true
    )]
    pub token: Option<SecretArg>,

    /// File holding the personal access token
    #[arg(
        value_parser = path_parser(),
        long,
        env = "DATABRICKS_TOKEN_FILE",
        value_name = "PATH",
        global = true
    )]
    pub token_file: Option<PathBuf>,

    /// Databricks config file with profiles (host, client_id, client_secret, token) [default: ~/.databrickscfg when HOME is set]
    #[arg(
        value_parser = path_parser(),
        long,
        env = "DATABRICKS_CONFIG_FILE",
        value_name = "PATH",
        global = true
    )]
    pub config_file: Option<PathBuf>,

    /// Profile of the Databricks config file to read
    #[arg(
        long,
        env = "DATABRICKS_CONFIG_PROFILE",
        value_name = "NAME",
        default_value = "DEFAULT",
        global = true
    )]
    pub profile: Option<String>,

    /// Unity Catalog catalog to read (Akto's dashboard suggests `main`)
    #[arg(
        long,
        env = "DATABRICKS_CATALOG",
        value_name = "NAME",
        default_value = "workspace",
        global = true
    )]
    pub catalog: Option<String>,

    /// Schema within the catalog
    #[arg(
        long,
        env = "DATABRICKS_SCHEMA",
        value_name = "NAME",
        default_value = "default",
        global = true
    )]
    pub schema: Option<String>,

    /// Only tables whose name starts with this prefix, e.g. production_ [default: empty = all]
    #[arg(long, env = "DATABRICKS_PREFIX", value_name = "PREFIX", global = true)]
    pub prefix: Option<String>,

    /// SQL warehouse id [default: pick one: running first, serverless preferred]
    #[arg(
        long,
        env = "DATABRICKS_WAREHOUSE_ID",
        value_name = "ID",
        global = true
    )]
    pub warehouse_id: Option<String>,
}

/// Where the connector sends records.
#[derive(Args, Debug, Default, Clone)]
#[command(next_help_heading = "Akto delivery")]
pub struct SinkArgs {
    /// http | kafka | file [default: http if DATA_INGESTION_SERVICE_URL is set, else kafka if KAFKA_BROKER_HOST is set]
    #[arg(long = "sink", env = "AKTO_SINK", value_name = "KIND", global = true)]
    pub kind: Option<String>,

    /// Akto Data Ingestion Service URL, e.g. http://akto-ingest:9000
    #[arg(
        long,
        env = "DATA_INGESTION_SERVICE_URL",
        value_name = "URL",
        global = true
    )]
    pub ingestion_url: Option<String>,

    /// JWT for the ingestion service (sent as the authorization header)
    #[arg(
        long,
        env = "AKTO_JWT_TOKEN",
        value_name = "JWT",
        hide_env_values = true,
        hide_default_value = true,
        global = true
    )]
    pub jwt: Option<SecretArg>,

    /// File holding the JWT for the ingestion service
    #[arg(value_parser = path_parser(), long, env = "AKTO_JWT_TOKEN_FILE", value_name = "PATH", global = true)]
    pub jwt_file: Option<PathBuf>,

    /// Extra CA certificates (PEM bundle) trusted for DATA_INGESTION_SERVICE_URL, besides the
    /// built-in Mozilla roots, e.g. a private CA's [default: DATABRICKS_CA_BUNDLE, else
    /// SSL_CERT_FILE: a TLS-inspecting proxy signs both]
    #[arg(value_parser = path_parser(), long, env = "AKTO_CA_BUNDLE", value_name = "PATH", global = true)]
    pub akto_ca_bundle: Option<PathBuf>,

    /// Timeout of one request to the ingestion service, in seconds (1-3600); a request gets one
    /// more second per 256 KiB of body, so a 10 MiB batch has time to upload on a slow link
    #[arg(
        long,
        env = "AKTO_REQUEST_TIMEOUT_SECONDS",
        value_name = "SECONDS",
        default_value = "30",
        global = true
    )]
    pub akto_request_timeout_seconds: Option<String>,

    /// The longest record sent to the ingestion service (and written by AKTO_SINK=file), in
    /// bytes of its JSON (65536-10485744): longer records have their payloads cut to fit, with a
    /// marker naming the original size. Akto's ingestion service answers 200 and then drops a
    /// record its Kafka producer finds over max.request.size (AKTO_KAFKA_MAX_REQUEST_SIZE,
    /// 5242880 by default); the default leaves 64 KiB of that for Akto's re-encoding. Set
    /// 1000000 for Akto releases whose ingestion producer keeps Kafka's 1 MB default (no
    /// AKTO_KAFKA_MAX_REQUEST_SIZE). Ignored with the Kafka sink (a WARN says so; see
    /// KAFKA_MAX_MESSAGE_BYTES)
    #[arg(
        long,
        env = "AKTO_MAX_RECORD_BYTES",
        value_name = "BYTES",
        default_value = "5177344",
        global = true
    )]
    pub akto_max_record_bytes: Option<String>,

    /// Kafka brokers, comma-separated host:port, e.g. your-kafka-broker:9092
    #[arg(
        long,
        env = "KAFKA_BROKER_HOST",
        value_name = "HOST:PORT,...",
        global = true
    )]
    pub kafka_brokers: Option<String>,

    /// Kafka topic Akto's traffic processor reads
    #[arg(
        long,
        env = "AKTO_KAFKA_TOPIC_NAME",
        value_name = "TOPIC",
        default_value = "akto.api.logs",
        global = true
    )]
    pub kafka_topic: Option<String>,

    /// PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL [default: PLAINTEXT]
    #[arg(
        long,
        env = "KAFKA_SECURITY_PROTOCOL",
        value_name = "PROTOCOL",
        global = true
    )]
    pub kafka_security_protocol: Option<String>,

    /// PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 (with a SASL_* protocol)
    #[arg(
        long,
        env = "KAFKA_SASL_MECHANISM",
        value_name = "MECHANISM",
        global = true
    )]
    pub kafka_sasl_mechanism: Option<String>,

    /// Kafka SASL user name
    #[arg(long, env = "KAFKA_SASL_USERNAME", value_name = "USER", global = true)]
    pub kafka_sasl_username: Option<String>,

    /// Kafka SASL password
    #[arg(
        long,
        env = "KAFKA_SASL_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true,
        hide_default_value = true,
        global = true
    )]
    pub kafka_sasl_password: Option<SecretArg>,

    /// File holding the Kafka SASL password (instead of KAFKA_SASL_PASSWORD)
    #[arg(
        value_parser = path_parser(),
        long,
        env = "KAFKA_SASL_PASSWORD_FILE",
        value_name = "PATH",
        global = true
    )]
    pub kafka_sasl_password_file: Option<PathBuf>,

    /// CA certificate (PEM) to verify the Kafka brokers (with SSL or SASL_SSL)
    #[arg(value_parser = path_parser(), long, env = "KAFKA_CA_FILE", value_name = "PATH", global = true)]
    pub kafka_ca_file: Option<PathBuf>,

    /// The topic's message size limit (65536-10485760): larger records have their payloads cut
    /// to fit, with a marker naming the original size [default: the topic's max.message.bytes,
    /// read from the broker; 1048588 (Kafka's default) when it does not say]
    #[arg(
        long,
        env = "KAFKA_MAX_MESSAGE_BYTES",
        value_name = "BYTES",
        global = true
    )]
    pub kafka_max_message_bytes: Option<String>,

    /// File for AKTO_SINK=file, as JSON lines [default: stdout]
    #[arg(value_parser = path_parser(), long, env = "OUTPUT_PATH", value_name = "PATH", global = true)]
    pub output_path: Option<PathBuf>,

    /// Akto account id written into every record (digits)
    #[arg(
        long,
        env = "AKTO_ACCOUNT_ID",
        value_name = "ID",
        default_value = "1000000",
        global = true
    )]
    pub akto_account_id: Option<String>,
}

/// Schedule, state, logging and tuning.
#[derive(Args, Debug, Default, Clone)]
#[command(next_help_heading = "Schedule and runtime")]
pub struct RuntimeArgs {
    /// Seconds between cycles in service mode (60 real time, 300 standard, 900 low frequency; at least 10)
    #[arg(
        long,
        env = "RECURRING_INTERVAL_SECONDS",
        value_name = "SECONDS",
        default_value = "300",
        global = true
    )]
    pub interval_seconds: Option<String>,

    /// How far back the first cycle reads, in minutes
    #[arg(
        long,
        env = "LOOKBACK_MINUTES",
        value_name = "MINUTES",
        default_value = "60",
        global = true
    )]
    pub lookback_minutes: Option<String>,

    /// After downtime, catch up at most this many hours
    #[arg(
        long,
        env = "MAX_CATCHUP_HOURS",
        value_name = "HOURS",
        default_value = "24",
        global = true
    )]
    pub max_catchup_hours: Option<String>,

    /// Folder for read positions and the quarantine file, one per workspace: a state another
    /// DATABRICKS_HOST has read with is refused. Unset: ./state/<workspace host> (a non-default
    /// port as _<port>; relative to the working directory), so that jobs of several workspaces
    /// started in one folder keep apart; a state an earlier release kept in ./state itself stays
    /// in use for its own workspace
    #[arg(
        value_parser = path_parser(),
        long,
        env = "STATE_DIR",
        value_name = "PATH",
        global = true
    )]
    pub state_dir: Option<PathBuf>,

    /// text | json (one JSON object per line)
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: Option<String>,

    /// Address for /healthz, /readyz, /metrics and the status page in service mode; "off" disables
    #[arg(
        long,
        env = "METRICS_ADDR",
        value_name = "IP:PORT",
        default_value = "127.0.0.1:9464",
        global = true
    )]
    pub metrics_addr: Option<String>,

    /// Tables read at the same time (1-32)
    #[arg(
        long,
        env = "TABLE_CONCURRENCY",
        value_name = "N",
        default_value = "4",
        global = true
    )]
    pub table_concurrency: Option<String>,

    /// Longest wait for one SQL statement, in seconds
    #[arg(
        long,
        env = "STATEMENT_TIMEOUT_SECONDS",
        value_name = "SECONDS",
        default_value = "120",
        global = true
    )]
    pub statement_timeout_seconds: Option<String>,

    /// Records per delivery batch (1-1000)
    #[arg(
        long,
        env = "BATCH_SIZE",
        value_name = "N",
        default_value = "50",
        global = true
    )]
    pub batch_size: Option<String>,

    /// With -once: stop cleanly after this many seconds (0: no limit), before Akto's job runner
    /// kills the binary at 300 s; what was delivered is checkpointed and the next run continues
    #[arg(
        long,
        env = "ONCE_TIME_LIMIT_SECONDS",
        value_name = "SECONDS",
        default_value = "270",
        global = true
    )]
    pub once_time_limit_seconds: Option<String>,

    /// Batches the sink confirms per state commit (1-100). Higher: less CPU and disk per record;
    /// a crash or SIGKILL may re-send up to this many batches (announced at the next start)
    #[arg(
        long,
        env = "CHECKPOINT_BATCHES",
        value_name = "N",
        default_value = "10",
        global = true
    )]
    pub checkpoint_batches: Option<String>,

    /// Mask sensitive data (emails, phones, cards, SSNs, IBANs, keys, tokens, passwords) in every
    /// payload and header before it leaves the process. Off: Akto's own detection needs raw data
    #[arg(
        long,
        env = "REDACT_SENSITIVE_DATA",
        value_name = "true|false",
        default_value = "false",
        global = true
    )]
    pub redact_sensitive_data: Option<String>,

    /// With redaction on, only these kinds (comma separated: email, phone, card, ssn, iban,
    /// aws_key, databricks_token, jwt, private_key, password; "secrets" = the secret kinds)
    #[arg(long, env = "REDACT_KINDS", value_name = "KINDS", global = true)]
    pub redact_kinds: Option<String>,
}

/// The subcommands.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Collect traffic and send it to Akto (the default)
    Run,
    /// Write synthetic demo traffic as JSON lines (no Databricks needed)
    Demo {
        /// File to write
        #[arg(long, default_value = "demo-traffic.jsonl")]
        output: PathBuf,
    },
    /// List the agents found in the catalog and schema (sends nothing)
    Discover {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Test every prerequisite in order and print the fix for each failure
    Check {
        /// Print JSON instead of a checklist
        #[arg(long)]
        json: bool,
    },
}

/// Rewrites Akto's single-dash `-once` (also `-once=true` / `-once=false`) to clap's `--once`.
///
/// The first item (the program name) and anything after `--` are left alone.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut after_double_dash = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || after_double_dash {
            out.push(arg);
            continue;
        }
        match arg.to_str() {
            Some("--") => {
                after_double_dash = true;
                out.push(arg);
            }
            Some("-once") | Some("-once=true") => out.push(OsString::from("--once")),
            Some("-once=false") => {}
            _ => out.push(arg),
        }
    }
    out
}

/// Parses `std::env::args_os()`: see [`parse_from`].
pub fn parse() -> Result<Cli, clap::Error> {
    parse_from(std::env::args_os())
}

/// Parses a command line against the process environment and the `--env-file` file.
///
/// Steps: [`normalize_args`]; find `--env-file`; read that file; every key of the file that names
/// a setting's environment variable and is not set (or empty) in the process environment
/// becomes that setting's default, so clap's own order gives flag > environment > file.
/// Problems with the file (missing, unreadable, malformed lines) are not returned here but kept
/// in [`Cli::env_file_problems`], so they are reported with every other configuration problem.
/// `Err` is clap's own: `--help`, `--version`, or an unknown flag (exit with `err.exit()`).
pub fn parse_from(args: impl IntoIterator<Item = OsString>) -> Result<Cli, clap::Error> {
    let args = normalize_args(args);
    let mut command = Cli::command();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut exports = EnvExports::default();
    if let Some(path) = find_env_file(&args) {
        match read_env_file(&path) {
            Ok((entries, file_problems)) => {
                problems.extend(file_problems);
                warnings = unknown_env_file_keys(&command, &entries, &path);
                exports = env_file_exports(&entries, |key| std::env::var_os(key));
                command = apply_env_file(command, &entries, |key| std::env::var_os(key));
            }
            Err(problem) => problems.push(problem),
        }
    }
    let env_file = find_env_file(&args);
    let matches = command.try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    cli.env_file_problems = problems;
    warnings.extend(settle_secret_pairs(&mut cli, &matches, env_file.as_deref()));
    warnings.extend(unused_sink_setting(&cli));
    warnings.extend(unused_record_limit(&cli));
    cli.env_file_warnings = warnings;
    cli.env_file_exports = exports;
    Ok(cli)
}

/// Where a setting's value came from, highest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// The `--env-file` (applied as the argument's default; secrets have no other default).
    EnvFile,
    Environment,
    CommandLine,
}

fn source_of(matches: &clap::ArgMatches, id: &str) -> Option<Source> {
    match matches.value_source(id)? {
        clap::parser::ValueSource::CommandLine => Some(Source::CommandLine),
        clap::parser::ValueSource::EnvVariable => Some(Source::Environment),
        _ => Some(Source::EnvFile),
    }
}

/// One secret setting given two ways: directly and as a file.
struct SecretPair {
    variable: &'static str,
    flag: &'static str,
    file_variable: &'static str,
    file_flag: &'static str,
}

/// A secret and its `_FILE` form are ONE setting for precedence (flag > environment >
/// `--env-file`): when they come from different sources, the lower one is dropped with a WARN
/// naming it and where it came from (never its value). From the same source both stay, and
/// configuration refuses them ("keep only one").
fn settle_secret_pairs(
    cli: &mut Cli,
    matches: &clap::ArgMatches,
    env_file: Option<&Path>,
) -> Vec<String> {
    let given_secret = |s: &Option<SecretArg>| {
        s.as_ref()
            .is_some_and(|s| crate::secret_file::secret_text(s.expose()).is_some())
    };
    let given_path = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| !p.as_os_str().is_empty());
    let d = &mut cli.databricks;
    let s = &mut cli.sink;
    let pairs: [(SecretPair, &mut Option<SecretArg>, &mut Option<PathBuf>); 4] = [
        (
            SecretPair {
                variable: "DATABRICKS_CLIENT_SECRET",
                flag: "--client-secret",
                file_variable: "DATABRICKS_CLIENT_SECRET_FILE",
                file_flag: "--client-secret-file",
            },
            &mut d.client_secret,
            &mut d.client_secret_file,
        ),
        (
            SecretPair {
                variable: "DATABRICKS_TOKEN",
                flag: "--token",
                file_variable: "DATABRICKS_TOKEN_FILE",
                file_flag: "--token-file",
            },
            &mut d.token,
            &mut d.token_file,
        ),
        (
            SecretPair {
                variable: "AKTO_JWT_TOKEN",
                flag: "--jwt",
                file_variable: "AKTO_JWT_TOKEN_FILE",
                file_flag: "--jwt-file",
            },
            &mut s.jwt,
            &mut s.jwt_file,
        ),
        (
            SecretPair {
                variable: "KAFKA_SASL_PASSWORD",
                flag: "--kafka-sasl-password",
                file_variable: "KAFKA_SASL_PASSWORD_FILE",
                file_flag: "--kafka-sasl-password-file",
            },
            &mut s.kafka_sasl_password,
            &mut s.kafka_sasl_password_file,
        ),
    ];
    let id = |flag: &str| flag.trim_start_matches("--").replace('-', "_");
    let described = |source: Source, variable: &str, flag: &str| match source {
        Source::CommandLine => format!("{flag} on the command line"),
        Source::Environment => format!("{variable} in the environment"),
        Source::EnvFile => match env_file {
            Some(path) => format!("{variable} in --env-file {}", path.display()),
            None => format!("{variable} in --env-file"),
        },
    };
    let mut warnings = Vec::new();
    for (names, direct, file) in pairs {
        if !given_secret(direct) || !given_path(file) {
            continue;
        }
        let (Some(direct_source), Some(file_source)) = (
            source_of(matches, &id(names.flag)),
            source_of(matches, &id(names.file_flag)),
        ) else {
            continue;
        };
        let direct_text = described(direct_source, names.variable, names.flag);
        let file_text = described(file_source, names.file_variable, names.file_flag);
        let (kept, dropped) = match direct_source.cmp(&file_source) {
            std::cmp::Ordering::Equal => continue,
            std::cmp::Ordering::Greater => {
                *file = None;
                (direct_text, file_text)
            }
            std::cmp::Ordering::Less => {
                *direct = None;
                (file_text, direct_text)
            }
        };
        warnings.push(format!(
            "{dropped} is ignored: {kept} sets the same secret and wins (command line > \
             environment > --env-file); remove the one you do not use"
        ));
    }
    warnings
}

/// A WARN when both sinks are configured and nothing says which to use: the ingestion service
/// wins (it publishes to Akto's Kafka topic itself, so a record is never sent both ways) and
/// `KAFKA_BROKER_HOST` is unused.
fn unused_sink_setting(cli: &Cli) -> Option<String> {
    let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
    let sends = !matches!(
        cli.command,
        Some(Command::Discover { .. }) | Some(Command::Demo { .. })
    );
    let output = cli
        .output
        .as_ref()
        .is_some_and(|p| !p.as_os_str().is_empty());
    (sends
        && !output
        && !set(&cli.sink.kind)
        && set(&cli.sink.ingestion_url)
        && set(&cli.sink.kafka_brokers))
    .then(|| {
        "both DATA_INGESTION_SERVICE_URL and KAFKA_BROKER_HOST are set: records go to the \
         ingestion service (which publishes them to Akto's Kafka topic itself) and \
         KAFKA_BROKER_HOST is ignored; set AKTO_SINK=kafka (--sink kafka) to send to Kafka \
         instead, or AKTO_SINK=http, or clear the one you do not use"
            .to_owned()
    })
}

/// A WARN when `AKTO_MAX_RECORD_BYTES` is set but records go to Kafka, where it does nothing
/// (the topic's own limit applies).
fn unused_record_limit(cli: &Cli) -> Option<String> {
    let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
    let kind = cli.sink.kind.as_deref().map(str::trim).unwrap_or_default();
    let output = cli
        .output
        .as_ref()
        .is_some_and(|p| !p.as_os_str().is_empty());
    let sends = !matches!(
        cli.command,
        Some(Command::Discover { .. }) | Some(Command::Demo { .. })
    );
    // `--output` (the file sink) wins over any other sink, and the limit applies to it.
    let kafka = sends
        && !output
        && (kind.eq_ignore_ascii_case("kafka")
            || (kind.is_empty() && !set(&cli.sink.ingestion_url) && set(&cli.sink.kafka_brokers)));
    // Its default is filled in by clap: only another value was set by the operator.
    let default = crate::sink::DEFAULT_AKTO_MAX_RECORD_BYTES.to_string();
    let changed = cli
        .sink
        .akto_max_record_bytes
        .as_deref()
        .is_some_and(|v| !v.trim().is_empty() && v.trim() != default);
    (kafka && changed).then(|| {
        "AKTO_MAX_RECORD_BYTES is ignored: records go to Kafka, where each record is cut to the \
         topic's max.message.bytes (or KAFKA_MAX_MESSAGE_BYTES); unset it, or set \
         KAFKA_MAX_MESSAGE_BYTES instead"
            .to_owned()
    })
}

/// The environment variable of every setting.
fn setting_variables(command: &clap::Command) -> Vec<String> {
    command
        .get_arguments()
        .filter_map(|a| a.get_env().and_then(OsStr::to_str).map(str::to_owned))
        .collect()
}

/// A WARN for each key of the env file that is no setting (nor a process variable the connector
/// uses), naming the closest setting when one is a likely typo. Never the value.
fn unknown_env_file_keys(
    command: &clap::Command,
    entries: &[(String, String)],
    path: &Path,
) -> Vec<String> {
    let known = setting_variables(command);
    let mut warned: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for (key, _) in entries {
        if known.iter().any(|k| k == key)
            || ENV_FILE_PROCESS_VARIABLES.contains(&key.as_str())
            || ENV_FILE_IGNORED_VARIABLES.contains(&key.as_str())
            || warned.contains(&key.as_str())
        {
            continue;
        }
        warned.push(key);
        let upper = key.to_ascii_uppercase();
        let closest = known
            .iter()
            .map(String::as_str)
            .chain(ENV_FILE_PROCESS_VARIABLES.iter().copied())
            .map(|k| (edit_distance(&upper, &k.to_ascii_uppercase()), k))
            .min_by_key(|(d, _)| *d)
            .filter(|(d, _)| *d <= 3 || upper.len() > 12 && *d <= 4);
        out.push(match closest {
            Some((_, name)) => format!(
                "--env-file {}: {key} is not a setting and is ignored: did you mean {name}?",
                path.display()
            ),
            None => format!(
                "--env-file {}: {key} is not a setting and is ignored (every setting: \
                 `databricks-shield --help`)",
                path.display()
            ),
        });
    }
    out
}

/// The env file's [`ENV_FILE_PROCESS_VARIABLES`] that the process environment does not set
/// (non-empty): the file is the lowest source, as for the settings. The last occurrence wins.
fn env_file_exports(
    entries: &[(String, String)],
    process_env: impl Fn(&str) -> Option<OsString>,
) -> EnvExports {
    let mut out: Vec<(String, String)> = Vec::new();
    for (key, value) in entries {
        if !ENV_FILE_PROCESS_VARIABLES.contains(&key.as_str()) || value.is_empty() {
            continue;
        }
        if process_env(key).is_some_and(|v| !v.is_empty()) {
            continue;
        }
        out.retain(|(k, _)| k != key);
        out.push((key.clone(), value.clone()));
    }
    EnvExports(out)
}

/// Levenshtein distance, for "did you mean" (short ASCII names: quadratic is fine).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The value of the last `--env-file PATH` / `--env-file=PATH` before any `--`.
fn find_env_file(args: &[OsString]) -> Option<PathBuf> {
    let mut found = None;
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let Some(text) = arg.to_str() else { continue };
        if text == "--" {
            break;
        }
        if text == "--env-file" {
            if let Some(value) = iter.next() {
                found = Some(PathBuf::from(value));
            }
        } else if let Some(value) = text.strip_prefix("--env-file=") {
            found = Some(PathBuf::from(value));
        }
    }
    found
}

/// Reads and parses an env file; `Err` when it cannot be read at all.
fn read_env_file(path: &Path) -> Result<(EnvEntries, Vec<Problem>), Problem> {
    let text = std::fs::read_to_string(path).map_err(|err| Problem {
        variable: "--env-file",
        message: format!(
            "--env-file {}: cannot read the file ({err}): check the path (relative paths start \
             at the working directory) and its permissions",
            path.display()
        ),
    })?;
    let (entries, errors) = parse_env_file(&text);
    let problems = errors
        .into_iter()
        .map(|err| Problem {
            variable: "--env-file",
            message: format!(
                "--env-file {} line {}: {}",
                path.display(),
                err.line,
                err.reason
            ),
        })
        .collect();
    Ok((entries, problems))
}

/// Makes the env file's values the defaults of the settings they name, unless the process
/// environment sets them (non-empty). `process_env` looks a variable up.
fn apply_env_file(
    command: clap::Command,
    entries: &[(String, String)],
    process_env: impl Fn(&str) -> Option<OsString>,
) -> clap::Command {
    command.mut_args(|arg| {
        let Some(name) = arg.get_env().and_then(OsStr::to_str).map(str::to_owned) else {
            return arg;
        };
        // The last occurrence in the file wins, as in a shell.
        let Some((_, value)) = entries.iter().rev().find(|(key, _)| *key == name) else {
            return arg;
        };
        if value.is_empty() {
            return arg;
        }
        let mut arg = arg;
        match process_env(&name) {
            Some(v) if !v.is_empty() => return arg,
            // Set but empty counts as unset: drop the env lookup so the file's value applies.
            Some(_) => arg = arg.env(None::<&str>),
            None => {}
        }
        // clap keeps defaults as `&'static str`; these few strings live for the whole process.
        let leaked: &'static str = Box::leak(value.clone().into_boxed_str());
        arg.default_value(leaked)
    })
}

/// `KEY=value` pairs of an env file, in file order.
pub type EnvEntries = Vec<(String, String)>;

/// A malformed line of an env file. Never holds the line's text, which may contain a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvFileError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong and how to fix it.
    pub reason: String,
}

/// Parses the `databricks-cron.env` format (a subset of docker compose's env files).
///
/// - `KEY=value`; blank lines and lines starting with `#` are ignored; `export KEY=value` is
///   accepted; keys are `[A-Za-z_][A-Za-z0-9_]*`.
/// - Unquoted values are trimmed and end at ` #` (whitespace then `#`): `a=b # note` gives `b`,
///   `a=b#c` gives `b#c`.
/// - `"double"` quotes understand `\"`, `\\`, `\n`, `\t`; `'single'` quotes are literal. After
///   the closing quote only whitespace or a `# comment` may follow.
/// - `KEY=` (empty) is returned as an empty value, which callers treat as unset.
///
/// Returns the entries in file order and the malformed lines (which are skipped).
pub fn parse_env_file(text: &str) -> (EnvEntries, Vec<EnvFileError>) {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = match line.strip_prefix("export") {
            Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
            _ => line,
        };
        let Some((key, value)) = line.split_once('=') else {
            errors.push(EnvFileError {
                line: line_no,
                reason: "expected KEY=value (or a # comment)".to_owned(),
            });
            continue;
        };
        let key = key.trim();
        if !is_env_key(key) {
            errors.push(EnvFileError {
                line: line_no,
                reason: "the name before '=' must be letters, digits and '_', not starting with \
                         a digit"
                    .to_owned(),
            });
            continue;
        }
        match parse_env_value(value.trim_start()) {
            Ok(value) => entries.push((key.to_owned(), value)),
            Err(reason) => errors.push(EnvFileError {
                line: line_no,
                reason: format!("{key}: {reason}"),
            }),
        }
    }
    (entries, errors)
}

fn is_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One value (already trimmed at the start). Errors never quote the value.
fn parse_env_value(value: &str) -> Result<String, String> {
    let mut chars = value.char_indices();
    let quote = match value.chars().next() {
        Some(q @ ('"' | '\'')) => q,
        _ => {
            // Unquoted: a comment starts at whitespace followed by '#'.
            let mut end = value.len();
            let bytes = value.as_bytes();
            for i in 1..bytes.len() {
                if bytes[i] == b'#' && (bytes[i - 1] == b' ' || bytes[i - 1] == b'\t') {
                    end = i;
                    break;
                }
            }
            return Ok(value[..end].trim_end().to_owned());
        }
    };
    chars.next();
    let mut out = String::new();
    let mut closed_at = None;
    while let Some((i, c)) = chars.next() {
        if c == quote {
            closed_at = Some(i + c.len_utf8());
            break;
        }
        if c == '\\' && quote == '"' {
            match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                Some((_, 'r')) => out.push('\r'),
                Some((_, other)) => out.push(other),
                None => break,
            }
        } else {
            out.push(c);
        }
    }
    let Some(end) = closed_at else {
        return Err(format!(
            "the value opens a {quote} quote that is never closed on the same line: close it"
        ));
    };
    let rest = value[end..].trim();
    if !rest.is_empty() && !rest.starts_with('#') {
        return Err(format!(
            "unexpected text after the closing {quote} quote: put the whole value inside the \
             quotes, or use ' # ' before a comment"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn single_dash_once_becomes_long_flag_anywhere() {
        assert_eq!(
            normalize_args(os(&["bin", "-once"])),
            os(&["bin", "--once"])
        );
        assert_eq!(
            normalize_args(os(&["bin", "--catalog", "main", "-once", "check"])),
            os(&["bin", "--catalog", "main", "--once", "check"])
        );
        assert_eq!(
            normalize_args(os(&["bin", "-once=true", "-once=false"])),
            os(&["bin", "--once"])
        );
        // The program name and anything after `--` are untouched; look-alikes are untouched.
        assert_eq!(
            normalize_args(os(&["-once", "--", "-once"])),
            os(&["-once", "--", "-once"])
        );
        assert_eq!(
            normalize_args(os(&["bin", "-oncex", "--once"])),
            os(&["bin", "-oncex", "--once"])
        );
    }

    #[test]
    fn once_parses_with_one_or_two_dashes() {
        let cli = parse_from(os(&["databricks-shield", "-once"])).expect("parses");
        assert!(cli.once);
        assert_eq!(cli.command, None);
        let cli = parse_from(os(&["databricks-shield", "run", "--once"])).expect("parses");
        assert!(cli.once);
        assert_eq!(cli.command, Some(Command::Run));
        let cli = parse_from(os(&["databricks-shield"])).expect("parses");
        assert!(!cli.once);
        // Without normalisation clap rejects `-once` (it is not four known short flags).
        assert!(Cli::try_parse_from(["databricks-shield", "-once"]).is_err());
    }

    #[test]
    fn subcommands_and_global_settings_parse() {
        let cli = parse_from(os(&[
            "databricks-shield",
            "check",
            "--json",
            "--catalog",
            "main",
            "--reset-state",
        ]))
        .expect("parses");
        assert_eq!(cli.command, Some(Command::Check { json: true }));
        assert_eq!(cli.databricks.catalog.as_deref(), Some("main"));
        assert!(cli.reset_state);

        let cli = parse_from(os(&["databricks-shield", "--schema", "s1", "discover"])).unwrap();
        assert_eq!(cli.command, Some(Command::Discover { json: false }));
        assert_eq!(cli.databricks.schema.as_deref(), Some("s1"));

        let cli = parse_from(os(&["databricks-shield", "demo"])).unwrap();
        assert_eq!(
            cli.command,
            Some(Command::Demo {
                output: PathBuf::from("demo-traffic.jsonl")
            })
        );
        let cli = parse_from(os(&[
            "databricks-shield",
            "--output",
            "-",
            "--print-config",
        ]))
        .unwrap();
        assert_eq!(cli.output, Some(PathBuf::from("-")));
        assert!(cli.print_config);
    }

    /// Every environment variable the connector reads.
    pub(crate) const ALL_VARIABLES: [&str; 33] = [
        "DATABRICKS_HOST",
        "DATABRICKS_CLIENT_ID",
        "DATABRICKS_CLIENT_SECRET",
        "DATABRICKS_CLIENT_SECRET_FILE",
        "DATABRICKS_TOKEN",
        "DATABRICKS_TOKEN_FILE",
        "DATABRICKS_CONFIG_FILE",
        "DATABRICKS_CONFIG_PROFILE",
        "DATABRICKS_CATALOG",
        "DATABRICKS_SCHEMA",
        "DATABRICKS_PREFIX",
        "DATABRICKS_WAREHOUSE_ID",
        "AKTO_SINK",
        "DATA_INGESTION_SERVICE_URL",
        "AKTO_JWT_TOKEN",
        "AKTO_JWT_TOKEN_FILE",
        "AKTO_MAX_RECORD_BYTES",
        "KAFKA_BROKER_HOST",
        "AKTO_KAFKA_TOPIC_NAME",
        "KAFKA_SECURITY_PROTOCOL",
        "KAFKA_SASL_MECHANISM",
        "KAFKA_SASL_USERNAME",
        "KAFKA_SASL_PASSWORD",
        "KAFKA_CA_FILE",
        "KAFKA_MAX_MESSAGE_BYTES",
        "OUTPUT_PATH",
        "AKTO_ACCOUNT_ID",
        "RECURRING_INTERVAL_SECONDS",
        "LOOKBACK_MINUTES",
        "MAX_CATCHUP_HOURS",
        "STATE_DIR",
        "LOG_FORMAT",
        "METRICS_ADDR",
    ];

    #[test]
    fn help_lists_every_variable_and_default() {
        let help = Cli::command().render_long_help().to_string();
        if std::env::var_os("SHOW_HELP").is_some() {
            println!("{help}");
        }
        for name in ALL_VARIABLES.iter().chain(
            [
                "TABLE_CONCURRENCY",
                "STATEMENT_TIMEOUT_SECONDS",
                "BATCH_SIZE",
                "CHECKPOINT_BATCHES",
                "ONCE_TIME_LIMIT_SECONDS",
                "REDACT_SENSITIVE_DATA",
                "REDACT_KINDS",
                "DATABRICKS_CA_BUNDLE",
            ]
            .iter(),
        ) {
            assert!(
                help.contains(&format!("[env: {name}")),
                "{name} missing from --help"
            );
        }
        // STATE_DIR has no fixed default: unset, each workspace's folder under ./state.
        assert!(
            help.contains("Unset: ./state/<workspace host>"),
            "STATE_DIR's default missing from --help"
        );
        for default in [
            "[default: workspace]",
            "[default: default]",
            "[default: 300]",
            "[default: 60]",
            "[default: 24]",
            "[default: text]",
            "[default: 127.0.0.1:9464]",
            "[default: 1000000]",
            "[default: akto.api.logs]",
            "[default: 4]",
            "[default: 120]",
            "[default: 50]",
            "[default: 5177344]",
        ] {
            assert!(help.contains(default), "{default} missing from --help");
        }
        assert!(help.contains("databricks-shield check") && help.contains("README"));
        assert!(help.contains("--print-config") && help.contains("-once"));
    }

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn debug_of_cli_redacts_secrets() {
        let cli = parse_from(os(&[
            "databricks-shield",
            "--client-secret",
            "s3cr3t-value",
            "--token",
            "dapi-tok-value",
            "--jwt",
            "jwt-value",
            "--kafka-sasl-password",
            "kafka-pw-value",
        ]))
        .expect("parses");
        let debug = format!("{cli:?}");
        for secret in [
            "s3cr3t-value",
            "dapi-tok-value",
            "jwt-value",
            "kafka-pw-value",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked in {debug}");
        }
        assert!(debug.contains("[REDACTED]"));
        assert_eq!(
            cli.databricks.client_secret.as_ref().map(SecretArg::expose),
            Some("s3cr3t-value")
        );
    }

    #[test]
    fn env_file_format() {
        let text = "\u{feff}# comment line\n\
            \n\
            DATABRICKS_HOST=https://x.cloud.databricks.com\n\
            DATABRICKS_PREFIX=\n\
            RECURRING_INTERVAL_SECONDS=300 # five minutes\n\
            export DATABRICKS_CATALOG=main\n\
            DATABRICKS_CLIENT_SECRET=ab#cd\n\
            DATABRICKS_SCHEMA = \"my schema\" # quoted\n\
            AKTO_JWT_TOKEN='a\"b # not a comment'\n\
            ESCAPED=\"q\\\"x\\\\y\"\r\n\
            exported=1\n";
        let (entries, errors) = parse_env_file(text);
        assert!(errors.is_empty(), "{errors:?}");
        let expected = [
            ("DATABRICKS_HOST", "https://x.cloud.databricks.com"),
            ("DATABRICKS_PREFIX", ""),
            ("RECURRING_INTERVAL_SECONDS", "300"),
            ("DATABRICKS_CATALOG", "main"),
            ("DATABRICKS_CLIENT_SECRET", "ab#cd"),
            ("DATABRICKS_SCHEMA", "my schema"),
            ("AKTO_JWT_TOKEN", "a\"b # not a comment"),
            ("ESCAPED", "q\"x\\y"),
            ("exported", "1"),
        ];
        let got: Vec<(&str, &str)> = entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn env_file_errors_name_the_line_but_not_the_value() {
        let text =
            "GOOD=1\nthis line has no equals sign\n1BAD=x\nOPEN=\"s3cr3t\nAFTER=\"a\" b\nLAST=2\n";
        let (entries, errors) = parse_env_file(text);
        assert_eq!(
            entries,
            vec![
                ("GOOD".to_owned(), "1".to_owned()),
                ("LAST".to_owned(), "2".to_owned())
            ]
        );
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5]);
        for e in &errors {
            assert!(!e.reason.contains("s3cr3t"), "{e:?}");
        }
    }

    #[test]
    fn env_file_values_become_lowest_precedence_defaults() {
        let entries = vec![
            (
                "DATABRICKS_HOST".to_owned(),
                "https://file.example.com".to_owned(),
            ),
            ("DATABRICKS_CATALOG".to_owned(), "file_catalog".to_owned()),
            ("DATABRICKS_SCHEMA".to_owned(), "file_schema".to_owned()),
            ("DATABRICKS_PREFIX".to_owned(), "file_".to_owned()),
            ("DATABRICKS_WAREHOUSE_ID".to_owned(), String::new()),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        // Pretend the process environment sets the schema, and the prefix to empty.
        let fake_env = |key: &str| match key {
            "DATABRICKS_SCHEMA" => Some(OsString::from("env_schema")),
            "DATABRICKS_PREFIX" => Some(OsString::new()),
            _ => None,
        };
        let command = apply_env_file(Cli::command(), &entries, fake_env);
        let matches = command
            .try_get_matches_from(["databricks-shield", "--catalog", "flag_catalog"])
            .expect("parses");
        let cli = Cli::from_arg_matches(&matches).expect("builds");
        assert_eq!(cli.databricks.catalog.as_deref(), Some("flag_catalog"));
        assert_eq!(cli.databricks.prefix.as_deref(), Some("file_"));
        assert_eq!(
            cli.databricks.host.as_deref(),
            Some("https://file.example.com")
        );
        // A variable set in the process environment is never replaced by the file's value.
        assert_ne!(cli.databricks.schema.as_deref(), Some("file_schema"));
        assert_eq!(cli.databricks.warehouse_id, None);
    }

    proptest::proptest! {
        #[test]
        fn env_file_parser_never_panics(text in "\\PC*(\n\\PC*){0,5}") {
            let (entries, errors) = parse_env_file(&text);
            proptest::prop_assert!(entries.len() + errors.len() <= text.lines().count());
        }

        #[test]
        fn env_file_values_round_trip(
            key in "[A-Za-z_][A-Za-z0-9_]{0,20}",
            value in "[^\\s\"'#][^\n\r#]{0,30}[^\\s#]",
            raw in "[^\n\r]{0,40}",
        ) {
            // Unquoted: the value as written, then a comment.
            let (entries, errors) = parse_env_file(&format!("{key}={value} # note\n"));
            proptest::prop_assert!(errors.is_empty());
            proptest::prop_assert_eq!(entries, vec![(key.clone(), value.clone())]);
            // Double-quoted with escapes: any one-line text survives.
            let escaped = raw.replace('\\', "\\\\").replace('"', "\\\"");
            let (entries, errors) = parse_env_file(&format!("export {key}=\"{escaped}\"\n"));
            proptest::prop_assert!(errors.is_empty());
            proptest::prop_assert_eq!(entries, vec![(key, raw)]);
        }
    }

    #[test]
    fn every_path_setting_accepts_an_empty_value() {
        // As docker's env_file gives `STATE_DIR=`: an empty value, later treated as unset.
        let cmd = Cli::command();
        let paths: Vec<String> = cmd
            .get_arguments()
            .filter(|a| a.get_value_names() == Some(&["PATH".into()][..]))
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(paths.len() >= 10, "{paths:?}");
        for id in &paths {
            let flag = format!("--{}", id.replace('_', "-"));
            let cli = Cli::try_parse_from(["databricks-shield", flag.as_str(), ""])
                .unwrap_or_else(|e| panic!("{flag} \"\": {e}"));
            let value = match id.as_str() {
                "state_dir" => cli.runtime.state_dir.clone(),
                "ca_bundle" => cli.databricks.ca_bundle.clone(),
                "output_path" => cli.sink.output_path.clone(),
                _ => Some(PathBuf::new()),
            };
            assert_eq!(value, Some(PathBuf::new()), "{flag}");
        }
    }

    #[test]
    fn env_file_unknown_keys_are_named_with_the_closest_setting() {
        let entries: Vec<(String, String)> = [
            ("DATABRICKS_CATLOG", "main"),
            ("DATABRICKS_HOST", "https://x"),
            ("HTTPS_PROXY", "http://user:PROXYPW@127.0.0.1:3128"),
            ("AKTO_JOB_ID", "1"),
            ("TOTALLY_UNRELATED_THING", "SECRETVALUE"),
            ("DATABRICKS_CATLOG", "again"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let warnings =
            unknown_env_file_keys(&Cli::command(), &entries, Path::new("databricks-cron.env"));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("DATABRICKS_CATLOG")
                && warnings[0].contains("did you mean DATABRICKS_CATALOG?"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].contains("TOTALLY_UNRELATED_THING") && !warnings[1].contains("did you"),
            "{warnings:?}"
        );
        for w in &warnings {
            assert!(!w.contains("SECRETVALUE") && !w.contains("main"), "{w}");
        }
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn env_file_process_variables_are_exported_below_the_environment() {
        let entries: Vec<(String, String)> = [
            ("HTTPS_PROXY", "http://user:PROXYPW@127.0.0.1:3128"),
            ("NO_PROXY", "127.0.0.1"),
            ("RUST_LOG", "debug"),
            ("RUST_LOG", "info"),
            ("SSL_CERT_FILE", ""),
            ("DATABRICKS_HOST", "https://x"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // The process environment sets NO_PROXY already: it wins.
        let exports = env_file_exports(&entries, |k| {
            (k == "NO_PROXY").then(|| OsString::from("localhost"))
        });
        assert_eq!(
            exports.0,
            vec![
                (
                    "HTTPS_PROXY".to_owned(),
                    "http://user:PROXYPW@127.0.0.1:3128".to_owned()
                ),
                ("RUST_LOG".to_owned(), "info".to_owned()),
            ]
        );
        let debug = format!("{exports:?}");
        assert!(
            !debug.contains("PROXYPW") && debug.contains("HTTPS_PROXY"),
            "{debug}"
        );
    }

    #[test]
    fn env_file_scan_finds_both_spellings() {
        assert_eq!(
            find_env_file(&os(&["bin", "--env-file", "a.env", "check"])),
            Some(PathBuf::from("a.env"))
        );
        assert_eq!(
            find_env_file(&os(&["bin", "check", "--env-file=b.env"])),
            Some(PathBuf::from("b.env"))
        );
        assert_eq!(find_env_file(&os(&["bin", "--", "--env-file=c.env"])), None);
        assert_eq!(find_env_file(&os(&["bin", "--env-file"])), None);
    }

    #[test]
    fn missing_env_file_is_a_problem_naming_the_path() {
        let cli = parse_from(os(&[
            "databricks-shield",
            "--env-file",
            "/nonexistent/dir/databricks-cron.env",
        ]))
        .expect("parses");
        assert_eq!(cli.env_file_problems.len(), 1);
        assert!(cli.env_file_problems[0]
            .message
            .contains("/nonexistent/dir/databricks-cron.env"));
    }
}
