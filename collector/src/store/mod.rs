//! Durable storage behind one trait, [`Store`], one folder per backend:
//!
//! - [`sqlite`]: embedded SQLite in WAL mode, the default (one file under `data_dir`);
//! - [`postgres`]: PostgreSQL, for several collector replicas on one database.
//!
//! Each backend folder holds its connection and `impl Store` (`mod.rs`) and one file per
//! concern (ingest, queries, breaches and the chained logs, outbox, tokens, retention);
//! migrations are `.sql` files side by side in `collector/migrations/{sqlite,postgres}/`.
//! Shared by both: the row types (this file, `outbox.rs`, `tokens.rs`, `retention.rs`), the
//! row mappings (`rows.rs`), the chained-log tables (`chain.rs`), the group-commit queue, and
//! the behaviour suite both run (`suite.rs`). This layer imports nothing above
//! [`crate::breach`] and [`crate::auth`].
//!
//! A report is committed before [`Store::ingest`] returns, and the ingest service acks only
//! after that, so nothing acknowledged is lost. Re-sent reports are recognised by their key
//! `(node, epoch, seq)` and stored once.
//!
//! Policy breaches live here too ([`Store::observe_breach`] and friends): the `breaches` table
//! holds each breach's current state, and `breach_log` the hash-chained record of every
//! change ([`crate::breach`]). The log is append-only: no code path updates or deletes its
//! rows (the databases refuse it with a trigger too), and [`Store::prune`] touches neither
//! table. Appends are serialised (SQLite: its single writer; PostgreSQL: an advisory lock
//! held by every breach transaction), so sequence numbers and links stay consistent with
//! several collector replicas.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::breach::{Breach, Observation};
pub use crate::breach::{BreachChange, BreachFilter};
use sov_evidence::audit::{AuditEntry, AuditRecord};
use sov_evidence::chain::LogRecord;

/// `impl Store` for a backend from its concern modules (`ingest`, `queries`, `breaches`,
/// `outbox`, `tokens`, `retention`, each with one function per method it serves): the one
/// place that says which file of a backend answers which method. Both backends invoke it.
macro_rules! store_by_concern {
    ($backend:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $backend {
            async fn append_audit(
                &self,
                entry: $crate::store::AuditEntry,
            ) -> Result<$crate::store::AuditRecord, $crate::store::StoreError> {
                breaches::append_audit(self, entry).await
            }

            async fn audit_log(
                &self,
                after_seq: u64,
                limit: u32,
            ) -> Result<Vec<$crate::store::AuditRecord>, $crate::store::StoreError> {
                breaches::audit_log(self, after_seq, limit).await
            }

            async fn missing_ranges(
                &self,
                node: &str,
                epoch: u64,
                limit: u32,
            ) -> Result<Vec<(u64, u64)>, $crate::store::StoreError> {
                queries::missing_ranges(self, node, epoch, limit).await
            }

            async fn gpu_usage(
                &self,
                since_unix_ms: i64,
                until_unix_ms: i64,
                limit: u32,
            ) -> Result<Vec<$crate::store::GpuUsageRow>, $crate::store::StoreError> {
                queries::gpu_usage(self, since_unix_ms, until_unix_ms, limit).await
            }

            async fn reports_by_node(
                &self,
                since_unix_ms: i64,
                until_unix_ms: i64,
                limit: u32,
            ) -> Result<Vec<(String, u64)>, $crate::store::StoreError> {
                queries::reports_by_node(self, since_unix_ms, until_unix_ms, limit).await
            }

            async fn insert_token(
                &self,
                token: $crate::store::TokenRecord,
            ) -> Result<(), $crate::store::StoreError> {
                tokens::insert_token(self, token).await
            }

            async fn list_tokens(
                &self,
            ) -> Result<Vec<$crate::store::TokenRecord>, $crate::store::StoreError> {
                tokens::list_tokens(self).await
            }

            async fn delete_token(
                &self,
                token_id: &str,
            ) -> Result<bool, $crate::store::StoreError> {
                tokens::delete_token(self, token_id).await
            }

            async fn token_by_hash(
                &self,
                hash: &str,
            ) -> Result<Option<$crate::store::TokenRecord>, $crate::store::StoreError> {
                tokens::token_by_hash(self, hash).await
            }

            /// Group commit: the report joins the queue; whoever holds the writer next stores every
            /// queued report (up to [`super::MAX_BATCH_REPORTS`] per transaction) with one commit and
            /// one fsync, then answers each. The queue is drained until empty by a blocking task that
            /// is not cancelled with the caller, so a caller that goes away cannot abort the others.
            async fn ingest(
                &self,
                report: $crate::store::IncomingReport,
            ) -> Result<$crate::store::IngestOutcome, $crate::store::StoreError> {
                ingest::ingest(self, report).await
            }

            async fn underived(
                &self,
                limit: u32,
            ) -> Result<Vec<$crate::store::Underived>, $crate::store::StoreError> {
                ingest::underived(self, limit).await
            }

            async fn underived_of(
                &self,
                nodes: &[String],
                limit: u32,
            ) -> Result<Vec<$crate::store::Underived>, $crate::store::StoreError> {
                ingest::underived_of(self, nodes, limit).await
            }

            async fn derive(
                &self,
                batch: Vec<$crate::store::Derivation>,
            ) -> Result<u64, $crate::store::StoreError> {
                ingest::derive(self, batch).await
            }

            fn derives_a_share(&self) -> bool {
                ingest::DERIVES_A_SHARE
            }

            fn another_deriver(&self) -> Option<std::sync::Arc<dyn $crate::store::Store>> {
                ingest::another_deriver(self)
            }

            async fn derive_status(
                &self,
            ) -> Result<$crate::store::DeriveStatus, $crate::store::StoreError> {
                queries::derive_status(self).await
            }

            async fn list_nodes(
                &self,
                after: &str,
                limit: u32,
            ) -> Result<Vec<$crate::store::NodeRow>, $crate::store::StoreError> {
                queries::list_nodes(self, after, limit).await
            }

            async fn list_models(
                &self,
                query: &str,
                after: &str,
                limit: u32,
            ) -> Result<Vec<::sov_proto::pb::ModelSummary>, $crate::store::StoreError> {
                queries::list_models(self, query, after, limit).await
            }

            async fn model_holdings(
                &self,
                cap: u32,
            ) -> Result<(Vec<::sov_proto::pb::ModelSummary>, bool), $crate::store::StoreError> {
                queries::model_holdings(self, cap).await
            }

            async fn list_training(
                &self,
                since_unix_ms: i64,
                limit: u32,
            ) -> Result<Vec<::sov_proto::pb::TrainingRunSummary>, $crate::store::StoreError> {
                training::list_training(self, since_unix_ms, limit).await
            }

            async fn egress(
                &self,
                q: crate::store::EgressQuery,
            ) -> Result<(Vec<::sov_proto::pb::EgressRow>, u64), $crate::store::StoreError> {
                queries::egress(self, q).await
            }

            async fn prune(
                &self,
                retention: $crate::store::Retention,
            ) -> Result<$crate::store::PruneStats, $crate::store::StoreError> {
                retention::prune(self, retention).await
            }

            async fn roll_up(
                &self,
                before_unix_ms: i64,
            ) -> Result<$crate::store::RollupStats, $crate::store::StoreError> {
                retention::roll_up(self, before_unix_ms).await
            }

            async fn observe_breach(
                &self,
                obs: $crate::store::Observation,
            ) -> Result<$crate::store::BreachChange, $crate::store::StoreError> {
                breaches::observe_breach(self, obs).await
            }

            async fn resolve_quiet_breaches(
                &self,
                rule: &str,
                quiet_before_unix_ms: i64,
                at_unix_ms: i64,
            ) -> Result<Vec<$crate::store::Breach>, $crate::store::StoreError> {
                breaches::resolve_quiet_breaches(self, rule, quiet_before_unix_ms, at_unix_ms).await
            }

            async fn record_evaluation(
                &self,
                observations: Vec<$crate::store::Observation>,
                quiet: Vec<(String, i64)>,
                at_unix_ms: i64,
            ) -> Result<
                (Vec<$crate::store::BreachChange>, Vec<$crate::store::Breach>),
                $crate::store::StoreError,
            > {
                breaches::record_evaluation(self, observations, quiet, at_unix_ms).await
            }

            async fn list_breaches(
                &self,
                filter: $crate::store::BreachFilter,
            ) -> Result<Vec<$crate::store::Breach>, $crate::store::StoreError> {
                breaches::list_breaches(self, filter).await
            }

            async fn breach_log(
                &self,
                after_seq: u64,
                limit: u32,
            ) -> Result<Vec<$crate::store::LogRecord>, $crate::store::StoreError> {
                breaches::breach_log(self, after_seq, limit).await
            }

            async fn breach_log_end(&self) -> Result<u64, $crate::store::StoreError> {
                breaches::breach_log_end(self).await
            }

            async fn chain_head(
                &self,
                log: &str,
            ) -> Result<(u64, String), $crate::store::StoreError> {
                breaches::chain_head(self, $crate::store::chained_log(log)?).await
            }

            async fn add_checkpoint(
                &self,
                log: &str,
                seq: u64,
                hash: &str,
                at_unix_ms: i64,
                signed: &str,
            ) -> Result<(), $crate::store::StoreError> {
                $crate::store::chained_log(log)?;
                breaches::add_checkpoint(self, log, seq, hash, at_unix_ms, signed).await
            }

            async fn checkpoints(
                &self,
                log: &str,
                after_seq: Option<u64>,
                limit: u32,
            ) -> Result<Vec<(u64, String)>, $crate::store::StoreError> {
                breaches::checkpoints(self, log, after_seq, limit).await
            }

            async fn latest_checkpoint(
                &self,
                log: &str,
            ) -> Result<Option<String>, $crate::store::StoreError> {
                breaches::latest_checkpoint(self, log).await
            }

            async fn outbox_cursor(
                &self,
                sink: &str,
            ) -> Result<Option<u64>, $crate::store::StoreError> {
                outbox::outbox_cursor(self, sink).await
            }

            async fn outbox_enqueue(
                &self,
                sink: &str,
                items: Vec<$crate::store::OutboxItem>,
                cursor: u64,
                now_unix_ms: i64,
            ) -> Result<(), $crate::store::StoreError> {
                outbox::outbox_enqueue(self, sink, items, cursor, now_unix_ms).await
            }

            async fn outbox_head(
                &self,
                sink: &str,
            ) -> Result<Option<$crate::store::OutboxRow>, $crate::store::StoreError> {
                outbox::outbox_head(self, sink).await
            }

            async fn outbox_settle(
                &self,
                sink: &str,
                log_seq: u64,
                settle: $crate::store::Settle,
            ) -> Result<(), $crate::store::StoreError> {
                outbox::outbox_settle(self, sink, log_seq, settle).await
            }

            async fn outbox_stats(
                &self,
            ) -> Result<Vec<$crate::store::SinkStats>, $crate::store::StoreError> {
                outbox::outbox_stats(self).await
            }

            async fn take_lease(
                &self,
                name: &str,
                holder: &str,
                now_unix_ms: i64,
                ttl_ms: i64,
            ) -> Result<bool, $crate::store::StoreError> {
                outbox::take_lease(self, name, holder, now_unix_ms, ttl_ms).await
            }

            async fn note_peer(
                &self,
                peer: $crate::store::NodePeer,
            ) -> Result<(), $crate::store::StoreError> {
                ingest::note_peer(self, peer).await
            }

            async fn node_peers(
                &self,
            ) -> Result<Vec<$crate::store::NodePeer>, $crate::store::StoreError> {
                queries::node_peers(self).await
            }

            async fn add_enroll_tokens(
                &self,
                tokens: &[$crate::store::NewEnrollToken],
            ) -> Result<(), $crate::store::StoreError> {
                tokens::add_enroll_tokens(self, tokens).await
            }

            async fn spend_enroll_token(
                &self,
                hash: &str,
                node: &str,
                now_unix_ms: i64,
            ) -> Result<$crate::store::TokenSpend, $crate::store::StoreError> {
                tokens::spend_enroll_token(self, hash, node, now_unix_ms).await
            }

            async fn enroll_name_use(
                &self,
                hash: &str,
                node: &str,
            ) -> Result<$crate::store::NameUse, $crate::store::StoreError> {
                tokens::enroll_name_use(self, hash, node).await
            }
        }
    };
}
pub(crate) use store_by_concern;

