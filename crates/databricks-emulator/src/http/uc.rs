//! Unity Catalog routes: catalogs, schemas, tables (with real pagination including empty
//! pages), table summaries, registered models and versions, functions; with USE CATALOG /
//! USE SCHEMA checks per principal, and lists filtered as Unity Catalog filters them: tables by
//! SELECT, registered models, model versions and functions by EXECUTE (empty, not refused).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};

use super::{bad_param, err, ok, page, Principal, Q};
use crate::layout::{TableDef, TableKind};
use crate::payload::Rng;
use crate::state::Shared;
use crate::Privilege;

const INFO_SCHEMA: &str = "information_schema";

/// Check the namespace and the principal's USE privileges.
fn check_ns(
    shared: &Shared,
    who: &str,
    catalog: Option<&str>,
    schema: Option<&str>,
) -> Result<(), Response> {
    let Some(cat) = catalog.filter(|c| !c.is_empty()) else {
        return Err(bad_param("catalog_name is required"));
    };
    let l = &shared.layout;
    if !cat.eq_ignore_ascii_case(&l.catalog) {
        return Err(err(
            StatusCode::NOT_FOUND,
            "CATALOG_DOES_NOT_EXIST",
            format!("Catalog '{cat}' does not exist."),
        ));
    }
    if !shared.allowed(who, &Privilege::UseCatalog) {
        return Err(err(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!("User does not have USE CATALOG on Catalog '{}'.", l.catalog),
        ));
    }
    if let Some(s) = schema {
        if s.is_empty() {
            return Err(bad_param("schema_name is required"));
        }
        let s = s.to_lowercase();
        if s != l.schema && s != INFO_SCHEMA {
            return Err(err(
                StatusCode::NOT_FOUND,
                "SCHEMA_DOES_NOT_EXIST",
                format!("Schema '{}.{s}' does not exist.", l.catalog),
            ));
        }
        if !shared.allowed(who, &Privilege::UseSchema) {
            return Err(err(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                format!(
                    "User does not have USE SCHEMA on Schema '{}.{s}'.",
                    l.catalog
                ),
            ));
        }
    }
    Ok(())
}

/// [`check_ns`] for a listing: the catalog from the `catalog_name` query parameter, and
/// `schema` when given.
fn check_query_ns(shared: &Shared, who: &str, q: &Q, schema: Option<&str>) -> Result<(), Response> {
    check_ns(
        shared,
        who,
        q.get("catalog_name").map(String::as_str),
        schema,
    )
}

/// One page of a listing: the items under `key` (left out when the page is empty), then
/// `next_page_token` when there is a next page.
fn listing(key: &str, items: Vec<Value>, next: Option<String>) -> Response {
    let mut v = json!({});
    if !items.is_empty() {
        v[key] = json!(items);
    }
    if let Some(t) = next {
        v["next_page_token"] = json!(t);
    }
    ok(v)
}

fn owner() -> &'static str {
    "admins@example.com"
}

pub(crate) async fn catalogs(State(shared): State<Arc<Shared>>) -> Response {
    let l = &shared.layout;
    ok(json!({"catalogs": [{
        "name": l.catalog, "full_name": l.catalog, "catalog_type": "MANAGED_CATALOG", "owner": owner(),
        "comment": "Emulated workspace catalog", "created_at": shared.started_ms - 86_400_000 * 120,
        "metastore_id": format!("emu-metastore-{}", l.workspace_id),
    }]}))
}

