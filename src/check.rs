//! `databricks-shield check`: every prerequisite in order, one line each with the evidence, and
//! the fix for a failure. It reads and sends nothing but probes (a `LIMIT 0` query per table, the
//! sink's health check).

use hyper_util::client::proxy::matcher::Matcher;
use serde::Serialize;

use crate::collect::quote_table;
use crate::config::Config;
use crate::databricks::sql::Statement;
use crate::databricks::DatabricksError;
use crate::discovery;

/// One line of the checklist.
#[derive(Debug, Serialize)]
pub struct Step {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// Passed with a limitation a run lives with too (it logs the same `WARN`): `[WARN]`, and
    /// `check` still exits 0.
    pub warning: bool,
}

/// The lines gathered so far.
struct Checklist {
    steps: Vec<Step>,
}

impl Checklist {
    /// Adds a passed or failed line; returns whether it passed.
    fn push(&mut self, name: &str, r: Result<String, String>) -> bool {
        let ok = r.is_ok();
        self.steps.push(Step {
            name: name.into(),
            ok,
            detail: r.unwrap_or_else(|e| e),
            warning: false,
        });
        ok
    }

    /// Adds a passed line with a warning (`[WARN]`).
    fn warn(&mut self, name: &str, detail: String) {
        self.steps.push(Step {
            name: name.into(),
            ok: true,
            detail,
            warning: true,
        });
    }
}

