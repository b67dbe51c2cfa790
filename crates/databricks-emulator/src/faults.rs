//! Faults on demand: a tiny rule language (`--faults`, `set_faults`, `POST /_emulator/faults`)
//! that makes chosen routes answer 429/503/403/404, slow down, drop connections (before or after
//! the request was handled), expire tokens, log an MLflow trace while a client pages, or makes SQL
//! statements run slowly, stay PENDING, FAIL or come back cut at a smaller byte limit.
//!
//! Syntax: rules separated by `;`, each a list of `key=value` separated by `,`:
//! `route=/api/2.0/sql/statements,kind=429,count=3,retry_after=1;route=/oidc,kind=503,count=2`.
//! Keys: `route` (path prefix, default `/`), `method` (GET | POST: only requests of that method;
//! default any), `kind` (429 | 503 | 403 | 404 | latency | drop | drop_after | expire_tokens |
//! insert_trace | slow | pending | fail | byte_limit), `count` (how many times the rule
//! fires; default 1, `unlimited` for ever; latency defaults to unlimited), `after` (let this many
//! matching requests pass first), `retry_after` (seconds, 429 only, default 1), `ms` (latency and
//! slow), `polls` (pending only, default 3), `table` (fail and byte_limit: only statements reading
//! this `catalog.schema.table`), `bytes` (byte_limit: the statement's byte_limit is at most this,
//! so its result comes back `truncated` past it), `at_ms` (insert_trace: before answering, one
//! trace with this start time, epoch ms, is logged to every experiment).
//!
//! `drop` closes the connection before the request is handled (nothing happened on the server);
//! `drop_after` handles it (a statement is created, a cancel takes effect) and then closes the
//! connection without sending the answer, as a network failure after the request arrived does.
//!
//! 403 and 404 answer as the route's service would: cloud storage (`/_signed/...`) with an XML
//! `AccessDenied` / `NoSuchKey`, the REST API with `PERMISSION_DENIED` /
//! `RESOURCE_DOES_NOT_EXIST`.
//! Admin routes (`/_emulator/...`) are never faulted.

use crate::error::EmulatorError;

/// What a rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FaultKind {
    TooMany { retry_after: u64 },
    Unavailable,
    Forbidden,
    NotFound,
    InsertTrace { at_ms: i64 },
    ByteLimit { bytes: usize, table: Option<String> },
    Latency { ms: u64 },
    Drop,
    DropAfter,
    ExpireTokens,
    Pending { polls: u32 },
    Slow { ms: u64 },
    Fail { table: Option<String> },
}

/// One parsed rule and its remaining budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FaultRule {
    pub route: String,
    /// Only requests of this method (upper case); `None` = any.
    pub method: Option<String>,
    pub kind: FaultKind,
    /// `None` = unlimited.
    pub remaining: Option<u64>,
    pub skip: u64,
}

/// What the HTTP layer must do for one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct HttpFaults {
    pub latency_ms: u64,
    pub drop: bool,
    /// Handle the request, then close the connection without the answer.
    pub drop_after: bool,
    pub expire_tokens: bool,
    /// `Some((status, retry_after))`.
    pub respond: Option<(u16, Option<u64>)>,
    /// Log a trace with this start time (ms) before answering.
    pub insert_trace: Option<i64>,
}

/// What the statement API must do for one new statement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct StatementFaults {
    /// Polls it stays PENDING.
    pub polls: u32,
    /// It runs at least this long (ms; a cancel stops it).
    pub slow_ms: u64,
    /// It FAILs.
    pub fail: bool,
    /// Its byte_limit is at most this.
    pub byte_limit: Option<usize>,
}

/// The active rule set.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    rules: Vec<FaultRule>,
    pub fired: u64,
}

fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, EmulatorError> {
    v.parse::<T>().map_err(|_| {
        EmulatorError::FaultSpec(format!(
            "`{key}={v}` is not a non-negative integer; write e.g. {key}=3"
        ))
    })
}

