//! A counting variant of the Akto stand-in for benchmarks: the same route and the same strict
//! checks (`akto_standin::check_batch`), but it only counts accepted records instead of keeping
//! them, so a million ~5 KB records do not need gigabytes of memory in the receiving process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;

#[derive(Default)]
struct Counters {
    records: AtomicU64,
    batches: AtomicU64,
    rejected: AtomicU64,
    bytes: AtomicU64,
}

/// Serves until SIGTERM/Ctrl-C; the first stdout line is `listening on http://ADDR`.
pub async fn serve(listen: SocketAddr) -> Result<(), std::io::Error> {
    let counters = Arc::new(Counters::default());
    let app = Router::new()
        .route("/api/ingestData", post(ingest))
        .route("/healthCheck", get(|| async { "OK" }))
        .route("/_bench/stats", get(stats))
        .with_state(counters);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await
}

async fn ingest(State(c): State<Arc<Counters>>, body: Body) -> Response {
    let limit = akto_standin::MAX_BODY_BYTES;
    let bytes = match axum::body::to_bytes(body, limit + 1024 * 1024).await {
        Ok(b) if b.len() <= limit => b,
        _ => {
            c.rejected.fetch_add(1, Ordering::Relaxed);
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                axum::Json(json!({"actionErrors": [format!("body: larger than {limit} bytes")]})),
            )
                .into_response();
        }
    };
    match akto_standin::check_batch(&bytes) {
        Ok(records) => {
            c.records.fetch_add(records.len() as u64, Ordering::Relaxed);
            c.batches.fetch_add(1, Ordering::Relaxed);
            c.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            (StatusCode::OK, axum::Json(json!({"success": true}))).into_response()
        }
        Err(errors) => {
            c.rejected.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({ "actionErrors": errors })),
            )
                .into_response()
        }
    }
}

async fn stats(State(c): State<Arc<Counters>>) -> axum::Json<serde_json::Value> {
    axum::Json(json!({
        "records": c.records.load(Ordering::Relaxed),
        "batches": c.batches.load(Ordering::Relaxed),
        "rejected": c.rejected.load(Ordering::Relaxed),
        "bytes": c.bytes.load(Ordering::Relaxed),
    }))
}
