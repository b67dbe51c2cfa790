//! Akto traffic records: the pure mapping from inference-table executions to the records Akto's
//! Data Ingestion Service accepts.
//!
//! Architecture Invariant: `traffic` never performs I/O. It receives plain [`Execution`]s from
//! `collect` and hands [`AktoRecord`]s to `sink`; everything here is a function of its inputs,
//! never panics, and can be tested with data alone.
//!
//! - [`agent_host`] / [`invocation_path`]: where a record lands in Akto (scheme in [`host`]).
//! - [`map_execution`]: one execution -> its record plus one record per tool call (choices in
//!   [`map`]).
//! - [`validate()`]: the local copy of Akto's acceptance rules; [`encode`]: the wire form.
//! - [`Redactor`]: opt-in masking of sensitive values before egress (see [`redact`]).
//! - [`for_akto_runtime`]: the last step before egress, so that what Akto accepts it also keeps
//!   (see [`runtime`]).

pub mod execution;
pub mod host;
pub mod map;
pub mod record;
pub mod redact;
pub mod runtime;
mod tools;
pub mod validate;

#[cfg(test)]
mod tests;

pub use execution::{AgentContext, Execution, TableFormat};
pub use host::{agent_host, invocation_path};
pub use map::{map_execution, map_execution_taking, MapOptions, Mapped};
pub use record::{encode, fit_record, settle_request_content_type, AktoRecord, MAX_STRING_BYTES};
pub use redact::{parse_kinds, RedactKind, RedactionCounts, Redactor, UnknownRedactKind};
pub use runtime::{for_akto_runtime, STATUS_HEADER};
pub use validate::{validate, ContractViolation, ALLOWED_SOURCES};