pub(crate) async fn schemas(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    q: Q,
) -> Response {
    if let Err(r) = check_query_ns(&shared, &p.0, &q, None) {
        return r;
    }
    let l = &shared.layout;
    let mut names = [l.schema.clone(), INFO_SCHEMA.to_string()];
    names.sort();
    let (s, e, next) = match page(names.len(), &q, 1000, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let items: Vec<Value> = names[s..e]
        .iter()
        .map(|n| {
            json!({"name": n, "catalog_name": l.catalog, "full_name": format!("{}.{n}", l.catalog),
            "owner": owner(), "created_at": shared.started_ms - 86_400_000 * 100})
        })
        .collect();
    listing("schemas", items, next)
}

fn table_info(shared: &Shared, t: &TableDef) -> Value {
    let l = &shared.layout;
    let cols: Vec<Value> = t
        .columns
        .iter()
        .enumerate()
        .map(|(i, (name, ty, nullable))| {
            json!({"name": name, "type_name": ty.type_name(), "type_text": ty.type_text(),
                "type_json": json!({"name": name, "type": ty.type_text(), "nullable": nullable, "metadata": {}}).to_string(),
                "position": i, "nullable": nullable})
        })
        .collect();
    let mut v = json!({
        "name": t.name,
        "catalog_name": l.catalog,
        "schema_name": l.schema,
        "full_name": l.full_name(&t.name),
        "table_type": t.table_type(),
        "columns": cols,
        "owner": owner(),
        "created_at": t.created_at,
        "created_by": owner(),
        "updated_at": t.created_at + 3_600_000,
        "updated_by": owner(),
        "table_id": Rng::new(t.created_at as u64 ^ t.name.len() as u64).uuid(),
        "properties": {},
    });
    if t.kind == TableKind::View {
        v["view_definition"] = json!(format!(
            "SELECT customer_id, email FROM {}.{}.customers WHERE email IS NOT NULL",
            l.catalog, l.schema
        ));
    } else {
        v["data_source_format"] = json!("DELTA");
        v["storage_location"] = json!(format!(
            "s3://emulated-bucket/{}/{}/{}",
            l.catalog, l.schema, t.name
        ));
    }
    if matches!(t.kind, TableKind::AiGateway | TableKind::Legacy) {
        v["properties"] = json!({"delta.enableChangeDataFeed": "true"});
        if let Some(ep) = t
            .agent
            .and_then(|a| l.agents.get(a))
            .and_then(|a| a.endpoint.clone())
        {
            v["comment"] = json!(format!("Inference table for serving endpoint {ep}"));
        }
    }
    if t.kind == TableKind::Customers {
        v["comment"] = json!("Customer master data");
    }
    v
}

pub(crate) async fn tables(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    q: Q,
) -> Response {
    let schema = q.get("schema_name").map(String::as_str).unwrap_or("");
    if let Err(r) = check_query_ns(&shared, &p.0, &q, Some(schema)) {
        return r;
    }
    let l = &shared.layout;
    // As Unity Catalog does: only the tables the caller may read (SELECT) are listed.
    let list: Vec<&TableDef> = if schema.eq_ignore_ascii_case(&l.schema) {
        l.tables
            .iter()
            .filter(|t| may_select(&shared, &p.0, t))
            .collect()
    } else {
        Vec::new()
    };
    let (s, e, next) = match page(list.len(), &q, 50, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let items: Vec<Value> = list[s..e].iter().map(|t| table_info(&shared, t)).collect();
    listing("tables", items, next)
}

/// Whether `principal` holds SELECT on `t` (what Unity Catalog asks to list or get a table).
fn may_select(shared: &Shared, principal: &str, t: &TableDef) -> bool {
    shared.allowed(
        principal,
        &crate::Privilege::Select {
            table: shared.layout.full_name(&t.name),
        },
    )
}

pub(crate) async fn table(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    Path(full): Path<String>,
) -> Response {
    let parts: Vec<String> = full.split('.').map(|s| s.to_lowercase()).collect();
    if parts.len() != 3 {
        return bad_param(format!("full_name '{full}' must be catalog.schema.table"));
    }
    if let Err(r) = check_ns(&shared, &p.0, Some(&parts[0]), Some(&parts[1])) {
        return r;
    }
    let l = &shared.layout;
    match l.table_by_name(&parts[2]).filter(|_| parts[1] == l.schema) {
        Some(t) if !may_select(&shared, &p.0, t) => err(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!(
                "User does not have SELECT on Table '{}'.",
                l.full_name(&t.name)
            ),
        ),
        Some(t) => ok(table_info(&shared, t)),
        None => err(
            StatusCode::NOT_FOUND,
            "TABLE_DOES_NOT_EXIST",
            format!("Table '{full}' does not exist."),
        ),
    }
}

/// SQL LIKE-style pattern (`%`, `_`, and `*` as a wildcard too), case-insensitive.
fn like(pattern: &str, s: &str) -> bool {
    fn go(p: &[char], s: &[char]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some('%') | Some('*') => (0..=s.len()).any(|k| go(&p[1..], &s[k..])),
            Some('_') => !s.is_empty() && go(&p[1..], &s[1..]),
            Some(c) => s.first().is_some_and(|x| x.eq_ignore_ascii_case(c)) && go(&p[1..], &s[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = s.chars().collect();
    go(&p, &s)
}

pub(crate) async fn table_summaries(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    q: Q,
) -> Response {
    if let Err(r) = check_query_ns(&shared, &p.0, &q, None) {
        return r;
    }
    let l = &shared.layout;
    let sp = q
        .get("schema_name_pattern")
        .cloned()
        .unwrap_or_else(|| "%".into());
    let tp = q
        .get("table_name_pattern")
        .cloned()
        .unwrap_or_else(|| "%".into());
    let schema_ok = like(&sp, &l.schema);
    if schema_ok && !shared.allowed(&p.0, &Privilege::UseSchema) {
        return err(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!(
                "User does not have USE SCHEMA on Schema '{}.{}'.",
                l.catalog, l.schema
            ),
        );
    }
    let matching: Vec<&TableDef> = if schema_ok {
        l.tables.iter().filter(|t| like(&tp, &t.name)).collect()
    } else {
        vec![]
    };
    let (s, e, next) = match page(matching.len(), &q, 1000, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let items: Vec<Value> = matching[s..e]
        .iter()
        .map(|t| json!({"full_name": l.full_name(&t.name), "table_type": t.table_type()}))
        .collect();
    listing("tables", items, next)
}

pub(crate) fn run_id(full: &str, version: u32) -> String {
    let mut h: u64 = 1469598103934665603;
    for b in full.bytes() {
        h = (h ^ b as u64).wrapping_mul(1099511628211);
    }
    Rng::new(h ^ version as u64).hex(32)
}

fn model_json(shared: &Shared, a: &crate::layout::Agent) -> Option<Value> {
    let l = &shared.layout;
    let full = a.model_full_name.clone()?;
    let created = l.tables.get(a.table).map(|t| t.created_at).unwrap_or(0);
    Some(json!({
        "name": a.name, "full_name": full, "catalog_name": l.catalog, "schema_name": l.schema,
        "comment": format!("Agent {} (logged with mlflow.pyfunc)", a.name),
        "aliases": [{"alias_name": "champion", "version_num": a.model_versions}],
        "owner": owner(), "created_at": created, "created_by": owner(), "updated_at": created + 60_000, "updated_by": owner(),
        "storage_location": format!("s3://emulated-bucket/models/{full}"),
    }))
}

pub(crate) async fn models(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    q: Q,
) -> Response {
    let schema = q.get("schema_name").cloned();
    let catalog = q.get("catalog_name").cloned();
    if catalog.is_some() || schema.is_some() {
        if let Err(r) = check_ns(&shared, &p.0, catalog.as_deref(), schema.as_deref()) {
            return r;
        }
    }
    let l = &shared.layout;
    // Only the models the caller may EXECUTE are listed (none without it: an empty list).
    let include = schema
        .as_deref()
        .is_none_or(|s| s.eq_ignore_ascii_case(&l.schema))
        && may_execute(&shared, &p.0);
    let all: Vec<Value> = if include {
        l.agents
            .iter()
            .filter_map(|a| model_json(&shared, a))
            .collect()
    } else {
        vec![]
    };
    let (s, e, next) = match page(all.len(), &q, 100, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    listing("registered_models", all[s..e].to_vec(), next)
}

fn find_model<'a>(shared: &'a Shared, full: &str) -> Option<&'a crate::layout::Agent> {
    shared.layout.agents.iter().find(|a| {
        a.model_full_name
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case(full))
    })
}

fn model_ns(shared: &Shared, who: &str, full: &str) -> Result<(), Response> {
    let parts: Vec<&str> = full.split('.').collect();
    if parts.len() != 3 {
        return Err(bad_param(format!(
            "full_name '{full}' must be catalog.schema.model"
        )));
    }
    check_ns(shared, who, Some(parts[0]), Some(parts[1]))
}

/// Whether `principal` holds EXECUTE on the schema's models and functions (what Unity Catalog
/// asks to list them, or to get a model).
fn may_execute(shared: &Shared, principal: &str) -> bool {
    shared.allowed(principal, &Privilege::Execute)
}

pub(crate) async fn model(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    Path(full): Path<String>,
) -> Response {
    if let Err(r) = model_ns(&shared, &p.0, &full) {
        return r;
    }
    match find_model(&shared, &full).and_then(|a| model_json(&shared, a)) {
        Some(_) if !may_execute(&shared, &p.0) => err(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            format!("User does not have EXECUTE on Registered Model '{full}'."),
        ),
        Some(v) => ok(v),
        None => err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Registered model '{full}' does not exist."),
        ),
    }
}

pub(crate) async fn model_versions(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    Path(full): Path<String>,
    q: Q,
) -> Response {
    if let Err(r) = model_ns(&shared, &p.0, &full) {
        return r;
    }
    let Some(a) = find_model(&shared, &full) else {
        return err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Registered model '{full}' does not exist."),
        );
    };
    let l = &shared.layout;
    let full = a.model_full_name.clone().unwrap_or_default();
    let created = l.tables.get(a.table).map(|t| t.created_at).unwrap_or(0);
    // Only the versions of models the caller may EXECUTE are listed (an empty list otherwise).
    let listed = if may_execute(&shared, &p.0) {
        a.model_versions
    } else {
        0
    };
    let all: Vec<Value> = (1..=listed)
        .rev()
        .map(|v| {
            let run = run_id(&full, v);
            json!({
                "model_name": a.name, "catalog_name": l.catalog, "schema_name": l.schema, "version": v,
                "status": "READY", "run_id": run,
                "source": format!("dbfs:/databricks/mlflow-tracking/1/{run}/artifacts/model"),
                "aliases": if v == a.model_versions { json!([{"alias_name": "champion", "version_num": v}]) } else { json!([]) },
                "created_at": created + v as i64 * 3_600_000, "created_by": owner(),
                "id": Rng::new(v as u64).uuid(),
            })
        })
        .collect();
    let (s, e, next) = match page(all.len(), &q, 100, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut v = json!({"model_versions": all[s..e]});
    if let Some(t) = next {
        v["next_page_token"] = json!(t);
    }
    ok(v)
}

pub(crate) async fn functions(
    State(shared): State<Arc<Shared>>,
    Extension(p): Extension<Principal>,
    q: Q,
) -> Response {
    let schema = q.get("schema_name").map(String::as_str).unwrap_or("");
    if let Err(r) = check_query_ns(&shared, &p.0, &q, Some(schema)) {
        return r;
    }
    let l = &shared.layout;
    // Only the functions the caller may EXECUTE are listed (none without it).
    let list = if schema.eq_ignore_ascii_case(&l.schema) && may_execute(&shared, &p.0) {
        l.functions.as_slice()
    } else {
        &[]
    };
    let (s, e, next) = match page(list.len(), &q, 1000, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let items: Vec<Value> = list[s..e]
        .iter()
        .map(|f| {
            json!({
                "name": f.name, "catalog_name": l.catalog, "schema_name": l.schema,
                "full_name": format!("{}.{}.{}", l.catalog, l.schema, f.name),
                "comment": f.comment, "data_type": "STRING", "full_data_type": "STRING",
                "input_params": {"parameters": [{"name": f.param, "type_name": "STRING", "type_text": "string", "position": 0}]},
                "routine_body": "SQL", "routine_definition": format!("SELECT concat('result for ', {})", f.param),
                "is_deterministic": true, "is_null_call": false, "security_type": "DEFINER", "sql_data_access": "READS_SQL_DATA",
                "parameter_style": "S", "specific_name": f.name, "owner": owner(), "created_at": shared.started_ms - 86_400_000 * 30,
            })
        })
        .collect();
    listing("functions", items, next)
}
