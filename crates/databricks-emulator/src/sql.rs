//! Translation of the Databricks (Spark) SQL the connector sends into SQLite SQL.
//!
//! Only what must change is changed: three-part and backtick names, Spark string literals in
//! double quotes, typed literals, CAST, a few Spark functions. Everything else is executed as
//! written by SQLite, so a wrong column, filter or ORDER BY fails or returns wrong rows.
//! Syntax that Spark would reject but SQLite would accept is refused here (see
//! [`SQLITE_ONLY_FUNCTIONS`] and the operator checks), so the connector cannot come to rely on it.
//!
//! Architecture Invariant: statements are never pattern-matched; this module only rewrites tokens.

use std::collections::HashSet;

/// A SQL failure as the Statement Execution API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SqlError {
    /// `status.error.error_code`.
    pub code: &'static str,
    /// `status.error.message`, starting with the Spark error condition in brackets.
    pub message: String,
}

impl SqlError {
    pub(crate) fn bad(condition: &str, msg: impl AsRef<str>) -> SqlError {
        SqlError {
            code: "BAD_REQUEST",
            message: format!("[{condition}] {}", msg.as_ref()),
        }
    }
    fn syntax(msg: impl AsRef<str>) -> SqlError {
        SqlError::bad("PARSE_SYNTAX_ERROR", msg)
    }
}

/// Functions SQLite has but Spark/Databricks SQL does not: refused with UNRESOLVED_ROUTINE.
pub(crate) const SQLITE_ONLY_FUNCTIONS: &[&str] = &[
    "strftime",
    "julianday",
    "datetime",
    "time",
    "unixepoch",
    "printf",
    "format",
    "glob",
    "likelihood",
    "likely",
    "unlikely",
    "randomblob",
    "zeroblob",
    "total_changes",
    "changes",
    "last_insert_rowid",
    "sqlite_version",
    "sqlite_source_id",
    "sqlite_compileoption_used",
    "sqlite_compileoption_get",
    "sqlite_offset",
    "quote",
    "json_extract",
    "json_each",
    "json_tree",
    "json_type",
    "json_valid",
    "json_array_length",
    "json_group_array",
    "json_group_object",
    "json_insert",
    "json_replace",
    "json_set",
    "json_remove",
    "json_patch",
    "json_quote",
    "json",
    "jsonb",
    "group_concat",
    "total",
    "iif",
    "load_extension",
    "soundex",
    "unicode",
];

/// Keywords/operators SQLite accepts and Spark does not.
const SQLITE_ONLY_KEYWORDS: &[&str] = &[
    "GLOB", "NOTNULL", "INDEXED", "PRAGMA", "ATTACH", "DETACH", "VACUUM", "REINDEX",
];

const AFTER_TABLE_KEYWORDS: &[&str] = &[
    "WHERE",
    "GROUP",
    "ORDER",
    "LIMIT",
    "JOIN",
    "INNER",
    "LEFT",
    "RIGHT",
    "FULL",
    "CROSS",
    "NATURAL",
    "ON",
    "USING",
    "UNION",
    "EXCEPT",
    "INTERSECT",
    "HAVING",
    "WINDOW",
    "OFFSET",
    "TABLESAMPLE",
    "LATERAL",
    "QUALIFY",
    "MINUS",
    "SORT",
    "CLUSTER",
    "DISTRIBUTE",
];

