//! PostgreSQL store, for several collector replicas sharing one database.
//!
//! Behaves exactly like [`super::sqlite`] (the reference): the same tables, the same
//! idempotency on `(node, epoch, seq)`, the same "latest observed wins" node facts.
//!
//! Connections: one writer connection behind a tokio mutex, so this replica's transactions
//! run one at a time like SQLite's single writer, and one reader connection shared by every
//! query (tokio-postgres pipelines concurrent queries on it). Replicas are serialised by the
//! database itself: `INSERT ... ON CONFLICT DO NOTHING` on the report key makes a second
//! replica wait for the first one's commit and then see a duplicate. A transaction that loses
//! a deadlock or serialisation race is retried. When a connection's task has ended (the
//! server went away), the call that notices fails with [`StoreError::Postgres`] and the next
//! call reconnects.
//!
//! The schema is versioned in `sov_schema_version`; migrations run in one transaction under
//! `pg_advisory_xact_lock`, so replicas starting together migrate once. Tables live in the
//! connection's `search_path` (set it in the URL with `?options=-csearch_path%3Dname`, or use
//! [`PostgresStore::connect_with_schema`]). Connections are plain TCP or Unix sockets
//! (`NoTls`): run the database on the same host or network segment, or behind a TLS proxy.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::FromSql;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use super::TokenRecord;
use super::{
    BreachChange, BreachFilter, EgressQuery, GpuSummary, GpuUsageRow, IncomingReport,
    IngestOutcome, NewEnrollToken, NodePeer, NodeRow, OutboxItem, OutboxRow, PruneStats, Retention,
    Settle, SinkStats, Store, StoreError, TokenSpend, direction_name, format_name, protocol_name,
    to_i64,
};
use crate::breach::{Breach, BreachState, EVENT_OPEN, EVENT_RESOLVED, EVENT_UPDATED, Observation};
use sov_evidence::audit::{AuditEntry, AuditRecord};
use sov_evidence::chain::{LogRecord, canonical_json};

/// Connect timeout used when the URL does not set `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of one ingest transaction that loses a deadlock or serialisation race.
const INGEST_ATTEMPTS: u32 = 3;
/// Key of the advisory lock held while migrating ("sov_migr").
const MIGRATION_LOCK_KEY: i64 = 0x736f_765f_6d69_6772;
/// Key of the advisory lock every breach transaction holds ("sov_brlg"): it serialises breach
/// changes and log appends across replicas, so sequence numbers and links stay consistent.
const BREACH_LOCK_KEY: i64 = 0x736f_765f_6272_6c67;
/// Key of the advisory lock every audit append holds ("sov_audt").
const AUDIT_LOCK_KEY: i64 = 0x736f_765f_6175_6474;
/// Schema version this code writes: the number of migrations.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Migration `i` takes a database from version `i` to `i + 1`; versions mean the same tables
/// as SQLite's `user_version`. Append only; never edit one that has shipped.
const MIGRATIONS: [&str; 9] = [
    SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7, SCHEMA_V8,
    SCHEMA_V9,
];

const SCHEMA_V1: &str = r#"
CREATE TABLE nodes (
    node               TEXT PRIMARY KEY,
    site               TEXT NOT NULL,
    country            TEXT NOT NULL,
    hostname           TEXT NOT NULL,
    agent_version      TEXT NOT NULL,
    labels             TEXT NOT NULL,
    first_seen_ms      BIGINT NOT NULL,
    last_seen_ms       BIGINT NOT NULL,
    last_observed_ms   BIGINT NOT NULL,
    latest_epoch       BIGINT NOT NULL,
    cpu_percent        DOUBLE PRECISION NOT NULL,
    memory_used_bytes  BIGINT NOT NULL,
    memory_total_bytes BIGINT NOT NULL
);
CREATE TABLE node_epochs (
    node          TEXT NOT NULL,
    epoch         BIGINT NOT NULL,
    reports       BIGINT NOT NULL,
    last_seq      BIGINT NOT NULL,
    conflicts     BIGINT NOT NULL DEFAULT 0,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    PRIMARY KEY (node, epoch)
);
CREATE TABLE reports (
    node        TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    observed_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    body        BYTEA NOT NULL,
    PRIMARY KEY (node, epoch, seq)
);
CREATE TABLE gaps (
    node        TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    first_seq   BIGINT NOT NULL,
    last_seq    BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    dropped_ms  BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    PRIMARY KEY (node, epoch, first_seq, last_seq)
);
"#;

/// Telemetry time series.
const SCHEMA_V2: &str = r#"
ALTER TABLE nodes ADD COLUMN gpu_state TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN gpu_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_util_percent DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_memory_used_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN gpu_memory_total_bytes BIGINT NOT NULL DEFAULT 0;
CREATE TABLE host_samples (
    node               TEXT NOT NULL,
    observed_ms        BIGINT NOT NULL,
    cpu_percent        DOUBLE PRECISION NOT NULL,
    load_1             DOUBLE PRECISION NOT NULL,
    memory_used_bytes  BIGINT NOT NULL,
    memory_total_bytes BIGINT NOT NULL,
    swap_used_bytes    BIGINT NOT NULL,
    process_count      BIGINT NOT NULL,
    PRIMARY KEY (node, observed_ms)
);
CREATE INDEX host_samples_by_time ON host_samples (observed_ms);
CREATE TABLE gpu_samples (
    node                 TEXT NOT NULL,
    gpu_uuid             TEXT NOT NULL,
    observed_ms          BIGINT NOT NULL,
    gpu_index            BIGINT NOT NULL,
    name                 TEXT NOT NULL,
    utilization_percent  BIGINT NOT NULL,
    memory_util_percent  BIGINT NOT NULL,
    memory_used_bytes    BIGINT NOT NULL,
    memory_total_bytes   BIGINT NOT NULL,
    power_milliwatts     BIGINT NOT NULL,
    temperature_celsius  BIGINT NOT NULL,
    error                TEXT NOT NULL,
    PRIMARY KEY (node, gpu_uuid, observed_ms)
);
CREATE INDEX gpu_samples_by_time ON gpu_samples (observed_ms);
CREATE TABLE gpu_usage (
    node              TEXT NOT NULL,
    observed_ms       BIGINT NOT NULL,
    gpu_uuid          TEXT NOT NULL,
    pid               BIGINT NOT NULL,
    process_name      TEXT NOT NULL,
    exe               TEXT NOT NULL,
    container_id      TEXT NOT NULL,
    gpu_seconds       DOUBLE PRECISION NOT NULL,
    used_memory_bytes BIGINT NOT NULL,
    PRIMARY KEY (node, observed_ms, gpu_uuid, pid)
);
CREATE INDEX gpu_usage_by_time ON gpu_usage (observed_ms);
"#;

/// Weight file inventory per node.
const SCHEMA_V3: &str = r#"
CREATE TABLE weight_files (
    node            TEXT NOT NULL,
    path            TEXT NOT NULL,
    format          TEXT NOT NULL,
    size_bytes      BIGINT NOT NULL,
    mtime_ms        BIGINT NOT NULL,
    device          BIGINT NOT NULL,
    inode           BIGINT NOT NULL,
    sha256          TEXT NOT NULL,
    model           TEXT NOT NULL,
    revision        TEXT NOT NULL,
    repo_path       TEXT NOT NULL,
    identity_source TEXT NOT NULL,
    publisher       TEXT NOT NULL,
    parameter_count BIGINT NOT NULL,
    mount_point     TEXT NOT NULL,
    fs_type         TEXT NOT NULL,
    network         BOOLEAN NOT NULL,
    server_address  TEXT NOT NULL,
    users           TEXT NOT NULL,
    detail          BYTEA NOT NULL,
    first_seen_ms   BIGINT NOT NULL,
    last_seen_ms    BIGINT NOT NULL,
    removed_ms      BIGINT,
    PRIMARY KEY (node, path)
);
CREATE INDEX weight_files_by_sha ON weight_files (sha256);
CREATE INDEX weight_files_by_model ON weight_files (model);
"#;

/// Flows per minute, and raw flows to destinations outside the node's country.
const SCHEMA_V4: &str = r#"
CREATE TABLE flows_minute (
    node           TEXT NOT NULL,
    minute_ms      BIGINT NOT NULL,
    pid            BIGINT NOT NULL,
    process        TEXT NOT NULL,
    protocol       TEXT NOT NULL,
    direction      TEXT NOT NULL,
    remote_address TEXT NOT NULL,
    remote_port    BIGINT NOT NULL,
    country        TEXT NOT NULL,
    asn            BIGINT NOT NULL,
    org            TEXT NOT NULL,
    geo_source     TEXT NOT NULL,
    bytes_sent     BIGINT NOT NULL,
    bytes_received BIGINT NOT NULL,
    connections    BIGINT NOT NULL,
    min_rtt_us     BIGINT NOT NULL,
    PRIMARY KEY (node, minute_ms, pid, protocol, direction, remote_address, remote_port)
);
CREATE INDEX flows_minute_by_time ON flows_minute (minute_ms);
CREATE TABLE flows_raw (
    node     TEXT NOT NULL,
    seq      BIGINT NOT NULL,
    epoch    BIGINT NOT NULL,
    idx      BIGINT NOT NULL,
    start_ms BIGINT NOT NULL,
    end_ms   BIGINT NOT NULL,
    pid      BIGINT NOT NULL,
    process  TEXT NOT NULL,
    country  TEXT NOT NULL,
    asn      BIGINT NOT NULL,
    flow     BYTEA NOT NULL,
    PRIMARY KEY (node, epoch, seq, idx)
);
CREATE INDEX flows_raw_by_time ON flows_raw (end_ms);
"#;

