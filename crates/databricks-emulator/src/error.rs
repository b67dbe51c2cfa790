//! Errors of the emulator's public API: start-up, fault specs and configuration problems.
//! Each message names the offending field and how to fix it.

/// Everything the emulator's public API can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The listen address could not be bound.
    #[error("cannot bind listen address {addr}: {source}; pick a free port or use 127.0.0.1:0")]
    Bind {
        /// The address that was requested.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A fault specification could not be parsed.
    #[error("invalid fault spec: {0}")]
    FaultSpec(String),
    /// A configuration value is out of range.
    #[error("invalid configuration field `{field}`: {reason}")]
    Config {
        /// The configuration field.
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The embedded SQLite store failed.
    #[error("emulator storage error: {0}")]
    Storage(String),
}

impl From<rusqlite::Error> for EmulatorError {
    fn from(e: rusqlite::Error) -> Self {
        EmulatorError::Storage(e.to_string())
    }
}