mod chain;
pub mod containers;
mod generations;
mod minutes;
pub use minutes::late_rows_written;
mod outbox;
pub mod postgres;
mod retention;
pub mod rollup;
mod rows;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod suite;
#[cfg(test)]
mod suite_containers;
#[cfg(test)]
mod suite_late;
#[cfg(test)]
mod suite_rollup;
mod tokens;
mod training;

pub(crate) use chain::{AUDIT_LOG, BREACH_LOG, ChainedLog, chained_log};
pub use chain::{
    VERIFY_PAGE, verify_pages, verify_pages_anchored, verify_store_audit, verify_store_chain,
    verify_store_log,
};
pub use outbox::{OutboxItem, OutboxRow, Settle, SinkStats};
pub use retention::{Keep, PRUNE_EVERY, PruneStats, Retention, prune_loop};
pub use rollup::{RollupStats, rollup_loop};
pub use sqlite::SqliteStore;
pub use tokens::{NameUse, NewEnrollToken, TokenRecord, TokenSpend};

/// `[store]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// "" or "sqlite:" (embedded SQLite under `data_dir`, the default), "sqlite:DIR" (relative
    /// to `data_dir`), or "postgres://user@host:port/db" for several collector replicas on one
    /// PostgreSQL.
    #[serde(default)]
    pub url: String,
}

/// A sequence range an agent declared dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapRecord {
    /// First dropped sequence number.
    pub first_seq: u64,
    /// Last dropped sequence number (inclusive).
    pub last_seq: u64,
    /// Why: "spool_full", "corrupt", "too_large" or "unspecified".
    pub reason: String,
    /// When the agent dropped them.
    pub dropped_unix_ms: i64,
}