/// Policy breaches (current state) and their hash-chained, append-only log. At most one open
/// breach per (rule, node, subject). The triggers refuse any change to a log record. Bodies
/// and evidence are TEXT, not JSONB: the log body must stay byte for byte what was hashed.
const SCHEMA_V5: &str = r#"
CREATE TABLE breaches (
    breach_id    TEXT PRIMARY KEY,
    rule         TEXT NOT NULL,
    node         TEXT NOT NULL,
    subject      TEXT NOT NULL,
    severity     TEXT NOT NULL,
    state        TEXT NOT NULL,
    evidence     TEXT NOT NULL,
    opened_ms    BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    resolved_ms  BIGINT,
    obs_count    BIGINT NOT NULL
);
CREATE UNIQUE INDEX breaches_open_key ON breaches (rule, node, subject) WHERE state = 'open';
CREATE INDEX breaches_by_rule ON breaches (rule, state, last_seen_ms);
CREATE INDEX breaches_by_opened ON breaches (opened_ms);
CREATE TABLE breach_log (
    seq       BIGINT PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    breach_id TEXT NOT NULL,
    event     TEXT NOT NULL,
    body      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE FUNCTION breach_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'breach_log is append-only';
END
$$;
CREATE TRIGGER breach_log_no_change BEFORE UPDATE OR DELETE ON breach_log
    FOR EACH ROW EXECUTE FUNCTION breach_log_append_only();
CREATE TRIGGER breach_log_no_truncate BEFORE TRUNCATE ON breach_log
    FOR EACH STATEMENT EXECUTE FUNCTION breach_log_append_only();
"#;

/// The audit log (append-only, hash-chained) and API tokens (hashes only), as the SQLite store's V7.
const SCHEMA_V7: &str = r#"
CREATE TABLE audit_log (
    seq       BIGINT PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    call      TEXT NOT NULL,
    body      TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
CREATE TABLE api_tokens (
    token_id   TEXT PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
"#;

/// Enrollment tokens: only their sha256 hashes; a token is spent once (`used_ms` set).
const SCHEMA_V8: &str = r#"
CREATE TABLE enroll_tokens (
    hash       TEXT PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms    BIGINT,
    used_by    TEXT
);
"#;

/// Minute aggregates that raw host/GPU samples and GPU usage are folded into before they are
/// pruned (kept for `aggregate_retention_days`).
const SCHEMA_V9: &str = r#"
CREATE TABLE host_minute (
    node               TEXT NOT NULL,
    minute_ms          BIGINT NOT NULL,
    samples            BIGINT NOT NULL,
    cpu_percent_avg    DOUBLE PRECISION NOT NULL,
    cpu_percent_max    DOUBLE PRECISION NOT NULL,
    load_1_max         DOUBLE PRECISION NOT NULL,
    memory_used_avg    DOUBLE PRECISION NOT NULL,
    memory_used_max    BIGINT NOT NULL,
    memory_total_bytes BIGINT NOT NULL,
    PRIMARY KEY (node, minute_ms)
);
CREATE INDEX host_minute_by_time ON host_minute (minute_ms);
CREATE TABLE gpu_minute (
    node                 TEXT NOT NULL,
    gpu_uuid             TEXT NOT NULL,
    minute_ms            BIGINT NOT NULL,
    samples              BIGINT NOT NULL,
    utilization_avg      DOUBLE PRECISION NOT NULL,
    utilization_max      BIGINT NOT NULL,
    memory_used_max      BIGINT NOT NULL,
    memory_total_bytes   BIGINT NOT NULL,
    power_avg_milliwatts DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (node, gpu_uuid, minute_ms)
);
CREATE INDEX gpu_minute_by_time ON gpu_minute (minute_ms);
CREATE TABLE gpu_usage_minute (
    node            TEXT NOT NULL,
    minute_ms       BIGINT NOT NULL,
    gpu_uuid        TEXT NOT NULL,
    pid             BIGINT NOT NULL,
    process_name    TEXT NOT NULL,
    gpu_seconds     DOUBLE PRECISION NOT NULL,
    used_memory_max BIGINT NOT NULL,
    PRIMARY KEY (node, minute_ms, gpu_uuid, pid)
);
CREATE INDEX gpu_usage_minute_by_time ON gpu_usage_minute (minute_ms);
"#;

/// First key of the advisory lock a pruning transaction tries to take ("rete"), the second
/// being the hash of the schema: one replica of a deployment prunes at a time, the others skip.
const RETENTION_LOCK_KEY: i32 = 0x7265_7465;

/// Fold raw rows observed before `$1` into the minute aggregates (merging with rows an earlier
/// pass or a late report already made).
const DOWNSAMPLE: [&str; 3] = [
    "INSERT INTO host_minute AS m (node, minute_ms, samples, cpu_percent_avg, cpu_percent_max, load_1_max,
                                   memory_used_avg, memory_used_max, memory_total_bytes)
     SELECT node, observed_ms - (observed_ms % 60000), COUNT(*), AVG(cpu_percent), MAX(cpu_percent),
            MAX(load_1), AVG(memory_used_bytes)::DOUBLE PRECISION, MAX(memory_used_bytes), MAX(memory_total_bytes)
     FROM host_samples WHERE observed_ms < $1 GROUP BY 1, 2
     ON CONFLICT (node, minute_ms) DO UPDATE SET
        cpu_percent_avg = (m.cpu_percent_avg * m.samples + EXCLUDED.cpu_percent_avg * EXCLUDED.samples)
                          / (m.samples + EXCLUDED.samples),
        memory_used_avg = (m.memory_used_avg * m.samples + EXCLUDED.memory_used_avg * EXCLUDED.samples)
                          / (m.samples + EXCLUDED.samples),
        samples = m.samples + EXCLUDED.samples,
        cpu_percent_max = GREATEST(m.cpu_percent_max, EXCLUDED.cpu_percent_max),
        load_1_max = GREATEST(m.load_1_max, EXCLUDED.load_1_max),
        memory_used_max = GREATEST(m.memory_used_max, EXCLUDED.memory_used_max),
        memory_total_bytes = GREATEST(m.memory_total_bytes, EXCLUDED.memory_total_bytes)",
    "INSERT INTO gpu_minute AS m (node, gpu_uuid, minute_ms, samples, utilization_avg, utilization_max,
                                  memory_used_max, memory_total_bytes, power_avg_milliwatts)
     SELECT node, gpu_uuid, observed_ms - (observed_ms % 60000), COUNT(*),
            AVG(utilization_percent)::DOUBLE PRECISION, MAX(utilization_percent), MAX(memory_used_bytes),
            MAX(memory_total_bytes), AVG(power_milliwatts)::DOUBLE PRECISION
     FROM gpu_samples WHERE observed_ms < $1 GROUP BY 1, 2, 3
     ON CONFLICT (node, gpu_uuid, minute_ms) DO UPDATE SET
        utilization_avg = (m.utilization_avg * m.samples + EXCLUDED.utilization_avg * EXCLUDED.samples)
                          / (m.samples + EXCLUDED.samples),
        power_avg_milliwatts = (m.power_avg_milliwatts * m.samples + EXCLUDED.power_avg_milliwatts * EXCLUDED.samples)
                               / (m.samples + EXCLUDED.samples),
        samples = m.samples + EXCLUDED.samples,
        utilization_max = GREATEST(m.utilization_max, EXCLUDED.utilization_max),
        memory_used_max = GREATEST(m.memory_used_max, EXCLUDED.memory_used_max),
        memory_total_bytes = GREATEST(m.memory_total_bytes, EXCLUDED.memory_total_bytes)",
    "INSERT INTO gpu_usage_minute AS m (node, minute_ms, gpu_uuid, pid, process_name, gpu_seconds, used_memory_max)
     SELECT node, observed_ms - (observed_ms % 60000), gpu_uuid, pid, MAX(process_name), SUM(gpu_seconds),
            MAX(used_memory_bytes)
     FROM gpu_usage WHERE observed_ms < $1 GROUP BY 1, 2, 3, 4
     ON CONFLICT (node, minute_ms, gpu_uuid, pid) DO UPDATE SET
        gpu_seconds = m.gpu_seconds + EXCLUDED.gpu_seconds,
        used_memory_max = GREATEST(m.used_memory_max, EXCLUDED.used_memory_max),
        process_name = CASE WHEN EXCLUDED.process_name <> '' THEN EXCLUDED.process_name ELSE m.process_name END",
];

const BREACH_COLUMNS: &str = "breach_id, rule, node, subject, severity, state, evidence, opened_ms, \
     last_seen_ms, resolved_ms, obs_count";

const INSERT_REPORT: &str = "INSERT INTO reports (node, epoch, seq, observed_ms, received_ms, body)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (node, epoch, seq) DO NOTHING";

const READ_DUPLICATE: &str =
    "SELECT observed_ms FROM reports WHERE node = $1 AND epoch = $2 AND seq = $3";

const COUNT_CONFLICT: &str =
    "UPDATE node_epochs SET conflicts = conflicts + 1 WHERE node = $1 AND epoch = $2";

const UPSERT_EPOCH: &str =
    "INSERT INTO node_epochs (node, epoch, reports, last_seq, first_seen_ms, last_seen_ms)
     VALUES ($1, $2, 1, $3, $4, $4)
     ON CONFLICT (node, epoch) DO UPDATE SET
        reports = node_epochs.reports + 1,
        last_seq = GREATEST(node_epochs.last_seq, EXCLUDED.last_seq),
        last_seen_ms = GREATEST(node_epochs.last_seen_ms, EXCLUDED.last_seen_ms)";

const UPSERT_NODE: &str = "INSERT INTO nodes (node, site, country, hostname, agent_version, labels, first_seen_ms,
                        last_seen_ms, last_observed_ms, latest_epoch, cpu_percent,
                        memory_used_bytes, memory_total_bytes)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10, $11, $12)
     ON CONFLICT (node) DO UPDATE SET
        last_seen_ms = GREATEST(nodes.last_seen_ms, EXCLUDED.last_seen_ms),
        latest_epoch = GREATEST(nodes.latest_epoch, EXCLUDED.latest_epoch),
        site = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                    THEN EXCLUDED.site ELSE nodes.site END,
        country = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                       THEN EXCLUDED.country ELSE nodes.country END,
        hostname = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                        THEN EXCLUDED.hostname ELSE nodes.hostname END,
        agent_version = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                             THEN EXCLUDED.agent_version ELSE nodes.agent_version END,
        labels = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                      THEN EXCLUDED.labels ELSE nodes.labels END,
        cpu_percent = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                           THEN EXCLUDED.cpu_percent ELSE nodes.cpu_percent END,
        memory_used_bytes = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                                 THEN EXCLUDED.memory_used_bytes ELSE nodes.memory_used_bytes END,
        memory_total_bytes = CASE WHEN EXCLUDED.last_observed_ms >= nodes.last_observed_ms
                                  THEN EXCLUDED.memory_total_bytes ELSE nodes.memory_total_bytes END,
        last_observed_ms = GREATEST(nodes.last_observed_ms, EXCLUDED.last_observed_ms)";

const INSERT_GAP: &str =
    "INSERT INTO gaps (node, epoch, first_seq, last_seq, reason, dropped_ms, received_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT (node, epoch, first_seq, last_seq) DO NOTHING";

const UPSERT_HOST_SAMPLE: &str = "INSERT INTO host_samples (node, observed_ms, cpu_percent, load_1, memory_used_bytes,
                          memory_total_bytes, swap_used_bytes, process_count)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
     ON CONFLICT (node, observed_ms) DO UPDATE SET
        cpu_percent = EXCLUDED.cpu_percent, load_1 = EXCLUDED.load_1,
        memory_used_bytes = EXCLUDED.memory_used_bytes, memory_total_bytes = EXCLUDED.memory_total_bytes,
        swap_used_bytes = EXCLUDED.swap_used_bytes, process_count = EXCLUDED.process_count";

const UPSERT_GPU_SAMPLE: &str = "INSERT INTO gpu_samples (node, gpu_uuid, observed_ms, gpu_index, name, utilization_percent,
         memory_util_percent, memory_used_bytes, memory_total_bytes, power_milliwatts, temperature_celsius, error)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
     ON CONFLICT (node, gpu_uuid, observed_ms) DO UPDATE SET
        gpu_index = EXCLUDED.gpu_index, name = EXCLUDED.name,
        utilization_percent = EXCLUDED.utilization_percent, memory_util_percent = EXCLUDED.memory_util_percent,
        memory_used_bytes = EXCLUDED.memory_used_bytes, memory_total_bytes = EXCLUDED.memory_total_bytes,
        power_milliwatts = EXCLUDED.power_milliwatts, temperature_celsius = EXCLUDED.temperature_celsius,
        error = EXCLUDED.error";

const UPSERT_GPU_USAGE: &str = "INSERT INTO gpu_usage (node, observed_ms, gpu_uuid, pid, process_name, exe, container_id,
                       gpu_seconds, used_memory_bytes)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
     ON CONFLICT (node, observed_ms, gpu_uuid, pid) DO UPDATE SET
        process_name = EXCLUDED.process_name, exe = EXCLUDED.exe, container_id = EXCLUDED.container_id,
        gpu_seconds = EXCLUDED.gpu_seconds, used_memory_bytes = EXCLUDED.used_memory_bytes";

const UPDATE_NODE_GPUS: &str =
    "UPDATE nodes SET gpu_state = $2, gpu_count = $3, gpu_util_percent = $4,
                      gpu_memory_used_bytes = $5, gpu_memory_total_bytes = $6
     WHERE node = $1 AND last_observed_ms = $7";

/// Every flow aggregate of one report in one statement: `$1` the node, then one array per
/// column (the caller merges rows with the same key first: one statement may not update a row
/// twice).
const AGGREGATE_FLOWS: &str = "INSERT INTO flows_minute (node, minute_ms, pid, process, protocol, direction, remote_address,
         remote_port, country, asn, org, geo_source, bytes_sent, bytes_received, connections, min_rtt_us)
     SELECT $1, * FROM unnest($2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[],
                              $8::BIGINT[], $9::TEXT[], $10::BIGINT[], $11::TEXT[], $12::TEXT[], $13::BIGINT[],
                              $14::BIGINT[], $15::BIGINT[], $16::BIGINT[])
     ON CONFLICT (node, minute_ms, pid, protocol, direction, remote_address, remote_port) DO UPDATE SET
        bytes_sent = flows_minute.bytes_sent + EXCLUDED.bytes_sent,
        bytes_received = flows_minute.bytes_received + EXCLUDED.bytes_received,
        connections = flows_minute.connections + EXCLUDED.connections,
        min_rtt_us = CASE WHEN flows_minute.min_rtt_us = 0 THEN EXCLUDED.min_rtt_us
                          WHEN EXCLUDED.min_rtt_us = 0 THEN flows_minute.min_rtt_us
                          ELSE LEAST(flows_minute.min_rtt_us, EXCLUDED.min_rtt_us) END,
        process = CASE WHEN EXCLUDED.process <> '' THEN EXCLUDED.process ELSE flows_minute.process END";

/// Every raw flow of one report in one statement: node, seq, epoch, then one array per column.
const KEEP_RAW_FLOWS: &str = "INSERT INTO flows_raw (node, seq, epoch, idx, start_ms, end_ms, pid, process, country, asn, flow)
     SELECT $1, $2, $3, * FROM unnest($4::BIGINT[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::TEXT[],
                                      $9::TEXT[], $10::BIGINT[], $11::BYTEA[])
     ON CONFLICT (node, epoch, seq, idx) DO NOTHING";

const UPSERT_WEIGHT: &str = "INSERT INTO weight_files (node, path, format, size_bytes, mtime_ms, device, inode, sha256, model,
         revision, repo_path, identity_source, publisher, parameter_count, mount_point, fs_type, network,
         server_address, users, detail, first_seen_ms, last_seen_ms, removed_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
             $21, $21, NULL)
     ON CONFLICT (node, path) DO UPDATE SET
        format = EXCLUDED.format, size_bytes = EXCLUDED.size_bytes, mtime_ms = EXCLUDED.mtime_ms,
        device = EXCLUDED.device, inode = EXCLUDED.inode,
        sha256 = CASE WHEN EXCLUDED.sha256 = '' AND weight_files.size_bytes = EXCLUDED.size_bytes
                           AND weight_files.mtime_ms = EXCLUDED.mtime_ms
                      THEN weight_files.sha256 ELSE EXCLUDED.sha256 END,
        model = EXCLUDED.model, revision = EXCLUDED.revision, repo_path = EXCLUDED.repo_path,
        identity_source = EXCLUDED.identity_source, publisher = EXCLUDED.publisher,
        parameter_count = EXCLUDED.parameter_count, mount_point = EXCLUDED.mount_point,
        fs_type = EXCLUDED.fs_type, network = EXCLUDED.network, server_address = EXCLUDED.server_address,
        users = EXCLUDED.users, detail = EXCLUDED.detail, last_seen_ms = EXCLUDED.last_seen_ms,
        first_seen_ms = CASE WHEN weight_files.removed_ms IS NULL THEN weight_files.first_seen_ms
                             ELSE EXCLUDED.first_seen_ms END,
        removed_ms = NULL";

