//! Extractors for the `/_emulator/` admin API, so each admin handler states what it needs
//! (`Admin<Body>` or `AdminOnly`) instead of repeating the loopback check and JSON parsing.
//!
//! Both refuse a request whose TCP peer is known and not a loopback address with
//! 403 `PERMISSION_DENIED`; `Admin<T>` then parses the body as JSON (an empty or blank body
//! counts as `{}`) and answers 400 `MALFORMED_REQUEST` when it does not fit `T`.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::{err, Peer};

/// An admin request's JSON body, accepted from a loopback peer only.
///
/// The body is read first (its own rejection, e.g. a body over the size limit, wins), then
/// the peer is checked, then the JSON is parsed.
pub(super) struct Admin<T>(pub T);

/// An admin request without a body, accepted from a loopback peer only.
pub(super) struct AdminOnly;

impl<S, T> FromRequest<S> for Admin<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let peer = req.extensions().get::<Peer>().copied();
        let body = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        loopback_only(peer)?;
        json_body(&body).map(Admin)
    }
}

impl<S> FromRequestParts<S> for AdminOnly
where
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        loopback_only(parts.extensions.get::<Peer>().copied())?;
        Ok(AdminOnly)
    }
}

/// Refuse a known non-loopback peer; a request without a recorded peer passes.
fn loopback_only(peer: Option<Peer>) -> Result<(), Response> {
    match peer {
        Some(Peer(a)) if !a.ip().is_loopback() => Err(err(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "The /_emulator/ admin API only answers loopback clients",
        )),
        _ => Ok(()),
    }
}

/// Parse a JSON body; an empty or all-whitespace body is read as `{}`.
fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    let body = if body.iter().all(|b| b.is_ascii_whitespace()) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            format!("Invalid JSON body: {e}"),
        )
    })
}
