//! Collect: incremental, exactly-once reads of inference tables through the SQL Statement
//! Execution API.
//!
//! Per table, with the cursor (newest delivered `(time, id)`) and the delivered ids from `state`:
//! 1. **Head**: rows after the cursor, in `(request_time, databricks_request_id)` keyset order,
//!    full payloads, pages sized by bytes. First run: from `now - LOOKBACK_MINUTES`. After a long
//!    outage: from the cursor, but no further back than `MAX_CATCHUP_HOURS` (WARN when cut).
//! 2. **Late rows** (rows land up to an hour late, with an older `request_time`): one statement
//!    counts the rows at or before the cursor per time bucket; buckets whose count equals what
//!    `state` delivered there are done. Mismatched buckets are split and counted again, then their
//!    ids are read and only the missing ids are fetched with their payloads.
//!
//! So a steady-state cycle reads little more than its new rows. Every statement is plain,
//! parameterized Databricks SQL (`:name` markers with explicit types) that filters on the date
//! column too, for partition pruning.
//!
//! Architecture Invariant: collect never writes state and never sends; it emits [`Chunk`]s of
//! executions, in keyset order per table, to the delivery stage.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use tokio::sync::mpsc;

use crate::databricks::sql::{Cell, Param, Row, Rows, Statement};
use crate::databricks::{DatabricksClient, DatabricksError};
use crate::discovery::{InferenceTable, TableKind};
use crate::json::JsonString;
use crate::state::{Cursor, StateError, StateStore};
use crate::traffic::{Execution, TableFormat};

/// Up to this many delivered ids in a late range are excluded in the query itself (`NOT IN`);
/// more are found by an id scan.
const EXCLUDE_IDS_MAX: usize = 200;

/// Tuning of the reads.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    pub lookback: Duration,
    pub max_catchup: Duration,
    pub statement_timeout: Duration,
    /// Target bytes of payload returned per statement (well under the 25 MiB inline cap).
    pub target_statement_bytes: usize,
    /// Rows per id-scan page.
    pub id_page_rows: usize,
    /// Ids per payload fetch (`IN (...)` list).
    pub fetch_ids: usize,
    /// Buckets of the late-row check.
    pub buckets: usize,
}

impl Default for CollectOptions {
    fn default() -> Self {
        CollectOptions {
            lookback: Duration::from_secs(3600),
            max_catchup: Duration::from_secs(24 * 3600),
            statement_timeout: Duration::from_secs(120),
            target_statement_bytes: 3 << 19,
            id_page_rows: 5000,
            fetch_ids: 200,
            buckets: 60,
        }
    }
}

/// Work for the delivery stage: executions read from one source (mapped there), or units whose
/// records a source built itself (trace spans, inventory records).
#[derive(Debug, Default)]
pub struct Chunk {
    /// The state namespace: a table's full name, or e.g. `mlflow:<experiment id>`.
    pub table: String,
    pub executions: Vec<Execution>,
    /// Units with ready records, checkpointed by (table, id, time) like executions.
    pub prepared: Vec<Prepared>,
    /// The source looks its units up by id alone (`StateStore::delivered_among`: the inventory,
    /// span-table traces), so delivery also indexes them by id (`DeliveredRow::by_id`). Otherwise
    /// they are looked up with their time (`StateStore::delivered_at`).
    pub by_id: bool,
    /// Rows that cannot be keyed (no id or no time): quarantined by the delivery stage.
    pub unreadable: Vec<(String, String)>,
}

/// One exactly-once unit whose Akto records are already built.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Its id in the state namespace (e.g. a trace id).
    pub id: String,
    pub time_us: i64,
    /// The agent, for per-agent counts.
    pub agent: String,
    /// The Akto host of the records (the Kafka key).
    pub host: String,
    pub records: Vec<crate::traffic::AktoRecord>,
}

/// What reading one table cost and found.
#[derive(Debug, Default, Clone)]
pub struct TableStats {
    pub statements: u64,
    /// Rows returned by all statements (counts, ids and payloads).
    pub rows_returned: u64,
    /// Approximate bytes of cell data returned.
    pub bytes_returned: u64,
    /// Executions handed to delivery.
    pub executions: u64,
    /// Rows seen again that were already delivered.
    pub duplicates_skipped: u64,
    /// Late rows found behind the cursor.
    pub late_found: u64,
    /// Payloads (or span attributes) read cut because their row alone was larger than a
    /// statement may return ([`read_cut`](TableReader::read_cut)); each carries a cut marker.
    pub payloads_cut: u64,
    /// The oldest time the next read must still reach back to: an unfinished MLflow trace's
    /// start (read when it has ended). `None`: the usual lookback.
    pub hold_from: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Databricks(#[from] DatabricksError),
    #[error(transparent)]
    State(#[from] StateError),
    /// The delivery stage stopped (shutdown or a failed sink): stop reading.
    #[error("delivery stopped")]
    Closed,
}

/// The SQL vocabulary of one inference-table schema.
struct Dialect {
    time_col: &'static str,
    /// How a result carries a row's time: a number (µs or ms since the epoch), computed by the
    /// warehouse, never a TIMESTAMP printed in the session's time zone (a warehouse whose
    /// `TIMEZONE` changes would shift every time read as text, and a row is keyed by its time).
    time_key: &'static str,
    date_col: &'static str,
    time_type: &'static str,
    /// The other columns of a payload read (results are located by column name): the required
    /// ones (those discovery classifies the table by) first, then the optional ones.
    columns: &'static [&'static str],
    /// How many of `columns` are required.
    required: usize,
    format: TableFormat,
}

const AI_GATEWAY: Dialect = Dialect {
    time_col: "request_time",
    time_key: "unix_micros(request_time) AS request_time_us",
    date_col: "request_date",
    time_type: "TIMESTAMP",
    columns: &[
        "databricks_request_id",
        "status_code",
        "request",
        "response",
        "client_request_id",
        "execution_duration_ms",
        "logging_error_codes",
        "served_entity_id",
        "requester",
    ],
    required: 4,
    format: TableFormat::AiGateway,
};

const LEGACY: Dialect = Dialect {
    time_col: "timestamp_ms",
    time_key: "timestamp_ms",
    date_col: "`date`",
    time_type: "BIGINT",
    columns: &[
        "databricks_request_id",
        "status_code",
        "request",
        "response",
        "client_request_id",
        "execution_time_ms",
        "request_metadata",
    ],
    required: 4,
    format: TableFormat::Legacy,
};

impl Dialect {
    /// What a payload read of a table with `table_columns` (lowercase; empty: unknown) selects:
    /// the time key, the required columns, and the optional ones the table has. A table of an
    /// older schema without, say, `requester` is read without it (its header is then absent),
    /// instead of failing every cycle.
    fn select_list(&self, table_columns: &[String]) -> String {
        self.select_list_with(table_columns, |c| c.to_string())
    }

    /// [`select_list`](Self::select_list) with each payload column written by `column`.
    fn select_list_with(
        &self,
        table_columns: &[String],
        column: impl Fn(&str) -> String,
    ) -> String {
        let mut out = self.time_key.to_string();
        for (i, c) in self.columns.iter().enumerate() {
            if i < self.required || table_columns.is_empty() || table_columns.iter().any(|t| t == c)
            {
                out.push_str(", ");
                out.push_str(&column(c));
            }
        }
        out
    }