const REMOVE_WEIGHT: &str = "UPDATE weight_files SET removed_ms = $3
     WHERE node = $1 AND path = $2 AND removed_ms IS NULL";

const REMOVE_UNLISTED_WEIGHTS: &str = "UPDATE weight_files SET removed_ms = $2
     WHERE node = $1 AND removed_ms IS NULL AND last_seen_ms < $2";

const LIST_NODES: &str = r#"SELECT n.node, n.site, n.country, n.hostname, n.agent_version, n.labels,
        n.last_seen_ms, n.latest_epoch, COALESCE(e.reports, 0), COALESCE(e.last_seq, 0),
        (SELECT COUNT(*) FROM node_epochs x WHERE x.node = n.node),
        n.cpu_percent, n.memory_used_bytes, n.memory_total_bytes, COALESCE(e.conflicts, 0),
        (SELECT COALESCE(SUM(g.last_seq - g.first_seq + 1
            - (SELECT COUNT(*) FROM reports r WHERE r.node = g.node AND r.epoch = g.epoch
                 AND r.seq BETWEEN g.first_seq AND g.last_seq)), 0)::BIGINT
         FROM gaps g WHERE g.node = n.node AND g.epoch = n.latest_epoch),
        n.gpu_state, n.gpu_count, n.gpu_util_percent, n.gpu_memory_used_bytes,
        n.gpu_memory_total_bytes
 FROM nodes n
 LEFT JOIN node_epochs e ON e.node = n.node AND e.epoch = n.latest_epoch
 WHERE n.node COLLATE "C" > $1::TEXT
 ORDER BY n.node COLLATE "C"
 LIMIT $2::BIGINT"#;

/// Keys compare byte-wise (`COLLATE "C"`), as in SQLite, whatever the database's collation.
/// Only the page's keys are fetched: at most `limit` models, with all their copies.
const LIST_MODELS: &str = r#"WITH current AS (
    SELECT w.node, w.path, w.format, w.size_bytes, w.sha256, w.model, w.revision, w.repo_path,
           w.identity_source, w.publisher, w.parameter_count, w.mount_point, w.fs_type, w.network,
           w.server_address, w.users, w.first_seen_ms, w.last_seen_ms,
           COALESCE(n.site, '') AS site, COALESCE(n.country, '') AS country,
           (CASE WHEN w.sha256 <> '' THEN w.model || '|' || w.sha256
                 ELSE w.model || '|~' || w.node || ':' || w.path END) COLLATE "C" AS k
    FROM weight_files w LEFT JOIN nodes n ON n.node = w.node
    WHERE w.removed_ms IS NULL
), hits AS (
    SELECT * FROM current
    WHERE k > $1::TEXT
      AND ($2::TEXT = ''
           OR ($3::BOOLEAN AND sha256 = lower($2::TEXT))
           OR (NOT $3::BOOLEAN AND strpos(lower(model), lower($2::TEXT)) > 0))
), page AS (
    SELECT DISTINCT k FROM hits ORDER BY k LIMIT $4::BIGINT
)
SELECT k, node, path, format, size_bytes, sha256, model, revision, repo_path, identity_source,
       publisher, parameter_count, mount_point, fs_type, network, server_address, users,
       first_seen_ms, last_seen_ms, site, country
FROM hits
WHERE k IN (SELECT k FROM page)
ORDER BY k, node COLLATE "C", path COLLATE "C""#;

/// PostgreSQL-backed [`Store`]. Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    schema: Option<String>,
    writer: Mutex<Option<Writer>>,
    reader: Mutex<Option<Arc<Client>>>,
    /// Reports waiting for the writer (group commit).
    pending: std::sync::Mutex<super::Pending>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Config's Debug leaves the password out.
        f.debug_struct("PostgresStore")
            .field("config", &self.inner.config)
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

/// The alert outbox, leases and node peer addresses (as the SQLite store's V6).
const SCHEMA_V6: &str = r#"
CREATE TABLE alert_outbox (
    sink            TEXT NOT NULL,
    log_seq         BIGINT NOT NULL,
    breach_id       TEXT NOT NULL,
    event           TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        BIGINT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    last_error      TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    settled_ms      BIGINT,
    PRIMARY KEY (sink, log_seq)
);
CREATE INDEX alert_outbox_pending ON alert_outbox (sink, state, log_seq);
CREATE TABLE alert_cursor (
    sink      TEXT PRIMARY KEY,
    after_seq BIGINT NOT NULL
);
CREATE TABLE leases (
    name     TEXT PRIMARY KEY,
    holder   TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
CREATE TABLE node_peers (
    node    TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    country TEXT NOT NULL,
    asn     BIGINT NOT NULL,
    source  TEXT NOT NULL,
    seen_ms BIGINT NOT NULL
);
"#;

/// The writer connection and its prepared ingest statements.
struct Writer {
    client: Client,
    st: Statements,
}

/// Statements prepared once per writer connection (ingest is the hot path).
struct Statements {
    insert_report: Statement,
    read_duplicate: Statement,
    count_conflict: Statement,
    upsert_epoch: Statement,
    upsert_node: Statement,
    insert_gap: Statement,
    upsert_host_sample: Statement,
    upsert_gpu_sample: Statement,
    upsert_gpu_usage: Statement,
    update_node_gpus: Statement,
    aggregate_flows: Statement,
    keep_raw_flows: Statement,
    upsert_weight: Statement,
    remove_weight: Statement,
    remove_unlisted_weights: Statement,
}

impl Statements {
    async fn prepare(c: &Client) -> Result<Self, StoreError> {
        let p = |text: &'static str| async move {
            c.prepare(text).await.map_err(pg("prepare statement"))
        };
        Ok(Self {
            insert_report: p(INSERT_REPORT).await?,
            read_duplicate: p(READ_DUPLICATE).await?,
            count_conflict: p(COUNT_CONFLICT).await?,
            upsert_epoch: p(UPSERT_EPOCH).await?,
            upsert_node: p(UPSERT_NODE).await?,
            insert_gap: p(INSERT_GAP).await?,
            upsert_host_sample: p(UPSERT_HOST_SAMPLE).await?,
            upsert_gpu_sample: p(UPSERT_GPU_SAMPLE).await?,
            upsert_gpu_usage: p(UPSERT_GPU_USAGE).await?,
            update_node_gpus: p(UPDATE_NODE_GPUS).await?,
            aggregate_flows: p(AGGREGATE_FLOWS).await?,
            keep_raw_flows: p(KEEP_RAW_FLOWS).await?,
            upsert_weight: p(UPSERT_WEIGHT).await?,
            remove_weight: p(REMOVE_WEIGHT).await?,
            remove_unlisted_weights: p(REMOVE_UNLISTED_WEIGHTS).await?,
        })
    }
}

fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Postgres { context, source }
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize, context: &'static str) -> Result<T, StoreError> {
    row.try_get(i).map_err(pg(context))
}

/// A counter read back; never negative in a database this code wrote: clamp rather than fail.
fn get_u64(row: &Row, i: usize, context: &'static str) -> Result<u64, StoreError> {
    Ok(u64::try_from(get::<i64>(row, i, context)?).unwrap_or(0))
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `url` with any password replaced by `***`, for messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                url.to_owned()
            }
        }
        None => url.to_owned(),
    }
}

/// Whether a transaction failed only because it lost a race with another one.
fn retryable(err: &StoreError) -> bool {
    matches!(err, StoreError::Postgres { source, .. }
    if source.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    }))
}

/// Open one connection, run its driver task, and set its session (schema, read only).
async fn open_connection(
    config: &Config,
    schema: Option<&str>,
    read_only: bool,
) -> Result<Client, StoreError> {
    let (client, connection) = config.connect(NoTls).await.map_err(pg("connect"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(error = %error, "postgres connection ended");
        }
    });
    let mut session = String::new();
    if let Some(schema) = schema {
        session.push_str(&format!("SET search_path TO {};", quote_ident(schema)));
    }
    if read_only {
        session.push_str("SET default_transaction_read_only = on;");
    }
    if !session.is_empty() {
        client
            .batch_execute(&session)
            .await
            .map_err(pg("set session"))?;
    }
    Ok(client)
}

/// Bring the schema up to date: one transaction under an advisory lock, so that replicas
/// starting together migrate once and the others find the work done.
async fn migrate(client: &mut Client, schema: Option<&str>) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg("begin migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(pg("lock for migration"))?;
    if let Some(schema) = schema {
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ))
        .await
        .map_err(pg("create schema"))?;
    }
    tx.batch_execute("CREATE TABLE IF NOT EXISTS sov_schema_version (version BIGINT NOT NULL)")
        .await
        .map_err(pg("create schema version table"))?;
    let found: Option<i64> = tx
        .query_one("SELECT MAX(version) FROM sov_schema_version", &[])
        .await
        .map_err(pg("read schema version"))?
        .try_get(0)
        .map_err(pg("read schema version"))?;
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        // Nothing to do; the transaction only held the lock.
        return tx.commit().await.map_err(pg("commit migration"));
    }
    for step in MIGRATIONS.iter().skip(usize::try_from(found).unwrap_or(0)) {
        tx.batch_execute(step).await.map_err(pg("migrate schema"))?;
    }
    tx.execute("DELETE FROM sov_schema_version", &[])
        .await
        .map_err(pg("write schema version"))?;
    tx.execute(
        "INSERT INTO sov_schema_version (version) VALUES ($1)",
        &[&SCHEMA_VERSION],
    )
    .await
    .map_err(pg("write schema version"))?;
    tx.commit().await.map_err(pg("commit migration"))?;
    tracing::info!(
        from = found,
        version = SCHEMA_VERSION,
        "database schema migrated"
    );
    Ok(())
}

type Tx<'a> = tokio_postgres::Transaction<'a>;

/// The report's time series rows, and the node's latest GPU columns when this report is the
/// node's newest.
async fn insert_telemetry(
    tx: &Tx<'_>,
    st: &Statements,
    r: &IncomingReport,
) -> Result<(), StoreError> {
    let t = &r.telemetry;
    let at = r.observed_unix_ms;
    if let Some(h) = &t.host {
        tx.execute(
            &st.upsert_host_sample,
            &[
                &r.node,
                &at,
                &f64::from(h.cpu_percent),
                &h.load_1,
                &to_i64(h.memory_used_bytes, "memory_used_bytes")?,
                &to_i64(h.memory_total_bytes, "memory_total_bytes")?,
                &to_i64(h.swap_used_bytes, "swap_used_bytes")?,
                &i64::from(h.process_count),
            ],
        )
        .await
        .map_err(pg("insert host sample"))?;
    }
    let names: std::collections::HashMap<u32, &sov_proto::pb::ProcessInfo> =
        t.processes.iter().map(|p| (p.pid, p)).collect();
    for g in &t.gpus {
        let uuid = if g.uuid.is_empty() {
            format!("index-{}", g.index)
        } else {
            g.uuid.clone()
        };
        tx.execute(
            &st.upsert_gpu_sample,
            &[
                &r.node,
                &uuid,
                &at,
                &i64::from(g.index),
                &g.name,
                &i64::from(g.utilization_gpu_percent),
                &i64::from(g.utilization_memory_percent),
                &to_i64(g.memory_used_bytes, "gpu memory_used_bytes")?,
                &to_i64(g.memory_total_bytes, "gpu memory_total_bytes")?,
                &i64::from(g.power_draw_milliwatts),
                &i64::from(g.temperature_celsius),
                &g.error,
            ],
        )
        .await
        .map_err(pg("insert gpu sample"))?;
        for p in &g.processes {
            let info = names.get(&p.pid);
            tx.execute(
                &st.upsert_gpu_usage,
                &[
                    &r.node,
                    &at,
                    &uuid,
                    &i64::from(p.pid),
                    &info.map(|i| i.name.as_str()).unwrap_or(""),
                    &info.map(|i| i.exe.as_str()).unwrap_or(""),
                    &info.map(|i| i.container_id.as_str()).unwrap_or(""),
                    &p.gpu_seconds,
                    &to_i64(p.used_memory_bytes, "gpu process memory")?,
                ],
            )
            .await
            .map_err(pg("insert gpu usage"))?;
        }
    }
    let GpuSummary {
        state: gpu_state,
        count,
        util,
        mem_used,
        mem_total,
    } = GpuSummary::of(t);
    tx.execute(
        &st.update_node_gpus,
        &[
            &r.node,
            &gpu_state,
            &i64::try_from(count).unwrap_or(i64::MAX),
            &util,
            &to_i64(mem_used, "gpu memory used")?,
            &to_i64(mem_total, "gpu memory total")?,
            &at,
        ],
    )
    .await
    .map_err(pg("update node gpus"))?;
    Ok(())
}

/// One row of `flows_minute` being built: the key, then what is summed.
type FlowKey<'a> = (i64, i64, &'static str, &'static str, &'a str, i64);

#[derive(Default)]
struct FlowSums<'a> {
    process: &'a str,
    country: &'a str,
    asn: i64,
    org: &'a str,
    geo_source: &'a str,
    bytes_sent: i64,
    bytes_received: i64,
    connections: i64,
    min_rtt_us: i64,
}

