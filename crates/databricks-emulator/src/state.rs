//! Shared server state: configuration, layout, store, tokens, permissions, faults, statistics
//! and running statements. One `Arc<Shared>` is handed to every request handler.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::faults::Faults;
use crate::layout::{EndpointDef, Layout};
use crate::statements::StatementTable;
use crate::store::Store;
use crate::{EmulatorConfig, Privilege};

/// The principal name a configured personal access token acts as.
pub const PAT_PRINCIPAL: &str = "pat-user";

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters exposed by `/_emulator/stats`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub requests: BTreeMap<String, u64>,
    pub statements_executed: u64,
    pub statements_failed: u64,
    /// Statements moved to CANCELED by `POST .../cancel` (or `on_wait_timeout: CANCEL`).
    pub statements_cancelled: u64,
    pub rows_returned: u64,
    pub chunks_served: u64,
    pub tokens_issued: u64,
    pub unauthenticated: u64,
    pub dropped_connections: u64,
}

pub(crate) struct Shared {
    pub cfg: EmulatorConfig,
    pub base_url: String,
    pub layout: Arc<Layout>,
    pub endpoints: RwLock<Vec<EndpointDef>>,
    pub store: Arc<Store>,
    pub tokens: Mutex<HashMap<String, (String, Instant)>>,
    pub revoked: RwLock<HashSet<(String, Privilege)>>,
    pub faults: Mutex<Faults>,
    pub stats: Mutex<Stats>,
    pub statements: Mutex<StatementTable>,
    pub sign_key: u64,
    pub started_ms: i64,
    /// Traces added at run time (`/_emulator/traces`): `(timestamp ms, seed)`, each one trace in
    /// every experiment.
    pub extra_traces: Mutex<Vec<(i64, u64)>>,
    /// Seeds of the `extra_traces` still running (`IN_PROGRESS`, `Emulator::start_trace`).
    pub traces_in_progress: Mutex<std::collections::HashSet<u64>>,
    /// When `Emulator::finish_trace` ended them (ms): their execution duration runs until then.
    pub traces_finished: Mutex<std::collections::HashMap<u64, i64>>,
    /// Where signed trace-data URIs point (`Emulator::set_storage_url`), e.g. a TLS front;
    /// `None`: the emulator's own address.
    pub storage_url: Mutex<Option<String>>,
    /// Secrets rotated at run time (`Emulator::rotate_secrets`): (client secret, PAT). A rotated
    /// secret replaces the configured one; tokens issued before stay valid until they expire.
    pub rotated: Mutex<(Option<String>, Option<String>)>,
}

impl Shared {
    /// Issue a token for `principal`.
    pub(crate) fn issue_token(&self, principal: &str) -> String {
        let token = format!("emu-{:032x}", rand::random::<u128>());
        let ttl = Duration::from_secs(self.cfg.token_ttl_secs);
        lock(&self.tokens).insert(token.clone(), (principal.to_string(), Instant::now() + ttl));
        lock(&self.stats).tokens_issued += 1;
        token
    }

    /// The principal behind a bearer token, or why it is refused.
    pub(crate) fn authenticate(&self, bearer: &str) -> Result<String, &'static str> {
        let rotated_pat = lock(&self.rotated).1.clone();
        if let Some(pat) = rotated_pat.as_ref().or(self.cfg.pat.as_ref()) {
            if !pat.is_empty() && pat == bearer {
                return Ok(PAT_PRINCIPAL.to_string());
            }
        }
        let tokens = lock(&self.tokens);
        match tokens.get(bearer) {
            Some((p, exp)) if *exp > Instant::now() => Ok(p.clone()),
            Some(_) => Err("Token is expiring within 30 seconds. (token expired)"),
            None => Err("Invalid access token."),
        }
    }

    /// The client secret the token endpoint accepts now.
    pub(crate) fn client_secret(&self) -> String {
        lock(&self.rotated)
            .0
            .clone()
            .unwrap_or_else(|| self.cfg.client_secret.clone())
    }

    pub(crate) fn expire_all_tokens(&self) {
        lock(&self.tokens).clear();
    }

    pub(crate) fn allowed(&self, principal: &str, p: &Privilege) -> bool {
        let r = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        !r.contains(&(principal.to_string(), p.clone()))
            && !r.contains(&("*".to_string(), p.clone()))
    }

    pub(crate) fn count_request(&self, route: &str) {
        *lock(&self.stats)
            .requests
            .entry(route.to_string())
            .or_insert(0) += 1;
    }

    pub(crate) fn stats_json(&self) -> Value {
        // Not nested in the stats lock: statement handlers take statements, then stats.
        let running = lock(&self.statements).running();
        let s = lock(&self.stats);
        let faults = lock(&self.faults).fired;
        json!({
            "requests": s.requests,
            "requests_total": s.requests.values().sum::<u64>(),
            "statements_executed": s.statements_executed,
            "statements_failed": s.statements_failed,
            "statements_cancelled": s.statements_cancelled,
            "statements_running": running,
            "rows_returned": s.rows_returned,
            "chunks_served": s.chunks_served,
            "tokens_issued": s.tokens_issued,
            "unauthenticated": s.unauthenticated,
            "dropped_connections": s.dropped_connections,
            "faults_fired": faults,
            "rows_total": self.store.rows_total(),
        })
    }
}