    /// [`select_list`](Self::select_list) for a row too large for one statement: the payloads
    /// cut to `caps` characters (request, response), and their full sizes in bytes
    /// (`request_bytes`, `response_bytes`) to name in the cut markers.
    fn cut_select_list(&self, table_columns: &[String], caps: &[usize]) -> String {
        let cap = |i: usize| caps.get(i).copied().unwrap_or(0);
        let mut out = self.select_list_with(table_columns, |c| match c {
            "request" => format!("left(request, {}) AS request", cap(0)),
            "response" => format!("left(response, {}) AS response", cap(1)),
            other => other.to_string(),
        });
        out.push_str(
            ", octet_length(request) AS request_bytes, octet_length(response) AS response_bytes",
        );
        out
    }

    fn for_kind(kind: TableKind) -> &'static Dialect {
        match kind {
            TableKind::LegacyPayload => &LEGACY,
            _ => &AI_GATEWAY,
        }
    }

    /// A time as a parameter value of this schema.
    fn time_value(&self, us: i64) -> String {
        match self.format {
            TableFormat::Legacy => us.div_euclid(1000).to_string(),
            TableFormat::AiGateway => format_timestamp(us),
        }
    }

    fn time_param(&self, name: &str, us: i64) -> Param {
        Param::new(name, self.time_value(us), self.time_type)
    }

    /// A range bound as a parameter, for `time >= :p` and `time < :p`: in a schema of whole
    /// milliseconds it is rounded up, so that the rows the warehouse finds in `[lo, hi)` are
    /// exactly the ones state counts there (a row at `m` ms is kept at `1000 m` µs, and
    /// `1000 m >= lo` holds exactly when `m >= ceil(lo / 1000)`). Rounded down, a delivered row on
    /// a bucket's last millisecond was counted by the warehouse in the next bucket and by state
    /// in this one, and a late row in the same bucket evened the counts out and was never read.
    fn bound_param(&self, name: &str, us: i64) -> Param {
        let value = match self.format {
            TableFormat::Legacy => {
                (us.div_euclid(1000) + i64::from(us.rem_euclid(1000) != 0)).to_string()
            }
            TableFormat::AiGateway => format_timestamp(us),
        };
        Param::new(name, value, self.time_type)
    }

    /// The time of a result cell, in µs.
    fn parse_time(&self, raw: &str) -> Option<i64> {
        match self.format {
            TableFormat::Legacy => raw.trim().parse::<i64>().ok()?.checked_mul(1000),
            // `request_time_us`; a TIMESTAMP's text is read too (rows of other queries, tests).
            TableFormat::AiGateway => match raw.trim().parse::<i64>() {
                Ok(us) => Some(us),
                Err(_) => parse_timestamp(raw),
            },
        }
    }
}

/// Where a table's head read starts: after the cursor; at `catchup_floor` for a cursor older than
/// it; with nothing delivered yet, a lookback before the last complete read (not before now): a
/// row landing up to a lookback late, after a read that found the table empty, is still read, as
/// the late pass reads it once there is a cursor. Before any complete read, where reading began
/// (`window_start`): cycles that fail before the first delivery do not slide the first window.
fn head_start(
    cursor: Option<&Cursor>,
    read_mark: Option<i64>,
    window_start: Option<i64>,
    now_us: i64,
    lookback: i64,
    catchup_floor: i64,
) -> (i64, String) {
    match cursor {
        Some(c) if c.time_us >= catchup_floor => (c.time_us, c.id.clone()),
        Some(_) => (catchup_floor, String::new()),
        None => {
            let start = match (read_mark, window_start) {
                (Some(r), _) => r.min(now_us) - lookback,
                (None, Some(w)) => w,
                (None, None) => now_us - lookback,
            };
            (start.max(catchup_floor), String::new())
        }
    }
}

/// Where the late pass starts for a namespace with a cursor: a lookback before its last complete
/// read (rows land up to about a lookback late); before any complete read, where reading began
/// (else a lookback before the cursor, for a state written before window starts were kept). Never
/// below the horizon its delivered ids were pruned below (a clock stepped back would re-read
/// delivered rows there), nor the catch-up floor.
pub(crate) fn late_start(
    cursor_us: i64,
    read_mark: Option<i64>,
    window_start: Option<i64>,
    pruned_before: Option<i64>,
    now_us: i64,
    lookback: i64,
    catchup_floor: i64,
) -> i64 {
    let from = match (read_mark, window_start) {
        (Some(r), _) => r.min(now_us) - lookback,
        (None, Some(w)) => w,
        (None, None) => cursor_us.min(now_us) - lookback,
    };
    from.max(pruned_before.unwrap_or(i64::MIN))
        .max(catchup_floor)
}

/// `2026-11-29T08:33:00.123456Z`.
pub fn format_timestamp(us: i64) -> String {
    match Utc.timestamp_micros(us).single() {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        None => "1970-01-01T00:00:00.000000Z".to_string(),
    }
}

/// Parses the timestamp forms a warehouse returns (ISO 8601 with `T` or a space, with or without
/// zone, any fraction) into µs since the epoch, UTC.
pub fn parse_timestamp(raw: &str) -> Option<i64> {
    let s = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    let s2 = s.trim_end_matches('Z').replace(' ', "T");
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(&s2, fmt) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    None
}

fn date_of(us: i64) -> String {
    Utc.timestamp_micros(us)
        .single()
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "1970-01-01".into())
}

/// A table's full name as a quoted three-part identifier.
pub fn quote_table(full_name: &str) -> String {
    full_name
        .split('.')
        .map(|p| format!("`{}`", p.replace('`', "``")))
        .collect::<Vec<_>>()
        .join(".")
}

fn cell(row: &Row, idx: Option<usize>) -> Option<Cow<'_, str>> {
    idx.and_then(|i| row.get(i)).and_then(Cell::text)
}

fn cell_owned(row: &mut Row, idx: Option<usize>) -> Option<String> {
    idx.and_then(|i| row.get_mut(i)).and_then(Cell::take_text)
}

/// A payload cell, kept as the literal the page held (it goes into the record as is).
fn cell_literal(row: &mut Row, idx: Option<usize>) -> Option<JsonString> {
    idx.and_then(|i| row.get_mut(i))
        .and_then(Cell::take_literal)
}

/// Where each column of an inference-table result is (None when the result lacks it).
#[derive(Debug, Clone, Copy, Default)]
pub struct RowColumns {
    pub id: Option<usize>,
    pub client: Option<usize>,
    pub time: Option<usize>,
    pub status: Option<usize>,
    pub duration: Option<usize>,
    pub request: Option<usize>,
    pub response: Option<usize>,
    pub codes: Option<usize>,
    pub entity: Option<usize>,
    pub requester: Option<usize>,
    pub metadata: Option<usize>,
}

impl RowColumns {
    /// Finds the columns of `format`'s schema with `column` (name -> index).
    pub fn locate(format: TableFormat, column: impl Fn(&str) -> Option<usize>) -> RowColumns {
        let legacy = format == TableFormat::Legacy;
        RowColumns {
            id: column("databricks_request_id"),
            client: column("client_request_id"),
            time: if legacy {
                column("timestamp_ms")
            } else {
                column("request_time_us").or_else(|| column("request_time"))
            },
            status: column("status_code"),
            duration: column(if legacy {
                "execution_time_ms"
            } else {
                "execution_duration_ms"
            }),
            request: column("request"),
            response: column("response"),
            codes: column("logging_error_codes"),
            entity: column("served_entity_id"),
            requester: column("requester"),
            metadata: column("request_metadata"),
        }
    }
}