/// Add the report's flows to the per-minute aggregates and keep foreign ones raw too: two
/// statements per report however many flows it carries (one round trip each).
async fn apply_flows(
    tx: &Tx<'_>,
    st: &Statements,
    r: &IncomingReport,
    epoch: i64,
    seq: i64,
) -> Result<(), StoreError> {
    if r.telemetry.flows.is_empty() {
        return Ok(());
    }
    // Rows with the same key are merged here the way the upsert merges them with a stored row.
    let mut sums: std::collections::BTreeMap<FlowKey<'_>, FlowSums<'_>> = Default::default();
    let mut raw_idx = Vec::new();
    let mut raw_start = Vec::new();
    let mut raw_end = Vec::new();
    let mut raw_pid = Vec::new();
    let mut raw_process = Vec::new();
    let mut raw_country = Vec::new();
    let mut raw_asn = Vec::new();
    let mut raw_flow = Vec::new();
    for (idx, f) in r.telemetry.flows.iter().enumerate() {
        let fl = &f.flow;
        let end = if fl.end_unix_ms > 0 {
            fl.end_unix_ms
        } else {
            r.observed_unix_ms
        };
        let minute = end - end.rem_euclid(60_000);
        let key = (
            minute,
            i64::from(fl.pid),
            protocol_name(fl.protocol),
            direction_name(fl.direction),
            fl.remote_address.as_str(),
            i64::from(fl.remote_port),
        );
        // The first row's place wins, as the upsert keeps the stored row's.
        let e = sums.entry(key).or_insert_with(|| FlowSums {
            country: &f.country,
            asn: i64::from(f.asn),
            org: &f.org,
            geo_source: &f.geo_source,
            ..Default::default()
        });
        if !f.process.is_empty() {
            e.process = &f.process;
        }
        e.bytes_sent = e
            .bytes_sent
            .saturating_add(to_i64(fl.bytes_sent, "bytes_sent")?);
        e.bytes_received = e
            .bytes_received
            .saturating_add(to_i64(fl.bytes_received, "bytes_received")?);
        e.connections = e.connections.saturating_add(i64::from(fl.connections));
        let rtt = i64::from(fl.min_rtt_us);
        e.min_rtt_us = match (e.min_rtt_us, rtt) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        };
        // Raw detail only for destinations outside the node's declared country (the policy
        // refines "outside" with the jurisdiction's inside countries).
        if f.country != r.country {
            raw_idx.push(i64::try_from(idx).unwrap_or(i64::MAX));
            raw_start.push(fl.start_unix_ms);
            raw_end.push(end);
            raw_pid.push(i64::from(fl.pid));
            raw_process.push(f.process.as_str());
            raw_country.push(f.country.as_str());
            raw_asn.push(i64::from(f.asn));
            raw_flow.push(prost::Message::encode_to_vec(fl));
        }
    }
    let n = sums.len();
    let (mut minute, mut pid, mut process, mut protocol, mut direction, mut remote, mut port) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut country, mut asn, mut org, mut geo, mut sent, mut received, mut conns, mut rtt) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((m, p, proto, dir, addr, rport), v) in &sums {
        minute.push(*m);
        pid.push(*p);
        process.push(v.process);
        protocol.push(*proto);
        direction.push(*dir);
        remote.push(*addr);
        port.push(*rport);
        country.push(v.country);
        asn.push(v.asn);
        org.push(v.org);
        geo.push(v.geo_source);
        sent.push(v.bytes_sent);
        received.push(v.bytes_received);
        conns.push(v.connections);
        rtt.push(v.min_rtt_us);
    }
    tx.execute(
        &st.aggregate_flows,
        &[
            &r.node, &minute, &pid, &process, &protocol, &direction, &remote, &port, &country,
            &asn, &org, &geo, &sent, &received, &conns, &rtt,
        ],
    )
    .await
    .map_err(pg("aggregate flows"))?;
    if !raw_idx.is_empty() {
        tx.execute(
            &st.keep_raw_flows,
            &[
                &r.node,
                &seq,
                &epoch,
                &raw_idx,
                &raw_start,
                &raw_end,
                &raw_pid,
                &raw_process,
                &raw_country,
                &raw_asn,
                &raw_flow,
            ],
        )
        .await
        .map_err(pg("keep raw flows"))?;
    }
    Ok(())
}

/// Apply a report's weight inventory: upsert what it carries, mark what went away.
async fn apply_weights(tx: &Tx<'_>, st: &Statements, r: &IncomingReport) -> Result<(), StoreError> {
    let w = &r.telemetry.weights;
    if !w.full && w.files.is_empty() && w.removed.is_empty() {
        return Ok(());
    }
    let at = r.received_unix_ms;
    for f in &w.files {
        let id = f.identity.clone().unwrap_or_default();
        let storage = f.storage.clone().unwrap_or_default();
        let users: Vec<serde_json::Value> = f
            .users
            .iter()
            .map(|u| serde_json::json!({"pid": u.pid, "process": u.process, "gpus": u.gpu_uuids, "mapped": u.mapped, "open": u.open}))
            .collect();
        // Device and inode numbers are identifiers: keep their bits (as SQLite does).
        #[allow(clippy::cast_possible_wrap)]
        let (device, inode) = (f.device as i64, f.inode as i64);
        tx.execute(
            &st.upsert_weight,
            &[
                &r.node,
                &f.path,
                &format_name(f.format),
                &to_i64(f.size_bytes, "weight size")?,
                &f.mtime_unix_ms,
                &device,
                &inode,
                &f.sha256,
                &id.model,
                &id.revision,
                &id.repo_path,
                &id.source,
                &id.publisher,
                &to_i64(f.parameter_count, "parameter_count")?,
                &storage.mount_point,
                &storage.fs_type,
                &storage.network,
                &storage.server_address,
                &serde_json::Value::Array(users).to_string(),
                &prost::Message::encode_to_vec(f),
                &at,
            ],
        )
        .await
        .map_err(pg("upsert weight file"))?;
    }
    for path in &w.removed {
        tx.execute(&st.remove_weight, &[&r.node, path, &at])
            .await
            .map_err(pg("mark weight file removed"))?;
    }
    if w.full {
        tx.execute(&st.remove_unlisted_weights, &[&r.node, &at])
            .await
            .map_err(pg("mark unlisted weight files removed"))?;
    }
    Ok(())
}

