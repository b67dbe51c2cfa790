//! Names that decide where a record lands in Akto: the `host` header (one Akto collection per
//! agent) and the request paths.
//!
//! # Host scheme
//! `agent_host(agent, workspace_host)` = `<agent-slug>.ai-agent.<workspace-host>`:
//! - `workspace_host` may be a URL: scheme, user info, path, query and port are dropped.
//! - Everything is lowercased; `_` and every character outside `[a-z0-9-]` becomes `-`
//!   (in the agent slug `.` too, so the agent is always exactly one label); runs of `-` collapse
//!   and labels are trimmed of `-`; empty workspace labels are dropped.
//! - An agent name with nothing left (e.g. only non-ASCII) becomes `agent-<hash8>`; an empty
//!   workspace becomes `unknown-workspace`.
//! - Each label is at most 63 bytes and the whole at most 253: a label that is too long is cut
//!   and ends in `-<hash8>`, where hash8 is 8 hex digits of FNV-1a 64 over the full label, so the
//!   result is stable for the same inputs and distinct names stay distinct.
//!
//! Example: agent `Support_Bot` on `https://Adb-123.4.azuredatabricks.net:443/` gives
//! `support-bot.ai-agent.adb-123.4.azuredatabricks.net`.
//!
//! # Paths
//! - `/serving-endpoints/<endpoint>/invocations` for agents behind a serving endpoint;
//! - `/tables/<catalog.schema.table>/invocations` for agents known only from their inference
//!   table (no endpoint), using the full table name;
//! - `/tools/<tool-name>` for tool calls.
//!
//! Segments keep `[A-Za-z0-9-._~]` and percent-encode every other byte; `.`/`..` and empty
//! are encoded too and an empty segment becomes `unknown`, so a segment never changes the path's
//! shape.

/// Longest DNS label.
const MAX_LABEL: usize = 63;
/// Longest host name.
const MAX_HOST: usize = 253;
/// Longest workspace part, leaving room for a readable agent label.
const MAX_WORKSPACE: usize = MAX_HOST - MAX_LABEL - ".ai-agent.".len();
/// Longest tool-name path segment before it is shortened with a hash.
const MAX_TOOL_SEGMENT: usize = 200;

/// FNV-1a 64: a small, stable hash (unlike `DefaultHasher`, fixed across Rust versions).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn hash8(bytes: &[u8]) -> String {
    format!("{:08x}", fnv1a64(bytes) >> 32)
}

/// Lowercase, map every byte outside `[a-z0-9]` (and `.` when `keep_dots`) to `-`, collapse runs
/// of `-`, trim `-` around every label.
fn slugify(input: &str, keep_dots: bool) -> String {
    let mut out = String::with_capacity(input.len());
    for c in input.chars() {
        let c = c.to_ascii_lowercase();
        let mapped = if c.is_ascii_lowercase() || c.is_ascii_digit() || (keep_dots && c == '.') {
            c
        } else {
            '-'
        };
        if mapped == '-' && out.ends_with('-') {
            continue;
        }
        out.push(mapped);
    }
    out.split('.')
        .map(|l| l.trim_matches('-'))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(".")
}

/// Cut `label` to at most `max` bytes, ending in `-<hash8>` of the full label when cut.
fn shorten(label: &str, max: usize) -> String {
    if label.len() <= max {
        return label.to_string();
    }
    let suffix = hash8(label.as_bytes());
    let keep = max.saturating_sub(suffix.len() + 1);
    // `label` is ASCII here, so any byte index is a char boundary.
    let head = label.get(..keep).unwrap_or("").trim_end_matches('-');
    if head.is_empty() {
        suffix
    } else {
        format!("{head}-{suffix}")
    }
}

/// The host part of a workspace URL or bare host name, without scheme, user info, port or path.
fn bare_host(workspace_host: &str) -> &str {
    let s = workspace_host.trim();
    let s = match s.find("://") {
        Some(i) => &s[i + 3..],
        None => s,
    };
    let s = s.split(['/', '?', '#']).next().unwrap_or("");
    let s = match s.rfind('@') {
        Some(i) => &s[i + 1..],
        None => s,
    };
    if let Some(rest) = s.strip_prefix('[') {
        // IPv6 literal: `[::1]:8080`.
        return rest.split(']').next().unwrap_or("");
    }
    match s.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => s,
    }
}

/// The `host` header (= the Akto collection) of an agent: `<agent-slug>.ai-agent.<workspace>`.
/// See the module documentation for the exact scheme.
pub fn agent_host(agent: &str, workspace_host: &str) -> String {
    let agent_slug = slugify(agent, false);
    let agent_slug = if agent_slug.is_empty() {
        format!("agent-{}", hash8(agent.as_bytes()))
    } else {
        shorten(&agent_slug, MAX_LABEL)
    };

    let ws = slugify(bare_host(workspace_host), true);
    let mut labels: Vec<String> = ws.split('.').map(|l| shorten(l, MAX_LABEL)).collect();
    labels.retain(|l| !l.is_empty());
    if labels.is_empty() {
        labels.push("unknown-workspace".to_string());
    }
    let mut ws = labels.join(".");
    if ws.len() > MAX_WORKSPACE {
        // Keep the most significant (rightmost) labels that fit, prefixed by a hash label of
        // the whole workspace so different long hosts stay distinct.
        let tag = format!("ws-{}", hash8(ws.as_bytes()));
        let mut kept: Vec<&str> = Vec::new();
        let mut len = tag.len();
        for l in labels.iter().rev() {
            if len + 1 + l.len() > MAX_WORKSPACE {
                break;
            }
            len += 1 + l.len();
            kept.push(l);
        }
        kept.push(&tag);
        kept.reverse();
        ws = kept.join(".");
    }
    format!("{agent_slug}.ai-agent.{ws}")
}

/// Percent-encode one path segment (RFC 3986 unreserved characters are kept).
pub(crate) fn encode_segment(segment: &str) -> String {
    if segment.is_empty() {
        return "unknown".to_string();
    }
    if segment == "." || segment == ".." {
        return segment.replace('.', "%2E");
    }
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The invocation path of an agent: `/serving-endpoints/<endpoint>/invocations`, or
/// `/tables/<catalog.schema.table>/invocations` when the agent has no endpoint.
pub fn invocation_path(endpoint: Option<&str>, table: &str) -> String {
    match endpoint.map(str::trim).filter(|e| !e.is_empty()) {
        Some(e) => format!("/serving-endpoints/{}/invocations", encode_segment(e)),
        None => format!("/tables/{}/invocations", encode_segment(table.trim())),
    }
}

/// The path of a tool-call record: `/tools/<tool-name>`; an empty name becomes `unknown`, a very
/// long one is shortened with a hash suffix.
pub(crate) fn tool_path(name: &str) -> String {
    let name = name.trim();
    let seg = if name.is_empty() {
        "unknown".to_string()
    } else {
        encode_segment(name)
    };
    let seg = if seg.len() > MAX_TOOL_SEGMENT {
        // Encoded segments are ASCII, so slicing at any index is safe.
        let head = seg.get(..MAX_TOOL_SEGMENT - 9).unwrap_or("");
        // Do not cut a `%XX` escape in half.
        let head = match head.rfind('%') {
            Some(i) if i + 3 > head.len() => &head[..i],
            _ => head,
        };
        format!("{head}-{}", hash8(name.as_bytes()))
    } else {
        seg
    };
    format!("/tools/{seg}")
}
