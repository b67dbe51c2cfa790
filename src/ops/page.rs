//! The status page (`GET /`): one server-rendered HTML document with inline CSS and inline SVG,
//! so it works on a closed network and under `Content-Security-Policy: default-src 'none'`.
//! Every value that came from the workspace (agent, model, table, error text) is HTML-escaped.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};

use super::metrics::{CycleResult, CycleSummary, Readiness, ServiceInfo, Snapshot, HISTORY_CYCLES};
use crate::discovery::Agent;

const STYLE: &str = "\
*{box-sizing:border-box}\
body{margin:0;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;color:#1f2937;background:#f3f4f6}\
header{background:#111827;color:#f9fafb;padding:16px 28px}\
header h1{margin:0 12px 0 0;font-size:22px;display:inline-block}\
header p{margin:6px 0 0;color:#d1d5db}\
header code{background:#374151;color:#f9fafb}\
main{padding:20px 28px;max-width:1400px}\
section{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:14px 18px;margin:0 0 18px}\
h2{font-size:17px;margin:0 0 10px}\
table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e5e7eb;vertical-align:top;overflow-wrap:anywhere}\
.scroll{overflow-x:auto}\
th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#6b7280}\
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}\
code{font:12.5px ui-monospace,'DejaVu Sans Mono',monospace;background:#f3f4f6;padding:1px 4px;border-radius:4px}\
.badge{display:inline-block;padding:2px 10px;border-radius:999px;font-weight:600;font-size:13px;vertical-align:middle}\
.ok{background:#dcfce7;color:#166534}.bad{background:#fee2e2;color:#991b1b}.warn{background:#fef3c7;color:#92400e}\
.stats{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}\
.stat{border:1px solid #e5e7eb;border-radius:6px;padding:8px 14px;min-width:130px}\
.stat b{display:block;font-size:20px}\
.stat span{color:#6b7280;font-size:12px}\
ul.errors{margin:8px 0 0;padding-left:18px;color:#991b1b}\
ul.errors li{margin:4px 0;word-break:break-word}\
.muted{color:#6b7280}\
svg.chart{display:block;max-width:none}\
td.chart{min-width:230px;overflow-wrap:normal}\
svg.chart rect.bar{fill:#2563eb}\
svg.chart rect.zero{fill:#d1d5db}\
footer{color:#6b7280;padding:0 28px 24px}";

/// Escapes text for HTML element content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn result_badge(r: CycleResult) -> String {
    let class = match r {
        CycleResult::Success => "ok",
        CycleResult::Failure => "bad",
        CycleResult::Interrupted => "warn",
    };
    format!(
        "<span class=\"badge {class}\" data-result=\"{0}\">{0}</span>",
        r.as_str()
    )
}

/// The records an agent sent in each recent cycle, as a small bar chart (oldest left).
pub(crate) fn bar_chart(agent: &str, history: &[CycleSummary]) -> String {
    const BAR: usize = 14;
    const GAP: usize = 4;
    const HEIGHT: u64 = 36;
    let values: Vec<(u64, u64)> = history
        .iter()
        .map(|c| (c.number, c.per_agent.get(agent).copied().unwrap_or(0)))
        .collect();
    let max = values.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let width = HISTORY_CYCLES * (BAR + GAP);
    let mut svg = format!(
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{h}\" \
         viewBox=\"0 0 {width} {h}\" role=\"img\" aria-label=\"records sent by {a} in the last {n} cycles\">",
        h = HEIGHT + 2,
        a = esc(agent),
        n = values.len()
    );
    for (i, (number, v)) in values.iter().enumerate() {
        // At least 2 px for a non-zero cycle so it is visible next to an empty one.
        let (class, h) = if *v == 0 {
            ("zero", 1)
        } else {
            ("bar", (v * HEIGHT).div_ceil(max).max(2))
        };
        let _ = write!(
            svg,
            "<rect class=\"{class}\" x=\"{x}\" y=\"{y}\" width=\"{BAR}\" height=\"{h}\" data-records=\"{v}\">\
             <title>cycle #{number}: {v} records</title></rect>",
            x = i * (BAR + GAP),
            y = HEIGHT + 1 - h,
        );
    }
    svg.push_str("</svg>");
    svg
}