/// One validated report, ready to store.
#[derive(Debug, Clone)]
pub struct IncomingReport {
    /// Node name (already checked against the client certificate).
    pub node: String,
    /// Spool epoch.
    pub epoch: u64,
    /// Sequence number within the epoch.
    pub seq: u64,
    /// When the agent built the report.
    pub observed_unix_ms: i64,
    /// When the collector received it.
    pub received_unix_ms: i64,
    /// Declared site.
    pub site: String,
    /// Declared country.
    pub country: String,
    /// Host name.
    pub hostname: String,
    /// Agent version.
    pub agent_version: String,
    /// Operator labels.
    pub labels: BTreeMap<String, String>,
    /// Latest total CPU share, 0-100.
    pub cpu_percent: f32,
    /// Memory in use.
    pub memory_used_bytes: u64,
    /// Memory installed.
    pub memory_total_bytes: u64,
    /// Host, GPU and process observations, stored as time series.
    pub telemetry: Telemetry,
    /// Gap records carried by the report.
    pub gaps: Vec<GapRecord>,
    /// The whole report as received (protobuf), kept for later analysis.
    pub body: Vec<u8>,
}

/// The observations of one report that become time series rows.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    /// Host sample.
    pub host: Option<sov_proto::pb::HostSample>,
    /// Whether GPUs could be observed.
    pub gpu_state: Option<sov_proto::pb::GpuState>,
    /// One sample per GPU.
    pub gpus: Vec<sov_proto::pb::GpuSample>,
    /// Processes reported (names for GPU usage rows).
    pub processes: Vec<sov_proto::pb::ProcessInfo>,
    /// Weight file inventory carried by the report.
    pub weights: WeightUpdate,
    /// Flows with their verdicts.
    pub flows: Vec<FlowRecord>,
    /// Training runs (their latest state).
    pub training: Vec<sov_proto::pb::TrainingRun>,
}

/// One flow, geolocated at ingest. The text beside the flow is shared (`Arc<str>`): the
/// deriver makes each distinct process name, place and verdict once per batch and every flow
/// of the batch points at it, instead of a copy per flow (PERFORMANCE.md §8q: the copies and
/// their frees were a fifth of the enrichment's CPU).
#[derive(Debug, Clone, Default)]
pub struct FlowRecord {
    /// The flow as the agent reported it.
    pub flow: sov_proto::pb::Flow,
    /// Name of the owning process (from the report's process list), "" when unknown.
    pub process: Arc<str>,
    /// Destination country, "" when unknown.
    pub country: Arc<str>,
    /// Destination ASN, 0 when unknown.
    pub asn: u32,
    /// Destination organisation.
    pub org: Arc<str>,
    /// Which database placed it.
    pub geo_source: Arc<str>,
    /// Every source's answer, the speed-of-light check and the operator's country.
    pub verdict: VerdictColumns,
}

/// The verdict of a flow's destination as stored beside the flow (issue 16), kept in one
/// named piece so the flow write path can carry it whatever its shape. Both backends write
/// [`VERDICT_COLUMNS`] in this order and merge rows with [`VERDICT_UPSERT`]. Its text is
/// shared, so a clone copies no string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerdictColumns {
    /// Every source's answer, JSON `[{"source","country","kind","impossible","distance_km"}]`
    /// (the protobuf `GeoAnswer` fields); "" when no source knows the address.
    pub answers_json: Arc<str>,
    /// The answers name more than one country and no override decides.
    pub contested: bool,
    /// Country where the operator of the destination's ASN is registered, "" when unknown.
    pub operator_country: Arc<str>,
    /// The speed-of-light check of the verdict's country: "possible", "impossible", or ""
    /// (not checked).
    pub physics: Arc<str>,
    /// Distance from the node's site to the nearest point of the verdict's country, km.
    pub distance_km: u32,
    /// The farthest the flow's minimum RTT allows, km.
    pub limit_km: u32,
}

/// The verdict and measurement columns of `flows_minute`, in the order both backends write
/// them after the original columns.
pub const VERDICT_COLUMNS: &str = "answers, contested, operator_country, physics, distance_km, limit_km, conntrack_bytes, unmeasured_flows";

/// How a stored `flows_minute` row absorbs another flow of the same key: the verdict of the
/// flow with the smaller (tighter) minimum RTT wins, measurement counts add up. Shared by both
/// backends' upserts (both know `excluded` and the table-qualified old row).
pub const VERDICT_UPSERT: &str = "
        answers = CASE WHEN excluded.min_rtt_us <> 0 AND (flows_minute.min_rtt_us = 0 OR excluded.min_rtt_us < flows_minute.min_rtt_us)
                       THEN excluded.answers ELSE flows_minute.answers END,
        physics = CASE WHEN excluded.min_rtt_us <> 0 AND (flows_minute.min_rtt_us = 0 OR excluded.min_rtt_us < flows_minute.min_rtt_us)
                       THEN excluded.physics ELSE flows_minute.physics END,
        distance_km = CASE WHEN excluded.min_rtt_us <> 0 AND (flows_minute.min_rtt_us = 0 OR excluded.min_rtt_us < flows_minute.min_rtt_us)
                       THEN excluded.distance_km ELSE flows_minute.distance_km END,
        limit_km = CASE WHEN excluded.min_rtt_us <> 0 AND (flows_minute.min_rtt_us = 0 OR excluded.min_rtt_us < flows_minute.min_rtt_us)
                       THEN excluded.limit_km ELSE flows_minute.limit_km END,
        contested = CASE WHEN excluded.contested <> 0 THEN excluded.contested ELSE flows_minute.contested END,
        operator_country = CASE WHEN excluded.operator_country <> '' THEN excluded.operator_country
                                ELSE flows_minute.operator_country END,
        conntrack_bytes = flows_minute.conntrack_bytes + excluded.conntrack_bytes,
        unmeasured_flows = flows_minute.unmeasured_flows + excluded.unmeasured_flows";

/// The verdict and measurement columns an egress query selects after the common ones:
/// per destination (groupings "destination" and "flow") the destination's verdict (the
/// impossible reading wins, as the tightest RTT decides), otherwise none; measurement sums
/// always. `int` is the backend's integer cast suffix ("" or "::BIGINT").
pub fn egress_verdict_select(per_destination: bool, int: &str) -> String {
    let verdict = if per_destination {
        format!(
            "max(answers), max(contested){int}, max(operator_country),
             CASE WHEN max(CASE WHEN physics = 'impossible' THEN 1 ELSE 0 END) = 1 THEN 'impossible'
                  ELSE max(physics) END,
             max(distance_km){int}, COALESCE(MIN(NULLIF(limit_km, 0)), 0){int}"
        )
    } else {
        format!("'', 0{int}, '', '', 0{int}, 0{int}")
    };
    format!("{verdict}, SUM(conntrack_bytes){int}, SUM(unmeasured_flows){int}")
}

/// How one flow's bytes were measured, as the two stored counts: bytes measured by
/// connection tracking, and 1 when the flow's bytes are unknown. An older agent's flow
/// (measurement unspecified) is exact unless it says its bytes are unknown and carries none.
pub fn measurement_columns(flow: &sov_proto::pb::Flow) -> (u64, u64) {
    use sov_proto::pb::Measurement;
    match Measurement::try_from(flow.measurement).unwrap_or(Measurement::Unspecified) {
        Measurement::Conntrack => (flow.bytes_sent.saturating_add(flow.bytes_received), 0),
        Measurement::Unmeasured => (0, 1),
        Measurement::Exact => (0, 0),
        Measurement::Unspecified => (
            0,
            u64::from(!flow.bytes_known && flow.bytes_sent == 0 && flow.bytes_received == 0),
        ),
    }
}

