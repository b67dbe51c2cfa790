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
//! # One host per agent
//! The slug is not one-to-one: `support_bot`, `support-bot` and `Support.Bot` (or names that
//! differ only in non-ASCII letters) all give `support-bot`, and two agents sharing a host would
//! share an Akto collection and a tool-call registry (`toolcall:<host>`). So the host of an
//! inventory agent is decided over the whole inventory ([`unique_agent_labels`], kept in
//! `discovery::Inventory` and read through `Inventory::agent_host`):
//! - a name whose label no other agent of the inventory has keeps [`agent_host`]'s, so hosts
//!   never change while nothing collides;
//! - names that would share a label all get `-<hash8>` of their exact name instead
//!   (`support-bot-<hash8("support_bot")>`, the slug cut so the label stays within 63 bytes),
//!   whatever the order they are listed in; if such a label is itself another name's label, that
//!   other name gets its suffix too, and should two suffixed labels still meet (equal 32-bit
//!   hashes) they move to 16 hex digits. A new colliding agent thus changes the hosts of the
//!   colliding agents only.
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

use std::collections::BTreeMap;

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

/// The agent label of [`agent_host`] (the part before `.ai-agent.`): the slug of `agent`, cut
/// to 63 bytes with a hash, or `agent-<hash8>` when nothing is left of it.
pub fn agent_label(agent: &str) -> String {
    let agent_slug = slugify(agent, false);
    if agent_slug.is_empty() {
        format!("agent-{}", hash8(agent.as_bytes()))
    } else {
        shorten(&agent_slug, MAX_LABEL)
    }
}

/// The `host` header (= the Akto collection) of an agent: `<agent-slug>.ai-agent.<workspace>`.
/// See the module documentation for the exact scheme. Two agents of one inventory may get the
/// same value: the host of an inventory agent is `Inventory::agent_host`, which tells them apart.
pub fn agent_host(agent: &str, workspace_host: &str) -> String {
    host_for_label(&agent_label(agent), workspace_host)
}

/// `<label>.ai-agent.<workspace>` for an agent label decided elsewhere ([`agent_label`],
/// [`unique_agent_labels`]). Any other string is made a label first, as [`agent_label`] does
/// (which leaves a label unchanged).
pub fn host_for_label(label: &str, workspace_host: &str) -> String {
    let label = agent_label(label);
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
    format!("{label}.ai-agent.{ws}")
}

/// Highest suffix level of [`level_label`]: 0 plain, 1 `-<hash8>`, 2 `-<hash16>`.
const MAX_LEVEL: u8 = 2;

/// The label of `agent` at a suffix level: 0 is [`agent_label`]; 1 and 2 end in `-` and 8 or 16
/// hex digits of FNV-1a 64 over the exact name (the slug is cut so the label fits 63 bytes).
fn level_label(agent: &str, level: u8) -> String {
    if level == 0 {
        return agent_label(agent);
    }
    let h = fnv1a64(agent.as_bytes());
    let suffix = if level == 1 {
        format!("{:08x}", h >> 32)
    } else {
        format!("{h:016x}")
    };
    let slug = slugify(agent, false);
    let base = if slug.is_empty() { "agent" } else { &slug };
    let keep = MAX_LABEL - suffix.len() - 1;
    // `base` is ASCII here, so any byte index is a char boundary.
    let head = base.get(..keep).unwrap_or(base).trim_end_matches('-');
    if head.is_empty() {
        suffix
    } else {
        format!("{head}-{suffix}")
    }
}

