//! Embedded SQLite store: WAL mode, `synchronous = FULL` (a commit survives power loss, not
//! only a crash of the process), one writer connection and one reader connection. Blocking
//! calls run on tokio's blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::TokenRecord;
use super::{
    BreachChange, BreachFilter, GpuSummary, GpuUsageRow, IncomingReport, IngestOutcome,
    NewEnrollToken, NodePeer, NodeRow, OutboxItem, OutboxRow, PruneStats, Retention, Settle,
    SinkStats, Store, StoreError, TokenSpend, direction_name, format_name, protocol_name, to_i64,
};
use crate::breach::{Breach, BreachState, EVENT_OPEN, EVENT_RESOLVED, EVENT_UPDATED, Observation};
use sov_evidence::audit::{AuditEntry, AuditRecord};
use sov_evidence::chain::{LogRecord, canonical_json};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "sovereign.db";
/// Prepared statements the writer keeps (the ingest path uses about 20).
const STATEMENT_CACHE: usize = 64;
/// Schema version this code writes (`PRAGMA user_version`): the number of migrations.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Migration `i` takes a database from version `i` to `i + 1`. Append only; never edit one
/// that has shipped.
const MIGRATIONS: [&str; 9] = [
    SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7, SCHEMA_V8,
    SCHEMA_V9,
];

const SCHEMA_V1: &str = r#"
CREATE TABLE IF NOT EXISTS nodes (
    node               TEXT PRIMARY KEY,
    site               TEXT NOT NULL,
    country            TEXT NOT NULL,
    hostname           TEXT NOT NULL,
    agent_version      TEXT NOT NULL,
    labels             TEXT NOT NULL,
    first_seen_ms      INTEGER NOT NULL,
    last_seen_ms       INTEGER NOT NULL,
    last_observed_ms   INTEGER NOT NULL,
    latest_epoch       INTEGER NOT NULL,
    cpu_percent        REAL NOT NULL,
    memory_used_bytes  INTEGER NOT NULL,
    memory_total_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS node_epochs (
    node          TEXT NOT NULL,
    epoch         INTEGER NOT NULL,
    reports       INTEGER NOT NULL,
    last_seq      INTEGER NOT NULL,
    conflicts     INTEGER NOT NULL DEFAULT 0,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    PRIMARY KEY (node, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reports (
    node        TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    observed_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    body        BLOB NOT NULL,
    PRIMARY KEY (node, epoch, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    node        TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    dropped_ms  INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (node, epoch, first_seq, last_seq)
) WITHOUT ROWID;
"#;

/// Telemetry time series (issue: host and GPU telemetry).
const SCHEMA_V2: &str = r#"
ALTER TABLE nodes ADD COLUMN gpu_state TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN gpu_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_util_percent REAL NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_memory_used_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_memory_total_bytes INTEGER NOT NULL DEFAULT 0;
CREATE TABLE host_samples (
    node               TEXT NOT NULL,
    observed_ms        INTEGER NOT NULL,
    cpu_percent        REAL NOT NULL,
    load_1             REAL NOT NULL,
    memory_used_bytes  INTEGER NOT NULL,
    memory_total_bytes INTEGER NOT NULL,
    swap_used_bytes    INTEGER NOT NULL,
    process_count      INTEGER NOT NULL,
    PRIMARY KEY (node, observed_ms)
) WITHOUT ROWID;
CREATE INDEX host_samples_by_time ON host_samples (observed_ms);
CREATE TABLE gpu_samples (
    node                 TEXT NOT NULL,
    gpu_uuid             TEXT NOT NULL,
    observed_ms          INTEGER NOT NULL,
    gpu_index            INTEGER NOT NULL,
    name                 TEXT NOT NULL,
    utilization_percent  INTEGER NOT NULL,
    memory_util_percent  INTEGER NOT NULL,
    memory_used_bytes    INTEGER NOT NULL,
    memory_total_bytes   INTEGER NOT NULL,
    power_milliwatts     INTEGER NOT NULL,
    temperature_celsius  INTEGER NOT NULL,
    error                TEXT NOT NULL,
    PRIMARY KEY (node, gpu_uuid, observed_ms)
) WITHOUT ROWID;
CREATE INDEX gpu_samples_by_time ON gpu_samples (observed_ms);
CREATE TABLE gpu_usage (
    node         TEXT NOT NULL,
    observed_ms  INTEGER NOT NULL,
    gpu_uuid     TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    process_name TEXT NOT NULL,
    exe          TEXT NOT NULL,
    container_id TEXT NOT NULL,
    gpu_seconds  REAL NOT NULL,
    used_memory_bytes INTEGER NOT NULL,
    PRIMARY KEY (node, observed_ms, gpu_uuid, pid)
) WITHOUT ROWID;
CREATE INDEX gpu_usage_by_time ON gpu_usage (observed_ms);
"#;

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
    /// Reports waiting for the writer (group commit, see [`Store::ingest`]).
    pending: Arc<Mutex<super::Pending>>,
}

/// Run `sql` through the connection's prepared statement cache (the ingest path runs the same
/// few statements for every report and flow: parsing them each time cost more than running
/// them).
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { context, source }
}

fn lock<T>(c: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock rolls back any open transaction when the guard's
    // statement objects drop, so the connection is still consistent.
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Range(format!("{what} {v} is negative")))
}

/// The report's time series rows, and the node's latest GPU columns when this report is the
/// node's newest.
fn insert_telemetry(
    tx: &rusqlite::Transaction<'_>,
    r: &IncomingReport,
    _epoch: i64,
) -> Result<(), StoreError> {
    let t = &r.telemetry;
    let at = r.observed_unix_ms;
    if let Some(h) = &t.host {
        exec(tx,
            "INSERT OR REPLACE INTO host_samples (node, observed_ms, cpu_percent, load_1, memory_used_bytes,
                                                  memory_total_bytes, swap_used_bytes, process_count)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                r.node,
                at,
                f64::from(h.cpu_percent),
                h.load_1,
                to_i64(h.memory_used_bytes, "memory_used_bytes")?,
                to_i64(h.memory_total_bytes, "memory_total_bytes")?,
                to_i64(h.swap_used_bytes, "swap_used_bytes")?,
                h.process_count
            ],
        )
        .map_err(sql("insert host sample"))?;
    }
    let names: std::collections::HashMap<u32, &sov_proto::pb::ProcessInfo> =
        t.processes.iter().map(|p| (p.pid, p)).collect();
    for g in &t.gpus {
        let uuid = if g.uuid.is_empty() {
            format!("index-{}", g.index)
        } else {
            g.uuid.clone()
        };
        exec(tx,
            "INSERT OR REPLACE INTO gpu_samples (node, gpu_uuid, observed_ms, gpu_index, name, utilization_percent,
                 memory_util_percent, memory_used_bytes, memory_total_bytes, power_milliwatts, temperature_celsius, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                r.node,
                uuid,
                at,
                g.index,
                g.name,
                g.utilization_gpu_percent,
                g.utilization_memory_percent,
                to_i64(g.memory_used_bytes, "gpu memory_used_bytes")?,
                to_i64(g.memory_total_bytes, "gpu memory_total_bytes")?,
                g.power_draw_milliwatts,
                g.temperature_celsius,
                g.error
            ],
        )
        .map_err(sql("insert gpu sample"))?;
        for p in &g.processes {
            let info = names.get(&p.pid);
            exec(tx,
                "INSERT OR REPLACE INTO gpu_usage (node, observed_ms, gpu_uuid, pid, process_name, exe, container_id,
                                                   gpu_seconds, used_memory_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    r.node,
                    at,
                    uuid,
                    p.pid,
                    info.map(|i| i.name.as_str()).unwrap_or(""),
                    info.map(|i| i.exe.as_str()).unwrap_or(""),
                    info.map(|i| i.container_id.as_str()).unwrap_or(""),
                    p.gpu_seconds,
                    to_i64(p.used_memory_bytes, "gpu process memory")?
                ],
            )
            .map_err(sql("insert gpu usage"))?;
        }
    }
    let GpuSummary {
        state: gpu_state,
        count,
        util,
        mem_used,
        mem_total,
    } = GpuSummary::of(t);
    exec(
        tx,
        "UPDATE nodes SET gpu_state = ?2, gpu_count = ?3, gpu_util_percent = ?4,
                          gpu_memory_used_bytes = ?5, gpu_memory_total_bytes = ?6
         WHERE node = ?1 AND last_observed_ms = ?7",
        params![
            r.node,
            gpu_state,
            i64::try_from(count).unwrap_or(i64::MAX),
            util,
            to_i64(mem_used, "gpu memory used")?,
            to_i64(mem_total, "gpu memory total")?,
            at
        ],
    )
    .map_err(sql("update node gpus"))?;
    Ok(())
}

/// Weight file inventory per node (issue: where each model's weights reside).
const SCHEMA_V3: &str = r#"
CREATE TABLE weight_files (
    node            TEXT NOT NULL,
    path            TEXT NOT NULL,
    format          TEXT NOT NULL,
    size_bytes      INTEGER NOT NULL,
    mtime_ms        INTEGER NOT NULL,
    device          INTEGER NOT NULL,
    inode           INTEGER NOT NULL,
    sha256          TEXT NOT NULL,
    model           TEXT NOT NULL,
    revision        TEXT NOT NULL,
    repo_path       TEXT NOT NULL,
    identity_source TEXT NOT NULL,
    publisher       TEXT NOT NULL,
    parameter_count INTEGER NOT NULL,
    mount_point     TEXT NOT NULL,
    fs_type         TEXT NOT NULL,
    network         INTEGER NOT NULL,
    server_address  TEXT NOT NULL,
    users           TEXT NOT NULL,
    detail          BLOB NOT NULL,
    first_seen_ms   INTEGER NOT NULL,
    last_seen_ms    INTEGER NOT NULL,
    removed_ms      INTEGER,
    PRIMARY KEY (node, path)
) WITHOUT ROWID;
CREATE INDEX weight_files_by_sha ON weight_files (sha256);
CREATE INDEX weight_files_by_model ON weight_files (model);
"#;