/// One row of an egress query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressQuery {
    /// Inclusive start, Unix ms.
    pub since_unix_ms: i64,
    /// Exclusive end, Unix ms.
    pub until_unix_ms: i64,
    /// Grouping: "country", "node", "process", "asn", "destination", "pod", "namespace",
    /// "image", "container", or "flow" (node, process, container, destination address and
    /// port: what the breach rules read).
    pub by: String,
    /// Most rows.
    pub limit: u32,
    /// The jurisdiction's countries, for the breach rules' read: when not empty, groups of a
    /// per-destination grouping ("destination", "flow", "contested") whose destination is
    /// plainly inside (one of these countries, the sources agreeing, none of its answers
    /// ruled out by the speed of light) are left out, before the limit: no rule counts them
    /// (`policy::verdicts`), and a jurisdiction's own traffic neither slows the rules down nor
    /// pushes foreign rows past the limit. Empty: every group.
    pub leave_out_inside: Vec<String>,
}

/// The `HAVING` condition of an egress query that leaves out the groups plainly inside
/// `countries` ([`EgressQuery::leave_out_inside`]), written with the same aggregates the
/// verdict columns are read from ([`egress_verdict_select`]), so that whatever is left out is
/// counted inside by `policy::verdicts` under every `[verdicts]` setting (with
/// `impossible = "foreign"`, a destination inside with an answer ruled out is counted inside
/// too, and kept). `None` when there is nothing to leave out, or a country is not a plain code
/// (letters only; then nothing is left out).
pub fn plainly_inside_having(q: &EgressQuery) -> Option<String> {
    if q.leave_out_inside.is_empty() || !rollup::per_destination(&q.by) {
        return None;
    }
    let mut codes: Vec<String> = Vec::new();
    for c in &q.leave_out_inside {
        if c.is_empty() || c.len() > 8 || !c.chars().all(|ch| ch.is_ascii_alphabetic()) {
            return None;
        }
        for v in [c.clone(), c.to_ascii_uppercase()] {
            if !codes.contains(&v) {
                codes.push(v);
            }
        }
    }
    let list = codes
        .iter()
        .map(|c| format!("'{c}'"))
        .collect::<Vec<_>>()
        .join(", ");
    Some(format!(
        "HAVING NOT (country IN ({list}) AND max(contested) = 0
            AND max(CASE WHEN physics = 'impossible' THEN 1 ELSE 0 END) = 0
            AND max(answers) NOT LIKE '%\"impossible\":true%')"
    ))
}

/// A report's weight inventory: complete, or the changes since the previous report.
#[derive(Debug, Clone, Default)]
pub struct WeightUpdate {
    /// `files` is the node's complete inventory.
    pub full: bool,
    /// Files added or changed (or all, when `full`).
    pub files: Vec<sov_proto::pb::WeightFile>,
    /// Paths removed since the previous report.
    pub removed: Vec<String>,
    /// Set when `files` is one chunk of a full inventory spanning several reports: the other
    /// files are marked removed once every chunk of its generation is held
    /// ([`generations`]).
    pub chunk: Option<sov_proto::pb::InventoryChunk>,
    /// Weight files the report withheld, by path (still there: never marked removed).
    pub withheld_paths: Vec<String>,
    /// The report withheld weight files without naming every path: its generation removes
    /// nothing.
    pub withheld_unnamed: bool,
}

impl WeightUpdate {
    /// Whether applying it changes nothing.
    pub fn is_empty(&self) -> bool {
        !self.full && self.files.is_empty() && self.removed.is_empty() && self.chunk.is_none()
    }
}

/// GPU-seconds of one process over a time range ([`Store::gpu_usage`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuUsageRow {
    /// Node.
    pub node: String,
    /// Process id.
    pub pid: u32,
    /// Process name.
    pub process: String,
    /// GPU-seconds charged (over every GPU the process used).
    pub gpu_seconds: f64,
    /// Kubernetes namespace of the process's pod ("" outside a pod).
    pub pod_namespace: String,
}

/// What storing a report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// First time this key was seen: stored.
    Stored,
    /// The key was already stored; nothing changed.
    Duplicate,
    /// The key was already stored with a different observation time: the agent reused a
    /// sequence number. The first report is kept and the conflict counted.
    Conflict,
}

/// One node as the store knows it; counters are for its latest epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    /// Node name.
    pub node: String,
    /// Declared site.
    pub site: String,
    /// Declared country.
    pub country: String,
    /// Host name.
    pub hostname: String,
    /// Agent version.
    pub agent_version: String,
    /// Operator labels.
    pub labels: BTreeMap<String, String>,
    /// When the last report was received.
    pub last_seen_unix_ms: i64,
    /// Latest epoch.
    pub epoch: u64,
    /// Distinct reports stored in that epoch.
    pub reports: u64,
    /// Highest sequence number stored in that epoch.
    pub last_seq: u64,
    /// Sequence numbers never stored, in every epoch of the node (1..=last_seq of each): a
    /// new epoch does not erase an older one's gaps.
    pub missing: u64,
    /// Of those, how many the agent declared dropped (every epoch).
    pub dropped: u64,
    /// Epochs seen.
    pub epochs: u32,
    /// Reports whose key was reused for a different report, in every epoch.
    pub conflicts: u64,
    /// Latest CPU share.
    pub cpu_percent: f32,
    /// Latest memory in use.
    pub memory_used_bytes: u64,
    /// Memory installed.
    pub memory_total_bytes: u64,
    /// "ok", "none" (no device), "unavailable", or "" (never reported).
    pub gpu_state: String,
    /// GPUs in the latest report.
    pub gpu_count: u32,
    /// Mean utilisation of those GPUs, 0-100.
    pub gpu_util_percent: f32,
    /// GPU memory in use, all devices.
    pub gpu_memory_used_bytes: u64,
    /// GPU memory installed, all devices.
    pub gpu_memory_total_bytes: u64,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused an operation.
    #[error("sqlite: {context}")]
    Sqlite {
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// PostgreSQL refused an operation, or the connection failed.
    #[error("postgres: {context}")]
    Postgres {
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The data directory or database file could not be used.
    #[error("cannot open store at {path}")]
    Open {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stored value does not fit its type (corrupt database or a bug).
    #[error("stored value out of range: {0}")]
    Range(String),
    /// The database was written by a newer collector.
    #[error(
        "database schema version {found} is newer than this collector's {supported}; upgrade the collector"
    )]
    SchemaTooNew {
        /// Version in the file.
        found: i64,
        /// Version this code knows.
        supported: i64,
    },
    /// A blocking task failed.
    #[error("store task failed: {0}")]
    Task(String),
    /// The database file exists but is empty: a truncated file or a failed restore, never a
    /// store to start afresh in silence (every report, breach and audit record would be gone).
    #[error(
        "database file {path} is empty (0 bytes): a truncated file or a failed restore? Restore the backup, or remove the file to start a new, empty store"
    )]
    EmptyDatabase {
        /// The file.
        path: String,
    },
}

