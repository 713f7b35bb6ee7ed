//! Prometheus text exposition (format 0.0.4) of the collector's own health on plain HTTP:
//! counters and gauges only, never inventory or flow data.
//!
//! [`Metrics`] is shared (`Arc`) by the ingest service, which counts, and [`serve`], which
//! answers `GET /metrics` with [`Metrics::render`] through the small HTTP/1.1 server the agent
//! uses too ([`sov_common::prometheus`]).

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

pub use sov_common::prometheus::{
    CONTENT_TYPE, MAX_CONNECTIONS, MAX_REQUEST_HEAD, ProcessStats, READ_TIMEOUT, WRITE_TIMEOUT,
};
use sov_common::prometheus::{family, process_families};

use crate::store::{IngestOutcome, NodeRow, Store};

/// `[metrics]`: Prometheus text exposition of the collector's own health (counters and
/// gauges only, never inventory or flow data) on plain HTTP, without authentication.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address serving `GET /metrics`, e.g. "127.0.0.1:9464". Default: none (off).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// A node whose last report is older than this is counted in `sov_collector_nodes_silent`.
pub const SILENT_AFTER_SECS: i64 = 300;
/// Most nodes counted per scrape (the node gauges stop there).
pub const MAX_NODES_COUNTED: u64 = 100_000;
/// Page size when counting nodes.
const NODE_PAGE: u32 = 1000;
/// A node census this recent is reused by the next scrape (concurrent scrapers cost one listing).
const CENSUS_MAX_AGE: Duration = Duration::from_secs(5);
/// gRPC status codes the ingest service answers with (always exposed, zero included).
const INGEST_ERROR_CODES: [tonic::Code; 5] = [
    tonic::Code::Unauthenticated,
    tonic::Code::PermissionDenied,
    tonic::Code::InvalidArgument,
    tonic::Code::ResourceExhausted,
    tonic::Code::Unavailable,
];

/// Number of gRPC status codes (0 OK ..= 16 UNAUTHENTICATED).
const CODES: usize = 17;

/// The collector's counters, shared by everything that counts. All atomics: counting never
/// blocks ingest.
#[derive(Debug)]
pub struct Metrics {
    stored: AtomicU64,
    duplicate: AtomicU64,
    conflict: AtomicU64,
    /// Ingest errors by `tonic::Code as usize`.
    errors: [AtomicU64; CODES],
    store_ingest_nanos: AtomicU64,
    store_ingests: AtomicU64,
    flows: AtomicU64,
    weight_files: AtomicU64,
    /// gRPC connections open now (handshaking or established).
    connections_open: AtomicU64,
    /// gRPC connections closed at once because `max_connections` were open.
    connections_refused: AtomicU64,
    /// TLS handshakes that failed: [refused by the peer or by us, timed out].
    handshakes_failed: [AtomicU64; 2],
    /// Reports derived by this collector's deriver, and the time its batches took.
    derived: AtomicU64,
    derive_batches: AtomicU64,
    derive_nanos: AtomicU64,
    derive_failed: AtomicU64,
    /// Reports derived ahead of the queue because they may breach a rule.
    derived_first: AtomicU64,
    /// Reports whose storing waited for derivation (`[derive] max_lag_secs`).
    waited_for_derivation: AtomicU64,
    census: Mutex<Option<(Instant, Option<NodeCensus>)>>,
}

/// Most open breaches counted per scrape for `sov_collector_breaches_open`.
pub const MAX_BREACHES_COUNTED: u32 = 100_000;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Nodes known to the store, counted at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCensus {
    /// Nodes counted (at most [`MAX_NODES_COUNTED`]).
    pub nodes: u64,
    /// Of those, nodes whose last report is older than [`SILENT_AFTER_SECS`].
    pub silent: u64,
}

impl NodeCensus {
    /// Count `rows` as seen at `now_unix_ms`.
    pub fn add(&mut self, rows: &[NodeRow], now_unix_ms: i64) {
        let cutoff = now_unix_ms.saturating_sub(SILENT_AFTER_SECS * 1000);
        for row in rows {
            self.nodes += 1;
            if row.last_seen_unix_ms < cutoff {
                self.silent += 1;
            }
        }
    }

