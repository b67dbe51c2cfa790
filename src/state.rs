//! State: what was delivered, per inference table, kept crash-safe in a redb file under STATE_DIR.
//!
//! For each table the store keeps the request ids delivered inside the lookback window (looked up
//! to skip rows already sent, and counted per time range to find late arrivals without re-reading
//! the window), and a cursor: the newest `(request_time, request_id)` delivered, from which a
//! connector that was down longer than the lookback catches up.
//!
//! Every delivered id is kept ordered by `(namespace, time, id)`: the sources that know a unit's
//! exact time when they look it up (inference rows, MLflow traces) are looked up there
//! ([`StateStore::delivered_at`]), and their inserts land next to each other, since rows are read
//! in time order. Only the namespaces looked up by id alone (the tool call registry, the
//! inventory, span-table traces) are also indexed by id ([`DeliveredRow::by_id`]): inserts of
//! random ids touch a different B-tree page each, which made the by-id index of every row the
//! costliest part of delivery (BENCHMARKS.md, fifth pass). Even for those few namespaces the
//! by-id index is written in bulk: a commit appends its by-id rows as one entry of a log (the
//! same transaction as the rest of the commit), and they are moved into the index once
//! [`MERGE_AT`] of them have gathered, in one transaction, each B-tree page touched once for all
//! of them instead of once per commit (BENCHMARKS.md, seventh pass). Until then they are answered
//! from memory (the log, loaded at open).
//!
//! Architecture Invariant: state changes only after a sink confirmed delivery of the batch that
//! contains the ids (acknowledge, then checkpoint). Before a batch is sent an in-flight marker is
//! written; a marker found at start means the batches sent since the last commit (at most
//! `CHECKPOINT_BATCHES`) may be sent again (reported as a WARN).
//! Every commit of delivered ids is durable (fsync) when `commit_delivered` returns.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

/// (table, request id) -> request time in microseconds since the epoch; only the rows committed
/// with [`DeliveredRow::by_id`] (format 2; format 1 held every row here).
const DELIVERED: TableDefinition<(&str, &str), i64> = TableDefinition::new("delivered_v1");
/// (table, request time µs, request id) -> (): the same ids ordered by time.
const BY_TIME: TableDefinition<(&str, i64, &str), ()> =
    TableDefinition::new("delivered_by_time_v1");
/// table -> cursor, JSON `{"time_us":..,"id":".."}`.
const CURSORS: TableDefinition<&str, &str> = TableDefinition::new("cursors_v1");
/// "format" -> version.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// table -> start time (µs) of the last cycle that read the table completely and delivered it.
const READ_MARKS: TableDefinition<&str, i64> = TableDefinition::new("read_marks_v1");
/// (bound, namespace) -> µs: lower bounds of every later read of the namespace, so that no
/// read reaches below what the state can answer for. [`WINDOW_START`]: where reading began,
/// written once when the namespace is first read (before anything is delivered: the start of
/// that first window must not slide with later cycles). [`PRUNED_BEFORE`]: the highest horizon
/// its delivered ids were pruned below (a clock stepped back must not re-read that range).
const BOUNDS: TableDefinition<(&str, &str), i64> = TableDefinition::new("bounds_v1");
const WINDOW_START: &str = "window_start";
const PRUNED_BEFORE: &str = "pruned_before";
/// Commit sequence -> the by-id rows `(table, id, time µs)` of that commit not yet moved into
/// `DELIVERED` (format 3).
const BY_ID_LOG: TableDefinition<u64, Vec<(&str, &str, i64)>> =
    TableDefinition::new("by_id_log_v1");
/// Logged by-id rows moved into `DELIVERED` at once. Bounds the memory that answers for them
/// (about 100 bytes each) and the log; larger merges touch fewer pages per row.
pub const MERGE_AT: usize = 16_384;

/// 2: rows of by-time namespaces are no longer in `DELIVERED`. A format 1 file is upgraded in
/// place (its extra by-id entries are harmless and pruned with the rest).
/// 3: by-id rows may wait in `BY_ID_LOG` before they are in `DELIVERED`. Upgrading 2 adds the
/// empty log.
/// 4: tool call registry ids are `trace`/`row`, U+001F, call id (`run::CallSource`); the bare
/// ids of format 3 are still read. Upgrading 3 changes nothing else; a format 3 build would not
/// find the new ids and send tool calls again, so it must refuse the file.
/// A build refuses a newer format rather than miss ids and send rows again.
const FORMAT_VERSION: &str = "4";

/// The `META` key of the workspace the state belongs to ([`StateStore::bind_workspace`]).
const WORKSPACE_KEY: &str = "workspace";
/// Next to the state file: the same workspace as plain text, read without the state's lock by
/// [`default_state_dir`].
const WORKSPACE_FILE: &str = "databricks-shield.workspace";
/// Older formats this build upgrades.
const UPGRADES_FROM: &[&str] = &["1", "2", "3"];
/// The state file's name inside STATE_DIR.
pub const FILE_NAME: &str = "databricks-shield.redb";
/// Next to it: the in-flight marker of the batch being sent.
const IN_FLIGHT_FILE: &str = "in-flight.json";
/// redb's page cache. Its default (1 GiB) grows the process with the number of delivered ids;
/// the cache only speeds up reads, commits stay durable.
const CACHE_BYTES: usize = 4 << 20;

#[derive(serde::Serialize, serde::Deserialize)]
struct InFlight {
    records: u64,
    #[serde(default)]
    table: String,
    #[serde(default)]
    id: String,
    /// The probe's time (absent in a marker written by format 1: then it is looked up by id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    time_us: Option<i64>,
}

/// An error of the state store. None is retriable within a run: state problems need an operator.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "another databricks-shield is already running with STATE_DIR={0}: two instances must not \
         share one state directory (stop the other one, or give each instance its own STATE_DIR)"
    )]
    Locked(PathBuf),
    #[error(
        "the state file {path} is damaged or unreadable ({detail}). Nothing was sent. To start over, \
         run once with --reset-state: the damaged file is moved aside and the connector re-sends what \
         it finds in the last LOOKBACK_MINUTES (Akto may receive records it already has)"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "the state file {path} was written by a newer databricks-shield ({detail}). Nothing was \
         sent. Fix: run that version or a newer one. Not --reset-state: it would set the state \
         aside and send the last LOOKBACK_MINUTES again"
    )]
    Newer { path: PathBuf, detail: String },
    #[error("cannot use STATE_DIR {path}: {detail}. Fix: make it a writable directory for this user, or set STATE_DIR")]
    Dir { path: PathBuf, detail: String },
    /// The state was written for another workspace: its table names and experiment ids would be
    /// taken for this one's, and rows skipped as delivered.
    #[error(
        "the state file {path} belongs to the workspace {recorded}, not to DATABRICKS_HOST \
         {configured}: its read positions would make this workspace's rows look delivered. \
         Nothing was sent. Fix: give each workspace its own STATE_DIR (e.g. \
         STATE_DIR=./state-<workspace>), or leave STATE_DIR unset: each workspace then keeps its \
         state in ./state/<host>. If it is the same workspace under a new address, run once with \
         --reset-state (it moves the old file aside and re-sends the last LOOKBACK_MINUTES)"
    )]
    OtherWorkspace {
        path: PathBuf,
        recorded: String,
        configured: String,
    },
    #[error("state store error in {path}: {detail}")]
    Io { path: PathBuf, detail: String },
    /// A commit went through, a step after it did not (removing the in-flight marker, moving
    /// logged ids into the index): nothing confirmed is lost, but the store needs an operator.
    #[error("the checkpoint in {path} is written, but {step} failed: {detail}")]
    AfterCommit {
        path: PathBuf,
        step: &'static str,
        detail: String,
    },
}

/// The newest delivered row of a table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub time_us: i64,
    pub id: String,
}

/// One delivered row.
#[derive(Debug, Clone)]
pub struct DeliveredRow<'a> {
    pub table: &'a str,
    pub id: &'a str,
    pub time_us: i64,
    /// Also index it by id, for [`StateStore::delivered_among`]: for namespaces whose lookups do
    /// not know the time. Rows without it are found by [`StateStore::delivered_at`] only.
    pub by_id: bool,
}

/// The crash-safe store.
pub struct StateStore {
    db: Database,
    path: PathBuf,
    /// The open in-flight marker and the length written so far: rewritten in place (never
    /// truncated, which would make ext4 flush it on close) until the commit removes it.
    marker: std::sync::Mutex<Option<(fs::File, usize)>>,
    /// The by-id rows of `BY_ID_LOG`, held to answer [`StateStore::delivered_among`].
    logged: std::sync::Mutex<Logged>,
}

/// The by-id rows committed to the log and not yet merged into `DELIVERED`.
#[derive(Default)]
struct Logged {
    /// table -> id -> time µs.
    rows: std::collections::HashMap<String, std::collections::HashMap<Box<str>, i64>>,
    /// How many entries `rows` holds.
    len: usize,
    /// The log's last sequence number (the next commit's is one more).
    last_seq: Option<u64>,
}

impl Logged {
    fn add(&mut self, table: &str, id: &str, time_us: i64) {
        let ids = match self.rows.get_mut(table) {
            Some(ids) => ids,
            None => self.rows.entry(table.to_string()).or_default(),
        };
        // The newest time of an id registered more than once (see `keep_newest`).
        match ids.get_mut(id) {
            Some(t) => *t = (*t).max(time_us),
            None => {
                ids.insert(id.into(), time_us);
                self.len += 1;
            }
        }
    }
}

