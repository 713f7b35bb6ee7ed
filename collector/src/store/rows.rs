//! Result rows to the store's types and protobuf messages, written once for both backends:
//! each backend selects the same columns in the same order and reads them through
//! [`Columns`], so a mapping cannot drift between SQLite and PostgreSQL.

use std::collections::BTreeMap;

use sov_evidence::chain::LogRecord;
use sov_proto::pb;

use super::{
    GpuUsageRow, NodePeer, NodeRow, OutboxItem, OutboxRow, SinkStats, StoreError, TokenRecord,
};
use crate::breach::Breach;

/// One result row, read by column index the same way from either backend.
pub(crate) trait Columns {
    /// A text column.
    fn text(&self, i: usize) -> Result<String, StoreError>;
    /// An integer column (64 bits in both schemas).
    fn int(&self, i: usize) -> Result<i64, StoreError>;
    /// A nullable integer column.
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError>;
    /// A floating-point column.
    fn real(&self, i: usize) -> Result<f64, StoreError>;
    /// A boolean (SQLite stores 0 or 1).
    fn flag(&self, i: usize) -> Result<bool, StoreError>;
    /// A byte string (BLOB, BYTEA).
    fn blob(&self, i: usize) -> Result<Vec<u8>, StoreError>;

    /// A counter: never negative in a database this code wrote, so clamp rather than fail.
    fn count(&self, i: usize) -> Result<u64, StoreError> {
        Ok(u64::try_from(self.int(i)?).unwrap_or(0))
    }

    /// A sequence number: a negative one is a corrupt database, and an error naming `what`.
    fn seq(&self, i: usize, what: &str) -> Result<u64, StoreError> {
        let v = self.int(i)?;
        u64::try_from(v).map_err(|_| StoreError::Range(format!("{what} {v} is negative")))
    }
}

fn sqlite(source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        context: "read row",
        source,
    }
}

impl Columns for rusqlite::Row<'_> {
    fn text(&self, i: usize) -> Result<String, StoreError> {
        self.get(i).map_err(sqlite)
    }
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.get(i).map_err(sqlite)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        self.get(i).map_err(sqlite)
    }
    fn real(&self, i: usize) -> Result<f64, StoreError> {
        self.get(i).map_err(sqlite)
    }
    fn flag(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.int(i)? != 0)
    }
    fn blob(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        self.get(i).map_err(sqlite)
    }
}

fn postgres(source: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres {
        context: "read row",
        source,
    }
}

impl Columns for tokio_postgres::Row {
    fn text(&self, i: usize) -> Result<String, StoreError> {
        self.try_get(i).map_err(postgres)
    }
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.try_get(i).map_err(postgres)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        self.try_get(i).map_err(postgres)
    }
    fn real(&self, i: usize) -> Result<f64, StoreError> {
        self.try_get(i).map_err(postgres)
    }
    fn flag(&self, i: usize) -> Result<bool, StoreError> {
        self.try_get(i).map_err(postgres)
    }
    fn blob(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        self.try_get(i).map_err(postgres)
    }
}

/// A `u32` field from an integer column (0 when it does not fit).
fn small(r: &impl Columns, i: usize) -> Result<u32, StoreError> {
    Ok(u32::try_from(r.int(i)?).unwrap_or(0))
}

/// The columns of a breach row, in the order [`breach`] reads them.
pub(crate) const BREACH_COLUMNS: &str = "breach_id, rule, node, subject, severity, state, evidence, \
     opened_ms, last_seen_ms, resolved_ms, obs_count";

/// A breach row (columns as [`BREACH_COLUMNS`]) and its stored evidence text.
pub(crate) fn breach(r: &impl Columns) -> Result<(Breach, String), StoreError> {
    let breach_id = r.text(0)?;
    let evidence = r.text(6)?;
    let range =
        |e: crate::breach::ParseEnumError| StoreError::Range(format!("breach {breach_id}: {e}"));
    let b = Breach {
        severity: r.text(4)?.parse().map_err(range)?,
        state: r.text(5)?.parse().map_err(range)?,
        evidence: serde_json::from_str(&evidence).unwrap_or(serde_json::Value::Null),
        opened_at_unix_ms: r.int(7)?,
        last_seen_unix_ms: r.int(8)?,
        resolved_at_unix_ms: r.opt_int(9)?,
        count: r.count(10)?,
        rule: r.text(1)?,
        node: r.text(2)?,
        subject: r.text(3)?,
        breach_id,
    };
    Ok((b, evidence))
}