    /// Page through every node of `store` (at most [`MAX_NODES_COUNTED`]); rows are counted
    /// page by page and never kept.
    pub async fn of_store(
        store: &dyn Store,
        now_unix_ms: i64,
    ) -> Result<Self, crate::store::StoreError> {
        let mut census = Self::default();
        let mut after = String::new();
        while census.nodes < MAX_NODES_COUNTED {
            let room = u32::try_from(MAX_NODES_COUNTED - census.nodes).unwrap_or(NODE_PAGE);
            let page = store.list_nodes(&after, NODE_PAGE.min(room)).await?;
            census.add(&page, now_unix_ms);
            match page.last() {
                Some(last) if page.len() == NODE_PAGE.min(room) as usize => {
                    after.clone_from(&last.node);
                }
                _ => break,
            }
        }
        if census.nodes >= MAX_NODES_COUNTED {
            tracing::warn!(cap = MAX_NODES_COUNTED, "metrics: node count capped");
        }
        Ok(census)
    }
}

/// What a scrape measures besides the counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    /// Node gauges; `None` when the store could not list nodes (the gauges are then absent).
    pub nodes: Option<NodeCensus>,
    /// Process gauges; `None` without `/proc`.
    pub process: Option<ProcessStats>,
    /// The alert outbox per sink; `None` when the store could not say.
    pub outbox: Option<Vec<crate::store::SinkStats>>,
    /// Open breaches per rule (every built-in rule, 0 when none); `None` when the store could
    /// not say.
    pub breaches_open: Option<std::collections::BTreeMap<String, u64>>,
    /// The derive queue; `None` when the store could not say.
    pub derive: Option<crate::store::DeriveStatus>,
}

/// Open breaches per rule: every rule of `rules` (0 when none) and any other rule found.
pub async fn open_breaches(
    store: &dyn Store,
    rules: &[&str],
) -> Result<std::collections::BTreeMap<String, u64>, crate::store::StoreError> {
    let mut per: std::collections::BTreeMap<String, u64> =
        rules.iter().map(|r| ((*r).to_owned(), 0)).collect();
    let open = store
        .list_breaches(crate::breach::BreachFilter {
            state: Some(crate::breach::BreachState::Open),
            limit: MAX_BREACHES_COUNTED,
            ..Default::default()
        })
        .await?;
    for b in open {
        *per.entry(b.rule).or_default() += 1;
    }
    Ok(per)
}

/// The lowercase snake_case name of a gRPC code, as label value.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "ok",
        C::Cancelled => "cancelled",
        C::Unknown => "unknown",
        C::InvalidArgument => "invalid_argument",
        C::DeadlineExceeded => "deadline_exceeded",
        C::NotFound => "not_found",
        C::AlreadyExists => "already_exists",
        C::PermissionDenied => "permission_denied",
        C::ResourceExhausted => "resource_exhausted",
        C::FailedPrecondition => "failed_precondition",
        C::Aborted => "aborted",
        C::OutOfRange => "out_of_range",
        C::Unimplemented => "unimplemented",
        C::Internal => "internal",
        C::Unavailable => "unavailable",
        C::DataLoss => "data_loss",
        C::Unauthenticated => "unauthenticated",
    }
}