/// Parse a fault spec ("" = no faults).
pub(crate) fn parse(spec: &str) -> Result<Vec<FaultRule>, EmulatorError> {
    let mut rules = Vec::new();
    for (n, rule) in spec.split(';').map(str::trim).enumerate() {
        if rule.is_empty() {
            continue;
        }
        let mut route = "/".to_string();
        let mut method = None;
        let mut kind: Option<String> = None;
        let mut count: Option<Option<u64>> = None;
        let (mut after, mut retry_after, mut ms, mut polls) = (0u64, 1u64, None, 3u32);
        let mut table = None;
        let (mut bytes, mut at_ms) = (None, None);
        for kv in rule.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(EmulatorError::FaultSpec(format!(
                    "rule {}: `{kv}` is not key=value",
                    n + 1
                )));
            };
            let (k, v) = (k.trim(), v.trim());
            match k {
                "route" => {
                    if !v.starts_with('/') {
                        return Err(EmulatorError::FaultSpec(format!("rule {}: route `{v}` must start with `/`", n + 1)));
                    }
                    route = v.to_string();
                }
                "method" => {
                    let m = v.to_ascii_uppercase();
                    if !matches!(m.as_str(), "GET" | "POST") {
                        return Err(EmulatorError::FaultSpec(format!("rule {}: method `{v}` is not GET or POST", n + 1)));
                    }
                    method = Some(m);
                }
                "kind" => kind = Some(v.to_ascii_lowercase()),
                "count" => {
                    count = Some(if v == "unlimited" || v == "*" { None } else { Some(num(k, v)?) })
                }
                "after" => after = num(k, v)?,
                "retry_after" => retry_after = num(k, v)?,
                "ms" => ms = Some(num::<u64>(k, v)?),
                "polls" => polls = num(k, v)?,
                "table" => table = Some(v.to_lowercase()),
                "bytes" => bytes = Some(num::<usize>(k, v)?),
                "at_ms" => at_ms = Some(num::<i64>(k, v)?),
                other => {
                    return Err(EmulatorError::FaultSpec(format!(
                        "rule {}: unknown key `{other}` (known: route, method, kind, count, after, retry_after, ms, polls, table, bytes, at_ms)",
                        n + 1
                    )))
                }
            }
        }
        let kind = match kind.as_deref() {
            Some("429") => FaultKind::TooMany { retry_after },
            Some("503") => FaultKind::Unavailable,
            Some("403") => FaultKind::Forbidden,
            Some("404") => FaultKind::NotFound,
            Some("insert_trace") => FaultKind::InsertTrace {
                at_ms: at_ms.ok_or_else(|| {
                    EmulatorError::FaultSpec(format!("rule {}: kind=insert_trace needs at_ms=EPOCH_MS", n + 1))
                })?,
            },
            Some("byte_limit") => FaultKind::ByteLimit {
                bytes: bytes.ok_or_else(|| {
                    EmulatorError::FaultSpec(format!("rule {}: kind=byte_limit needs bytes=N", n + 1))
                })?,
                table,
            },
            Some("latency") => FaultKind::Latency {
                ms: ms.ok_or_else(|| EmulatorError::FaultSpec(format!("rule {}: kind=latency needs ms=N", n + 1)))?,
            },
            Some("drop") => FaultKind::Drop,
            Some("drop_after") => FaultKind::DropAfter,
            Some("expire_tokens") => FaultKind::ExpireTokens,
            Some("pending") => FaultKind::Pending { polls },
            Some("slow") => FaultKind::Slow {
                ms: ms.ok_or_else(|| EmulatorError::FaultSpec(format!("rule {}: kind=slow needs ms=N", n + 1)))?,
            },
            Some("fail") => FaultKind::Fail { table },
            Some(other) => {
                return Err(EmulatorError::FaultSpec(format!(
                    "rule {}: unknown kind `{other}` (known: 429, 503, 403, 404, latency, drop, drop_after, expire_tokens, insert_trace, slow, pending, fail, byte_limit)",
                    n + 1
                )))
            }
            None => return Err(EmulatorError::FaultSpec(format!("rule {}: missing kind=...", n + 1))),
        };
        let default_count = if matches!(kind, FaultKind::Latency { .. }) {
            None
        } else {
            Some(1)
        };
        rules.push(FaultRule {
            route,
            method,
            kind,
            remaining: count.unwrap_or(default_count),
            skip: after,
        });
    }
    Ok(rules)
}

impl FaultRule {
    fn matches(&self, method: &str, path: &str) -> bool {
        path.starts_with(&self.route)
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
    }
}

