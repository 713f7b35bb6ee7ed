//! The `Ingest` service: authenticate the peer from its certificate, validate the report,
//! append it (its key and body, with the node's completeness counters, group-committed), then
//! acknowledge. What is derived from the report (time series, inventories, flow aggregates)
//! is computed afterwards by [`crate::derive::Deriver`]. Errors become `tonic::Status` here
//! and nowhere else.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use prost::Message;
use sov_common::clock::now_unix_ms;
use sov_proto::pb;
use tonic::{Request, Response, Status};

use crate::auth::{self, Role};
use crate::derive::Freshness;
pub use crate::derive::verdict_columns;
use crate::geo::Geo;
use crate::metrics::Metrics;
use crate::store::{IngestOutcome, Store};

mod ranges;

/// Most gap records one report may carry.
pub const MAX_GAPS_PER_REPORT: usize = 10_000;
/// Most flows one report may carry.
pub const MAX_FLOWS_PER_REPORT: usize = 200_000;
/// Most training runs one report may carry (the agent sends at most 64).
pub const MAX_TRAINING_RUNS_PER_REPORT: usize = 256;
/// Most inputs, and most outputs, one training run may list (the agent sends at most 256).
pub const MAX_TRAINING_ITEMS_PER_RUN: usize = 1024;
/// Longest training run id accepted.
pub const MAX_TRAINING_RUN_ID_BYTES: usize = 128;
/// Longest path of a training input or output accepted.
pub const MAX_TRAINING_PATH_BYTES: usize = 4096;
/// Furthest ahead of the collector's clock an epoch may be (an epoch is the Unix time in ms
/// at which the agent's spool began; a node's clock may be wrong, but not by this much). An
/// epoch far in the future would make every later, real epoch look older and hide its gaps.
pub const MAX_EPOCH_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// gRPC `sovereign.v1.Ingest`.
#[derive(Debug, Clone)]
pub struct IngestService {
    store: Arc<dyn Store>,
    geo: Geo,
    trust_domain: String,
    max_report_bytes: u64,
    metrics: Arc<Metrics>,
    /// Woken after a report is stored (the derivers derive it soon after): each of them.
    stored: Vec<Arc<tokio::sync::Notify>>,
    /// The derivers' nodes to derive first ([`crate::derive::Urgent`]), and the policy that
    /// says which destinations may breach a rule (none: nothing is derived first).
    urgent: Vec<Arc<crate::derive::Urgent>>,
    policy: Option<Arc<crate::policy::PolicyWatch>>,
    /// Counts acknowledgements for the queries' wait ([`Freshness`]).
    freshness: Option<Arc<Freshness>>,
    /// The last peer address recorded per node: the store is written only when it changes.
    peers: Arc<std::sync::Mutex<HashMap<String, IpAddr>>>,
}