/// Flows per minute, and raw flows to destinations outside the node's country.
const SCHEMA_V4: &str = r#"
CREATE TABLE flows_minute (
    node           TEXT NOT NULL,
    minute_ms      INTEGER NOT NULL,
    pid            INTEGER NOT NULL,
    process        TEXT NOT NULL,
    protocol       TEXT NOT NULL,
    direction      TEXT NOT NULL,
    remote_address TEXT NOT NULL,
    remote_port    INTEGER NOT NULL,
    country        TEXT NOT NULL,
    asn            INTEGER NOT NULL,
    org            TEXT NOT NULL,
    geo_source     TEXT NOT NULL,
    bytes_sent     INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    connections    INTEGER NOT NULL,
    min_rtt_us     INTEGER NOT NULL,
    PRIMARY KEY (node, minute_ms, pid, protocol, direction, remote_address, remote_port)
) WITHOUT ROWID;
CREATE INDEX flows_minute_by_time ON flows_minute (minute_ms);
CREATE TABLE flows_raw (
    node           TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    epoch          INTEGER NOT NULL,
    idx            INTEGER NOT NULL,
    start_ms       INTEGER NOT NULL,
    end_ms         INTEGER NOT NULL,
    pid            INTEGER NOT NULL,
    process        TEXT NOT NULL,
    country        TEXT NOT NULL,
    asn            INTEGER NOT NULL,
    flow           BLOB NOT NULL,
    PRIMARY KEY (node, epoch, seq, idx)
) WITHOUT ROWID;
CREATE INDEX flows_raw_by_time ON flows_raw (end_ms);
"#;

