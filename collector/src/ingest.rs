//! The `Ingest` service: authenticate the peer from its certificate, validate the report,
//! commit it, then acknowledge. Errors become `tonic::Status` here and nowhere else.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use prost::Message;
use sov_common::clock::now_unix_ms;
use sov_proto::pb;
use tonic::{Request, Response, Status};

use crate::auth::{self, Role};
use crate::geo::physics::Place;
use crate::geo::{Geo, Verdict};
use crate::metrics::Metrics;
use crate::policy::PolicyWatch;
use crate::store::{
    FlowRecord, GapRecord, IncomingReport, IngestOutcome, Store, Telemetry, VerdictColumns,
    WeightUpdate,
};

mod ranges;

/// Most gap records one report may carry.
pub const MAX_GAPS_PER_REPORT: usize = 10_000;
/// Most flows one report may carry.
pub const MAX_FLOWS_PER_REPORT: usize = 200_000;
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
    /// Woken after a report is stored (the breach rules evaluate soon after).
    stored: Option<Arc<tokio::sync::Notify>>,
    /// The last peer address recorded per node: the store is written only when it changes.
    peers: Arc<std::sync::Mutex<HashMap<String, IpAddr>>>,
    /// The policy, for the sites' coordinates (the speed-of-light check).
    policy: Option<Arc<PolicyWatch>>,
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
            stored: None,
            peers: Arc::default(),
            policy: None,
        }
    }

    /// Read the sites' coordinates from `policy` (else a node is placed in its country).
    pub fn with_policy(mut self, policy: Option<Arc<PolicyWatch>>) -> Self {
        self.policy = policy;
        self
    }

    /// Wake `notify` after every stored report.
    pub fn notify_stored(mut self, notify: Arc<tokio::sync::Notify>) -> Self {
        self.stored = Some(notify);
        self
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

fn gap_reason(code: i32) -> &'static str {
    match pb::GapReason::try_from(code) {
        Ok(pb::GapReason::SpoolFull) => "spool_full",
        Ok(pb::GapReason::Corrupt) => "corrupt",
        Ok(pb::GapReason::TooLarge) => "too_large",
        _ => "unspecified",
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

impl IngestService {
    /// Where the reporting node is: its site's coordinates from the policy, else its
    /// country (the policy's for its site, else the one it declares); `None` when unknown.
    fn node_place(&self, info: &pb::NodeInfo) -> Option<Place> {
        match &self.policy {
            Some(watch) => watch.current().place(&info.site, &info.country),
            None => (!info.country.is_empty()).then(|| Place::Country(info.country.clone())),
        }
    }

    /// Geolocate every flow's remote address and name its process.
    fn enrich_flows(&self, report: &pb::Report) -> Vec<FlowRecord> {
        let names: HashMap<u32, &str> = report
            .processes
            .iter()
            .map(|p| (p.pid, p.name.as_str()))
            .collect();
        let place = report
            .node_info
            .as_ref()
            .and_then(|info| self.node_place(info));
        report
            .flows
            .iter()
            .map(|f| {
                let v = f
                    .remote_address
                    .parse::<IpAddr>()
                    .map(|ip| self.geo.lookup(ip))
                    .unwrap_or_default();
                FlowRecord {
                    flow: f.clone(),
                    process: names
                        .get(&f.pid)
                        .map(|n| (*n).to_owned())
                        .unwrap_or_default(),
                    country: v.country.clone(),
                    asn: v.asn.unwrap_or(0),
                    org: v.org.clone(),
                    geo_source: v.source.clone(),
                    verdict: verdict_columns(&self.geo, &v, place.as_ref(), f.min_rtt_us),
                }
            })
            .collect()
    }
}

/// The stored form of a flow's verdict: every answer with its speed-of-light check (from
/// `place` at `min_rtt_us`), whether the sources disagree, the operator's country, and the
/// check of the verdict's own country.
pub fn verdict_columns(
    geo: &Geo,
    v: &Verdict,
    place: Option<&Place>,
    min_rtt_us: u32,
) -> VerdictColumns {
    if v.answers.is_empty() {
        return VerdictColumns {
            operator_country: v.operator_country.clone(),
            ..VerdictColumns::default()
        };
    }
    /// One stored answer (the protobuf `GeoAnswer`'s fields).
    #[derive(serde::Serialize)]
    struct Stored<'a> {
        source: &'a str,
        country: &'a str,
        kind: &'static str,
        impossible: bool,
        distance_km: u32,
    }
    let checks = geo.physics().judge(v, place, min_rtt_us);
    let km = |d: f64| d.round().clamp(0.0, f64::from(u32::MAX)) as u32;
    let answers: Vec<Stored<'_>> = v
        .answers
        .iter()
        .zip(&checks)
        .map(|(a, c)| Stored {
            source: &a.source,
            country: &a.country,
            kind: a.kind.as_str(),
            impossible: c.is_some_and(|c| c.impossible),
            distance_km: c.map_or(0, |c| km(c.distance_km)),
        })
        .collect();
    let first = checks.first().copied().flatten();
    VerdictColumns {
        answers_json: serde_json::to_string(&answers).unwrap_or_default(),
        contested: v.contested,
        operator_country: v.operator_country.clone(),
        physics: match first {
            Some(c) if c.impossible => "impossible",
            Some(_) => "possible",
            None => "",
        }
        .to_owned(),
        distance_km: first.map_or(0, |c| km(c.distance_km)),
        limit_km: first.map_or(0, |c| km(c.limit_km)),
    }
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
        let host = report.host.clone().unwrap_or_default();
        let flows = self.enrich_flows(&report);
        let incoming = IncomingReport {
            node: info.node,
            epoch: report.epoch,
            seq: report.seq,
            observed_unix_ms: report.observed_unix_ms,
            received_unix_ms: now_unix_ms(),
            site: info.site,
            country: info.country,
            hostname: info.hostname,
            agent_version: info.agent_version,
            labels: info.labels.into_iter().collect(),
            cpu_percent: host.cpu_percent,
            memory_used_bytes: host.memory_used_bytes,
            memory_total_bytes: host.memory_total_bytes,
            telemetry: Telemetry {
                host: report.host.clone(),
                gpu_state: report.gpu_state.clone(),
                gpus: report.gpus.clone(),
                processes: report.processes.clone(),
                weights: WeightUpdate {
                    full: report.weight_inventory_full,
                    files: report.weight_files.clone(),
                    removed: report.weight_files_removed.clone(),
                },
                flows,
            },
            gaps: report
                .gaps
                .iter()
                .map(|g| GapRecord {
                    first_seq: g.first_seq,
                    last_seq: g.last_seq,
                    reason: gap_reason(g.reason).to_owned(),
                    dropped_unix_ms: g.dropped_unix_ms,
                })
                .collect(),
            body: report.encode_to_vec(),
        };
        let (flow_count, weight_file_count) = (report.flows.len(), report.weight_files.len());
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
            if let Some(ip) = peer_ip {
                self.note_peer(&id.name, ip, now_unix_ms()).await;
            }
            if let Some(n) = &self.stored {
                n.notify_one();
            }
        }
        Ok(Response::new(pb::Ack {
            epoch: report.epoch,
            seq: report.seq,
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