/// Runs the checks; stops at the first failure that makes later ones meaningless.
pub async fn run(config: &Config) -> Vec<Step> {
    let mut list = Checklist {
        steps: vec![Step {
            name: "configuration".into(),
            ok: true,
            detail: config.summary(),
            warning: false,
        }],
    };
    // Reachability, each layer named: DNS, then TCP, then TLS (https hosts). Through a proxy
    // (HTTPS_PROXY / HTTP_PROXY / ALL_PROXY, unless NO_PROXY exempts the host), the connection
    // this host makes is to the proxy, which resolves and reaches the workspace itself: DNS and
    // TCP test the proxy then, and TLS the whole path.
    let host = lookup_name(&config.host);
    let port = config.host.port_or_known_default().unwrap_or(443);
    let proxy_variable = if config.host.scheme() == "https" {
        "HTTPS_PROXY"
    } else {
        "HTTP_PROXY"
    };
    let proxy = proxy_for(&config.host, &Matcher::from_system());
    let (target, target_port, via) = match &proxy {
        Some((name, proxy_port)) => (
            name.clone(),
            *proxy_port,
            format!(" (the proxy of {proxy_variable} or ALL_PROXY, which reaches {host})"),
        ),
        None => (host.clone(), port, String::new()),
    };
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::net::lookup_host((target.as_str(), target_port)).await {
            Ok(a) => a.collect(),
            Err(e) => {
                let fix = match &proxy {
                    Some(_) => {
                        format!("check {proxy_variable} (or ALL_PROXY) and this machine's DNS")
                    }
                    None => "check DATABRICKS_HOST (https://<workspace>.cloud.databricks.com) and \
                             this machine's DNS"
                        .to_string(),
                };
                list.push(
                    "DNS",
                    Err(format!(
                        "Failed to connect to Databricks workspace: {target}{via} does not \
                         resolve ({e}). Fix: {fix}"
                    )),
                );
                return list.steps;
            }
        };
    if addrs.is_empty() {
        list.push("DNS", Err(format!("{target}{via} resolves to no address")));
        return list.steps;
    }
    let listed: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    list.push(
        "DNS",
        Ok(format!("{target}{via} resolves to {}", listed.join(", "))),
    );
    // Every address in turn, as the client does, until one accepts.
    let mut failures = Vec::new();
    let mut accepted = None;
    for addr in &addrs {
        match tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(_)) => {
                accepted = Some(*addr);
                break;
            }
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => failures.push(format!("{addr}: timed out after 10s")),
        }
    }
    let tcp_ok = match accepted {
        Some(addr) => Ok(format!("TCP connection to {addr}{via} accepted")),
        None => Err(format!(
            "Failed to connect to Databricks workspace: TCP connection to {target}{via} failed \
             ({}). Fix: check firewalls, network routes (private link, VPN), proxies and that {} \
             is right",
            failures.join("; "),
            match &proxy {
                Some(_) => proxy_variable,
                None => "DATABRICKS_HOST",
            }
        )),
    };
    if !list.push("TCP", tcp_ok) {
        return list.steps;
    }
    // The real client, built once: the TLS probe goes through it so that it trusts exactly what
    // every later request trusts (the built-in Mozilla roots of webpki-roots, never the system
    // store, plus DATABRICKS_CA_BUNDLE, else SSL_CERT_FILE) and takes the same proxy.
    let client = match crate::app::client(config) {
        Ok(c) => c,
        Err(e) => {
            list.push("databricks client", Err(e.to_string()));
            return list.steps;
        }
    };
    if config.host.scheme() == "https" {
        let probe = client.api.http.get(config.host.as_str()).send();
        let result = match tokio::time::timeout(std::time::Duration::from_secs(15), probe).await {
            Ok(Ok(r)) => Ok(format!(
                "TLS handshake with {host} verified (HTTP {}{})",
                r.status().as_u16(),
                match &config.ca_bundle {
                    Some(path) => format!("; also trusting the CA bundle {}", path.display()),
                    None => String::new(),
                }
            )),
            Ok(Err(e)) => {
                let chain = error_chain(&e);
                let fix = if chain.to_lowercase().contains("tunnel") {
                    proxy_tunnel_fix(proxy_variable)
                } else {
                    tls_fix(config.ca_bundle.as_deref())
                };
                Err(format!(
                    "Failed to connect to Databricks workspace: TLS with {host} failed \
                     ({chain}). Fix: {fix}"
                ))
            }
            Err(_) => Err(format!(
                "Failed to connect to Databricks workspace: no TLS response from {host} within \
                 15s. Fix: check that DATABRICKS_HOST is the workspace's HTTPS address and, \
                 behind a proxy, HTTPS_PROXY / NO_PROXY"
            )),
        };
        if !list.push("TLS", result) {
            return list.steps;
        }
    }
    if !list.push("authentication", authentication(&client, config).await) {
        return list.steps;
    }
    // Each API on its own line, so a missing grant names the right one.
    let listed = client.list_tables(&config.catalog, &config.schema).await;
    if !list.push(
        "catalog and schema access",
        listed
            .map(|t| {
                format!(
                    "{}.{}: {} tables visible",
                    config.catalog,
                    config.schema,
                    t.len()
                )
            })
            .map_err(|e| e.to_string()),
    ) {
        return list.steps;
    }
    // A refused listing is a warning, as in a run (discovery goes on without it): only an
    // outage or a refused login stops here.
    match serving_endpoints_step(client.list_serving_endpoints().await) {
        EndpointsStep::Listed(detail) => {
            list.push("serving endpoints", Ok(detail));
        }
        EndpointsStep::Warning(detail) => list.warn("serving endpoints", detail),
        EndpointsStep::Stop(detail) => {
            list.push("serving endpoints", Err(detail));
            return list.steps;
        }
    }
    let inv =
        match discovery::discover(&client, &config.catalog, &config.schema, &config.prefix).await {
            Ok(inv) => inv,
            Err(e) => {
                list.push("agent discovery", Err(e.to_string()));
                return list.steps;
            }
        };
    let tables: Vec<_> = inv.readable().map(|(_, t)| t.clone()).collect();
    let workspace_host = config.host.host_str().unwrap_or("databricks");
    let trace_sources = crate::traces::trace_sources(&inv, workspace_host).len();
    list.push(
        "inference tables",
        sources_step(
            &inv,
            (&config.prefix, &client.principal()),
            tables.len(),
            trace_sources,
        ),
    );
    let warehouse = match client
        .choose_warehouse(config.warehouse_id.as_deref())
        .await
    {
        Ok((w, why)) => {
            let state = w.state.clone().unwrap_or_else(|| "UNKNOWN".into());
            let note = if state == "RUNNING" {
                String::new()
            } else {
                format!(
                    "; it is {state}: the first query starts it (a cold start can take minutes; \
                     keep STATEMENT_TIMEOUT_SECONDS above it, or use a serverless warehouse)"
                )
            };
            list.push("SQL warehouse", Ok(format!("{} ({why}){note}", w.id)));
            Some(w.id)
        }
        Err(e) => {
            list.push("SQL warehouse", Err(e.to_string()));
            None
        }
    };
    if let Some(wh) = warehouse {
        for t in &tables {
            let st = Statement {
                warehouse_id: wh.clone(),
                statement: format!("SELECT * FROM {} LIMIT 0", quote_table(&t.full_name)),
                parameters: Vec::new(),
                table: t.full_name.clone(),
                timeout: config.statement_timeout,
            };
            let started = std::time::Instant::now();
            let result = client.execute(&st).await.map(|_| {
                let took = started.elapsed();
                if took * 2 > config.statement_timeout {
                    format!(
                        "readable, but an empty query took {:.1}s of the {}s STATEMENT_TIMEOUT_SECONDS: \
                         use a larger or running warehouse, a longer interval, or a narrower prefix",
                        took.as_secs_f64(),
                        config.statement_timeout.as_secs()
                    )
                } else {
                    format!("readable ({} ms)", took.as_millis())
                }
            });
            list.push(
                &format!("SELECT on {}", t.full_name),
                result.map_err(|e| e.to_string()),
            );
        }
    }
    // Tables an agent endpoint logs to that Unity Catalog did not list: it lists only the tables
    // the principal may read, so a missing SELECT shows as a table that is not there.
    for (endpoint, t) in &inv.unseen_tables {
        list.push(
            &format!("SELECT on {t}"),
            Err(format!(
                "endpoint {endpoint} logs to {t}, but Unity Catalog does not list it to the \
                 service principal: it lists only the tables it may read (or the table was not \
                 created yet). Fix: `GRANT SELECT ON TABLE {} TO {};` (or SELECT on its schema)",
                crate::databricks::error::quote_name(t),
                crate::databricks::error::quote_ident(&client.principal())
            )),
        );
    }
    // Unity Catalog lists only the models and functions the principal may EXECUTE: served UC
    // models of the schema missing from the listing mean no EXECUTE (a run logs the same WARN).
    if !inv.unlisted_models.is_empty() {
        list.warn(
            &format!("EXECUTE on {}.{}", inv.catalog, inv.schema),
            discovery::unlisted_models_warning(&inv, &client.principal()),
        );
    }
    // Runs that logged an agent's model whose experiment the principal may not read.
    for r in &inv.unreadable_runs {
        list.warn(
            &format!("CAN READ on the experiment of run {}", r.run_id),
            r.describe(&client.principal()),
        );
    }
    // The state directory: writable, and not held by another instance or another workspace. An
    // older state format is reported, not upgraded: `check` changes nothing.
    // Tables this state delivered from that Unity Catalog no longer lists.
    let mut vanished = Vec::new();
    let since =
        chrono::Utc::now().timestamp_micros() - crate::run::VANISHED_WITHIN.as_micros() as i64;
    let state = match crate::app::state_dir(config) {
        Err(crate::state::StateError::Locked(dir)) => Ok(in_use(&dir)),
        Err(e) => Err(e.to_string()),
        Ok(dir) if !dir.join(crate::state::FILE_NAME).exists() => {
            // No state yet: nothing is created (not the folder, not the file), only the place
            // the first run creates them in is tested.
            state_dir_writable(&dir)
        }
        Ok(dir) => match crate::state::StateStore::open_unchanged(&dir) {
            Ok((store, older)) => match store.serves_workspace(&config.workspace_identity()) {
                // Another workspace's state: the run refuses it (its rows would look delivered).
                Err(e @ crate::state::StateError::OtherWorkspace { .. }) if !config.reset_state => {
                    Err(e.to_string())
                }
                Err(crate::state::StateError::OtherWorkspace { recorded, .. }) => Ok(format!(
                    "{} holds the state of the workspace {recorded}: --reset-state moves it \
                     aside at the next run",
                    dir.display()
                )),
                Err(e) => Err(e.to_string()),
                Ok(_) => match older {
                    None => {
                        vanished = store
                            .cursors()
                            .map_or_else(|_| Vec::new(), |c| inv.vanished(&c, since));
                        Ok(format!("{} is usable", dir.display()))
                    }
                    Some(old) => Ok(format!(
                        "{} is usable (state format {old}: the next run upgrades it, after which \
                         older releases refuse it)",
                        dir.display()
                    )),
                },
            },
            Err(crate::state::StateError::Locked(dir)) => Ok(in_use(&dir)),
            Err(e) => Err(e.to_string()),
        },
    };
    list.push("state directory", state);
    // An agent endpoint's table is named above already (`SELECT on <table>`).
    let named: Vec<String> = inv
        .unseen_tables
        .values()
        .map(|t| t.to_ascii_lowercase())
        .collect();
    vanished.retain(|(t, _)| !named.contains(&t.to_ascii_lowercase()));
    for (table, last_us) in vanished {
        let last = chrono::DateTime::from_timestamp_micros(last_us)
            .map_or_else(|| last_us.to_string(), |t| t.to_rfc3339());
        list.warn(
            &format!("{table} no longer listed"),
            format!(
                "rows of {table} were delivered until {last}, but Unity Catalog no longer lists \
                 it: it was dropped or renamed, or the service principal lost SELECT on it. If it \
                 still exists: `GRANT SELECT ON TABLE {} TO {};` (or SELECT on its schema)",
                crate::databricks::error::quote_name(&table),
                crate::databricks::error::quote_ident(&client.principal())
            ),
        );
    }
    match config
        .sink
        .as_ref()
        .map(|s| crate::app::sink(s, config.akto_ca_bundle_with_setting()))
    {
        Some(Ok(sink)) => {
            let checked = sink.healthcheck().await.map(|_| {
                // After the health check: a Kafka topic's own message limit is known then.
                format!(
                    "{}; records up to {} bytes each (larger ones have their payloads cut)",
                    sink.describe(),
                    sink.max_record_bytes()
                )
            });
            let reachable = list.push("sink reachable", checked.map_err(|e| e.to_string()));
            if let (true, crate::sink::AnySink::Http(http)) = (reachable, &sink) {
                list.push("sink token", sink_token(http).await);
            }
        }
        Some(Err(e)) => {
            list.push("sink reachable", Err(e.to_string()));
        }
        None => {
            list.push("sink reachable", Err("no sink configured".into()));
        }
    }
    list.steps
}

