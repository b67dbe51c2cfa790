//! The metrics registry: cumulative counters and the recent cycles, fed after every cycle, read
//! by `/metrics`, `/readyz` and the status page. Hand-written Prometheus text exposition (format
//! 0.0.4): a dozen families do not justify a metrics framework, and the output is tested.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::databricks::ApiStats;
use crate::discovery::Inventory;
use crate::run::CycleReport;

/// Upper bounds (seconds) of the cycle duration histogram's buckets (`+Inf` is implied).
pub const DURATION_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// How many recent cycles the status page shows (and the bar charts have bars).
pub const HISTORY_CYCLES: usize = 12;

/// Longest error text kept per error (the status page shows them whole otherwise).
const MAX_ERROR_CHARS: usize = 2000;

/// What the service is, fixed for its lifetime: shown on the status page.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    pub version: String,
    /// The workspace host name (no scheme, no credentials).
    pub workspace: String,
    pub catalog: String,
    pub schema: String,
    pub prefix: String,
    /// The sink's short name (`http`, `kafka`, `file`): the `sink` label of records sent.
    pub sink: &'static str,
    /// The sink's destination as its `describe()` says (no credentials).
    pub sink_target: String,
    /// `RECURRING_INTERVAL_SECONDS`: readiness allows two of them since the last success.
    pub interval: Duration,
}

/// How a cycle ended, as the `result` label of `databricks_shield_cycles_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CycleResult {
    /// No error.
    Success,
    /// At least one error (the cycle stopped early or a table failed).
    Failure,
    /// Shutdown stopped it between batches, without an error.
    Interrupted,
}

impl CycleResult {
    pub const ALL: [CycleResult; 3] = [
        CycleResult::Success,
        CycleResult::Failure,
        CycleResult::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CycleResult::Success => "success",
            CycleResult::Failure => "failure",
            CycleResult::Interrupted => "interrupted",
        }
    }

    /// How a report ended: errors win over an interruption.
    pub fn of(report: &CycleReport) -> CycleResult {
        if !report.errors.is_empty() {
            CycleResult::Failure
        } else if report.stopped {
            CycleResult::Interrupted
        } else {
            CycleResult::Success
        }
    }
}

/// One finished cycle, as the status page shows it.
#[derive(Debug, Clone)]
pub struct CycleSummary {
    /// Counts cycles since the start, from 1.
    pub number: u64,
    pub finished: DateTime<Utc>,
    pub result: CycleResult,
    pub duration: Duration,
    pub agents: usize,
    pub tables: usize,
    pub rows_read: u64,
    pub records_sent: u64,
    pub duplicates_skipped: u64,
    pub quarantined: u64,
    pub errors: Vec<String>,
    /// Records sent per agent name in this cycle (agents that sent nothing are absent).
    pub per_agent: BTreeMap<String, u64>,
}

/// Whether `/readyz` answers 200, and why (the response body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: String,
}

/// A consistent copy of everything the registry holds.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// When the registry (the service) started.
    pub started: DateTime<Utc>,
    pub cycles: BTreeMap<CycleResult, u64>,
    pub rows_read: u64,
    pub bytes_read: u64,
    pub executions: u64,
    pub records_sent: u64,
    pub duplicates_skipped: u64,
    pub late_found: u64,
    pub quarantined: u64,
    pub truncated: u64,
    pub tool_calls: u64,
    pub tool_calls_deduplicated: u64,
    pub cycle_errors: u64,
    /// Cumulative counts of the histogram's buckets (same order as [`DURATION_BUCKETS`]).
    pub duration_buckets: Vec<u64>,
    pub duration_sum_seconds: f64,
    pub duration_count: u64,
    pub last_success: Option<DateTime<Utc>>,
    pub agents_discovered: usize,
    pub inference_tables: usize,
    /// Records sent per agent since the start.
    pub agent_records: BTreeMap<String, u64>,
    /// Databricks requests: ((route, status), count), cumulative since the client was built.
    pub api_requests: Vec<((String, String), u64)>,
    pub api_retries: u64,
    /// Oldest first, at most [`HISTORY_CYCLES`].
    pub history: Vec<CycleSummary>,
    /// The latest inventory discovery returned.
    pub inventory: Option<Inventory>,
}

