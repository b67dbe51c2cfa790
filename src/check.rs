//! `databricks-shield check`: every prerequisite in order, one line each with the evidence, and
//! the fix for a failure. It reads and sends nothing but probes (a `LIMIT 0` query per table, the
//! sink's health check).

use serde::Serialize;

use crate::collect::quote_table;
use crate::config::Config;
use crate::databricks::sql::Statement;
use crate::discovery;

/// One line of the checklist.
#[derive(Debug, Serialize)]
pub struct Step {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// Runs the checks; stops at the first failure that makes later ones meaningless.
pub async fn run(config: &Config) -> Vec<Step> {
    let mut steps = vec![Step {
        name: "configuration".into(),
        ok: true,
        detail: config.summary(),
    }];
    let mut push = |name: &str, r: Result<String, String>| {
        let ok = r.is_ok();
        steps.push(Step {
            name: name.into(),
            ok,
            detail: r.unwrap_or_else(|e| e),
        });
        ok
    };
    // Reachability, each layer named: DNS, then TCP, then TLS (https hosts).
    let host = config.host.host_str().unwrap_or_default().to_string();
    let port = config.host.port_or_known_default().unwrap_or(443);
    let addrs: Vec<std::net::SocketAddr> = match tokio::net::lookup_host((host.as_str(), port))
        .await
    {
        Ok(a) => a.collect(),
        Err(e) => {
            push(
                "DNS",
                Err(format!(
                    "Failed to connect to Databricks workspace: {host} does not resolve ({e}). Fix: check \
                     DATABRICKS_HOST (https://<workspace>.cloud.databricks.com) and this machine's DNS"
                )),
            );
            return steps;
        }
    };
    let Some(first) = addrs.first().copied() else {
        push("DNS", Err(format!("{host} resolves to no address")));
        return steps;
    };
    push("DNS", Ok(format!("{host} resolves to {}", first.ip())));
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect(first),
    )
    .await;
    let tcp_ok = match tcp {
        Ok(Ok(_)) => Ok(format!("TCP connection to {first} accepted")),
        Ok(Err(e)) => Err(format!(
            "Failed to connect to Databricks workspace: TCP connection to {} failed ({e}). Fix: check \
             firewalls, proxies and that DATABRICKS_HOST is right",
            first
        )),
        Err(_) => Err(format!(
            "Failed to connect to Databricks workspace: TCP connection to {} timed out after 10s. Fix: \
             check firewalls and network routes (private link, VPN)",
            first
        )),
    };
    if !push("TCP", tcp_ok) {
        return steps;
    }
    // The real client, built once: the TLS probe goes through it so that it trusts exactly what
    // every later request trusts (the system roots plus DATABRICKS_CA_BUNDLE, else
    // SSL_CERT_FILE) and takes the same proxy.
    let client = match crate::app::client(config) {
        Ok(c) => c,
        Err(e) => {
            push("databricks client", Err(e.to_string()));
            return steps;
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
            Ok(Err(e)) => Err(format!(
                "Failed to connect to Databricks workspace: TLS with {host} failed ({}). Fix: {}",
                error_chain(&e),
                tls_fix(config.ca_bundle.as_deref())
            )),
            Err(_) => Err(format!(
                "Failed to connect to Databricks workspace: no TLS response from {host} within \
                 15s. Fix: check that DATABRICKS_HOST is the workspace's HTTPS address and, \
                 behind a proxy, HTTPS_PROXY / NO_PROXY"
            )),
        };
        if !push("TLS", result) {
            return steps;
        }
    }
    if !push(
        "authentication",
        client
            .authenticate()
            .await
            .map(|_| format!("{} accepted the credentials", config.host))
            .map_err(|e| e.to_string()),
    ) {
        return steps;
    }
    // Each API on its own line, so a missing grant names the right one.
    let listed = client.list_tables(&config.catalog, &config.schema).await;
    if !push(
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
        return steps;
    }
    let endpoints = client.list_serving_endpoints().await;
    if !push(
        "serving endpoints",
        endpoints
            .map(|e| format!("{} serving endpoints readable", e.len()))
            .map_err(|e| e.to_string()),
    ) {
        return steps;
    }
    let inv =
        match discovery::discover(&client, &config.catalog, &config.schema, &config.prefix).await {
            Ok(inv) => inv,
            Err(e) => {
                push("agent discovery", Err(e.to_string()));
                return steps;
            }
        };
    let tables: Vec<_> = inv.readable().map(|(_, t)| t.clone()).collect();
    push(
        "inference tables",
        if tables.is_empty() {
            Err(format!(
                "no inference table matches prefix '{}' ({} of {} tables match; outside it: {}). Fix: check \
                 DATABRICKS_PREFIX / DATABRICKS_SCHEMA, or enable inference tables on the agents' endpoints",
                config.prefix,
                inv.tables_matching_prefix,
                inv.tables_total,
                inv.filtered_out_examples.join(", ")
            ))
        } else {
            Ok(format!(
                "{} agents, {} inference tables",
                inv.agents.len(),
                tables.len()
            ))
        },
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
            push("SQL warehouse", Ok(format!("{} ({why}){note}", w.id)));
            Some(w.id)
        }
        Err(e) => {
            push("SQL warehouse", Err(e.to_string()));
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
            push(
                &format!("SELECT on {}", t.full_name),
                result.map_err(|e| e.to_string()),
            );
        }
    }
    // The state directory: writable, and not held by another instance. An older state format is
    // reported, not upgraded: `check` changes nothing.
    let state = match crate::state::StateStore::open_unchanged(&config.state_dir) {
        Ok((_, None)) => Ok(format!("{} is usable", config.state_dir.display())),
        Ok((_, Some(old))) => Ok(format!(
            "{} is usable (state format {old}: the next run upgrades it, after which older \
             releases refuse it)",
            config.state_dir.display()
        )),
        Err(crate::state::StateError::Locked(dir)) => Ok(format!(
            "{} is in use by a running instance (fine when that is this connector's service; \
             a second instance needs its own STATE_DIR)",
            dir.display()
        )),
        Err(e) => Err(e.to_string()),
    };
    push("state directory", state);
    match config.sink.as_ref().map(crate::app::sink) {
        Some(Ok(sink)) => {
            let checked = sink.healthcheck().await.map(|_| {
                // After the health check: a Kafka topic's own message limit is known then.
                format!(
                    "{}; records up to {} bytes each (larger ones have their payloads cut)",
                    sink.describe(),
                    sink.max_record_bytes()
                )
            });
            push("sink reachable", checked.map_err(|e| e.to_string()));
        }
        Some(Err(e)) => {
            push("sink reachable", Err(e.to_string()));
        }
        None => {
            push("sink reachable", Err("no sink configured".into()));
        }
    }
    steps
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
                if s.ok { "PASS" } else { "FAIL" },
                s.name,
                s.detail
            )
        })
        .collect()
}
