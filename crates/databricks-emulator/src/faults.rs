//! Faults on demand: a tiny rule language (`--faults`, `set_faults`, `POST /_emulator/faults`)
//! that makes chosen routes answer 429/503, slow down, drop connections, expire tokens, or makes
//! SQL statements stay PENDING or FAIL.
//!
//! Syntax: rules separated by `;`, each a list of `key=value` separated by `,`:
//! `route=/api/2.0/sql/statements,kind=429,count=3,retry_after=1;route=/oidc,kind=503,count=2`.
//! Keys: `route` (path prefix, default `/`), `kind` (429 | 503 | latency | drop | expire_tokens |
//! pending | fail), `count` (how many times the rule fires; default 1, `unlimited` for ever;
//! latency defaults to unlimited), `after` (let this many matching requests pass first),
//! `retry_after` (seconds, 429 only, default 1), `ms` (latency only), `polls` (pending only,
//! default 3), `table` (fail only: only statements reading this `catalog.schema.table`).
//! Admin routes (`/_emulator/...`) are never faulted.

use crate::error::EmulatorError;

/// What a rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FaultKind {
    TooMany { retry_after: u64 },
    Unavailable,
    Latency { ms: u64 },
    Drop,
    ExpireTokens,
    Pending { polls: u32 },
    Fail { table: Option<String> },
}

/// One parsed rule and its remaining budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FaultRule {
    pub route: String,
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
    pub expire_tokens: bool,
    /// `Some((status, retry_after))`.
    pub respond: Option<(u16, Option<u64>)>,
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
        let mut kind: Option<String> = None;
        let mut count: Option<Option<u64>> = None;
        let (mut after, mut retry_after, mut ms, mut polls) = (0u64, 1u64, None, 3u32);
        let mut table = None;
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
                "kind" => kind = Some(v.to_ascii_lowercase()),
                "count" => {
                    count = Some(if v == "unlimited" || v == "*" { None } else { Some(num(k, v)?) })
                }
                "after" => after = num(k, v)?,
                "retry_after" => retry_after = num(k, v)?,
                "ms" => ms = Some(num::<u64>(k, v)?),
                "polls" => polls = num(k, v)?,
                "table" => table = Some(v.to_lowercase()),
                other => {
                    return Err(EmulatorError::FaultSpec(format!(
                        "rule {}: unknown key `{other}` (known: route, kind, count, after, retry_after, ms, polls, table)",
                        n + 1
                    )))
                }
            }
        }
        let kind = match kind.as_deref() {
            Some("429") => FaultKind::TooMany { retry_after },
            Some("503") => FaultKind::Unavailable,
            Some("latency") => FaultKind::Latency {
                ms: ms.ok_or_else(|| EmulatorError::FaultSpec(format!("rule {}: kind=latency needs ms=N", n + 1)))?,
            },
            Some("drop") => FaultKind::Drop,
            Some("expire_tokens") => FaultKind::ExpireTokens,
            Some("pending") => FaultKind::Pending { polls },
            Some("fail") => FaultKind::Fail { table },
            Some(other) => {
                return Err(EmulatorError::FaultSpec(format!(
                    "rule {}: unknown kind `{other}` (known: 429, 503, latency, drop, expire_tokens, pending, fail)",
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
            kind,
            remaining: count.unwrap_or(default_count),
            skip: after,
        });
    }
    Ok(rules)
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

    /// HTTP-level faults for a request to `path`.
    pub(crate) fn on_request(&mut self, path: &str) -> HttpFaults {
        let mut out = HttpFaults::default();
        let mut fired = 0;
        for r in self.rules.iter_mut() {
            if !path.starts_with(&r.route) {
                continue;
            }
            let http = matches!(
                r.kind,
                FaultKind::TooMany { .. }
                    | FaultKind::Unavailable
                    | FaultKind::Latency { .. }
                    | FaultKind::Drop
                    | FaultKind::ExpireTokens
            );
            if !http
                || (out.respond.is_some() || out.drop)
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
                FaultKind::Latency { ms } => out.latency_ms += ms,
                FaultKind::Drop => out.drop = true,
                FaultKind::ExpireTokens => out.expire_tokens = true,
                _ => {}
            }
        }
        self.fired += fired;
        out
    }

    /// Statement-level faults at creation: (pending polls, fail?) for a statement reading `tables`.
    pub(crate) fn on_statement(&mut self, path: &str, tables: &[String]) -> (u32, bool) {
        let (mut polls, mut fail) = (0, false);
        for r in self.rules.iter_mut() {
            if !path.starts_with(&r.route) {
                continue;
            }
            let applies = match &r.kind {
                FaultKind::Pending { .. } => polls == 0,
                FaultKind::Fail { table } => {
                    !fail && table.as_ref().is_none_or(|t| tables.iter().any(|x| x == t))
                }
                _ => false,
            };
            if !applies || !Self::take(r) {
                continue;
            }
            self.fired += 1;
            match r.kind {
                FaultKind::Pending { polls: p } => polls = p,
                FaultKind::Fail { .. } => fail = true,
                _ => {}
            }
        }
        (polls, fail)
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
            f.on_request("/api/2.0/sql/statements").respond,
            Some((429, Some(3)))
        );
        assert_eq!(
            f.on_request("/api/2.0/sql/statements").respond,
            Some((429, Some(3)))
        );
        assert_eq!(f.on_request("/api/2.0/sql/statements").respond, None);
        assert_eq!(f.on_request("/oidc/v1/token").respond, Some((503, None)));
        assert_eq!(f.on_request("/oidc/v1/token").respond, None);
        assert_eq!(f.fired, 3);
    }

    #[test]
    fn after_skips_and_table_filter() {
        let mut f = Faults::default();
        f.replace(
            parse("kind=fail,table=w.d.a_payload,count=unlimited;kind=pending,polls=2,after=1")
                .unwrap_or_default(),
        );
        assert_eq!(
            f.on_statement("/api/2.0/sql/statements", &["w.d.b".into()]),
            (0, false)
        );
        assert_eq!(
            f.on_statement("/api/2.0/sql/statements", &["w.d.a_payload".into()]),
            (2, true)
        );
        assert_eq!(
            f.on_statement("/api/2.0/sql/statements", &["w.d.a_payload".into()]),
            (0, true)
        );
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