impl StoreError {
    /// Whether the error is about the data rather than the database being unavailable: a
    /// value out of range or refused by a constraint. Retrying the same data fails the same
    /// way.
    pub fn is_data_error(&self) -> bool {
        match self {
            Self::Range(_) => true,
            Self::Sqlite { source, .. } => {
                matches!(
                    source.sqlite_error_code(),
                    Some(
                        rusqlite::ErrorCode::ConstraintViolation
                            | rusqlite::ErrorCode::TooBig
                            | rusqlite::ErrorCode::TypeMismatch
                    )
                ) || matches!(
                    source,
                    rusqlite::Error::ToSqlConversionFailure(_)
                        | rusqlite::Error::IntegralValueOutOfRange(..)
                )
            }
            Self::Postgres { source, .. } => source.code().is_some_and(|c| {
                let class = &c.code()[..2];
                class == "22" || class == "23"
            }),
            Self::Open { .. }
            | Self::SchemaTooNew { .. }
            | Self::EmptyDatabase { .. }
            | Self::Task(_) => false,
        }
    }
}

/// A breach from its stored columns (both backends store the same ones).
/// Open the store that `url` names:
///
/// - `""` or `sqlite:PATH`: [`SqliteStore`] in the directory PATH (relative to `data_dir`;
///   an empty PATH is `data_dir` itself);
/// - `postgres://…` or `postgresql://…`: [`postgres::PostgresStore`] (tables in the
///   connection's `search_path`, migrated on connect).
pub async fn open(
    url: &str,
    data_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = postgres::PostgresStore::connect(url).await?;
        return Ok(std::sync::Arc::new(store));
    }
    let dir = match url.strip_prefix("sqlite:") {
        _ if url.is_empty() => data_dir.to_path_buf(),
        Some("") => data_dir.to_path_buf(),
        Some(path) => data_dir.join(path),
        None => {
            return Err(StoreError::Open {
                path: postgres::redact_url(url),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "unsupported store URL: use \"\" or sqlite:PATH for SQLite, \
                     postgres://... or postgresql://... for PostgreSQL",
                ),
            });
        }
    };
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
    Ok(std::sync::Arc::new(store))
}

/// One page of an epoch's stored sequence numbers after `$3`, in order, at most `$4` (both
/// backends run the same text; [`HoleScan`] reads them page by page).
pub(crate) const KEYS_PAGE: &str =
    "SELECT seq FROM reports WHERE node = $1 AND epoch = $2 AND seq > $3 ORDER BY seq LIMIT $4";

/// How many of an epoch's sequence numbers up to its last are missing (both backends).
pub(crate) const EPOCH_MISSING: &str =
    "SELECT last_seq - reports FROM node_epochs WHERE node = $1 AND epoch = $2";

/// Keys read per page by [`HoleScan`].
pub(crate) const KEYS_PER_PAGE: i64 = 10_000;

/// The holes of one epoch's stored sequence numbers, found page by page in order and
/// stopped as soon as `limit` ranges are found or the holes found add up to what the
/// epoch's counters say is missing: a node whose holes are early in a long epoch costs
/// pages up to its last hole, not every key it ever sent (issue 14, queries at volume).
#[derive(Debug)]
pub(crate) struct HoleScan {
    limit: usize,
    missing: u64,
    found: u64,
    /// The last sequence number seen (the next page starts after it).
    pub(crate) prev: i64,
    /// The holes found, `(first, last)` inclusive.
    pub(crate) ranges: Vec<(u64, u64)>,
}

impl HoleScan {
    /// A scan for at most `limit` ranges of an epoch missing `missing` sequence numbers
    /// (`None`: unknown, read every page).
    pub(crate) fn new(limit: u32, missing: Option<i64>) -> Self {
        Self {
            limit: limit as usize,
            missing: missing.map_or(u64::MAX, |m| u64::try_from(m).unwrap_or(0)),
            found: 0,
            prev: 0,
            ranges: Vec::new(),
        }
    }

    /// Whether another page is needed.
    pub(crate) fn wants_more(&self) -> bool {
        self.ranges.len() < self.limit && self.found < self.missing
    }

    /// Take one page; true when another page should be read.
    pub(crate) fn feed(&mut self, page: &[i64]) -> bool {
        for &seq in page {
            if !self.wants_more() {
                return false;
            }
            if seq > self.prev.saturating_add(1) {
                let (first, last) = (self.prev + 1, seq - 1);
                self.ranges.push((
                    u64::try_from(first).unwrap_or(0),
                    u64::try_from(last).unwrap_or(0),
                ));
                self.found = self
                    .found
                    .saturating_add(u64::try_from(last - first + 1).unwrap_or(0));
            }
            self.prev = seq;
        }
        self.wants_more() && page.len() as i64 == KEYS_PER_PAGE
    }
}

/// The live weight files as [`Store::model_holdings`] reads them (both backends run this
/// text): the listing's key ([`Store::list_models`]'), model, publisher, size, node, the
/// node's site and country, users (JSON, as [`users_json`] stores them).
pub(crate) const MODEL_HOLDINGS: &str =
    "SELECT CASE WHEN w.sha256 <> '' THEN w.model || '|' || w.sha256
                 ELSE w.model || '|~' || w.node || ':' || w.path END,
            w.model, w.publisher, w.size_bytes, w.node, COALESCE(n.site, ''),
            COALESCE(n.country, ''), w.users
     FROM weight_files w LEFT JOIN nodes n ON n.node = w.node
     WHERE w.removed_ms IS NULL";

/// Rows read per page by [`all_nodes`] and [`all_models`].
const ALL_PAGE: u32 = 1000;

/// Every row a paged listing gives, at most `cap`, and whether `cap` cut it short:
/// `page(after)` reads up to [`ALL_PAGE`] rows after the cursor `after`, and `key` is a row's
/// cursor.
async fn all_pages<T, F, Fut>(
    cap: usize,
    mut page: F,
    key: impl Fn(&T) -> &str,
) -> Result<(Vec<T>, bool), StoreError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, StoreError>>,
{
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let rows = page(after.clone()).await?;
        let full = rows.len() == ALL_PAGE as usize;
        if let Some(last) = rows.last() {
            after = key(last).to_owned();
        }
        out.extend(rows);
        if out.len() >= cap {
            out.truncate(cap);
            return Ok((out, true));
        }
        if !full {
            return Ok((out, false));
        }
    }
}

/// Every node, paging through [`Store::list_nodes`], at most `cap`; true when `cap` cut the
/// list short.
pub async fn all_nodes(store: &dyn Store, cap: usize) -> Result<(Vec<NodeRow>, bool), StoreError> {
    all_pages(
        cap,
        |after| async move { store.list_nodes(&after, ALL_PAGE).await },
        |n| &n.node,
    )
    .await
}

/// Every model that resides somewhere now, paging through [`Store::list_models`], at most
/// `cap`; true when `cap` cut the list short.
pub async fn all_models(
    store: &dyn Store,
    cap: usize,
) -> Result<(Vec<sov_proto::pb::ModelSummary>, bool), StoreError> {
    all_pages(
        cap,
        |after| async move { store.list_models("", &after, ALL_PAGE).await },
        |m| &m.key,
    )
    .await
}

/// A u64 counter into the i64 both databases store, with a message naming the field.
pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Range(format!("{what} {v} exceeds i64")))
}

/// The stored name of a flow's protocol.
pub(crate) fn protocol_name(code: i32) -> &'static str {
    match sov_proto::pb::Protocol::try_from(code) {
        Ok(sov_proto::pb::Protocol::Tcp) => "tcp",
        Ok(sov_proto::pb::Protocol::Udp) => "udp",
        _ => "unknown",
    }
}