/// A chained log record: `seq, at_ms, <key>, <event>, body, prev_hash, hash`
/// ([`super::chain::ChainedLog::read`]).
pub(crate) fn log_record(r: &impl Columns) -> Result<LogRecord, StoreError> {
    Ok(LogRecord::from_stored(
        r.seq(0, "log seq")?,
        r.int(1)?,
        r.text(2)?,
        r.text(3)?,
        r.text(4)?,
        r.text(5)?,
        r.text(6)?,
    ))
}

/// An API token: `token_id, hash, name, role, created_ms, expires_ms`.
pub(crate) fn token(r: &impl Columns) -> Result<TokenRecord, StoreError> {
    let token_id = r.text(0)?;
    Ok(TokenRecord {
        role: r
            .text(3)?
            .parse()
            .map_err(|e| StoreError::Range(format!("token {token_id}: {e}")))?,
        hash: r.text(1)?,
        name: r.text(2)?,
        created_unix_ms: r.int(4)?,
        expires_unix_ms: r.int(5)?,
        token_id,
    })
}

/// A node with its latest epoch's counters (the columns of both backends' node listing).
pub(crate) fn node(r: &impl Columns) -> Result<NodeRow, StoreError> {
    let reports = r.count(8)?;
    let last_seq = r.count(9)?;
    // Every epoch's missing reports: a new epoch (or one far ahead) never erases an older
    // epoch's gaps.
    let missing = r.count(21)?.max(last_seq.saturating_sub(reports));
    let labels: BTreeMap<String, String> = serde_json::from_str(&r.text(5)?).unwrap_or_default();
    Ok(NodeRow {
        node: r.text(0)?,
        site: r.text(1)?,
        country: r.text(2)?,
        hostname: r.text(3)?,
        agent_version: r.text(4)?,
        labels,
        last_seen_unix_ms: r.int(6)?,
        epoch: r.count(7)?,
        reports,
        last_seq,
        missing,
        epochs: u32::try_from(r.count(10)?).unwrap_or(u32::MAX),
        #[allow(clippy::cast_possible_truncation)]
        cpu_percent: r.real(11)? as f32,
        memory_used_bytes: r.count(12)?,
        memory_total_bytes: r.count(13)?,
        conflicts: r.count(14)?,
        dropped: r.count(15)?.min(missing),
        gpu_state: r.text(16)?,
        gpu_count: u32::try_from(r.count(17)?).unwrap_or(u32::MAX),
        #[allow(clippy::cast_possible_truncation)]
        gpu_util_percent: r.real(18)? as f32,
        gpu_memory_used_bytes: r.count(19)?,
        gpu_memory_total_bytes: r.count(20)?,
    })
}