fn models(a: &Agent) -> String {
    if a.models.is_empty() {
        return "<span class=\"muted\">-</span>".into();
    }
    a.models
        .iter()
        .map(|m| {
            let v = m
                .version
                .as_deref()
                .map(|v| format!(" v{}", esc(v)))
                .unwrap_or_default();
            format!(
                "<code>{}</code>{v} <span class=\"muted\">({})</span>",
                esc(&m.name),
                esc(m.kind)
            )
        })
        .collect::<Vec<_>>()
        .join("<br>")
}

/// Where the agent runs: its serving endpoint, its Databricks App, its traces' experiment.
fn deployment(a: &Agent) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(e) = &a.endpoint {
        parts.push(format!("<code>{}</code>", esc(e)));
    }
    if let Some(app) = &a.app {
        let state = app
            .state
            .as_deref()
            .map(|s| format!(" <span class=\"muted\">({})</span>", esc(s)))
            .unwrap_or_default();
        parts.push(format!("app <code>{}</code>{state}", esc(&app.name)));
    }
    if let Some(x) = &a.experiment_id {
        parts.push(format!(
            "<span class=\"muted\">traces: experiment {}</span>",
            esc(x)
        ));
    }
    if parts.is_empty() {
        return "<span class=\"muted\">none (table only)</span>".into();
    }
    parts.join("<br>")
}

fn stat(label: &str, value: impl std::fmt::Display) -> String {
    format!(
        "<div class=\"stat\"><b>{}</b><span>{}</span></div>",
        esc(&value.to_string()),
        esc(label)
    )
}