/// Escape a label value: backslash, double quote and line feed.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Metrics {
    /// All counters at zero.
    pub fn new() -> Self {
        Self {
            stored: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
            conflict: AtomicU64::new(0),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            store_ingest_nanos: AtomicU64::new(0),
            store_ingests: AtomicU64::new(0),
            flows: AtomicU64::new(0),
            weight_files: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            handshakes_failed: [AtomicU64::new(0), AtomicU64::new(0)],
            derived: AtomicU64::new(0),
            derive_batches: AtomicU64::new(0),
            derive_nanos: AtomicU64::new(0),
            derive_failed: AtomicU64::new(0),
            derived_first: AtomicU64::new(0),
            waited_for_derivation: AtomicU64::new(0),
            census: Mutex::new(None),
        }
    }

    /// One report through the store: its outcome, and what a stored report carried.
    pub fn report_ingested(&self, outcome: IngestOutcome, flows: usize, weight_files: usize) {
        let counter = match outcome {
            IngestOutcome::Stored => {
                self.flows.fetch_add(flows as u64, Ordering::Relaxed);
                self.weight_files
                    .fetch_add(weight_files as u64, Ordering::Relaxed);
                &self.stored
            }
            IngestOutcome::Duplicate => &self.duplicate,
            IngestOutcome::Conflict => &self.conflict,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One refused ingest, by the status code its agent got.
    pub fn ingest_error(&self, code: tonic::Code) {
        if let Some(c) = self.errors.get(code as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One call of `Store::ingest` that took `elapsed` (successful or not).
    pub fn store_ingest(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.store_ingest_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.store_ingests.fetch_add(1, Ordering::Relaxed);
    }

    /// One derive batch that derived `reports` in `elapsed` (decoding, enrichment and the
    /// commit).
    pub fn derive_batch(&self, reports: u64, elapsed: Duration) {
        self.derived.fetch_add(reports, Ordering::Relaxed);
        self.derive_batches.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.derive_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// One report the store refused to derive (taken off the queue with nothing derived).
    pub fn derive_failed(&self) {
        self.derive_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// `reports` derived ahead of the queue (they may breach a rule; `derive::Urgent`).
    pub fn derived_first(&self, reports: u64) {
        self.derived_first.fetch_add(reports, Ordering::Relaxed);
    }

    /// One report waited, before it was stored, for derivation to come back under
    /// `[derive] max_lag_secs`.
    pub fn waited_for_derivation(&self) {
        self.waited_for_derivation.fetch_add(1, Ordering::Relaxed);
    }

    /// Reports this collector's deriver derived so far.
    pub fn derived_reports(&self) -> u64 {
        load(&self.derived)
    }

    /// The node census, reused when younger than [`CENSUS_MAX_AGE`].
    async fn census(&self, store: &dyn Store) -> Option<NodeCensus> {
        let mut cached = self.census.lock().await;
        if let Some((at, census)) = *cached
            && at.elapsed() < CENSUS_MAX_AGE
        {
            return census;
        }
        let census = match NodeCensus::of_store(store, sov_common::clock::now_unix_ms()).await {
            Ok(c) => Some(c),
            Err(err) => {
                tracing::warn!(error = %err, "metrics: cannot list nodes; node gauges left out");
                None
            }
        };
        *cached = Some((Instant::now(), census));
        census
    }

    /// Everything a scrape shows, measured now.
    pub async fn scrape(&self, store: &dyn Store, rules: &[&str]) -> String {
        let outbox = store
            .outbox_stats()
            .await
            .map_err(|err| tracing::warn!(error = %err, "metrics: cannot read the outbox"))
            .ok();
        let breaches_open = open_breaches(store, rules)
            .await
            .map_err(|err| tracing::warn!(error = %err, "metrics: cannot count breaches"))
            .ok();
        let derive = store
            .derive_status()
            .await
            .map_err(|err| tracing::warn!(error = %err, "metrics: cannot read the derive queue"))
            .ok();
        let scrape = Scrape {
            derive,
            nodes: self.census(store).await,
            process: ProcessStats::read(),
            outbox,
            breaches_open,
        };
        self.render(&scrape)
    }

    /// A gRPC connection was accepted (`true`) or closed (`false`).
    pub fn connection(&self, opened: bool) {
        if opened {
            self.connections_open.fetch_add(1, Ordering::Relaxed);
        } else {
            self.connections_open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A gRPC connection was closed at once: `max_connections` were open.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A TLS handshake failed (`timed_out`: it did not finish within the timeout).
    pub fn handshake_failed(&self, timed_out: bool) {
        self.handshakes_failed[usize::from(timed_out)].fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition of the counters and of `scrape`'s measurements.
    pub fn render(&self, scrape: &Scrape) -> String {
        let mut out = String::with_capacity(4096);
        family(
            &mut out,
            "sov_collector_build_info",
            "gauge",
            "Always 1; the collector's version is the label.",
        );
        let _ = writeln!(
            out,
            "sov_collector_build_info{{version=\"{}\"}} 1",
            escape_label(env!("CARGO_PKG_VERSION"))
        );

        family(
            &mut out,
            "sov_collector_reports_ingested_total",
            "counter",
            "Reports that reached the store, by outcome: stored, duplicate (re-sent, already stored), conflict (a reused sequence number; the first report is kept).",
        );
        for (outcome, c) in [
            ("stored", &self.stored),
            ("duplicate", &self.duplicate),
            ("conflict", &self.conflict),
        ] {
            let _ = writeln!(
                out,
                "sov_collector_reports_ingested_total{{outcome=\"{outcome}\"}} {}",
                load(c)
            );
        }

        family(
            &mut out,
            "sov_collector_ingest_errors_total",
            "counter",
            "Ingest calls refused, by gRPC status code.",
        );
        for (i, c) in self.errors.iter().enumerate() {
            let code = tonic::Code::from_i32(i32::try_from(i).unwrap_or(i32::MAX));
            let n = load(c);
            if n > 0 || INGEST_ERROR_CODES.contains(&code) {
                let _ = writeln!(
                    out,
                    "sov_collector_ingest_errors_total{{code=\"{}\"}} {n}",
                    code_name(code)
                );
            }
        }

        family(
            &mut out,
            "sov_collector_grpc_connections_open",
            "gauge",
            "gRPC connections open now, handshaking or established (at most max_connections).",
        );
        let _ = writeln!(
            out,
            "sov_collector_grpc_connections_open {}",
            load(&self.connections_open)
        );
        family(
            &mut out,
            "sov_collector_grpc_connections_refused_total",
            "counter",
            "gRPC connections closed as soon as accepted because max_connections were open.",
        );
        let _ = writeln!(
            out,
            "sov_collector_grpc_connections_refused_total {}",
            load(&self.connections_refused)
        );
        family(
            &mut out,
            "sov_collector_tls_handshake_failures_total",
            "counter",
            "gRPC TLS handshakes that failed, by reason: error (a certificate refused, not TLS, cut off) or timeout (tls_handshake_timeout_secs).",
        );
        for (reason, c) in [
            ("error", &self.handshakes_failed[0]),
            ("timeout", &self.handshakes_failed[1]),
        ] {
            let _ = writeln!(
                out,
                "sov_collector_tls_handshake_failures_total{{reason=\"{reason}\"}} {}",
                load(c)
            );
        }

        family(
            &mut out,
            "sov_collector_store_ingest_seconds_total",
            "counter",
            "Time spent committing reports to the store, seconds.",
        );
        let _ = writeln!(
            out,
            "sov_collector_store_ingest_seconds_total {}",
            load(&self.store_ingest_nanos) as f64 / 1e9
        );
        family(
            &mut out,
            "sov_collector_store_ingests_total",
            "counter",
            "Store commits of reports attempted (the mean commit time is seconds_total / ingests_total).",
        );
        let _ = writeln!(
            out,
            "sov_collector_store_ingests_total {}",
            load(&self.store_ingests)
        );

        family(
            &mut out,
            "sov_collector_flows_ingested_total",
            "counter",
            "Flows carried by stored reports.",
        );
        let _ = writeln!(
            out,
            "sov_collector_flows_ingested_total {}",
            load(&self.flows)
        );
        family(
            &mut out,
            "sov_collector_weight_files_ingested_total",
            "counter",
            "Weight file records carried by stored reports.",
        );
        let _ = writeln!(
            out,
            "sov_collector_weight_files_ingested_total {}",
            load(&self.weight_files)
        );

        family(
            &mut out,
            "sov_collector_derived_reports_total",
            "counter",
            "Reports this collector derived (time series, weight inventories, flow aggregates) after acknowledging them.",
        );
        let _ = writeln!(
            out,
            "sov_collector_derived_reports_total {}",
            load(&self.derived)
        );
        family(
            &mut out,
            "sov_collector_derive_seconds_total",
            "counter",
            "Time this collector's derive batches took, seconds (decoding, enrichment, commit).",
        );
        let _ = writeln!(
            out,
            "sov_collector_derive_seconds_total {}",
            load(&self.derive_nanos) as f64 / 1e9
        );
        family(
            &mut out,
            "sov_collector_derive_batches_total",
            "counter",
            "Derive batches committed by this collector.",
        );
        let _ = writeln!(
            out,
            "sov_collector_derive_batches_total {}",
            load(&self.derive_batches)
        );
        family(
            &mut out,
            "sov_collector_derive_failures_total",
            "counter",
            "Stored reports whose derived rows the store refused (a value out of range): kept, but nothing derived from them (the journal names each).",
        );
        let _ = writeln!(
            out,
            "sov_collector_derive_failures_total {}",
            load(&self.derive_failed)
        );
        family(
            &mut out,
            "sov_collector_derived_first_reports_total",
            "counter",
            "Reports derived ahead of older ones because they sent to a destination a breach rule may count (outside the jurisdiction, unplaced or contested), so that a breach does not wait behind a backlog (included in sov_collector_derived_reports_total).",
        );
        let _ = writeln!(
            out,
            "sov_collector_derived_first_reports_total {}",
            load(&self.derived_first)
        );
        family(
            &mut out,
            "sov_collector_ingest_waited_for_derivation_total",
            "counter",
            "Reports that waited, before they were stored, for the derivation lag to come back under [derive] max_lag_secs (acknowledgements faster than derivation).",
        );
        let _ = writeln!(
            out,
            "sov_collector_ingest_waited_for_derivation_total {}",
            load(&self.waited_for_derivation)
        );
        if let Some(d) = scrape.derive {
            let now = sov_common::clock::now_unix_ms();
            family(
                &mut out,
                "sov_collector_derive_pending_reports",
                "gauge",
                "Stored (acknowledged) reports not derived yet, all replicas.",
            );
            let _ = writeln!(out, "sov_collector_derive_pending_reports {}", d.pending);
            family(
                &mut out,
                "sov_collector_derived_up_to_unix_ms",
                "gauge",
                "Every report received before this time is derived (now when none waits).",
            );
            let _ = writeln!(
                out,
                "sov_collector_derived_up_to_unix_ms {}",
                d.derived_up_to(now)
            );
            family(
                &mut out,
                "sov_collector_derive_lag_seconds",
                "gauge",
                "How long the oldest report not yet derived has waited, seconds (0 when none).",
            );
            let _ = writeln!(
                out,
                "sov_collector_derive_lag_seconds {}",
                (now - d.derived_up_to(now)).max(0) as f64 / 1e3
            );
        }

        if let Some(n) = scrape.nodes {
            family(
                &mut out,
                "sov_collector_nodes",
                "gauge",
                "Nodes known to the store (counted up to 100000).",
            );
            let _ = writeln!(out, "sov_collector_nodes {}", n.nodes);
            family(
                &mut out,
                "sov_collector_nodes_silent",
                "gauge",
                "Nodes whose last report is older than threshold_secs.",
            );
            let _ = writeln!(
                out,
                "sov_collector_nodes_silent{{threshold_secs=\"{SILENT_AFTER_SECS}\"}} {}",
                n.silent
            );
        }

        if let Some(sinks) = &scrape.outbox {
            let per_sink = |out: &mut String,
                            name: &str,
                            kind: &str,
                            help: &str,
                            f: fn(&crate::store::SinkStats) -> u64| {
                family(out, name, kind, help);
                for s in sinks {
                    let _ = writeln!(out, "{name}{{sink=\"{}\"}} {}", s.sink, f(s));
                }
            };
            per_sink(
                &mut out,
                "sov_collector_outbox_depth",
                "gauge",
                "Alerts waiting for delivery, per sink.",
                |s| s.pending,
            );
            per_sink(
                &mut out,
                "sov_collector_outbox_delivered_total",
                "counter",
                "Alerts delivered, per sink.",
                |s| s.delivered,
            );
            per_sink(
                &mut out,
                "sov_collector_outbox_refused_total",
                "counter",
                "Alerts the receiver refused for good (4xx), per sink.",
                |s| s.failed,
            );
            per_sink(
                &mut out,
                "sov_collector_outbox_delivery_failures_total",
                "counter",
                "Failed delivery tries (retried or refused), per sink.",
                |s| s.failed_attempts,
            );
        }
        if let Some(per) = &scrape.breaches_open {
            family(
                &mut out,
                "sov_collector_breaches_open",
                "gauge",
                "Open breaches, per rule.",
            );
            for (rule, n) in per {
                let _ = writeln!(out, "sov_collector_breaches_open{{rule=\"{rule}\"}} {n}");
            }
        }

        if let Some(p) = scrape.process {
            process_families(&mut out, p);
        }
        out
    }
}

/// Serve `/metrics` on `listener` until `shutdown` completes (see
/// [`sov_common::prometheus::serve`]); `rules` are the rules whose open breaches are always
/// exposed, 0 included.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    rules: Vec<&'static str>,
    shutdown: impl Future<Output = ()>,
) {
    let rules: Arc<[&'static str]> = rules.into();
    let render = move || {
        let (metrics, store, rules) = (metrics.clone(), store.clone(), rules.clone());
        async move { metrics.scrape(store.as_ref(), &rules).await }
    };
    sov_common::prometheus::serve(listener, "collector", render, shutdown).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    fn node(name: &str, last_seen_unix_ms: i64) -> NodeRow {
        NodeRow {
            node: name.to_owned(),
            site: String::new(),
            country: String::new(),
            hostname: String::new(),
            agent_version: String::new(),
            labels: Default::default(),
            last_seen_unix_ms,
            epoch: 1,
            reports: 1,
            last_seq: 1,
            missing: 0,
            dropped: 0,
            epochs: 1,
            conflicts: 0,
            cpu_percent: 0.0,
            memory_used_bytes: 0,
            memory_total_bytes: 0,
            gpu_state: String::new(),
            gpu_count: 0,
            gpu_util_percent: 0.0,
            gpu_memory_used_bytes: 0,
            gpu_memory_total_bytes: 0,
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn every_family_has_help_and_type_and_every_sample_line_parses() {
        let m = Metrics::new();
        let text = m.render(&Scrape {
            nodes: Some(NodeCensus::default()),
            process: Some(ProcessStats::default()),
            outbox: Some(vec![crate::store::SinkStats {
                sink: "webhook:0".into(),
                pending: 2,
                delivered: 5,
                failed: 1,
                failed_attempts: 4,
            }]),
            breaches_open: Some([("foreign-egress".to_owned(), 3)].into()),
            derive: Some(crate::store::DeriveStatus {
                pending: 4,
                oldest_pending_received_unix_ms: Some(1_000),
            }),
        });
        assert!(
            text.contains("sov_collector_derive_pending_reports 4\n")
                && text.contains("sov_collector_derived_up_to_unix_ms 1000\n"),
            "{text}"
        );
        assert!(
            text.contains("sov_collector_outbox_depth{sink=\"webhook:0\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("sov_collector_outbox_delivery_failures_total{sink=\"webhook:0\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("sov_collector_breaches_open{rule=\"foreign-egress\"} 3\n"),
            "{text}"
        );
        assert!(text.ends_with('\n'));
        let mut typed = std::collections::HashSet::new();
        for line in lines(&text) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(kind == "counter" || kind == "gauge", "{line}");
                assert!(
                    kind != "counter" || name.ends_with("_total"),
                    "counter without _total: {line}"
                );
                typed.insert(name.to_owned());
            } else if line.starts_with("# HELP ") {
                continue;
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                value.parse::<f64>().unwrap();
                let name = series.split('{').next().unwrap();
                assert!(typed.contains(name), "sample before its TYPE: {line}");
                assert!(
                    name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                    "{line}"
                );
            }
        }
        for name in [
            "sov_collector_build_info",
            "sov_collector_reports_ingested_total",
            "sov_collector_ingest_errors_total",
            "sov_collector_grpc_connections_open",
            "sov_collector_grpc_connections_refused_total",
            "sov_collector_tls_handshake_failures_total",
            "sov_collector_store_ingest_seconds_total",
            "sov_collector_store_ingests_total",
            "sov_collector_flows_ingested_total",
            "sov_collector_weight_files_ingested_total",
            "sov_collector_nodes",
            "sov_collector_nodes_silent",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
        ] {
            assert!(typed.contains(name), "missing {name}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
        }
        assert!(text.contains(&format!(
            "sov_collector_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn counts_show_with_their_labels_and_known_error_codes_show_at_zero() {
        let m = Metrics::new();
        m.report_ingested(IngestOutcome::Stored, 3, 2);
        m.report_ingested(IngestOutcome::Stored, 1, 0);
        m.report_ingested(IngestOutcome::Duplicate, 9, 9);
        m.report_ingested(IngestOutcome::Conflict, 9, 9);
        m.ingest_error(tonic::Code::PermissionDenied);
        m.ingest_error(tonic::Code::PermissionDenied);
        m.ingest_error(tonic::Code::Internal);
        m.store_ingest(Duration::from_millis(1500));
        m.store_ingest(Duration::from_millis(500));
        let text = m.render(&Scrape::default());
        let l = lines(&text);
        for want in [
            "sov_collector_reports_ingested_total{outcome=\"stored\"} 2",
            "sov_collector_reports_ingested_total{outcome=\"duplicate\"} 1",
            "sov_collector_reports_ingested_total{outcome=\"conflict\"} 1",
            "sov_collector_ingest_errors_total{code=\"permission_denied\"} 2",
            "sov_collector_ingest_errors_total{code=\"internal\"} 1",
            "sov_collector_ingest_errors_total{code=\"unauthenticated\"} 0",
            "sov_collector_ingest_errors_total{code=\"invalid_argument\"} 0",
            "sov_collector_ingest_errors_total{code=\"resource_exhausted\"} 0",
            "sov_collector_ingest_errors_total{code=\"unavailable\"} 0",
            "sov_collector_store_ingest_seconds_total 2",
            "sov_collector_store_ingests_total 2",
            "sov_collector_flows_ingested_total 4",
            "sov_collector_weight_files_ingested_total 2",
        ] {
            assert!(l.contains(&want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("code=\"ok\""), "{text}");
        // Without a census or /proc the gauges are absent, not zero.
        assert!(!text.contains("sov_collector_nodes"), "{text}");
        assert!(!text.contains("process_"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("x\ny"), "x\\ny");
        assert_eq!(escape_label("1.2.3-rc.1+é"), "1.2.3-rc.1+é");
    }

    #[test]
    fn a_node_silent_for_more_than_five_minutes_is_counted() {
        let now = 1_700_000_000_000;
        let mut census = NodeCensus::default();
        census.add(
            &[
                node("fresh", now - 1000),
                node("edge", now - SILENT_AFTER_SECS * 1000),
                node("silent", now - SILENT_AFTER_SECS * 1000 - 1),
            ],
            now,
        );
        assert_eq!(
            census,
            NodeCensus {
                nodes: 3,
                silent: 1
            }
        );
        let text = Metrics::new().render(&Scrape {
            nodes: Some(census),
            process: None,
            outbox: None,
            breaches_open: None,
            derive: None,
        });
        let l = lines(&text);
        assert!(l.contains(&"sov_collector_nodes 3"), "{text}");
        assert!(
            l.contains(&"sov_collector_nodes_silent{threshold_secs=\"300\"} 1"),
            "{text}"
        );
    }

    async fn get(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_server_answers_metrics_404_and_refuses_oversized_heads() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.report_ingested(IngestOutcome::Stored, 0, 0);
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            metrics,
            store,
            vec![],
            stop.clone().cancelled_owned(),
        ));

        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(body.contains("sov_collector_reports_ingested_total{outcome=\"stored\"} 1\n"));
        assert!(body.contains("sov_collector_nodes 0\n"), "{body}");

        let nf = get(addr, b"GET /other HTTP/1.1\r\n\r\n").await;
        assert!(nf.starts_with("HTTP/1.1 404 "), "{nf}");

        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD * 2));
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may close before taking everything: ignore write errors.
        let _ = s.write_all(&huge).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 431 "), "{out}");

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
