//! The HTTP face of the emulator: a hyper accept loop (so faults can drop connections for
//! real), an axum router for every route, authentication, request counting, OIDC and the
//! `/_emulator/` admin API.
//!
//! Architecture Invariant: every error body has the Databricks shape (`error_code`, `message`,
//! or `error`/`error_description` on the token endpoint); no handler panics on bad input.

#![allow(clippy::result_large_err)] // axum handlers return `Response` as their error value.

mod admin;
mod apps;
pub(crate) mod mlflow;
mod serving;
mod sqlapi;
mod uc;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Form, MatchedPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::state::{lock, Shared};
use crate::Privilege;
use admin::{Admin, AdminOnly};

/// The authenticated principal of an `/api/...` request.
#[derive(Debug, Clone)]
pub(crate) struct Principal(pub String);

/// The TCP peer of a request.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

/// Returned by the service to make hyper close the connection without a response.
#[derive(Debug)]
struct DroppedByFault;

impl std::fmt::Display for DroppedByFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by an injected fault")
    }
}
impl std::error::Error for DroppedByFault {}

/// A Databricks-shaped error response.
pub(crate) fn err(status: StatusCode, code: &str, msg: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error_code": code, "message": msg.into()})),
    )
        .into_response()
}

pub(crate) fn bad_param(msg: impl Into<String>) -> Response {
    err(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", msg)
}

pub(crate) type Q = Query<HashMap<String, String>>;

/// Page through `len` items: returns `(start, end, next_page_token)`. With `empty_pages`, every
/// page that has a successor is followed by an empty page that still carries a token.
pub(crate) fn page(
    len: usize,
    q: &HashMap<String, String>,
    server_max: usize,
    empty_pages: bool,
) -> Result<(usize, usize, Option<String>), Response> {
    let size = match q.get("max_results").map(|s| s.trim()) {
        None | Some("") => server_max,
        Some(s) => match s.parse::<i64>() {
            Ok(0) => server_max,
            Ok(n) if n > 0 => (n as usize).min(server_max),
            _ => {
                return Err(bad_param(format!(
                    "max_results must be a non-negative integer, got '{s}'"
                )))
            }
        },
    };
    let (offset, empty) = match q.get("page_token").filter(|t| !t.is_empty()) {
        None => (0, false),
        Some(t) => {
            let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            let parsed = decoded.as_deref().and_then(|s| {
                let mut it = s.split(':');
                match (it.next(), it.next(), it.next()) {
                    (Some("p"), Some(o), Some(e)) => Some((o.parse::<usize>().ok()?, e == "1")),
                    _ => None,
                }
            });
            parsed.ok_or_else(|| {
                bad_param(format!(
                    "page_token '{t}' is not valid; pass next_page_token unchanged"
                ))
            })?
        }
    };
    let token = |o: usize, e: bool| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("p:{o}:{}", if e { 1 } else { 0 }))
    };
    if empty {
        return Ok((offset.min(len), offset.min(len), Some(token(offset, false))));
    }
    let start = offset.min(len);
    let end = (start + size).min(len);
    let next = (end < len).then(|| token(end, empty_pages));
    Ok((start, end, next))
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/api/2.1/unity-catalog/catalogs", get(uc::catalogs))
        .route("/api/2.1/unity-catalog/schemas", get(uc::schemas))
        .route("/api/2.1/unity-catalog/tables", get(uc::tables))
        .route("/api/2.1/unity-catalog/tables/{full_name}", get(uc::table))
        .route(
            "/api/2.1/unity-catalog/table-summaries",
            get(uc::table_summaries),
        )
        .route("/api/2.1/unity-catalog/models", get(uc::models))
        .route("/api/2.1/unity-catalog/models/{full_name}", get(uc::model))
        .route(
            "/api/2.1/unity-catalog/models/{full_name}/versions",
            get(uc::model_versions),
        )
        .route("/api/2.1/unity-catalog/functions", get(uc::functions))
        .route("/api/2.0/serving-endpoints", get(serving::list))
        .route("/api/2.0/serving-endpoints/{name}", get(serving::get_one))
        .route("/api/2.0/sql/warehouses", get(sqlapi::warehouses))
        .route("/api/2.0/sql/warehouses/{id}", get(sqlapi::warehouse))
        .route("/api/2.0/sql/statements", post(sqlapi::create))
        .route("/api/2.0/sql/statements/", post(sqlapi::create))
        .route("/api/2.0/sql/statements/{id}", get(sqlapi::poll))
        .route("/api/2.0/sql/statements/{id}/cancel", post(sqlapi::cancel))
        .route(
            "/api/2.0/sql/statements/{id}/result/chunks/{n}",
            get(sqlapi::chunk),
        )
        .route(
            "/api/2.0/mlflow/experiments/search",
            post(mlflow::experiments_search).get(mlflow::experiments_search_get),
        )
        .route("/api/3.0/mlflow/traces/search", post(mlflow::traces_search))
        .route("/api/2.0/mlflow/runs/get", get(mlflow::runs_get))
        .route("/api/2.0/apps", get(apps::list))
        .route("/api/2.0/apps/{name}", get(apps::get_one))
        .route(
            "/api/2.0/mlflow/traces/{id}/credentials-for-data-download",
            get(mlflow::credentials),
        )
        .layer(from_fn_with_state(shared.clone(), auth_mw));
    let public = Router::new()
        .route("/.well-known/databricks-config", get(databricks_config))
        .route(
            "/oidc/.well-known/oauth-authorization-server",
            get(oidc_discovery),
        )
        .route("/oidc/v1/token", post(token))
        .route("/_signed/traces/{id}", get(mlflow::signed_download))
        .route("/_emulator/generate", post(admin_generate))
        .route("/_emulator/requests", get(admin_requests))
        .route("/_emulator/stats", get(admin_stats))
        .route("/_emulator/faults", post(admin_faults))
        .route("/_emulator/permissions", post(admin_permissions))
        .route("/_emulator/endpoint-tags", post(admin_endpoint_tags))
        .route("/_emulator/traces", post(admin_traces));
    Router::new()
        .merge(api)
        .merge(public)
        .route_layer(from_fn_with_state(shared.clone(), count_mw))
        .fallback(not_found)
        .with_state(shared)
}