impl Snapshot {
    /// The most recent cycle.
    pub fn last_cycle(&self) -> Option<&CycleSummary> {
        self.history.last()
    }
}

#[derive(Default)]
struct Inner {
    snap: Snapshot,
    history: VecDeque<CycleSummary>,
    cycles_seen: u64,
    last_success_at: Option<Instant>,
    /// When the last observed cycle ended: records confirmed after it belong to a cycle that is
    /// still running.
    last_cycle_end: Option<Instant>,
}

/// The registry. Cheap to read; `observe` is called by the service loop after every cycle.
pub struct Metrics {
    info: ServiceInfo,
    started: DateTime<Utc>,
    inner: Mutex<Inner>,
    /// When the sink last confirmed records (the connector's), for readiness while a long
    /// cycle runs.
    progress: Option<Arc<crate::run::Progress>>,
}

impl Metrics {
    pub fn new(info: ServiceInfo) -> Metrics {
        Metrics {
            info,
            started: Utc::now(),
            inner: Mutex::new(Inner::default()),
            progress: None,
        }
    }

    /// Readiness also counts records the sink confirmed during a cycle still running.
    pub fn with_progress(mut self, progress: Arc<crate::run::Progress>) -> Metrics {
        self.progress = Some(progress);
        self
    }

    pub fn info(&self) -> &ServiceInfo {
        &self.info
    }