/// Turns one result row of `table` into its key time (µs) and execution. A row without a usable
/// id or time cannot be delivered exactly once: it comes back as (reason, the row as JSON), for
/// quarantine. Any other cell may be NULL, malformed or huge; it never panics.
pub fn execution_from_row(
    table: &str,
    format: TableFormat,
    cols: &RowColumns,
    mut row: Row,
) -> Result<(i64, Execution), (String, String)> {
    let d = match format {
        TableFormat::Legacy => &LEGACY,
        TableFormat::AiGateway => &AI_GATEWAY,
    };
    let id = cell_owned(&mut row, cols.id);
    // A time chrono cannot represent is unreadable: the row is keyed by this exact time.
    let time = cell(&row, cols.time)
        .and_then(|t| d.parse_time(&t))
        .and_then(|us| Some((us, Utc.timestamp_micros(us).single()?)));
    let (Some(id), Some((time_us, request_time))) = (id.clone(), time) else {
        return Err((
            format!(
                "row without a usable databricks_request_id or {}: {:?}",
                d.time_col, id
            ),
            serde_json::to_string(&row.iter().map(|c| c.0.clone()).collect::<Vec<_>>())
                .unwrap_or_default(),
        ));
    };
    let codes = cell(&row, cols.codes)
        .map(|s| serde_json::from_str::<Vec<String>>(&s).unwrap_or_else(|_| vec![s.into_owned()]))
        .unwrap_or_default();
    let metadata = cell(&row, cols.metadata).and_then(|s| serde_json::from_str(&s).ok());
    let exec = Execution {
        table: table.to_string(),
        format: d.format,
        request_id: id,
        client_request_id: cell_owned(&mut row, cols.client),
        request_time,
        status_code: cell(&row, cols.status).and_then(|s| s.trim().parse().ok()),
        duration_ms: cell(&row, cols.duration).and_then(|s| s.trim().parse().ok()),
        request: cell_literal(&mut row, cols.request),
        response: cell_literal(&mut row, cols.response),
        logging_error_codes: codes,
        served_entity_id: cell_owned(&mut row, cols.entity),
        requester: cell_owned(&mut row, cols.requester),
        request_metadata: metadata,
    };
    Ok((time_us, exec))
}

/// A single row larger than a statement's byte limit: it cannot be read inline.
fn too_large(table: &str) -> CollectError {
    CollectError::Databricks(DatabricksError::Statement {
        table: table.to_string(),
        state: "TRUNCATED".into(),
        error_code: "ROW_TOO_LARGE".into(),
        message: format!(
            "a single row is larger than the {} MiB read limit per statement; it cannot be read",
            crate::databricks::sql::INLINE_BYTE_LIMIT >> 20
        ),
        retriable: false,
    })
}

/// What the texts of a row too large for one statement may take together when read cut: half the
/// statement byte limit, leaving room for their JSON escapes and the other columns.
const CUT_BUDGET_BYTES: usize = crate::databricks::sql::INLINE_BYTE_LIMIT / 2;

/// The most one value read cut keeps, in bytes: within Akto's 5 MiB per string with room for
/// the marker, so the mapping never cuts it again (a second cut would name the cut size, not the
/// full one).
const CUT_TEXT_MAX_BYTES: usize = crate::traffic::MAX_STRING_BYTES - 256;

/// Caps, in characters, for texts of `(characters, bytes)` so that together they take about
/// `budget` bytes: a text within its share stays whole, the larger ones share the rest equally
/// (so a short prompt next to a huge response is never cut); no share is above
/// [`CUT_TEXT_MAX_BYTES`].
pub(crate) fn water_fill(texts: &[(usize, usize)], budget: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].1);
    let mut caps = vec![0; texts.len()];
    let mut left = budget;
    for (k, &i) in order.iter().enumerate() {
        let (chars, bytes) = texts[i];
        let share = (left / (texts.len() - k)).min(CUT_TEXT_MAX_BYTES);
        if bytes <= share {
            caps[i] = chars;
            left -= bytes;
        } else {
            // Bytes to characters at this text's own density.
            caps[i] = (share as u128 * chars as u128 / bytes.max(1) as u128) as usize;
            left -= share;
        }
    }
    caps
}

/// The budgets a cut read tries in turn for texts of `total` bytes: half of them (at most
/// [`CUT_BUDGET_BYTES`]), halved while the result is still cut, down to 0 (at most 24 rounds).
pub(crate) fn cut_budgets(total: usize) -> impl Iterator<Item = usize> {
    let first = (total / 2).min(CUT_BUDGET_BYTES);
    std::iter::successors(Some(first), |b| (*b > 0).then_some(b / 2))
}

/// `text` read cut followed by the cut marker naming its `full` size in bytes, when it is
/// shorter than that; `None` when it was read whole.
pub(crate) fn with_cut_marker(text: &str, full: usize) -> Option<String> {
    (text.len() < full)
        .then(|| format!("{text}{}", crate::traffic::record::truncation_marker(full)))
}

/// Marks a payload read cut ([`with_cut_marker`]). Returns 1 when it was cut.
fn mark_cut(p: &mut Option<JsonString>, original: Option<usize>) -> u64 {
    let Some(cut) = p
        .as_ref()
        .zip(original)
        .and_then(|(lit, full)| with_cut_marker(&lit.text(), full))
    else {
        return 0;
    };
    *p = Some(JsonString::encode(&cut));
    1
}

/// Reads one table, sending chunks of new executions to `out`.
pub struct TableReader<'a> {
    pub client: &'a DatabricksClient,
    pub state: &'a StateStore,
    pub warehouse_id: &'a str,
    pub table: &'a InferenceTable,
    pub opts: &'a CollectOptions,
    pub now_us: i64,
}