const END_FROM_KEYWORDS: &[&str] = &[
    "WHERE",
    "GROUP",
    "ORDER",
    "LIMIT",
    "HAVING",
    "UNION",
    "EXCEPT",
    "INTERSECT",
    "WINDOW",
    "ON",
    "USING",
    "QUALIFY",
    "OFFSET",
    "SELECT",
];

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ws,
    Str(String),
    Ident(String, bool),
    Num(String),
    Param(String),
    Punct(&'static str),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, SqlError> {
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch.is_whitespace() {
            i += 1;
            out.push(Tok::Ws);
        } else if ch == '-' && next == Some('-') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
            out.push(Tok::Ws);
        } else if ch == '/' && next == Some('*') {
            let mut j = i + 2;
            while j + 1 < c.len() && !(c[j] == '*' && c[j + 1] == '/') {
                j += 1;
            }
            if j + 1 >= c.len() {
                return Err(SqlError::syntax(
                    "Unclosed bracketed comment: add the closing */",
                ));
            }
            i = j + 2;
            out.push(Tok::Ws);
        } else if ch == '\'' || ch == '"' {
            let mut j = i + 1;
            let mut v = String::new();
            loop {
                match c.get(j) {
                    None => {
                        return Err(SqlError::syntax(format!(
                            "Unclosed string literal starting at position {i}"
                        )))
                    }
                    Some('\\') => {
                        let e = c.get(j + 1).copied().unwrap_or('\\');
                        match e {
                            'n' => v.push('\n'),
                            't' => v.push('\t'),
                            'r' => v.push('\r'),
                            '0' => v.push('\0'),
                            '%' | '_' => {
                                v.push('\\');
                                v.push(e);
                            }
                            other => v.push(other),
                        }
                        j += 2;
                    }
                    Some(q) if *q == ch => break,
                    Some(x) => {
                        v.push(*x);
                        j += 1;
                    }
                }
            }
            i = j + 1;
            out.push(Tok::Str(v));
        } else if ch == '`' {
            let mut j = i + 1;
            let mut v = String::new();
            loop {
                match c.get(j) {
                    None => return Err(SqlError::syntax("Unclosed backtick identifier")),
                    Some('`') if c.get(j + 1) == Some(&'`') => {
                        v.push('`');
                        j += 2;
                    }
                    Some('`') => break,
                    Some(x) => {
                        v.push(*x);
                        j += 1;
                    }
                }
            }
            i = j + 1;
            out.push(Tok::Ident(v, true));
        } else if ch.is_ascii_alphabetic() || ch == '_' {
            let mut j = i;
            while j < c.len() && (c[j].is_ascii_alphanumeric() || c[j] == '_') {
                j += 1;
            }
            out.push(Tok::Ident(c[i..j].iter().collect(), false));
            i = j;
        } else if ch.is_ascii_digit() || (ch == '.' && next.is_some_and(|n| n.is_ascii_digit())) {
            let mut j = i;
            while j < c.len() && (c[j].is_ascii_digit() || c[j] == '.') {
                j += 1;
            }
            if j < c.len() && (c[j] == 'e' || c[j] == 'E') {
                let mut k = j + 1;
                if k < c.len() && (c[k] == '+' || c[k] == '-') {
                    k += 1;
                }
                if k < c.len() && c[k].is_ascii_digit() {
                    j = k;
                    while j < c.len() && c[j].is_ascii_digit() {
                        j += 1;
                    }
                }
            }
            out.push(Tok::Num(c[i..j].iter().collect()));
            i = j;
        } else if ch == ':' {
            if next == Some(':') {
                return Err(SqlError::syntax("The `::` cast operator is not supported by the emulator; write CAST(expr AS type)"));
            }
            let mut j = i + 1;
            while j < c.len() && (c[j].is_ascii_alphanumeric() || c[j] == '_') {
                j += 1;
            }
            if j == i + 1 || c[i + 1].is_ascii_digit() {
                return Err(SqlError::syntax(
                    "Expected a parameter name after `:` (named markers look like :since)",
                ));
            }
            out.push(Tok::Param(c[i + 1..j].iter().collect()));
            i = j;
        } else {
            let two: String = c[i..(i + 3).min(c.len())].iter().collect();
            let (p, n): (&'static str, usize) = if two.starts_with("<=>") {
                ("<=>", 3)
            } else if two.starts_with("==") {
                return Err(SqlError::syntax("`==` is SQLite syntax; use `=`"));
            } else if two.starts_with("<=") {
                ("<=", 2)
            } else if two.starts_with(">=") {
                (">=", 2)
            } else if two.starts_with("<>") {
                ("<>", 2)
            } else if two.starts_with("!=") {
                ("!=", 2)
            } else if two.starts_with("||") {
                ("||", 2)
            } else {
                let p = match ch {
                    '(' => "(",
                    ')' => ")",
                    ',' => ",",
                    '.' => ".",
                    ';' => ";",
                    '*' => "*",
                    '+' => "+",
                    '-' => "-",
                    '/' => "/",
                    '%' => "%",
                    '<' => "<",
                    '>' => ">",
                    '=' => "=",
                    '&' => "&",
                    '|' => "|",
                    '~' => "~",
                    '^' => "^",
                    '?' => {
                        return Err(SqlError::bad(
                            "UNSUPPORTED_FEATURE.POSITIONAL_PARAMETERS",
                            "Positional `?` parameters are not supported by the Statement Execution API; use named markers like :name",
                        ))
                    }
                    '$' | '@' => {
                        return Err(SqlError::syntax(format!(
                            "`{ch}name` parameters are not Spark SQL; use named markers like :name"
                        )))
                    }
                    '[' | ']' => {
                        return Err(SqlError::syntax(
                            "Square brackets are not supported by the emulator (SQLite would read them as identifiers)",
                        ))
                    }
                    other => return Err(SqlError::syntax(format!("Syntax error at or near '{other}'"))),
                };
                (p, 1)
            };
            out.push(Tok::Punct(p));
            i += n;
        }
    }
    Ok(out)
}