/// The stored name of a flow's direction.
pub(crate) fn direction_name(code: i32) -> &'static str {
    match sov_proto::pb::Direction::try_from(code) {
        Ok(sov_proto::pb::Direction::Outbound) => "outbound",
        Ok(sov_proto::pb::Direction::Inbound) => "inbound",
        _ => "unknown",
    }
}

/// The users of a weight file as both backends store them (a JSON array of `pid`, `process`,
/// `gpus`, `mapped`, `open`), read back by [`rows::push_model`].
pub(crate) fn users_json(f: &sov_proto::pb::WeightFile) -> String {
    let users: Vec<serde_json::Value> = f
        .users
        .iter()
        .map(|u| serde_json::json!({"pid": u.pid, "process": u.process, "gpus": u.gpu_uuids, "mapped": u.mapped, "open": u.open}))
        .collect();
    serde_json::Value::Array(users).to_string()
}

/// The stored (and `sovctl models`) name of a weight format.
pub fn format_name(code: i32) -> &'static str {
    use sov_proto::pb::WeightFormat as F;
    match F::try_from(code) {
        Ok(F::Safetensors) => "safetensors",
        Ok(F::Gguf) => "gguf",
        Ok(F::PytorchZip) => "pytorch",
        Ok(F::Torchscript) => "torchscript",
        Ok(F::Pickle) => "pickle",
        Ok(F::Onnx) => "onnx",
        _ => "unknown",
    }
}

/// The node's latest GPU columns, computed from one report (both backends store these).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GpuSummary {
    /// "ok", "none", "unavailable", or "" when the report says nothing.
    pub state: &'static str,
    pub count: usize,
    /// Mean utilisation over the devices, 0-100.
    pub util: f64,
    pub mem_used: u64,
    pub mem_total: u64,
}

impl GpuSummary {
    pub(crate) fn of(t: &Telemetry) -> Self {
        use sov_proto::pb::gpu_state::Availability;
        let state = match t.gpu_state.as_ref().map(|s| s.availability()) {
            Some(Availability::Available) => "ok",
            Some(Availability::NoDevices) => "none",
            Some(Availability::Unavailable) => "unavailable",
            _ => "",
        };
        let count = t.gpus.len();
        let util = if count == 0 {
            0.0
        } else {
            t.gpus
                .iter()
                .map(|g| f64::from(g.utilization_gpu_percent))
                .sum::<f64>()
                / count as f64
        };
        Self {
            state,
            count,
            util,
            mem_used: t.gpus.iter().map(|g| g.memory_used_bytes).sum(),
            mem_total: t.gpus.iter().map(|g| g.memory_total_bytes).sum(),
        }
    }
}

/// A stored report not yet derived ([`Store::underived`]).
#[derive(Debug, Clone)]
pub struct Underived {
    /// Its place in the derive queue (the deriver hands it back in [`Derivation::queue_id`]).
    pub queue_id: i64,
    /// Node name.
    pub node: String,
    /// Spool epoch.
    pub epoch: u64,
    /// Sequence number.
    pub seq: u64,
    /// When the collector received it.
    pub received_unix_ms: i64,
    /// The report as received (protobuf).
    pub body: Vec<u8>,
}

/// One report to derive ([`Store::derive`]): its queue row and the report with its telemetry
/// enriched (flows geolocated, processes named).
#[derive(Debug, Clone)]
pub struct Derivation {
    /// [`Underived::queue_id`].
    pub queue_id: i64,
    /// The report; only its node, times, country and telemetry are read.
    pub report: IncomingReport,
}

/// How far derivation has come ([`Store::derive_status`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeriveStatus {
    /// Stored reports not derived yet.
    pub pending: u64,
    /// When the oldest of them was received; `None` when none waits.
    pub oldest_pending_received_unix_ms: Option<i64>,
}

impl DeriveStatus {
    /// Every report received before this time is derived: the oldest waiting report's
    /// reception, or `now_unix_ms` when none waits.
    pub fn derived_up_to(&self, now_unix_ms: i64) -> i64 {
        self.oldest_pending_received_unix_ms.unwrap_or(now_unix_ms)
    }
}

