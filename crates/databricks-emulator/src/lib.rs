//! Placeholder during construction.
mod error;
mod layout;
mod payload;
mod store;
pub use error::EmulatorError;
/// One visible inference row.
#[derive(Debug, Clone)]
pub struct GroundTruthRow { pub table: String, pub databricks_request_id: String, pub request_time: String }