async fn not_found(req: Request) -> Response {
    err(
        StatusCode::NOT_FOUND,
        "ENDPOINT_NOT_FOUND",
        format!("No API found for '{} {}'", req.method(), req.uri().path()),
    )
}

async fn count_mw(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Some(p) = req.extensions().get::<MatchedPath>() {
        shared.count_request(p.as_str());
    }
    next.run(req).await
}

async fn auth_mw(State(shared): State<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string());
    let Some(bearer) = bearer else {
        lock(&shared.stats).unauthenticated += 1;
        return err(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Credential was not sent or was of an unsupported type for this API.",
        );
    };
    let result = shared.authenticate(&bearer);
    match result {
        Ok(_)
            if shared.cfg.no_metastore
                && req.uri().path().starts_with("/api/2.1/unity-catalog/") =>
        {
            err(
                StatusCode::NOT_FOUND,
                "METASTORE_DOES_NOT_EXIST",
                "No metastore assigned for the current workspace.",
            )
        }
        Ok(p) => {
            req.extensions_mut().insert(Principal(p));
            next.run(req).await
        }
        // As the workspace answers a token it refuses (a bad PAT, an expired OAuth token):
        // 403, with the HTTP status as a number in `error_code`.
        Err(m) => {
            lock(&shared.stats).unauthenticated += 1;
            (
                StatusCode::FORBIDDEN,
                Json(json!({"error_code": 403, "message": m})),
            )
                .into_response()
        }
    }
}

/// Serve until `shutdown` turns true; then stop accepting and close connections gracefully.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let router = router(shared.clone());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (router, shared, mut sd) = (router.clone(), shared.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                        let (router, shared) = (router.clone(), shared.clone());
                        req.extensions_mut().insert(Peer(peer));
                        async move { handle(shared, router, req).await }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = stopped(&mut sd) => {
                            conn.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(Duration::from_secs(3), conn).await;
                        }
                    }
                });
            }
            _ = stopped(&mut shutdown) => break,
        }
    }
}

/// Resolves once the shutdown flag is set (or the sender is gone).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}