/// The result of a translation.
#[derive(Debug, Clone)]
pub(crate) struct Translated {
    /// SQLite SQL.
    pub sql: String,
    /// Referenced tables as `(catalog, schema, table)`, lowercase.
    pub tables: Vec<(String, String, String)>,
    /// Named parameter markers, in order of first appearance.
    pub markers: Vec<String>,
}

fn qident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn qstr(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Translate `stmt`. `resolve(catalog, schema, table)` returns the SQLite relation name of a
/// known table, or `None` (-> TABLE_OR_VIEW_NOT_FOUND).
pub(crate) fn translate(
    stmt: &str,
    default_catalog: &str,
    default_schema: &str,
    resolve: &dyn Fn(&str, &str, &str) -> Option<String>,
) -> Result<Translated, SqlError> {
    let toks = tokenize(stmt)?;
    let sig: Vec<usize> = (0..toks.len()).filter(|&i| toks[i] != Tok::Ws).collect();
    let upper = |k: usize| -> Option<String> {
        match sig.get(k).map(|&i| &toks[i]) {
            Some(Tok::Ident(s, false)) => Some(s.to_ascii_uppercase()),
            _ => None,
        }
    };
    let is_punct =
        |k: usize, p: &str| matches!(sig.get(k).map(|&i| &toks[i]), Some(Tok::Punct(x)) if *x == p);
    match upper(0).as_deref() {
        Some("SELECT") | Some("WITH") => {}
        Some(kw @ ("INSERT" | "UPDATE" | "DELETE" | "MERGE" | "CREATE" | "DROP" | "ALTER" | "TRUNCATE" | "REPLACE")) => {
            return Err(SqlError::bad(
                "NOT_SUPPORTED_COMMAND",
                format!("{kw} is not supported: the emulator's SQL warehouse is read-only (send SELECT statements)"),
            ))
        }
        _ => return Err(SqlError::syntax("Only SELECT (or WITH ... SELECT) statements are supported by the emulator")),
    }
    // CTE names: `name AS (`.
    let mut ctes: HashSet<String> = HashSet::new();
    for k in 0..sig.len() {
        if let Tok::Ident(name, _) = &toks[sig[k]] {
            if upper(k + 1).as_deref() == Some("AS") && is_punct(k + 2, "(") {
                ctes.insert(name.to_lowercase());
            }
        }
    }
    let mut out = String::with_capacity(stmt.len() + 64);
    let mut tables = Vec::new();
    let mut markers: Vec<String> = Vec::new();
    let mut depth: usize = 0;
    let mut in_from: Vec<bool> = vec![false];
    let mut expect_table = false;
    let mut cast_depths: Vec<usize> = Vec::new();
    let mut k = 0;
    let mut last_ws = false;
    // Walk the significant tokens, re-emitting whitespace as single spaces.
    let mut ti = 0;
    while k < sig.len() {
        // Preserve whitespace separation.
        while ti < sig[k] {
            if toks[ti] == Tok::Ws && !last_ws {
                out.push(' ');
                last_ws = true;
            }
            ti += 1;
        }
        let tok = &toks[sig[k]];
        last_ws = false;
        ti = sig[k] + 1;
        match tok {
            Tok::Ws => {}
            Tok::Str(v) => out.push_str(&qstr(v)),
            Tok::Num(n) => out.push_str(n),
            Tok::Param(name) => {
                if !markers.contains(name) {
                    markers.push(name.clone());
                }
                out.push(':');
                out.push_str(name);
            }
            Tok::Punct(p) => {
                match *p {
                    "(" => {
                        depth += 1;
                        in_from.push(false);
                        if expect_table {
                            expect_table = false; // subquery in FROM
                        }
                        out.push('(');
                    }
                    ")" => {
                        if depth == 0 {
                            return Err(SqlError::syntax("Unbalanced `)`"));
                        }
                        if cast_depths.last() == Some(&depth) {
                            cast_depths.pop();
                        }
                        depth -= 1;
                        in_from.pop();
                        out.push(')');
                    }
                    ";" => {
                        if k + 1 < sig.len() && !(k + 1..sig.len()).all(|x| is_punct(x, ";")) {
                            return Err(SqlError::syntax(
                                "Only one statement per request is allowed",
                            ));
                        }
                        break;
                    }
                    "," => {
                        if k >= 2
                            && matches!(toks[sig[k - 1]], Tok::Num(_))
                            && upper(k - 2).as_deref() == Some("LIMIT")
                        {
                            return Err(SqlError::syntax(
                                "`LIMIT offset, count` is SQLite syntax; use LIMIT n OFFSET m",
                            ));
                        }
                        if in_from.last() == Some(&true) {
                            expect_table = true;
                        }
                        out.push(',');
                    }
                    "<=>" => out.push_str(" IS "),
                    other => out.push_str(other),
                }
            }
            Tok::Ident(name, quoted) => {
                let up = name.to_ascii_uppercase();
                let next_is_paren = is_punct(k + 1, "(");
                if expect_table {
                    expect_table = false;
                    // Parse up to three dotted parts.
                    let mut parts = vec![(name.clone(), *quoted)];
                    let mut kk = k;
                    while is_punct(kk + 1, ".") {
                        match sig.get(kk + 2).map(|&i| &toks[i]) {
                            Some(Tok::Ident(p, q)) => {
                                parts.push((p.clone(), *q));
                                kk += 2;
                            }
                            _ => {
                                return Err(SqlError::syntax(
                                    "Expected an identifier after `.` in a table name",
                                ))
                            }
                        }
                    }
                    if parts.len() > 3 {
                        return Err(SqlError::bad(
                            "REQUIRES_SINGLE_PART_NAMESPACE",
                            format!("Table names have at most three parts (catalog.schema.table), got {}", parts.len()),
                        ));
                    }
                    let lower: Vec<String> = parts.iter().map(|(p, _)| p.to_lowercase()).collect();
                    if lower.len() == 1 && ctes.contains(&lower[0]) {
                        out.push_str(&qident(&parts[0].0));
                        k = kk + 1;
                        ti = sig[kk] + 1;
                        continue;
                    }
                    let (cat, sch, tbl) = match lower.len() {
                        3 => (lower[0].clone(), lower[1].clone(), lower[2].clone()),
                        2 => (
                            default_catalog.to_lowercase(),
                            lower[0].clone(),
                            lower[1].clone(),
                        ),
                        _ => (
                            default_catalog.to_lowercase(),
                            default_schema.to_lowercase(),
                            lower[0].clone(),
                        ),
                    };
                    let Some(rel) = resolve(&cat, &sch, &tbl) else {
                        let shown: Vec<String> =
                            parts.iter().map(|(p, _)| format!("`{p}`")).collect();
                        return Err(SqlError::bad(
                            "TABLE_OR_VIEW_NOT_FOUND",
                            format!(
                                "The table or view {} cannot be found. Verify the spelling and correctness of the schema and catalog (resolved as `{cat}`.`{sch}`.`{tbl}`).",
                                shown.join(".")
                            ),
                        ));
                    };
                    out.push_str(&qident(&rel));
                    let alias_follows = match sig.get(kk + 1).map(|&i| &toks[i]) {
                        Some(Tok::Ident(s, false)) => {
                            !AFTER_TABLE_KEYWORDS.contains(&s.to_ascii_uppercase().as_str())
                        }
                        Some(Tok::Ident(_, true)) => true,
                        _ => false,
                    };
                    if !alias_follows {
                        out.push_str(" AS ");
                        out.push_str(&qident(&tbl));
                    }
                    tables.push((cat, sch, tbl));
                    k = kk + 1;
                    ti = sig[kk] + 1;
                    continue;
                }
                if *quoted {
                    out.push_str(&qident(name));
                } else if SQLITE_ONLY_KEYWORDS.contains(&up.as_str())
                    || (up == "ISNULL" && !next_is_paren)
                {
                    return Err(SqlError::syntax(format!(
                        "`{name}` is SQLite syntax, not Spark SQL"
                    )));
                } else if matches!(up.as_str(), "FROM" | "JOIN") {
                    if up == "FROM" {
                        if let Some(f) = in_from.last_mut() {
                            *f = true;
                        }
                    }
                    expect_table = true;
                    out.push_str(name);
                } else if END_FROM_KEYWORDS.contains(&up.as_str()) {
                    if let Some(f) = in_from.last_mut() {
                        *f = false;
                    }
                    out.push_str(name);
                } else if let (true, Some(Tok::Str(v))) = (
                    matches!(
                        up.as_str(),
                        "DATE" | "TIMESTAMP" | "TIMESTAMP_NTZ" | "TIMESTAMP_LTZ"
                    ),
                    sig.get(k + 1).map(|&i| &toks[i]),
                ) {
                    let lit = if up == "DATE" {
                        crate::store::parse_date(v)
                    } else {
                        crate::store::parse_ts(v).map(crate::store::fmt_ts)
                    };
                    match lit {
                        Some(l) => out.push_str(&qstr(&l)),
                        None => {
                            return Err(SqlError::bad(
                                "INVALID_TYPED_LITERAL",
                                format!("The value of the typed literal {up} is invalid: '{v}'"),
                            ))
                        }
                    }
                    k += 2;
                    ti = sig[k - 1] + 1;
                    continue;
                } else if matches!(up.as_str(), "CURRENT_TIMESTAMP" | "CURRENT_DATE" | "NOW")
                    && (next_is_paren || up != "NOW")
                {
                    out.push_str(if up == "CURRENT_DATE" {
                        "emu_current_date()"
                    } else {
                        "emu_current_timestamp()"
                    });
                    if next_is_paren {
                        if !is_punct(k + 2, ")") {
                            return Err(SqlError::bad(
                                "WRONG_NUM_ARGS",
                                format!("{name}() takes no arguments"),
                            ));
                        }
                        k += 3;
                        ti = sig[k - 1] + 1;
                        continue;
                    }
                } else if next_is_paren {
                    let lower = name.to_ascii_lowercase();
                    if SQLITE_ONLY_FUNCTIONS.contains(&lower.as_str())
                        || lower.starts_with("emu_")
                        || lower.starts_with("sqlite_")
                    {
                        return Err(SqlError::bad(
                            "UNRESOLVED_ROUTINE",
                            format!("Cannot resolve routine `{name}` on search path [`system`.`builtin`, `system`.`session`]. It is a SQLite function, not Spark SQL."),
                        ));
                    }
                    if lower == "date" {
                        if let Some(Tok::Str(v)) = sig.get(k + 2).map(|&i| &toks[i]) {
                            if v.eq_ignore_ascii_case("now") {
                                return Err(SqlError::bad(
                                    "UNRESOLVED_ROUTINE",
                                    "date('now') is SQLite syntax; use current_date()",
                                ));
                            }
                        }
                    }
                    match lower.as_str() {
                        "if" => out.push_str("iif"),
                        "get_json_object" => out.push_str("json_extract"),
                        // `LEFT` is a join keyword to SQLite.
                        "left" => out.push_str("emu_left"),
                        "date" => out.push_str("to_date"),
                        "cast" | "try_cast" => {
                            out.push_str("emu_cast");
                            cast_depths.push(depth + 1);
                        }
                        _ => out.push_str(name),
                    }
                } else if up == "AS" && cast_depths.last() == Some(&depth) {
                    // CAST(expr AS type[(p, s)]) -> emu_cast(expr, 'TYPE')
                    let ty = match sig.get(k + 1).map(|&i| &toks[i]) {
                        Some(Tok::Ident(t, _)) => t.to_ascii_uppercase(),
                        _ => return Err(SqlError::syntax("Expected a type name after AS in CAST")),
                    };
                    out.push_str(", ");
                    out.push_str(&qstr(&ty));
                    k += 2;
                    ti = sig[k - 1] + 1;
                    if is_punct(k, "(") {
                        while k < sig.len() && !is_punct(k, ")") {
                            k += 1;
                        }
                        k += 1;
                        ti = sig.get(k - 1).map(|x| x + 1).unwrap_or(toks.len());
                    }
                    continue;
                } else {
                    out.push_str(name);
                }
            }
        }
        k += 1;
    }
    if depth != 0 {
        return Err(SqlError::syntax("Unbalanced `(`: add the missing `)`"));
    }
    if expect_table {
        return Err(SqlError::syntax(
            "Expected a table name at the end of the statement",
        ));
    }
    Ok(Translated {
        sql: out,
        tables,
        markers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(s: &str) -> Result<Translated, SqlError> {
        translate(s, "workspace", "default", &|c, s, t| {
            (c == "workspace" && s == "default" && t.ends_with("_payload"))
                .then(|| format!("{c}.{s}.{t}"))
        })
    }

    #[test]
    fn three_part_backtick_names_resolve() {
        let t = tr("SELECT `request_time` FROM `workspace`.`default`.`a_payload` WHERE x = \"str\" AND y = :p").unwrap_or_else(|e| panic!("{e:?}"));
        assert!(
            t.sql
                .contains("\"workspace.default.a_payload\" AS \"a_payload\""),
            "{}",
            t.sql
        );
        assert!(t.sql.contains("x = 'str'"), "{}", t.sql);
        assert_eq!(t.markers, vec!["p".to_string()]);
        assert_eq!(
            t.tables,
            vec![("workspace".into(), "default".into(), "a_payload".into())]
        );
    }

    #[test]
    fn short_names_use_defaults_and_aliases_are_kept() {
        let t = tr("select p.x from a_payload p").unwrap_or_else(|e| panic!("{e:?}"));
        assert!(
            t.sql.contains("\"workspace.default.a_payload\" p"),
            "{}",
            t.sql
        );
        let t = tr("select x from default.a_payload").unwrap_or_else(|e| panic!("{e:?}"));
        assert!(
            t.sql.contains("\"workspace.default.a_payload\" AS"),
            "{}",
            t.sql
        );
    }

    #[test]
    fn rejects_sqlite_only_and_unknown() {
        for bad in [
            "SELECT strftime('%s', x) FROM a_payload",
            "SELECT x FROM a_payload WHERE x == 1",
            "SELECT x FROM a_payload WHERE x = ?",
            "SELECT x FROM a_payload WHERE x = $x",
            "SELECT x FROM a_payload LIMIT 1, 2",
            "SELECT date('now')",
            "SELECT x FROM a_payload WHERE x GLOB 'a*'",
            "DELETE FROM a_payload",
            "SELECT x FROM a_payload; SELECT 1",
            "SELECT x FROM nope",
            "SELECT 'unterminated",
        ] {
            assert!(tr(bad).is_err(), "{bad} should fail");
        }
        let e = tr("SELECT x FROM other.b").err();
        assert!(e.is_some_and(|e| e.message.starts_with("[TABLE_OR_VIEW_NOT_FOUND]")));
    }

    #[test]
    fn typed_literals_and_casts() {
        let t = tr("SELECT CAST(x AS STRING) FROM a_payload WHERE t >= TIMESTAMP '2026-11-29 08:00:00' AND d = DATE '2026-11-29'")
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(
            t.sql.contains("emu_cast(x") && t.sql.contains(", 'STRING')"),
            "{}",
            t.sql
        );
        assert!(t.sql.contains("'2026-11-29T08:00:00.000000Z'"), "{}", t.sql);
        assert!(t.sql.contains("d = '2026-11-29'"), "{}", t.sql);
    }

    #[test]
    fn ctes_and_subqueries() {
        let t = tr("WITH x AS (SELECT * FROM a_payload) SELECT * FROM x, (SELECT 1) y")
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(t.sql.contains("FROM \"x\""), "{}", t.sql);
    }

    proptest::proptest! {
        #[test]
        fn translate_never_panics(s in "\\PC{0,200}") {
            let _ = tr(&s);
        }

        #[test]
        fn translate_never_panics_on_sqlish(parts in proptest::collection::vec(proptest::sample::select(vec![
            "SELECT", "FROM", "a_payload", "`workspace`", ".", ",", "(", ")", "'x'", "\"y\"", ":p", "CAST", "AS",
            "STRING", "DATE", "TIMESTAMP", "WHERE", "=", "<=>", "LIMIT", "1", "current_timestamp", "WITH", "JOIN", ";",
        ]), 0..30)) {
            let _ = tr(&parts.join(" "));
        }
    }
}