    /// When the registry (the service) started.
    pub fn started(&self) -> DateTime<Utc> {
        self.started
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave numbers half-written in a way that matters
        // more than losing the page: keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a finished cycle. `api` is the Databricks client's cumulative request counters.
    pub fn observe(&self, report: &CycleReport, api: &ApiStats) {
        self.observe_at(report, api, Instant::now(), Utc::now());
    }

    /// [`Metrics::observe`] at a given time (tests).
    pub fn observe_at(
        &self,
        report: &CycleReport,
        api: &ApiStats,
        now: Instant,
        wall: DateTime<Utc>,
    ) {
        let api_requests = api.snapshot();
        let api_retries = api.retries();
        let result = CycleResult::of(report);
        let mut g = self.lock();
        g.cycles_seen += 1;
        let number = g.cycles_seen;
        let s = &mut g.snap;
        *s.cycles.entry(result).or_default() += 1;
        s.rows_read += report.rows_read;
        s.bytes_read += report.bytes_read;
        s.executions += report.executions;
        s.records_sent += report.records_sent;
        s.duplicates_skipped += report.duplicates_skipped;
        s.late_found += report.late_found;
        s.quarantined += report.quarantined;
        s.truncated += report.truncated;
        s.tool_calls += report.tool_calls;
        s.tool_calls_deduplicated += report.tool_calls_deduplicated;
        s.cycle_errors += report.errors.len() as u64;
        let secs = report.duration.as_secs_f64();
        if s.duration_buckets.len() != DURATION_BUCKETS.len() {
            s.duration_buckets = vec![0; DURATION_BUCKETS.len()];
        }
        for (bound, count) in DURATION_BUCKETS.iter().zip(s.duration_buckets.iter_mut()) {
            if secs <= *bound {
                *count += 1;
            }
        }
        s.duration_sum_seconds += secs;
        s.duration_count += 1;
        for (agent, n) in &report.per_agent {
            *s.agent_records.entry(agent.clone()).or_default() += n;
        }
        s.api_requests = api_requests;
        s.api_retries = api_retries;
        // A cycle that failed before discovery keeps the previous inventory on the page.
        if let Some(inv) = &report.inventory {
            s.agents_discovered = inv.agents.len();
            s.inference_tables = inv.readable().count();
            s.inventory = Some(inv.clone());
        }
        if result == CycleResult::Success {
            s.last_success = Some(wall);
            g.last_success_at = Some(now);
        }
        g.last_cycle_end = Some(now);
        let summary = CycleSummary {
            number,
            finished: wall,
            result,
            duration: report.duration,
            agents: report.agents,
            tables: report.tables,
            rows_read: report.rows_read,
            records_sent: report.records_sent,
            duplicates_skipped: report.duplicates_skipped,
            quarantined: report.quarantined,
            errors: report
                .errors
                .iter()
                .map(|e| cut(e, MAX_ERROR_CHARS))
                .collect(),
            per_agent: report.per_agent.clone(),
        };
        g.history.push_back(summary);
        while g.history.len() > HISTORY_CYCLES {
            g.history.pop_front();
        }
    }

    /// A consistent copy of the registry.
    pub fn snapshot(&self) -> Snapshot {
        let g = self.lock();
        let mut s = g.snap.clone();
        s.started = self.started;
        if s.duration_buckets.is_empty() {
            s.duration_buckets = vec![0; DURATION_BUCKETS.len()];
        }
        s.history = g.history.iter().cloned().collect();
        s
    }

    /// Ready when the last successful cycle ended less than two intervals ago, or, while a cycle
    /// runs longer than that (catching up after an outage), when the sink confirmed records less
    /// than two intervals ago.
    pub fn readiness(&self) -> Readiness {
        self.readiness_at(Instant::now())
    }

    /// [`Metrics::readiness`] at a given time (tests).
    pub fn readiness_at(&self, now: Instant) -> Readiness {
        let g = self.lock();
        let allowed = self.info.interval.saturating_mul(2);
        // Only records confirmed by a cycle still running: those of a cycle that ended (and
        // failed) say nothing about the one after it.
        let confirmed = self
            .progress
            .as_ref()
            .and_then(|p| p.last())
            .filter(|p| g.last_cycle_end.is_none_or(|end| *p > end))
            .map(|p| now.saturating_duration_since(p))
            .filter(|age| *age <= allowed);
        let recent_success = g
            .last_success_at
            .is_some_and(|at| now.saturating_duration_since(at) <= allowed);
        if let (Some(age), false) = (confirmed, recent_success) {
            return Readiness {
                ready: true,
                reason: format!(
                    "ready: a cycle is running and the sink confirmed records {}s ago",
                    age.as_secs()
                ),
            };
        }
        let failed_last = g
            .history
            .back()
            .is_some_and(|c| c.result == CycleResult::Failure);
        match g.last_success_at {
            None => Readiness {
                ready: false,
                reason: match g.history.back() {
                    None => "not ready: no cycle has finished yet".into(),
                    Some(c) => format!(
                        "not ready: no cycle has succeeded yet (last cycle #{}: {})",
                        c.number,
                        c.result.as_str()
                    ),
                },
            },
            Some(at) => {
                let age = now.saturating_duration_since(at);
                if age <= allowed {
                    Readiness {
                        ready: true,
                        reason: format!("ready: last successful cycle {}s ago", age.as_secs()),
                    }
                } else {
                    Readiness {
                        ready: false,
                        reason: format!(
                            "not ready: last successful cycle {}s ago, more than two intervals \
                             ({}s), and no records confirmed since; {}",
                            age.as_secs(),
                            allowed.as_secs(),
                            if failed_last {
                                "see GET / or the logs for the errors"
                            } else {
                                "a cycle is running without delivering anything (see GET / and \
                                 the logs)"
                            }
                        ),
                    }
                }
            }
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render_prometheus(&self) -> String {
        let s = self.snapshot();
        let ready = self.readiness().ready;
        let mut out = String::with_capacity(4096);
        let mut fam = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (suffix_labels, value) in samples {
                let _ = writeln!(out, "{name}{suffix_labels} {value}");
            }
        };
        let plain = |v: u64| vec![(String::new(), v.to_string())];

        fam(
            "databricks_shield_build_info",
            "gauge",
            "Always 1; the version is a label.",
            &[(labels(&[("version", &self.info.version)]), "1".into())],
        );
        fam(
            "databricks_shield_start_time_seconds",
            "gauge",
            "When the service started, in Unix seconds.",
            &[(String::new(), unix_seconds(self.started))],
        );
        fam(
            "databricks_shield_ready",
            "gauge",
            "1 when the last successful cycle ended within two intervals (as /readyz).",
            &[(String::new(), u64::from(ready).to_string())],
        );
        let cycles: Vec<(String, String)> = CycleResult::ALL
            .iter()
            .map(|r| {
                (
                    labels(&[("result", r.as_str())]),
                    s.cycles.get(r).copied().unwrap_or(0).to_string(),
                )
            })
            .collect();
        fam(
            "databricks_shield_cycles_total",
            "counter",
            "Cycles finished, by result (success, failure, interrupted).",
            &cycles,
        );
        fam(
            "databricks_shield_cycle_errors_total",
            "counter",
            "Errors reported by cycles (a failed cycle has at least one).",
            &plain(s.cycle_errors),
        );
        fam(
            "databricks_shield_rows_read_total",
            "counter",
            "Inference table rows returned by SQL statements.",
            &plain(s.rows_read),
        );
        fam(
            "databricks_shield_bytes_read_total",
            "counter",
            "Bytes of inference table rows returned by SQL statements.",
            &plain(s.bytes_read),
        );
        fam(
            "databricks_shield_executions_total",
            "counter",
            "Agent executions read (new and late rows).",
            &plain(s.executions),
        );
        fam(
            "databricks_shield_records_sent_total",
            "counter",
            "Akto records the sink confirmed, by sink.",
            &[(
                labels(&[("sink", self.info.sink)]),
                s.records_sent.to_string(),
            )],
        );
        fam(
            "databricks_shield_duplicates_skipped_total",
            "counter",
            "Rows skipped because they were already delivered.",
            &plain(s.duplicates_skipped),
        );
        fam(
            "databricks_shield_late_rows_found_total",
            "counter",
            "Rows that landed late (older request time) and were found by the late-row check.",
            &plain(s.late_found),
        );
        fam(
            "databricks_shield_records_quarantined_total",
            "counter",
            "Records Akto would reject, kept in STATE_DIR/quarantine.jsonl instead of being sent.",
            &plain(s.quarantined),
        );
        fam(
            "databricks_shield_records_truncated_total",
            "counter",
            "Payloads cut: in records of executions and traces delivered (to Akto's size limits or the sink's per-record limit), and while reading a row larger than one statement may return (each time it is read).",
            &plain(s.truncated),
        );
        fam(
            "databricks_shield_tool_calls_total",
            "counter",
            "Tool-call records the sink confirmed (one per tool call, from an inference row or a trace's TOOL span).",
            &plain(s.tool_calls),
        );
        fam(
            "databricks_shield_tool_calls_deduplicated_total",
            "counter",
            "Tool-call records left out because a trace (or an earlier record) already sent the same call, counted once their execution or trace is delivered.",
            &plain(s.tool_calls_deduplicated),
        );
        fam(
            "databricks_shield_databricks_retries_total",
            "counter",
            "Databricks requests retried (429, 503, throttling codes, connection errors).",
            &plain(s.api_retries),
        );
        let requests: Vec<(String, String)> = s
            .api_requests
            .iter()
            .map(|((route, status), n)| {
                let (method, path) = route.split_once(' ').unwrap_or(("", route.as_str()));
                (
                    labels(&[("method", method), ("route", path), ("status", status)]),
                    n.to_string(),
                )
            })
            .collect();
        fam(
            "databricks_shield_databricks_requests_total",
            "counter",
            "Databricks API requests, by method, route template and HTTP status (error: no response).",
            &requests,
        );
        let mut hist: Vec<(String, String)> = DURATION_BUCKETS
            .iter()
            .zip(s.duration_buckets.iter())
            .map(|(b, n)| (labels(&[("le", &format_float(*b))]), n.to_string()))
            .collect();
        hist.push((labels(&[("le", "+Inf")]), s.duration_count.to_string()));
        let mut out_hist = String::new();
        {
            let name = "databricks_shield_cycle_duration_seconds";
            let _ = writeln!(out_hist, "# HELP {name} How long cycles took.");
            let _ = writeln!(out_hist, "# TYPE {name} histogram");
            for (l, v) in &hist {
                let _ = writeln!(out_hist, "{name}_bucket{l} {v}");
            }
            let _ = writeln!(
                out_hist,
                "{name}_sum {}",
                format_float(s.duration_sum_seconds)
            );
            let _ = writeln!(out_hist, "{name}_count {}", s.duration_count);
        }
        fam(
            "databricks_shield_last_success_timestamp_seconds",
            "gauge",
            "When the last successful cycle ended, in Unix seconds (0: none yet).",
            &[(
                String::new(),
                s.last_success
                    .map(unix_seconds)
                    .unwrap_or_else(|| "0".into()),
            )],
        );
        fam(
            "databricks_shield_agents_discovered",
            "gauge",
            "Agents in the latest inventory.",
            &plain(s.agents_discovered as u64),
        );
        fam(
            "databricks_shield_inference_tables",
            "gauge",
            "Inference tables the latest inventory reads.",
            &plain(s.inference_tables as u64),
        );
        let per_agent: Vec<(String, String)> = s
            .agent_records
            .iter()
            .map(|(a, n)| (labels(&[("agent", a)]), n.to_string()))
            .collect();
        fam(
            "databricks_shield_agent_records_sent_total",
            "counter",
            "Akto records the sink confirmed, by agent (one label value per agent).",
            &per_agent,
        );
        out.push_str(&out_hist);
        out
    }
}

/// `{k="v",...}` with the values escaped as the exposition format requires; empty for none.
fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// Escapes a label value: backslash, double quote and line feed.
pub(crate) fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn format_float(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else if v > 0.0 {
        "+Inf".into()
    } else if v < 0.0 {
        "-Inf".into()
    } else {
        "NaN".into()
    }
}

fn unix_seconds(t: DateTime<Utc>) -> String {
    format_float(t.timestamp_millis() as f64 / 1000.0)
}

fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ServiceInfo {
        ServiceInfo {
            version: "0.1.0".into(),
            workspace: "adb-1.azuredatabricks.net".into(),
            catalog: "workspace".into(),
            schema: "default".into(),
            prefix: String::new(),
            sink: "http",
            sink_target: "Akto ingestion at http://akto:8080/".into(),
            interval: Duration::from_secs(60),
        }
    }

    fn report(sent: u64, errors: &[&str]) -> CycleReport {
        CycleReport {
            rows_read: sent,
            records_sent: sent,
            duration: Duration::from_millis(1500),
            errors: errors.iter().map(|e| e.to_string()).collect(),
            per_agent: [("bot\"x".to_string(), sent)].into_iter().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn readiness_follows_the_last_success_and_two_intervals() {
        let m = Metrics::new(info());
        let t0 = Instant::now();
        assert!(!m.readiness_at(t0).ready);
        m.observe_at(&report(1, &["boom"]), &ApiStats::default(), t0, Utc::now());
        let r = m.readiness_at(t0);
        assert!(!r.ready && r.reason.contains("failure"), "{r:?}");
        m.observe_at(&report(2, &[]), &ApiStats::default(), t0, Utc::now());
        assert!(m.readiness_at(t0 + Duration::from_secs(120)).ready);
        let late = m.readiness_at(t0 + Duration::from_secs(121));
        assert!(!late.ready && late.reason.contains("121s"), "{late:?}");
        // A later failure does not make it unready by itself; time does.
        m.observe_at(&report(0, &["x"]), &ApiStats::default(), t0, Utc::now());
        assert!(m.readiness_at(t0 + Duration::from_secs(60)).ready);
    }

    /// A cycle running for many intervals (catching up) stays ready while the sink confirms
    /// records; one that delivers nothing becomes unready, and the reason does not invent errors.
    #[test]
    fn a_long_cycle_that_keeps_delivering_stays_ready() {
        let progress = Arc::new(crate::run::Progress::default());
        let m = Metrics::new(info()).with_progress(progress.clone());
        let t0 = Instant::now();
        m.observe_at(&report(1, &[]), &ApiStats::default(), t0, Utc::now());
        let stuck = m.readiness_at(t0 + Duration::from_secs(200));
        assert!(!stuck.ready, "{stuck:?}");
        assert!(stuck.reason.contains("without delivering"), "{stuck:?}");
        assert!(!stuck.reason.contains("errors"), "{stuck:?}");
        progress.note_at(t0 + Duration::from_secs(150));
        let running = m.readiness_at(t0 + Duration::from_secs(200));
        assert!(running.ready, "{running:?}");
        assert!(running.reason.contains("cycle is running"), "{running:?}");
        assert!(running.reason.contains("50s ago"), "{running:?}");
        let late = m.readiness_at(t0 + Duration::from_secs(271));
        assert!(!late.ready, "{late:?}");
        // That cycle ends failed (one table fails, others delivered): its deliveries no longer
        // count, and the reason points to the errors.
        m.observe_at(
            &report(5, &["boom"]),
            &ApiStats::default(),
            t0 + Duration::from_secs(180),
            Utc::now(),
        );
        let failed = m.readiness_at(t0 + Duration::from_secs(200));
        assert!(!failed.ready, "{failed:?}");
        assert!(failed.reason.contains("for the errors"), "{failed:?}");
        // The next cycle delivers: ready again while it runs.
        progress.note_at(t0 + Duration::from_secs(190));
        assert!(m.readiness_at(t0 + Duration::from_secs(200)).ready);
    }

    #[test]
    fn counters_accumulate_and_history_is_bounded() {
        let m = Metrics::new(info());
        for i in 0..(HISTORY_CYCLES as u64 + 3) {
            m.observe(&report(i, &[]), &ApiStats::default());
        }
        let s = m.snapshot();
        let n = HISTORY_CYCLES as u64 + 3;
        assert_eq!(s.records_sent, (0..n).sum::<u64>());
        assert_eq!(s.cycles[&CycleResult::Success], n);
        assert_eq!(s.history.len(), HISTORY_CYCLES);
        assert_eq!(s.history.last().map(|c| c.number), Some(n));
        assert_eq!(s.duration_count, n);
        // 1.5 s falls in the 2.5 bucket and above, not in 1.0.
        assert_eq!(s.duration_buckets[1], 0);
        assert_eq!(s.duration_buckets[2], n);
    }

    #[test]
    fn exposition_escapes_labels_and_declares_every_family() {
        let m = Metrics::new(info());
        m.observe(&report(3, &[]), &ApiStats::default());
        let text = m.render_prometheus();
        assert!(text.contains("databricks_shield_agent_records_sent_total{agent=\"bot\\\"x\"} 3"));
        assert!(text.contains("databricks_shield_records_sent_total{sink=\"http\"} 3"));
        assert!(text.contains("databricks_shield_cycles_total{result=\"failure\"} 0"));
        assert!(text.contains("databricks_shield_cycle_duration_seconds_bucket{le=\"+Inf\"} 1"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
                })
                .unwrap_or(&name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "no TYPE for {line}"
            );
        }
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_CHARS + 10);
        let c = cut(&long, MAX_ERROR_CHARS);
        assert!(c.ends_with("...") && c.chars().count() == MAX_ERROR_CHARS + 3);
    }
}