/// One report in its own transaction, retried when it loses a race with another replica.
async fn ingest_with_retries(
    w: &mut Writer,
    report: &IncomingReport,
) -> Result<IngestOutcome, StoreError> {
    let mut attempt = 1;
    loop {
        match ingest_once(w, report).await {
            Err(e) if attempt < INGEST_ATTEMPTS && retryable(&e) => {
                tracing::debug!(node = %report.node, attempt, error = %e, "ingest lost a race; retrying");
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// One ingest transaction.
async fn ingest_once(w: &mut Writer, r: &IncomingReport) -> Result<IngestOutcome, StoreError> {
    let Writer { client, st } = w;
    let tx = client.transaction().await.map_err(pg("begin"))?;
    let outcome = apply_report(&tx, st, r).await?;
    tx.commit().await.map_err(pg("commit"))?;
    Ok(outcome)
}

/// Several reports in one transaction (one commit). Sorted by key first, so that replicas
/// committing batches take row locks in the same order (no deadlock between them) and a key
/// queued twice is stored once, then seen as a duplicate.
async fn ingest_batch_once(
    w: &mut Writer,
    reports: &[&IncomingReport],
) -> Result<Vec<IngestOutcome>, StoreError> {
    let mut order: Vec<usize> = (0..reports.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (reports[a], reports[b]);
        (&x.node, x.epoch, x.seq).cmp(&(&y.node, y.epoch, y.seq))
    });
    let Writer { client, st } = w;
    let tx = client.transaction().await.map_err(pg("begin batch"))?;
    // The statements of all reports are pipelined on the connection (tokio-postgres sends a
    // request when its future is first polled, and the server runs them in that order):
    // first every report's key, in key order; then the rest of each report, the reports'
    // statements interleaved. A batch is then a few round trips rather than several per report.
    let inserted =
        futures::future::try_join_all(order.iter().map(|&i| insert_report(&tx, st, reports[i])))
            .await?;
    let finished = futures::future::try_join_all(
        order
            .iter()
            .zip(inserted)
            .map(|(&i, n)| finish_report(&tx, st, reports[i], n)),
    )
    .await?;
    tx.commit().await.map_err(pg("commit batch"))?;
    let mut outcomes = vec![IngestOutcome::Duplicate; reports.len()];
    for (&i, outcome) in order.iter().zip(finished) {
        outcomes[i] = outcome;
    }
    Ok(outcomes)
}

/// One report's statements inside `tx` (not committed here).
async fn apply_report(
    tx: &Tx<'_>,
    st: &Statements,
    r: &IncomingReport,
) -> Result<IngestOutcome, StoreError> {
    let inserted = insert_report(tx, st, r).await?;
    finish_report(tx, st, r, inserted).await
}

/// Insert the report's key and body; 0 when the key was already stored. Another replica
/// inserting the same key makes this wait for its commit, then insert nothing: exactly one of
/// them stores the report.
async fn insert_report(
    tx: &Tx<'_>,
    st: &Statements,
    r: &IncomingReport,
) -> Result<u64, StoreError> {
    let epoch = to_i64(r.epoch, "epoch")?;
    let seq = to_i64(r.seq, "seq")?;
    tx.execute(
        &st.insert_report,
        &[
            &r.node,
            &epoch,
            &seq,
            &r.observed_unix_ms,
            &r.received_unix_ms,
            &r.body,
        ],
    )
    .await
    .map_err(pg("insert report"))
}

/// The rest of a report after [`insert_report`] inserted `inserted` rows: a duplicate or a
/// conflict when 0, else its counters, node facts, gaps, telemetry, weights and flows.
async fn finish_report(
    tx: &Tx<'_>,
    st: &Statements,
    r: &IncomingReport,
    inserted: u64,
) -> Result<IngestOutcome, StoreError> {
    let epoch = to_i64(r.epoch, "epoch")?;
    let seq = to_i64(r.seq, "seq")?;
    if inserted == 0 {
        // Already stored. A re-send carries the same observation time; a different one
        // means the agent reused a sequence number (a lost spool state): count it so that
        // it is visible, and keep the first report.
        let stored_ms: i64 = get(
            &tx.query_one(&st.read_duplicate, &[&r.node, &epoch, &seq])
                .await
                .map_err(pg("read duplicate"))?,
            0,
            "read duplicate",
        )?;
        if stored_ms != r.observed_unix_ms {
            tracing::error!(node = %r.node, epoch = r.epoch, seq = r.seq, "sequence number reused for a different report");
            tx.execute(&st.count_conflict, &[&r.node, &epoch])
                .await
                .map_err(pg("count conflict"))?;
            return Ok(IngestOutcome::Conflict);
        }
        return Ok(IngestOutcome::Duplicate);
    }
    tx.execute(
        &st.upsert_epoch,
        &[&r.node, &epoch, &seq, &r.received_unix_ms],
    )
    .await
    .map_err(pg("update epoch counters"))?;
    let labels = serde_json::to_string(&r.labels).unwrap_or_else(|_| "{}".to_owned());
    tx.execute(
        &st.upsert_node,
        &[
            &r.node,
            &r.site,
            &r.country,
            &r.hostname,
            &r.agent_version,
            &labels,
            &r.received_unix_ms,
            &r.observed_unix_ms,
            &epoch,
            &f64::from(r.cpu_percent),
            &to_i64(r.memory_used_bytes, "memory_used_bytes")?,
            &to_i64(r.memory_total_bytes, "memory_total_bytes")?,
        ],
    )
    .await
    .map_err(pg("update node"))?;
    for g in &r.gaps {
        tx.execute(
            &st.insert_gap,
            &[
                &r.node,
                &epoch,
                &to_i64(g.first_seq, "gap first_seq")?,
                &to_i64(g.last_seq, "gap last_seq")?,
                &g.reason,
                &g.dropped_unix_ms,
                &r.received_unix_ms,
            ],
        )
        .await
        .map_err(pg("insert gap"))?;
    }
    insert_telemetry(tx, st, r).await?;
    apply_weights(tx, st, r).await?;
    apply_flows(tx, st, r, epoch, seq).await?;
    Ok(IngestOutcome::Stored)
}

/// A breach row (columns as [`BREACH_COLUMNS`]) and its stored evidence text.
fn read_breach(row: &Row) -> Result<(Breach, String), StoreError> {
    const C: &str = "read breach row";
    let evidence: String = get(row, 6, C)?;
    let b = super::breach_from_columns(
        get(row, 0, C)?,
        get(row, 1, C)?,
        get(row, 2, C)?,
        get(row, 3, C)?,
        get(row, 4, C)?,
        get(row, 5, C)?,
        &evidence,
        get(row, 7, C)?,
        get(row, 8, C)?,
        get(row, 9, C)?,
        get(row, 10, C)?,
    )?;
    Ok((b, evidence))
}

/// Take the breach lock, then read `(seq, hash)` of the log's last record. Every breach
/// transaction calls this before reading any breach, so that replicas take turns.
async fn lock_breaches(tx: &Tx<'_>) -> Result<Option<(u64, String)>, StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&BREACH_LOCK_KEY])
        .await
        .map_err(pg("lock breaches"))?;
    let row = tx
        .query_opt(
            "SELECT seq, hash FROM breach_log ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(pg("read last log record"))?;
    row.map(|r| {
        Ok((
            get_u64(&r, 0, "read last log record")?,
            get(&r, 1, "read last log record")?,
        ))
    })
    .transpose()
}

/// Append the record of `breach` after `event` to the log whose last record is `last`, and
/// make it the new `last`.
async fn append_log(
    tx: &Tx<'_>,
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
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &to_i64(r.seq, "log seq")?,
            &r.at_unix_ms,
            &r.breach_id,
            &r.event,
            &r.body_json,
            &r.prev_hash,
            &r.hash,
        ],
    )
    .await
    .map_err(pg("append breach log"))?;
    *last = Some((r.seq, r.hash));
    Ok(())
}

/// One observe-breach transaction.
async fn observe_once(w: &mut Writer, obs: &Observation) -> Result<BreachChange, StoreError> {
    let tx = w.client.transaction().await.map_err(pg("begin"))?;
    let mut last = lock_breaches(&tx).await?;
    let found = tx
        .query_opt(
            &format!(
                "SELECT {BREACH_COLUMNS} FROM breaches
                 WHERE rule = $1 AND node = $2 AND subject = $3 AND state = 'open'"
            ),
            &[&obs.rule, &obs.node, &obs.subject],
        )
        .await
        .map_err(pg("find breach"))?;
    let change = match found {
        None => {
            let b = Breach::opened(obs, last.as_ref().map_or(1, |(s, _)| s + 1));
            tx.execute(
                &format!(
                    "INSERT INTO breaches ({BREACH_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, $10)"
                ),
                &[
                    &b.breach_id,
                    &b.rule,
                    &b.node,
                    &b.subject,
                    &b.severity.as_str(),
                    &b.state.as_str(),
                    &canonical_json(&b.evidence),
                    &b.opened_at_unix_ms,
                    &b.last_seen_unix_ms,
                    &to_i64(b.count, "breach count")?,
                ],
            )
            .await
            .map_err(pg("insert breach"))?;
            append_log(&tx, &mut last, obs.at_unix_ms, &b, EVENT_OPEN).await?;
            BreachChange::Opened(b)
        }
        Some(row) => {
            let (mut b, stored_evidence) = read_breach(&row)?;
            let changed = b.fold(obs, &stored_evidence);
            tx.execute(
                "UPDATE breaches SET severity = $2, evidence = $3, last_seen_ms = $4, obs_count = $5
                 WHERE breach_id = $1",
                &[
                    &b.breach_id,
                    &b.severity.as_str(),
                    &canonical_json(&b.evidence),
                    &b.last_seen_unix_ms,
                    &to_i64(b.count, "breach count")?,
                ],
            )
            .await
            .map_err(pg("update breach"))?;
            if changed {
                append_log(&tx, &mut last, obs.at_unix_ms, &b, EVENT_UPDATED).await?;
                BreachChange::Updated(b)
            } else {
                BreachChange::Unchanged(b)
            }
        }
    };
    tx.commit().await.map_err(pg("commit observe breach"))?;
    Ok(change)
}

/// One resolve-quiet-breaches transaction.
async fn resolve_once(
    w: &mut Writer,
    rule: &str,
    quiet_before_unix_ms: i64,
    at_unix_ms: i64,
) -> Result<Vec<Breach>, StoreError> {
    let tx = w.client.transaction().await.map_err(pg("begin"))?;
    let mut last = lock_breaches(&tx).await?;
    let rows = tx
        .query(
            &format!(
                "SELECT {BREACH_COLUMNS} FROM breaches
                 WHERE rule = $1 AND state = 'open' AND last_seen_ms < $2
                 ORDER BY breach_id COLLATE \"C\""
            ),
            &[&rule, &quiet_before_unix_ms],
        )
        .await
        .map_err(pg("find quiet breaches"))?;
    let mut quiet = Vec::with_capacity(rows.len());
    for row in &rows {
        let (mut b, _) = read_breach(row)?;
        b.state = BreachState::Resolved;
        b.resolved_at_unix_ms = Some(at_unix_ms);
        tx.execute(
            "UPDATE breaches SET state = 'resolved', resolved_ms = $2 WHERE breach_id = $1",
            &[&b.breach_id, &at_unix_ms],
        )
        .await
        .map_err(pg("resolve breach"))?;
        append_log(&tx, &mut last, at_unix_ms, &b, EVENT_RESOLVED).await?;
        quiet.push(b);
    }
    tx.commit().await.map_err(pg("commit resolve breaches"))?;
    Ok(quiet)
}

/// One audit append transaction, under the audit lock.
async fn append_audit_once(w: &mut Writer, entry: &AuditEntry) -> Result<AuditRecord, StoreError> {
    let tx = w.client.transaction().await.map_err(pg("begin"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK_KEY])
        .await
        .map_err(pg("lock audit log"))?;
    let row = tx
        .query_opt(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(pg("read last audit record"))?;
    let last: Option<(u64, String)> = row
        .map(|r| {
            Ok::<_, StoreError>((
                get_u64(&r, 0, "read last audit record")?,
                get(&r, 1, "read last audit record")?,
            ))
        })
        .transpose()?;
    let r = AuditRecord::next(last.as_ref().map(|(s, h)| (*s, h.as_str())), entry);
    tx.execute(
        "INSERT INTO audit_log (seq, at_ms, actor, call, body, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &to_i64(r.seq, "audit seq")?,
            &r.at_unix_ms,
            &r.actor,
            &r.call,
            &r.body_json,
            &r.prev_hash,
            &r.hash,
        ],
    )
    .await
    .map_err(pg("append audit log"))?;
    tx.commit().await.map_err(pg("commit audit record"))?;
    Ok(r)
}

impl PostgresStore {
    /// Connect to `url` (`postgres://user@host:port/db?options=...`), migrate the schema in
    /// the connection's default `search_path`, and open the writer and reader connections.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_inner(url, None).await
    }

    /// Like [`PostgresStore::connect`], with every table in `schema` (created if needed;
    /// its `search_path` replaces any the URL sets). Tests use one schema each.
    pub async fn connect_with_schema(url: &str, schema: &str) -> Result<Self, StoreError> {
        Self::connect_inner(url, Some(schema.to_owned())).await
    }

    /// Every lease and its holder, `(name, holder)` sorted by name (for operators and tests:
    /// which replica evaluates the rules and delivers to each sink).
    pub async fn lease_holders(&self) -> Result<Vec<(String, String)>, StoreError> {
        let client = self.reader().await?;
        let rows = client
            .query(
                "SELECT name, holder FROM leases ORDER BY name COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(pg("read leases"))?;
        rows.iter()
            .map(|r| Ok((get(r, 0, "read lease")?, get(r, 1, "read lease")?)))
            .collect()
    }

    /// Drop the schema given to [`PostgresStore::connect_with_schema`] with everything in it
    /// (tests clean up with it). Does nothing for a store on the default schema.
    pub async fn drop_schema(&self) -> Result<(), StoreError> {
        let Some(schema) = self.inner.schema.clone() else {
            return Ok(());
        };
        let w = self.writer().await?;
        w.client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(&schema)
            ))
            .await
            .map_err(pg("drop schema"))
    }

    async fn connect_inner(url: &str, schema: Option<String>) -> Result<Self, StoreError> {
        let mut config: Config = url.parse().map_err(pg("parse postgres url"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("sov-collector");
        }
        let mut client = open_connection(&config, schema.as_deref(), false).await?;
        migrate(&mut client, schema.as_deref()).await?;
        let st = Statements::prepare(&client).await?;
        let reader = open_connection(&config, schema.as_deref(), true).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                schema,
                writer: Mutex::new(Some(Writer { client, st })),
                reader: Mutex::new(Some(Arc::new(reader))),
                pending: Default::default(),
            }),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, super::Pending> {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Store queued reports until the queue is empty: each batch in one transaction; a batch
    /// that fails is stored report by report (each retried when it loses a race with another
    /// replica), so one bad report fails alone.
    async fn drain(&self) {
        let mut w = match self.writer().await {
            Ok(w) => w,
            Err(e) => {
                // Every waiting report would need this writer: fail them all with the reason.
                let batch: Vec<super::Queued> = std::mem::take(&mut *self.pending()).0.into();
                let msg = e.to_string();
                let outcomes = batch
                    .iter()
                    .map(|_| Err(StoreError::Task(msg.clone())))
                    .collect();
                super::answer(batch, outcomes);
                return;
            }
        };
        loop {
            let batch = self.pending().take_batch();
            if batch.is_empty() {
                return;
            }
            let reports: Vec<&IncomingReport> = batch.iter().map(|q| &q.report).collect();
            let together = if reports.len() > 1 {
                match ingest_batch_once(&mut w, &reports).await {
                    Ok(outcomes) => Some(outcomes.into_iter().map(Ok).collect()),
                    Err(e) => {
                        tracing::debug!(reports = reports.len(), error = %e, "batch failed; storing its reports one by one");
                        None
                    }
                }
            } else {
                None
            };
            let outcomes = match together {
                Some(o) => o,
                None => {
                    let mut out = Vec::with_capacity(reports.len());
                    for r in &reports {
                        out.push(ingest_with_retries(&mut w, r).await);
                    }
                    out
                }
            };
            super::answer(batch, outcomes);
        }
    }

    /// The writer connection, reconnected first if its connection task has ended. The guard
    /// serialises this replica's write transactions.
    async fn writer(&self) -> Result<MappedMutexGuard<'_, Writer>, StoreError> {
        let mut guard = self.inner.writer.lock().await;
        if guard.as_ref().is_none_or(|w| w.client.is_closed()) {
            *guard = None;
            tracing::warn!("postgres writer connection lost; reconnecting");
            let client =
                open_connection(&self.inner.config, self.inner.schema.as_deref(), false).await?;
            let st = Statements::prepare(&client).await?;
            *guard = Some(Writer { client, st });
        }
        MutexGuard::try_map(guard, Option::as_mut)
            .map_err(|_| StoreError::Task("postgres writer connection missing".to_owned()))
    }

    /// The reader connection (shared: queries on it are pipelined), reconnected first if
    /// its connection task has ended.
    async fn reader(&self) -> Result<Arc<Client>, StoreError> {
        let mut guard = self.inner.reader.lock().await;
        if let Some(c) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        if guard.take().is_some() {
            tracing::warn!("postgres reader connection lost; reconnecting");
        }
        let c = Arc::new(
            open_connection(&self.inner.config, self.inner.schema.as_deref(), true).await?,
        );
        *guard = Some(c.clone());
        Ok(c)
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn append_audit(&self, entry: AuditEntry) -> Result<AuditRecord, StoreError> {
        let mut w = self.writer().await?;
        let mut attempt = 1;
        loop {
            match append_audit_once(&mut w, &entry).await {
                Err(e) if attempt < INGEST_ATTEMPTS && retryable(&e) => attempt += 1,
                outcome => return outcome,
            }
        }
    }

    async fn audit_log(&self, after_seq: u64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let client = self.reader().await?;
        let rows = client
            .query(
                "SELECT seq, at_ms, actor, call, body, prev_hash, hash FROM audit_log
                 WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&to_i64(after_seq, "after_seq")?, &i64::from(limit)],
            )
            .await
            .map_err(pg("read audit log"))?;
        const C: &str = "read audit log row";
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    seq: get_u64(r, 0, C)?,
                    at_unix_ms: get(r, 1, C)?,
                    actor: get(r, 2, C)?,
                    call: get(r, 3, C)?,
                    body_json: get(r, 4, C)?,
                    prev_hash: get(r, 5, C)?,
                    hash: get(r, 6, C)?,
                })
            })
            .collect()
    }

    async fn missing_ranges(
        &self,
        node: &str,
        epoch: u64,
        limit: u32,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let client = self.reader().await?;
        let rows = client
            .query(
                super::sqlite::MISSING_RANGES,
                &[&node, &to_i64(epoch, "epoch")?, &i64::from(limit)],
            )
            .await
            .map_err(pg("missing ranges"))?;
        const C: &str = "read missing range";
        rows.iter()
            .map(|r| Ok((get_u64(r, 0, C)?, get_u64(r, 1, C)?)))
            .collect()
    }

    async fn gpu_usage(
        &self,
        since_unix_ms: i64,
        until_unix_ms: i64,
        limit: u32,
    ) -> Result<Vec<GpuUsageRow>, StoreError> {
        let client = self.reader().await?;
        let rows = client
            .query(
                "SELECT node, pid, process_name, SUM(gpu_seconds) FROM gpu_usage
                 WHERE observed_ms >= $1 AND observed_ms < $2
                 GROUP BY node, pid, process_name
                 ORDER BY 4 DESC, node COLLATE \"C\", pid LIMIT $3",
                &[&since_unix_ms, &until_unix_ms, &i64::from(limit)],
            )
            .await
            .map_err(pg("gpu usage"))?;
        const C: &str = "read gpu usage row";
        rows.iter()
            .map(|r| {
                Ok(GpuUsageRow {
                    node: get(r, 0, C)?,
                    pid: u32::try_from(get::<i64>(r, 1, C)?).unwrap_or(0),
                    process: get(r, 2, C)?,
                    gpu_seconds: get(r, 3, C)?,
                })
            })
            .collect()
    }

    async fn insert_token(&self, token: TokenRecord) -> Result<(), StoreError> {
        let w = self.writer().await?;
        w.client
            .execute(
                "INSERT INTO api_tokens (token_id, hash, name, role, created_ms, expires_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &token.token_id,
                    &token.hash,
                    &token.name,
                    &token.role.as_str(),
                    &token.created_unix_ms,
                    &token.expires_unix_ms,
                ],
            )
            .await
            .map_err(pg("insert token"))?;
        Ok(())
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let client = self.reader().await?;
        let rows = client
            .query(
                "SELECT token_id, hash, name, role, created_ms, expires_ms FROM api_tokens
                 ORDER BY created_ms, token_id COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(pg("list tokens"))?;
        const C: &str = "read token row";
        rows.iter()
            .map(|r| {
                let role: String = get(r, 3, C)?;
                super::token_from_columns(
                    get(r, 0, C)?,
                    get(r, 1, C)?,
                    get(r, 2, C)?,
                    &role,
                    get(r, 4, C)?,
                    get(r, 5, C)?,
                )
            })
            .collect()
    }

    async fn delete_token(&self, token_id: &str) -> Result<bool, StoreError> {
        let w = self.writer().await?;
        let n = w
            .client
            .execute("DELETE FROM api_tokens WHERE token_id = $1", &[&token_id])
            .await
            .map_err(pg("delete token"))?;
        Ok(n > 0)
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let client = self.reader().await?;
        let row = client
            .query_opt(
                "SELECT token_id, hash, name, role, created_ms, expires_ms FROM api_tokens
                 WHERE hash = $1",
                &[&hash],
            )
            .await
            .map_err(pg("find token"))?;
        const C: &str = "read token row";
        row.map(|r| {
            let role: String = get(&r, 3, C)?;
            super::token_from_columns(
                get(&r, 0, C)?,
                get(&r, 1, C)?,
                get(&r, 2, C)?,
                &role,
                get(&r, 4, C)?,
                get(&r, 5, C)?,
            )
        })
        .transpose()
    }

    /// Group commit: the report joins the queue; whoever holds the writer next stores every
    /// queued report (up to [`super::MAX_BATCH_REPORTS`] per transaction) with one commit,
    /// then answers each. The draining runs in a task of its own, so a caller that goes away
    /// cannot abort the batch others wait on.
    async fn ingest(&self, report: IncomingReport) -> Result<IngestOutcome, StoreError> {
        let done = self.pending().push(report);
        let store = self.clone();
        tokio::spawn(async move { store.drain().await })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        done.await
            .map_err(|_| StoreError::Task("ingest answer lost".to_owned()))?
    }

    async fn list_nodes(&self, after: &str, limit: u32) -> Result<Vec<NodeRow>, StoreError> {
        let client = self.reader().await?;
        let rows = client
            .query(LIST_NODES, &[&after, &i64::from(limit)])
            .await
            .map_err(pg("list nodes"))?;
        const C: &str = "read node row";
        rows.iter()
            .map(|row| {
                let reports = get_u64(row, 8, C)?;
                let last_seq = get_u64(row, 9, C)?;
                let missing = last_seq.saturating_sub(reports);
                let labels: String = get(row, 5, C)?;
                Ok(NodeRow {
                    node: get(row, 0, C)?,
                    site: get(row, 1, C)?,
                    country: get(row, 2, C)?,
                    hostname: get(row, 3, C)?,
                    agent_version: get(row, 4, C)?,
                    labels: serde_json::from_str(&labels).unwrap_or_default(),
                    last_seen_unix_ms: get(row, 6, C)?,
                    epoch: get_u64(row, 7, C)?,
                    reports,
                    last_seq,
                    missing,
                    epochs: u32::try_from(get_u64(row, 10, C)?).unwrap_or(u32::MAX),
                    #[allow(clippy::cast_possible_truncation)]
                    cpu_percent: get::<f64>(row, 11, C)? as f32,
                    memory_used_bytes: get_u64(row, 12, C)?,
                    memory_total_bytes: get_u64(row, 13, C)?,
                    conflicts: get_u64(row, 14, C)?,
                    dropped: get_u64(row, 15, C)?.min(missing),
                    gpu_state: get(row, 16, C)?,
                    gpu_count: u32::try_from(get_u64(row, 17, C)?).unwrap_or(u32::MAX),
                    #[allow(clippy::cast_possible_truncation)]
                    gpu_util_percent: get::<f64>(row, 18, C)? as f32,
                    gpu_memory_used_bytes: get_u64(row, 19, C)?,
                    gpu_memory_total_bytes: get_u64(row, 20, C)?,
                })
            })
            .collect()
    }

    async fn list_models(
        &self,
        query: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<sov_proto::pb::ModelSummary>, StoreError> {
        use sov_proto::pb;
        let sha_query = query.len() == 64 && query.bytes().all(|b| b.is_ascii_hexdigit());
        let client = self.reader().await?;
        let rows = client
            .query(
                LIST_MODELS,
                &[&after, &query, &sha_query, &i64::from(limit)],
            )
            .await
            .map_err(pg("list models"))?;
        const C: &str = "read model row";
        let mut out: Vec<pb::ModelSummary> = Vec::new();
        for row in &rows {
            let key: String = get(row, 0, C)?;
            if out.last().map(|m| m.key.as_str()) != Some(key.as_str()) {
                out.push(pb::ModelSummary {
                    key,
                    model: get(row, 6, C)?,
                    identity_source: get(row, 9, C)?,
                    format: get(row, 3, C)?,
                    sha256: get(row, 5, C)?,
                    size_bytes: get_u64(row, 4, C)?,
                    parameter_count: get_u64(row, 11, C)?,
                    revision: get(row, 7, C)?,
                    repo_path: get(row, 8, C)?,
                    publisher: get(row, 10, C)?,
                    copies: vec![],
                    users: vec![],
                });
            }
            let Some(m) = out.last_mut() else { continue };
            let node: String = get(row, 1, C)?;
            let path: String = get(row, 2, C)?;
            let network: bool = get(row, 14, C)?;
            m.copies.push(pb::ModelCopy {
                node: node.clone(),
                site: get(row, 19, C)?,
                country: get(row, 20, C)?,
                path: path.clone(),
                storage: if network {
                    get(row, 13, C)?
                } else {
                    "local".to_owned()
                },
                server: get(row, 15, C)?,
                first_seen_unix_ms: get(row, 17, C)?,
                last_seen_unix_ms: get(row, 18, C)?,
                mount_point: get(row, 12, C)?,
            });
            let users: Vec<serde_json::Value> =
                serde_json::from_str(get(row, 16, C)?).unwrap_or_default();
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

    async fn egress(
        &self,
        q: EgressQuery,
    ) -> Result<(Vec<sov_proto::pb::EgressRow>, u64), StoreError> {
        const NO_TEXT: &str = "''::TEXT";
        const NO_NUM: &str = "0::BIGINT";
        let (cols, group) = match q.by.as_str() {
            "" | "country" => (
                format!(
                    "country, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, {NO_NUM}, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, {NO_TEXT}"
                ),
                "country",
            ),
            "node" => (
                format!(
                    "country, node, {NO_TEXT}, {NO_NUM}, {NO_NUM}, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, {NO_TEXT}"
                ),
                "country, node",
            ),
            "process" => (
                format!(
                    "country, node, process, pid, {NO_NUM}, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, {NO_TEXT}"
                ),
                "country, node, process, pid",
            ),
            "asn" => (
                format!(
                    "country, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, asn, max(org), {NO_TEXT}, {NO_NUM}, {NO_TEXT}"
                ),
                "country, asn",
            ),
            "destination" => (
                format!(
                    "country, {NO_TEXT}, {NO_TEXT}, {NO_NUM}, asn, max(org), remote_address, remote_port, max(geo_source)"
                ),
                "country, asn, remote_address, remote_port",
            ),
            "flow" => (
                "country, node, process, pid, asn, max(org), remote_address, remote_port, max(geo_source)"
                    .to_owned(),
                "country, node, process, pid, asn, remote_address, remote_port",
            ),
            other => {
                return Err(StoreError::Range(format!(
                    "unknown grouping {other:?}: use country, node, process, asn, destination or flow"
                )));
            }
        };
        // COUNT(*) OVER () is the number of groups before LIMIT; at least one row is fetched
        // so that it is known even when the limit is 0.
        let text = format!(
            "SELECT {cols}, SUM(bytes_sent)::BIGINT, SUM(bytes_received)::BIGINT,
                    SUM(connections)::BIGINT, COALESCE(MIN(NULLIF(min_rtt_us, 0)), 0)::BIGINT,
                    COUNT(*) OVER ()
             FROM flows_minute
             WHERE minute_ms >= $1 AND minute_ms < $2 AND direction <> 'inbound'
             GROUP BY {group}
             ORDER BY SUM(bytes_sent) DESC, SUM(bytes_received) DESC, {group}
             LIMIT GREATEST($3::BIGINT, 1)"
        );
        // Minutes are stamped at their start: a range starting mid-minute includes it.
        let since = q.since_unix_ms - q.since_unix_ms.rem_euclid(60_000);
        let client = self.reader().await?;
        let rows = client
            .query(&text, &[&since, &q.until_unix_ms, &i64::from(q.limit)])
            .await
            .map_err(pg("egress"))?;
        const C: &str = "read egress row";
        let total = match rows.first() {
            Some(row) => get_u64(row, 13, C)?,
            None => 0,
        };
        let out = rows
            .iter()
            .take(q.limit as usize)
            .map(|row| {
                let n = |i| get_u64(row, i, C);
                Ok(sov_proto::pb::EgressRow {
                    country: get(row, 0, C)?,
                    node: get(row, 1, C)?,
                    process: get(row, 2, C)?,
                    pid: u32::try_from(n(3)?).unwrap_or(0),
                    asn: u32::try_from(n(4)?).unwrap_or(0),
                    org: get(row, 5, C)?,
                    remote_address: get(row, 6, C)?,
                    remote_port: u32::try_from(n(7)?).unwrap_or(0),
                    geo_source: get(row, 8, C)?,
                    bytes_sent: n(9)?,
                    bytes_received: n(10)?,
                    connections: n(11)?,
                    min_rtt_us: u32::try_from(n(12)?).unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let truncated = total.saturating_sub(out.len() as u64);
        Ok((out, truncated))
    }

    async fn prune(&self, keep: Retention) -> Result<PruneStats, StoreError> {
        let raw = keep.raw_before_unix_ms;
        let aggregates = keep.aggregates_before_unix_ms;
        let mut w = self.writer().await?;
        let tx = w.client.transaction().await.map_err(pg("begin prune"))?;
        let mut stats = PruneStats::default();
        let locked: bool = get(
            &tx.query_one(
                "SELECT pg_try_advisory_xact_lock($1::INT4, hashtext(current_schema()))",
                &[&RETENTION_LOCK_KEY],
            )
            .await
            .map_err(pg("lock retention"))?,
            0,
            "lock retention",
        )?;
        if !locked {
            stats.skipped = true;
            return Ok(stats);
        }
        for step in DOWNSAMPLE {
            stats.downsampled += tx
                .execute(step, &[&raw])
                .await
                .map_err(pg("downsample samples"))?;
        }
        for (table, counter) in [
            ("host_samples", &mut stats.host_samples),
            ("gpu_samples", &mut stats.gpu_samples),
            ("gpu_usage", &mut stats.gpu_usage),
        ] {
            *counter = tx
                .execute(
                    &format!("DELETE FROM {table} WHERE observed_ms < $1"),
                    &[&raw],
                )
                .await
                .map_err(pg("prune samples"))?;
        }
        for table in ["host_minute", "gpu_minute", "gpu_usage_minute"] {
            stats.aggregates += tx
                .execute(
                    &format!("DELETE FROM {table} WHERE minute_ms < $1"),
                    &[&aggregates],
                )
                .await
                .map_err(pg("prune aggregates"))?;
        }
        stats.flows = tx
            .execute(
                "DELETE FROM flows_minute WHERE minute_ms < $1",
                &[&aggregates],
            )
            .await
            .map_err(pg("prune flows"))?
            + tx.execute("DELETE FROM flows_raw WHERE end_ms < $1", &[&raw])
                .await
                .map_err(pg("prune raw flows"))?;
        // Report keys stay forever (they make re-sends idempotent and prove completeness);
        // only their bodies go.
        stats.report_bodies = tx
            .execute(
                "UPDATE reports SET body = ''::BYTEA WHERE received_ms < $1 AND octet_length(body) > 0",
                &[&raw],
            )
            .await
            .map_err(pg("prune report bodies"))?;
        tx.commit().await.map_err(pg("commit prune"))?;
        Ok(stats)
    }

    async fn observe_breach(&self, obs: Observation) -> Result<BreachChange, StoreError> {
        if obs.rule.is_empty() {
            return Err(StoreError::Range(
                "breach observation without a rule".into(),
            ));
        }
        let mut w = self.writer().await?;
        let mut attempt = 1;
        loop {
            match observe_once(&mut w, &obs).await {
                Err(e) if attempt < INGEST_ATTEMPTS && retryable(&e) => attempt += 1,
                outcome => return outcome,
            }
        }
    }

    async fn resolve_quiet_breaches(
        &self,
        rule: &str,
        quiet_before_unix_ms: i64,
        at_unix_ms: i64,
    ) -> Result<Vec<Breach>, StoreError> {
        let mut w = self.writer().await?;
        let mut attempt = 1;
        loop {
            match resolve_once(&mut w, rule, quiet_before_unix_ms, at_unix_ms).await {
                Err(e) if attempt < INGEST_ATTEMPTS && retryable(&e) => attempt += 1,
                outcome => return outcome,
            }
        }
    }

    async fn list_breaches(&self, filter: BreachFilter) -> Result<Vec<Breach>, StoreError> {
        let client = self.reader().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {BREACH_COLUMNS} FROM breaches
                     WHERE ($1::TEXT IS NULL OR state = $1::TEXT)
                       AND ($2::TEXT IS NULL OR rule = $2::TEXT)
                       AND ($3::BIGINT IS NULL OR state = 'open' OR resolved_ms >= $3::BIGINT)
                     ORDER BY opened_ms DESC, breach_id COLLATE \"C\"
                     LIMIT $4::BIGINT"
                ),
                &[
                    &filter.state.map(BreachState::as_str),
                    &filter.rule,
                    &filter.since_unix_ms,
                    &i64::from(filter.limit),
                ],
            )
            .await
            .map_err(pg("list breaches"))?;
        rows.iter().map(|r| Ok(read_breach(r)?.0)).collect()
    }

    async fn add_enroll_tokens(&self, tokens: &[NewEnrollToken]) -> Result<(), StoreError> {
        let mut w = self.writer().await?;
        let tx = w
            .client
            .transaction()
            .await
            .map_err(pg("begin add tokens"))?;
        for t in tokens {
            tx.execute(
                "INSERT INTO enroll_tokens (hash, created_ms, expires_ms) VALUES ($1, $2, $3)",
                &[&t.hash, &t.created_unix_ms, &t.expires_unix_ms],
            )
            .await
            .map_err(pg("add enrollment token"))?;
        }
        tx.commit().await.map_err(pg("commit add tokens"))
    }

    async fn spend_enroll_token(
        &self,
        hash: &str,
        node: &str,
        now_unix_ms: i64,
    ) -> Result<TokenSpend, StoreError> {
        let w = self.writer().await?;
        // One statement: of two replicas spending the same token, the second waits for the
        // first one's row lock, re-checks `used_ms IS NULL` and updates nothing.
        let spent = w
            .client
            .execute(
                "UPDATE enroll_tokens SET used_ms = $3, used_by = $2
                 WHERE hash = $1 AND used_ms IS NULL AND expires_ms > $3",
                &[&hash, &node, &now_unix_ms],
            )
            .await
            .map_err(pg("spend enrollment token"))?;
        if spent == 1 {
            return Ok(TokenSpend::Spent);
        }
        let row = w
            .client
            .query_opt(
                "SELECT expires_ms, used_ms, used_by FROM enroll_tokens WHERE hash = $1",
                &[&hash],
            )
            .await
            .map_err(pg("read enrollment token"))?;
        let Some(row) = row else {
            return Ok(TokenSpend::Unknown);
        };
        let expires: i64 = row.try_get(0).map_err(pg("read enrollment token"))?;
        let used: Option<i64> = row.try_get(1).map_err(pg("read enrollment token"))?;
        let by: Option<String> = row.try_get(2).map_err(pg("read enrollment token"))?;
        Ok(match used {
            Some(at) => TokenSpend::AlreadyUsed {
                node: by.unwrap_or_default(),
                at_unix_ms: at,
            },
            None => TokenSpend::Expired {
                at_unix_ms: expires,
            },
        })
    }

    async fn breach_log(&self, after_seq: u64, limit: u32) -> Result<Vec<LogRecord>, StoreError> {
        let client = self.reader().await?;
        let rows = client
            .query(
                "SELECT seq, at_ms, breach_id, event, body, prev_hash, hash FROM breach_log
                 WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&to_i64(after_seq, "after_seq")?, &i64::from(limit)],
            )
            .await
            .map_err(pg("read breach log"))?;
        const C: &str = "read breach log row";
        rows.iter()
            .map(|r| {
                Ok(LogRecord::from_stored(
                    get_u64(r, 0, C)?,
                    get(r, 1, C)?,
                    get(r, 2, C)?,
                    get(r, 3, C)?,
                    get(r, 4, C)?,
                    get(r, 5, C)?,
                    get(r, 6, C)?,
                ))
            })
            .collect()
    }

    async fn breach_log_end(&self) -> Result<u64, StoreError> {
        let client = self.reader().await?;
        let row = client
            .query_one("SELECT COALESCE(MAX(seq), 0)::BIGINT FROM breach_log", &[])
            .await
            .map_err(pg("read breach log end"))?;
        get_u64(&row, 0, "read breach log end")
    }

    async fn outbox_cursor(&self, sink: &str) -> Result<Option<u64>, StoreError> {
        let client = self.reader().await?;
        let row = client
            .query_opt(
                "SELECT after_seq FROM alert_cursor WHERE sink = $1",
                &[&sink],
            )
            .await
            .map_err(pg("read outbox cursor"))?;
        row.map(|r| get_u64(&r, 0, "read outbox cursor"))
            .transpose()
    }

    async fn outbox_enqueue(
        &self,
        sink: &str,
        items: Vec<OutboxItem>,
        cursor: u64,
        now_unix_ms: i64,
    ) -> Result<(), StoreError> {
        let mut w = self.writer().await?;
        let tx = w.client.transaction().await.map_err(pg("begin enqueue"))?;
        for it in &items {
            tx.execute(
                "INSERT INTO alert_outbox (sink, log_seq, breach_id, event, payload, state,
                     attempts, next_attempt_ms, last_error, created_ms, settled_ms)
                 VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, '', $6, NULL)
                 ON CONFLICT (sink, log_seq) DO NOTHING",
                &[
                    &sink,
                    &to_i64(it.log_seq, "log seq")?,
                    &it.breach_id,
                    &it.event,
                    &it.payload,
                    &now_unix_ms,
                ],
            )
            .await
            .map_err(pg("enqueue alert"))?;
        }
        tx.execute(
            "INSERT INTO alert_cursor (sink, after_seq) VALUES ($1, $2)
             ON CONFLICT (sink) DO UPDATE SET after_seq = GREATEST(alert_cursor.after_seq, excluded.after_seq)",
            &[&sink, &to_i64(cursor, "outbox cursor")?],
        )
        .await
        .map_err(pg("move outbox cursor"))?;
        tx.commit().await.map_err(pg("commit enqueue"))
    }

    async fn outbox_head(&self, sink: &str) -> Result<Option<OutboxRow>, StoreError> {
        let client = self.reader().await?;
        let row = client
            .query_opt(
                "SELECT log_seq, breach_id, event, payload, attempts, next_attempt_ms, created_ms
                 FROM alert_outbox WHERE sink = $1 AND state = 'pending'
                 ORDER BY log_seq LIMIT 1",
                &[&sink],
            )
            .await
            .map_err(pg("read outbox head"))?;
        const C: &str = "read outbox head";
        row.map(|r| {
            Ok(OutboxRow {
                sink: sink.to_owned(),
                item: OutboxItem {
                    log_seq: get_u64(&r, 0, C)?,
                    breach_id: get(&r, 1, C)?,
                    event: get(&r, 2, C)?,
                    payload: get(&r, 3, C)?,
                },
                attempts: u32::try_from(get::<i64>(&r, 4, C)?).unwrap_or(u32::MAX),
                next_attempt_unix_ms: get(&r, 5, C)?,
                created_unix_ms: get(&r, 6, C)?,
            })
        })
        .transpose()
    }

    async fn outbox_settle(
        &self,
        sink: &str,
        log_seq: u64,
        settle: Settle,
    ) -> Result<(), StoreError> {
        let seq = to_i64(log_seq, "log seq")?;
        let w = self.writer().await?;
        let n = match &settle {
            Settle::Delivered { at_unix_ms } => {
                w.client
                    .execute(
                        "UPDATE alert_outbox SET state = 'delivered', settled_ms = $3
                         WHERE sink = $1 AND log_seq = $2 AND state = 'pending'",
                        &[&sink, &seq, at_unix_ms],
                    )
                    .await
            }
            Settle::Retry {
                attempts,
                next_attempt_unix_ms,
                error,
            } => {
                w.client
                    .execute(
                        "UPDATE alert_outbox SET attempts = $3, next_attempt_ms = $4, last_error = $5
                         WHERE sink = $1 AND log_seq = $2 AND state = 'pending'",
                        &[&sink, &seq, &i64::from(*attempts), next_attempt_unix_ms, error],
                    )
                    .await
            }
            Settle::Failed {
                attempts,
                at_unix_ms,
                error,
            } => {
                w.client
                    .execute(
                        "UPDATE alert_outbox SET state = 'failed', attempts = $3, settled_ms = $4, last_error = $5
                         WHERE sink = $1 AND log_seq = $2 AND state = 'pending'",
                        &[&sink, &seq, &i64::from(*attempts), at_unix_ms, error],
                    )
                    .await
            }
        }
        .map_err(pg("settle outbox row"))?;
        if n == 0 {
            tracing::warn!(sink, log_seq = seq, "outbox row was already settled");
        }
        Ok(())
    }

    async fn outbox_stats(&self) -> Result<Vec<SinkStats>, StoreError> {
        let client = self.reader().await?;
        let rows = client
            .query(
                "SELECT sink,
                        COUNT(*) FILTER (WHERE state = 'pending'),
                        COUNT(*) FILTER (WHERE state = 'delivered'),
                        COUNT(*) FILTER (WHERE state = 'failed'),
                        COALESCE(SUM(attempts), 0)::BIGINT
                 FROM alert_outbox GROUP BY sink ORDER BY sink COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(pg("outbox stats"))?;
        const C: &str = "read outbox stats";
        rows.iter()
            .map(|r| {
                Ok(SinkStats {
                    sink: get(r, 0, C)?,
                    pending: get_u64(r, 1, C)?,
                    delivered: get_u64(r, 2, C)?,
                    failed: get_u64(r, 3, C)?,
                    failed_attempts: get_u64(r, 4, C)?,
                })
            })
            .collect()
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_unix_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let w = self.writer().await?;
        let rows = w
            .client
            .query(
                "INSERT INTO leases (name, holder, until_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms
                 WHERE leases.holder = excluded.holder OR leases.until_ms < $4
                 RETURNING holder",
                &[&name, &holder, &now_unix_ms.saturating_add(ttl_ms), &now_unix_ms],
            )
            .await
            .map_err(pg("take lease"))?;
        Ok(rows.len() == 1)
    }

    async fn note_peer(&self, peer: NodePeer) -> Result<(), StoreError> {
        let w = self.writer().await?;
        w.client
            .execute(
                "INSERT INTO node_peers (node, address, country, asn, source, seen_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (node) DO UPDATE SET address = excluded.address, country = excluded.country,
                     asn = excluded.asn, source = excluded.source, seen_ms = excluded.seen_ms
                 WHERE excluded.seen_ms >= node_peers.seen_ms",
                &[
                    &peer.node,
                    &peer.address,
                    &peer.country,
                    &i64::from(peer.asn),
                    &peer.source,
                    &peer.seen_unix_ms,
                ],
            )
            .await
            .map_err(pg("record node peer"))?;
        Ok(())
    }

    async fn node_peers(&self) -> Result<Vec<NodePeer>, StoreError> {
        let client = self.reader().await?;
        let rows = client
            .query(
                "SELECT node, address, country, asn, source, seen_ms FROM node_peers
                 ORDER BY node COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(pg("node peers"))?;
        const C: &str = "read node peer";
        rows.iter()
            .map(|r| {
                Ok(NodePeer {
                    node: get(r, 0, C)?,
                    address: get(r, 1, C)?,
                    country: get(r, 2, C)?,
                    asn: u32::try_from(get::<i64>(r, 3, C)?).unwrap_or(0),
                    source: get(r, 4, C)?,
                    seen_unix_ms: get(r, 5, C)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::panic::AssertUnwindSafe;
    use std::sync::atomic::{AtomicU32, Ordering};

    use futures::FutureExt;

    use super::*;
    use crate::store::suite::{Backend, Fixture, report, store_suite};

    /// Where the test database is.
    const URL_VAR: &str = "SOV_TEST_POSTGRES_URL";
    /// Set to 1 (CI does) to fail rather than skip when the database cannot be reached.
    const REQUIRE_VAR: &str = "SOV_REQUIRE_POSTGRES";
    const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

    fn test_url() -> String {
        std::env::var(URL_VAR)
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_TEST_URL.to_owned())
    }

    /// A schema name no other test (or concurrent test run) uses.
    fn fresh_schema() -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        format!(
            "sov_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    async fn try_connect(url: &str) -> Result<Client, tokio_postgres::Error> {
        let mut config: Config = url.parse()?;
        config.connect_timeout(Duration::from_secs(5));
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// The test database's URL and an admin connection to it; `None`, after a loud SKIP
    /// line, when it cannot be reached (a panic instead when it is required).
    async fn admin() -> Option<(String, Client)> {
        let url = test_url();
        match try_connect(&url).await {
            Ok(client) => Some((url, client)),
            Err(err) => {
                let shown = redact_url(&url);
                let cause = std::error::Error::source(&err)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                if std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1") {
                    panic!(
                        "{REQUIRE_VAR}=1 but PostgreSQL is not reachable at {shown} ({err}{cause})"
                    );
                }
                let test = std::thread::current()
                    .name()
                    .unwrap_or("a postgres test")
                    .to_owned();
                // One write, straight to stderr, so that the harness's capture does not hide
                // it and parallel tests do not cut it up.
                let line = format!(
                    "SKIP: PostgreSQL not reachable at {shown} ({err}{cause}): {test} did not \
                     run (set {URL_VAR}; {REQUIRE_VAR}=1 makes this a failure)\n"
                );
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
                None
            }
        }
    }

    async fn drop_schema(admin: &Client, schema: &str) {
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(schema)
            ))
            .await
            .unwrap();
    }

    /// Run `body` with the test database and a fresh schema name, then drop that schema
    /// (also when `body` panics).
    async fn with_schema<F>(body: impl FnOnce(String, String) -> F)
    where
        F: std::future::Future<Output = ()>,
    {
        let Some((url, admin)) = admin().await else {
            return;
        };
        let schema = fresh_schema();
        let outcome = AssertUnwindSafe(body(url, schema.clone()))
            .catch_unwind()
            .await;
        drop_schema(&admin, &schema).await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    /// A fresh store in its own schema.
    struct PgFixture {
        admin: Client,
        schema: String,
        store: PostgresStore,
    }

    #[async_trait::async_trait(?Send)]
    impl Backend for PgFixture {
        fn store(&self) -> &dyn Store {
            &self.store
        }

        async fn count(&self, sql: &str) -> i64 {
            self.admin.query_one(sql, &[]).await.unwrap().get(0)
        }
    }

    #[async_trait::async_trait(?Send)]
    impl Fixture for PgFixture {
        async fn create() -> Option<Self> {
            let (url, admin) = admin().await?;
            let schema = fresh_schema();
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            admin
                .batch_execute(&format!("SET search_path TO {}", quote_ident(&schema)))
                .await
                .unwrap();
            Some(Self {
                admin,
                schema,
                store,
            })
        }

        async fn destroy(self) {
            drop(self.store);
            drop_schema(&self.admin, &self.schema).await;
        }
    }

    store_suite!(PgFixture);

    async fn count(url: &str, schema: &str, sql: &str) -> i64 {
        let c = try_connect(url).await.unwrap();
        c.batch_execute(&format!("SET search_path TO {}", quote_ident(schema)))
            .await
            .unwrap();
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_replicas_ingesting_the_same_report_store_it_once() {
        with_schema(|url, schema| async move {
            let (a, b) = tokio::join!(
                PostgresStore::connect_with_schema(&url, &schema),
                PostgresStore::connect_with_schema(&url, &schema)
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            for seq in 1..=20 {
                let (x, y) =
                    tokio::join!(a.ingest(report("n", 1, seq)), b.ingest(report("n", 1, seq)));
                let mut outcomes = [x.unwrap(), y.unwrap()];
                outcomes.sort_by_key(|o| *o != IngestOutcome::Stored);
                assert_eq!(
                    outcomes,
                    [IngestOutcome::Stored, IngestOutcome::Duplicate],
                    "seq {seq}"
                );
            }
            let n = &b.list_nodes("", 10).await.unwrap()[0];
            assert_eq!(
                (n.reports, n.last_seq, n.missing, n.conflicts),
                (20, 20, 0, 0)
            );
            assert_eq!(
                count(&url, &schema, "SELECT COUNT(*) FROM reports").await,
                20
            );
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_replica_skips_pruning_while_another_one_prunes() {
        with_schema(|url, schema| async move {
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            for seq in 1..=3 {
                store
                    .ingest(super::super::suite::report("p", 1, seq))
                    .await
                    .unwrap();
            }
            // Another replica holds the retention lock of this schema.
            let other = try_connect(&url).await.unwrap();
            other
                .execute(
                    "SELECT pg_advisory_lock($1::INT4, hashtext($2))",
                    &[&RETENTION_LOCK_KEY, &schema],
                )
                .await
                .unwrap();
            let skipped = store.prune(Retention::all_before(i64::MAX)).await.unwrap();
            assert_eq!(
                skipped,
                PruneStats {
                    skipped: true,
                    ..Default::default()
                }
            );
            assert_eq!(
                count(
                    &url,
                    &schema,
                    "SELECT COUNT(*) FROM reports WHERE octet_length(body) > 0"
                )
                .await,
                3
            );
            other
                .execute(
                    "SELECT pg_advisory_unlock($1::INT4, hashtext($2))",
                    &[&RETENTION_LOCK_KEY, &schema],
                )
                .await
                .unwrap();
            let ran = store.prune(Retention::all_before(i64::MAX)).await.unwrap();
            assert!(!ran.skipped);
            assert_eq!(ran.report_bodies, 3);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_replicas_spending_one_enrollment_token_at_once_spend_it_once() {
        with_schema(|url, schema| async move {
            let (a, b) = tokio::join!(
                PostgresStore::connect_with_schema(&url, &schema),
                PostgresStore::connect_with_schema(&url, &schema)
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            let tokens: Vec<NewEnrollToken> = (0..20)
                .map(|i| NewEnrollToken {
                    hash: format!("t{i}"),
                    created_unix_ms: 0,
                    expires_unix_ms: 1_000_000,
                })
                .collect();
            a.add_enroll_tokens(&tokens).await.unwrap();
            for t in &tokens {
                let (x, y) = tokio::join!(
                    a.spend_enroll_token(&t.hash, "node-a", 10),
                    b.spend_enroll_token(&t.hash, "node-b", 10)
                );
                let spent = [x.unwrap(), y.unwrap()]
                    .iter()
                    .filter(|s| **s == TokenSpend::Spent)
                    .count();
                assert_eq!(spent, 1, "token {}", t.hash);
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_ingesting_different_reports_of_one_node_keep_exact_counters() {
        with_schema(|url, schema| async move {
            let a = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            let b = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            let with_flow = |seq: u64| {
                let mut r = report("n", 1, seq);
                r.telemetry = crate::store::suite::telemetry();
                r.telemetry.flows = vec![crate::store::FlowRecord {
                    flow: sov_proto::pb::Flow {
                        remote_address: "8.8.8.8".into(),
                        remote_port: 443,
                        bytes_sent: 10,
                        direction: sov_proto::pb::Direction::Outbound as i32,
                        end_unix_ms: 90_000,
                        ..Default::default()
                    },
                    country: "US".into(),
                    ..Default::default()
                }];
                r
            };
            let (x, y) = tokio::join!(
                async {
                    for seq in (1..=40).step_by(2) {
                        assert_eq!(
                            a.ingest(with_flow(seq)).await.unwrap(),
                            IngestOutcome::Stored
                        );
                    }
                },
                async {
                    for seq in (2..=40).step_by(2) {
                        assert_eq!(
                            b.ingest(with_flow(seq)).await.unwrap(),
                            IngestOutcome::Stored
                        );
                    }
                }
            );
            let ((), ()) = (x, y);
            let n = &a.list_nodes("", 10).await.unwrap()[0];
            assert_eq!((n.reports, n.last_seq, n.missing), (40, 40, 0));
            let (rows, _) = a
                .egress(EgressQuery {
                    since_unix_ms: 0,
                    until_unix_ms: 600_000,
                    by: "country".into(),
                    limit: 10,
                })
                .await
                .unwrap();
            assert_eq!((rows[0].bytes_sent, rows[0].connections), (400, 0));
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_connecting_at_once_migrate_once() {
        with_schema(|url, schema| async move {
            let stores = futures::future::join_all(
                (0..4).map(|_| PostgresStore::connect_with_schema(&url, &schema)),
            )
            .await;
            for s in stores {
                s.unwrap();
            }
            assert_eq!(
                count(&url, &schema, "SELECT COUNT(*) FROM sov_schema_version").await,
                1
            );
            assert_eq!(
                count(&url, &schema, "SELECT MAX(version) FROM sov_schema_version").await,
                SCHEMA_VERSION
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_database_from_a_newer_collector_is_refused() {
        with_schema(|url, schema| async move {
            drop(
                PostgresStore::connect_with_schema(&url, &schema)
                    .await
                    .unwrap(),
            );
            let c = try_connect(&url).await.unwrap();
            c.batch_execute(&format!(
                "UPDATE {}.sov_schema_version SET version = 99",
                quote_ident(&schema)
            ))
            .await
            .unwrap();
            let err = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
                "{err}"
            );
        })
        .await;
    }

    async fn backend_pid(c: &Client) -> i32 {
        c.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    }

    #[tokio::test]
    async fn a_lost_connection_fails_the_calls_that_find_it_dead_and_then_reconnects() {
        with_schema(|url, schema| async move {
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
            store.ingest(report("a", 1, 1)).await.unwrap();
            let writer_pid = backend_pid(&store.writer().await.unwrap().client).await;
            let reader_pid = backend_pid(&store.reader().await.unwrap()).await;
            let admin = try_connect(&url).await.unwrap();
            for pid in [writer_pid, reader_pid] {
                admin
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .unwrap();
            }
            // Calls that find the connection dead fail with a postgres error until the
            // connection task has seen the socket close (a race of a few milliseconds); then the
            // next call reconnects. Agents retry after a backoff of at least 200 ms.
            let mut outcome = store.ingest(report("a", 1, 2)).await;
            for _ in 0..3 {
                let Err(err) = &outcome else { break };
                assert!(matches!(err, StoreError::Postgres { .. }), "{err}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                outcome = store.ingest(report("a", 1, 2)).await;
            }
            assert_eq!(outcome.unwrap(), IngestOutcome::Stored);
            let mut nodes = store.list_nodes("", 10).await;
            for _ in 0..3 {
                let Err(err) = &nodes else { break };
                assert!(matches!(err, StoreError::Postgres { .. }), "{err}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                nodes = store.list_nodes("", 10).await;
            }
            assert_eq!(nodes.unwrap()[0].reports, 2);
            assert_ne!(
                backend_pid(&store.writer().await.unwrap().client).await,
                writer_pid
            );
            // The new connections still use the store's schema.
            assert_eq!(
                count(&url, &schema, "SELECT COUNT(*) FROM reports").await,
                2
            );
        })
        .await;
    }

    #[tokio::test]
    async fn open_with_a_postgres_url_uses_the_urls_search_path() {
        with_schema(|url, schema| async move {
            let c = try_connect(&url).await.unwrap();
            c.batch_execute(&format!("CREATE SCHEMA {}", quote_ident(&schema)))
                .await
                .unwrap();
            let sep = if url.contains('?') { '&' } else { '?' };
            let with_path = format!("{url}{sep}options=-csearch_path%3D{schema}");
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::open(&with_path, dir.path()).await.unwrap();
            assert!(
                format!("{store:?}").starts_with("PostgresStore"),
                "{store:?}"
            );
            store.ingest(report("a", 1, 1)).await.unwrap();
            assert_eq!(
                count(&url, &schema, "SELECT COUNT(*) FROM reports").await,
                1
            );
            assert!(!dir.path().join(crate::store::sqlite::DB_FILE).exists());
        })
        .await;
    }

    #[tokio::test]
    async fn an_edited_log_record_is_refused_by_the_database_and_named_by_the_chain() {
        use crate::store::suite::{observation, whole_log};
        use sov_evidence::chain::verify_chain;
        with_schema(|url, schema| async move {
            let store = PostgresStore::connect_with_schema(&url, &schema)
                .await
                .unwrap();
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
            let c = try_connect(&url).await.unwrap();
            c.batch_execute(&format!("SET search_path TO {}", quote_ident(&schema)))
                .await
                .unwrap();
            let edit = "UPDATE breach_log SET body = replace(body, '\"bytes\":2', '\"bytes\":0') WHERE seq = 2";
            let refused = c.execute(edit, &[]).await.unwrap_err();
            let text = format!("{refused:?}");
            assert!(text.contains("append-only"), "{text}");
            assert!(c.execute("DELETE FROM breach_log WHERE seq = 3", &[]).await.is_err());
            assert!(c.batch_execute("TRUNCATE breach_log").await.is_err());
            // The owner can disable the triggers; the chain still tells.
            c.batch_execute("ALTER TABLE breach_log DISABLE TRIGGER USER")
                .await
                .unwrap();
            assert_eq!(c.execute(edit, &[]).await.unwrap(), 1);
            let log = whole_log(&store).await;
            assert_eq!(log[1].body["evidence"]["bytes"], 0);
            let err = verify_chain(log.into_iter()).unwrap_err();
            assert_eq!(err.seq, 2, "{err}");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_observing_breaches_at_once_keep_one_chain_and_one_open_breach_per_key() {
        use crate::breach::BreachChange;
        use crate::store::suite::{observation, whole_log};
        use sov_evidence::chain::verify_chain;
        with_schema(|url, schema| async move {
            let (a, b) = tokio::join!(
                PostgresStore::connect_with_schema(&url, &schema),
                PostgresStore::connect_with_schema(&url, &schema)
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            let run = |s: PostgresStore, tag: i64| async move {
                let mut opened = 0;
                for i in 0..20_i64 {
                    // Both replicas see the same 10 keys, with evidence that changes.
                    let obs = observation(
                        "r",
                        &format!("n{}", i % 10),
                        "s",
                        1000 + i,
                        serde_json::json!({"i": i, "replica": tag}),
                    );
                    if matches!(
                        s.observe_breach(obs).await.unwrap(),
                        BreachChange::Opened(_)
                    ) {
                        opened += 1;
                    }
                }
                opened
            };
            let (x, y) = tokio::join!(run(a.clone(), 1), run(b.clone(), 2));
            assert_eq!(x + y, 10);
            assert_eq!(
                count(
                    &url,
                    &schema,
                    "SELECT COUNT(*) FROM breaches WHERE state = 'open'"
                )
                .await,
                10
            );
            let log = whole_log(&a).await;
            assert_eq!(log.len(), 40);
            assert_eq!(verify_chain(log.into_iter()), Ok(40));
        })
        .await;
    }

    #[test]
    fn a_password_in_a_url_is_hidden() {
        assert_eq!(
            redact_url("postgres://sov:s3cret@db:5432/sov?sslmode=disable"),
            "postgres://sov:***@db:5432/sov?sslmode=disable"
        );
        assert_eq!(redact_url("postgres://sov@db/sov"), "postgres://sov@db/sov");
        assert_eq!(redact_url("sqlite:x"), "sqlite:x");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