/// Renders the whole page.
pub fn render_status_page(
    info: &ServiceInfo,
    snap: &Snapshot,
    readiness: &Readiness,
    now: DateTime<Utc>,
) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"30\">\
         <title>databricks-shield status</title><style>{STYLE}</style></head><body>"
    );
    let _ = write!(
        h,
        "<header><h1>databricks-shield</h1><span id=\"readiness\" class=\"badge {}\" title=\"{}\">{}</span>\
         <p>version {} &middot; workspace <b>{}</b> &middot; <code>{}.{}</code>{} &middot; sink {} \
         &middot; every {}s &middot; page rendered {}</p></header><main>",
        if readiness.ready { "ok" } else { "bad" },
        esc(&readiness.reason),
        if readiness.ready { "Ready" } else { "Not ready" },
        esc(&info.version),
        esc(&info.workspace),
        esc(&info.catalog),
        esc(&info.schema),
        if info.prefix.is_empty() {
            String::new()
        } else {
            format!(" prefix <code>{}</code>", esc(&info.prefix))
        },
        esc(&info.sink_target),
        info.interval.as_secs(),
        time(now),
    );

    // Last cycle.
    h.push_str("<section id=\"last-cycle\"><h2>Last cycle</h2>");
    match snap.last_cycle() {
        None => h.push_str(
            "<p class=\"muted\">No cycle has finished yet: the first one is running.</p>",
        ),
        Some(c) => {
            let _ = write!(
                h,
                "<p>Cycle #{} {} &middot; finished {} &middot; took {:.1}s</p><div class=\"stats\">{}{}{}{}{}{}</div>",
                c.number,
                result_badge(c.result),
                time(c.finished),
                c.duration.as_secs_f64(),
                stat("agents", c.agents),
                stat("inference tables", c.tables),
                stat("rows read", c.rows_read),
                stat("records sent", c.records_sent),
                stat("duplicates skipped", c.duplicates_skipped),
                stat("quarantined", c.quarantined),
            );
            if c.errors.is_empty() {
                h.push_str("<p id=\"errors\" class=\"muted\">No errors.</p>");
            } else {
                let _ = write!(
                    h,
                    "<p id=\"errors\"><b>{} error(s):</b></p><ul class=\"errors\">",
                    c.errors.len()
                );
                for e in &c.errors {
                    let _ = write!(h, "<li>{}</li>", esc(e));
                }
                h.push_str("</ul>");
            }
        }
    }
    let _ = write!(
        h,
        "<p class=\"muted\">Since start ({}): {} records sent, {} rows read, {} duplicates skipped, \
         {} quarantined; last success {}.</p></section>",
        time(snap.started),
        snap.records_sent,
        snap.rows_read,
        snap.duplicates_skipped,
        snap.quarantined,
        snap.last_success
            .map(time)
            .unwrap_or_else(|| "never".into()),
    );

    // Agents.
    match &snap.inventory {
        None => h.push_str(
            "<section id=\"agents\"><h2>Agents</h2><p class=\"muted\">No inventory yet.</p></section>",
        ),
        Some(inv) => {
            let _ = write!(
                h,
                "<section id=\"agents\"><h2>Agents ({})</h2><div class=\"scroll\"><table><thead><tr><th>Agent</th><th>Runs as</th>\
                 <th>Models</th><th>Inference table</th><th>Records per cycle (last {})</th>\
                 <th class=\"num\">Last cycle</th><th class=\"num\">Sent total</th></tr></thead><tbody>",
                inv.agents.len(),
                snap.history.len()
            );
            if inv.agents.is_empty() {
                let _ = write!(
                    h,
                    "<tr><td colspan=\"7\" class=\"muted\">No agents in <code>{}.{}</code>: {} tables, {} match \
                     the prefix. <code>databricks-shield check</code> says why.</td></tr>",
                    esc(&inv.catalog),
                    esc(&inv.schema),
                    inv.tables_total,
                    inv.tables_matching_prefix
                );
            }
            for a in &inv.agents {
                let table = match (&a.table, &a.table_note) {
                    (Some(t), _) => format!("<code>{}</code>", esc(&t.full_name)),
                    (None, Some(n)) => format!("<span class=\"muted\">{}</span>", esc(n)),
                    (None, None) => "<span class=\"muted\">-</span>".into(),
                };
                let last = snap
                    .last_cycle()
                    .and_then(|c| c.per_agent.get(&a.name))
                    .copied()
                    .unwrap_or(0);
                let _ = write!(
                    h,
                    "<tr class=\"agent\" data-agent=\"{n}\"><td><b>{n}</b></td><td>{}</td><td>{}</td><td>{table}</td>\
                     <td class=\"chart\">{}</td><td class=\"num\">{last}</td><td class=\"num\">{}</td></tr>",
                    deployment(a),
                    models(a),
                    bar_chart(&a.name, &snap.history),
                    snap.agent_records.get(&a.name).copied().unwrap_or(0),
                    n = esc(&a.name),
                );
            }
            h.push_str("</tbody></table></div></section>");

            let _ = write!(
                h,
                "<section id=\"tools\"><h2>Tools ({})</h2>",
                inv.tools.len()
            );
            if inv.tools.is_empty() {
                h.push_str("<p class=\"muted\">No Unity Catalog functions in the schema.</p>");
            } else {
                h.push_str("<p>");
                let tools: Vec<String> = inv
                    .tools
                    .iter()
                    .map(|t| format!("<code>{}</code>", esc(t)))
                    .collect();
                h.push_str(&tools.join(" "));
                h.push_str("</p>");
            }
            h.push_str("</section>");

            if !inv.models.is_empty() || !inv.llm_endpoints.is_empty() {
                h.push_str("<section id=\"models\"><h2>Models and LLM endpoints</h2><ul>");
                for m in &inv.models {
                    let _ = write!(
                        h,
                        "<li><code>{}</code> versions {}</li>",
                        esc(&m.full_name),
                        esc(&m.versions.join(", "))
                    );
                }
                for e in &inv.llm_endpoints {
                    let _ = write!(
                        h,
                        "<li>LLM endpoint <code>{}</code> (not read: {}) {}</li>",
                        esc(&e.name),
                        esc(e.table_note.as_deref().unwrap_or("no inference table in scope")),
                        models(e)
                    );
                }
                h.push_str("</ul></section>");
            }
        }
    }

    // Recent cycles.
    if !snap.history.is_empty() {
        h.push_str(
            "<section id=\"cycles\"><h2>Recent cycles</h2><table><thead><tr><th>#</th><th>Finished</th>\
             <th>Result</th><th class=\"num\">Duration</th><th class=\"num\">Rows read</th>\
             <th class=\"num\">Records sent</th><th class=\"num\">Duplicates</th><th class=\"num\">Quarantined</th>\
             <th class=\"num\">Errors</th></tr></thead><tbody>",
        );
        for c in snap.history.iter().rev() {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{:.1}s</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                c.number,
                time(c.finished),
                result_badge(c.result),
                c.duration.as_secs_f64(),
                c.rows_read,
                c.records_sent,
                c.duplicates_skipped,
                c.quarantined,
                c.errors.len()
            );
        }
        h.push_str("</tbody></table></section>");
    }
    h.push_str(
        "</main><footer>Machine-readable: <a href=\"/metrics\">/metrics</a> &middot; \
         <a href=\"/readyz\">/readyz</a> &middot; <a href=\"/healthz\">/healthz</a></footer></body></html>",
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{InferenceTable, Inventory, ServedModel, TableKind};
    use std::time::Duration;

    fn info() -> ServiceInfo {
        ServiceInfo {
            version: "0.1.0".into(),
            workspace: "ws.example".into(),
            catalog: "main".into(),
            schema: "agents".into(),
            prefix: String::new(),
            sink: "http",
            sink_target: "Akto ingestion at http://akto:8080/".into(),
            interval: Duration::from_secs(60),
        }
    }

    fn agent(name: &str) -> Agent {
        Agent {
            name: name.into(),
            endpoint: Some(name.into()),
            task: Some("agent/v1/chat".into()),
            is_agent: true,
            models: vec![ServedModel {
                name: "main.models.<b>m</b>".into(),
                version: Some("3".into()),
                kind: "uc_model",
            }],
            table: Some(InferenceTable {
                full_name: format!("main.agents.{name}_payload"),
                kind: TableKind::AiGatewayPayload,
                columns: Vec::new(),
            }),
            table_note: None,
            tags: Default::default(),
            experiment_id: None,
            app: None,
        }
    }

    fn cycle(number: u64, sent: u64, errors: Vec<String>) -> CycleSummary {
        CycleSummary {
            number,
            finished: Utc::now(),
            result: if errors.is_empty() {
                CycleResult::Success
            } else {
                CycleResult::Failure
            },
            duration: Duration::from_secs(2),
            agents: 1,
            tables: 1,
            rows_read: sent,
            records_sent: sent,
            duplicates_skipped: 0,
            quarantined: 0,
            errors,
            per_agent: [("<script>alert(1)</script>".to_string(), sent)]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn workspace_values_are_escaped_everywhere() {
        let mut deployed = agent("<script>alert(1)</script>");
        deployed.app = Some(crate::discovery::AppEntry {
            name: "app<i>".into(),
            url: None,
            description: None,
            state: Some("RUNNING".into()),
            compute_state: None,
            serving_endpoints: Vec::new(),
            sql_warehouses: Vec::new(),
        });
        deployed.experiment_id = Some("42".into());
        let snap = Snapshot {
            inventory: Some(Inventory {
                agents: vec![deployed],
                tools: vec!["main.agents.\"lookup\"".into()],
                ..Default::default()
            }),
            history: vec![cycle(1, 4, vec!["table <x> & \"y\"".into()])],
            ..Default::default()
        };
        let ready = Readiness {
            ready: false,
            reason: "not ready".into(),
        };
        let html = render_status_page(&info(), &snap, &ready, Utc::now());
        assert!(!html.contains("<script>"), "unescaped agent name");
        assert!(!html.contains("<b>m</b>"), "unescaped model name");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("table &lt;x&gt; &amp; &quot;y&quot;"));
        assert!(html.contains("data-result=\"failure\""));
        assert!(
            html.contains("app <code>app&lt;i&gt;</code> <span class=\"muted\">(RUNNING)</span>")
        );
        assert!(html.contains("traces: experiment 42"));
        // The chart found the agent's records under its raw (unescaped) name.
        assert!(html.contains("data-records=\"4\""));
        assert!(!html.contains(" src=") && !html.contains("href=\"http"));
    }

    #[test]
    fn bars_scale_to_the_largest_cycle_and_zero_cycles_stay_visible() {
        let hist = vec![
            cycle(1, 10, vec![]),
            cycle(2, 0, vec![]),
            cycle(3, 5, vec![]),
        ];
        let svg = bar_chart("<script>alert(1)</script>", &hist);
        assert_eq!(svg.matches("<rect").count(), 3);
        assert!(svg.contains("class=\"bar\" x=\"0\" y=\"1\" width=\"14\" height=\"36\""));
        assert!(svg.contains("class=\"zero\""));
        assert!(svg.contains("height=\"18\" data-records=\"5\""));
        assert!(svg.contains("cycle #2: 0 records"));
    }

    #[test]
    fn an_empty_registry_renders_a_waiting_page() {
        let ready = Readiness {
            ready: false,
            reason: "not ready: no cycle has finished yet".into(),
        };
        let html = render_status_page(&info(), &Snapshot::default(), &ready, Utc::now());
        assert!(html.contains("No cycle has finished yet"));
        assert!(html.contains("Not ready"));
        assert!(html.ends_with("</html>"));
    }
}