/// What the `serving endpoints` line says, and whether `check` goes on.
#[derive(Debug, PartialEq, Eq)]
enum EndpointsStep {
    Listed(String),
    /// Refused for good (no grant, no such API): a run logs a WARN and finds its agents from
    /// the inference tables and apps, so the later lines still matter.
    Warning(String),
    /// The workspace failed or refused the login: nothing later can pass.
    Stop(String),
}

/// The `serving endpoints` line from the listing's answer, with the rule discovery applies.
fn serving_endpoints_step(
    listed: Result<Vec<crate::databricks::serving::ServingEndpoint>, DatabricksError>,
) -> EndpointsStep {
    match listed {
        Ok(e) => EndpointsStep::Listed(format!("{} serving endpoints readable", e.len())),
        // The rule of `discovery::discover`, which warns and goes on for these.
        Err(e) if e.is_listing_refused() => EndpointsStep::Warning(format!(
            "cannot list serving endpoints ({e}); a run finds agents from inference tables and \
             apps only (and logs this WARN every cycle). Fix: give the service principal \
             CAN_VIEW (or CAN_QUERY) on the serving endpoints of its agents"
        )),
        Err(e) => EndpointsStep::Stop(e.to_string()),
    }
}

/// The `inference tables` step: what a run reads. Inference tables, and also MLflow traces
/// and OTel span tables: an agent with traces but no inference table is read by `-once` too.
fn sources_step(
    inv: &discovery::Inventory,
    (prefix, principal): (&str, &str),
    tables: usize,
    trace_sources: usize,
) -> Result<String, String> {
    let span_tables = inv.otel_span_tables.len();
    let spans = if span_tables > 0 {
        format!(", {span_tables} OTel span tables")
    } else {
        String::new()
    };
    if tables > 0 {
        Ok(format!(
            "{} agents, {tables} inference tables, {trace_sources} trace sources{spans}",
            inv.agents.len()
        ))
    } else if trace_sources > 0 || span_tables > 0 {
        Ok(format!(
            "{} agents: no inference tables (none matches prefix '{prefix}'), {trace_sources} \
             trace sources{spans}: their traces are read",
            inv.agents.len()
        ))
    } else {
        Err(format!(
            "no inference table matches prefix '{prefix}' ({} of {} tables match; outside it: \
             {}), and no agent has MLflow traces to read. Fix: check DATABRICKS_PREFIX / \
             DATABRICKS_SCHEMA, or enable inference tables on the agents' endpoints. Unity \
             Catalog lists only the tables the service principal may read: without SELECT they \
             do not show, so also check `SHOW GRANTS {principal} ON SCHEMA {schema}` and grant \
             `GRANT SELECT ON SCHEMA {schema} TO {principal};`",
            inv.tables_matching_prefix,
            inv.tables_total,
            inv.filtered_out_examples.join(", "),
            principal = crate::databricks::error::quote_ident(principal),
            schema =
                crate::databricks::error::quote_name(&format!("{}.{}", inv.catalog, inv.schema)),
        ))
    }
}