impl IngestService {
    /// A service storing into `store`, trusting names under `trust_domain`, counting outcomes
    /// and refusals in `metrics`.
    pub fn new(
        store: Arc<dyn Store>,
        geo: Geo,
        trust_domain: String,
        max_report_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            geo,
            trust_domain,
            max_report_bytes: u64::try_from(max_report_bytes).unwrap_or(u64::MAX),
            metrics,
            stored: Vec::new(),
            urgent: Vec::new(),
            policy: None,
            freshness: None,
            peers: Arc::default(),
        }
    }

    /// Count every stored report in `freshness`, then wake each of `notify` (the derivers:
    /// which of them holds the report's node is the store's business).
    pub fn notify_stored(
        mut self,
        notify: Vec<Arc<tokio::sync::Notify>>,
        freshness: Arc<Freshness>,
    ) -> Self {
        self.stored = notify;
        self.freshness = Some(freshness);
        self
    }

    /// Have the derivers (`urgent`, one each) derive first the reports that sent to a
    /// destination a rule of `policy` may count, and let those reports past the lag bound:
    /// a breach waits neither behind other nodes' backlog nor for it.
    pub fn derive_first(
        mut self,
        urgent: Vec<Arc<crate::derive::Urgent>>,
        policy: Option<Arc<crate::policy::PolicyWatch>>,
    ) -> Self {
        self.urgent = urgent;
        self.policy = policy;
        self
    }

    /// Whether `report` is one to derive first ([`crate::derive::may_breach`]), with room
    /// left to mark it.
    fn first(&self, report: &pb::Report) -> bool {
        let Some(watch) = &self.policy else {
            return false;
        };
        !self.urgent.is_empty()
            && self.urgent.iter().all(|u| u.has_room())
            && crate::derive::may_breach(report, &self.geo, &watch.current())
    }

    /// Record where `node`'s reports come from, when that changed since the last record.
    async fn note_peer(&self, node: &str, ip: IpAddr, at_unix_ms: i64) {
        let ip = crate::geo::normalise(ip);
        {
            let peers = self
                .peers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if peers.get(node) == Some(&ip) {
                return;
            }
        }
        let v = self.geo.lookup(ip);
        let peer = crate::store::NodePeer {
            node: node.to_owned(),
            address: ip.to_string(),
            country: v.country.clone(),
            asn: v.asn.unwrap_or(0),
            source: v.source.clone(),
            seen_unix_ms: at_unix_ms,
        };
        match self.store.note_peer(peer).await {
            Ok(()) => {
                self.peers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(node.to_owned(), ip);
            }
            Err(err) => tracing::warn!(node, error = %err, "cannot record the node's address"),
        }
    }
}

