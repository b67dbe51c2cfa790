//! The HTTP listener on `METRICS_ADDR` (service mode): `/healthz`, `/readyz`, `/metrics` and the
//! status page, served by axum from the [`Metrics`] registry, stopped by [`Shutdown`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::metrics::Metrics;
use super::page::render_status_page;
use crate::run::{Shutdown, ShutdownTrigger};

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(
        "METRICS_ADDR {addr}: cannot listen ({detail}). Fix: choose a free port (e.g. \
         METRICS_ADDR=127.0.0.1:9465), an address of this machine, or METRICS_ADDR=off"
    )]
    Bind { addr: SocketAddr, detail: String },
}

/// The content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// No external asset can load, whatever a workspace value contains: styles inline, nothing else.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The routes, for embedding or for tests without a socket.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .fallback(not_found)
        .with_state(metrics)
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n".into())
}

async fn readyz(State(m): State<Arc<Metrics>>) -> Response {
    let r = m.readiness();
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, format!("{}\n", r.reason))
}

async fn prometheus(State(m): State<Arc<Metrics>>) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        m.render_prometheus(),
    )
        .into_response()
}

async fn status_page(State(m): State<Arc<Metrics>>) -> Response {
    let html = render_status_page(m.info(), &m.snapshot(), &m.readiness(), chrono::Utc::now());
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        html,
    )
        .into_response()
}

async fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "not found: try / (status page), /healthz, /readyz or /metrics\n".into(),
    )
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

/// The running listener.
pub struct OpsServer {
    addr: SocketAddr,
    stop: ShutdownTrigger,
    task: tokio::task::JoinHandle<()>,
}

impl OpsServer {
    /// Binds `addr` (port 0 picks a free one) and serves until `shutdown` triggers or
    /// [`OpsServer::stop`] is called.
    pub async fn start(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<OpsServer, OpsError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| OpsError::Bind {
                addr,
                detail: e.to_string(),
            })?;
        let bound = listener.local_addr().map_err(|e| OpsError::Bind {
            addr,
            detail: e.to_string(),
        })?;
        let (stop, mut stopped) = Shutdown::new();
        let mut shutdown = shutdown;
        let app = router(metrics);
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    tokio::select! {
                        _ = shutdown.wait() => {}
                        _ = stopped.wait() => {}
                    }
                })
                .await;
            if let Err(e) = served {
                tracing::error!("the metrics listener on {bound} stopped: {e}");
            }
        });
        Ok(OpsServer {
            addr: bound,
            stop,
            task,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets in-flight requests finish (at most 5 s), then returns.
    pub async fn stop(self) {
        self.stop.trigger();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}