impl Faults {
    pub(crate) fn replace(&mut self, rules: Vec<FaultRule>) {
        self.rules = rules;
    }

    fn take(rule: &mut FaultRule) -> bool {
        if rule.skip > 0 {
            rule.skip -= 1;
            return false;
        }
        match &mut rule.remaining {
            None => true,
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
        }
    }

    /// HTTP-level faults for a `method` request to `path`.
    pub(crate) fn on_request(&mut self, method: &str, path: &str) -> HttpFaults {
        let mut out = HttpFaults::default();
        let mut fired = 0;
        for r in self.rules.iter_mut() {
            if !r.matches(method, path) {
                continue;
            }
            let http = matches!(
                r.kind,
                FaultKind::TooMany { .. }
                    | FaultKind::Unavailable
                    | FaultKind::Forbidden
                    | FaultKind::NotFound
                    | FaultKind::Latency { .. }
                    | FaultKind::Drop
                    | FaultKind::DropAfter
                    | FaultKind::ExpireTokens
                    | FaultKind::InsertTrace { .. }
            );
            if !http
                || (out.respond.is_some() || out.drop || out.drop_after)
                    && !matches!(r.kind, FaultKind::Latency { .. })
            {
                continue;
            }
            if !Self::take(r) {
                continue;
            }
            fired += 1;
            match r.kind {
                FaultKind::TooMany { retry_after } => out.respond = Some((429, Some(retry_after))),
                FaultKind::Unavailable => out.respond = Some((503, None)),
                FaultKind::Forbidden => out.respond = Some((403, None)),
                FaultKind::NotFound => out.respond = Some((404, None)),
                FaultKind::InsertTrace { at_ms } => out.insert_trace = Some(at_ms),
                FaultKind::Latency { ms } => out.latency_ms += ms,
                FaultKind::Drop => out.drop = true,
                FaultKind::DropAfter => out.drop_after = true,
                FaultKind::ExpireTokens => out.expire_tokens = true,
                _ => {}
            }
        }
        self.fired += fired;
        out
    }