impl TableReader<'_> {
    fn dialect(&self) -> &'static Dialect {
        Dialect::for_kind(self.table.kind)
    }

    fn statement(&self, sql: String, parameters: Vec<Param>) -> Statement {
        Statement {
            warehouse_id: self.warehouse_id.to_string(),
            statement: sql,
            parameters,
            table: self.table.full_name.clone(),
            timeout: self.opts.statement_timeout,
        }
    }

    async fn run(&self, st: Statement, stats: &mut TableStats) -> Result<Rows, DatabricksError> {
        stats.statements += 1;
        self.client.execute(&st).await
    }

    /// Reads everything new and sends it. Returns what it did.
    pub async fn collect(&self, out: &mpsc::Sender<Chunk>) -> Result<TableStats, CollectError> {
        let mut stats = TableStats::default();
        self.collect_into(out, &mut stats).await?;
        Ok(stats)
    }

    /// [`TableReader::collect`], counting what it did into `stats` as it goes: a read that
    /// fails (or is stopped) still reports the statements it ran and the rows it delivered.
    pub async fn collect_into(
        &self,
        out: &mpsc::Sender<Chunk>,
        stats: &mut TableStats,
    ) -> Result<(), CollectError> {
        let lookback = self.opts.lookback.as_micros() as i64;
        let catchup_floor = self.now_us - self.opts.max_catchup.as_micros() as i64;
        let ns = self.table.full_name.as_str();
        let cursor = self.state.cursor(ns)?;
        let read_mark = self.state.read_mark(ns)?;
        let window_start = match (&cursor, read_mark) {
            // The first read of this table: where it begins is kept until a read completes.
            (None, None) => Some(self.state.begin_window(
                ns,
                (self.now_us.saturating_sub(lookback)).max(catchup_floor),
            )?),
            _ => self.state.window_start(ns)?,
        };

        // 2. late rows behind the cursor (before the head, so the two regions never overlap).
        if let Some(c) = &cursor {
            // Rows land up to about LOOKBACK late: anything at or before the cursor that was not
            // there at the last complete read has a time after (that read - lookback).
            let from = late_start(
                c.time_us,
                read_mark,
                window_start,
                self.state.pruned_before(ns)?,
                self.now_us,
                lookback,
                catchup_floor,
            );
            if let Some(r) = read_mark.filter(|r| (*r).min(self.now_us) - lookback < catchup_floor)
            {
                // The last complete read is older than MAX_CATCHUP_HOURS allows to reach back
                // (with -once, the job runner's gap between runs): late rows of that gap are
                // not read.
                tracing::warn!(
                    "{}: the last complete read was at {}, so late rows since {} are due, but \
                     MAX_CATCHUP_HOURS={} reaches back only to {}: late rows before it are not \
                     read. Fix: raise MAX_CATCHUP_HOURS above the longest gap between runs plus \
                     LOOKBACK_MINUTES",
                    self.table.full_name,
                    format_timestamp(r),
                    format_timestamp(r.min(self.now_us) - lookback),
                    self.opts.max_catchup.as_secs() / 3600,
                    format_timestamp(catchup_floor)
                );
            }
            if from <= c.time_us {
                self.collect_late(from, c, out, stats).await?;
            }
        }

        // 1. head: everything after the cursor.
        let (after_us, after_id) = head_start(
            cursor.as_ref(),
            read_mark,
            window_start,
            self.now_us,
            lookback,
            catchup_floor,
        );
        if let Some(c) = cursor.as_ref().filter(|c| c.time_us < catchup_floor) {
            tracing::warn!(
                "{}: the last delivered row is from {}, older than MAX_CATCHUP_HOURS={}: rows before {} are skipped",
                self.table.full_name,
                format_timestamp(c.time_us),
                self.opts.max_catchup.as_secs() / 3600,
                format_timestamp(catchup_floor)
            );
        }
        self.collect_head(after_us, after_id, out, stats).await
    }

    async fn collect_head(
        &self,
        after_us: i64,
        after_id: String,
        out: &mpsc::Sender<Chunk>,
        stats: &mut TableStats,
    ) -> Result<(), CollectError> {
        let from_date = date_of(after_us);
        self.read_pages(&from_date, None, Some((after_us, after_id)), out, stats)
            .await
    }

    /// Reads full rows in keyset order `(time, id)`, after `after` when given, restricted by
    /// `filter` (an SQL condition and its parameters) when given, in pages sized to about
    /// `target_statement_bytes`, and emits the ones not delivered yet.
    async fn read_pages(
        &self,
        from_date: &str,
        filter: Option<(&str, &[Param])>,
        mut after: Option<(i64, String)>,
        out: &mpsc::Sender<Chunk>,
        stats: &mut TableStats,
    ) -> Result<(), CollectError> {
        let d = self.dialect();
        let mut limit: usize = 500;
        loop {
            let mut params = vec![Param::new("from_date", from_date.to_string(), "DATE")];
            let mut conds = Vec::new();
            if let Some((cond, p)) = filter {
                conds.push(format!("({cond})"));
                params.extend_from_slice(p);
            }
            if let Some((t, id)) = &after {
                conds.push(format!(
                    "({tc} > :after_time OR ({tc} = :after_time AND databricks_request_id > :after_id))",
                    tc = d.time_col
                ));
                params.push(d.time_param("after_time", *t));
                params.push(Param::new("after_id", id.clone(), "STRING"));
            }
            let where_ = format!(
                "{date} >= :from_date{and}{conds}",
                date = d.date_col,
                and = if conds.is_empty() { "" } else { " AND " },
                conds = conds.join(" AND "),
            );
            let sql = format!(
                "SELECT {cols} FROM {t} WHERE {where_} \
                 ORDER BY {tc}, databricks_request_id LIMIT {limit}",
                cols = d.select_list(&self.table.columns),
                t = quote_table(&self.table.full_name),
                tc = d.time_col,
            );
            let rows = self.run(self.statement(sql, params.clone()), stats).await?;
            // Cut by the byte limit: more rows follow even though the page is not full.
            let truncated = rows.truncated;
            let (n, bytes, last, _) = self.emit_rows(rows, None, out, stats).await?;
            if n == 0 && truncated {
                // The next row alone is larger than a statement may return: read it with its
                // payloads cut, then go on after it.
                let (_, last) = self.read_cut(&where_, params, None, out, stats).await?;
                match (last, &after) {
                    (Some(key), Some((at, aid))) if (key.0, key.1.as_str()) > (*at, aid.as_str()) => {
                        after = Some(key)
                    }
                    (Some(key), None) => after = Some(key),
                    _ => {
                        return Err(CollectError::Databricks(DatabricksError::Decode {
                            route: self.table.full_name.clone(),
                            detail: "a row too large for one statement was not found again, or has no readable request_time or id: cannot page further".into(),
                        }))
                    }
                }
                continue;
            }
            if n == 0 || (n < limit && !truncated) {
                return Ok(());
            }
            match (last, &after) {
                // A full page must move the keyset forward, or the next page would repeat it.
                (Some((t, id)), Some((at, aid))) if (t, id.as_str()) <= (*at, aid.as_str()) => {
                    return Err(CollectError::Databricks(DatabricksError::Decode {
                        route: self.table.full_name.clone(),
                        detail: "a full page of rows without a readable request_time or id: cannot page further".into(),
                    }))
                }
                (Some(key), _) => after = Some(key),
                (None, _) => {
                    return Err(CollectError::Databricks(DatabricksError::Decode {
                        route: self.table.full_name.clone(),
                        detail: "a full page of rows without a readable request_time or id: cannot page further".into(),
                    }))
                }
            }
            // Size the next page so a statement returns about target bytes.
            let per_row = (bytes / n).max(1);
            limit = (self.opts.target_statement_bytes / per_row).clamp(10, 20_000);
        }
    }

    /// Streams a payload result into chunks. `wanted`: only these ids (None = all not yet
    /// delivered). Returns (rows, bytes, last key).
    async fn emit_rows(
        &self,
        mut rows: Rows,
        wanted: Option<&HashSet<String>>,
        out: &mpsc::Sender<Chunk>,
        stats: &mut TableStats,
    ) -> Result<(usize, usize, Option<(i64, String)>, HashSet<String>), CollectError> {
        let d = self.dialect();
        let mut seen = HashSet::new();
        let cols = RowColumns::locate(d.format, |n| rows.column(n));
        // Only a cut read ([`Self::read_cut`]) has these: the payloads' full sizes.
        let full_sizes = (rows.column("request_bytes"), rows.column("response_bytes"));
        let size =
            |row: &Row, i: Option<usize>| cell(row, i).and_then(|s| s.trim().parse::<usize>().ok());
        let mut n = 0usize;
        let mut bytes = 0usize;
        let mut last = None;
        while let Some(chunk) = rows.next_chunk().await? {
            n += chunk.len();
            stats.rows_returned += chunk.len() as u64;
            let mut execs = Vec::with_capacity(chunk.len());
            let mut unreadable = Vec::new();
            let chunk_bytes: usize = chunk
                .iter()
                .flat_map(|row| row.iter())
                .map(Cell::wire_len)
                .sum();
            bytes += chunk_bytes;
            stats.bytes_returned += chunk_bytes as u64;
            let mut keyed = Vec::with_capacity(chunk.len());
            for row in chunk {
                let full = (size(&row, full_sizes.0), size(&row, full_sizes.1));
                match execution_from_row(&self.table.full_name, d.format, &cols, row) {
                    Ok((t, mut e)) => {
                        stats.payloads_cut +=
                            mark_cut(&mut e.request, full.0) + mark_cut(&mut e.response, full.1);
                        keyed.push((t, e))
                    }
                    Err(bad) => unreadable.push(bad),
                }
            }
            // Looked up by (time, id), the key delivery commits them with.
            let delivered = self.state.delivered_at(
                &self.table.full_name,
                keyed.iter().map(|(t, e)| (*t, e.request_id.as_str())),
            )?;
            for ((time_us, exec), done) in keyed.into_iter().zip(delivered) {
                last = Some((time_us, exec.request_id.clone()));
                if wanted.is_some() {
                    seen.insert(exec.request_id.clone());
                }
                if done || wanted.is_some_and(|w| !w.contains(&exec.request_id)) {
                    stats.duplicates_skipped += 1;
                    continue;
                }
                execs.push(exec);
            }
            stats.executions += execs.len() as u64;
            if !execs.is_empty() || !unreadable.is_empty() {
                out.send(Chunk {
                    table: self.table.full_name.clone(),
                    executions: execs,
                    unreadable,
                    ..Default::default()
                })
                .await
                .map_err(|_| CollectError::Closed)?;
            }
        }
        Ok((n, bytes, last, seen))
    }

    /// Reads the first row (in keyset order) of `where_` (with `params`), a row larger than a
    /// statement may return, with its payloads cut to fit: first its id and payload sizes, then
    /// the row with the payloads cut to share [`CUT_BUDGET_BYTES`] (halved while the result is
    /// still cut), each cut payload ending with the marker naming its full size. Emits it like
    /// any row. Returns (rows emitted, its key); (0, None) when no row matches any more.
    async fn read_cut(
        &self,
        where_: &str,
        mut params: Vec<Param>,
        wanted: Option<&HashSet<String>>,
        out: &mpsc::Sender<Chunk>,
        stats: &mut TableStats,
    ) -> Result<(usize, Option<(i64, String)>), CollectError> {
        let d = self.dialect();
        let t = quote_table(&self.table.full_name);
        let sql = format!(
            "SELECT databricks_request_id, length(request) AS request_chars, \
             octet_length(request) AS request_bytes, length(response) AS response_chars, \
             octet_length(response) AS response_bytes FROM {t} WHERE {where_} \
             ORDER BY {tc}, databricks_request_id LIMIT 1",
            tc = d.time_col
        );
        let found = self.run(self.statement(sql, params.clone()), stats).await?;
        let (found, cut) = found.collect_prefix().await?;
        let Some(row) = found.first() else {
            return if cut {
                Err(too_large(&self.table.full_name))
            } else {
                Ok((0, None))
            };
        };
        let num = |i: usize| {
            cell(row, Some(i))
                .and_then(|s| s.trim().parse::<usize>().ok())
                .unwrap_or(0)
        };
        let Some(id) = cell(row, Some(0)).map(Cow::into_owned) else {
            return Err(too_large(&self.table.full_name));
        };
        let texts = [(num(1), num(2)), (num(3), num(4))];
        params.push(Param::new("cut_id", id.clone(), "STRING"));
        for budget in cut_budgets(texts[0].1 + texts[1].1) {
            let caps = water_fill(&texts, budget);
            let sql = format!(
                "SELECT {cols} FROM {t} WHERE {where_} AND databricks_request_id = :cut_id \
                 ORDER BY {tc}, databricks_request_id LIMIT 1",
                cols = d.cut_select_list(&self.table.columns, &caps),
                tc = d.time_col
            );
            let rows = self.run(self.statement(sql, params.clone()), stats).await?;
            if !rows.truncated {
                let cut_before = stats.payloads_cut;
                let (n, _, last, _) = self.emit_rows(rows, wanted, out, stats).await?;
                tracing::warn!(
                    "{}: request {id} is larger than one statement may return ({} MiB): read with \
                     its payloads cut to {} and {} characters (full sizes {} and {} bytes); {} \
                     payload(s) carry a cut marker",
                    self.table.full_name,
                    crate::databricks::sql::INLINE_BYTE_LIMIT >> 20,
                    caps[0],
                    caps[1],
                    texts[0].1,
                    texts[1].1,
                    stats.payloads_cut - cut_before
                );
                return Ok((n, last));
            }
        }
        Err(too_large(&self.table.full_name))
    }

    /// Finds rows at or before the cursor that are not delivered yet, and emits them.
    async fn collect_late(
        &self,
        from_us: i64,
        cursor: &Cursor,
        out: &mpsc::Sender<Chunk>,
        stats: &mut TableStats,
    ) -> Result<(), CollectError> {
        // Ranges are [lo, hi) in time, the last one closed at the cursor's (time, id).
        let end = cursor.time_us + 1;
        let n = self.opts.buckets.max(1) as i64;
        let width = ((end - from_us) / n).max(1_000_000);
        let mut bounds: Vec<i64> = (0..)
            .map(|i| from_us + i * width)
            .take_while(|b| *b < end)
            .collect();
        bounds.push(end);
        let mut ranges: Vec<(i64, i64)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
        // Refine: up to four rounds of counting; split mismatched ranges with many delivered ids
        // into 12, so that the ids to exclude stay few.
        let mut to_scan: Vec<(i64, i64)> = Vec::new();
        let mut to_fetch_all: Vec<(i64, i64)> = Vec::new();
        for round in 0..4 {
            if ranges.is_empty() {
                break;
            }
            let counts = self.count_ranges(&ranges, cursor, stats).await?;
            let mut next = Vec::new();
            for (r, have) in ranges.iter().zip(counts) {
                let done = self.delivered_in(r.0, r.1, cursor)?;
                if have <= done {
                    continue;
                }
                if done == 0 {
                    to_fetch_all.push(*r);
                } else if round == 3 || done <= EXCLUDE_IDS_MAX as u64 || r.1 - r.0 < 12_000 {
                    to_scan.push(*r);
                } else {
                    let step = ((r.1 - r.0) / 12).max(1000);
                    let mut lo = r.0;
                    while lo < r.1 {
                        let hi = (lo + step).min(r.1);
                        next.push((lo, hi));
                        lo = hi;
                    }
                }
            }
            ranges = next;
        }
        // Ranges with nothing delivered: read their rows directly.
        for group in to_fetch_all.chunks(64) {
            self.read_late_group(group, cursor, &[], out, stats).await?;
        }
        // Ranges with few delivered ids: read the rows that are not among them, directly.
        // Ranges with many: scan their ids, then fetch the missing ones.
        // Ranges are grouped so one statement covers many (at most EXCLUDE_IDS_MAX ids excluded).
        let mut scan = Vec::new();
        let mut group: Vec<(i64, i64)> = Vec::new();
        let mut group_known: Vec<String> = Vec::new();
        for r in to_scan {
            let hi = if r.1 > cursor.time_us {
                cursor.time_us + 1
            } else {
                r.1
            };
            let known = self.state.ids_in_range(&self.table.full_name, r.0, hi)?;
            if known.len() > EXCLUDE_IDS_MAX {
                scan.push(r);
                continue;
            }
            if group_known.len() + known.len() > EXCLUDE_IDS_MAX || group.len() >= 64 {
                self.read_late_group(&group, cursor, &group_known, out, stats)
                    .await?;
                group.clear();
                group_known.clear();
            }
            group.push(r);
            group_known.extend(known);
        }
        if !group.is_empty() {
            self.read_late_group(&group, cursor, &group_known, out, stats)
                .await?;
        }
        if !scan.is_empty() {
            let missing = self.scan_ids(&scan, cursor, stats, false).await?;
            stats.late_found += missing.len() as u64;
            self.fetch_ids(missing, out, stats).await?;
        }
        Ok(())
    }

    /// Reads late rows of the ranges (not the `exclude`d ids) and counts them as late.
    async fn read_late_group(
        &self,
        ranges: &[(i64, i64)],
        cursor: &Cursor,
        exclude: &[String],
        out: &mpsc::Sender<Chunk>,
        stats: &mut TableStats,
    ) -> Result<(), CollectError> {
        let before = stats.executions;
        self.read_ranges(ranges, cursor, exclude, out, stats)
            .await?;
        stats.late_found += stats.executions - before;
        Ok(())
    }

    /// Reads the full rows of the ranges, except the `exclude`d ids, and emits them.
    async fn read_ranges(
        &self,
        ranges: &[(i64, i64)],
        cursor: &Cursor,
        exclude: &[String],
        out: &mpsc::Sender<Chunk>,
        stats: &mut TableStats,
    ) -> Result<(), CollectError> {
        let mut params = Vec::new();
        let conds: Vec<String> = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| self.range_sql(i, *r, cursor, &mut params))
            .collect();
        let mut cond = format!("({})", conds.join(" OR "));
        if !exclude.is_empty() {
            let markers: Vec<String> = exclude
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    params.push(Param::new(format!("x{i}"), id.clone(), "STRING"));
                    format!(":x{i}")
                })
                .collect();
            cond.push_str(&format!(
                " AND databricks_request_id NOT IN ({})",
                markers.join(", ")
            ));
        }
        let from_date = date_of(ranges.iter().map(|r| r.0).min().unwrap_or(cursor.time_us));
        self.read_pages(&from_date, Some((&cond, &params)), None, out, stats)
            .await
    }

    /// Delivered rows in [lo, hi), capped at the cursor.
    fn delivered_in(&self, lo: i64, hi: i64, cursor: &Cursor) -> Result<u64, StateError> {
        let t = &self.table.full_name;
        if hi > cursor.time_us {
            // The last range: up to and including the cursor's own row.
            let below = self.state.count_by_range(t, &[lo, cursor.time_us])?[0];
            let at = self
                .state
                .ids_in_range(t, cursor.time_us, cursor.time_us + 1)?
                .into_iter()
                .filter(|id| id.as_str() <= cursor.id.as_str())
                .count() as u64;
            Ok(below + at)
        } else {
            Ok(self.state.count_by_range(t, &[lo, hi])?[0])
        }
    }

    /// SQL for "time in [lo, hi)", closing the range at the cursor when it reaches it.
    fn range_sql(
        &self,
        i: usize,
        r: (i64, i64),
        cursor: &Cursor,
        params: &mut Vec<Param>,
    ) -> String {
        let d = self.dialect();
        params.push(d.bound_param(&format!("lo{i}"), r.0));
        if r.1 > cursor.time_us {
            // A row's own time: exact in either schema (`<` and `=` both read it as it is).
            params.push(d.time_param(&format!("hi{i}"), cursor.time_us));
            params.push(Param::new(format!("hid{i}"), cursor.id.clone(), "STRING"));
            format!(
                "({tc} >= :lo{i} AND ({tc} < :hi{i} OR ({tc} = :hi{i} AND databricks_request_id <= :hid{i})))",
                tc = d.time_col
            )
        } else {
            params.push(d.bound_param(&format!("hi{i}"), r.1));
            format!("({tc} >= :lo{i} AND {tc} < :hi{i})", tc = d.time_col)
        }
    }

    async fn count_ranges(
        &self,
        ranges: &[(i64, i64)],
        cursor: &Cursor,
        stats: &mut TableStats,
    ) -> Result<Vec<u64>, CollectError> {
        let d = self.dialect();
        let mut params = vec![Param::new(
            "from_date",
            date_of(ranges.iter().map(|r| r.0).min().unwrap_or(cursor.time_us)),
            "DATE",
        )];
        let mut sums = Vec::new();
        let mut any = Vec::new();
        for (i, r) in ranges.iter().enumerate() {
            let cond = self.range_sql(i, *r, cursor, &mut params);
            sums.push(format!("SUM(CASE WHEN {cond} THEN 1 ELSE 0 END) AS c{i}"));
            any.push(cond);
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE {} >= :from_date AND ({})",
            sums.join(", "),
            quote_table(&self.table.full_name),
            d.date_col,
            any.join(" OR ")
        );
        let rows = self
            .run(self.statement(sql, params), stats)
            .await?
            .collect_all()
            .await?;
        stats.rows_returned += rows.len() as u64;
        let first = rows.into_iter().next().unwrap_or_default();
        Ok((0..ranges.len())
            .map(|i| {
                first
                    .get(i)
                    .and_then(Cell::text)
                    .and_then(|s| s.trim().parse::<f64>().ok())
                    .map(|f| f as u64)
                    .unwrap_or(0)
            })
            .collect())
    }

    /// Ids in the ranges that are not delivered yet, in keyset order.
    async fn scan_ids(
        &self,
        ranges: &[(i64, i64)],
        cursor: &Cursor,
        stats: &mut TableStats,
        all_missing: bool,
    ) -> Result<Vec<String>, CollectError> {
        let d = self.dialect();
        let mut missing = Vec::new();
        let mut after: Option<(i64, String)> = None;
        loop {
            let mut params = vec![Param::new(
                "from_date",
                date_of(ranges.iter().map(|r| r.0).min().unwrap_or(cursor.time_us)),
                "DATE",
            )];
            let conds: Vec<String> = ranges
                .iter()
                .enumerate()
                .map(|(i, r)| self.range_sql(i, *r, cursor, &mut params))
                .collect();
            let keyset = match &after {
                Some((t, id)) => {
                    params.push(d.time_param("after_time", *t));
                    params.push(Param::new("after_id", id.clone(), "STRING"));
                    format!(
                        " AND ({tc} > :after_time OR ({tc} = :after_time AND databricks_request_id > :after_id))",
                        tc = d.time_col
                    )
                }
                None => String::new(),
            };
            let sql = format!(
                "SELECT databricks_request_id, {key} FROM {t} WHERE {date} >= :from_date AND ({conds}){keyset} \
                 ORDER BY {tc}, databricks_request_id LIMIT {lim}",
                key = d.time_key,
                tc = d.time_col,
                t = quote_table(&self.table.full_name),
                date = d.date_col,
                conds = conds.join(" OR "),
                lim = self.opts.id_page_rows
            );
            let rows = self
                .run(self.statement(sql, params), stats)
                .await?
                .collect_all()
                .await?;
            let n = rows.len();
            stats.rows_returned += n as u64;
            let keyed: Vec<(String, i64)> = rows
                .iter()
                .filter_map(|r| {
                    Some((
                        cell(r, Some(0))?.to_string(),
                        d.parse_time(&cell(r, Some(1))?)?,
                    ))
                })
                .collect();
            stats.bytes_returned += keyed
                .iter()
                .map(|(id, _)| id.len() as u64 + 27)
                .sum::<u64>();
            let delivered = if all_missing {
                vec![false; keyed.len()]
            } else {
                self.state.delivered_at(
                    &self.table.full_name,
                    keyed.iter().map(|(id, t)| (*t, id.as_str())),
                )?
            };
            for ((id, _), done) in keyed.iter().zip(delivered) {
                if done {
                    stats.duplicates_skipped += 1;
                } else {
                    missing.push(id.clone());
                }
            }
            if n < self.opts.id_page_rows {
                return Ok(missing);
            }
            after = keyed.last().map(|(id, t)| (*t, id.clone()));
            if after.is_none() {
                return Ok(missing);
            }
        }
    }

    /// Fetches full rows by id and emits them.
    async fn fetch_ids(
        &self,
        ids: Vec<String>,
        out: &mpsc::Sender<Chunk>,
        stats: &mut TableStats,
    ) -> Result<(), CollectError> {
        let d = self.dialect();
        // The oldest possible date for pruning: the lookback (or catch-up) floor.
        let floor = self.now_us - self.opts.max_catchup.as_micros() as i64;
        for group in ids.chunks(self.opts.fetch_ids.max(1)) {
            let wanted: HashSet<String> = group.iter().cloned().collect();
            let mut params = vec![Param::new("from_date", date_of(floor), "DATE")];
            let markers: Vec<String> = group
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    params.push(Param::new(format!("id{i}"), id.clone(), "STRING"));
                    format!(":id{i}")
                })
                .collect();
            let sql = format!(
                "SELECT {cols} FROM {t} WHERE {date} >= :from_date AND databricks_request_id IN ({ids}) \
                 ORDER BY {tc}, databricks_request_id",
                cols = d.select_list(&self.table.columns),
                t = quote_table(&self.table.full_name),
                date = d.date_col,
                ids = markers.join(", "),
                tc = d.time_col
            );
            let rows = self.run(self.statement(sql, params), stats).await?;
            let truncated = rows.truncated;
            let (n, _, _, seen) = self.emit_rows(rows, Some(&wanted), out, stats).await?;
            if truncated {
                if n == 0 {
                    if let [id] = group {
                        // This row alone is larger than a statement may return: read it cut.
                        let params = vec![
                            Param::new("from_date", date_of(floor), "DATE"),
                            Param::new("id0", id.clone(), "STRING"),
                        ];
                        let where_ = format!(
                            "{} >= :from_date AND databricks_request_id = :id0",
                            d.date_col
                        );
                        self.read_cut(&where_, params, Some(&wanted), out, stats)
                            .await?;
                        continue;
                    }
                    // Which of them is too large is not known: ask again in halves.
                    let (a, b) = group.split_at(group.len() / 2);
                    Box::pin(self.fetch_ids(a.to_vec(), out, stats)).await?;
                    Box::pin(self.fetch_ids(b.to_vec(), out, stats)).await?;
                    continue;
                }
                // Cut by the byte limit: fetch the rest of this group again, in smaller groups.
                let rest: Vec<String> = group
                    .iter()
                    .filter(|id| !seen.contains(*id))
                    .cloned()
                    .collect();
                Box::pin(self.fetch_ids(rest, out, stats)).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_read_keeps_short_texts_whole_and_shares_the_rest() {
        // A short prompt next to a huge response: the prompt stays whole.
        assert_eq!(
            water_fill(&[(100, 100), (10_000, 10_000)], 1000),
            vec![100, 900]
        );
        // Both large: halves.
        assert_eq!(
            water_fill(&[(4000, 4000), (8000, 8000)], 1000),
            vec![500, 500]
        );
        // Characters of several bytes: the cap is in characters at the text's own density.
        assert_eq!(water_fill(&[(1000, 4000)], 400), vec![100]);
        // Everything fits: nothing is cut.
        assert_eq!(water_fill(&[(10, 10), (20, 20)], 1000), vec![10, 20]);
        assert_eq!(water_fill(&[(10, 10)], 0), vec![0]);
        // Budgets halve down to 0, from half the texts (at most CUT_BUDGET_BYTES).
        assert_eq!(
            cut_budgets(40).collect::<Vec<_>>(),
            vec![20, 10, 5, 2, 1, 0]
        );
        assert_eq!(cut_budgets(usize::MAX).count(), 24);
        assert_eq!(with_cut_marker("ab", 2), None);
        assert_eq!(
            with_cut_marker("ab", 9).as_deref(),
            Some("ab...[truncated by databricks-shield: original 9 bytes]")
        );
        // One huge text never keeps more than Akto takes in one string (with the marker).
        let huge = 20 << 20;
        assert_eq!(
            water_fill(&[(huge, huge)], 6 << 20),
            vec![CUT_TEXT_MAX_BYTES]
        );
    }

    #[test]
    fn timestamps_round_trip_in_microseconds() {
        let us = 1_764_405_180_123_456;
        let s = format_timestamp(us);
        assert_eq!(s, "2025-11-29T08:33:00.123456Z");
        assert_eq!(parse_timestamp(&s), Some(us));
        assert_eq!(parse_timestamp("2025-11-29 08:33:00.123456"), Some(us));
        assert_eq!(
            parse_timestamp("2025-11-29T08:33:00.123456+00:00"),
            Some(us)
        );
        assert_eq!(parse_timestamp("2025-11-29T08:33:00Z"), Some(us - 123_456));
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn table_names_are_quoted_part_by_part() {
        assert_eq!(
            quote_table("workspace.default.a_payload"),
            "`workspace`.`default`.`a_payload`"
        );
        assert_eq!(quote_table("c.s.we`ird"), "`c`.`s`.`we``ird`");
    }

    #[test]
    fn only_the_optional_columns_a_table_has_are_selected() {
        let all = AI_GATEWAY.select_list(&[]);
        assert!(
            all.ends_with("logging_error_codes, served_entity_id, requester"),
            "{all}"
        );
        // An older AI Gateway table without `requester` and `served_entity_id`.
        let cols: Vec<String> = [
            "request_date",
            "databricks_request_id",
            "request_time",
            "status_code",
            "request",
            "response",
            "client_request_id",
            "execution_duration_ms",
            "logging_error_codes",
        ]
        .iter()
        .map(|c| c.to_string())
        .collect();
        assert_eq!(
            AI_GATEWAY.select_list(&cols),
            "unix_micros(request_time) AS request_time_us, databricks_request_id, status_code, \
             request, response, client_request_id, execution_duration_ms, logging_error_codes"
        );
        // The required columns are always read (discovery classified the table by them).
        let legacy = LEGACY.select_list(&["timestamp_ms".to_string()]);
        assert_eq!(
            legacy,
            "timestamp_ms, databricks_request_id, status_code, request, response"
        );
    }

    /// A minute, a 60-minute lookback, a catch-up floor far back, and the cycle at minute 100.
    fn window_clock() -> (i64, i64, i64, i64) {
        let min: i64 = 60_000_000;
        (min, 60 * min, -1_000 * min, 100 * min)
    }

    #[test]
    fn the_head_of_a_table_without_a_cursor_starts_a_lookback_before_the_last_read() {
        let (min, lookback, floor, now) = window_clock();
        // Never read: the lookback before now.
        assert_eq!(
            head_start(None, None, None, now, lookback, floor),
            (40 * min, String::new())
        );
        // Read (empty) 5 minutes ago: a row that lands 59 minutes late, stamped 58 minutes
        // before that read, is still in the window.
        let (start, _) = head_start(None, Some(95 * min), None, now, lookback, floor);
        assert_eq!(start, 35 * min);
        assert!(start <= 95 * min - 58 * min);
        // A read mark in the future (clock moved back) does not move the start past now's.
        assert_eq!(
            head_start(None, Some(200 * min), None, now, lookback, floor).0,
            40 * min
        );
        // Never before MAX_CATCHUP_HOURS.
        assert_eq!(
            head_start(None, Some(95 * min), None, now, lookback, 50 * min).0,
            50 * min
        );
        // With a cursor: after it, or from the catch-up floor when it is older.
        let c = Cursor {
            time_us: 90 * min,
            id: "r".into(),
        };
        assert_eq!(
            head_start(Some(&c), Some(95 * min), None, now, lookback, floor),
            (90 * min, "r".into())
        );
        assert_eq!(
            head_start(Some(&c), None, None, now, lookback, 91 * min),
            (91 * min, String::new())
        );
        // Before any complete read: where reading began, however many cycles failed since.
        assert_eq!(
            head_start(None, None, Some(20 * min), now, lookback, floor).0,
            20 * min
        );
        assert_eq!(
            head_start(None, None, Some(20 * min), now, lookback, 30 * min).0,
            30 * min
        );
        // Once a read completed, its mark decides (the window start is older).
        assert_eq!(
            head_start(None, Some(95 * min), Some(20 * min), now, lookback, floor).0,
            35 * min
        );
    }

    #[test]
    fn the_late_pass_reaches_back_to_where_reading_began_never_below_the_pruned_horizon() {
        let (min, lookback, floor, now) = window_clock();
        // A cursor at 105, no complete read yet (the first cycle failed after delivering some
        // rows; this cycle's clock reads 110): the late pass starts where the first window
        // began (40), not a lookback before the cursor (45).
        assert_eq!(
            late_start(
                105 * min,
                None,
                Some(40 * min),
                None,
                110 * min,
                lookback,
                floor
            ),
            40 * min
        );
        // A state from before window starts: a lookback before the cursor (or before now).
        assert_eq!(
            late_start(90 * min, None, None, None, now, lookback, floor),
            30 * min
        );
        assert_eq!(
            late_start(105 * min, None, None, None, now, lookback, floor),
            40 * min
        );
        // A complete read: a lookback before it.
        assert_eq!(
            late_start(
                105 * min,
                Some(95 * min),
                Some(40 * min),
                None,
                now,
                lookback,
                floor
            ),
            35 * min
        );
        // The clock stepped back 30 minutes after a cycle at 130 pruned below 130 - 70 = 60:
        // the late pass does not reach below 60, where delivered ids are gone.
        let stepped_back = |floor| {
            late_start(
                128 * min,
                Some(130 * min),
                None,
                Some(60 * min),
                now,
                lookback,
                floor,
            )
        };
        assert_eq!(stepped_back(floor), 60 * min);
        assert_eq!(stepped_back(70 * min), 70 * min);
    }

    #[test]
    fn legacy_range_bounds_select_what_state_counts() {
        // For every bound and every millisecond row: the warehouse's `m >= :lo AND m < :hi`
        // holds exactly when state's `lo <= 1000 m < hi` does.
        let value = |us: i64| -> i64 {
            LEGACY
                .bound_param("p", us)
                .value
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        for lo in -3_001..3_001i64 {
            for m in -4..5i64 {
                assert_eq!(m >= value(lo), 1000 * m >= lo, "lo {lo} µs, row at {m} ms");
                assert_eq!(m < value(lo), 1000 * m < lo, "hi {lo} µs, row at {m} ms");
            }
        }
        // A bucket edge inside a millisecond (bounds start from `now`, in µs): the row on that
        // millisecond belongs to the next bucket for both.
        let edge = 1_764_405_180_123_456;
        assert_eq!(value(edge), 1_764_405_180_124);
        assert_eq!(
            AI_GATEWAY.bound_param("p", edge).value,
            Some(format_timestamp(edge))
        );
    }

    #[test]
    fn legacy_times_are_milliseconds() {
        assert_eq!(LEGACY.time_value(1_500_999), "1500");
        assert_eq!(LEGACY.parse_time("1500"), Some(1_500_000));
        assert_eq!(AI_GATEWAY.time_value(0), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn gateway_rows_are_keyed_by_the_warehouse_computed_microseconds() {
        // The statements read `unix_micros(request_time)`: the key cannot depend on the session
        // time zone the warehouse would print a TIMESTAMP in.
        assert!(AI_GATEWAY.select_list(&[]).contains(AI_GATEWAY.time_key));
        assert!(AI_GATEWAY.time_key.starts_with("unix_micros(request_time)"));
        assert_eq!(
            AI_GATEWAY.parse_time(" 1764405180123456 "),
            Some(1_764_405_180_123_456)
        );
        let names = ["databricks_request_id", "request_time", "request_time_us"];
        let cols = RowColumns::locate(TableFormat::AiGateway, |n| {
            names.iter().position(|c| *c == n)
        });
        assert_eq!(cols.time, Some(2), "the number wins over the text");
        // A zone-less text (what a non-UTC session could print) is not what keys the row.
        let row: Row = vec![
            Cell(Some("id-1".into())),
            Cell(Some("2025-11-29 09:33:00.123456".into())),
            Cell(Some("1764405180123456".into())),
        ];
        let (t, exec) = execution_from_row("c.s.t", TableFormat::AiGateway, &cols, row).unwrap();
        assert_eq!(t, 1_764_405_180_123_456);
        assert_eq!(exec.request_time.timestamp_micros(), t);
        // A time chrono cannot represent is unreadable (quarantined), never replaced by "now".
        let row: Row = vec![
            Cell(Some("id-2".into())),
            Cell(None),
            Cell(Some(i64::MAX.to_string().as_str().into())),
        ];
        assert!(execution_from_row("c.s.t", TableFormat::AiGateway, &cols, row).is_err());
    }
}