async fn handle(
    shared: Arc<Shared>,
    router: Router,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<Response, DroppedByFault> {
    let path = req.uri().path().to_string();
    let mut drop_after = false;
    if !path.starts_with("/_emulator/") {
        let f = lock(&shared.faults).on_request(req.method().as_str(), &path);
        drop_after = f.drop_after;
        if f.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(f.latency_ms)).await;
        }
        if f.expire_tokens {
            shared.expire_all_tokens();
        }
        if f.drop {
            lock(&shared.stats).dropped_connections += 1;
            return Err(DroppedByFault);
        }
        if let Some(at_ms) = f.insert_trace {
            mlflow::add_trace_at(&shared, at_ms);
        }
        if let Some((status, retry_after)) = f.respond {
            let storage = path.starts_with("/_signed/");
            let mut resp = match status {
                429 => err(
                    StatusCode::TOO_MANY_REQUESTS,
                    "REQUEST_LIMIT_EXCEEDED",
                    "Too many requests (injected fault); retry after the Retry-After delay",
                ),
                403 if storage => mlflow::xml_error(
                    StatusCode::FORBIDDEN,
                    "AccessDenied",
                    "Access Denied (injected fault)",
                ),
                403 => err(
                    StatusCode::FORBIDDEN,
                    "PERMISSION_DENIED",
                    "User does not have permission to access this resource (injected fault)",
                ),
                404 if storage => mlflow::xml_error(
                    StatusCode::NOT_FOUND,
                    "NoSuchKey",
                    "The specified key does not exist. (injected fault)",
                ),
                404 => err(
                    StatusCode::NOT_FOUND,
                    "RESOURCE_DOES_NOT_EXIST",
                    "The resource does not exist (injected fault)",
                ),
                _ => err(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "TEMPORARILY_UNAVAILABLE",
                    "The service is temporarily unavailable (injected fault); retry later",
                ),
            };
            if let Some(s) = retry_after {
                if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                    resp.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            return Ok(resp);
        }
    }
    let resp: Result<Response, Infallible> = router.oneshot(req).await;
    match resp {
        Ok(_) if drop_after => {
            // Handled (a statement created, a cancel applied), but the answer never leaves.
            lock(&shared.stats).dropped_connections += 1;
            Err(DroppedByFault)
        }
        Ok(r) => Ok(r),
        Err(never) => match never {},
    }
}

async fn databricks_config(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({
        "oidc_endpoint": format!("{}/oidc", shared.base_url),
        "workspace_id": shared.layout.workspace_id,
    }))
    .into_response()
}

async fn oidc_discovery(State(shared): State<Arc<Shared>>) -> Response {
    let b = &shared.base_url;
    Json(json!({
        "issuer": format!("{b}/oidc"),
        "authorization_endpoint": format!("{b}/oidc/v1/authorize"),
        "token_endpoint": format!("{b}/oidc/v1/token"),
        "grant_types_supported": ["client_credentials", "authorization_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": ["all-apis", "offline_access"],
    }))
    .into_response()
}

fn token_error(status: StatusCode, error: &str, desc: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": desc})),
    )
        .into_response()
}

async fn token(
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    form: Result<Form<HashMap<String, String>>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return token_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The body must be application/x-www-form-urlencoded with grant_type=client_credentials",
        );
    };
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        });
    let creds = basic.or_else(|| {
        Some((
            form.get("client_id")?.clone(),
            form.get("client_secret")?.clone(),
        ))
    });
    let Some((id, secret)) = creds else {
        return token_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client authentication failed: no client credentials were sent",
        );
    };
    if id != shared.cfg.client_id || secret != shared.client_secret() {
        return token_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client authentication failed",
        );
    }
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {}
        Some(_) => {
            return token_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "Only grant_type=client_credentials is supported",
            )
        }
        None => {
            return token_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing grant_type",
            )
        }
    }
    let scope = form
        .get("scope")
        .cloned()
        .unwrap_or_else(|| "all-apis".to_string());
    let access = shared.issue_token(&id);
    Json(json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": shared.cfg.token_ttl_secs,
        "scope": scope,
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct GenerateBody {
    #[serde(default)]
    rows: usize,
    #[serde(default)]
    late: usize,
}

async fn admin_generate(
    State(shared): State<Arc<Shared>>,
    Admin(b): Admin<GenerateBody>,
) -> Response {
    let s = shared.clone();
    match blocking("generate", move || crate::generate(&s, b.rows, b.late)).await {
        Ok(()) => {
            Json(json!({"rows": b.rows, "late": b.late, "rows_total": shared.store.rows_total()}))
                .into_response()
        }
        Err(r) => r,
    }
}

async fn admin_requests(State(shared): State<Arc<Shared>>, _: AdminOnly) -> Response {
    let s = shared.clone();
    match blocking("ground truth", move || s.store.ground_truth()).await {
        Ok(rows) => Json(json!({"count": rows.len(), "requests": rows})).into_response(),
        Err(r) => r,
    }
}

/// Run `work` on the blocking pool; its error, or the task failing (named by `task`), becomes
/// a 500 `INTERNAL_ERROR`.
async fn blocking<T, E>(
    task: &str,
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Response>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            e.to_string(),
        )),
        Err(e) => Err(err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            format!("{task} task failed: {e}"),
        )),
    }
}

async fn admin_stats(State(shared): State<Arc<Shared>>, _: AdminOnly) -> Response {
    Json(shared.stats_json()).into_response()
}