/// Policy breaches (current state) and their hash-chained, append-only log. At most one open
/// breach per (rule, node, subject). The triggers refuse any change to a log record.
const SCHEMA_V5: &str = r#"
CREATE TABLE breaches (
    breach_id    TEXT PRIMARY KEY,
    rule         TEXT NOT NULL,
    node         TEXT NOT NULL,
    subject      TEXT NOT NULL,
    severity     TEXT NOT NULL,
    state        TEXT NOT NULL,
    evidence     TEXT NOT NULL,
    opened_ms    INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    resolved_ms  INTEGER,
    obs_count    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX breaches_open_key ON breaches (rule, node, subject) WHERE state = 'open';
CREATE INDEX breaches_by_rule ON breaches (rule, state, last_seen_ms);
CREATE INDEX breaches_by_opened ON breaches (opened_ms);
CREATE TABLE breach_log (
    seq       INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    breach_id TEXT NOT NULL,
    event     TEXT NOT NULL,
    body      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TRIGGER breach_log_no_update BEFORE UPDATE ON breach_log
BEGIN SELECT RAISE(ABORT, 'breach_log is append-only'); END;
CREATE TRIGGER breach_log_no_delete BEFORE DELETE ON breach_log
BEGIN SELECT RAISE(ABORT, 'breach_log is append-only'); END;
"#;

/// The alert outbox (one row per breach log record and sink, a cursor per sink), leases that
/// make one replica do a job, and the address each node reports from.
const SCHEMA_V6: &str = r#"
CREATE TABLE alert_outbox (
    sink            TEXT NOT NULL,
    log_seq         INTEGER NOT NULL,
    breach_id       TEXT NOT NULL,
    event           TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    last_error      TEXT NOT NULL,
    created_ms      INTEGER NOT NULL,
    settled_ms      INTEGER,
    PRIMARY KEY (sink, log_seq)
) WITHOUT ROWID;
CREATE INDEX alert_outbox_pending ON alert_outbox (sink, state, log_seq);
CREATE TABLE alert_cursor (
    sink      TEXT PRIMARY KEY,
    after_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE leases (
    name     TEXT PRIMARY KEY,
    holder   TEXT NOT NULL,
    until_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE node_peers (
    node    TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    country TEXT NOT NULL,
    asn     INTEGER NOT NULL,
    source  TEXT NOT NULL,
    seen_ms INTEGER NOT NULL
) WITHOUT ROWID;
"#;

/// The audit log of regulators' and admins' queries (hash-chained, append-only like the breach
/// log) and API tokens (their hashes only).
const SCHEMA_V7: &str = r#"
CREATE TABLE audit_log (
    seq       INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    actor     TEXT NOT NULL,
    call      TEXT NOT NULL,
    body      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TABLE api_tokens (
    token_id   TEXT PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
"#;

/// Enrollment tokens: only their sha256 hashes; a token is spent once (`used_ms` set).
const SCHEMA_V8: &str = r#"
CREATE TABLE enroll_tokens (
    hash       TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms    INTEGER,
    used_by    TEXT
) WITHOUT ROWID;
"#;

/// Minute aggregates that raw host/GPU samples and GPU usage are folded into before they are
/// pruned (kept for `aggregate_retention_days`).
const SCHEMA_V9: &str = r#"
CREATE TABLE host_minute (
    node               TEXT NOT NULL,
    minute_ms          INTEGER NOT NULL,
    samples            INTEGER NOT NULL,
    cpu_percent_avg    REAL NOT NULL,
    cpu_percent_max    REAL NOT NULL,
    load_1_max         REAL NOT NULL,
    memory_used_avg    REAL NOT NULL,
    memory_used_max    INTEGER NOT NULL,
    memory_total_bytes INTEGER NOT NULL,
    PRIMARY KEY (node, minute_ms)
) WITHOUT ROWID;
CREATE INDEX host_minute_by_time ON host_minute (minute_ms);
CREATE TABLE gpu_minute (
    node                 TEXT NOT NULL,
    gpu_uuid             TEXT NOT NULL,
    minute_ms            INTEGER NOT NULL,
    samples              INTEGER NOT NULL,
    utilization_avg      REAL NOT NULL,
    utilization_max      INTEGER NOT NULL,
    memory_used_max      INTEGER NOT NULL,
    memory_total_bytes   INTEGER NOT NULL,
    power_avg_milliwatts REAL NOT NULL,
    PRIMARY KEY (node, gpu_uuid, minute_ms)
) WITHOUT ROWID;
CREATE INDEX gpu_minute_by_time ON gpu_minute (minute_ms);
CREATE TABLE gpu_usage_minute (
    node            TEXT NOT NULL,
    minute_ms       INTEGER NOT NULL,
    gpu_uuid        TEXT NOT NULL,
    pid             INTEGER NOT NULL,
    process_name    TEXT NOT NULL,
    gpu_seconds     REAL NOT NULL,
    used_memory_max INTEGER NOT NULL,
    PRIMARY KEY (node, minute_ms, gpu_uuid, pid)
) WITHOUT ROWID;
CREATE INDEX gpu_usage_minute_by_time ON gpu_usage_minute (minute_ms);
"#;

/// Fold raw rows observed before `?1` into the minute aggregates (merging with rows an earlier
/// pass or a late report already made).
const DOWNSAMPLE: [&str; 3] = [
    "INSERT INTO host_minute (node, minute_ms, samples, cpu_percent_avg, cpu_percent_max, load_1_max,
                              memory_used_avg, memory_used_max, memory_total_bytes)
     SELECT node, observed_ms - (observed_ms % 60000), COUNT(*), AVG(cpu_percent), MAX(cpu_percent),
            MAX(load_1), AVG(memory_used_bytes), MAX(memory_used_bytes), MAX(memory_total_bytes)
     FROM host_samples WHERE observed_ms < ?1 GROUP BY 1, 2
     ON CONFLICT (node, minute_ms) DO UPDATE SET
        cpu_percent_avg = (cpu_percent_avg * samples + excluded.cpu_percent_avg * excluded.samples)
                          / (samples + excluded.samples),
        memory_used_avg = (memory_used_avg * samples + excluded.memory_used_avg * excluded.samples)
                          / (samples + excluded.samples),
        samples = samples + excluded.samples,
        cpu_percent_max = max(cpu_percent_max, excluded.cpu_percent_max),
        load_1_max = max(load_1_max, excluded.load_1_max),
        memory_used_max = max(memory_used_max, excluded.memory_used_max),
        memory_total_bytes = max(memory_total_bytes, excluded.memory_total_bytes)",
    "INSERT INTO gpu_minute (node, gpu_uuid, minute_ms, samples, utilization_avg, utilization_max,
                             memory_used_max, memory_total_bytes, power_avg_milliwatts)
     SELECT node, gpu_uuid, observed_ms - (observed_ms % 60000), COUNT(*), AVG(utilization_percent),
            MAX(utilization_percent), MAX(memory_used_bytes), MAX(memory_total_bytes), AVG(power_milliwatts)
     FROM gpu_samples WHERE observed_ms < ?1 GROUP BY 1, 2, 3
     ON CONFLICT (node, gpu_uuid, minute_ms) DO UPDATE SET
        utilization_avg = (utilization_avg * samples + excluded.utilization_avg * excluded.samples)
                          / (samples + excluded.samples),
        power_avg_milliwatts = (power_avg_milliwatts * samples + excluded.power_avg_milliwatts * excluded.samples)
                               / (samples + excluded.samples),
        samples = samples + excluded.samples,
        utilization_max = max(utilization_max, excluded.utilization_max),
        memory_used_max = max(memory_used_max, excluded.memory_used_max),
        memory_total_bytes = max(memory_total_bytes, excluded.memory_total_bytes)",
    "INSERT INTO gpu_usage_minute (node, minute_ms, gpu_uuid, pid, process_name, gpu_seconds, used_memory_max)
     SELECT node, observed_ms - (observed_ms % 60000), gpu_uuid, pid, MAX(process_name), SUM(gpu_seconds),
            MAX(used_memory_bytes)
     FROM gpu_usage WHERE observed_ms < ?1 GROUP BY 1, 2, 3, 4
     ON CONFLICT (node, minute_ms, gpu_uuid, pid) DO UPDATE SET
        gpu_seconds = gpu_seconds + excluded.gpu_seconds,
        used_memory_max = max(used_memory_max, excluded.used_memory_max),
        process_name = CASE WHEN excluded.process_name <> '' THEN excluded.process_name ELSE process_name END",
];

/// Holes in one epoch's stored sequence numbers (both backends run the same text).
pub(crate) const MISSING_RANGES: &str = "SELECT prev + 1, seq - 1 FROM (
    SELECT seq, COALESCE(LAG(seq) OVER (ORDER BY seq), 0) AS prev
    FROM reports WHERE node = $1 AND epoch = $2
) AS s WHERE seq > prev + 1 ORDER BY seq LIMIT $3";

const BREACH_COLUMNS: &str = "breach_id, rule, node, subject, severity, state, evidence, opened_ms, \
     last_seen_ms, resolved_ms, obs_count";

/// A breach row (columns as [`BREACH_COLUMNS`]) and its stored evidence text.
fn read_breach(row: &rusqlite::Row<'_>) -> Result<(Breach, String), StoreError> {
    let evidence: String = row.get(6).map_err(sql("read breach row"))?;
    let severity: String = row.get(4).map_err(sql("read breach row"))?;
    let state: String = row.get(5).map_err(sql("read breach row"))?;
    let b = super::breach_from_columns(
        row.get(0).map_err(sql("read breach row"))?,
        row.get(1).map_err(sql("read breach row"))?,
        row.get(2).map_err(sql("read breach row"))?,
        row.get(3).map_err(sql("read breach row"))?,
        &severity,
        &state,
        &evidence,
        row.get(7).map_err(sql("read breach row"))?,
        row.get(8).map_err(sql("read breach row"))?,
        row.get(9).map_err(sql("read breach row"))?,
        row.get(10).map_err(sql("read breach row"))?,
    )?;
    Ok((b, evidence))
}

/// `(seq, hash)` of the log's last record.
fn last_log_record(tx: &rusqlite::Transaction<'_>) -> Result<Option<(u64, String)>, StoreError> {
    let last: Option<(i64, String)> = tx
        .query_row(
            "SELECT seq, hash FROM breach_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(sql("read last log record"))?;
    last.map(|(seq, hash)| Ok((to_u64(seq, "log seq")?, hash)))
        .transpose()
}

/// Append the record of `breach` after `event` to the log whose last record is `last`, and
/// make it the new `last`.
fn append_log(
    tx: &rusqlite::Transaction<'_>,
    last: &mut Option<(u64, String)>,
    at_unix_ms: i64,
    breach: &Breach,
    event: &str,
) -> Result<(), StoreError> {
    let r = breach.log_record(
        last.as_ref().map(|(s, h)| (*s, h.as_str())),
        at_unix_ms,
        event,
    );
    tx.execute(
        "INSERT INTO breach_log (seq, at_ms, breach_id, event, body, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            to_i64(r.seq, "log seq")?,
            r.at_unix_ms,
            r.breach_id,
            r.event,
            r.body_json,
            r.prev_hash,
            r.hash
        ],
    )
    .map_err(sql("append breach log"))?;
    *last = Some((r.seq, r.hash));
    Ok(())
}

/// Add the report's flows to the per-minute aggregates; keep foreign ones raw too.
fn apply_flows(
    tx: &rusqlite::Transaction<'_>,
    r: &IncomingReport,
    epoch: i64,
    seq: i64,
) -> Result<(), StoreError> {
    for (idx, f) in r.telemetry.flows.iter().enumerate() {
        let fl = &f.flow;
        let end = if fl.end_unix_ms > 0 {
            fl.end_unix_ms
        } else {
            r.observed_unix_ms
        };
        let minute = end - end.rem_euclid(60_000);
        exec(tx,
            "INSERT INTO flows_minute (node, minute_ms, pid, process, protocol, direction, remote_address, remote_port,
                                       country, asn, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
             ON CONFLICT (node, minute_ms, pid, protocol, direction, remote_address, remote_port) DO UPDATE SET
                bytes_sent = bytes_sent + excluded.bytes_sent,
                bytes_received = bytes_received + excluded.bytes_received,
                connections = connections + excluded.connections,
                min_rtt_us = CASE WHEN min_rtt_us = 0 THEN excluded.min_rtt_us
                                  WHEN excluded.min_rtt_us = 0 THEN min_rtt_us
                                  ELSE min(min_rtt_us, excluded.min_rtt_us) END,
                process = CASE WHEN excluded.process <> '' THEN excluded.process ELSE process END",
            params![
                r.node,
                minute,
                fl.pid,
                f.process,
                protocol_name(fl.protocol),
                direction_name(fl.direction),
                fl.remote_address,
                fl.remote_port,
                f.country,
                f.asn,
                f.org,
                f.geo_source,
                to_i64(fl.bytes_sent, "bytes_sent")?,
                to_i64(fl.bytes_received, "bytes_received")?,
                fl.connections,
                fl.min_rtt_us
            ],
        )
        .map_err(sql("aggregate flow"))?;
        // Raw detail only for destinations outside the node's declared country (the policy
        // refines "outside" with the jurisdiction's inside countries).
        if f.country != r.country {
            exec(tx,
                "INSERT OR IGNORE INTO flows_raw (node, seq, epoch, idx, start_ms, end_ms, pid, process, country, asn, flow)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    r.node,
                    seq,
                    epoch,
                    i64::try_from(idx).unwrap_or(i64::MAX),
                    fl.start_unix_ms,
                    end,
                    fl.pid,
                    f.process,
                    f.country,
                    f.asn,
                    prost::Message::encode_to_vec(fl)
                ],
            )
            .map_err(sql("keep raw flow"))?;
        }
    }
    Ok(())
}

/// Apply a report's weight inventory: upsert what it carries, mark what went away.
fn apply_weights(tx: &rusqlite::Transaction<'_>, r: &IncomingReport) -> Result<(), StoreError> {
    let w = &r.telemetry.weights;
    if !w.full && w.files.is_empty() && w.removed.is_empty() {
        return Ok(());
    }
    let at = r.received_unix_ms;
    for f in &w.files {
        let id = f.identity.clone().unwrap_or_default();
        let st = f.storage.clone().unwrap_or_default();
        let users: Vec<serde_json::Value> = f
            .users
            .iter()
            .map(|u| serde_json::json!({"pid": u.pid, "process": u.process, "gpus": u.gpu_uuids, "mapped": u.mapped, "open": u.open}))
            .collect();
        exec(tx,
            "INSERT INTO weight_files (node, path, format, size_bytes, mtime_ms, device, inode, sha256, model, revision,
                 repo_path, identity_source, publisher, parameter_count, mount_point, fs_type, network, server_address,
                 users, detail, first_seen_ms, last_seen_ms, removed_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?21, NULL)
             ON CONFLICT (node, path) DO UPDATE SET
                format = excluded.format, size_bytes = excluded.size_bytes, mtime_ms = excluded.mtime_ms,
                device = excluded.device, inode = excluded.inode,
                sha256 = CASE WHEN excluded.sha256 = '' AND size_bytes = excluded.size_bytes AND mtime_ms = excluded.mtime_ms
                              THEN sha256 ELSE excluded.sha256 END,
                model = excluded.model, revision = excluded.revision, repo_path = excluded.repo_path,
                identity_source = excluded.identity_source, publisher = excluded.publisher,
                parameter_count = excluded.parameter_count, mount_point = excluded.mount_point,
                fs_type = excluded.fs_type, network = excluded.network, server_address = excluded.server_address,
                users = excluded.users, detail = excluded.detail, last_seen_ms = excluded.last_seen_ms,
                first_seen_ms = CASE WHEN removed_ms IS NULL THEN first_seen_ms ELSE excluded.first_seen_ms END,
                removed_ms = NULL",
            params![
                r.node,
                f.path,
                format_name(f.format),
                to_i64(f.size_bytes, "weight size")?,
                f.mtime_unix_ms,
                f.device as i64,
                f.inode as i64,
                f.sha256,
                id.model,
                id.revision,
                id.repo_path,
                id.source,
                id.publisher,
                to_i64(f.parameter_count, "parameter_count")?,
                st.mount_point,
                st.fs_type,
                st.network,
                st.server_address,
                serde_json::Value::Array(users).to_string(),
                prost::Message::encode_to_vec(f),
                at
            ],
        )
        .map_err(sql("upsert weight file"))?;
    }
    for path in &w.removed {
        exec(tx,
            "UPDATE weight_files SET removed_ms = ?3 WHERE node = ?1 AND path = ?2 AND removed_ms IS NULL",
            params![r.node, path, at],
        )
        .map_err(sql("mark weight file removed"))?;
    }
    if w.full {
        exec(tx,
            "UPDATE weight_files SET removed_ms = ?2 WHERE node = ?1 AND removed_ms IS NULL AND last_seen_ms < ?2",
            params![r.node, at],
        )
        .map_err(sql("mark unlisted weight files removed"))?;
    }
    Ok(())
}

/// Apply every migration after `from`, each with its version bump in one transaction.
fn migrate(conn: &mut Connection, from: i64) -> Result<(), StoreError> {
    for (i, step) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(from).unwrap_or(0))
    {
        let tx = conn.transaction().map_err(sql("begin migration"))?;
        tx.execute_batch(step).map_err(sql("migrate schema"))?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(sql("write schema version"))?;
        tx.commit().map_err(sql("commit migration"))?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    Ok(())
}

impl SqliteStore {
    /// Open (creating if needed) `data_dir/sovereign.db`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Open {
            path: data_dir.display().to_string(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        let writer = Connection::open(&path).map_err(sql("open database"))?;
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000;",
            )
            .map_err(sql("set pragmas"))?;
        let version: i64 = writer
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql("read schema version"))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let mut writer = writer;
        migrate(&mut writer, version)?;
        let reader = Connection::open(&path).map_err(sql("open reader"))?;
        reader
            .execute_batch("PRAGMA busy_timeout = 10000; PRAGMA query_only = ON;")
            .map_err(sql("set reader pragmas"))?;
        writer.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Self {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            pending: Arc::default(),
        })
    }

    /// Store a batch of reports: all in one transaction (one commit, one fsync), or, when
    /// anything in it fails, each in its own so that one bad report fails alone. Outcomes are
    /// in the order of `reports`; none is returned before its transaction committed.
    fn ingest_batch_blocking(
        conn: &mut Connection,
        reports: &[&IncomingReport],
    ) -> Vec<Result<IngestOutcome, StoreError>> {
        if reports.len() > 1 {
            let together = (|| {
                let tx = conn.transaction().map_err(sql("begin"))?;
                let outcomes = reports
                    .iter()
                    .map(|r| Self::apply_report(&tx, r))
                    .collect::<Result<Vec<_>, _>>()?;
                tx.commit().map_err(sql("commit"))?;
                Ok::<_, StoreError>(outcomes)
            })();
            match together {
                Ok(outcomes) => return outcomes.into_iter().map(Ok).collect(),
                Err(e) => {
                    tracing::debug!(reports = reports.len(), error = %e, "batch failed; storing its reports one by one");
                }
            }
        }
        reports
            .iter()
            .map(|r| {
                let tx = conn.transaction().map_err(sql("begin"))?;
                let outcome = Self::apply_report(&tx, r)?;
                tx.commit().map_err(sql("commit"))?;
                Ok(outcome)
            })
            .collect()
    }

    /// One report's statements inside `tx` (not committed here).
    fn apply_report(
        tx: &rusqlite::Transaction<'_>,
        r: &IncomingReport,
    ) -> Result<IngestOutcome, StoreError> {
        let epoch = to_i64(r.epoch, "epoch")?;
        let seq = to_i64(r.seq, "seq")?;
        let inserted = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO reports (node, epoch, seq, observed_ms, received_ms, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(sql("prepare insert report"))?
            .execute(params![
                r.node,
                epoch,
                seq,
                r.observed_unix_ms,
                r.received_unix_ms,
                r.body
            ])
            .map_err(sql("insert report"))?;
        if inserted == 0 {
            // Already stored. A re-send carries the same observation time; a different one
            // means the agent reused a sequence number (a lost spool state): count it so
            // that it is visible, and keep the first report.
            let stored_ms: i64 = tx
                .query_row(
                    "SELECT observed_ms FROM reports WHERE node = ?1 AND epoch = ?2 AND seq = ?3",
                    params![r.node, epoch, seq],
                    |row| row.get(0),
                )
                .map_err(sql("read duplicate"))?;
            if stored_ms != r.observed_unix_ms {
                tracing::error!(node = %r.node, epoch = r.epoch, seq = r.seq, "sequence number reused for a different report");
                exec(tx,
                    "UPDATE node_epochs SET conflicts = conflicts + 1 WHERE node = ?1 AND epoch = ?2",
                    params![r.node, epoch],
                )
                .map_err(sql("count conflict"))?;
                return Ok(IngestOutcome::Conflict);
            }
            return Ok(IngestOutcome::Duplicate);
        }
        exec(
            tx,
            "INSERT INTO node_epochs (node, epoch, reports, last_seq, first_seen_ms, last_seen_ms)
             VALUES (?1, ?2, 1, ?3, ?4, ?4)
             ON CONFLICT (node, epoch) DO UPDATE SET
                reports = reports + 1,
                last_seq = max(last_seq, excluded.last_seq),
                last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
            params![r.node, epoch, seq, r.received_unix_ms],
        )
        .map_err(sql("update epoch counters"))?;
        let labels = serde_json::to_string(&r.labels).unwrap_or_else(|_| "{}".to_owned());
        let mem_used = to_i64(r.memory_used_bytes, "memory_used_bytes")?;
        let mem_total = to_i64(r.memory_total_bytes, "memory_total_bytes")?;
        exec(tx,
            "INSERT INTO nodes (node, site, country, hostname, agent_version, labels, first_seen_ms,
                                last_seen_ms, last_observed_ms, latest_epoch, cpu_percent,
                                memory_used_bytes, memory_total_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (node) DO UPDATE SET
                last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),
                latest_epoch = max(latest_epoch, excluded.latest_epoch),
                site = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.site ELSE site END,
                country = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.country ELSE country END,
                hostname = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.hostname ELSE hostname END,
                agent_version = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.agent_version ELSE agent_version END,
                labels = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.labels ELSE labels END,
                cpu_percent = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.cpu_percent ELSE cpu_percent END,
                memory_used_bytes = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.memory_used_bytes ELSE memory_used_bytes END,
                memory_total_bytes = CASE WHEN excluded.last_observed_ms >= last_observed_ms THEN excluded.memory_total_bytes ELSE memory_total_bytes END,
                last_observed_ms = max(last_observed_ms, excluded.last_observed_ms)",
            params![
                r.node,
                r.site,
                r.country,
                r.hostname,
                r.agent_version,
                labels,
                r.received_unix_ms,
                r.observed_unix_ms,
                epoch,
                f64::from(r.cpu_percent),
                mem_used,
                mem_total,
            ],
        )
        .map_err(sql("update node"))?;
        for g in &r.gaps {
            exec(tx,
                "INSERT OR IGNORE INTO gaps (node, epoch, first_seq, last_seq, reason, dropped_ms, received_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    r.node,
                    epoch,
                    to_i64(g.first_seq, "gap first_seq")?,
                    to_i64(g.last_seq, "gap last_seq")?,
                    g.reason,
                    g.dropped_unix_ms,
                    r.received_unix_ms
                ],
            )
            .map_err(sql("insert gap"))?;
        }
        insert_telemetry(tx, r, epoch)?;
        apply_weights(tx, r)?;
        apply_flows(tx, r, epoch, seq)?;
        Ok(IngestOutcome::Stored)
    }

    fn list_nodes_blocking(
        conn: &Connection,
        after: &str,
        limit: u32,
    ) -> Result<Vec<NodeRow>, StoreError> {
        let mut stmt = conn
            .prepare_cached(
                "SELECT n.node, n.site, n.country, n.hostname, n.agent_version, n.labels,
                        n.last_seen_ms, n.latest_epoch, COALESCE(e.reports, 0), COALESCE(e.last_seq, 0),
                        (SELECT COUNT(*) FROM node_epochs x WHERE x.node = n.node),
                        n.cpu_percent, n.memory_used_bytes, n.memory_total_bytes, COALESCE(e.conflicts, 0),
                        (SELECT COALESCE(SUM(g.last_seq - g.first_seq + 1
                            - (SELECT COUNT(*) FROM reports r WHERE r.node = g.node AND r.epoch = g.epoch
                                 AND r.seq BETWEEN g.first_seq AND g.last_seq)), 0)
                         FROM gaps g WHERE g.node = n.node AND g.epoch = n.latest_epoch),
                        n.gpu_state, n.gpu_count, n.gpu_util_percent, n.gpu_memory_used_bytes,
                        n.gpu_memory_total_bytes
                 FROM nodes n
                 LEFT JOIN node_epochs e ON e.node = n.node AND e.epoch = n.latest_epoch
                 WHERE n.node > ?1
                 ORDER BY n.node
                 LIMIT ?2",
            )
            .map_err(sql("prepare list nodes"))?;
        // Counters are never negative in a database this code wrote; clamp rather than fail.
        let u = |row: &rusqlite::Row<'_>, i: usize| -> rusqlite::Result<u64> {
            Ok(u64::try_from(row.get::<_, i64>(i)?).unwrap_or(0))
        };
        let rows = stmt
            .query_map(params![after, i64::from(limit)], |row| {
                let reports = u(row, 8)?;
                let last_seq = u(row, 9)?;
                let missing = last_seq.saturating_sub(reports);
                let labels: String = row.get(5)?;
                Ok(NodeRow {
                    node: row.get(0)?,
                    site: row.get(1)?,
                    country: row.get(2)?,
                    hostname: row.get(3)?,
                    agent_version: row.get(4)?,
                    labels: serde_json::from_str(&labels).unwrap_or_default(),
                    last_seen_unix_ms: row.get(6)?,
                    epoch: u(row, 7)?,
                    reports,
                    last_seq,
                    missing,
                    epochs: u32::try_from(u(row, 10)?).unwrap_or(u32::MAX),
                    #[allow(clippy::cast_possible_truncation)]
                    cpu_percent: row.get::<_, f64>(11)? as f32,
                    memory_used_bytes: u(row, 12)?,
                    memory_total_bytes: u(row, 13)?,
                    conflicts: u(row, 14)?,
                    dropped: u(row, 15)?.min(missing),
                    gpu_state: row.get(16)?,
                    gpu_count: u32::try_from(u(row, 17)?).unwrap_or(u32::MAX),
                    #[allow(clippy::cast_possible_truncation)]
                    gpu_util_percent: row.get::<_, f64>(18)? as f32,
                    gpu_memory_used_bytes: u(row, 19)?,
                    gpu_memory_total_bytes: u(row, 20)?,
                })
            })
            .map_err(sql("list nodes"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql("read node row"))
    }

    fn list_models_blocking(
        conn: &Connection,
        query: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<sov_proto::pb::ModelSummary>, StoreError> {
        use sov_proto::pb;
        let sha_query = query.len() == 64 && query.bytes().all(|b| b.is_ascii_hexdigit());
        let mut stmt = conn
            .prepare_cached(
                "SELECT k, node, path, format, size_bytes, sha256, model, revision, repo_path, identity_source,
                        publisher, parameter_count, mount_point, fs_type, network, server_address, users,
                        first_seen_ms, last_seen_ms, site, country
                 FROM (SELECT w.*, COALESCE(n.site, '') AS site, COALESCE(n.country, '') AS country,
                              CASE WHEN w.sha256 <> '' THEN w.model || '|' || w.sha256
                                   ELSE w.model || '|~' || w.node || ':' || w.path END AS k
                       FROM weight_files w LEFT JOIN nodes n ON n.node = w.node
                       WHERE w.removed_ms IS NULL)
                 WHERE k > ?1
                   AND (?2 = '' OR (?3 AND sha256 = lower(?2)) OR (NOT ?3 AND instr(lower(model), lower(?2)) > 0))
                 ORDER BY k, node, path",
            )
            .map_err(sql("prepare list models"))?;
        let mut rows = stmt
            .query(params![after, query, sha_query])
            .map_err(sql("list models"))?;
        let mut out: Vec<pb::ModelSummary> = Vec::new();
        while let Some(row) = rows.next().map_err(sql("read model row"))? {
            let key: String = row.get(0).map_err(sql("read model key"))?;
            let get = |i: usize| -> Result<String, StoreError> {
                row.get(i).map_err(sql("read model row"))
            };
            let num =
                |i: usize| -> Result<i64, StoreError> { row.get(i).map_err(sql("read model row")) };
            if out.last().map(|m| m.key.as_str()) != Some(key.as_str()) {
                if out.len() >= limit as usize {
                    break;
                }
                out.push(pb::ModelSummary {
                    key: key.clone(),
                    model: get(6)?,
                    identity_source: get(9)?,
                    format: get(3)?,
                    sha256: get(5)?,
                    size_bytes: u64::try_from(num(4)?).unwrap_or(0),
                    parameter_count: u64::try_from(num(11)?).unwrap_or(0),
                    revision: get(7)?,
                    repo_path: get(8)?,
                    publisher: get(10)?,
                    copies: vec![],
                    users: vec![],
                });
            }
            let Some(m) = out.last_mut() else { continue };
            let node = get(1)?;
            let path = get(2)?;
            let network = num(14)? != 0;
            m.copies.push(pb::ModelCopy {
                node: node.clone(),
                site: get(19)?,
                country: get(20)?,
                path: path.clone(),
                storage: if network {
                    get(13)?
                } else {
                    "local".to_owned()
                },
                server: get(15)?,
                first_seen_unix_ms: num(17)?,
                last_seen_unix_ms: num(18)?,
                mount_point: get(12)?,
            });
            let users: Vec<serde_json::Value> = serde_json::from_str(&get(16)?).unwrap_or_default();
            for u in users {
                m.users.push(pb::ModelUser {
                    node: node.clone(),
                    pid: u["pid"]
                        .as_u64()
                        .and_then(|p| u32::try_from(p).ok())
                        .unwrap_or(0),
                    process: u["process"].as_str().unwrap_or("").to_owned(),
                    gpus: u["gpus"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|g| g.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default(),
                    path: path.clone(),
                });
            }
        }
        Ok(out)
    }

    fn egress_blocking(
        conn: &Connection,
        q: &crate::store::EgressQuery,
    ) -> Result<(Vec<sov_proto::pb::EgressRow>, u64), StoreError> {
        let (cols, group) = match q.by.as_str() {
            "" | "country" => ("country, '', '', 0, 0, '', '', 0, ''", "country"),
            "node" => ("country, node, '', 0, 0, '', '', 0, ''", "country, node"),
            "process" => (
                "country, node, process, pid, 0, '', '', 0, ''",
                "country, node, process, pid",
            ),
            "asn" => (
                "country, '', '', 0, asn, max(org), '', 0, ''",
                "country, asn",
            ),
            "destination" => (
                "country, '', '', 0, asn, max(org), remote_address, remote_port, max(geo_source)",
                "country, asn, remote_address, remote_port",
            ),
            "flow" => (
                "country, node, process, pid, asn, max(org), remote_address, remote_port, max(geo_source)",
                "country, node, process, pid, asn, remote_address, remote_port",
            ),
            other => {
                return Err(StoreError::Range(format!(
                    "unknown grouping {other:?}: use country, node, process, asn, destination or flow"
                )));
            }
        };
        let text = format!(
            "SELECT {cols}, SUM(bytes_sent), SUM(bytes_received), SUM(connections),
                    COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0)
             FROM flows_minute
             WHERE minute_ms >= ?1 AND minute_ms < ?2 AND direction <> 'inbound'
             GROUP BY {group}
             ORDER BY SUM(bytes_sent) DESC, SUM(bytes_received) DESC"
        );
        // Minutes are stamped at their start: a range starting mid-minute includes it.
        let since = q.since_unix_ms - q.since_unix_ms.rem_euclid(60_000);
        let mut stmt = conn.prepare_cached(&text).map_err(sql("prepare egress"))?;
        let mut rows = stmt
            .query(params![since, q.until_unix_ms])
            .map_err(sql("egress"))?;
        let mut out = Vec::new();
        let mut truncated = 0u64;
        while let Some(row) = rows.next().map_err(sql("read egress row"))? {
            if out.len() >= q.limit as usize {
                truncated += 1;
                continue;
            }
            let n = |i: usize| -> Result<i64, StoreError> {
                row.get(i).map_err(sql("read egress row"))
            };
            let t = |i: usize| -> Result<String, StoreError> {
                row.get(i).map_err(sql("read egress row"))
            };
            out.push(sov_proto::pb::EgressRow {
                country: t(0)?,
                node: t(1)?,
                process: t(2)?,
                pid: u32::try_from(n(3)?).unwrap_or(0),
                asn: u32::try_from(n(4)?).unwrap_or(0),
                org: t(5)?,
                remote_address: t(6)?,
                remote_port: u32::try_from(n(7)?).unwrap_or(0),
                geo_source: t(8)?,
                bytes_sent: u64::try_from(n(9)?).unwrap_or(0),
                bytes_received: u64::try_from(n(10)?).unwrap_or(0),
                connections: u64::try_from(n(11)?).unwrap_or(0),
                min_rtt_us: u32::try_from(n(12)?).unwrap_or(0),
            });
        }
        Ok((out, truncated))
    }

    fn prune_blocking(conn: &mut Connection, keep: Retention) -> Result<PruneStats, StoreError> {
        let raw = keep.raw_before_unix_ms;
        let aggregates = keep.aggregates_before_unix_ms;
        let tx = conn.transaction().map_err(sql("begin prune"))?;
        let mut stats = PruneStats::default();
        for step in DOWNSAMPLE {
            stats.downsampled += tx.execute(step, [raw]).map_err(sql("downsample samples"))? as u64;
        }
        for (table, counter) in [
            ("host_samples", &mut stats.host_samples),
            ("gpu_samples", &mut stats.gpu_samples),
            ("gpu_usage", &mut stats.gpu_usage),
        ] {
            *counter = tx
                .execute(
                    &format!("DELETE FROM {table} WHERE observed_ms < ?1"),
                    [raw],
                )
                .map_err(sql("prune samples"))? as u64;
        }
        for table in ["host_minute", "gpu_minute", "gpu_usage_minute"] {
            stats.aggregates += tx
                .execute(
                    &format!("DELETE FROM {table} WHERE minute_ms < ?1"),
                    [aggregates],
                )
                .map_err(sql("prune aggregates"))? as u64;
        }
        stats.flows = tx
            .execute(
                "DELETE FROM flows_minute WHERE minute_ms < ?1",
                [aggregates],
            )
            .map_err(sql("prune flows"))? as u64
            + tx.execute("DELETE FROM flows_raw WHERE end_ms < ?1", [raw])
                .map_err(sql("prune raw flows"))? as u64;
        // Report keys stay forever (they make re-sends idempotent and prove completeness);
        // only their bodies go.
        stats.report_bodies = tx
            .execute(
                "UPDATE reports SET body = x'' WHERE received_ms < ?1 AND length(body) > 0",
                [raw],
            )
            .map_err(sql("prune report bodies"))? as u64;
        tx.commit().map_err(sql("commit prune"))?;
        Ok(stats)
    }
}