/// Durable storage of reports and per-node completeness.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Append one report and commit (group commit): its key and body, the node's facts, the
    /// epoch's counters and gaps (so completeness is exact once this returns), and its place
    /// in the derive queue. The report's telemetry is not read here: what is derived from it
    /// is written by [`Store::derive`].
    async fn ingest(&self, report: IncomingReport) -> Result<IngestOutcome, StoreError>;

    /// The oldest stored reports not yet derived, in the order they were stored, at most
    /// `limit`.
    async fn underived(&self, limit: u32) -> Result<Vec<Underived>, StoreError>;

    /// As [`Store::underived`], only `nodes`' reports (each node's in the order they were
    /// stored), at most `limit`; on PostgreSQL only from the partitions this handle's deriver
    /// holds. The deriver reads these first when they may breach a rule (`derive::Urgent`).
    async fn underived_of(
        &self,
        nodes: &[String],
        limit: u32,
    ) -> Result<Vec<Underived>, StoreError>;

    /// Whether [`Store::underived`] reads only this replica's share of the queue (PostgreSQL:
    /// the partitions its deriver holds): then a batch shorter than asked does not mean that
    /// every report acknowledged here was in it.
    fn derives_a_share(&self) -> bool;

    /// A handle on this store for one more deriver in this collector, deriving in parallel
    /// with the others (PostgreSQL: its own connection and share of the node partitions);
    /// `None` where derivation is one writer's (SQLite).
    fn another_deriver(&self) -> Option<Arc<dyn Store>>;

    /// Derive `batch` in one transaction (SQLite: in several when appends wait for its single
    /// writer, each taking whole nodes' reports): for each report whose queue row a transaction
    /// deletes, its time series, GPU usage, weight inventory and flow aggregates, committed
    /// with that deletion; a report whose row is gone (derived already, by another replica) is
    /// skipped. Returns how many were derived. Nothing is derived twice, and a crash leaves
    /// the queue rows of what was not committed as they were.
    async fn derive(&self, batch: Vec<Derivation>) -> Result<u64, StoreError>;

    /// How far derivation has come.
    async fn derive_status(&self) -> Result<DeriveStatus, StoreError>;

    /// Nodes sorted by name, starting after `after`, at most `limit`.
    async fn list_nodes(&self, after: &str, limit: u32) -> Result<Vec<NodeRow>, StoreError>;

    /// Distinct weight file contents that reside somewhere now, with copies and users, sorted
    /// by key, starting after `after`; `query` filters (exact sha256, or a model substring).
    async fn list_models(
        &self,
        query: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<sov_proto::pb::ModelSummary>, StoreError>;

    /// Every weight file content that resides somewhere now, for the scorecard: what
    /// [`Store::list_models`] lists, in the same key order, with only the model's name,
    /// publisher, key and size, each copy's node, site and country, and each user's node and
    /// pid (nothing else is read: no declared lineage, container or mount, no training run),
    /// at most `cap` models; true when `cap` cut it short. One unsorted read of the live
    /// files instead of pages sorted by key: at 10,000 nodes (about 250,000 copies) the pages'
    /// sort was most of the scorecard's model read.
    async fn model_holdings(
        &self,
        cap: u32,
    ) -> Result<(Vec<sov_proto::pb::ModelSummary>, bool), StoreError>;

    /// Training runs active (or reported) since `since_unix_ms`, newest start first, at most
    /// `limit`.
    async fn list_training(
        &self,
        since_unix_ms: i64,
        limit: u32,
    ) -> Result<Vec<sov_proto::pb::TrainingRunSummary>, StoreError>;

    /// Egress bytes grouped as asked, largest bytes_sent first, and how many rows the limit
    /// left out.
    async fn egress(
        &self,
        q: EgressQuery,
    ) -> Result<(Vec<sov_proto::pb::EgressRow>, u64), StoreError>;

    /// Bounded retention ([`Retention`]): fold raw host/GPU samples and GPU usage about to go
    /// into minute aggregates, then delete raw rows and aggregates past their cut-offs, in one
    /// transaction. Report keys, nodes, weight files, breaches and the breach log are never
    /// pruned. With PostgreSQL only one replica prunes at a time; the others get
    /// [`PruneStats::skipped`].
    async fn prune(&self, retention: Retention) -> Result<PruneStats, StoreError>;

    /// Roll whole hours before `before_unix_ms` (an hour boundary) of flow minutes and GPU
    /// usage up into hour rows ([`rollup`]), from where the last call stopped, one hour per
    /// transaction. Idempotent; with PostgreSQL replicas take turns.
    async fn roll_up(&self, before_unix_ms: i64) -> Result<RollupStats, StoreError>;

    /// Fold one rule observation into the breaches, in one transaction: no open breach of
    /// `(rule, node, subject)` → open one (count 1) and append an "open" record; an open one
    /// → last seen (the later), count + 1, severity and evidence (the observation's), and an
    /// "updated" record only when the severity or the evidence changed (the log records
    /// changes, not every evaluation; the count and last seen of the next record or of the
    /// breach row say how often it was seen).
    async fn observe_breach(&self, obs: Observation) -> Result<BreachChange, StoreError>;

    /// Resolve, at `at_unix_ms`, every open breach of `rule` last seen before
    /// `quiet_before_unix_ms`, appending a "resolved" record for each (in breach id order, in
    /// one transaction). Returns them as resolved.
    async fn resolve_quiet_breaches(
        &self,
        rule: &str,
        quiet_before_unix_ms: i64,
        at_unix_ms: i64,
    ) -> Result<Vec<Breach>, StoreError>;

    /// One rule evaluation's writes, holding the writer once for all of them (under load it
    /// is shared with ingest, and each take waits for an append batch): each of
    /// `observations` as [`Store::observe_breach`], in order, then for each `(rule,
    /// quiet_before_unix_ms)` of `quiet`, [`Store::resolve_quiet_breaches`] at `at_unix_ms`.
    /// Each step is its own transaction, as with those calls one by one.
    async fn record_evaluation(
        &self,
        observations: Vec<Observation>,
        quiet: Vec<(String, i64)>,
        at_unix_ms: i64,
    ) -> Result<(Vec<BreachChange>, Vec<Breach>), StoreError>;

    /// Breaches matching `filter`, newest opened first (then by id), at most `filter.limit`.
    async fn list_breaches(&self, filter: BreachFilter) -> Result<Vec<Breach>, StoreError>;

    /// Breach log records with `seq > after_seq`, in order, at most `limit`.
    async fn breach_log(&self, after_seq: u64, limit: u32) -> Result<Vec<LogRecord>, StoreError>;

    /// Append one query to the audit log (chained after its last record, serialised across
    /// replicas like the breach log) and commit; returns the record as stored.
    async fn append_audit(&self, entry: AuditEntry) -> Result<AuditRecord, StoreError>;

    /// Audit log records with `seq > after_seq`, in order, at most `limit`.
    async fn audit_log(&self, after_seq: u64, limit: u32) -> Result<Vec<AuditRecord>, StoreError>;

    /// The sequence ranges `(first, last)` (inclusive) of `node`'s `epoch` that were never
    /// stored, in order, at most `limit` (holes between stored reports, and before the first).
    async fn missing_ranges(
        &self,
        node: &str,
        epoch: u64,
        limit: u32,
    ) -> Result<Vec<(u64, u64)>, StoreError>;

    /// GPU-seconds charged in `[since_unix_ms, until_unix_ms)`, summed per (node, pid,
    /// process, Kubernetes namespace), largest first, at most `limit` rows.
    async fn gpu_usage(
        &self,
        since_unix_ms: i64,
        until_unix_ms: i64,
        limit: u32,
    ) -> Result<Vec<GpuUsageRow>, StoreError>;

    /// Reports observed in `[since_unix_ms, until_unix_ms)`, counted per node, by node name,
    /// at most `limit` nodes (the console's "reports per node" chart).
    async fn reports_by_node(
        &self,
        since_unix_ms: i64,
        until_unix_ms: i64,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, StoreError>;

    /// Store a new API token (its hash, never the token).
    async fn insert_token(&self, token: TokenRecord) -> Result<(), StoreError>;

    /// Every stored token (expired ones too), by creation time.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Delete the token `token_id` (revocation: it stops working at once); false when there
    /// was none.
    async fn delete_token(&self, token_id: &str) -> Result<bool, StoreError>;

    /// The token whose SHA-256 is `hash`, expired or not.
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Sequence number of the last breach log record (0 when the log is empty).
    async fn breach_log_end(&self) -> Result<u64, StoreError>;

    /// `(seq, hash)` of the last record of the chained log `log`
    /// ([`sov_evidence::checkpoint::BREACH_LOG`] or [`sov_evidence::checkpoint::AUDIT_LOG`]);
    /// `(0, GENESIS_HASH)` when it is empty.
    async fn chain_head(&self, log: &str) -> Result<(u64, String), StoreError>;

    /// Keep a signed checkpoint of `log`'s head at `seq` (its text, as
    /// [`sov_evidence::checkpoint::SignedCheckpoint::to_text`] writes it); a second one of the
    /// same `(log, seq)` (another replica, a restart) is ignored.
    async fn add_checkpoint(
        &self,
        log: &str,
        seq: u64,
        hash: &str,
        at_unix_ms: i64,
        signed: &str,
    ) -> Result<(), StoreError>;

    /// The signed checkpoints of `log` with `seq > after_seq` (their texts), by seq, at most
    /// `limit`.
    async fn checkpoints(
        &self,
        log: &str,
        after_seq: Option<u64>,
        limit: u32,
    ) -> Result<Vec<(u64, String)>, StoreError>;

    /// The signed checkpoint of `log` with the highest seq (its text), if any.
    async fn latest_checkpoint(&self, log: &str) -> Result<Option<String>, StoreError>;

    /// The outbox cursor of `sink`: the last breach log sequence number already enqueued for
    /// it, or `None` for a sink never seen.
    async fn outbox_cursor(&self, sink: &str) -> Result<Option<u64>, StoreError>;

    /// In one transaction: insert `items` as pending rows of `sink` (a row with the same
    /// `(sink, log_seq)` already there is kept as it is) and move the sink's cursor to
    /// `cursor` (never backwards).
    async fn outbox_enqueue(
        &self,
        sink: &str,
        items: Vec<OutboxItem>,
        cursor: u64,
        now_unix_ms: i64,
    ) -> Result<(), StoreError>;

    /// The oldest pending row of `sink` (lowest log sequence number), if any.
    async fn outbox_head(&self, sink: &str) -> Result<Option<OutboxRow>, StoreError>;

    /// Record the outcome of one delivery try of `(sink, log_seq)`.
    async fn outbox_settle(
        &self,
        sink: &str,
        log_seq: u64,
        settle: Settle,
    ) -> Result<(), StoreError>;

    /// Outbox counters per sink, sorted by sink name.
    async fn outbox_stats(&self) -> Result<Vec<SinkStats>, StoreError>;

    /// Take or renew the lease `name` for `holder` until `now + ttl_ms`: true when `holder`
    /// has it now (it was free, expired, or already its own). Among collector replicas on
    /// one database this makes one of them do a job (rule evaluation, one alert sink).
    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_unix_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Record the address a node's reports come from and where it geolocates.
    async fn note_peer(&self, peer: NodePeer) -> Result<(), StoreError>;

    /// Every node's last recorded peer address, sorted by node.
    async fn node_peers(&self) -> Result<Vec<NodePeer>, StoreError>;

    /// Store new enrollment tokens (their sha256 hashes only, see [`crate::enroll`]), in one
    /// transaction.
    async fn add_enroll_tokens(&self, tokens: &[NewEnrollToken]) -> Result<(), StoreError>;

    /// Spend the enrollment token with this hash for `node` at `now_unix_ms`, atomically: of
    /// two requests presenting the same token, on any replica, exactly one gets
    /// [`TokenSpend::Spent`].
    async fn spend_enroll_token(
        &self,
        hash: &str,
        node: &str,
        now_unix_ms: i64,
    ) -> Result<TokenSpend, StoreError>;

    /// Whether `node` is a name in use (its last report, or the last enrollment that issued
    /// it a certificate), and which node, if any, the token with hash `hash` was made to
    /// replace. Read before the token is spent, so a refused enrollment does not waste it.
    async fn enroll_name_use(&self, hash: &str, node: &str) -> Result<NameUse, StoreError>;
}

/// The address a node's reports arrive from, as the collector sees it (after any NAT), and
/// its geolocation at the time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePeer {
    /// Node name.
    pub node: String,
    /// IP address (no port).
    pub address: String,
    /// Country of the address ("" when no database places it).
    pub country: String,
    /// Autonomous system (0 when unknown).
    pub asn: u32,
    /// Which database said so.
    pub source: String,
    /// When it was recorded.
    pub seen_unix_ms: i64,
}

