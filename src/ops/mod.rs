//! Operations: what an operator looks at while the service runs, instead of reading logs.
//!
//! [`Metrics`] is fed once after every cycle (from the [`CycleReport`](crate::run::CycleReport)
//! and the Databricks client's [`ApiStats`](crate::databricks::ApiStats)) and is the only source
//! of truth for the HTTP listener ([`OpsServer`], `METRICS_ADDR`): `GET /healthz` (alive),
//! `GET /readyz` (the last successful cycle ended less than two intervals ago, or a cycle
//! still running had records confirmed within two intervals), `GET /metrics` (Prometheus text
//! exposition) and `GET /` (a server-rendered status page, no external assets).
//!
//! Architecture Invariant: ops only observes. It never drives a cycle, never touches state or
//! sinks, and a failing or slow scraper cannot slow a cycle down (the cycle holds the registry's
//! lock only to copy numbers in).

mod metrics;
mod page;
mod server;

pub use metrics::{
    CycleResult, CycleSummary, Metrics, Readiness, ServiceInfo, Snapshot, DURATION_BUCKETS,
    HISTORY_CYCLES,
};
pub use page::render_status_page;
pub use server::{router, OpsError, OpsServer};