/// The agent label of each distinct name of one inventory, such that distinct names get
/// distinct labels (see the module documentation): a name whose [`agent_label`] no other name
/// has keeps it; names that would share one all get `-<hash8 of the exact name>`. The result
/// depends only on the set of names, never on their order.
pub fn unique_agent_labels<'a, I>(names: I) -> BTreeMap<String, String>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut level: BTreeMap<&'a str, u8> = names.into_iter().map(|n| (n, 0)).collect();
    let mut labels: BTreeMap<&'a str, String> =
        level.keys().map(|n| (*n, agent_label(n))).collect();
    // Every round raises at least one name one level, or stops.
    for _ in 0..=usize::from(MAX_LEVEL) * level.len() {
        let mut by_label: BTreeMap<&str, Vec<&'a str>> = BTreeMap::new();
        for (n, l) in &labels {
            by_label.entry(l.as_str()).or_default().push(n);
        }
        let mut raise: Vec<&'a str> = Vec::new();
        for group in by_label.values().filter(|g| g.len() > 1) {
            // The names at the group's lowest level move: a suffixed label taken by another
            // name's plain one stays, the plain one gets its suffix.
            let lowest = group.iter().filter_map(|n| level.get(n).copied()).min();
            if let Some(lowest) = lowest.filter(|l| *l < MAX_LEVEL) {
                raise.extend(group.iter().filter(|n| level.get(*n) == Some(&lowest)));
            }
        }
        if raise.is_empty() {
            break;
        }
        for n in raise {
            if let Some(l) = level.get_mut(n) {
                *l += 1;
                labels.insert(n, level_label(n, *l));
            }
        }
    }
    labels
        .into_iter()
        .map(|(n, l)| (n.to_string(), l))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn labels(names: &[&str]) -> BTreeMap<String, String> {
        unique_agent_labels(names.iter().copied())
    }

    fn is_label(l: &str) -> bool {
        !l.is_empty()
            && l.len() <= MAX_LABEL
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    #[test]
    fn colliding_names_all_get_a_suffix_of_their_exact_name_others_keep_their_label() {
        let names = [
            "support_bot",
            "support-bot",
            "Support_Bot",
            "bot-ü",
            "bot-ö",
            "sales_assistant",
            "エージェント",
        ];
        let got = labels(&names);
        assert_eq!(got.len(), names.len());
        let distinct: BTreeSet<&String> = got.values().collect();
        assert_eq!(distinct.len(), names.len(), "{got:?}");
        for n in ["support_bot", "support-bot", "Support_Bot"] {
            assert_eq!(
                got[n],
                format!("support-bot-{}", hash8(n.as_bytes())),
                "{n}"
            );
        }
        for n in ["bot-ü", "bot-ö"] {
            assert_eq!(got[n], format!("bot-{}", hash8(n.as_bytes())), "{n}");
        }
        // No collision: the label (and so the Akto collection) is unchanged.
        for n in ["sales_assistant", "エージェント"] {
            assert_eq!(got[n], agent_label(n), "{n}");
            assert_eq!(
                host_for_label(&got[n], "ws.example"),
                agent_host(n, "ws.example")
            );
        }
        assert!(got.values().all(|l| is_label(l)), "{got:?}");
        // `host_for_label` makes any string a label first (a label stays as it is).
        for n in [
            "Support_Bot",
            "my.agent",
            "",
            "エージェント",
            &"x".repeat(300),
        ] {
            assert_eq!(host_for_label(n, "ws"), agent_host(n, "ws"), "{n:?}");
        }
    }

    #[test]
    fn labels_do_not_depend_on_listing_order() {
        let names = [
            "support_bot",
            "hr_helper",
            "Support-Bot",
            "support.bot",
            "x",
        ];
        let want = labels(&names);
        let distinct: BTreeSet<&String> = want.values().collect();
        assert_eq!(distinct.len(), names.len(), "{want:?}");
        let mut reversed = names;
        reversed.reverse();
        assert_eq!(labels(&reversed), want);
        for k in 1..names.len() {
            let mut rotated = names;
            rotated.rotate_left(k);
            assert_eq!(labels(&rotated), want, "rotated by {k}");
        }
        // Listed twice is the same name once.
        let doubled: Vec<&str> = names.iter().chain(names.iter()).copied().collect();
        assert_eq!(labels(&doubled), want);
    }

    #[test]
    fn a_new_collision_changes_only_the_colliding_agents() {
        let before = labels(&["support_bot", "hr_helper", "sales_assistant"]);
        for (n, l) in &before {
            assert_eq!(l, &agent_label(n));
        }
        let after = labels(&["support_bot", "hr_helper", "sales_assistant", "support-bot"]);
        assert_eq!(after["hr_helper"], before["hr_helper"]);
        assert_eq!(after["sales_assistant"], before["sales_assistant"]);
        assert_ne!(after["support_bot"], before["support_bot"]);
        assert_ne!(after["support_bot"], after["support-bot"]);
        // The collision ends: the remaining agent gets its plain label back.
        let gone = labels(&["support-bot", "hr_helper"]);
        assert_eq!(gone["support-bot"], "support-bot");
    }

    #[test]
    fn a_name_that_looks_like_a_suffixed_label_moves_instead() {
        let squatter = format!("support-bot-{}", hash8(b"support_bot"));
        let got = labels(&["support_bot", "support-bot", &squatter]);
        let distinct: BTreeSet<&String> = got.values().collect();
        assert_eq!(distinct.len(), 3, "{got:?}");
        // The colliding agent keeps the suffixed label; the plain name that took it moves.
        assert_eq!(got["support_bot"], squatter);
        assert_eq!(
            got[squatter.as_str()],
            format!("{squatter}-{}", hash8(squatter.as_bytes()))
        );
    }

    #[test]
    fn long_colliding_names_stay_within_one_label() {
        let a = "a_".repeat(60);
        let b = "a-".repeat(60);
        let c = "A.".repeat(60);
        let got = labels(&[&a, &b, &c]);
        let distinct: BTreeSet<&String> = got.values().collect();
        assert_eq!(distinct.len(), 3, "{got:?}");
        assert!(got.values().all(|l| is_label(l)), "{got:?}");
        let host = host_for_label(&got[&a], "https://adb-1.azuredatabricks.net/");
        assert!(
            host.ends_with(".ai-agent.adb-1.azuredatabricks.net"),
            "{host}"
        );
    }
}