impl SqliteStore {
    fn observe_breach_blocking(
        conn: &mut Connection,
        obs: &Observation,
    ) -> Result<BreachChange, StoreError> {
        if obs.rule.is_empty() {
            return Err(StoreError::Range(
                "breach observation without a rule".into(),
            ));
        }
        // IMMEDIATE: take the write lock before reading, so that the read-then-write cannot
        // fail half way with another process on the same file.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin observe breach"))?;
        let found = {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {BREACH_COLUMNS} FROM breaches
                     WHERE rule = ?1 AND node = ?2 AND subject = ?3 AND state = 'open'"
                ))
                .map_err(sql("prepare find breach"))?;
            let mut rows = stmt
                .query(params![obs.rule, obs.node, obs.subject])
                .map_err(sql("find breach"))?;
            match rows.next().map_err(sql("find breach"))? {
                Some(row) => Some(read_breach(row)?),
                None => None,
            }
        };
        let mut last = last_log_record(&tx)?;
        let change = match found {
            None => {
                let b = Breach::opened(obs, last.as_ref().map_or(1, |(s, _)| s + 1));
                tx.execute(
                    &format!(
                        "INSERT INTO breaches ({BREACH_COLUMNS})
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL, ?10)"
                    ),
                    params![
                        b.breach_id,
                        b.rule,
                        b.node,
                        b.subject,
                        b.severity.as_str(),
                        b.state.as_str(),
                        canonical_json(&b.evidence),
                        b.opened_at_unix_ms,
                        b.last_seen_unix_ms,
                        to_i64(b.count, "breach count")?
                    ],
                )
                .map_err(sql("insert breach"))?;
                append_log(&tx, &mut last, obs.at_unix_ms, &b, EVENT_OPEN)?;
                BreachChange::Opened(b)
            }
            Some((mut b, stored_evidence)) => {
                let changed = b.fold(obs, &stored_evidence);
                tx.execute(
                    "UPDATE breaches SET severity = ?2, evidence = ?3, last_seen_ms = ?4, obs_count = ?5
                     WHERE breach_id = ?1",
                    params![
                        b.breach_id,
                        b.severity.as_str(),
                        canonical_json(&b.evidence),
                        b.last_seen_unix_ms,
                        to_i64(b.count, "breach count")?
                    ],
                )
                .map_err(sql("update breach"))?;
                if changed {
                    append_log(&tx, &mut last, obs.at_unix_ms, &b, EVENT_UPDATED)?;
                    BreachChange::Updated(b)
                } else {
                    BreachChange::Unchanged(b)
                }
            }
        };
        tx.commit().map_err(sql("commit observe breach"))?;
        Ok(change)
    }

    fn resolve_quiet_breaches_blocking(
        conn: &mut Connection,
        rule: &str,
        quiet_before_unix_ms: i64,
        at_unix_ms: i64,
    ) -> Result<Vec<Breach>, StoreError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin resolve breaches"))?;
        let mut quiet = Vec::new();
        {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {BREACH_COLUMNS} FROM breaches
                     WHERE rule = ?1 AND state = 'open' AND last_seen_ms < ?2
                     ORDER BY breach_id"
                ))
                .map_err(sql("prepare quiet breaches"))?;
            let mut rows = stmt
                .query(params![rule, quiet_before_unix_ms])
                .map_err(sql("find quiet breaches"))?;
            while let Some(row) = rows.next().map_err(sql("find quiet breaches"))? {
                quiet.push(read_breach(row)?.0);
            }
        }
        let mut last = last_log_record(&tx)?;
        for b in &mut quiet {
            b.state = BreachState::Resolved;
            b.resolved_at_unix_ms = Some(at_unix_ms);
            tx.execute(
                "UPDATE breaches SET state = 'resolved', resolved_ms = ?2 WHERE breach_id = ?1",
                params![b.breach_id, at_unix_ms],
            )
            .map_err(sql("resolve breach"))?;
            append_log(&tx, &mut last, at_unix_ms, b, EVENT_RESOLVED)?;
        }
        tx.commit().map_err(sql("commit resolve breaches"))?;
        Ok(quiet)
    }

    fn list_breaches_blocking(
        conn: &Connection,
        f: &BreachFilter,
    ) -> Result<Vec<Breach>, StoreError> {
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {BREACH_COLUMNS} FROM breaches
                 WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR rule = ?2)
                   AND (?3 IS NULL OR state = 'open' OR resolved_ms >= ?3)
                 ORDER BY opened_ms DESC, breach_id
                 LIMIT ?4"
            ))
            .map_err(sql("prepare list breaches"))?;
        let mut rows = stmt
            .query(params![
                f.state.map(BreachState::as_str),
                f.rule,
                f.since_unix_ms,
                i64::from(f.limit)
            ])
            .map_err(sql("list breaches"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql("list breaches"))? {
            out.push(read_breach(row)?.0);
        }
        Ok(out)
    }

    fn breach_log_blocking(
        conn: &Connection,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<LogRecord>, StoreError> {
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, at_ms, breach_id, event, body, prev_hash, hash FROM breach_log
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(sql("prepare read breach log"))?;
        let mut rows = stmt
            .query(params![to_i64(after_seq, "after_seq")?, i64::from(limit)])
            .map_err(sql("read breach log"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql("read breach log"))? {
            let seq: i64 = row.get(0).map_err(sql("read breach log row"))?;
            out.push(LogRecord::from_stored(
                to_u64(seq, "log seq")?,
                row.get(1).map_err(sql("read breach log row"))?,
                row.get(2).map_err(sql("read breach log row"))?,
                row.get(3).map_err(sql("read breach log row"))?,
                row.get(4).map_err(sql("read breach log row"))?,
                row.get(5).map_err(sql("read breach log row"))?,
                row.get(6).map_err(sql("read breach log row"))?,
            ));
        }
        Ok(out)
    }
}

impl SqliteStore {
    /// Run `f` with the writer connection on the blocking pool.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&writer)))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Run `f` with the reader connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&lock(&reader)))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    fn append_audit_blocking(
        conn: &mut Connection,
        entry: &AuditEntry,
    ) -> Result<AuditRecord, StoreError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin append audit"))?;
        let last: Option<(i64, String)> = tx
            .query_row(
                "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("read last audit record"))?;
        let last = match last {
            Some((seq, hash)) => Some((to_u64(seq, "audit seq")?, hash)),
            None => None,
        };
        let r = AuditRecord::next(last.as_ref().map(|(s, h)| (*s, h.as_str())), entry);
        tx.execute(
            "INSERT INTO audit_log (seq, at_ms, actor, call, body, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                to_i64(r.seq, "audit seq")?,
                r.at_unix_ms,
                r.actor,
                r.call,
                r.body_json,
                r.prev_hash,
                r.hash
            ],
        )
        .map_err(sql("append audit log"))?;
        tx.commit().map_err(sql("commit audit record"))?;
        Ok(r)
    }

    fn audit_log_blocking(
        conn: &Connection,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, at_ms, actor, call, body, prev_hash, hash FROM audit_log
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(sql("prepare read audit log"))?;
        let mut rows = stmt
            .query(params![to_i64(after_seq, "after_seq")?, i64::from(limit)])
            .map_err(sql("read audit log"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql("read audit log"))? {
            let seq: i64 = row.get(0).map_err(sql("read audit log row"))?;
            out.push(AuditRecord {
                seq: to_u64(seq, "audit seq")?,
                at_unix_ms: row.get(1).map_err(sql("read audit log row"))?,
                actor: row.get(2).map_err(sql("read audit log row"))?,
                call: row.get(3).map_err(sql("read audit log row"))?,
                body_json: row.get(4).map_err(sql("read audit log row"))?,
                prev_hash: row.get(5).map_err(sql("read audit log row"))?,
                hash: row.get(6).map_err(sql("read audit log row"))?,
            });
        }
        Ok(out)
    }

    fn token_by_hash_blocking(
        conn: &Connection,
        hash: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let row = conn
            .query_row(
                "SELECT token_id, hash, name, role, created_ms, expires_ms FROM api_tokens
                 WHERE hash = ?1",
                [hash],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(sql("find token"))?;
        row.map(|(id, hash, name, role, created, expires)| {
            super::token_from_columns(id, hash, name, &role, created, expires)
        })
        .transpose()
    }

    fn add_enroll_tokens_blocking(
        conn: &mut Connection,
        tokens: &[NewEnrollToken],
    ) -> Result<(), StoreError> {
        let tx = conn.transaction().map_err(sql("begin add tokens"))?;
        for t in tokens {
            tx.execute(
                "INSERT INTO enroll_tokens (hash, created_ms, expires_ms) VALUES (?1, ?2, ?3)",
                params![t.hash, t.created_unix_ms, t.expires_unix_ms],
            )
            .map_err(sql("add enrollment token"))?;
        }
        tx.commit().map_err(sql("commit add tokens"))
    }

    fn spend_enroll_token_blocking(
        conn: &mut Connection,
        hash: &str,
        node: &str,
        now: i64,
    ) -> Result<TokenSpend, StoreError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin spend token"))?;
        let spent = tx
            .execute(
                "UPDATE enroll_tokens SET used_ms = ?3, used_by = ?2
                 WHERE hash = ?1 AND used_ms IS NULL AND expires_ms > ?3",
                params![hash, node, now],
            )
            .map_err(sql("spend enrollment token"))?;
        let outcome = if spent == 1 {
            TokenSpend::Spent
        } else {
            let row: Option<(i64, Option<i64>, Option<String>)> = tx
                .query_row(
                    "SELECT expires_ms, used_ms, used_by FROM enroll_tokens WHERE hash = ?1",
                    params![hash],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(sql("read enrollment token"))?;
            match row {
                None => TokenSpend::Unknown,
                Some((_, Some(at), by)) => TokenSpend::AlreadyUsed {
                    node: by.unwrap_or_default(),
                    at_unix_ms: at,
                },
                Some((expires, None, _)) => TokenSpend::Expired {
                    at_unix_ms: expires,
                },
            }
        };
        tx.commit().map_err(sql("commit spend token"))?;
        Ok(outcome)
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn append_audit(&self, entry: AuditEntry) -> Result<AuditRecord, StoreError> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || Self::append_audit_blocking(&mut lock(&writer), &entry))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn audit_log(&self, after_seq: u64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            Self::audit_log_blocking(&lock(&reader), after_seq, limit)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn missing_ranges(
        &self,
        node: &str,
        epoch: u64,
        limit: u32,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let reader = self.reader.clone();
        let node = node.to_owned();
        let epoch = to_i64(epoch, "epoch")?;
        tokio::task::spawn_blocking(move || {
            let conn = lock(&reader);
            let mut stmt = conn
                .prepare_cached(MISSING_RANGES)
                .map_err(sql("prepare missing ranges"))?;
            let mut rows = stmt
                .query(params![node, epoch, i64::from(limit)])
                .map_err(sql("missing ranges"))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(sql("missing ranges"))? {
                let first: i64 = row.get(0).map_err(sql("read missing range"))?;
                let last: i64 = row.get(1).map_err(sql("read missing range"))?;
                out.push((to_u64(first, "first")?, to_u64(last, "last")?));
            }
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn gpu_usage(
        &self,
        since_unix_ms: i64,
        until_unix_ms: i64,
        limit: u32,
    ) -> Result<Vec<GpuUsageRow>, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = lock(&reader);
            let mut stmt = conn
                .prepare_cached(
                    "SELECT node, pid, process_name, SUM(gpu_seconds) FROM gpu_usage
                     WHERE observed_ms >= ?1 AND observed_ms < ?2
                     GROUP BY node, pid, process_name
                     ORDER BY 4 DESC, node, pid LIMIT ?3",
                )
                .map_err(sql("prepare gpu usage"))?;
            let mut rows = stmt
                .query(params![since_unix_ms, until_unix_ms, i64::from(limit)])
                .map_err(sql("gpu usage"))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(sql("gpu usage"))? {
                let pid: i64 = row.get(1).map_err(sql("read gpu usage row"))?;
                out.push(GpuUsageRow {
                    node: row.get(0).map_err(sql("read gpu usage row"))?,
                    pid: u32::try_from(pid).unwrap_or(0),
                    process: row.get(2).map_err(sql("read gpu usage row"))?,
                    gpu_seconds: row.get(3).map_err(sql("read gpu usage row"))?,
                });
            }
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn insert_token(&self, token: TokenRecord) -> Result<(), StoreError> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            lock(&writer)
                .execute(
                    "INSERT INTO api_tokens (token_id, hash, name, role, created_ms, expires_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        token.token_id,
                        token.hash,
                        token.name,
                        token.role.as_str(),
                        token.created_unix_ms,
                        token.expires_unix_ms
                    ],
                )
                .map(|_| ())
                .map_err(sql("insert token"))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = lock(&reader);
            let mut stmt = conn
                .prepare_cached(
                    "SELECT token_id, hash, name, role, created_ms, expires_ms FROM api_tokens
                     ORDER BY created_ms, token_id",
                )
                .map_err(sql("prepare list tokens"))?;
            let mut rows = stmt.query([]).map_err(sql("list tokens"))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(sql("list tokens"))? {
                let role: String = r.get(3).map_err(sql("read token row"))?;
                out.push(super::token_from_columns(
                    r.get(0).map_err(sql("read token row"))?,
                    r.get(1).map_err(sql("read token row"))?,
                    r.get(2).map_err(sql("read token row"))?,
                    &role,
                    r.get(4).map_err(sql("read token row"))?,
                    r.get(5).map_err(sql("read token row"))?,
                )?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn delete_token(&self, token_id: &str) -> Result<bool, StoreError> {
        let writer = self.writer.clone();
        let token_id = token_id.to_owned();
        tokio::task::spawn_blocking(move || {
            lock(&writer)
                .execute("DELETE FROM api_tokens WHERE token_id = ?1", [token_id])
                .map(|n| n > 0)
                .map_err(sql("delete token"))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let reader = self.reader.clone();
        let hash = hash.to_owned();
        tokio::task::spawn_blocking(move || Self::token_by_hash_blocking(&lock(&reader), &hash))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Group commit: the report joins the queue; whoever holds the writer next stores every
    /// queued report (up to [`super::MAX_BATCH_REPORTS`] per transaction) with one commit and
    /// one fsync, then answers each. The queue is drained until empty by a blocking task that
    /// is not cancelled with the caller, so a caller that goes away cannot abort the others.
    async fn ingest(&self, report: IncomingReport) -> Result<IngestOutcome, StoreError> {
        let done = lock(&self.pending).push(report);
        let (writer, pending) = (self.writer.clone(), self.pending.clone());
        tokio::task::spawn_blocking(move || {
            let mut conn = lock(&writer);
            loop {
                let batch = lock(&pending).take_batch();
                if batch.is_empty() {
                    return;
                }
                let reports: Vec<&IncomingReport> = batch.iter().map(|p| &p.report).collect();
                let outcomes = Self::ingest_batch_blocking(&mut conn, &reports);
                super::answer(batch, outcomes);
            }
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?;
        done.await
            .map_err(|_| StoreError::Task("ingest answer lost".to_owned()))?
    }

    async fn list_nodes(&self, after: &str, limit: u32) -> Result<Vec<NodeRow>, StoreError> {
        let reader = self.reader.clone();
        let after = after.to_owned();
        tokio::task::spawn_blocking(move || {
            Self::list_nodes_blocking(&lock(&reader), &after, limit)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn list_models(
        &self,
        query: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<sov_proto::pb::ModelSummary>, StoreError> {
        let reader = self.reader.clone();
        let (query, after) = (query.to_owned(), after.to_owned());
        tokio::task::spawn_blocking(move || {
            Self::list_models_blocking(&lock(&reader), &query, &after, limit)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn egress(
        &self,
        q: crate::store::EgressQuery,
    ) -> Result<(Vec<sov_proto::pb::EgressRow>, u64), StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || Self::egress_blocking(&lock(&reader), &q))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn prune(&self, retention: Retention) -> Result<PruneStats, StoreError> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || Self::prune_blocking(&mut lock(&writer), retention))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn observe_breach(&self, obs: Observation) -> Result<BreachChange, StoreError> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || Self::observe_breach_blocking(&mut lock(&writer), &obs))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn resolve_quiet_breaches(
        &self,
        rule: &str,
        quiet_before_unix_ms: i64,
        at_unix_ms: i64,
    ) -> Result<Vec<Breach>, StoreError> {
        let writer = self.writer.clone();
        let rule = rule.to_owned();
        tokio::task::spawn_blocking(move || {
            Self::resolve_quiet_breaches_blocking(
                &mut lock(&writer),
                &rule,
                quiet_before_unix_ms,
                at_unix_ms,
            )
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn list_breaches(&self, filter: BreachFilter) -> Result<Vec<Breach>, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || Self::list_breaches_blocking(&lock(&reader), &filter))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn breach_log(&self, after_seq: u64, limit: u32) -> Result<Vec<LogRecord>, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            Self::breach_log_blocking(&lock(&reader), after_seq, limit)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn breach_log_end(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            let seq: i64 = c
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM breach_log", [], |r| {
                    r.get(0)
                })
                .map_err(sql("read breach log end"))?;
            to_u64(seq, "log seq")
        })
        .await
    }

    async fn outbox_cursor(&self, sink: &str) -> Result<Option<u64>, StoreError> {
        let sink = sink.to_owned();
        self.read(move |c| {
            let seq: Option<i64> = c
                .query_row(
                    "SELECT after_seq FROM alert_cursor WHERE sink = ?1",
                    params![sink],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("read outbox cursor"))?;
            seq.map(|s| to_u64(s, "outbox cursor")).transpose()
        })
        .await
    }

    async fn outbox_enqueue(
        &self,
        sink: &str,
        items: Vec<OutboxItem>,
        cursor: u64,
        now_unix_ms: i64,
    ) -> Result<(), StoreError> {
        let sink = sink.to_owned();
        self.write(move |c| {
            let tx = c.transaction().map_err(sql("begin enqueue"))?;
            for it in &items {
                tx.execute(
                    "INSERT OR IGNORE INTO alert_outbox (sink, log_seq, breach_id, event, payload, state,
                         attempts, next_attempt_ms, last_error, created_ms, settled_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, '', ?6, NULL)",
                    params![
                        sink,
                        to_i64(it.log_seq, "log seq")?,
                        it.breach_id,
                        it.event,
                        it.payload,
                        now_unix_ms
                    ],
                )
                .map_err(sql("enqueue alert"))?;
            }
            tx.execute(
                "INSERT INTO alert_cursor (sink, after_seq) VALUES (?1, ?2)
                 ON CONFLICT (sink) DO UPDATE SET after_seq = max(after_seq, excluded.after_seq)",
                params![sink, to_i64(cursor, "outbox cursor")?],
            )
            .map_err(sql("move outbox cursor"))?;
            tx.commit().map_err(sql("commit enqueue"))
        })
        .await
    }

    async fn outbox_head(&self, sink: &str) -> Result<Option<OutboxRow>, StoreError> {
        let sink = sink.to_owned();
        self.read(move |c| {
            let row: Option<(i64, String, String, String, i64, i64, i64)> = c
                .query_row(
                    "SELECT log_seq, breach_id, event, payload, attempts, next_attempt_ms, created_ms
                     FROM alert_outbox WHERE sink = ?1 AND state = 'pending'
                     ORDER BY log_seq LIMIT 1",
                    params![sink],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                        ))
                    },
                )
                .optional()
                .map_err(sql("read outbox head"))?;
            row.map(|(seq, breach_id, event, payload, attempts, next, created)| {
                Ok(OutboxRow {
                    sink: sink.clone(),
                    item: OutboxItem {
                        log_seq: to_u64(seq, "log seq")?,
                        breach_id,
                        event,
                        payload,
                    },
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    next_attempt_unix_ms: next,
                    created_unix_ms: created,
                })
            })
            .transpose()
        })
        .await
    }

    async fn outbox_settle(
        &self,
        sink: &str,
        log_seq: u64,
        settle: Settle,
    ) -> Result<(), StoreError> {
        let sink = sink.to_owned();
        let seq = to_i64(log_seq, "log seq")?;
        self.write(move |c| {
            let n = match &settle {
                Settle::Delivered { at_unix_ms } => c.execute(
                    "UPDATE alert_outbox SET state = 'delivered', settled_ms = ?3
                     WHERE sink = ?1 AND log_seq = ?2 AND state = 'pending'",
                    params![sink, seq, at_unix_ms],
                ),
                Settle::Retry {
                    attempts,
                    next_attempt_unix_ms,
                    error,
                } => c.execute(
                    "UPDATE alert_outbox SET attempts = ?3, next_attempt_ms = ?4, last_error = ?5
                     WHERE sink = ?1 AND log_seq = ?2 AND state = 'pending'",
                    params![sink, seq, attempts, next_attempt_unix_ms, error],
                ),
                Settle::Failed {
                    attempts,
                    at_unix_ms,
                    error,
                } => c.execute(
                    "UPDATE alert_outbox SET state = 'failed', attempts = ?3, settled_ms = ?4, last_error = ?5
                     WHERE sink = ?1 AND log_seq = ?2 AND state = 'pending'",
                    params![sink, seq, attempts, at_unix_ms, error],
                ),
            }
            .map_err(sql("settle outbox row"))?;
            if n == 0 {
                tracing::warn!(sink = %sink, log_seq = seq, "outbox row was already settled");
            }
            Ok(())
        })
        .await
    }

    async fn outbox_stats(&self) -> Result<Vec<SinkStats>, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT sink,
                            SUM(state = 'pending'), SUM(state = 'delivered'), SUM(state = 'failed'),
                            SUM(attempts)
                     FROM alert_outbox GROUP BY sink ORDER BY sink",
                )
                .map_err(sql("prepare outbox stats"))?;
            let mut rows = stmt.query([]).map_err(sql("outbox stats"))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(sql("outbox stats"))? {
                let n = |i: usize| -> Result<u64, StoreError> {
                    let v: i64 = r.get(i).map_err(sql("read outbox stats"))?;
                    to_u64(v, "outbox count")
                };
                out.push(SinkStats {
                    sink: r.get(0).map_err(sql("read outbox stats"))?,
                    pending: n(1)?,
                    delivered: n(2)?,
                    failed: n(3)?,
                    failed_attempts: n(4)?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_unix_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.write(move |c| {
            let n = c
                .execute(
                    "INSERT INTO leases (name, holder, until_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms
                     WHERE leases.holder = excluded.holder OR leases.until_ms < ?4",
                    params![name, holder, now_unix_ms.saturating_add(ttl_ms), now_unix_ms],
                )
                .map_err(sql("take lease"))?;
            Ok(n == 1)
        })
        .await
    }

    async fn note_peer(&self, peer: NodePeer) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO node_peers (node, address, country, asn, source, seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (node) DO UPDATE SET address = excluded.address, country = excluded.country,
                     asn = excluded.asn, source = excluded.source, seen_ms = excluded.seen_ms
                 WHERE excluded.seen_ms >= node_peers.seen_ms",
                params![
                    peer.node,
                    peer.address,
                    peer.country,
                    i64::from(peer.asn),
                    peer.source,
                    peer.seen_unix_ms
                ],
            )
            .map_err(sql("record node peer"))?;
            Ok(())
        })
        .await
    }

    async fn node_peers(&self) -> Result<Vec<NodePeer>, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT node, address, country, asn, source, seen_ms FROM node_peers ORDER BY node",
                )
                .map_err(sql("prepare node peers"))?;
            let mut rows = stmt.query([]).map_err(sql("node peers"))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(sql("node peers"))? {
                let asn: i64 = r.get(3).map_err(sql("read node peer"))?;
                out.push(NodePeer {
                    node: r.get(0).map_err(sql("read node peer"))?,
                    address: r.get(1).map_err(sql("read node peer"))?,
                    country: r.get(2).map_err(sql("read node peer"))?,
                    asn: u32::try_from(asn).unwrap_or(0),
                    source: r.get(4).map_err(sql("read node peer"))?,
                    seen_unix_ms: r.get(5).map_err(sql("read node peer"))?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn add_enroll_tokens(&self, tokens: &[NewEnrollToken]) -> Result<(), StoreError> {
        let writer = self.writer.clone();
        let tokens = tokens.to_vec();
        tokio::task::spawn_blocking(move || {
            Self::add_enroll_tokens_blocking(&mut lock(&writer), &tokens)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn spend_enroll_token(
        &self,
        hash: &str,
        node: &str,
        now_unix_ms: i64,
    ) -> Result<TokenSpend, StoreError> {
        let writer = self.writer.clone();
        let (hash, node) = (hash.to_owned(), node.to_owned());
        tokio::task::spawn_blocking(move || {
            Self::spend_enroll_token_blocking(&mut lock(&writer), &hash, &node, now_unix_ms)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// Count stored reports of one node and epoch (for tests and tools).
pub fn count_reports(data_dir: &Path, node: &str, epoch: u64) -> Result<u64, StoreError> {
    let conn = Connection::open(data_dir.join(DB_FILE)).map_err(sql("open database"))?;
    let n: Option<i64> = conn
        .query_row(
            "SELECT COUNT(*) FROM reports WHERE node = ?1 AND epoch = ?2",
            params![node, to_i64(epoch, "epoch")?],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql("count reports"))?;
    to_u64(n.unwrap_or(0), "count")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::suite::{Backend, Fixture, report, store_suite, telemetry};

    /// A fresh database in a temporary directory.
    struct SqliteFixture {
        dir: tempfile::TempDir,
        store: SqliteStore,
    }

    #[async_trait::async_trait(?Send)]
    impl Backend for SqliteFixture {
        fn store(&self) -> &dyn Store {
            &self.store
        }

        async fn count(&self, sql: &str) -> i64 {
            count(self.dir.path(), sql)
        }
    }

    #[async_trait::async_trait(?Send)]
    impl Fixture for SqliteFixture {
        async fn create() -> Option<Self> {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path()).unwrap();
            Some(Self { dir, store })
        }

        async fn destroy(self) {}
    }

    store_suite!(SqliteFixture);

    fn count(dir: &Path, sql: &str) -> i64 {
        Connection::open(dir.join(DB_FILE))
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn stored_reports_survive_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path()).unwrap();
            store.ingest(report("a", 1, 1)).await.unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(
            store.ingest(report("a", 1, 1)).await.unwrap(),
            IngestOutcome::Duplicate
        );
        assert_eq!(store.list_nodes("", 10).await.unwrap()[0].reports, 1);
        assert_eq!(count_reports(dir.path(), "a", 1).unwrap(), 1);
    }

    #[tokio::test]
    async fn a_version_1_database_is_migrated_without_losing_its_reports() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            let tx = c.transaction().unwrap();
            tx.execute_batch(SCHEMA_V1).unwrap();
            tx.execute_batch("PRAGMA user_version = 1").unwrap();
            tx.execute(
                "INSERT INTO reports (node, epoch, seq, observed_ms, received_ms, body) VALUES ('a', 1, 1, 1000, 1005, x'01')",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(count(dir.path(), "PRAGMA user_version"), SCHEMA_VERSION);
        assert_eq!(
            store.ingest(report("a", 1, 1)).await.unwrap(),
            IngestOutcome::Duplicate
        );
        let mut r = report("a", 1, 2);
        r.telemetry = telemetry();
        assert_eq!(store.ingest(r).await.unwrap(), IngestOutcome::Stored);
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM gpu_samples"), 2);
    }

    #[tokio::test]
    async fn an_edited_log_record_is_refused_by_the_database_and_named_by_the_chain() {
        use crate::store::suite::{observation, whole_log};
        use sov_evidence::chain::verify_chain;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        for (at, bytes) in [(1000, 1), (2000, 2), (3000, 3)] {
            store
                .observe_breach(observation(
                    "r",
                    "n",
                    "s",
                    at,
                    serde_json::json!({"bytes": bytes}),
                ))
                .await
                .unwrap();
        }
        assert_eq!(verify_chain(whole_log(&store).await.into_iter()), Ok(3));
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let edit = "UPDATE breach_log SET body = replace(body, '\"bytes\":2', '\"bytes\":0') WHERE seq = 2";
        let refused = c.execute(edit, []).unwrap_err().to_string();
        assert!(refused.contains("append-only"), "{refused}");
        assert!(
            c.execute("DELETE FROM breach_log WHERE seq = 3", [])
                .is_err()
        );
        // Someone with the file can drop the trigger; the chain still tells.
        c.execute_batch("DROP TRIGGER breach_log_no_update")
            .unwrap();
        assert_eq!(c.execute(edit, []).unwrap(), 1);
        let log = whole_log(&store).await;
        assert_eq!(log[1].body["evidence"]["bytes"], 0);
        let err = verify_chain(log.into_iter()).unwrap_err();
        assert_eq!(err.seq, 2, "{err}");
    }

    #[test]
    fn a_database_from_a_newer_collector_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(c);
        let err = SqliteStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_stores_log_is_verified_across_pages_and_a_break_is_named() {
        use crate::breach::{Observation, Severity};
        use crate::store::{VERIFY_PAGE, verify_store_log};
        use sov_evidence::chain::{GENESIS_HASH, LogVerdict};
        let obs = |subject: &str, at: i64, evidence: serde_json::Value| Observation {
            rule: "restricted-model-outside".into(),
            node: "gpu-1".into(),
            subject: subject.into(),
            severity: Severity::Critical,
            evidence,
            at_unix_ms: at,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let empty = verify_store_log(&store).await.unwrap();
        assert_eq!(
            empty.message(),
            format!("log verified: 0 records, last hash {GENESIS_HASH}")
        );
        // More records than one page.
        let n = i64::from(VERIFY_PAGE) + 5;
        for i in 0..n {
            store
                .observe_breach(obs("m", 1000 + i, serde_json::json!(i)))
                .await
                .unwrap();
        }
        let last = store
            .breach_log(u64::try_from(n - 1).unwrap(), 1)
            .await
            .unwrap();
        let verdict = verify_store_log(&store).await.unwrap();
        assert_eq!(
            verdict,
            LogVerdict::Verified {
                records: u64::try_from(n).unwrap(),
                last_hash: last[0].hash.clone()
            }
        );
        assert_eq!(
            verdict.message(),
            format!("log verified: {n} records, last hash {}", last[0].hash)
        );
        let c = rusqlite::Connection::open(dir.path().join(crate::store::sqlite::DB_FILE)).unwrap();
        c.execute_batch(
            "DROP TRIGGER breach_log_no_delete; DELETE FROM breach_log WHERE seq = 1002;",
        )
        .unwrap();
        let verdict = verify_store_log(&store).await.unwrap();
        assert_eq!(
            verdict.message(),
            "log broken at record 1002: record missing (the next stored record is 1003)"
        );
    }
}