/// Most reports stored in one transaction by group commit.
pub const MAX_BATCH_REPORTS: usize = 256;
/// Most encoded report bytes in one transaction (at least one report is always taken).
pub const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// A report waiting for the writer, and where its outcome goes.
#[derive(Debug)]
pub(crate) struct Queued {
    pub report: IncomingReport,
    pub done: tokio::sync::oneshot::Sender<Result<IngestOutcome, StoreError>>,
}

/// The group-commit queue both backends use: callers [`Pending::push`] their report and await
/// the answer; one drainer at a time takes batches off the front and answers them after their
/// commit ([`answer`]), until the queue is empty ([`Pending::take_batch_or_stop`]). A push that
/// finds no drainer running starts one, so no report waits for a caller that never comes.
///
/// One drainer, not one per caller: when every caller took the writer in turn to drain, most
/// found the queue already drained by another (28,018 of 33,503 takes under the load benchmark),
/// and the lock passed through a convoy of parked threads between commits of 5 reports on
/// average (PERFORMANCE.md §8s).
#[derive(Debug, Default)]
pub(crate) struct Pending {
    queue: std::collections::VecDeque<Queued>,
    /// A drainer is running (or about to): pushes leave the draining to it.
    draining: bool,
}

impl Pending {
    /// Queue `report`; the receiver gets its outcome once it is committed (or failed), and the
    /// flag says whether the caller must start a drainer (none was running).
    pub fn push(
        &mut self,
        report: IncomingReport,
    ) -> (
        tokio::sync::oneshot::Receiver<Result<IngestOutcome, StoreError>>,
        bool,
    ) {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.queue.push_back(Queued { report, done });
        let start = !self.draining;
        self.draining = true;
        (rx, start)
    }

    /// The drainer's next batch ([`Pending::take_batch`]); empty when nothing waits, and then
    /// the drainer has stopped (the next push starts another).
    pub fn take_batch_or_stop(&mut self) -> Vec<Queued> {
        let batch = self.take_batch();
        if batch.is_empty() {
            self.draining = false;
        }
        batch
    }

    /// Every waiting report, and the drainer stopped (a drainer that cannot go on answers
    /// them with its error).
    pub fn take_all_and_stop(&mut self) -> Vec<Queued> {
        self.draining = false;
        self.queue.drain(..).collect()
    }

    /// Whether any report waits.
    pub fn waiting(&self) -> bool {
        !self.queue.is_empty()
    }

    /// The next batch from the front: at most [`MAX_BATCH_REPORTS`] reports and
    /// [`MAX_BATCH_BYTES`] of bodies, at least one while any waits.
    pub fn take_batch(&mut self) -> Vec<Queued> {
        let mut bytes = 0usize;
        let mut n = 0usize;
        for q in &self.queue {
            if n >= MAX_BATCH_REPORTS || (n > 0 && bytes + q.report.body.len() > MAX_BATCH_BYTES) {
                break;
            }
            bytes += q.report.body.len();
            n += 1;
        }
        self.queue.drain(..n).collect()
    }
}

/// Send each queued report its outcome (a caller that went away is ignored: its report's fate
/// is in the store, and its agent will re-send and get a duplicate ack).
pub(crate) fn answer(batch: Vec<Queued>, outcomes: Vec<Result<IngestOutcome, StoreError>>) {
    for (q, outcome) in batch.into_iter().zip(outcomes) {
        let _ = q.done.send(outcome);
    }
}

#[cfg(test)]
mod hole_scan_tests {
    use super::{HoleScan, KEYS_PER_PAGE};

    #[test]
    fn a_scan_stops_once_the_missing_count_is_found_and_pages_on_otherwise() {
        let full: Vec<i64> = (1..=KEYS_PER_PAGE).collect();
        // Two missing (5 and 6): found in the first page, no second page read.
        let mut scan = HoleScan::new(20, Some(2));
        let page: Vec<i64> = full
            .iter()
            .copied()
            .filter(|s| *s != 5 && *s != 6)
            .collect();
        let mut first = page.clone();
        first.extend([KEYS_PER_PAGE + 1, KEYS_PER_PAGE + 2]);
        assert!(!scan.feed(&first[..KEYS_PER_PAGE as usize]));
        assert_eq!(scan.ranges, [(5, 6)]);
        // Unknown count: a full page asks for the next, a short one ends the scan; holes
        // across the page boundary are found.
        let mut scan = HoleScan::new(20, None);
        assert!(scan.feed(&full));
        assert!(!scan.feed(&[KEYS_PER_PAGE + 3]));
        assert_eq!(
            scan.ranges,
            [(KEYS_PER_PAGE as u64 + 1, KEYS_PER_PAGE as u64 + 2)]
        );
        // The limit stops it too; a hole before the first key counts.
        let mut scan = HoleScan::new(1, None);
        assert!(!scan.feed(&[3, 4, 9]));
        assert_eq!(scan.ranges, [(1, 2)]);
    }
}
