//! MLflow routes (experiments search, traces search, span download via a signed URI the
//! emulator serves itself and which, like cloud storage, rejects the Databricks auth header).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{bad_param, err, ok};
use crate::payload::Rng;
use crate::state::Shared;

pub(crate) async fn experiments_search(State(_shared): State<Arc<Shared>>) -> Response {
    err(
        StatusCode::NOT_IMPLEMENTED,
        "NOT_IMPLEMENTED",
        "MLflow experiments search is not implemented yet",
    )
}
pub(crate) async fn experiments_search_get(State(_shared): State<Arc<Shared>>) -> Response {
    err(
        StatusCode::NOT_IMPLEMENTED,
        "NOT_IMPLEMENTED",
        "MLflow experiments search is not implemented yet",
    )
}
pub(crate) async fn traces_search(State(_shared): State<Arc<Shared>>) -> Response {
    err(
        StatusCode::NOT_IMPLEMENTED,
        "NOT_IMPLEMENTED",
        "MLflow traces search is not implemented yet",
    )
}
pub(crate) async fn credentials(
    State(_shared): State<Arc<Shared>>,
    Path(_id): Path<String>,
) -> Response {
    err(
        StatusCode::NOT_IMPLEMENTED,
        "NOT_IMPLEMENTED",
        "not implemented yet",
    )
}
pub(crate) async fn signed_download(
    State(_shared): State<Arc<Shared>>,
    Path(_id): Path<String>,
    Query(_q): Query<std::collections::HashMap<String, String>>,
    _h: HeaderMap,
) -> Response {
    let _ = (
        bad_param("x"),
        ok(json!({})),
        header::AUTHORIZATION,
        Rng::new(0),
        Value::Null,
    );
    err(
        StatusCode::NOT_IMPLEMENTED,
        "NOT_IMPLEMENTED",
        "not implemented yet",
    )
    .into_response()
}