/// Fold one weight-file row (a copy of a model, with its users) into `out`, sorted by key:
/// a new key starts a new model, unless `limit` models are there already (then `false`).
pub(crate) fn push_model(
    out: &mut Vec<pb::ModelSummary>,
    r: &impl Columns,
    limit: u32,
) -> Result<bool, StoreError> {
    let key = r.text(0)?;
    if out.last().map(|m| m.key.as_str()) != Some(key.as_str()) {
        if out.len() >= limit as usize {
            return Ok(false);
        }
        out.push(pb::ModelSummary {
            key,
            model: r.text(6)?,
            identity_source: r.text(9)?,
            format: r.text(3)?,
            sha256: r.text(5)?,
            size_bytes: r.count(4)?,
            parameter_count: r.count(11)?,
            revision: r.text(7)?,
            repo_path: r.text(8)?,
            publisher: r.text(10)?,
            copies: vec![],
            users: vec![],
            ..Default::default()
        });
    }
    let Some(m) = out.last_mut() else {
        return Ok(true);
    };
    // The declared lineage lives in the stored report of the file (column 21): the first copy
    // that declares any gives it (copies of one file in one directory declare the same).
    if m.base_models.is_empty() && m.adapter_type.is_empty() {
        let (bases, adapter) = declared_lineage(&r.blob(21)?);
        m.base_models = bases;
        m.adapter_type = adapter;
    }
    // A copy a training run was observed writing (columns 22, 23): the run, and its
    // base-weight inputs as observed bases.
    let run_id = r.text(22)?;
    if m.derived_from_run.is_empty() && !run_id.is_empty() {
        m.derived_from_run = format!("{node}:{run_id}", node = r.text(1)?);
        let observed: Vec<String> = serde_json::from_str(&r.text(23)?).unwrap_or_default();
        for name in observed.into_iter().take(MAX_MODEL_BASES) {
            if !m.base_models.iter().any(|b| b.name == name) {
                m.base_models.push(pb::ModelBase {
                    name: cut_utf8(name, MAX_MODEL_BASE_FIELD_BYTES),
                    source: "training-run".to_owned(),
                    ..Default::default()
                });
            }
        }
    }
    let node = r.text(1)?;
    let path = r.text(2)?;
    // The file as the agent sent it (column 21, `detail`): its container and its users'.
    // A row stored before containers were known, or an undecodable one, names none.
    let detail: pb::WeightFile = prost::Message::decode(r.blob(21)?.as_slice()).unwrap_or_default();
    let user_container = |pid: u32| {
        detail
            .users
            .iter()
            .find(|u| u.pid == pid)
            .and_then(|u| u.container.as_deref().cloned())
    };
    m.copies.push(pb::ModelCopy {
        container: detail.container.clone(),
        container_path: detail.container_path.clone(),
        hashing_percent: detail.hashing_percent.filter(|_| detail.sha256.is_empty()),
        node: node.clone(),
        site: r.text(19)?,
        country: r.text(20)?,
        path: path.clone(),
        storage: if r.flag(14)? {
            r.text(13)?
        } else {
            "local".to_owned()
        },
        server: r.text(15)?,
        first_seen_unix_ms: r.int(17)?,
        last_seen_unix_ms: r.int(18)?,
        mount_point: r.text(12)?,
    });
    let users: Vec<serde_json::Value> = serde_json::from_str(&r.text(16)?).unwrap_or_default();
    for u in users {
        let pid = u["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        m.users.push(pb::ModelUser {
            node: node.clone(),
            container: user_container(pid),
            pid,
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
    Ok(true)
}

/// One row of [`super::MODEL_HOLDINGS`] into `out` (by key): the model on its first copy,
/// then the copy and its users' pids. The first copy's name, publisher and size stand for
/// the model, as [`push_model`]'s do.
pub(crate) fn push_holding(
    out: &mut BTreeMap<String, pb::ModelSummary>,
    r: &impl Columns,
) -> Result<(), StoreError> {
    let key = r.text(0)?;
    let m = match out.entry(key) {
        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::btree_map::Entry::Vacant(e) => {
            let key = e.key().clone();
            e.insert(pb::ModelSummary {
                key,
                model: r.text(1)?,
                publisher: r.text(2)?,
                size_bytes: r.count(3)?,
                ..Default::default()
            })
        }
    };
    let node = r.text(4)?;
    let users = r.text(7)?;
    if users != "[]" {
        let users: Vec<serde_json::Value> = serde_json::from_str(&users).unwrap_or_default();
        for u in users {
            m.users.push(pb::ModelUser {
                node: node.clone(),
                pid: u["pid"]
                    .as_u64()
                    .and_then(|p| u32::try_from(p).ok())
                    .unwrap_or(0),
                ..Default::default()
            });
        }
    }
    m.copies.push(pb::ModelCopy {
        node,
        site: r.text(5)?,
        country: r.text(6)?,
        ..Default::default()
    });
    Ok(())
}

/// At most this many declared bases are shown per model (the agent sends at most 8).
pub(crate) const MAX_MODEL_BASES: usize = 8;
/// Declared base names, organisations and URLs are cut to this many bytes.
pub(crate) const MAX_MODEL_BASE_FIELD_BYTES: usize = 512;

/// The bases and adapter kind a stored `WeightFile` declares, bounded (a node's claim is
/// hostile input: at most [`MAX_MODEL_BASES`], each field cut, nothing from a blob that does not
/// decode). Origins are left empty: the query layer fills them under the policy.
pub(crate) fn declared_lineage(detail: &[u8]) -> (Vec<pb::ModelBase>, String) {
    let Ok(f) = <pb::WeightFile as prost::Message>::decode(detail) else {
        return (vec![], String::new());
    };
    let Some(id) = f.identity else {
        return (vec![], String::new());
    };
    let cut = |s: String| cut_utf8(s, MAX_MODEL_BASE_FIELD_BYTES);
    let bases = id
        .base_models
        .into_iter()
        .filter(|b| !b.name.trim().is_empty())
        .take(MAX_MODEL_BASES)
        .map(|b| pb::ModelBase {
            name: cut(b.name),
            organization: cut(b.organization),
            repo_url: cut(b.repo_url),
            source: cut(b.source),
            origin: String::new(),
        })
        .collect();
    (bases, cut(id.adapter_type))
}

/// `s` cut to at most `max` bytes on a character boundary.
fn cut_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Columns of one egress row (a backend may select more after them).
pub(crate) const EGRESS_COLUMNS: usize = 26;

/// One egress row: `country, node, process, pid, asn, org, remote_address, remote_port,
/// geo_source, bytes_sent, bytes_received, connections, min_rtt_us`, then the verdict and
/// measurement columns of [`super::egress_verdict_select`], then the container columns of
/// [`super::containers::egress_container_select`] (then the row count).
pub(crate) fn egress(r: &impl Columns) -> Result<pb::EgressRow, StoreError> {
    let physics = r.text(16)?;
    Ok(pb::EgressRow {
        pod_namespace: r.text(21)?,
        pod_name: r.text(22)?,
        container_name: r.text(23)?,
        container_id: r.text(24)?,
        image: r.text(25)?,
        answers: answers(&r.text(13)?),
        contested: r.int(14)? != 0,
        operator_country: r.text(15)?,
        physics,
        distance_km: small(r, 17)?,
        limit_km: small(r, 18)?,
        conntrack_bytes: r.count(19)?,
        unmeasured_flows: r.count(20)?,
        country: r.text(0)?,
        node: r.text(1)?,
        process: r.text(2)?,
        pid: small(r, 3)?,
        asn: small(r, 4)?,
        org: r.text(5)?,
        remote_address: r.text(6)?,
        remote_port: small(r, 7)?,
        geo_source: r.text(8)?,
        bytes_sent: r.count(9)?,
        bytes_received: r.count(10)?,
        connections: r.count(11)?,
        min_rtt_us: small(r, 12)?,
    })
}

/// The stored answers (JSON written at ingest; a row from before they were kept has none).
pub(crate) fn answers(json: &str) -> Vec<pb::GeoAnswer> {
    if json.is_empty() {
        return Vec::new();
    }
    let parsed: Vec<serde_json::Value> = serde_json::from_str(json).unwrap_or_default();
    parsed
        .iter()
        .map(|a| pb::GeoAnswer {
            source: a["source"].as_str().unwrap_or_default().to_owned(),
            country: a["country"].as_str().unwrap_or_default().to_owned(),
            kind: a["kind"].as_str().unwrap_or_default().to_owned(),
            impossible: a["impossible"].as_bool().unwrap_or(false),
            distance_km: a["distance_km"]
                .as_u64()
                .and_then(|d| u32::try_from(d).ok())
                .unwrap_or(0),
        })
        .collect()
}

/// GPU-seconds of one process: `node, pid, process, pod_namespace, gpu_seconds`.
pub(crate) fn gpu_usage(r: &impl Columns) -> Result<GpuUsageRow, StoreError> {
    Ok(GpuUsageRow {
        node: r.text(0)?,
        pid: small(r, 1)?,
        process: r.text(2)?,
        pod_namespace: r.text(3)?,
        gpu_seconds: r.real(4)?,
    })
}

/// A node's last address: `node, address, country, asn, source, seen_ms`.
pub(crate) fn peer(r: &impl Columns) -> Result<NodePeer, StoreError> {
    Ok(NodePeer {
        node: r.text(0)?,
        address: r.text(1)?,
        country: r.text(2)?,
        asn: small(r, 3)?,
        source: r.text(4)?,
        seen_unix_ms: r.int(5)?,
    })
}

/// The columns of an outbox row, in the order [`outbox_row`] reads them.
pub(crate) const OUTBOX_COLUMNS: &str =
    "log_seq, breach_id, event, payload, attempts, next_attempt_ms, created_ms";

/// One pending outbox row of `sink` (columns as [`OUTBOX_COLUMNS`]).
pub(crate) fn outbox_row(r: &impl Columns, sink: &str) -> Result<OutboxRow, StoreError> {
    Ok(OutboxRow {
        sink: sink.to_owned(),
        item: OutboxItem {
            log_seq: r.seq(0, "log seq")?,
            breach_id: r.text(1)?,
            event: r.text(2)?,
            payload: r.text(3)?,
        },
        attempts: u32::try_from(r.int(4)?).unwrap_or(u32::MAX),
        next_attempt_unix_ms: r.int(5)?,
        created_unix_ms: r.int(6)?,
    })
}

/// Outbox counters of one sink: `sink, pending, delivered, failed, failed_attempts`.
pub(crate) fn sink_stats(r: &impl Columns) -> Result<SinkStats, StoreError> {
    Ok(SinkStats {
        sink: r.text(0)?,
        pending: r.seq(1, "outbox count")?,
        delivered: r.seq(2, "outbox count")?,
        failed: r.seq(3, "outbox count")?,
        failed_attempts: r.seq(4, "outbox count")?,
    })
}
