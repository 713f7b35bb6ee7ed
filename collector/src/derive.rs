//! The deriver: what is computed from committed reports, in batches, after they were
//! acknowledged (issue 14).
//!
//! The ingest service acknowledges a report once its key and body (and the node's
//! completeness counters) are committed ([`crate::store::Store::ingest`]); that commit also
//! puts the report in the store's derive queue. The [`Deriver`] takes the oldest queued
//! reports in batches, decodes them, geolocates their flows and names their processes
//! ([`Enricher`]), and hands the batch to [`crate::store::Store::derive`], which writes the
//! time series, GPU usage, weight inventory and flow aggregates and deletes the batch's queue
//! rows in one transaction: a crash before the commit leaves the queue as it was, and a report
//! is derived once however often the deriver restarts. With several PostgreSQL replicas each
//! runs a deriver; a queue row deleted by one is skipped by the others.
//!
//! Readers know how fresh the derived state is: the store's [`DeriveStatus`] ("every report
//! received before T is derived") is on `/metrics` and in query answers, and a query first
//! waits, at most [`DeriveConfig::query_wait_ms`], for the reports this collector acknowledged
//! before it to be derived ([`Freshness`]).
//!
//! [`DeriveStatus`]: crate::store::DeriveStatus

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use serde::Deserialize;
use sov_proto::pb;
use tokio_util::sync::CancellationToken;

use crate::geo::physics::{Check, Place, check_at};

mod threads;
pub use threads::DeriveThreads;

/// `Withheld.kind` of weight files the agent left out of a report.
const WITHHELD_WEIGHT_FILE: &str = "weight_file";
use crate::geo::{Geo, Verdict};
use crate::metrics::Metrics;
use crate::policy::PolicyWatch;
use crate::store::{
    Derivation, FlowRecord, GapRecord, IncomingReport, Store, StoreError, Telemetry, Underived,
    VerdictColumns, WeightUpdate,
};

/// Reports derived in one transaction, by default. Each minute row of a batch is written once
/// whatever number of the batch's reports carry it, so a larger batch writes fewer rows per
/// report: at 200 nodes every 10 s, 2,048 against 512 cut derive-only's CPU per report by a
/// third on SQLite (0.22 against 0.31–0.33 ms) and PostgreSQL's by half, and under the load
/// benchmark SQLite acknowledged 2,019–2,251 against 1,252–1,625 reports/s with a lower ack
/// p99 (PERFORMANCE.md §8q). Under steady load a batch holds what arrived since the last one
/// (see `GATHER`), so this bounds backlogs; the price is memory (up to `PIPELINE_BATCHES`
/// batches' bodies read at once, two enriched).
pub const DEFAULT_BATCH_REPORTS: u32 = 2048;
/// How long a query waits, by default, for the reports acknowledged before it to be derived.
pub const DEFAULT_QUERY_WAIT_MS: u64 = 5_000;
/// How much lower than the acknowledgements' the derive threads' scheduling priority is, by
/// default (a niceness increment, as `nice -n`; PERFORMANCE.md §8s).
pub const DEFAULT_NICE: i32 = 10;
/// The derivation lag past which acknowledgements wait for derivation, by default, seconds.
pub const DEFAULT_MAX_LAG_SECS: u64 = 5;
/// Derivers in one collector on PostgreSQL, by default: each has its own connection and share
/// of the node partitions, so derivation uses that many of the server's cores. Two derived
/// 5,651–5,936 committed reports/s against one's 3,626–3,705/s on the 2-core machine of
/// PERFORMANCE.md §8v.
pub const DEFAULT_CONNECTIONS: u32 = 2;
/// Longest an acknowledgement waits for derivation to come back under `max_lag_secs`: past it
/// the report is stored anyway (a deriver that cannot go on must not stop ingest).
const ADMIT_WAIT: Duration = Duration::from_secs(2);
/// How often an idle deriver looks at the queue (reports other replicas stored wake nobody
/// here).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Pause after a failed batch before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Pause after a batch shorter than `batch_reports` that found reports waiting (under load):
/// the next batch gathers what arrives meanwhile. Measured: a deriver that looped at once
/// derived batches of a few dozen reports as they were acknowledged, at a higher cost per
/// report (PERFORMANCE.md §8f).
const GATHER: Duration = Duration::from_millis(200);
/// Transactions' worth of reports a deriver that reads the whole queue (SQLite) reads at once
/// under a backlog, so that each batch is decoded and enriched while the one before it is
/// written: on SQLite the writer is one thread, and derive-only left the other cores idle
/// while it wrote (PERFORMANCE.md §8m).
const PIPELINE_BATCHES: u32 = 4;
/// Most nodes a deriver holds to derive first ([`Urgent`]); past it, a report that may breach
/// a rule is derived in queue order like any other.
const MAX_URGENT_NODES: usize = 1024;
/// Most threads that decode and enrich one batch at once.
const ENRICH_THREADS: usize = 4;
/// Fewest reports worth a thread of their own.
const ENRICH_SLICE_MIN: usize = 64;

/// `[derive]`: how acknowledged reports are derived.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeriveConfig {
    /// Most reports derived in one transaction (1..=10000; default 2048). Larger batches
    /// write fewer, larger transactions; with SQLite a batch holds the single writer, so an
    /// acknowledgement can wait for one batch.
    #[serde(default = "default_batch_reports")]
    pub batch_reports: u32,
    /// How long a query waits, at most, for the reports this collector acknowledged before it
    /// to be derived, ms (0..=60000; default 5000). The answer says how fresh it is either way.
    #[serde(default = "default_query_wait_ms")]
    pub query_wait_ms: u64,
    /// How much the niceness of the threads that decode and enrich reports for derivation is
    /// raised above the collector's (0..=19, as `nice -n`; default 10; capped at 19), so that
    /// acknowledgements get the CPU first and derivation what is left. 0: the same priority.
    #[serde(default = "default_nice")]
    pub nice: i32,
    /// The derivation lag (how long the oldest report not yet derived has waited) past which
    /// acknowledgements wait for derivation, s (0..=3600; default 5; 0: never). Under a load
    /// the machine cannot both acknowledge and derive, acknowledgements take precedence until
    /// the lag reaches this, then slow to the rate derivation keeps up with (each waits at most
    /// 2 s), so that derived state stays this fresh. Counted one derive cycle ahead (the oldest
    /// waiting report is derived a cycle later at best).
    #[serde(default = "default_max_lag_secs")]
    pub max_lag_secs: u64,
    /// Derivers in this collector, each with its own database connection, deriving its
    /// share of the nodes in parallel with the others (1..=16; default 2). PostgreSQL only:
    /// SQLite derives on its one writer and runs one deriver whatever this says. Replicas'
    /// derivers share the nodes out with these.
    #[serde(default = "default_connections")]
    pub connections: u32,
}

fn default_connections() -> u32 {
    DEFAULT_CONNECTIONS
}

fn default_max_lag_secs() -> u64 {
    DEFAULT_MAX_LAG_SECS
}

fn default_nice() -> i32 {
    DEFAULT_NICE
}

fn default_batch_reports() -> u32 {
    DEFAULT_BATCH_REPORTS
}

fn default_query_wait_ms() -> u64 {
    DEFAULT_QUERY_WAIT_MS
}

impl Default for DeriveConfig {
    fn default() -> Self {
        Self {
            batch_reports: DEFAULT_BATCH_REPORTS,
            query_wait_ms: DEFAULT_QUERY_WAIT_MS,
            nice: DEFAULT_NICE,
            max_lag_secs: DEFAULT_MAX_LAG_SECS,
            connections: DEFAULT_CONNECTIONS,
        }
    }
}