#[derive(serde::Deserialize)]
struct FaultsBody {
    #[serde(default)]
    spec: String,
}

async fn admin_faults(State(shared): State<Arc<Shared>>, Admin(b): Admin<FaultsBody>) -> Response {
    match crate::faults::parse(&b.spec) {
        Ok(rules) => {
            let n = rules.len();
            lock(&shared.faults).replace(rules);
            Json(json!({"rules": n})).into_response()
        }
        Err(e) => bad_param(e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct PermBody {
    principal: String,
    #[serde(default)]
    revoke: Option<String>,
    #[serde(default)]
    grant: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    experiment_id: Option<String>,
}

async fn admin_permissions(
    State(shared): State<Arc<Shared>>,
    Admin(b): Admin<PermBody>,
) -> Response {
    let (revoke, name) =
        match (&b.revoke, &b.grant) {
            (Some(r), None) => (true, r.clone()),
            (None, Some(g)) => (false, g.clone()),
            _ => return bad_param(
                "Send exactly one of \"revoke\" or \"grant\" (USE_CATALOG, USE_SCHEMA, SELECT, EXECUTE or CAN_READ)",
            ),
        };
    let privilege = match name.to_ascii_uppercase().replace(' ', "_").as_str() {
        "USE_CATALOG" => Privilege::UseCatalog,
        "USE_SCHEMA" => Privilege::UseSchema,
        "SELECT" => match &b.table {
            Some(t) => Privilege::Select {
                table: t.to_lowercase(),
            },
            None => return bad_param("SELECT needs \"table\": \"catalog.schema.table\""),
        },
        "EXECUTE" => Privilege::Execute,
        "CAN_READ" => match &b.experiment_id {
            Some(id) if !id.is_empty() => Privilege::ReadExperiment {
                experiment_id: id.clone(),
            },
            _ => return bad_param("CAN_READ needs \"experiment_id\": the MLflow experiment's id"),
        },
        other => {
            return bad_param(format!(
            "Unknown privilege '{other}': use USE_CATALOG, USE_SCHEMA, SELECT, EXECUTE or CAN_READ"
        ))
        }
    };
    let mut r = shared.revoked.write().unwrap_or_else(|e| e.into_inner());
    if revoke {
        r.insert((b.principal.clone(), privilege));
    } else {
        r.remove(&(b.principal.clone(), privilege));
    }
    Json(json!({"principal": b.principal, "revoked": r.iter().filter(|(p, _)| *p == b.principal).count()})).into_response()
}

#[derive(serde::Deserialize)]
struct TagBody {
    endpoint: String,
    key: String,
    value: String,
}

async fn admin_endpoint_tags(
    State(shared): State<Arc<Shared>>,
    Admin(b): Admin<TagBody>,
) -> Response {
    if set_endpoint_tag(&shared, &b.endpoint, &b.key, &b.value) {
        Json(json!({})).into_response()
    } else {
        err(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            format!("Endpoint '{}' does not exist", b.endpoint),
        )
    }
}

#[derive(serde::Deserialize)]
struct TracesBody {
    #[serde(default)]
    count: usize,
}

async fn admin_traces(State(shared): State<Arc<Shared>>, Admin(b): Admin<TracesBody>) -> Response {
    add_traces(&shared, b.count.min(10_000));
    Json(json!({"added_per_experiment": b.count.min(10_000)})).into_response()
}

pub(crate) fn add_traces(shared: &Shared, count: usize) {
    mlflow::add_traces(shared, count);
}

pub(crate) fn mirrored_tool_calls(shared: &Shared) -> Vec<crate::MirroredToolCall> {
    mlflow::mirrored_tool_calls(shared)
}

pub(crate) fn set_endpoint_tag(shared: &Shared, endpoint: &str, key: &str, value: &str) -> bool {
    let mut eps = shared.endpoints.write().unwrap_or_else(|e| e.into_inner());
    let Some(ep) = eps.iter_mut().find(|e| e.name == endpoint) else {
        return false;
    };
    match ep.tags.iter_mut().find(|(k, _)| k == key) {
        Some(t) => t.1 = value.to_string(),
        None => ep.tags.push((key.to_string(), value.to_string())),
    }
    ep.config_version += 1;
    true
}

/// Serialize any value as a JSON response (used for large results: no intermediate tree).
pub(crate) fn json_bytes<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            format!("cannot serialize the response: {e}"),
        ),
    }
}

/// Helper for JSON values built by route modules.
pub(crate) fn ok(v: Value) -> Response {
    Json(v).into_response()
}