/// Check a report's shape; the message names the field and the bad value.
pub fn validate(report: &pb::Report) -> Result<(), Status> {
    let bad = |msg: String| Err(Status::invalid_argument(msg));
    let Some(info) = report.node_info.as_ref() else {
        return bad("node_info is required".into());
    };
    if info.node.is_empty() {
        return bad("node_info.node must not be empty".into());
    }
    if let Err(e) = auth::validate_name(&info.node) {
        return bad(format!("node_info.node: {e}"));
    }
    if report.epoch == 0 {
        return bad("epoch must be greater than 0".into());
    }
    if report.seq == 0 {
        return bad("seq must be greater than 0 (sequence numbers start at 1)".into());
    }
    if report.seq > i64::MAX as u64 || report.epoch > i64::MAX as u64 {
        return bad(format!(
            "epoch {} or seq {} is larger than 2^63-1",
            report.epoch, report.seq
        ));
    }
    let now = u64::try_from(now_unix_ms()).unwrap_or(0);
    if report.epoch > now.saturating_add(MAX_EPOCH_AHEAD_MS) {
        return bad(format!(
            "epoch {} is more than {} h ahead of the collector's clock ({now} ms): an epoch is the \
             Unix time in ms when the agent's spool began; fix the node's clock and remove its spool",
            report.epoch,
            MAX_EPOCH_AHEAD_MS / 3_600_000
        ));
    }
    if !info.country.is_empty()
        && (info.country.len() != 2 || !info.country.bytes().all(|b| b.is_ascii_uppercase()))
    {
        return bad(format!(
            "node_info.country {:?} is not an ISO 3166-1 alpha-2 code",
            info.country
        ));
    }
    if report.flows.len() > MAX_FLOWS_PER_REPORT {
        return bad(format!(
            "flows has {} entries, more than {MAX_FLOWS_PER_REPORT}",
            report.flows.len()
        ));
    }
    if report.gaps.len() > MAX_GAPS_PER_REPORT {
        return bad(format!(
            "gaps has {} entries, more than {MAX_GAPS_PER_REPORT}",
            report.gaps.len()
        ));
    }
    if report.training_runs.len() > MAX_TRAINING_RUNS_PER_REPORT {
        return bad(format!(
            "training_runs has {} entries, more than {MAX_TRAINING_RUNS_PER_REPORT}",
            report.training_runs.len()
        ));
    }
    for (i, run) in report.training_runs.iter().enumerate() {
        if run.run_id.is_empty() || run.run_id.len() > MAX_TRAINING_RUN_ID_BYTES {
            return bad(format!(
                "training_runs[{i}].run_id {:?} must be 1 to {MAX_TRAINING_RUN_ID_BYTES} bytes",
                run.run_id.chars().take(40).collect::<String>()
            ));
        }
        if run.inputs.len() > MAX_TRAINING_ITEMS_PER_RUN
            || run.outputs.len() > MAX_TRAINING_ITEMS_PER_RUN
        {
            return bad(format!(
                "training_runs[{i}] lists {} inputs and {} outputs, more than {MAX_TRAINING_ITEMS_PER_RUN} \
                 (count the rest in inputs_left_out / outputs_left_out)",
                run.inputs.len(),
                run.outputs.len()
            ));
        }
        let long = run
            .inputs
            .iter()
            .map(|x| x.path.len())
            .chain(run.outputs.iter().map(|x| x.path.len()))
            .find(|&n| n > MAX_TRAINING_PATH_BYTES);
        if let Some(n) = long {
            return bad(format!(
                "training_runs[{i}] has a path of {n} bytes, more than {MAX_TRAINING_PATH_BYTES}"
            ));
        }
        if !run.gpu_seconds.is_finite() || run.gpu_seconds < 0.0 {
            return bad(format!(
                "training_runs[{i}].gpu_seconds {} must be a finite number >= 0",
                run.gpu_seconds
            ));
        }
    }
    for (i, g) in report.gaps.iter().enumerate() {
        if g.first_seq == 0 || g.first_seq > g.last_seq || g.last_seq >= report.seq {
            return bad(format!(
                "gaps[{i}] {}..={} must satisfy 1 <= first_seq <= last_seq < seq ({})",
                g.first_seq, g.last_seq, report.seq
            ));
        }
    }
    ranges::check(report).map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl pb::ingest_server::Ingest for IngestService {
    #[tracing::instrument(level = "debug", skip_all, fields(peer.addr = ?req.remote_addr(), node))]
    async fn push(&self, req: Request<pb::Report>) -> Result<Response<pb::Ack>, Status> {
        // Every refusal is counted here, by its code. Reports over the size limit never reach
        // this handler: tonic refuses them while decoding, and `server.rs` counts those.
        let result = self.push_inner(req).await;
        if let Err(status) = &result {
            self.metrics.ingest_error(status.code());
        }
        result
    }
}

impl IngestService {
    /// Authenticate, validate, commit, acknowledge.
    async fn push_inner(&self, req: Request<pb::Report>) -> Result<Response<pb::Ack>, Status> {
        let id = auth::identity_from_request(&req, &self.trust_domain)?;
        auth::require_role(&id, &[Role::Agent], "Ingest.Push")?;
        let peer_ip = req.remote_addr().map(|a| a.ip());
        let report = req.into_inner();
        validate(&report)?;
        let info = report.node_info.clone().unwrap_or_default();
        tracing::Span::current().record("node", info.node.as_str());
        if info.node != id.name {
            tracing::warn!(cert = %id.name, claimed = %info.node, "report for another node refused");
            return Err(Status::permission_denied(format!(
                "report is for node {:?} but the client certificate is for node {:?}",
                info.node, id.name
            )));
        }
        let (flow_count, weight_file_count) = (report.flows.len(), report.weight_files.len());
        let (epoch, seq) = (report.epoch, report.seq);
        let body = report.encode_to_vec();
        let first = self.first(&report);
        let incoming = crate::derive::incoming(report, now_unix_ms(), body, None);
        if let Some(f) = self.freshness.as_ref().filter(|_| !first) {
            // Derivation further behind than `[derive] max_lag_secs`: this report waits
            // (not one that may breach a rule: it is derived first).
            if f.admit().await {
                self.metrics.waited_for_derivation();
            }
        }
        let started = std::time::Instant::now();
        let stored = self.store.ingest(incoming).await;
        self.metrics.store_ingest(started.elapsed());
        let outcome = stored.map_err(|err| {
            tracing::error!(error = %err, cause = %sov_common::error::source_chain(&err), "store failed");
            Status::unavailable(format!("collector store unavailable: {err}; retry later"))
        })?;
        self.metrics
            .report_ingested(outcome, flow_count, weight_file_count);
        if outcome == IngestOutcome::Stored {
            if let Some(f) = &self.freshness {
                f.acked();
            }
            if first {
                for u in &self.urgent {
                    u.mark(&info.node);
                }
            }
            for n in &self.stored {
                n.notify_one();
            }
            if let Some(ip) = peer_ip {
                self.note_peer(&id.name, ip, now_unix_ms()).await;
            }
        }
        Ok(Response::new(pb::Ack {
            epoch,
            seq,
            duplicate: outcome != IngestOutcome::Stored,
            max_report_bytes: self.max_report_bytes,
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> pb::Report {
        pb::Report {
            epoch: 1,
            seq: 5,
            node_info: Some(pb::NodeInfo {
                node: "node-a".into(),
                country: "MA".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_well_formed_report_passes_validation() {
        assert!(validate(&good()).is_ok());
    }

    #[test]
    fn malformed_reports_are_invalid_arguments_naming_the_field() {
        type Mutation = Box<dyn Fn(&mut pb::Report)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("node_info is required", Box::new(|r| r.node_info = None)),
            (
                "node_info.node must not be empty",
                Box::new(|r| r.node_info.as_mut().unwrap().node.clear()),
            ),
            (
                "node_info.node",
                Box::new(|r| r.node_info.as_mut().unwrap().node = "../etc".into()),
            ),
            ("epoch", Box::new(|r| r.epoch = 0)),
            (
                "ahead of the collector's clock",
                Box::new(|r| r.epoch = i64::MAX as u64),
            ),
            (
                "weight_files[0].size_bytes is 18446744073709551615",
                Box::new(|r| {
                    r.weight_files = vec![pb::WeightFile {
                        size_bytes: u64::MAX,
                        ..Default::default()
                    }]
                }),
            ),
            (
                "host.cpu_percent is NaN",
                Box::new(|r| {
                    r.host = Some(pb::HostSample {
                        cpu_percent: f32::NAN,
                        ..Default::default()
                    })
                }),
            ),
            ("seq", Box::new(|r| r.seq = 0)),
            (
                "country",
                Box::new(|r| r.node_info.as_mut().unwrap().country = "Maroc".into()),
            ),
            (
                "gaps[0]",
                Box::new(|r| {
                    r.gaps = vec![pb::Gap {
                        first_seq: 3,
                        last_seq: 9,
                        ..Default::default()
                    }]
                }),
            ),
            (
                "training_runs[0].run_id",
                Box::new(|r| r.training_runs = vec![pb::TrainingRun::default()]),
            ),
            (
                "training_runs[0] lists 1025 inputs",
                Box::new(|r| {
                    r.training_runs = vec![pb::TrainingRun {
                        run_id: "1-2-x".into(),
                        inputs: vec![pb::TrainingInput::default(); 1025],
                        ..Default::default()
                    }]
                }),
            ),
            (
                "training_runs[0].gpu_seconds NaN",
                Box::new(|r| {
                    r.training_runs = vec![pb::TrainingRun {
                        run_id: "1-2-x".into(),
                        gpu_seconds: f64::NAN,
                        ..Default::default()
                    }]
                }),
            ),
            (
                "training_runs has 257 entries",
                Box::new(|r| {
                    r.training_runs = vec![
                        pb::TrainingRun {
                            run_id: "1-2-x".into(),
                            ..Default::default()
                        };
                        257
                    ]
                }),
            ),
        ];
        for (needle, mutate) in cases {
            let mut r = good();
            mutate(&mut r);
            let status = validate(&r).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status.message().contains(needle),
                "{needle}: {}",
                status.message()
            );
        }
    }
}