/// Problems of `[derive]`, each naming the field and the bad value.
pub fn validate(c: &DeriveConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if !(1..=10_000).contains(&c.batch_reports) {
        out.push((
            "derive.batch_reports".to_owned(),
            format!("{} is out of range 1..=10000", c.batch_reports),
        ));
    }
    if c.query_wait_ms > 60_000 {
        out.push((
            "derive.query_wait_ms".to_owned(),
            format!("{} is out of range 0..=60000", c.query_wait_ms),
        ));
    }
    if !(1..=16).contains(&c.connections) {
        out.push((
            "derive.connections".to_owned(),
            format!("{} is out of range 1..=16", c.connections),
        ));
    }
    if c.max_lag_secs > 3600 {
        out.push((
            "derive.max_lag_secs".to_owned(),
            format!("{} is out of range 0..=3600", c.max_lag_secs),
        ));
    }
    if !(0..=19).contains(&c.nice) {
        out.push((
            "derive.nice".to_owned(),
            format!("{} is out of range 0..=19", c.nice),
        ));
    }
    out
}

/// What this collector acknowledged and what its deriver has derived since, counted in
/// acknowledgements: queries wait on it so that they see what was acknowledged before them.
/// And how far behind derivation is, against `[derive] max_lag_secs`: acknowledgements wait on
/// that ([`Freshness::admit`]).
#[derive(Debug)]
pub struct Freshness {
    acked: AtomicU64,
    derived: tokio::sync::watch::Sender<u64>,
    query_wait: Duration,
    /// Past this lag acknowledgements wait; zero: never.
    max_lag: Duration,
    /// The derivers' last word on the lag, together: the oldest report any of them knows is
    /// not derived, and the longest cycle.
    lag: tokio::sync::watch::Sender<LagSignal>,
    /// Each deriver's last word ([`Deriver::slot`]).
    slots: std::sync::Mutex<Vec<LagSignal>>,
}

/// What the deriver last said about its lag: the oldest report it knows is not derived, and how
/// long one of its cycles (read, enrich, commit) took. The lag is aged at each admission, not
/// when the deriver speaks: it grows while a transaction runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LagSignal {
    /// When the oldest report known not to be derived was received; `None`: none waits.
    oldest_unix_ms: Option<i64>,
    /// The deriver's last cycle, ms: a report waiting now is derived at best that much later.
    cycle_ms: u64,
}

impl Freshness {
    /// Nothing acknowledged yet; queries wait at most `query_wait`; acknowledgements never
    /// wait for derivation.
    pub fn new(query_wait: Duration) -> Arc<Self> {
        Self::bounded(query_wait, Duration::ZERO)
    }

    /// As [`Freshness::new`], and acknowledgements wait while the derivation lag is past
    /// `max_lag` (zero: never).
    pub fn bounded(query_wait: Duration, max_lag: Duration) -> Arc<Self> {
        Arc::new(Self {
            acked: AtomicU64::new(0),
            derived: tokio::sync::watch::channel(0).0,
            query_wait,
            max_lag,
            lag: tokio::sync::watch::channel(LagSignal::default()).0,
            slots: std::sync::Mutex::default(),
        })
    }

    /// Change deriver `slot`'s word with `f`, then what they say together.
    fn told(&self, slot: usize, f: impl FnOnce(&mut LagSignal)) {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slots.len() <= slot {
            slots.resize(slot + 1, LagSignal::default());
        }
        if let Some(s) = slots.get_mut(slot) {
            f(s);
        }
        let all = LagSignal {
            oldest_unix_ms: slots.iter().filter_map(|s| s.oldest_unix_ms).min(),
            cycle_ms: slots.iter().map(|s| s.cycle_ms).max().unwrap_or(0),
        };
        self.lag.send_if_modified(|s| {
            let changed = *s != all;
            *s = all;
            changed
        });
    }

    /// Deriver `slot`'s view of the lag: the oldest report it knows is not derived yet was
    /// received at `oldest_unix_ms` (`None`: none waits).
    pub fn lag_from(&self, slot: usize, oldest_unix_ms: Option<i64>) {
        self.told(slot, |s| s.oldest_unix_ms = oldest_unix_ms);
    }

    /// Deriver `slot`'s last cycle (from reading reports to committing what they derive) took
    /// `cycle`: the report waiting now is derived that much later at best, so the bound acts
    /// that much early (PERFORMANCE.md §8t).
    pub fn cycle_took(&self, slot: usize, cycle: Duration) {
        let ms = u64::try_from(cycle.as_millis()).unwrap_or(u64::MAX);
        self.told(slot, |s| s.cycle_ms = ms);
    }

    /// Whether the lag, as `signal` says it at `now_unix_ms`, will pass `max_lag` before the
    /// oldest waiting report is derived: its age now plus one cycle of the deriver.
    fn behind(&self, signal: LagSignal, now_unix_ms: i64) -> bool {
        !self.max_lag.is_zero()
            && signal.oldest_unix_ms.is_some_and(|t| {
                let age = u64::try_from(now_unix_ms.saturating_sub(t)).unwrap_or(0);
                u128::from(age.saturating_add(signal.cycle_ms)) > self.max_lag.as_millis()
            })
    }

    /// Before a report is stored: while derivation is further behind than `max_lag` (or will
    /// be, before its oldest waiting report is derived), wait until the deriver says it is not,
    /// [`ADMIT_WAIT`] at most. Whether it waited.
    pub async fn admit(&self) -> bool {
        let mut rx = self.lag.subscribe();
        let signal = *rx.borrow_and_update();
        if !self.behind(signal, sov_common::clock::now_unix_ms()) {
            return false;
        }
        let deadline = tokio::time::Instant::now() + ADMIT_WAIT;
        // The lag only grows between the deriver's words: look again when it speaks.
        while let Ok(Ok(())) = tokio::time::timeout_at(deadline, rx.changed()).await {
            let signal = *rx.borrow_and_update();
            if !self.behind(signal, sov_common::clock::now_unix_ms()) {
                break;
            }
        }
        true
    }

    /// A report was committed and is about to be acknowledged.
    pub fn acked(&self) {
        self.acked.fetch_add(1, Ordering::SeqCst);
    }