/// The `authentication` step: a token, then one cheap authenticated request, so that a wrong
/// personal access token (which needs no token exchange) fails here and not in the run.
async fn authentication(
    client: &crate::databricks::DatabricksClient,
    config: &Config,
) -> Result<String, String> {
    client.authenticate().await.map_err(|e| e.to_string())?;
    match client.list_warehouses().await {
        Ok(_) => Ok(format!(
            "{} accepted the credentials ({}; an authenticated GET /api/2.0/sql/warehouses \
             answered)",
            config.host,
            config.auth.kind()
        )),
        // Refused for lack of a grant: the credentials themselves were accepted.
        Err(DatabricksError::PermissionDenied { .. }) => Ok(format!(
            "{} accepted the credentials ({}; listing SQL warehouses is not permitted, see the \
             SQL warehouse line)",
            config.host,
            config.auth.kind()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether the first run can create `dir` (or use it, empty): the folder, or its nearest
/// existing parent, must be a writable folder. Leaves nothing behind (a probe file is created
/// and removed at once).
/// The state line of a state another process holds.
fn in_use(dir: &std::path::Path) -> String {
    format!(
        "{} is in use by a running instance (fine when that is this connector's service; a \
         second instance needs its own STATE_DIR)",
        dir.display()
    )
}

fn state_dir_writable(dir: &std::path::Path) -> Result<String, String> {
    let mut existing = dir;
    while !existing.as_os_str().is_empty() && !existing.exists() {
        existing = existing.parent().unwrap_or(std::path::Path::new(""));
    }
    let existing = if existing.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        existing
    };
    let fix = "Fix: set STATE_DIR to a folder this user may write, or give it write access";
    if !existing.is_dir() {
        return Err(format!(
            "{} is not a folder, so STATE_DIR {} cannot be created. {fix}",
            existing.display(),
            dir.display()
        ));
    }
    let probe = existing.join(format!(".databricks-shield-check-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) => {
            return Err(format!(
                "{} is not writable ({e}): the first run cannot create its state there. {fix}",
                existing.display()
            ))
        }
    }
    Ok(if existing == dir {
        format!(
            "{} is writable; no state yet (the first run starts LOOKBACK_MINUTES back)",
            dir.display()
        )
    } else {
        format!(
            "{} does not exist yet; the first run creates it ({} is writable; check created \
             nothing)",
            dir.display(),
            existing.display()
        )
    })
}

/// Whether Akto's ingestion service takes the token deliveries will send: an empty batch
/// (`{"batchData":[]}`, which stores nothing) posted by the sink itself, since its health check
/// does not look at the token.
async fn sink_token(sink: &crate::sink::HttpSink) -> Result<String, String> {
    let shown_url = sink.shown_url();
    let (status, with_token) = sink.post_empty_batch().await.map_err(|e| {
        format!(
            "{e} with an empty batch: the health check passed but deliveries would not. Fix: \
             check DATA_INGESTION_SERVICE_URL, HTTPS_PROXY / HTTP_PROXY / NO_PROXY and any WAF \
             or ingress rule in front of the service"
        )
    })?;
    let status = status.as_u16();
    match (status, with_token) {
        (200..=299, true) => Ok(format!(
            "AKTO_JWT_TOKEN accepted: POST {shown_url} with an empty batch answered HTTP {status}"
        )),
        (200..=299, false) => Ok(format!(
            "no AKTO_JWT_TOKEN set, and the service does not ask for one (an empty batch \
             answered HTTP {status})"
        )),
        (401, true) => Err(format!(
            "Akto's ingestion service refused AKTO_JWT_TOKEN: POST {shown_url} answered HTTP \
             {status}. Fix: set AKTO_JWT_TOKEN (or AKTO_JWT_TOKEN_FILE) to the token from \
             Akto's dashboard, the raw JWT without a 'Bearer ' prefix, current (not expired)"
        )),
        (401, false) => Err(format!(
            "Akto's ingestion service requires a token: POST {shown_url} answered HTTP \
             {status}. Fix: set AKTO_JWT_TOKEN (or AKTO_JWT_TOKEN_FILE) to the token from \
             Akto's dashboard"
        )),
        // Akto answers a bad token with 401; a 403 comes from what stands in front of it.
        (403, _) => Err(format!(
            "POST {shown_url} with an empty batch answered HTTP 403: a WAF, ingress or proxy in \
             front of Akto's ingestion service refuses this host or request (Akto itself answers \
             a bad token with 401). Fix: have this host allowed there"
        )),
        _ => Ok(format!(
            "token not verified: POST {shown_url} with an empty batch answered HTTP {status} \
             (neither accepted nor refused the token)"
        )),
    }
}

/// The fix for a proxy that refused to open a tunnel (`CONNECT`) to the workspace: its
/// credentials or its allow list, not certificate trust.
fn proxy_tunnel_fix(proxy_variable: &str) -> String {
    format!(
        "the proxy refused to open a tunnel (CONNECT) to the workspace. HTTP 407 means it wants \
         credentials: put them in {proxy_variable} (http://user:password@proxy:port, the \
         password URL-encoded); HTTP 403 means it does not allow this host: have it allowed, \
         or exempt the host with NO_PROXY when it is reachable directly"
    )
}

/// The proxy the client's requests to `host` go through, decided by the matcher reqwest itself
/// uses (`HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY`, either case, and `NO_PROXY` with its names,
/// domains, IPs and ranges), as (host, port) of the proxy. Only http(s) proxies: the client
/// speaks to nothing else.
fn proxy_for(host: &url::Url, matcher: &Matcher) -> Option<(String, u16)> {
    let dst: http::Uri = host.as_str().parse().ok()?;
    let proxy = matcher.intercept(&dst)?;
    let uri = proxy.uri();
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return None,
    };
    let name = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    Some((name.to_string(), uri.port_u16().unwrap_or(default_port)))
}

/// A host name or address as `lookup_host` takes it (an IPv6 address without its brackets).
fn lookup_name(host: &url::Url) -> String {
    match host.host() {
        Some(url::Host::Ipv6(a)) => a.to_string(),
        Some(h) => h.to_string(),
        None => String::new(),
    }
}

/// The fix for a failed TLS step: trust the issuer, or (a bundle being in use already) put the
/// right CA in it.
fn tls_fix(ca_bundle: Option<&std::path::Path>) -> String {
    match ca_bundle {
        None => "the certificate must be trusted; behind a TLS-inspecting proxy set \
                 DATABRICKS_CA_BUNDLE to its CA's PEM file"
            .into(),
        Some(path) => format!(
            "the certificate must be trusted; the CA bundle {} (DATABRICKS_CA_BUNDLE, else \
             SSL_CERT_FILE) must hold the CA that issued it (behind a TLS-inspecting proxy, the \
             proxy's CA)",
            path.display()
        ),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// The checklist as text.
pub fn render(steps: &[Step]) -> String {
    steps
        .iter()
        .map(|s| {
            format!(
                "[{}] {}: {}\n",
                match (s.ok, s.warning) {
                    (true, false) => "PASS",
                    (true, true) => "WARN",
                    (false, _) => "FAIL",
                },
                s.name,
                s.detail
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{
        lookup_name, proxy_for, render, serving_endpoints_step, sources_step, state_dir_writable,
        EndpointsStep, Matcher, Step,
    };
    use crate::databricks::DatabricksError;

    /// A refused endpoint listing is a warning, as in a run; an outage or a refused login stops.
    #[test]
    fn a_refused_endpoint_listing_is_a_warning_not_a_stop() {
        let denied = DatabricksError::PermissionDenied {
            object: "serving endpoints".into(),
            detail: "PERMISSION_DENIED".into(),
            fix: "grant CAN_VIEW".into(),
        };
        let EndpointsStep::Warning(detail) = serving_endpoints_step(Err(denied)) else {
            panic!("a refused listing must not stop check")
        };
        assert!(detail.contains("CAN_VIEW"), "{detail}");
        let down = DatabricksError::Api {
            status: 503,
            error_code: "TEMPORARILY_UNAVAILABLE".into(),
            message: "down".into(),
            route: "/api/2.0/serving-endpoints".into(),
        };
        assert!(matches!(
            serving_endpoints_step(Err(down)),
            EndpointsStep::Stop(_)
        ));
        assert_eq!(
            serving_endpoints_step(Ok(Vec::new())),
            EndpointsStep::Listed("0 serving endpoints readable".into())
        );
        let steps = [Step {
            name: "serving endpoints".into(),
            ok: true,
            detail: "x".into(),
            warning: true,
        }];
        assert_eq!(render(&steps), "[WARN] serving endpoints: x\n");
    }

    #[test]
    fn traces_without_inference_tables_pass_the_sources_step() {
        let mut inv = crate::discovery::Inventory {
            tables_total: 7,
            ..Default::default()
        };
        inv.catalog = "main".into();
        inv.schema = "agents".into();
        let err = sources_step(&inv, ("nothing_", "sp-1"), 0, 0).unwrap_err();
        assert!(
            err.contains("DATABRICKS_PREFIX") && err.contains("0 of 7"),
            "{err}"
        );
        // Unity Catalog lists only the tables the principal may read: the GRANT is named.
        assert!(
            err.contains("GRANT SELECT ON SCHEMA `main`.`agents` TO `sp-1`;"),
            "{err}"
        );
        let ok = sources_step(&inv, ("nothing_", "sp-1"), 0, 3).unwrap();
        assert!(
            ok.contains("no inference tables") && ok.contains("3 trace sources"),
            "{ok}"
        );
        inv.tables_matching_prefix = 2;
        let ok = sources_step(&inv, ("", "sp-1"), 2, 1).unwrap();
        assert!(ok.contains("2 inference tables, 1 trace sources"), "{ok}");
    }

    #[test]
    fn a_missing_state_dir_is_tested_without_being_created() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        let ok = state_dir_writable(&dir).unwrap();
        assert!(ok.contains("does not exist yet"), "{ok}");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        // A file where the folder should be: the first run could not create it.
        std::fs::write(root.path().join("a"), "x").unwrap();
        let err = state_dir_writable(&dir).unwrap_err();
        assert!(
            err.contains("is not a folder") && err.contains("STATE_DIR"),
            "{err}"
        );
        let ok = state_dir_writable(root.path()).unwrap();
        assert!(ok.contains("no state yet"), "{ok}");
    }

    fn proxy(host: &str, env: &[(&str, &str)]) -> Option<(String, u16)> {
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
                .unwrap_or_default()
        };
        let m = Matcher::builder()
            .http(get("HTTP_PROXY"))
            .https(get("HTTPS_PROXY"))
            .all(get("ALL_PROXY"))
            .no(get("NO_PROXY"))
            .build();
        proxy_for(&url::Url::parse(host).unwrap(), &m)
    }

    #[test]
    fn the_proxy_is_the_one_the_client_takes() {
        let ws = "https://adb-1.azuredatabricks.net";
        let p = |h: &str, port| Some((h.to_string(), port));
        assert_eq!(proxy(ws, &[]), None);
        assert_eq!(
            proxy(ws, &[("HTTPS_PROXY", "http://proxy.corp:3128")]),
            p("proxy.corp", 3128)
        );
        // No scheme: an http proxy; credentials are not part of the answer.
        assert_eq!(
            proxy(ws, &[("HTTPS_PROXY", "user:pw@proxy.corp:3128")]),
            p("proxy.corp", 3128)
        );
        assert_eq!(
            proxy(ws, &[("HTTPS_PROXY", "http://[fd00::1]:3128")]),
            p("fd00::1", 3128)
        );
        assert_eq!(proxy(ws, &[("HTTP_PROXY", "http://p:1")]), None);
        assert_eq!(proxy(ws, &[("ALL_PROXY", "http://p:1")]), p("p", 1));
        assert_eq!(
            proxy("http://127.0.0.1:8080", &[("HTTP_PROXY", "http://p:1")]),
            p("p", 1)
        );
        for np in [
            ".azuredatabricks.net",
            "azuredatabricks.net",
            "adb-1.azuredatabricks.net",
            "*",
        ] {
            assert_eq!(
                proxy(ws, &[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", np)]),
                None,
                "{np}"
            );
        }
        assert!(proxy(
            ws,
            &[
                ("HTTPS_PROXY", "http://p:1"),
                ("NO_PROXY", "databricks.net")
            ]
        )
        .is_some());
        // Ranges, as reqwest reads them.
        assert_eq!(
            proxy(
                "http://10.1.2.3:8080",
                &[("HTTP_PROXY", "http://p:1"), ("NO_PROXY", "10.0.0.0/8")]
            ),
            None
        );
    }

    #[test]
    fn an_ipv6_workspace_is_looked_up_without_brackets() {
        assert_eq!(
            lookup_name(&url::Url::parse("https://[::1]:8443").unwrap()),
            "::1"
        );
        assert_eq!(
            lookup_name(&url::Url::parse("https://adb-1.azuredatabricks.net").unwrap()),
            "adb-1.azuredatabricks.net"
        );
    }
}