/// Indexes `(table, id)` at `time_us` in `DELIVERED`, keeping the newest time of an id registered
/// more than once (a tool call id an agent reuses): pruning removes an id's index entry with
/// its newest row only. Costs a second write only when an older time comes after a newer one.
fn keep_newest(
    delivered: &mut redb::Table<(&str, &str), i64>,
    table: &str,
    id: &str,
    time_us: i64,
) -> Result<(), redb::StorageError> {
    let before = delivered.insert((table, id), time_us)?.map(|v| v.value());
    if let Some(newer) = before.filter(|&b| b > time_us) {
        delivered.insert((table, id), newer)?;
    }
    Ok(())
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("path", &self.path)
            .finish()
    }
}

fn prepare_dir(dir: &Path) -> Result<(), StateError> {
    let err = |e: std::io::Error| StateError::Dir {
        path: dir.to_path_buf(),
        detail: e.to_string(),
    };
    fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Creates (or opens) a file with mode 0600.
pub fn create_private_file(path: &Path, append: bool) -> std::io::Result<fs::File> {
    let mut opts = OpenOptions::new();
    opts.create(true).read(true);
    if append {
        opts.append(true);
    } else {
        opts.write(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

/// The folder of the workspace `identity`'s state when `STATE_DIR` was not set: its own folder
/// under `base` (`./state/<host>`, `:` of a port as `_`), so that the jobs of several workspaces,
/// which Akto's job runner starts in one folder and cannot give a `STATE_DIR`, keep apart.
///
/// A state that an earlier release left in `base` itself stays in use when it is this
/// workspace's: bound to it, or bound to none and showing no other workspace's agents (the tool
/// call registry names every agent host it sent calls on; `host_is_ours` tells this workspace's
/// from others). Otherwise it is left as it is, with a WARN when it is unbound (this workspace's
/// state then starts anew). Nothing is created here.
pub fn default_state_dir(
    base: &Path,
    identity: &str,
    host_is_ours: impl Fn(&str) -> bool,
) -> Result<PathBuf, StateError> {
    let slug: String = identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let own = base.join(if slug.is_empty() { "workspace" } else { &slug });
    if own.join(FILE_NAME).exists() || !base.join(FILE_NAME).exists() {
        return Ok(own);
    }
    // Bound: its workspace is in a plain file next to it, read without the state's lock (the
    // state may be in use by its own workspace's run).
    // (An empty one, from a write cut short, says nothing.)
    let recorded = fs::read_to_string(base.join(WORKSPACE_FILE)).unwrap_or_default();
    let recorded = recorded.trim();
    if !recorded.is_empty() {
        if recorded == identity {
            return Ok(base.to_path_buf());
        }
        tracing::info!(
            "the state in {} belongs to the workspace {recorded}; this workspace's is in {}",
            base.display(),
            own.display()
        );
        return Ok(own);
    }
    let earlier = match StateStore::open_unchanged(base) {
        Ok((earlier, _)) => earlier,
        // In use and not bound (a run of this release binds it as it opens it, an earlier
        // release's never does), or damaged, or a newer build's: the start opens it and says so
        // (another instance is running; --reset-state moves a damaged one aside there).
        Err(_) => return Ok(base.to_path_buf()),
    };
    match earlier.workspace()? {
        Some(w) if w == identity => Ok(base.to_path_buf()),
        Some(w) => {
            tracing::info!(
                "the state in {} belongs to the workspace {w}; this workspace's is in {}",
                base.display(),
                own.display()
            );
            Ok(own)
        }
        None => {
            // Every agent host it sent tool calls on: registry namespaces still holding calls,
            // and those whose cursor alone is left (cursors are never pruned).
            let mut hosts: std::collections::BTreeSet<String> = earlier
                .namespaces_with_prefix(crate::run::TOOL_CALL_PREFIX)?
                .into_iter()
                .collect();
            hosts.extend(
                earlier
                    .cursors()?
                    .into_iter()
                    .map(|(ns, _)| ns)
                    .filter(|ns| ns.starts_with(crate::run::TOOL_CALL_PREFIX)),
            );
            let foreign: Vec<&str> = hosts
                .iter()
                .filter_map(|ns| ns.strip_prefix(crate::run::TOOL_CALL_PREFIX))
                .filter(|host| !host_is_ours(host))
                .collect();
            if foreign.is_empty() {
                return Ok(base.to_path_buf());
            }
            tracing::warn!(
                "the state in {} (written by an earlier release) holds agents of another \
                 workspace (tool calls sent on {}): another workspace read with it, so its read \
                 positions are not this workspace's alone. It is left as it is; this \
                 workspace's state starts in {}, and its first run sends the last \
                 LOOKBACK_MINUTES again (Akto may receive records it already has)",
                base.display(),
                foreign.first().copied().unwrap_or(""),
                own.display()
            );
            Ok(own)
        }
    }
}

impl StateStore {
    /// Opens the store in `dir` (created 0700, file 0600). With `reset`, a damaged or old file is
    /// moved aside first (`*.damaged-<unix time>`), never deleted.
    pub fn open(dir: &Path, reset: bool) -> Result<StateStore, StateError> {
        let store = Self::open_file(dir, reset)?;
        store.init(true)?;
        Ok(store)
    }

    /// Opens the store as [`StateStore::open`] does, for `check`: a file of an older format is
    /// left as it is (an upgrade is one-way: a diagnostic run must not prevent going back).
    /// Returns the store and the format version found, when it is an older one.
    pub fn open_unchanged(dir: &Path) -> Result<(StateStore, Option<String>), StateError> {
        let store = Self::open_file(dir, false)?;
        let older = store.init(false)?;
        Ok((store, older))
    }

    fn open_file(dir: &Path, reset: bool) -> Result<StateStore, StateError> {
        prepare_dir(dir)?;
        let path = dir.join(FILE_NAME);
        if reset && path.exists() {
            // Not under a running instance's feet: its lock on the file (the one redb takes,
            // flock) is tried first, and held while the file is moved.
            // Opened for writing, as redb opens it: an exclusive lock on NFS (flock emulated
            // with fcntl) needs a file open for writing.
            let held = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| StateError::Io {
                    path: path.clone(),
                    detail: format!("cannot open the old state to move it aside: {e}"),
                })?;
            match held.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(StateError::Locked(dir.to_path_buf()))
                }
                // A file system without locks: redb itself runs without one there.
                Err(fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
                    tracing::warn!(
                        "--reset-state: {} cannot be locked on this file system ({e}); make \
                         sure no other instance uses STATE_DIR",
                        path.display()
                    );
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(StateError::Io {
                        path: path.clone(),
                        detail: format!("cannot lock the old state to move it aside: {e}"),
                    })
                }
            }
            let aside = dir.join(format!(
                "{FILE_NAME}.reset-{}",
                chrono::Utc::now().timestamp()
            ));
            fs::rename(&path, &aside).map_err(|e| StateError::Io {
                path: path.clone(),
                detail: format!("cannot move the old state aside: {e}"),
            })?;
            tracing::warn!(
                "--reset-state: moved {} to {}; records of the last LOOKBACK_MINUTES will be sent again",
                path.display(),
                aside.display()
            );
        }
        create_private_file(&path, false).map_err(|e| StateError::Dir {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let db = match redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
        {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StateError::Locked(dir.to_path_buf()))
            }
            Err(e) => {
                let detail = e.to_string();
                if detail.to_lowercase().contains("lock") {
                    return Err(StateError::Locked(dir.to_path_buf()));
                }
                return Err(match e {
                    // A disk that is full or failing is not a damaged file: no reset advice.
                    // (redb reports a file that is not its own as InvalidData, and one cut short
                    // as UnexpectedEof: damage.)
                    redb::DatabaseError::Storage(redb::StorageError::Io(io))
                        if !matches!(
                            io.kind(),
                            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                        ) =>
                    {
                        StateError::Io {
                            path,
                            detail: format!(
                            "cannot open or create it: {io}. Fix: free space on its disk, check \
                             the disk and the file's permissions, then start again"
                        ),
                        }
                    }
                    // redb's own header: a file format above the one this build's redb reads
                    // (or a damaged version byte: the message says both).
                    redb::DatabaseError::Storage(redb::StorageError::Corrupted(m))
                        if m.starts_with("Expected file format version <=") =>
                    {
                        StateError::Newer {
                            path,
                            detail: format!("{m}; if no newer build ever ran here, the file is damaged: then run once with --reset-state"),
                        }
                    }
                    _ => StateError::Corrupt { path, detail },
                });
            }
        };
        let store = StateStore {
            db,
            path,
            marker: std::sync::Mutex::new(None),
            logged: Default::default(),
        };
        Ok(store)
    }

    fn io<E: std::fmt::Display>(&self, e: E) -> StateError {
        StateError::Io {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    /// Creates the tables of a new file and checks the format of an existing one, upgrading an
    /// older format when `upgrade` (else it returns that format's version and changes nothing).
    fn init(&self, upgrade: bool) -> Result<Option<String>, StateError> {
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        let mut older = None;
        let mut tag_tool_call_ids = false;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.io(e))?;
            let existing = meta
                .get("format")
                .map_err(|e| self.io(e))?
                .map(|v| v.value().to_string());
            match existing.as_deref() {
                None => {
                    meta.insert("format", FORMAT_VERSION)
                        .map_err(|e| self.io(e))?;
                }
                Some(FORMAT_VERSION) => {}
                Some(old) if UPGRADES_FROM.contains(&old) && !upgrade => {
                    older = Some(old.to_string());
                }
                Some(old) if UPGRADES_FROM.contains(&old) => {
                    tracing::info!(
                        "state file {}: format {old} upgraded to {FORMAT_VERSION}",
                        self.path.display()
                    );
                    meta.insert("format", FORMAT_VERSION)
                        .map_err(|e| self.io(e))?;
                    tag_tool_call_ids = true;
                }
                Some(other) => {
                    let detail = format!(
                        "state format version {other}, this build reads version {FORMAT_VERSION}"
                    );
                    let path = self.path.clone();
                    // A number above ours is a newer build's; anything else is damage.
                    return Err(
                        match (other.parse::<u32>(), FORMAT_VERSION.parse::<u32>()) {
                            (Ok(found), Ok(ours)) if found > ours => {
                                StateError::Newer { path, detail }
                            }
                            _ => StateError::Corrupt { path, detail },
                        },
                    );
                }
            }
            txn.open_table(DELIVERED).map_err(|e| self.io(e))?;
            txn.open_table(BY_TIME).map_err(|e| self.io(e))?;
            txn.open_table(CURSORS).map_err(|e| self.io(e))?;
            txn.open_table(READ_MARKS).map_err(|e| self.io(e))?;
            txn.open_table(BOUNDS).map_err(|e| self.io(e))?;
            if tag_tool_call_ids {
                self.tag_tool_call_ids(&txn)?;
            }
            if older.is_none() {
                let log = txn.open_table(BY_ID_LOG).map_err(|e| self.io(e))?;
                self.load_log(&log)?;
            }
        }
        if older.is_some() {
            // Nothing written: the file stays as it was (an older format has no log).
            txn.abort().map_err(|e| self.io(e))?;
        } else {
            txn.commit().map_err(|e| self.io(e))?;
        }
        Ok(older)
    }

    /// Format 4: the tool call registry's ids of an earlier format (bare call ids, of either
    /// source) are registered under both sources' keys too (`run::tool_call_keys`), at the same
    /// time, so the registry needs no lookup of bare ids; the bare rows are pruned as usual.
    fn tag_tool_call_ids(&self, txn: &redb::WriteTransaction) -> Result<(), StateError> {
        let prefix = crate::run::TOOL_CALL_PREFIX;
        let mut bare: Vec<(String, i64, String)> = Vec::new();
        {
            let by_time = txn.open_table(BY_TIME).map_err(|e| self.io(e))?;
            let end = format!("{}\u{10ffff}", prefix);
            for entry in by_time
                .range((prefix, i64::MIN, "")..(end.as_str(), i64::MIN, ""))
                .map_err(|e| self.io(e))?
            {
                let (k, _) = entry.map_err(|e| self.io(e))?;
                let (table, time_us, id) = k.value();
                if !id.contains('\u{1f}') {
                    bare.push((table.to_string(), time_us, id.to_string()));
                }
            }
        }
        let mut by_time = txn.open_table(BY_TIME).map_err(|e| self.io(e))?;
        let mut delivered = txn.open_table(DELIVERED).map_err(|e| self.io(e))?;
        for (table, time_us, id) in &bare {
            for key in crate::run::tool_call_keys(id) {
                by_time
                    .insert((table.as_str(), *time_us, key.as_str()), ())
                    .map_err(|e| self.io(e))?;
                keep_newest(&mut delivered, table, &key, *time_us).map_err(|e| self.io(e))?;
            }
        }
        if !bare.is_empty() {
            tracing::info!(
                "state file {}: {} tool call(s) registered by an earlier release kept under \
                 their sources' keys",
                self.path.display(),
                bare.len()
            );
        }
        Ok(())
    }

    /// Loads the by-id rows waiting in the log into memory.
    fn load_log(
        &self,
        log: &impl ReadableTable<u64, Vec<(&'static str, &'static str, i64)>>,
    ) -> Result<(), StateError> {
        let mut logged = Logged::default();
        for item in log.iter().map_err(|e| self.io(e))? {
            let (seq, rows) = item.map_err(|e| self.io(e))?;
            logged.last_seq = Some(seq.value());
            for (table, id, time_us) in rows.value() {
                logged.add(table, id, time_us);
            }
        }
        *self.logged.lock().unwrap_or_else(|p| p.into_inner()) = logged;
        Ok(())
    }

    /// Moves every logged by-id row into `DELIVERED` and empties the log, in one transaction.
    fn merge_log(&self) -> Result<(), StateError> {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let Some(last_seq) = logged.last_seq.filter(|_| !logged.rows.is_empty()) else {
            return Ok(());
        };
        let mut rows: Vec<(&str, &str, i64)> = logged
            .rows
            .iter()
            .flat_map(|(table, ids)| ids.iter().map(move |(id, t)| (table.as_str(), &**id, *t)))
            .collect();
        // In key order: neighbours share their pages.
        rows.sort_unstable();
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut delivered = txn.open_table(DELIVERED).map_err(|e| self.io(e))?;
            for (table, id, time_us) in &rows {
                keep_newest(&mut delivered, table, id, *time_us).map_err(|e| self.io(e))?;
            }
            let mut log = txn.open_table(BY_ID_LOG).map_err(|e| self.io(e))?;
            log.retain_in(..=last_seq, |_, _| false)
                .map_err(|e| self.io(e))?;
        }
        txn.commit().map_err(|e| self.io(e))?;
        drop(rows);
        logged.rows.clear();
        logged.len = 0;
        // The sequence goes on from where it was: a number is never reused.
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn in_flight_path(&self) -> PathBuf {
        self.path.with_file_name(IN_FLIGHT_FILE)
    }

    /// Records of a batch whose delivery was not confirmed before the last stop, if any. A
    /// marker whose batch was in fact committed (the process died between the commit and the
    /// marker's removal) does not count.
    pub fn unconfirmed_batch(&self) -> Result<Option<u64>, StateError> {
        let raw = match fs::read_to_string(self.in_flight_path()) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        let Ok(marker) = serde_json::from_str::<InFlight>(&raw) else {
            // Cut short by a crash while it was written: a batch was about to be sent.
            return Ok(Some(0));
        };
        if !marker.table.is_empty() {
            let committed = match marker.time_us {
                Some(t) => self
                    .delivered_at(&marker.table, [(t, marker.id.as_str())])?
                    .contains(&true),
                None => !self
                    .delivered_among(&marker.table, [marker.id.as_str()])?
                    .is_empty(),
            };
            if committed {
                return Ok(None);
            }
        }
        Ok(Some(marker.records))
    }

    /// Notes that `records` are about to be sent without a committed confirmation (the batches
    /// sent since the last commit, this one included); `probe` is one of their rows (table, id,
    /// time µs), to tell at the next start whether their confirmation was committed.
    ///
    /// The marker is a small file written without fsync: a process killed between sending and
    /// recording the confirmation finds it at its next start (it is in the kernel's page cache),
    /// and it costs no fsync per batch. It is created once per checkpoint and then rewritten in
    /// place, padded with spaces (JSON allows them). A power loss can lose it; then only the WARN
    /// line about the re-sent records is missing, the re-send itself is still bounded.
    pub fn mark_in_flight(
        &self,
        records: usize,
        probe: Option<(&str, &str, i64)>,
    ) -> Result<(), StateError> {
        use std::io::{Seek as _, Write as _};
        let marker = InFlight {
            records: records as u64,
            table: probe.map(|p| p.0).unwrap_or_default().to_string(),
            id: probe.map(|p| p.1).unwrap_or_default().to_string(),
            time_us: probe.map(|p| p.2),
        };
        let mut json = serde_json::to_string(&marker).map_err(|e| self.io(e))?;
        let mut open = self.marker.lock().unwrap_or_else(|p| p.into_inner());
        if open.is_none() {
            let mut opts = OpenOptions::new();
            opts.create(true).write(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let f = opts.open(self.in_flight_path()).map_err(|e| self.io(e))?;
            *open = Some((f, 0));
        }
        let Some((f, written)) = open.as_mut() else {
            return Ok(());
        };
        if json.len() < *written {
            json.extend(std::iter::repeat_n(' ', *written - json.len()));
        }
        f.seek(std::io::SeekFrom::Start(0))
            .and_then(|_| f.write_all(json.as_bytes()))
            .map_err(|e| self.io(e))?;
        *written = json.len();
        Ok(())
    }

    /// Removes the in-flight marker (after its batches were committed, or a stale one was
    /// reported).
    pub fn clear_in_flight(&self) -> Result<(), StateError> {
        let mut open = self.marker.lock().unwrap_or_else(|p| p.into_inner());
        *open = None;
        match fs::remove_file(self.in_flight_path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// The cursor of a table.
    pub fn cursor(&self, table: &str) -> Result<Option<Cursor>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = txn.open_table(CURSORS).map_err(|e| self.io(e))?;
        let raw = t.get(table).map_err(|e| self.io(e))?;
        match raw {
            None => Ok(None),
            Some(v) => serde_json::from_str(v.value())
                .map(Some)
                .map_err(|e| StateError::Corrupt {
                    path: self.path.clone(),
                    detail: format!("cursor of {table}: {e}"),
                }),
        }
    }

    /// Whether `mark` is set for the first time in this state (it is set now, durably): for a
    /// change of behaviour to be announced once per state, at the first start of the release
    /// that brings it.
    pub fn first_time(&self, mark: &str) -> Result<bool, StateError> {
        let key = format!("mark:{mark}");
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        let first = {
            let mut meta = txn.open_table(META).map_err(|e| self.io(e))?;
            let seen = meta.get(key.as_str()).map_err(|e| self.io(e))?.is_some();
            if !seen {
                meta.insert(key.as_str(), "1").map_err(|e| self.io(e))?;
            }
            !seen
        };
        txn.commit().map_err(|e| self.io(e))?;
        Ok(first)
    }

    /// Binds the state to the workspace `identity` (its host, see
    /// [`crate::config::Config::workspace_identity`]): recorded by the first start (a state of a
    /// release that recorded none is taken as this workspace's), refused when another workspace
    /// wrote it. Table names (`workspace.default.bot_payload`) and experiment ids repeat across
    /// workspaces: one workspace's cursors and delivered ids would skip another's rows. A state
    /// that holds nothing yet (a first start that failed before reading, say with a mistyped
    /// host) is bound anew.
    pub fn bind_workspace(&self, identity: &str) -> Result<(), StateError> {
        if !self.serves_workspace(identity)? {
            let txn = self.db.begin_write().map_err(|e| self.io(e))?;
            {
                let mut meta = txn.open_table(META).map_err(|e| self.io(e))?;
                meta.insert(WORKSPACE_KEY, identity)
                    .map_err(|e| self.io(e))?;
            }
            txn.commit().map_err(|e| self.io(e))?;
        }
        // The plain copy for [`default_state_dir`] (rewritten when it says otherwise), replaced
        // whole: written beside it, synced, renamed over it.
        let file = self.path.with_file_name(WORKSPACE_FILE);
        if fs::read_to_string(&file).ok().as_deref() != Some(identity) {
            let next = self.path.with_file_name(format!("{WORKSPACE_FILE}.next"));
            create_private_file(&next, false)
                .and_then(|mut f| {
                    f.set_len(0)?;
                    std::io::Write::write_all(&mut f, identity.as_bytes())?;
                    f.sync_all()
                })
                .and_then(|()| fs::rename(&next, &file))
                .map_err(|e| StateError::Io {
                    path: file,
                    detail: format!("cannot record the state's workspace: {e}"),
                })?;
        }
        Ok(())
    }

    /// Whether the state is bound to the workspace `identity` already (`Ok(false)`: it may be,
    /// [`StateStore::bind_workspace`] records it); the error [`StateError::OtherWorkspace`] when
    /// another workspace's reads and deliveries are in it. Changes nothing (for `check`).
    pub fn serves_workspace(&self, identity: &str) -> Result<bool, StateError> {
        match self.workspace()? {
            Some(r) if r == identity => Ok(true),
            Some(recorded) if !self.holds_nothing()? => Err(StateError::OtherWorkspace {
                path: self.path.clone(),
                recorded,
                configured: identity.to_string(),
            }),
            _ => Ok(false),
        }
    }

    /// Whether nothing was read or delivered with this state yet: no cursor, read mark, window
    /// bound or delivered id.
    fn holds_nothing(&self) -> Result<bool, StateError> {
        if self.logged.lock().unwrap_or_else(|p| p.into_inner()).len > 0 {
            return Ok(false);
        }
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let empty = |len: Result<u64, redb::TableError>| len.map(|n| n == 0);
        let all = [
            empty(txn.open_table(CURSORS).and_then(|t| Ok(t.len()?))),
            empty(txn.open_table(READ_MARKS).and_then(|t| Ok(t.len()?))),
            empty(txn.open_table(BOUNDS).and_then(|t| Ok(t.len()?))),
            empty(txn.open_table(BY_TIME).and_then(|t| Ok(t.len()?))),
            empty(txn.open_table(DELIVERED).and_then(|t| Ok(t.len()?))),
        ];
        let mut nothing = true;
        for e in all {
            nothing &= e.map_err(|e| self.io(e))?;
        }
        Ok(nothing)
    }

    /// The workspace the state was bound to by [`StateStore::bind_workspace`], if any.
    pub fn workspace(&self) -> Result<Option<String>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let meta = txn.open_table(META).map_err(|e| self.io(e))?;
        let recorded = meta
            .get(WORKSPACE_KEY)
            .map_err(|e| self.io(e))?
            .map(|v| v.value().to_string());
        Ok(recorded)
    }

    /// Records `value` for the setting `name` (durably) and returns the value recorded before, if
    /// any: for a change of a setting between runs to be announced.
    pub fn swap_setting(&self, name: &str, value: &str) -> Result<Option<String>, StateError> {
        let key = format!("setting:{name}");
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        let before = {
            let mut meta = txn.open_table(META).map_err(|e| self.io(e))?;
            let before = meta
                .get(key.as_str())
                .map_err(|e| self.io(e))?
                .map(|v| v.value().to_string());
            if before.as_deref() != Some(value) {
                meta.insert(key.as_str(), value).map_err(|e| self.io(e))?;
            }
            before
        };
        txn.commit().map_err(|e| self.io(e))?;
        Ok(before)
    }

    /// Every namespace's cursor, in namespace order: what was delivered from where, also from
    /// tables no longer discovered (cursors are kept when ids are pruned).
    pub fn cursors(&self) -> Result<Vec<(String, Cursor)>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = txn.open_table(CURSORS).map_err(|e| self.io(e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| self.io(e))? {
            let (k, v) = entry.map_err(|e| self.io(e))?;
            let ns = k.value().to_string();
            let c = serde_json::from_str(v.value()).map_err(|e| StateError::Corrupt {
                path: self.path.clone(),
                detail: format!("cursor of {ns}: {e}"),
            })?;
            out.push((ns, c));
        }
        Ok(out)
    }

    /// Which of `ids` of `table` were delivered already, for namespaces committed with
    /// [`DeliveredRow::by_id`] (a row committed without it is not found here).
    pub fn delivered_among<'a>(
        &self,
        table: &str,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<std::collections::HashSet<String>, StateError> {
        // Held until the snapshot is taken: a merge moving rows from the log into the index
        // cannot fall between the two looks.
        let logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = txn.open_table(DELIVERED).map_err(|e| self.io(e))?;
        let in_log = logged.rows.get(table);
        let mut out = std::collections::HashSet::new();
        for id in ids {
            if in_log.is_some_and(|ids| ids.contains_key(id))
                || t.get((table, id)).map_err(|e| self.io(e))?.is_some()
            {
                out.insert(id.to_string());
            }
        }
        Ok(out)
    }

    /// For each `(time µs, id)` row of `table`, in order: was it delivered already? Found by
    /// time, for every namespace. A row is the same row only with the same time: the sources that
    /// look up this way key their units by an immutable time of the source (a request's or
    /// trace's), read as a number, never as text in a session time zone.
    pub fn delivered_at<'a>(
        &self,
        table: &str,
        rows: impl IntoIterator<Item = (i64, &'a str)>,
    ) -> Result<Vec<bool>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = txn.open_table(BY_TIME).map_err(|e| self.io(e))?;
        // The namespace's latest time: a row after it cannot be there, no lookup needed (most
        // rows of a cycle are new ones). One descent of the tree for the whole call.
        let next_ns = format!("{table}\0");
        let latest = t
            .range((table, i64::MIN, "")..(next_ns.as_str(), i64::MIN, ""))
            .map_err(|e| self.io(e))?
            .next_back()
            .transpose()
            .map_err(|e| self.io(e))?
            .map(|(k, _)| k.value().1);
        rows.into_iter()
            .map(|(time_us, id)| match latest {
                Some(l) if time_us <= l => t
                    .get((table, time_us, id))
                    .map(|v| v.is_some())
                    .map_err(|e| self.io(e)),
                _ => Ok(false),
            })
            .collect()
    }

    /// How many delivered rows of `table` have a time in each `[bounds[i], bounds[i+1])`.
    pub fn count_by_range(&self, table: &str, bounds: &[i64]) -> Result<Vec<u64>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = txn.open_table(BY_TIME).map_err(|e| self.io(e))?;
        let mut out = Vec::with_capacity(bounds.len().saturating_sub(1));
        for w in bounds.windows(2) {
            let range = t
                .range((table, w[0], "")..(table, w[1], ""))
                .map_err(|e| self.io(e))?;
            out.push(range.count() as u64);
        }
        Ok(out)
    }

    /// Delivered ids of `table` with a time in `[from_us, to_us)`.
    pub fn ids_in_range(
        &self,
        table: &str,
        from_us: i64,
        to_us: i64,
    ) -> Result<Vec<String>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = txn.open_table(BY_TIME).map_err(|e| self.io(e))?;
        let mut out = Vec::new();
        for item in t
            .range((table, from_us, "")..(table, to_us, ""))
            .map_err(|e| self.io(e))?
        {
            let (k, _) = item.map_err(|e| self.io(e))?;
            out.push(k.value().2.to_string());
        }
        Ok(out)
    }

    /// Records delivered rows, advances each table's cursor (never backwards) and clears the
    /// in-flight marker, in one durable transaction.
    ///
    /// The by-id rows go to the log (one entry for all of them), and from there into the by-id
    /// index once [`MERGE_AT`] have gathered.
    pub fn commit_delivered(&self, rows: &[DeliveredRow<'_>]) -> Result<(), StateError> {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let seq = logged.last_seq.map_or(0, |s| s + 1);
        let by_id: Vec<(&str, &str, i64)> = rows
            .iter()
            .filter(|r| r.by_id)
            .map(|r| (r.table, r.id, r.time_us))
            .collect();
        let mut txn = self.db.begin_write().map_err(|e| self.io(e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.io(e))?;
        {
            if !by_id.is_empty() {
                let mut log = txn.open_table(BY_ID_LOG).map_err(|e| self.io(e))?;
                log.insert(seq, &by_id).map_err(|e| self.io(e))?;
            }
            let mut by_time = txn.open_table(BY_TIME).map_err(|e| self.io(e))?;
            let mut cursors = txn.open_table(CURSORS).map_err(|e| self.io(e))?;
            let mut newest: std::collections::BTreeMap<&str, Cursor> = Default::default();
            for r in rows {
                by_time
                    .insert((r.table, r.time_us, r.id), ())
                    .map_err(|e| self.io(e))?;
                let c = Cursor {
                    time_us: r.time_us,
                    id: r.id.to_string(),
                };
                let slot = newest.entry(r.table).or_insert_with(|| c.clone());
                if (c.time_us, &c.id) > (slot.time_us, &slot.id) {
                    *slot = c;
                }
            }
            for (table, c) in newest {
                let old: Option<Cursor> = cursors
                    .get(table)
                    .map_err(|e| self.io(e))?
                    .and_then(|v| serde_json::from_str(v.value()).ok());
                if old.is_none_or(|o| (c.time_us, &c.id) > (o.time_us, &o.id)) {
                    let json = serde_json::to_string(&c).map_err(|e| self.io(e))?;
                    cursors
                        .insert(table, json.as_str())
                        .map_err(|e| self.io(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.io(e))?;
        if !by_id.is_empty() {
            logged.last_seq = Some(seq);
            for (table, id, time_us) in by_id {
                logged.add(table, id, time_us);
            }
        }
        let merge = logged.len >= MERGE_AT;
        drop(logged);
        let after = |step: &'static str| {
            move |e: StateError| StateError::AfterCommit {
                path: self.path.clone(),
                step,
                detail: e.to_string(),
            }
        };
        self.clear_in_flight()
            .map_err(after("removing the in-flight marker"))?;
        if merge {
            self.merge_log()
                .map_err(after("moving logged ids into the by-id index"))?;
        }
        Ok(())
    }

    /// When `table` was last read completely (start of that cycle, µs).
    pub fn read_mark(&self, table: &str) -> Result<Option<i64>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = txn.open_table(READ_MARKS).map_err(|e| self.io(e))?;
        Ok(t.get(table).map_err(|e| self.io(e))?.map(|v| v.value()))
    }

    /// Records that `table` was read completely and delivered by the cycle that started at `at_us`.
    pub fn set_read_mark(&self, table: &str, at_us: i64) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut t = txn.open_table(READ_MARKS).map_err(|e| self.io(e))?;
            t.insert(table, at_us).map_err(|e| self.io(e))?;
        }
        txn.commit().map_err(|e| self.io(e))
    }

    fn bound(&self, bound: &str, ns: &str) -> Result<Option<i64>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = match txn.open_table(BOUNDS) {
            Ok(t) => t,
            // A file of an older format opened unchanged (`check`) has no bounds yet.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        Ok(t.get((bound, ns))
            .map_err(|e| self.io(e))?
            .map(|v| v.value()))
    }

    /// Where reading `ns` began ([`StateStore::begin_window`]), if it did.
    pub fn window_start(&self, ns: &str) -> Result<Option<i64>, StateError> {
        self.bound(WINDOW_START, ns)
    }

    /// Records that reading `ns` begins at `from_us`, unless it began before: returns where it
    /// began. The first window of a namespace then stays where it was, however many cycles
    /// fail before its first delivery, and the late pass of the first cycles that have a cursor
    /// but no complete read yet reaches back to it.
    pub fn begin_window(&self, ns: &str, from_us: i64) -> Result<i64, StateError> {
        if let Some(at) = self.window_start(ns)? {
            return Ok(at);
        }
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        let at = {
            let mut t = txn.open_table(BOUNDS).map_err(|e| self.io(e))?;
            let at = t
                .get((WINDOW_START, ns))
                .map_err(|e| self.io(e))?
                .map_or(from_us, |v| v.value());
            t.insert((WINDOW_START, ns), at).map_err(|e| self.io(e))?;
            at
        };
        txn.commit().map_err(|e| self.io(e))?;
        Ok(at)
    }

    /// Just after the newest delivered id of `ns` ever pruned: no read may reach below it (it
    /// could not tell delivered items from new ones there).
    pub fn pruned_before(&self, ns: &str) -> Result<Option<i64>, StateError> {
        self.bound(PRUNED_BEFORE, ns)
    }

    /// Records that `ns` was read completely and delivered, as of `mark_us` (its read mark), and
    /// forgets its delivered ids older than `keep_us` before that mark, or before its newest
    /// delivered item if that is older: an item's time is the source's own, so a local clock
    /// running ahead cannot forget ids that a late pass on the corrected clock still needs.
    /// Returns the ids forgotten.
    pub fn record_complete_read(
        &self,
        ns: &str,
        mark_us: i64,
        keep_us: i64,
    ) -> Result<u64, StateError> {
        self.set_read_mark(ns, mark_us)?;
        let newest = self.cursor(ns)?.map_or(mark_us, |c| c.time_us);
        self.prune(ns, mark_us.min(newest).saturating_sub(keep_us))
    }

    /// Forgets delivered ids of `table` older than `before_us` (no later read can reach them:
    /// the horizon is kept, [`StateStore::pruned_before`]). The cursor stays.
    pub fn prune(&self, table: &str, before_us: i64) -> Result<u64, StateError> {
        // Logged by-id rows into the index first, where they are pruned with the others.
        self.merge_log()?;
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        let mut removed = 0u64;
        {
            let mut delivered = txn.open_table(DELIVERED).map_err(|e| self.io(e))?;
            let mut by_time = txn.open_table(BY_TIME).map_err(|e| self.io(e))?;
            let old: Vec<(i64, String)> = by_time
                .range((table, i64::MIN, "")..(table, before_us, ""))
                .map_err(|e| self.io(e))?
                .filter_map(|r| r.ok().map(|(k, _)| (k.value().1, k.value().2.to_string())))
                .collect();
            // A by-time namespace has no by-id entries (unless written by format 1): no lookup
            // per pruned id then.
            let indexed = delivered
                .range((table, "")..)
                .map_err(|e| self.io(e))?
                .next()
                .transpose()
                .map_err(|e| self.io(e))?
                .is_some_and(|(k, _)| k.value().0 == table);
            let newest_removed = old.iter().map(|(t, _)| *t).max();
            for (t, id) in old {
                by_time
                    .remove((table, t, id.as_str()))
                    .map_err(|e| self.io(e))?;
                if indexed {
                    let newest = delivered
                        .remove((table, id.as_str()))
                        .map_err(|e| self.io(e))?
                        .map(|v| v.value());
                    // An id registered again later (a tool call id an agent reuses): the index
                    // holds its newest time (`keep_newest`), and keeps it while that row is kept.
                    if let Some(at) = newest.filter(|&at| at > t && at >= before_us) {
                        delivered
                            .insert((table, id.as_str()), at)
                            .map_err(|e| self.io(e))?;
                    }
                }
                removed += 1;
            }
            // Reads must not reach the ids just forgotten: at or below the newest of them. (Not
            // `before_us`: where nothing was forgotten, nothing needs guarding, and a horizon
            // computed on a clock running ahead must not cut off late rows that come later.)
            if let Some(t) = newest_removed {
                let mut bounds = txn.open_table(BOUNDS).map_err(|e| self.io(e))?;
                let horizon = bounds
                    .get((PRUNED_BEFORE, table))
                    .map_err(|e| self.io(e))?
                    .map_or(t + 1, |v| v.value().max(t + 1));
                bounds
                    .insert((PRUNED_BEFORE, table), horizon)
                    .map_err(|e| self.io(e))?;
            }
        }
        txn.commit().map_err(|e| self.io(e))?;
        Ok(removed)
    }

    /// The namespaces (tables) starting with `prefix` that hold delivered ids, in order. Cost:
    /// one lookup per namespace, not per id (it jumps from one namespace to the next).
    pub fn namespaces_with_prefix(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = txn.open_table(BY_TIME).map_err(|e| self.io(e))?;
        let mut out: Vec<String> = Vec::new();
        let mut from = prefix.to_string();
        for _ in 0..1_000_000 {
            let next = t
                .range((from.as_str(), i64::MIN, "")..)
                .map_err(|e| self.io(e))?
                .next()
                .transpose()
                .map_err(|e| self.io(e))?
                .map(|(k, _)| k.value().0.to_string());
            match next {
                Some(ns) if ns.starts_with(prefix) => {
                    // The smallest name after `ns` is `ns` followed by NUL.
                    from = format!("{ns}\0");
                    out.push(ns);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// Number of delivered ids kept for `table`.
    pub fn delivered_count(&self, table: &str) -> Result<u64, StateError> {
        Ok(self.count_by_range(table, &[i64::MIN, i64::MAX])?[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of a namespace looked up by id (both indexes).
    fn rows<'a>(table: &'a str, items: &'a [(&'a str, i64)]) -> Vec<DeliveredRow<'a>> {
        items
            .iter()
            .map(|(id, t)| DeliveredRow {
                table,
                id,
                time_us: *t,
                by_id: true,
            })
            .collect()
    }

    /// Rows of a namespace looked up with their time (the by-time index only).
    fn timed<'a>(table: &'a str, items: &'a [(&'a str, i64)]) -> Vec<DeliveredRow<'a>> {
        let mut v = rows(table, items);
        v.iter_mut().for_each(|r| r.by_id = false);
        v
    }

    #[test]
    fn rows_committed_by_time_are_found_by_time_and_id_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path(), false).unwrap();
        s.commit_delivered(&timed("c.s.t", &[("a", 10), ("b", 20)]))
            .unwrap();
        s.commit_delivered(&rows("toolcall:h", &[("call_1", 10)]))
            .unwrap();
        let got = s
            .delivered_at("c.s.t", [(10, "a"), (20, "b"), (11, "a"), (20, "x")])
            .unwrap();
        // Per row, in order; the same id at another time is another row.
        assert_eq!(got, [true, true, false, false]);
        // Not indexed by id: only namespaces committed with `by_id` answer by id.
        assert!(s.delivered_among("c.s.t", ["a", "b"]).unwrap().is_empty());
        assert_eq!(
            s.delivered_among("toolcall:h", ["call_1"]).unwrap().len(),
            1
        );
        assert_eq!(
            s.delivered_at("toolcall:h", [(10, "call_1")]).unwrap(),
            [true]
        );
        // Counted, listed and pruned like every namespace.
        assert_eq!(s.count_by_range("c.s.t", &[0, 15, 30]).unwrap(), vec![1, 1]);
        assert_eq!(s.prune("c.s.t", 15).unwrap(), 1);
        assert_eq!(s.delivered_at("c.s.t", [(10, "a")]).unwrap(), [false]);
        assert_eq!(s.delivered_count("c.s.t").unwrap(), 1);
        assert_eq!(s.prune("toolcall:h", 15).unwrap(), 1);
        assert!(s
            .delivered_among("toolcall:h", ["call_1"])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn reset_refuses_to_move_the_state_of_a_running_instance() {
        let dir = tempfile::tempdir().unwrap();
        let running = StateStore::open(dir.path(), false).unwrap();
        running
            .commit_delivered(&timed("c.s.t", &[("a", 10)]))
            .unwrap();
        let Err(err) = StateStore::open(dir.path(), true) else {
            panic!("a reset under a running instance was not refused")
        };
        assert!(matches!(err, StateError::Locked(_)), "{err}");
        assert!(err.to_string().contains("already"), "{err}");
        // Nothing moved: the running instance's file is where it was, and nothing is aside.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".reset-")), "{names:?}");
        assert_eq!(running.delivered_at("c.s.t", [(10, "a")]).unwrap(), [true]);
        drop(running);
        // Once it stopped, the reset goes ahead.
        let fresh = StateStore::open(dir.path(), true).unwrap();
        assert_eq!(fresh.delivered_at("c.s.t", [(10, "a")]).unwrap(), [false]);
    }

    #[test]
    fn the_latest_time_shortcut_sees_only_its_own_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path(), false).unwrap();
        // Neighbours on both sides in key order, with times before and after.
        s.commit_delivered(&timed("c.s.s", &[("z", 1_000)]))
            .unwrap();
        s.commit_delivered(&timed("c.s.t", &[("a", 10), ("b", 20)]))
            .unwrap();
        s.commit_delivered(&timed("c.s.t\u{1}", &[("y", 5)]))
            .unwrap();
        s.commit_delivered(&timed("c.s.t0", &[("x", 5)])).unwrap();
        // The latest row itself, a row before it, rows after it, an empty namespace.
        assert_eq!(
            s.delivered_at("c.s.t", [(20, "b"), (10, "a"), (21, "b"), (1_000, "z")])
                .unwrap(),
            [true, true, false, false]
        );
        assert_eq!(s.delivered_at("c.s.r", [(1_000, "z")]).unwrap(), [false]);
        assert_eq!(s.delivered_at("c.s.t0", [(5, "x")]).unwrap(), [true]);
    }

    #[test]
    fn a_format_1_file_is_upgraded_and_keeps_every_delivered_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            // What format 1 wrote: every row in both indexes, and a marker without a time.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                txn.open_table(META).unwrap().insert("format", "1").unwrap();
                let mut d = txn.open_table(DELIVERED).unwrap();
                let mut b = txn.open_table(BY_TIME).unwrap();
                for (id, t) in [("a", 10), ("b", 20)] {
                    d.insert(("c.s.t", id), t).unwrap();
                    b.insert(("c.s.t", t, id), ()).unwrap();
                }
            }
            txn.commit().unwrap();
            fs::write(
                dir.path().join(IN_FLIGHT_FILE),
                r#"{"records":5,"table":"c.s.t","id":"b"}"#,
            )
            .unwrap();
        }
        // A diagnostic open (`check`) sees the old format and leaves it.
        let (s, older) = StateStore::open_unchanged(dir.path()).unwrap();
        assert_eq!(older.as_deref(), Some("1"));
        drop(s);
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_read().unwrap();
            let meta = txn.open_table(META).unwrap();
            assert_eq!(meta.get("format").unwrap().unwrap().value(), "1");
        }
        let s = StateStore::open(dir.path(), false).unwrap();
        assert_eq!(
            s.delivered_at("c.s.t", [(10, "a"), (20, "b")]).unwrap(),
            [true, true]
        );
        // The old marker's probe is found by id: its batch was committed.
        assert_eq!(s.unconfirmed_batch().unwrap(), None);
        // Pruning also forgets the old by-id entries.
        assert_eq!(s.prune("c.s.t", 15).unwrap(), 1);
        assert_eq!(s.delivered_among("c.s.t", ["a", "b"]).unwrap().len(), 1);
        drop(s);
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert_eq!(meta.get("format").unwrap().unwrap().value(), FORMAT_VERSION);
    }

    /// Entries of the log and of the by-id index, read from the file itself.
    fn on_disk(path: &Path) -> (usize, u64) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_read().unwrap();
        let log = txn.open_table(BY_ID_LOG).unwrap();
        let logged = log
            .iter()
            .unwrap()
            .map(|e| e.unwrap().1.value().len())
            .sum();
        let delivered =
            redb::ReadableTableMetadata::len(&txn.open_table(DELIVERED).unwrap()).unwrap();
        (logged, delivered)
    }

    #[test]
    fn by_id_rows_wait_in_the_log_and_are_merged_in_bulk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let ids: Vec<String> = (0..MERGE_AT).map(|i| format!("call_{i:05}")).collect();
        {
            let s = StateStore::open(dir.path(), false).unwrap();
            s.commit_delivered(&rows("toolcall:h", &[("call_a", 7)]))
                .unwrap();
            // Found from the log, in memory; an id of another namespace is not.
            assert_eq!(
                s.delivered_among("toolcall:h", ["call_a", "call_b"])
                    .unwrap()
                    .len(),
                1
            );
            assert!(s
                .delivered_among("toolcall:g", ["call_a"])
                .unwrap()
                .is_empty());
        }
        // Still in the log after a restart (loaded at open), not in the index.
        assert_eq!(on_disk(&path), (1, 0));
        {
            let s = StateStore::open(dir.path(), false).unwrap();
            assert_eq!(
                s.delivered_among("toolcall:h", ["call_a"]).unwrap().len(),
                1
            );
            // Enough rows for a merge: all of them move to the index in one go.
            let many: Vec<DeliveredRow> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| DeliveredRow {
                    table: "toolcall:g",
                    id,
                    time_us: i as i64,
                    by_id: true,
                })
                .collect();
            s.commit_delivered(&many).unwrap();
            let got = s
                .delivered_among("toolcall:g", ids.iter().map(String::as_str))
                .unwrap();
            assert_eq!(got.len(), MERGE_AT);
            assert_eq!(
                s.delivered_among("toolcall:h", ["call_a"]).unwrap().len(),
                1
            );
            // The next commit starts a new log, found like the first one.
            s.commit_delivered(&rows("toolcall:h", &[("call_z", 9)]))
                .unwrap();
            assert_eq!(
                s.delivered_among("toolcall:h", ["call_z"]).unwrap().len(),
                1
            );
        }
        assert_eq!(on_disk(&path), (1, MERGE_AT as u64 + 1));
        let s = StateStore::open(dir.path(), false).unwrap();
        let got = s
            .delivered_among("toolcall:h", ["call_a", "call_z", "call_00001"])
            .unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(s.delivered_count("toolcall:g").unwrap(), MERGE_AT as u64);
    }

    #[test]
    fn pruning_reaches_rows_still_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path(), false).unwrap();
        s.commit_delivered(&rows("toolcall:h", &[("old", 5), ("new", 50)]))
            .unwrap();
        assert_eq!(s.prune("toolcall:h", 10).unwrap(), 1);
        let got = s.delivered_among("toolcall:h", ["old", "new"]).unwrap();
        assert_eq!(got.into_iter().collect::<Vec<_>>(), ["new"]);
        drop(s);
        // Merged by the prune: the log is empty, the index holds the row kept.
        assert_eq!(on_disk(&dir.path().join(FILE_NAME)), (0, 1));
    }

    /// Format 3 kept a tool call by its bare id, whichever source sent it: the upgrade registers
    /// it under both sources' keys, at its time, so that neither source sends it again; the bare
    /// row goes with pruning as before. A format 3 build refuses the upgraded file.
    #[test]
    fn a_format_3_files_tool_calls_are_kept_under_both_sources_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            let s = StateStore::open(dir.path(), false).unwrap();
            s.commit_delivered(&rows("toolcall:h.ai-agent.ws", &[("call_1", 10)]))
                .unwrap();
            s.commit_delivered(&timed("c.s.t", &[("call_1", 10)]))
                .unwrap();
        }
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("format", "3").unwrap();
            txn.commit().unwrap();
        }
        let s = StateStore::open(dir.path(), false).unwrap();
        let keys = crate::run::tool_call_keys("call_1");
        let found = s
            .delivered_among("toolcall:h.ai-agent.ws", keys.iter().map(String::as_str))
            .unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        let mut at_10 = s.ids_in_range("toolcall:h.ai-agent.ws", 10, 11).unwrap();
        at_10.sort();
        let mut want = vec!["call_1".to_string(), keys[0].clone(), keys[1].clone()];
        want.sort();
        assert_eq!(at_10, want);
        // Other namespaces are left as they were.
        assert_eq!(s.ids_in_range("c.s.t", 10, 11).unwrap(), ["call_1"]);
        // Pruned with the rest.
        s.prune("toolcall:h.ai-agent.ws", 11).unwrap();
        assert!(s
            .delivered_among("toolcall:h.ai-agent.ws", keys.iter().map(String::as_str))
            .unwrap()
            .is_empty());
        drop(s);
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert_eq!(meta.get("format").unwrap().unwrap().value(), "4");
    }

    /// An id registered again at another time (a tool call id an agent reuses) is known while any
    /// row of it is kept, whichever order the two came in, and forgotten with its newest row.
    #[test]
    fn an_id_registered_twice_is_kept_with_its_newest_row() {
        for order in [[5, 100], [100, 5]] {
            let dir = tempfile::tempdir().unwrap();
            let s = StateStore::open(dir.path(), false).unwrap();
            for t in order {
                s.commit_delivered(&rows("toolcall:h", &[("k", t)]))
                    .unwrap();
                // Into the index before the next one (a prune merges the log first).
                s.prune("toolcall:h", i64::MIN).unwrap();
            }
            assert_eq!(s.prune("toolcall:h", 50).unwrap(), 1, "{order:?}");
            assert_eq!(
                s.delivered_among("toolcall:h", ["k"]).unwrap().len(),
                1,
                "{order:?}: its row at 100 is kept"
            );
            // Across a reopen (the index, not the log, answers).
            drop(s);
            let s = StateStore::open(dir.path(), false).unwrap();
            assert_eq!(s.delivered_among("toolcall:h", ["k"]).unwrap().len(), 1);
            assert_eq!(s.prune("toolcall:h", 200).unwrap(), 1);
            assert!(s.delivered_among("toolcall:h", ["k"]).unwrap().is_empty());
        }
    }

    #[test]
    fn a_format_2_file_is_upgraded_with_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                txn.open_table(META).unwrap().insert("format", "2").unwrap();
                txn.open_table(DELIVERED)
                    .unwrap()
                    .insert(("toolcall:h", "call_1"), 10)
                    .unwrap();
                txn.open_table(BY_TIME)
                    .unwrap()
                    .insert(("toolcall:h", 10, "call_1"), ())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let (s, older) = StateStore::open_unchanged(dir.path()).unwrap();
        assert_eq!(older.as_deref(), Some("2"));
        assert_eq!(
            s.delivered_among("toolcall:h", ["call_1"]).unwrap().len(),
            1
        );
        drop(s);
        let s = StateStore::open(dir.path(), false).unwrap();
        assert_eq!(
            s.delivered_among("toolcall:h", ["call_1"]).unwrap().len(),
            1
        );
        s.commit_delivered(&rows("toolcall:h", &[("call_2", 20)]))
            .unwrap();
        drop(s);
        // call_2 in the log; call_1 in the index, bare and under both sources' keys (format 4).
        assert_eq!(on_disk(&path), (1, 3));
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        assert_eq!(meta.get("format").unwrap().unwrap().value(), FORMAT_VERSION);
    }

    #[test]
    fn a_newer_format_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("format", "5").unwrap();
            txn.commit().unwrap();
        }
        let err = StateStore::open(dir.path(), false).unwrap_err();
        assert!(err.to_string().contains("format version 5"), "{err}");
        // A newer build's file: the advice is that build, never a reset that re-sends.
        assert!(matches!(err, StateError::Newer { .. }), "{err:?}");
        assert!(err.to_string().contains("Not --reset-state"), "{err}");

        // The same from redb's own header (a newer redb file format, in both commit slots).
        let path = dir.path().join(FILE_NAME);
        let mut bytes = fs::read(&path).unwrap();
        bytes[64] = 9;
        bytes[64 + 128] = 9;
        fs::write(&path, bytes).unwrap();
        let err = StateStore::open(dir.path(), false).unwrap_err();
        assert!(matches!(err, StateError::Newer { .. }), "{err:?}");
        assert!(err.to_string().contains("found 9"), "{err}");
    }

    #[test]
    fn commit_then_reopen_keeps_ids_cursor_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open(dir.path(), false).unwrap();
            s.mark_in_flight(3, None).unwrap();
            s.commit_delivered(&rows("c.s.t", &[("b", 20), ("a", 10), ("c", 20)]))
                .unwrap();
            assert_eq!(s.unconfirmed_batch().unwrap(), None);
        }
        let s = StateStore::open(dir.path(), false).unwrap();
        assert_eq!(
            s.cursor("c.s.t").unwrap(),
            Some(Cursor {
                time_us: 20,
                id: "c".into()
            })
        );
        let got = s.delivered_among("c.s.t", ["a", "x", "c"]).unwrap();
        assert!(got.contains("a") && got.contains("c") && !got.contains("x"));
        assert_eq!(
            s.count_by_range("c.s.t", &[0, 15, 21, 30]).unwrap(),
            vec![1, 2, 0]
        );
        assert_eq!(s.ids_in_range("c.s.t", 15, 21).unwrap(), vec!["b", "c"]);
        assert_eq!(s.cursor("other").unwrap(), None);
    }

    #[test]
    fn cursor_never_moves_backwards_and_prune_forgets_old_ids() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path(), false).unwrap();
        s.commit_delivered(&rows("t", &[("z", 50)])).unwrap();
        s.commit_delivered(&rows("t", &[("a", 5)])).unwrap();
        assert_eq!(s.cursor("t").unwrap().unwrap().time_us, 50);
        assert_eq!(s.prune("t", 10).unwrap(), 1);
        assert_eq!(s.read_mark("t").unwrap(), None);
        s.set_read_mark("t", 99).unwrap();
        assert_eq!(s.read_mark("t").unwrap(), Some(99));
        assert!(s.delivered_among("t", ["a"]).unwrap().is_empty());
        assert_eq!(s.delivered_count("t").unwrap(), 1);
        assert_eq!(s.cursor("t").unwrap().unwrap().id, "z");
        // Cursors outlive pruning, and are listed in namespace order.
        s.commit_delivered(&rows("a.b.c", &[("x", 7)])).unwrap();
        assert_eq!(s.prune("t", i64::MAX).unwrap(), 1);
        let all: Vec<(String, i64)> = s
            .cursors()
            .unwrap()
            .into_iter()
            .map(|(ns, c)| (ns, c.time_us))
            .collect();
        assert_eq!(all, vec![("a.b.c".to_string(), 7), ("t".to_string(), 50)]);
    }

    #[test]
    fn a_setting_swapped_returns_the_value_before() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open(dir.path(), false).unwrap();
            assert_eq!(s.swap_setting("lookback", "60").unwrap(), None);
            assert_eq!(
                s.swap_setting("lookback", "60").unwrap().as_deref(),
                Some("60")
            );
            assert_eq!(
                s.swap_setting("lookback", "30").unwrap().as_deref(),
                Some("60")
            );
        }
        let s = StateStore::open(dir.path(), false).unwrap();
        assert_eq!(
            s.swap_setting("lookback", "45").unwrap().as_deref(),
            Some("30")
        );
    }

    #[test]
    fn a_state_serves_the_workspace_it_was_bound_to_only() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open(dir.path(), false).unwrap();
            assert_eq!(s.workspace().unwrap(), None);
            // A first start with a mistyped host binds a state that holds nothing: the right
            // host takes it over.
            s.bind_workspace("typo.cloud.databricks.com").unwrap();
            s.bind_workspace("adb-1.azuredatabricks.net").unwrap();
            assert!(s.serves_workspace("adb-1.azuredatabricks.net").unwrap());
            s.commit_delivered(&timed("t", &[("r1", 10)])).unwrap();
            s.bind_workspace("adb-1.azuredatabricks.net").unwrap();
        }
        let s = StateStore::open(dir.path(), false).unwrap();
        assert_eq!(
            s.workspace().unwrap().as_deref(),
            Some("adb-1.azuredatabricks.net")
        );
        let e = s.bind_workspace("dbc-2.cloud.databricks.com").unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, StateError::OtherWorkspace { .. }), "{e:?}");
        assert!(matches!(
            s.serves_workspace("dbc-2.cloud.databricks.com"),
            Err(StateError::OtherWorkspace { .. })
        ));
        for want in [
            "belongs to the workspace adb-1.azuredatabricks.net",
            "not to DATABRICKS_HOST dbc-2.cloud.databricks.com",
            "Nothing was sent",
            "its own STATE_DIR",
            "--reset-state",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        // Refused, it still belongs to the first workspace.
        assert_eq!(
            s.workspace().unwrap().as_deref(),
            Some("adb-1.azuredatabricks.net")
        );
        // --reset-state starts a new state, bound by the next start.
        drop(s);
        let s = StateStore::open(dir.path(), true).unwrap();
        s.bind_workspace("dbc-2.cloud.databricks.com").unwrap();
    }

    /// Without STATE_DIR each workspace has a folder of its own under `./state`; a state an
    /// earlier release left in `./state` itself stays in use when it is this workspace's.
    #[test]
    fn the_default_folder_is_the_workspaces_own_or_its_earlier_state() {
        let ours = |host: &str| host.ends_with(".ai-agent.adb-1");
        let pick = |base: &Path| default_state_dir(base, "adb-1:8443", ours).unwrap();
        // Nothing yet: the workspace's own folder, not created.
        let base = tempfile::tempdir().unwrap();
        let own = base.path().join("adb-1_8443");
        assert_eq!(pick(base.path()), own);
        assert!(!own.exists());
        let earlier = |calls_on: &[&str], bound: Option<&str>| {
            let base = tempfile::tempdir().unwrap();
            let s = StateStore::open(base.path(), false).unwrap();
            let namespaces: Vec<String> = calls_on
                .iter()
                .map(|h| format!("{}{h}", crate::run::TOOL_CALL_PREFIX))
                .collect();
            let rows: Vec<DeliveredRow<'_>> = namespaces
                .iter()
                .map(|ns| DeliveredRow {
                    table: ns,
                    id: "row\u{1f}call_1",
                    time_us: 5,
                    by_id: true,
                })
                .collect();
            s.commit_delivered(&rows).unwrap();
            s.commit_delivered(&timed("t", &[("r1", 10)])).unwrap();
            if let Some(w) = bound {
                s.bind_workspace(w).unwrap();
            }
            base
        };
        // An earlier release's state of this workspace's agents (or of no agent's tool call).
        for calls_on in [&["bot.ai-agent.adb-1"][..], &[]] {
            let base = earlier(calls_on, None);
            assert_eq!(pick(base.path()), base.path(), "{calls_on:?}");
        }
        // Bound to this workspace; to another one.
        let base = earlier(&[], Some("adb-1:8443"));
        assert_eq!(pick(base.path()), base.path());
        let base = earlier(&[], Some("adb-2"));
        assert_eq!(pick(base.path()), base.path().join("adb-1_8443"));
        // Shared by several workspaces under an earlier release: left as it is.
        let base = earlier(&["bot.ai-agent.adb-1", "bot.ai-agent.adb-2"], None);
        assert_eq!(pick(base.path()), base.path().join("adb-1_8443"));
        // Once the workspace has its own folder, that is it.
        let base = earlier(&[], None);
        let own = base.path().join("adb-1_8443");
        StateStore::open(&own, false).unwrap();
        assert_eq!(pick(base.path()), own);
        // Bound, and in use by its workspace's run: told by the plain file, without the lock.
        let base = earlier(&[], Some("adb-1:8443"));
        let held = StateStore::open(base.path(), false).unwrap();
        assert_eq!(pick(base.path()), base.path());
        let other = default_state_dir(base.path(), "adb-2", |_| false).unwrap();
        assert_eq!(other, base.path().join("adb-2"));
        drop(held);
        // Not bound and in use by another run (maybe an earlier release's run of this very
        // workspace): the start opens it and stops as another instance's, as before.
        let base = earlier(&[], None);
        let held = StateStore::open(base.path(), false).unwrap();
        assert_eq!(pick(base.path()), base.path());
        drop(held);
        // A plain file left empty by a write cut short says nothing: the state itself answers.
        let base = earlier(&[], Some("adb-1:8443"));
        fs::write(base.path().join(WORKSPACE_FILE), "").unwrap();
        assert_eq!(pick(base.path()), base.path());
        // Damaged: the start opens it and names --reset-state, which applies there.
        let base = tempfile::tempdir().unwrap();
        fs::write(base.path().join(FILE_NAME), b"not a state file at all").unwrap();
        assert_eq!(pick(base.path()), base.path());
        // Another workspace's agents known only by their registry's cursor (its calls pruned).
        let base = earlier(&["bot.ai-agent.adb-2"], None);
        {
            let s = StateStore::open(base.path(), false).unwrap();
            s.prune("toolcall:bot.ai-agent.adb-2", i64::MAX).unwrap();
            assert!(s
                .namespaces_with_prefix(crate::run::TOOL_CALL_PREFIX)
                .unwrap()
                .is_empty());
        }
        assert_eq!(pick(base.path()), base.path().join("adb-1_8443"));
    }

    #[test]
    fn a_mark_is_new_once_per_state_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open(dir.path(), false).unwrap();
            assert!(s.first_time("x").unwrap());
            assert!(!s.first_time("x").unwrap());
            assert!(s.first_time("y").unwrap());
        }
        let s = StateStore::open(dir.path(), false).unwrap();
        assert!(!s.first_time("x").unwrap());
        assert!(!s.first_time("y").unwrap());
        // Marks live beside the format, which they leave alone.
        let (_, older) = {
            drop(s);
            StateStore::open_unchanged(dir.path()).unwrap()
        };
        assert_eq!(older, None);
    }

    #[test]
    fn in_flight_marker_survives_reopen_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open(dir.path(), false).unwrap();
            s.commit_delivered(&rows("t", &[("a", 1)])).unwrap();
            s.mark_in_flight(7, Some(("t", "b", 2))).unwrap();
            s.commit_delivered(&timed("t", &[("b", 2)])).unwrap();
            assert_eq!(
                s.unconfirmed_batch().unwrap(),
                None,
                "cleared by the commit"
            );
            s.mark_in_flight(9, Some(("t", "c", 3))).unwrap();
        }
        let s = StateStore::open(dir.path(), false).unwrap();
        assert_eq!(s.unconfirmed_batch().unwrap(), Some(9));
        // A marker whose batch was committed (killed between commit and removal) does not count.
        s.mark_in_flight(4, Some(("t", "a", 1))).unwrap();
        assert_eq!(s.unconfirmed_batch().unwrap(), None);
        s.clear_in_flight().unwrap();
        assert_eq!(s.unconfirmed_batch().unwrap(), None);
    }

    #[test]
    fn marker_rewritten_in_place_reports_the_latest_count() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open(dir.path(), false).unwrap();
            // One checkpoint of several batches: the count grows, the probe stays.
            s.mark_in_flight(50, Some(("catalog.schema.a_long_table_name", "id-1", 7)))
                .unwrap();
            s.mark_in_flight(100, Some(("catalog.schema.a_long_table_name", "id-1", 7)))
                .unwrap();
            // Shorter content than before (a later checkpoint): padded, still one valid marker.
            s.commit_delivered(&rows("t", &[("x", 1)])).unwrap();
            s.mark_in_flight(1000, Some(("catalog.schema.a_long_table_name", "id-2", 8)))
                .unwrap();
            s.mark_in_flight(3, Some(("t", "y", 9))).unwrap();
        }
        let raw = fs::read_to_string(dir.path().join(IN_FLIGHT_FILE)).unwrap();
        assert!(raw.ends_with(' '), "padded, not truncated: {raw:?}");
        let s = StateStore::open(dir.path(), false).unwrap();
        assert_eq!(s.unconfirmed_batch().unwrap(), Some(3));
    }

    #[test]
    fn second_open_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let _first = StateStore::open(dir.path(), false).unwrap();
        let err = StateStore::open(dir.path(), false).unwrap_err();
        assert!(matches!(err, StateError::Locked(_)), "{err}");
        assert!(err.to_string().contains("already running"));
    }

    #[test]
    fn corrupt_file_is_an_error_and_reset_moves_it_aside() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open(dir.path(), false).unwrap();
            s.commit_delivered(&rows("t", &[("a", 1)])).unwrap();
        }
        let file = dir.path().join(FILE_NAME);
        let len = fs::metadata(&file).unwrap().len();
        // Cut short after its header: damaged, not a disk problem.
        let whole = fs::read(&file).unwrap();
        fs::write(&file, &whole[..100]).unwrap();
        let err = StateStore::open(dir.path(), false).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
        fs::write(&file, vec![0x5a; len as usize]).unwrap();
        let err = StateStore::open(dir.path(), false).unwrap_err();
        assert!(err.to_string().contains("--reset-state"), "{err}");
        let s = StateStore::open(dir.path(), true).unwrap();
        assert_eq!(s.cursor("t").unwrap(), None);
        let moved = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".reset-")
            })
            .count();
        assert_eq!(moved, 1);
    }

    #[test]
    fn namespaces_with_a_prefix_are_listed_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path(), false).unwrap();
        s.commit_delivered(&rows("toolcall:b", &[("x", 1), ("y", 2)]))
            .unwrap();
        s.commit_delivered(&rows("toolcall:a", &[("z", 9)]))
            .unwrap();
        s.commit_delivered(&rows("toolcall", &[("z", 9)])).unwrap();
        s.commit_delivered(&rows("toolcall;", &[("z", 9)])).unwrap();
        s.commit_delivered(&rows("c.s.t", &[("z", 9)])).unwrap();
        s.commit_delivered(&rows("toolcall:a\0x", &[("w", 3)]))
            .unwrap();
        assert_eq!(
            s.namespaces_with_prefix("toolcall:").unwrap(),
            ["toolcall:a", "toolcall:a\0x", "toolcall:b"]
        );
        assert!(s.namespaces_with_prefix("nope").unwrap().is_empty());
        s.prune("toolcall:b", 10).unwrap();
        assert_eq!(
            s.namespaces_with_prefix("toolcall:").unwrap(),
            ["toolcall:a", "toolcall:a\0x"]
        );
    }

    #[cfg(unix)]
    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sd = dir.path().join("state");
        let s = StateStore::open(&sd, false).unwrap();
        assert_eq!(
            fs::metadata(&sd).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            fs::metadata(s.path()).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