    /// Statement-level faults at creation, for a statement reading `tables`.
    pub(crate) fn on_statement(&mut self, path: &str, tables: &[String]) -> StatementFaults {
        let mut out = StatementFaults::default();
        let reads =
            |table: &Option<String>| table.as_ref().is_none_or(|t| tables.iter().any(|x| x == t));
        for r in self.rules.iter_mut() {
            // Statements are created by POST.
            if !r.matches("POST", path) {
                continue;
            }
            let applies = match &r.kind {
                FaultKind::Pending { .. } => out.polls == 0,
                FaultKind::Slow { .. } => out.slow_ms == 0,
                FaultKind::Fail { table } => !out.fail && reads(table),
                FaultKind::ByteLimit { table, .. } => out.byte_limit.is_none() && reads(table),
                _ => false,
            };
            if !applies || !Self::take(r) {
                continue;
            }
            self.fired += 1;
            match r.kind {
                FaultKind::Pending { polls: p } => out.polls = p,
                FaultKind::Slow { ms } => out.slow_ms = ms,
                FaultKind::Fail { .. } => out.fail = true,
                FaultKind::ByteLimit { bytes, .. } => out.byte_limit = Some(bytes),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_counts() {
        let rules =
            parse("route=/api/2.0/sql,kind=429,count=2,retry_after=3; route=/oidc,kind=503")
                .unwrap_or_default();
        assert_eq!(rules.len(), 2);
        let mut f = Faults::default();
        f.replace(rules);
        assert_eq!(
            f.on_request("GET", "/api/2.0/sql/statements").respond,
            Some((429, Some(3)))
        );
        assert_eq!(
            f.on_request("GET", "/api/2.0/sql/statements").respond,
            Some((429, Some(3)))
        );
        assert_eq!(f.on_request("GET", "/api/2.0/sql/statements").respond, None);
        assert_eq!(
            f.on_request("GET", "/oidc/v1/token").respond,
            Some((503, None))
        );
        assert_eq!(f.on_request("GET", "/oidc/v1/token").respond, None);
        assert_eq!(f.fired, 3);
    }

    #[test]
    fn after_skips_and_table_filter() {
        let mut f = Faults::default();
        f.replace(
            parse("kind=fail,table=w.d.a_payload,count=unlimited;kind=pending,polls=2,after=1")
                .unwrap_or_default(),
        );
        let st = |f: &mut Faults, t: &str| {
            let s = f.on_statement("/api/2.0/sql/statements", &[t.into()]);
            (s.polls, s.fail)
        };
        assert_eq!(st(&mut f, "w.d.b"), (0, false));
        assert_eq!(st(&mut f, "w.d.a_payload"), (2, true));
        assert_eq!(st(&mut f, "w.d.a_payload"), (0, true));
    }

    #[test]
    fn byte_limits_refusals_and_trace_inserts() {
        let mut f = Faults::default();
        f.replace(
            parse(
                "kind=byte_limit,bytes=700,table=w.d.spans,count=unlimited;\
                 route=/_signed/traces/tr-1,kind=404,count=2;route=/api/2.0/mlflow,kind=403;\
                 route=/api/3.0/mlflow/traces/search,kind=insert_trace,at_ms=1234,after=1",
            )
            .unwrap_or_default(),
        );
        let s = "/api/2.0/sql/statements";
        assert_eq!(f.on_statement(s, &["w.d.other".into()]).byte_limit, None);
        assert_eq!(
            f.on_statement(s, &["w.d.spans".into()]).byte_limit,
            Some(700)
        );
        assert_eq!(
            f.on_statement(s, &["w.d.spans".into()]).byte_limit,
            Some(700)
        );
        assert_eq!(f.on_request("GET", "/_signed/traces/tr-2").respond, None);
        assert_eq!(
            f.on_request("GET", "/_signed/traces/tr-1").respond,
            Some((404, None))
        );
        assert_eq!(
            f.on_request("GET", "/_signed/traces/tr-1").respond,
            Some((404, None))
        );
        assert_eq!(f.on_request("GET", "/_signed/traces/tr-1").respond, None);
        assert_eq!(
            f.on_request("GET", "/api/2.0/mlflow/traces/x").respond,
            Some((403, None))
        );
        let search = "/api/3.0/mlflow/traces/search";
        assert_eq!(f.on_request("POST", search).insert_trace, None);
        assert_eq!(f.on_request("POST", search).insert_trace, Some(1234));
        assert_eq!(f.on_request("POST", search).insert_trace, None);
    }

    #[test]
    fn method_filter_and_drop_after() {
        let mut f = Faults::default();
        f.replace(
            parse(
                "route=/api/2.0/sql/statements/,method=get,kind=503,count=unlimited;\
                 route=/api/2.0/sql/statements,method=POST,kind=drop_after;\
                 route=/x,method=GET,kind=pending,polls=5;route=/y,kind=slow,ms=40",
            )
            .unwrap_or_default(),
        );
        let poll = "/api/2.0/sql/statements/01f0-id";
        assert_eq!(f.on_request("GET", poll).respond, Some((503, None)));
        let create = f.on_request("POST", "/api/2.0/sql/statements");
        assert!(create.drop_after && !create.drop && create.respond.is_none());
        assert!(!f.on_request("POST", "/api/2.0/sql/statements").drop_after);
        // The GET rule leaves the cancels (POST) alone.
        let cancel = f.on_request("POST", &format!("{poll}/cancel"));
        assert_eq!(cancel, HttpFaults::default());
        // Statements are created by POST: a GET-only statement rule never applies.
        assert_eq!(f.on_statement("/x", &[]).polls, 0);
        assert_eq!(f.on_statement("/y", &[]).slow_ms, 40);
        assert_eq!(f.on_statement("/y", &[]).slow_ms, 0);
    }

    #[test]
    fn bad_specs_name_the_problem() {
        for (spec, needle) in [
            ("kind=boom", "unknown kind"),
            ("route=api,kind=503", "must start with"),
            ("kind=429,count=x", "count=x"),
            ("kind=latency", "ms=N"),
            ("route=/x", "missing kind"),
            ("kind=503,colour=red", "unknown key"),
            ("kind=byte_limit", "bytes=N"),
            ("kind=insert_trace", "at_ms=EPOCH_MS"),
            ("kind=byte_limit,bytes=-1", "bytes=-1"),
            ("kind=503,method=PUT", "not GET or POST"),
            ("kind=slow", "kind=slow needs ms=N"),
        ] {
            let e = parse(spec).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,120}") {
            let _ = parse(&s);
        }
    }
}