    /// Acknowledgements so far (every one of them committed to the derive queue).
    fn acked_so_far(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// The first `n` acknowledgements are derived.
    fn derived_through(&self, n: u64) {
        self.derived.send_if_modified(|v| {
            let newer = n > *v;
            if newer {
                *v = n;
            }
            newer
        });
    }

    /// Wait until every report acknowledged before now is derived, at most the query wait;
    /// false when the wait ran out.
    pub async fn wait(&self) -> bool {
        let target = self.acked_so_far();
        let mut rx = self.derived.subscribe();
        if *rx.borrow() >= target {
            return true;
        }
        tokio::time::timeout(self.query_wait, rx.wait_for(|v| *v >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// What one batch (or slice of one) enriches once: each distinct address's verdict and the
/// text its flows carry, the nodes' places, and per (address, place) what the stored verdict
/// takes that does not depend on the RTT. Bounded by the batch.
#[derive(Default)]
struct BatchCache {
    addresses: HashMap<String, Located>,
    places: Vec<Option<Place>>,
    /// The `physics` column's three values ("", "possible", "impossible"), shared.
    physics: [Arc<str>; 3],
    /// "", shared (a flow whose process is not in the report).
    empty: Arc<str>,
}

/// One distinct address of a batch: its verdict, the text every flow to it carries, and the
/// judged verdict per place of the batch's nodes.
struct Located {
    verdict: Arc<Verdict>,
    country: Arc<str>,
    org: Arc<str>,
    geo_source: Arc<str>,
    operator_country: Arc<str>,
    /// By index into [`BatchCache::places`] (a batch's nodes are in a handful of places).
    judged: Vec<(usize, Judged)>,
}

/// A verdict seen from one place: what its stored columns take that does not depend on the
/// RTT. The distances (polygon distances from the place to each answer's country) were made
/// per (address, RTT) before, which is nearly per flow: a connection's minimum RTT differs
/// from its neighbours'; each flow now only compares them with its RTT's limit. The stored
/// answers (JSON) are made once per outcome of those comparisons.
struct Judged {
    /// Per answer, in order ([`crate::geo::physics::Physics::distances`]).
    distances: Vec<Option<f64>>,
    /// `answers_json` by (RTT known, bit i set: answer i impossible).
    answers: Vec<((bool, u64), Arc<str>)>,
}

/// Most answers whose outcomes fit [`Judged::answers`]' key; a verdict with more (no
/// configuration has that many sources) is serialised per flow.
const KEYED_ANSWERS: usize = 64;

impl Judged {
    /// The stored columns of `located`'s verdict, judged here, for a flow at `min_rtt_us`.
    fn columns(
        &mut self,
        located_verdict: &Verdict,
        operator_country: &Arc<str>,
        physics_values: &[Arc<str>; 3],
        min_rtt_us: u32,
    ) -> VerdictColumns {
        let v = located_verdict;
        if v.answers.is_empty() {
            return VerdictColumns {
                operator_country: operator_country.clone(),
                ..VerdictColumns::default()
            };
        }
        let mut impossible = 0u64;
        for (i, d) in self.distances.iter().take(KEYED_ANSWERS).enumerate() {
            if check_at(*d, min_rtt_us).is_some_and(|c| c.impossible) {
                impossible |= 1 << i;
            }
        }
        let key = (min_rtt_us != 0, impossible);
        let answers_json = match self.answers.iter().find(|(k, _)| *k == key) {
            Some((_, json)) if v.answers.len() <= KEYED_ANSWERS => json.clone(),
            _ => {
                let checks: Vec<Option<Check>> = self
                    .distances
                    .iter()
                    .map(|d| check_at(*d, min_rtt_us))
                    .collect();
                let json: Arc<str> = answers_json(v, &checks).into();
                if v.answers.len() <= KEYED_ANSWERS {
                    self.answers.push((key, json.clone()));
                }
                json
            }
        };
        let first = self
            .distances
            .first()
            .and_then(|d| check_at(*d, min_rtt_us));
        columns_of(
            v,
            first,
            answers_json,
            operator_country.clone(),
            physics_values,
        )
    }
}

/// Geolocates flows and names their processes: the enrichment of a report's telemetry.
#[derive(Debug, Clone)]
pub struct Enricher {
    geo: Geo,
    policy: Option<Arc<PolicyWatch>>,
}

impl Enricher {
    /// Enrich with `geo`, placing nodes at their sites from `policy` (else in their country).
    pub fn new(geo: Geo, policy: Option<Arc<PolicyWatch>>) -> Self {
        Self { geo, policy }
    }

    /// Where the reporting node is: its site's coordinates from the policy, else its
    /// country (the policy's for its site, else the one it declares); `None` when unknown.
    fn node_place(&self, info: &pb::NodeInfo) -> Option<Place> {
        match &self.policy {
            Some(watch) => watch.current().place(&info.site, &info.country),
            None => (!info.country.is_empty()).then(|| Place::Country(info.country.clone())),
        }
    }

    /// Geolocate every flow's remote address (once per distinct address of the batch:
    /// `cache` is shared by a batch's reports) and name its process; the flows are moved
    /// out of the report.
    fn flows(&self, report: &mut pb::Report, cache: &mut BatchCache) -> Vec<FlowRecord> {
        let names: HashMap<u32, Arc<str>> = report
            .processes
            .iter()
            .map(|p| (p.pid, Arc::from(p.name.as_str())))
            .collect();
        let place = report
            .node_info
            .as_ref()
            .and_then(|info| self.node_place(info));
        let place_index = match cache.places.iter().position(|p| *p == place) {
            Some(i) => i,
            None => {
                cache.places.push(place.clone());
                cache.places.len() - 1
            }
        };
        if cache.physics[1].is_empty() {
            cache.physics = [
                Arc::from(""),
                Arc::from("possible"),
                Arc::from("impossible"),
            ];
        }
        let flows = std::mem::take(&mut report.flows);
        flows
            .into_iter()
            .map(|f| {
                let located = match cache.addresses.get_mut(f.remote_address.as_str()) {
                    Some(l) => l,
                    None => {
                        let v = f
                            .remote_address
                            .parse::<IpAddr>()
                            .map(|ip| self.geo.lookup(ip))
                            .unwrap_or_default();
                        let located = Located {
                            country: Arc::from(v.country.as_str()),
                            org: Arc::from(v.org.as_str()),
                            geo_source: Arc::from(v.source.as_str()),
                            operator_country: Arc::from(v.operator_country.as_str()),
                            verdict: v,
                            judged: Vec::new(),
                        };
                        cache
                            .addresses
                            .entry(f.remote_address.clone())
                            .or_insert(located)
                    }
                };
                // The distances depend on the answers and the node's place only: measured
                // once per (address, place) of the batch; the RTT only sets the limit.
                let at = match located.judged.iter().position(|(p, _)| *p == place_index) {
                    Some(i) => i,
                    None => {
                        let distances = self
                            .geo
                            .physics()
                            .distances(&located.verdict, place.as_ref());
                        located.judged.push((
                            place_index,
                            Judged {
                                distances,
                                answers: Vec::new(),
                            },
                        ));
                        located.judged.len() - 1
                    }
                };
                let verdict = located.judged[at].1.columns(
                    &located.verdict,
                    &located.operator_country,
                    &cache.physics,
                    f.min_rtt_us,
                );
                FlowRecord {
                    process: names.get(&f.pid).unwrap_or(&cache.empty).clone(),
                    country: located.country.clone(),
                    asn: located.verdict.asn.unwrap_or(0),
                    org: located.org.clone(),
                    geo_source: located.geo_source.clone(),
                    verdict,
                    flow: f,
                }
            })
            .collect()
    }

    /// A batch of queued reports ready to derive, in order; each address is geolocated once
    /// for the whole batch.
    pub fn derivations(&self, batch: Vec<Underived>) -> Vec<Derivation> {
        let mut cache = BatchCache::default();
        batch
            .into_iter()
            .map(|u| self.derivation(u, &mut cache))
            .collect()
    }

    /// A queued report ready to derive. A body that no longer decodes (it was validated
    /// before it was stored, so only a damaged database does this) derives nothing: its
    /// queue row is still taken, and the failure logged.
    fn derivation(&self, u: Underived, cache: &mut BatchCache) -> Derivation {
        let report = match pb::Report::decode(u.body.as_slice()) {
            Ok(mut report) => {
                let flows = self.flows(&mut report, cache);
                incoming(report, u.received_unix_ms, Vec::new(), Some(flows))
            }
            Err(err) => {
                tracing::error!(node = %u.node, epoch = u.epoch, seq = u.seq, error = %err,
                    "stored report does not decode; nothing derived from it");
                IncomingReport {
                    node: u.node,
                    epoch: u.epoch,
                    seq: u.seq,
                    observed_unix_ms: 0,
                    received_unix_ms: u.received_unix_ms,
                    site: String::new(),
                    country: String::new(),
                    hostname: String::new(),
                    agent_version: String::new(),
                    labels: Default::default(),
                    cpu_percent: 0.0,
                    memory_used_bytes: 0,
                    memory_total_bytes: 0,
                    telemetry: Telemetry::default(),
                    gaps: Vec::new(),
                    body: Vec::new(),
                }
            }
        };
        Derivation {
            queue_id: u.queue_id,
            report,
        }
    }
}

fn gap_reason(code: i32) -> &'static str {
    match pb::GapReason::try_from(code) {
        Ok(pb::GapReason::SpoolFull) => "spool_full",
        Ok(pb::GapReason::Corrupt) => "corrupt",
        Ok(pb::GapReason::TooLarge) => "too_large",
        _ => "unspecified",
    }
}

/// A validated report as the store takes it. `flows`: the enriched flows, to carry the
/// report's telemetry (the deriver); `None` leaves the telemetry empty (the append, which
/// does not read it).
pub fn incoming(
    report: pb::Report,
    received_unix_ms: i64,
    body: Vec<u8>,
    flows: Option<Vec<FlowRecord>>,
) -> IncomingReport {
    let info = report.node_info.unwrap_or_default();
    let host = report.host.clone().unwrap_or_default();
    let gaps = report
        .gaps
        .iter()
        .map(|g| GapRecord {
            first_seq: g.first_seq,
            last_seq: g.last_seq,
            reason: gap_reason(g.reason).to_owned(),
            dropped_unix_ms: g.dropped_unix_ms,
        })
        .collect();
    let telemetry = match flows {
        Some(flows) => Telemetry {
            host: report.host,
            gpu_state: report.gpu_state,
            gpus: report.gpus,
            processes: report.processes,
            weights: WeightUpdate {
                full: report.weight_inventory_full,
                files: report.weight_files,
                removed: report.weight_files_removed,
                chunk: report.weight_inventory,
                withheld_paths: report
                    .withheld
                    .iter()
                    .filter(|w| w.kind == WITHHELD_WEIGHT_FILE)
                    .flat_map(|w| w.paths.iter().cloned())
                    .collect(),
                withheld_unnamed: report
                    .withheld
                    .iter()
                    .any(|w| w.kind == WITHHELD_WEIGHT_FILE && w.paths_omitted > 0),
            },
            flows,
            training: report.training_runs,
        },
        None => Telemetry::default(),
    };
    IncomingReport {
        node: info.node,
        epoch: report.epoch,
        seq: report.seq,
        observed_unix_ms: report.observed_unix_ms,
        received_unix_ms,
        site: info.site,
        country: info.country,
        hostname: info.hostname,
        agent_version: info.agent_version,
        labels: info.labels.into_iter().collect(),
        cpu_percent: host.cpu_percent,
        memory_used_bytes: host.memory_used_bytes,
        memory_total_bytes: host.memory_total_bytes,
        telemetry,
        gaps,
        body,
    }
}

/// The stored form of a flow's verdict: every answer with its speed-of-light check (from
/// `place` at `min_rtt_us`), whether the sources disagree, the operator's country, and the
/// check of the verdict's own country. The deriver makes the same columns with what does not
/// depend on the RTT shared per batch ([`Judged`]); this is the whole computation, once.
pub fn verdict_columns(
    geo: &Geo,
    v: &Verdict,
    place: Option<&Place>,
    min_rtt_us: u32,
) -> VerdictColumns {
    if v.answers.is_empty() {
        return VerdictColumns {
            operator_country: v.operator_country.as_str().into(),
            ..VerdictColumns::default()
        };
    }
    let checks = geo.physics().judge(v, place, min_rtt_us);
    let physics = [
        Arc::from(""),
        Arc::from("possible"),
        Arc::from("impossible"),
    ];
    columns_of(
        v,
        checks.first().copied().flatten(),
        answers_json(v, &checks).into(),
        v.operator_country.as_str().into(),
        &physics,
    )
}

/// Kilometres as stored: rounded, within `u32`.
fn km(d: f64) -> u32 {
    d.round().clamp(0.0, f64::from(u32::MAX)) as u32
}

/// The stored answers of `v` (JSON), each with its check (`checks`, in answer order).
fn answers_json(v: &Verdict, checks: &[Option<Check>]) -> String {
    /// One stored answer (the protobuf `GeoAnswer`'s fields).
    #[derive(serde::Serialize)]
    struct Stored<'a> {
        source: &'a str,
        country: &'a str,
        kind: &'static str,
        impossible: bool,
        distance_km: u32,
    }
    let answers: Vec<Stored<'_>> = v
        .answers
        .iter()
        .zip(checks)
        .map(|(a, c)| Stored {
            source: &a.source,
            country: &a.country,
            kind: a.kind.as_str(),
            impossible: c.is_some_and(|c| c.impossible),
            distance_km: c.map_or(0, |c| km(c.distance_km)),
        })
        .collect();
    serde_json::to_string(&answers).unwrap_or_default()
}

/// The columns of a verdict with answers: its stored answers, its operator's country, and its
/// first answer's check `first` (`physics_values`: "", "possible", "impossible").
fn columns_of(
    v: &Verdict,
    first: Option<Check>,
    answers_json: Arc<str>,
    operator_country: Arc<str>,
    physics_values: &[Arc<str>; 3],
) -> VerdictColumns {
    VerdictColumns {
        answers_json,
        contested: v.contested,
        operator_country,
        physics: match first {
            Some(c) if c.impossible => physics_values[2].clone(),
            Some(_) => physics_values[1].clone(),
            None => physics_values[0].clone(),
        },
        distance_km: first.map_or(0, |c| km(c.distance_km)),
        limit_km: first.map_or(0, |c| km(c.limit_km)),
    }
}

/// Nodes whose waiting reports a deriver reads first, ahead of the queue's older reports:
/// ingest marks a node whose report sent to a destination a breach rule may count
/// ([`may_breach`]), so that a breach does not wait behind a backlog of other nodes' reports
/// (PERFORMANCE.md §8w). In memory only: after a restart those reports are derived in queue
/// order, as every report is. Each deriver has its own (which one holds a node is the store's
/// business), so ingest marks the node in each.
#[derive(Debug, Default)]
pub struct Urgent {
    nodes: std::sync::Mutex<std::collections::BTreeSet<String>>,
    marked: tokio::sync::Notify,
}

impl Urgent {
    /// Have `node`'s waiting reports derived first; false when [`MAX_URGENT_NODES`] are
    /// already waiting (its reports then go in queue order).
    pub fn mark(&self, node: &str) -> bool {
        let mut nodes = self.lock();
        if !nodes.contains(node) {
            if nodes.len() >= MAX_URGENT_NODES {
                return false;
            }
            nodes.insert(node.to_owned());
        }
        drop(nodes);
        self.marked.notify_one();
        true
    }

    /// Whether another node can be marked now.
    pub fn has_room(&self) -> bool {
        self.lock().len() < MAX_URGENT_NODES
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.lock()).into_iter().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether `report` sent to a destination a breach rule may count under `policy`: one that
/// is not plainly inside the jurisdiction (no country, a country outside, or sources that
/// disagree). Conservative (an allowed destination or a destination whose verdict the speed of
/// light rules out still goes in queue order): it only chooses what is derived first.
pub fn may_breach(report: &pb::Report, geo: &Geo, policy: &crate::policy::Policy) -> bool {
    report.flows.iter().any(|f| {
        if f.direction == pb::Direction::Inbound as i32 {
            return false;
        }
        let Ok(ip) = f.remote_address.parse::<IpAddr>() else {
            return true;
        };
        let v = geo.lookup(ip);
        v.contested
            || !policy.is_inside(&v.country)
            || v.answers.iter().any(|a| !policy.is_inside(&a.country))
    })
}

/// The derive loop of one collector.
#[derive(Debug, Clone)]
pub struct Deriver {
    /// Where the reports are, and where what is derived goes.
    pub store: Arc<dyn Store>,
    /// Geolocation and process names.
    pub enricher: Enricher,
    /// Counted here: reports derived, batch time.
    pub metrics: Arc<Metrics>,
    /// Acknowledged vs derived, for queries.
    pub freshness: Arc<Freshness>,
    /// Woken by ingest after a stored report (each deriver has its own).
    pub appended: Arc<tokio::sync::Notify>,
    /// Which of this collector's derivers this is (0 for the first), for [`Freshness`].
    pub slot: usize,
    /// Nodes whose reports this deriver reads first (marked by ingest).
    pub urgent: Arc<Urgent>,
    /// Woken here after reports read first were derived (the rule evaluation runs at once).
    pub urgent_derived: Arc<tokio::sync::Notify>,
    /// Woken here after a batch was derived (the breach rules evaluate soon after).
    pub derived: Arc<tokio::sync::Notify>,
    /// Most reports per batch.
    pub batch_reports: u32,
    /// Where reports are decoded and enriched: threads at a lower priority than the
    /// acknowledgements' ([`derive_threads`]).
    pub threads: Arc<DeriveThreads>,
}

/// The deriver's threads for `config`: as many as enrich a batch at once, at `[derive] nice`.
pub fn derive_threads(config: &DeriveConfig) -> Result<Arc<DeriveThreads>, StoreError> {
    DeriveThreads::start(enrich_threads(), config.nice)
}

/// Threads that decode and enrich one batch at once: the machine's cores, at most
/// [`ENRICH_THREADS`].
fn enrich_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .clamp(1, ENRICH_THREADS)
}

impl Deriver {
    /// Derive the oldest queued reports, [`Deriver::read_limit`] at most, in transactions of
    /// `batch_reports`: how many were queued in it and how many this call derived (fewer when
    /// another replica took some).
    pub async fn derive_batch(&self) -> Result<(usize, u64), StoreError> {
        let read_at = Instant::now();
        let queued = self.store.underived(self.read_limit()).await?;
        if queued.is_empty() {
            // Caught up (a full read before this one may have left the lag set).
            self.freshness.lag_from(self.slot, None);
            return Ok((0, 0));
        }
        // The oldest report not derived is the first read: the lag ages from it until this
        // transaction commits.
        self.freshness
            .lag_from(self.slot, queued.first().map(|u| u.received_unix_ms));
        let n = queued.len();
        let size = usize::try_from(self.batch_reports)
            .unwrap_or(usize::MAX)
            .max(1);
        let mut parts = std::collections::VecDeque::new();
        let mut rest = queued.into_iter();
        loop {
            let part: Vec<Underived> = rest.by_ref().take(size).collect();
            if part.is_empty() {
                break;
            }
            parts.push_back(part);
        }
        let mut derived = 0;
        let mut cycle_from = read_at;
        let mut started = Instant::now();
        let Some(mut part) = parts.pop_front() else {
            return Ok((0, 0));
        };
        // The batch is enriched again from the bodies in the rare case the store refuses it
        // (cheaper than keeping a deep copy of every enriched batch).
        let mut batch = self.enrich(part.clone()).await?;
        loop {
            // Between transactions: what may breach a rule first.
            self.derive_urgent().await?;
            let last_received = part.last().map(|u| u.received_unix_ms);
            // Each transaction's reports are written while the next ones are decoded and
            // enriched (on the other cores).
            let next = parts.pop_front();
            let next_started = Instant::now();
            let (written, enriched) = tokio::join!(self.write(part, batch), async {
                match &next {
                    Some(q) => Some(self.enrich(q.clone()).await),
                    None => None,
                }
            });
            let d = written?;
            self.metrics.derive_batch(d, started.elapsed());
            // What a report waiting now waits for at best: one such cycle (the first from
            // the read, the next ones from the commit before them).
            self.freshness.cycle_took(self.slot, cycle_from.elapsed());
            cycle_from = Instant::now();
            derived += d;
            // The oldest report known not to be derived: the next part's first; after the
            // last part of a full read, one received after this part's last (its time
            // over-states the lag: the acknowledgements wait a little early, never late).
            self.freshness.lag_from(
                self.slot,
                match &next {
                    Some(q) => q.first().map(|u| u.received_unix_ms),
                    None if n == self.read_limit() as usize => last_received,
                    None => None,
                },
            );
            match (next, enriched) {
                (Some(q), Some(e)) => {
                    part = q;
                    batch = e?;
                    started = next_started;
                }
                _ => return Ok((n, derived)),
            }
        }
    }

    /// Derive the waiting reports of the nodes ingest marked ([`Urgent`]) in one transaction,
    /// ahead of the queue's older reports, and wake the rule evaluation: how many. A node's
    /// reports are read in queue order, all of them (up to `batch_reports`), so its order
    /// holds; the batches read before keep their copies of them, which their transactions
    /// find taken and skip.
    async fn derive_urgent(&self) -> Result<u64, StoreError> {
        let nodes = self.urgent.take();
        if nodes.is_empty() {
            return Ok(0);
        }
        let queued = self.store.underived_of(&nodes, self.batch_reports).await?;
        if queued.is_empty() {
            return Ok(0);
        }
        if queued.len() >= self.batch_reports as usize {
            // More may wait: the next look reads on.
            for n in &nodes {
                self.urgent.mark(n);
            }
        }
        let started = Instant::now();
        let batch = self.enrich(queued.clone()).await?;
        let d = self.write(queued, batch).await?;
        self.metrics.derive_batch(d, started.elapsed());
        self.metrics.derived_first(d);
        if d > 0 {
            self.derived.notify_one();
            self.urgent_derived.notify_one();
        }
        Ok(d)
    }

    /// Most reports [`Deriver::derive_batch`] reads at once: one transaction's, or, where one
    /// deriver reads the whole queue (SQLite), [`PIPELINE_BATCHES`] transactions' (written one
    /// after another, each decoded and enriched while the one before it is written).
    fn read_limit(&self) -> u32 {
        if self.store.derives_a_share() {
            self.batch_reports
        } else {
            self.batch_reports.saturating_mul(PIPELINE_BATCHES)
        }
    }

    /// Derive one enriched batch (`queued`, its queue rows and bodies, enriched as `batch`)
    /// in one transaction; when the store refuses it, its reports one by one.
    async fn write(
        &self,
        queued: Vec<Underived>,
        batch: Vec<Derivation>,
    ) -> Result<u64, StoreError> {
        let n = queued.len();
        match self.store.derive(batch).await {
            Ok(d) => Ok(d),
            Err(err) if n > 1 => {
                tracing::debug!(reports = n, error = %err, "derive batch failed; deriving its reports one by one");
                self.derive_one_by_one(self.enrich(queued).await?).await
            }
            Err(err) => {
                self.derive_one_by_one_after(self.enrich(queued).await?, err)
                    .await
            }
        }
    }

    /// Decode and enrich `queued` off the async threads, in up to [`ENRICH_THREADS`] slices
    /// at once (in order; each slice geolocates its addresses once).
    async fn enrich(&self, queued: Vec<Underived>) -> Result<Vec<Derivation>, StoreError> {
        let threads = self.threads.threads();
        let slice = queued.len().div_ceil(threads).max(ENRICH_SLICE_MIN);
        let n = queued.len();
        let mut rest = queued.into_iter();
        let mut slices = Vec::new();
        loop {
            let part: Vec<Underived> = rest.by_ref().take(slice).collect();
            if part.is_empty() {
                break;
            }
            let enricher = self.enricher.clone();
            slices.push(self.threads.run(move || enricher.derivations(part)));
        }
        let mut out = Vec::with_capacity(n);
        for s in futures::future::join_all(slices).await {
            out.extend(s?);
        }
        Ok(out)
    }

    /// Derive each report of a failed batch in its own transaction, so that one report the
    /// store refuses fails alone.
    async fn derive_one_by_one(&self, batch: Vec<Derivation>) -> Result<u64, StoreError> {
        let mut derived = 0;
        for d in batch {
            derived += match self.store.derive(vec![d.clone()]).await {
                Ok(n) => n,
                Err(err) => self.derive_one_by_one_after(vec![d], err).await?,
            };
        }
        Ok(derived)
    }

    /// One report whose derivation failed with `err`: when the store refused its data (a value
    /// out of range or a constraint, which fails the same way every time), it is taken off the
    /// queue with nothing derived and the failure logged and counted, so that it cannot stop
    /// derivation for everyone; any other error (the database is unavailable) is returned and
    /// the batch is tried again later.
    async fn derive_one_by_one_after(
        &self,
        batch: Vec<Derivation>,
        err: StoreError,
    ) -> Result<u64, StoreError> {
        if !err.is_data_error() {
            return Err(err);
        }
        for d in batch {
            let r = &d.report;
            tracing::error!(node = %r.node, epoch = r.epoch, seq = r.seq, error = %err,
                cause = %sov_common::error::source_chain(&err),
                "the store refused what this report derives; the report stays stored, nothing is derived from it");
            self.metrics.derive_failed();
            let mut empty = d.clone();
            empty.report.telemetry = Telemetry::default();
            self.store.derive(vec![empty]).await?;
        }
        Ok(0)
    }

    /// Whether no report received at or before `since_unix_ms` waits for derivation (false
    /// when the store cannot say).
    async fn nothing_waits_from(&self, since_unix_ms: i64) -> bool {
        self.store.derive_status().await.is_ok_and(|s| {
            s.oldest_pending_received_unix_ms
                .is_none_or(|t| t > since_unix_ms)
        })
    }

    /// Derive until `stop`: batch after batch while reports wait, then sleep until ingest
    /// stores one (or [`IDLE_POLL`] passes, for other replicas' reports).
    pub async fn run(self, stop: CancellationToken) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            let target = self.freshness.acked_so_far();
            let since = sov_common::clock::now_unix_ms();
            match self.derive_batch().await {
                Ok((queued, derived)) => {
                    if derived > 0 {
                        self.derived.notify_one();
                    }
                    if queued == self.read_limit() as usize {
                        continue;
                    }
                    // The queue held fewer than a batch: everything acknowledged before
                    // `target` was read was in it (or derived before); where this replica
                    // reads only its share of the queue, once nothing received before `since`
                    // waits anywhere.
                    if !self.store.derives_a_share() || self.nothing_waits_from(since).await {
                        self.freshness.derived_through(target);
                    }
                    if queued > 0 {
                        // Under load, let the next batch gather reports for a moment rather
                        // than deriving a handful at a time: larger batches merge more flows
                        // per aggregate row and commit less often (adds at most this to the lag).
                        // What may breach a rule does not wait for the gathering.
                        let until = tokio::time::Instant::now() + GATHER;
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => return,
                                () = tokio::time::sleep_until(until) => break,
                                () = self.urgent.marked.notified() => {
                                    if let Err(err) = self.derive_urgent().await {
                                        tracing::warn!(error = %err, "deriving reports that may breach a rule failed; they go in queue order");
                                    }
                                }
                            }
                        }
                        continue;
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = self.appended.notified() => {}
                        () = tokio::time::sleep(IDLE_POLL) => {}
                    }
                }
                Err(err) => {
                    // A deriver that cannot go on does not hold acknowledgements back.
                    self.freshness.lag_from(self.slot, None);
                    tracing::warn!(error = %err, cause = %sov_common::error::source_chain(&err), "derivation failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(RETRY_AFTER) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_settings_are_refused_naming_the_field() {
        let bad = DeriveConfig {
            batch_reports: 0,
            query_wait_ms: 60_001,
            nice: 20,
            max_lag_secs: 3601,
            connections: 17,
        };
        let problems = validate(&bad);
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert_eq!(problems[2].0, "derive.connections");
        assert!(problems[2].1.contains("17"));
        assert_eq!(problems[3].0, "derive.max_lag_secs");
        assert_eq!(problems[4].0, "derive.nice");
        assert_eq!(problems[0].0, "derive.batch_reports");
        assert!(problems[0].1.contains('0'));
        assert_eq!(problems[1].0, "derive.query_wait_ms");
        assert!(validate(&DeriveConfig::default()).is_empty());
        let none = DeriveConfig {
            connections: 0,
            ..DeriveConfig::default()
        };
        assert_eq!(validate(&none)[0].0, "derive.connections");
    }

    fn deriver(store: Arc<dyn Store>) -> Deriver {
        Deriver {
            store,
            enricher: Enricher::new(Geo::from_config(&Default::default()).unwrap(), None),
            metrics: Arc::new(Metrics::new()),
            freshness: Freshness::new(Duration::ZERO),
            appended: Arc::default(),
            slot: 0,
            urgent: Arc::default(),
            urgent_derived: Arc::default(),
            derived: Arc::default(),
            batch_reports: DEFAULT_BATCH_REPORTS,
            threads: DeriveThreads::start(2, DEFAULT_NICE).unwrap(),
        }
    }

    fn pushed(seq: u64, weight_size: u64) -> pb::Report {
        pb::Report {
            epoch: 1,
            seq,
            observed_unix_ms: 60_000 * i64::try_from(seq).unwrap(),
            node_info: Some(pb::NodeInfo {
                node: "n".into(),
                country: "MA".into(),
                ..Default::default()
            }),
            weight_files: vec![pb::WeightFile {
                path: format!("/models/{seq}.safetensors"),
                size_bytes: weight_size,
                ..Default::default()
            }],
            flows: vec![pb::Flow {
                remote_address: "8.8.8.8".into(),
                remote_port: 443,
                bytes_sent: 100,
                direction: pb::Direction::Outbound as i32,
                end_unix_ms: 60_000 * i64::try_from(seq).unwrap(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// The batch's shared verdict pieces (distances per address and place, stored answers per
    /// outcome) give every flow exactly the columns the whole computation gives it: a distance
    /// reused for another place or another answer, or answers reused across RTTs that judge
    /// differently, would fail here.
    #[test]
    fn verdicts_shared_across_a_batch_equal_each_flow_judged_alone() {
        let dir = tempfile::tempdir().unwrap();
        // 8.8.8.8 placed in France by a CSV source (the embedded table's answer follows it:
        // two answers), 1.1.1.1 in Spain, 9.9.9.9 in Germany by an override, 10.1.2.3 nowhere.
        let csv = dir.path().join("ranges.csv");
        std::fs::write(&csv, "8.8.8.0,8.8.8.255,FR\n1.1.1.0,1.1.1.255,ES\n").unwrap();
        let geo = Geo::from_config(&crate::geo::config::GeoConfig {
            databases: vec![csv],
            overrides: vec![crate::geo::config::GeoOverride {
                cidr: "9.9.9.0/24".into(),
                country: "DE".into(),
                ..Default::default()
            }],
        })
        .unwrap();
        let addresses = ["8.8.8.8", "1.1.1.1", "9.9.9.9", "10.1.2.3"];
        let rtts = [0u32, 400, 5_000, 20_000, 80_000];
        // Nodes in Morocco, France, Spain and nowhere known, interleaved in one batch.
        let countries = ["MA", "FR", "", "ES", "MA", "FR"];
        let batch: Vec<Underived> = countries
            .iter()
            .enumerate()
            .map(|(i, country)| {
                let mut flows = Vec::new();
                for a in addresses {
                    for rtt in rtts {
                        flows.push(pb::Flow {
                            remote_address: a.into(),
                            remote_port: 443,
                            min_rtt_us: rtt,
                            pid: 7,
                            ..Default::default()
                        });
                    }
                }
                let r = pb::Report {
                    seq: i as u64 + 1,
                    node_info: Some(pb::NodeInfo {
                        node: format!("n{i}"),
                        country: (*country).into(),
                        ..Default::default()
                    }),
                    processes: vec![pb::ProcessInfo {
                        pid: 7,
                        name: "vllm".into(),
                        ..Default::default()
                    }],
                    flows,
                    ..Default::default()
                };
                Underived {
                    queue_id: i as i64,
                    node: format!("n{i}"),
                    epoch: 0,
                    seq: i as u64 + 1,
                    received_unix_ms: 0,
                    body: r.encode_to_vec(),
                }
            })
            .collect();
        let enricher = Enricher::new(geo.clone(), None);
        let derived = enricher.derivations(batch);
        assert_eq!(derived.len(), countries.len());
        let mut answers_seen = std::collections::HashSet::new();
        let mut physics_seen = std::collections::HashSet::new();
        for (d, country) in derived.iter().zip(countries) {
            let place = (!country.is_empty()).then(|| Place::Country(country.into()));
            assert_eq!(d.report.telemetry.flows.len(), addresses.len() * rtts.len());
            for f in &d.report.telemetry.flows {
                let v = geo.lookup(f.flow.remote_address.parse().unwrap());
                let alone = verdict_columns(&geo, &v, place.as_ref(), f.flow.min_rtt_us);
                assert_eq!(
                    f.verdict, alone,
                    "{} from {country:?} at {} us",
                    f.flow.remote_address, f.flow.min_rtt_us
                );
                assert_eq!(&*f.country, v.country.as_str());
                assert_eq!(&*f.org, v.org.as_str());
                assert_eq!(&*f.geo_source, v.source.as_str());
                assert_eq!(&*f.process, "vllm");
                answers_seen.insert((
                    f.flow.remote_address.clone(),
                    f.verdict.answers_json.clone(),
                ));
                physics_seen.insert(f.verdict.physics.clone());
            }
        }
        // The batch did exercise what could be mixed up: an address whose stored answers
        // differ by RTT or place, and every outcome of the check.
        let for_8888 = answers_seen.iter().filter(|(a, _)| a == "8.8.8.8").count();
        assert!(for_8888 >= 3, "{answers_seen:?}");
        for p in ["", "possible", "impossible"] {
            assert!(physics_seen.contains(p), "{p:?} in {physics_seen:?}");
        }
    }

    #[tokio::test]
    async fn a_report_the_store_refuses_to_derive_fails_alone_and_does_not_stop_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        // Report 2's weight file is larger than the store's integers hold.
        for (seq, size) in [(1, 10), (2, u64::MAX), (3, 30)] {
            let r = pushed(seq, size);
            let body = r.encode_to_vec();
            store.ingest(incoming(r, 1_000, body, None)).await.unwrap();
        }
        let d = deriver(store.clone());
        assert_eq!(d.derive_batch().await.unwrap(), (3, 2));
        assert_eq!(store.derive_status().await.unwrap().pending, 0);
        assert_eq!(d.metrics.derived_reports(), 2);
        let (rows, _) = store
            .egress(crate::store::EgressQuery {
                since_unix_ms: 0,
                until_unix_ms: 600_000,
                by: "country".into(),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(rows.iter().map(|r| r.bytes_sent).sum::<u64>(), 200);
        let text = d.metrics.render(&crate::metrics::Scrape::default());
        assert!(
            text.contains("sov_collector_derive_failures_total 1\n"),
            "{text}"
        );
        // Every report stays stored and counted.
        assert_eq!(store.list_nodes("", 10).await.unwrap()[0].reports, 3);
    }

    #[tokio::test]
    async fn a_backlog_is_read_several_batches_at_once_and_derived_once_a_transaction_each() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        for seq in 1..=7 {
            let r = pushed(seq, 10);
            let body = r.encode_to_vec();
            store.ingest(incoming(r, 1_000, body, None)).await.unwrap();
        }
        let mut d = deriver(store.clone());
        d.batch_reports = 2;
        // SQLite: one deriver reads the whole queue, so up to four batches at once.
        assert_eq!(d.derive_batch().await.unwrap(), (7, 7));
        assert_eq!(store.derive_status().await.unwrap().pending, 0);
        let text = d.metrics.render(&crate::metrics::Scrape::default());
        assert!(
            text.contains("sov_collector_derive_batches_total 4\n"),
            "transactions of at most two reports: {text}"
        );
        // Every report's flow counted once.
        let (rows, _) = store
            .egress(crate::store::EgressQuery {
                since_unix_ms: 0,
                until_unix_ms: 600_000,
                by: "country".into(),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(rows.iter().map(|r| r.bytes_sent).sum::<u64>(), 700);
        assert_eq!(d.derive_batch().await.unwrap(), (0, 0));
    }

    fn geo_with(overrides: &[(&str, &str)]) -> Geo {
        Geo::from_config(&crate::geo::config::GeoConfig {
            databases: vec![],
            overrides: overrides
                .iter()
                .map(|(cidr, country)| crate::geo::config::GeoOverride {
                    cidr: (*cidr).to_owned(),
                    country: (*country).to_owned(),
                    asn: None,
                    org: None,
                    operator_country: None,
                })
                .collect(),
        })
        .unwrap()
    }

    #[test]
    fn a_report_may_breach_a_rule_when_a_destination_is_not_plainly_inside() {
        let geo = geo_with(&[("198.18.0.0/24", "MA"), ("198.18.1.0/24", "FR")]);
        let policy = crate::policy::rules::testutil::policy("");
        let to = |addr: &str, direction: pb::Direction| {
            let mut r = pushed(1, 10);
            r.flows[0].remote_address = addr.into();
            r.flows[0].direction = direction as i32;
            r
        };
        let out = pb::Direction::Outbound;
        assert!(!may_breach(&to("198.18.0.7", out), &geo, &policy), "inside");
        assert!(may_breach(&to("198.18.1.7", out), &geo, &policy), "FR");
        assert!(
            !may_breach(&to("198.18.1.7", pb::Direction::Inbound), &geo, &policy),
            "inbound traffic is no rule's"
        );
        assert!(
            may_breach(&to("not an address", out), &geo, &policy),
            "a destination nobody can place"
        );
        let mut both = to("198.18.0.7", out);
        both.flows.push(to("198.18.1.9", out).flows.remove(0));
        assert!(
            may_breach(&both, &geo, &policy),
            "one flow abroad is enough"
        );
        let mut none = pushed(1, 10);
        none.flows.clear();
        assert!(!may_breach(&none, &geo, &policy));
    }

    /// A node marked urgent (a report that may breach a rule) has its waiting reports derived
    /// before the backlog ahead of them in the queue, in their own order.
    #[tokio::test]
    async fn reports_that_may_breach_a_rule_are_derived_before_the_backlog_ahead_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        for seq in 1..=100 {
            let r = pushed(seq, 10);
            let body = r.encode_to_vec();
            store.ingest(incoming(r, 1_000, body, None)).await.unwrap();
        }
        // Node "x": two reports at the end of the queue, the second abroad.
        for seq in 1..=2 {
            let mut r = pushed(seq, 10);
            if let Some(info) = r.node_info.as_mut() {
                info.node = "x".into();
            }
            r.flows[0].bytes_sent = 7 * seq;
            let body = r.encode_to_vec();
            store.ingest(incoming(r, 2_000, body, None)).await.unwrap();
        }
        let mut d = deriver(store.clone());
        d.batch_reports = 10;
        assert!(d.urgent.mark("x"));
        let mut wake = std::pin::pin!(d.urgent_derived.notified());
        // One call reads four transactions' worth of the queue's oldest reports (none of x's)
        // and derives x's two first.
        assert_eq!(d.derive_batch().await.unwrap(), (40, 40));
        assert_eq!(store.derive_status().await.unwrap().pending, 102 - 40 - 2);
        let (rows, _) = store
            .egress(crate::store::EgressQuery {
                since_unix_ms: 0,
                until_unix_ms: 600_000,
                by: "node".into(),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        let x: u64 = rows
            .iter()
            .filter(|r| r.node == "x")
            .map(|r| r.bytes_sent)
            .sum();
        assert_eq!(x, 21, "both of x's reports derived: {rows:?}");
        assert!(
            futures::FutureExt::now_or_never(wake.as_mut()).is_some(),
            "the rule evaluation is woken"
        );
        let text = d.metrics.render(&crate::metrics::Scrape::default());
        assert!(
            text.contains("sov_collector_derived_first_reports_total 2\n"),
            "{text}"
        );
        // Nothing is derived twice: the rest of the queue, then nothing.
        assert_eq!(d.derive_batch().await.unwrap(), (40, 40));
        assert_eq!(d.derive_batch().await.unwrap(), (20, 20));
        assert_eq!(store.derive_status().await.unwrap().pending, 0);
        assert_eq!(d.derive_batch().await.unwrap(), (0, 0));
    }

    /// `[derive] max_lag_secs`: while the deriver says it is further behind than the bound,
    /// a report waits before it is stored, and goes on once derivation is back under it.
    #[tokio::test]
    async fn acknowledgements_wait_while_derivation_is_behind_the_bound_and_go_on_when_it_catches_up()
     {
        let now = sov_common::clock::now_unix_ms();
        let f = Freshness::bounded(Duration::ZERO, Duration::from_secs(5));
        assert!(!f.admit().await, "nothing behind: no wait");
        f.lag_from(0, Some(now - 60_000));
        let f2 = f.clone();
        let waiting = tokio::spawn(async move { f2.admit().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a minute behind: the report waits");
        f.lag_from(0, Some(sov_common::clock::now_unix_ms() - 1_000));
        assert!(waiting.await.unwrap(), "it waited, and went on");
        // A deriver that fails says nothing waits; no bound: never a wait.
        f.lag_from(0, Some(now - 60_000));
        f.lag_from(0, None);
        assert!(!f.admit().await);
        let free = Freshness::new(Duration::ZERO);
        free.lag_from(0, Some(0));
        assert!(!free.admit().await);
    }

    /// With several derivers (`[derive] connections`), the lag is the oldest report any of
    /// them has waiting: one that caught up does not hide another that is behind.
    #[tokio::test]
    async fn the_lag_is_the_oldest_any_deriver_has_waiting() {
        let now = sov_common::clock::now_unix_ms();
        let f = Freshness::bounded(Duration::ZERO, Duration::from_secs(5));
        f.lag_from(1, Some(now - 60_000));
        f.lag_from(0, None);
        let f2 = f.clone();
        let waiting = tokio::spawn(async move { f2.admit().await });
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "deriver 1 is a minute behind: the report waits though deriver 0 caught up"
        );
        f.lag_from(0, Some(now - 30_000));
        f.lag_from(1, None);
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "deriver 0 is now 30 s behind: still waiting"
        );
        f.lag_from(0, Some(sov_common::clock::now_unix_ms() - 1_000));
        assert!(waiting.await.unwrap(), "both under the bound: it went on");
        // The longest cycle counts: 3 s behind and one deriver at 2.5 s a cycle.
        f.lag_from(1, Some(sov_common::clock::now_unix_ms() - 3_000));
        f.cycle_took(0, Duration::from_millis(2_500));
        f.cycle_took(1, Duration::from_millis(100));
        let f3 = f.clone();
        let waiting = tokio::spawn(async move { f3.admit().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "3 s + the longer cycle: waits");
        f.lag_from(1, None);
        assert!(waiting.await.unwrap());
    }

    /// The bound acts before the lag passes it: the deriver's oldest waiting report is derived
    /// one cycle later at best, so a report waits while that age plus one cycle is past the
    /// bound (PostgreSQL's deriver, whose cycle is a 2,048-report transaction, overshot a bound
    /// told only once per commit: PERFORMANCE.md §8t).
    #[tokio::test]
    async fn acknowledgements_wait_when_the_lag_would_pass_the_bound_before_the_next_commit() {
        let f = Freshness::bounded(Duration::ZERO, Duration::from_secs(5));
        f.lag_from(0, Some(sov_common::clock::now_unix_ms() - 3_000));
        f.cycle_took(0, Duration::from_millis(500));
        assert!(
            !f.admit().await,
            "3 s behind, 0.5 s a cycle: under the bound"
        );
        f.cycle_took(0, Duration::from_millis(2_500));
        let f2 = f.clone();
        let waiting = tokio::spawn(async move { f2.admit().await });
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "3 s behind and 2.5 s a cycle: the report waits"
        );
        // The deriver's next word, still behind, keeps it waiting; back under, it goes on.
        f.lag_from(0, Some(sov_common::clock::now_unix_ms() - 2_900));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "2.9 s + 2.5 s: still waiting");
        f.lag_from(0, Some(sov_common::clock::now_unix_ms() - 1_000));
        assert!(waiting.await.unwrap(), "it waited, and went on");
    }

    #[tokio::test]
    async fn a_query_waits_for_what_was_acknowledged_before_it_and_no_longer() {
        let f = Freshness::new(Duration::from_millis(50));
        assert!(f.wait().await, "nothing acknowledged: nothing to wait for");
        f.acked();
        let started = Instant::now();
        assert!(!f.wait().await, "not derived yet: the wait runs out");
        assert!(started.elapsed() >= Duration::from_millis(50));
        let f2 = f.clone();
        let waiter = tokio::spawn(async move { f2.wait().await });
        f.derived_through(1);
        assert!(waiter.await.unwrap());
    }
}
