//! The sovereignty scorecard: the four questions of the sovereignty debate over a time range,
//! answered from the store and the jurisdiction policy.
//!
//! 1. **Who holds the weights** — the models residing on nodes now, by publisher origin
//!    country, and their copies inside vs outside the jurisdiction (weights are an inventory:
//!    this part is the state at the end of the range as the store knows it now).
//! 2. **Where AI runs** — GPU-hours in the range by the node's jurisdiction (its site's country
//!    from the policy, else the declared one) and by the origin of the model the process holds
//!    (a process holding no known weights counts as `unattributed`).
//! 3. **Where data flows** — outbound bytes that nodes inside the jurisdiction sent in the
//!    range, by destination country as the policy counts each verdict (`policy::verdicts`:
//!    contested answers, the speed-of-light check), and the share that left it; bytes to
//!    destinations no database could place, and to destinations whose every answer physics
//!    rules out (for review), are counted apart, neither inside nor outside. Bytes that stay
//!    inside but on a network whose operator is registered abroad are named too ("inside, on a
//!    foreign-operated network" is not "abroad"), as are contested destinations, and how every
//!    byte was measured (exact `tcp_info`, connection tracking, or flows without bytes); the top
//!    ASNs by bytes over every node.
//! 5. **Where AI is trained, on whose models** — training runs active in the range: GPU-hours
//!    inside and outside by the origin of their base model's publisher, the models runs inside
//!    produced by base origin, and the datasets runs outside read (`training`).
//! 4. **How complete the picture is** — nodes known, nodes that reported in the range, silent
//!    nodes (nothing for `silence_secs` before the end of the range), reports missing and
//!    declared dropped per node, with the missing sequence ranges of its latest epoch.
//!
//! The answer is one JSON object (the same over gRPC, HTTPS and in a signed report).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use sov_proto::pb;

use crate::policy::{Counted, DatasetFacts, Policy};
use crate::store::{EgressQuery, GpuUsageRow, Store, StoreError};
use sov_evidence::view::rfc3339;

/// Most nodes, models, GPU usage groups and egress groups read for one scorecard; beyond
/// that the scorecard says it is truncated.
pub const MAX_ROWS: u32 = 100_000;
/// Missing ranges listed per node.
pub const MAX_RANGES_PER_NODE: u32 = 20;
/// Nodes whose missing ranges are listed.
pub const MAX_NODES_WITH_RANGES: usize = 1000;
/// ASNs listed in `data.by_asn`.
const TOP_ASNS: usize = 20;
/// Origin of GPU time whose process holds no known weights, and of models with no known
/// publisher country.
pub const UNKNOWN_ORIGIN: &str = "unknown";

/// Everything the scorecard is computed from.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Every node.
    pub nodes: Vec<pb::NodeSummary>,
    /// Every model residing somewhere.
    pub models: Vec<pb::ModelSummary>,
    /// GPU-seconds per process in the range.
    pub gpu: Vec<GpuUsageRow>,
    /// Outbound bytes by node site and declared country (each row names one node of them:
    /// the policy places a node by its site and country), destination country and ASN, and
    /// verdict in the range (the `verdict` grouping: what the policy counts by; rows may carry
    /// a destination, as the `flow` grouping's do, and need not).
    pub egress_by_node: Vec<pb::EgressRow>,
    /// Outbound bytes by node and contested destination in the range (the `contested`
    /// grouping), to count contested destinations when `egress_by_node` has no addresses.
    pub contested: Vec<pb::EgressRow>,
    /// Outbound bytes by destination ASN in the range.
    pub egress_by_asn: Vec<pb::EgressRow>,
    /// Missing sequence ranges of each node's latest epoch, for nodes with missing reports
    /// (at most [`MAX_RANGES_PER_NODE`] each, for at most [`MAX_NODES_WITH_RANGES`] nodes).
    pub missing_ranges: BTreeMap<String, Vec<(u64, u64)>>,
    /// Training runs active in the range.
    pub training: Vec<pb::TrainingRunSummary>,
    /// Whether any of the reads above hit [`MAX_ROWS`].
    pub truncated: bool,
}

/// Read the inputs for `[since, until)` from `store`: the nodes first (the missing ranges
/// are read for those with missing reports), then every other read at once, each on its own
/// reader connection (at 10,000 nodes the reads take 0.1 to 1.4 s each; one after another
/// they were the scorecard's whole time).
pub async fn read_inputs(
    store: &dyn Store,
    since_unix_ms: i64,
    until_unix_ms: i64,
) -> Result<Inputs, StoreError> {
    let mut inputs = Inputs::default();
    let (nodes, nodes_cut) = crate::store::all_nodes(store, MAX_ROWS as usize).await?;
    inputs.nodes = nodes.into_iter().map(pb::NodeSummary::from).collect();
    let missing = async {
        let mut out = BTreeMap::new();
        for n in inputs
            .nodes
            .iter()
            .filter(|n| n.missing > 0)
            .take(MAX_NODES_WITH_RANGES)
        {
            let ranges = store
                .missing_ranges(&n.node, n.epoch, MAX_RANGES_PER_NODE)
                .await?;
            out.insert(n.node.clone(), ranges);
        }
        Ok::<_, StoreError>(out)
    };
    // By verdict rather than by flow: the answer is the same (the policy counts a row by its
    // country and verdict), and it can be read from hour rows (`store::rollup`).
    let egress = |by: &str| {
        store.egress(EgressQuery {
            since_unix_ms,
            until_unix_ms,
            by: by.to_owned(),
            limit: MAX_ROWS,
            ..Default::default()
        })
    };
    let (
        (models, models_cut),
        missing_ranges,
        gpu,
        training,
        (verdict, verdict_left_out),
        (contested, contested_left_out),
    ) = futures::try_join!(
        store.model_holdings(MAX_ROWS),
        missing,
        store.gpu_usage(since_unix_ms, until_unix_ms, MAX_ROWS),
        store.list_training(since_unix_ms, MAX_ROWS),
        egress("verdict"),
        egress("contested"),
    )?;
    inputs.models = models;
    inputs.missing_ranges = missing_ranges;
    inputs.truncated = nodes_cut
        || models_cut
        || gpu.len() >= MAX_ROWS as usize
        || training.len() >= MAX_ROWS as usize
        || verdict_left_out > 0
        || contested_left_out > 0;
    inputs.gpu = gpu;
    inputs.training = training;
    inputs.egress_by_node = verdict;
    inputs.contested = contested;
    // The `verdict` rows hold every node's bytes by destination country and ASN: summed
    // here, they are the `asn` grouping's answer without a second read of the range.
    inputs.egress_by_asn = by_asn(&inputs.egress_by_node);
    Ok(inputs)
}

/// Outbound bytes by destination country and ASN over `rows` (any grouping that keeps both),
/// largest `bytes_sent` first, as the `asn` grouping answers: the greatest organisation name
/// of each ASN, ties in bytes in (country, ASN) order.
pub fn by_asn(rows: &[pb::EgressRow]) -> Vec<pb::EgressRow> {
    let mut groups: BTreeMap<(&str, u32), pb::EgressRow> = BTreeMap::new();
    for r in rows {
        let g = groups
            .entry((r.country.as_str(), r.asn))
            .or_insert_with(|| pb::EgressRow {
                country: r.country.clone(),
                asn: r.asn,
                ..Default::default()
            });
        if r.org > g.org {
            g.org.clone_from(&r.org);
        }
        g.bytes_sent = g.bytes_sent.saturating_add(r.bytes_sent);
        g.bytes_received = g.bytes_received.saturating_add(r.bytes_received);
        g.connections = g.connections.saturating_add(r.connections);
        g.conntrack_bytes = g.conntrack_bytes.saturating_add(r.conntrack_bytes);
        g.unmeasured_flows = g.unmeasured_flows.saturating_add(r.unmeasured_flows);
        if r.min_rtt_us != 0 && (g.min_rtt_us == 0 || r.min_rtt_us < g.min_rtt_us) {
            g.min_rtt_us = r.min_rtt_us;
        }
    }
    let mut out: Vec<pb::EgressRow> = groups.into_values().collect();
    out.sort_by_key(|r| std::cmp::Reverse((r.bytes_sent, r.bytes_received)));
    out
}

/// Round to 4 decimals (hours and shares print without float noise).
fn round4(x: f64) -> f64 {
    // `+ 0.0` turns -0.0 (the sum of no f64 at all) into 0.0: "-0.0 GPU-hours" is no answer.
    (x * 10_000.0).round() / 10_000.0 + 0.0
}

/// A fraction, 0 when the whole is 0.
fn share(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        round4(part / whole)
    } else {
        0.0
    }
}

/// The model's publisher origin country, or [`UNKNOWN_ORIGIN`].
fn model_origin(policy: &Policy, m: &pb::ModelSummary) -> String {
    let by_publisher = (!m.publisher.is_empty())
        .then(|| policy.publisher_country(&m.publisher))
        .flatten();
    by_publisher
        .or_else(|| policy.publisher_country(&m.model))
        .unwrap_or_else(|| UNKNOWN_ORIGIN.to_owned())
}

/// The scorecard for `[since, until)` from `inputs` under `policy`, as JSON.
pub fn build(
    policy: &Policy,
    inputs: &Inputs,
    since_unix_ms: i64,
    until_unix_ms: i64,
    now_unix_ms: i64,
) -> Value {
    let node_country: BTreeMap<&str, String> = inputs
        .nodes
        .iter()
        .map(|n| (n.node.as_str(), policy.node_country(&n.site, &n.country)))
        .collect();

    // 1. Weights.
    #[derive(Default)]
    struct Origin {
        models: BTreeSet<String>,
        copies: u64,
        inside: u64,
        outside: u64,
        bytes_inside: u64,
        bytes_outside: u64,
    }
    let mut origins: BTreeMap<String, Origin> = BTreeMap::new();
    let mut all_models = BTreeSet::new();
    let mut holder_origin: BTreeMap<(&str, u32), String> = BTreeMap::new();
    for m in &inputs.models {
        let origin = model_origin(policy, m);
        let o = origins.entry(origin.clone()).or_default();
        o.models.insert(m.model.clone());
        all_models.insert(m.model.clone());
        for c in &m.copies {
            let country = policy.node_country(&c.site, &c.country);
            o.copies += 1;
            if policy.is_inside(&country) {
                o.inside += 1;
                o.bytes_inside += m.size_bytes;
            } else {
                o.outside += 1;
                o.bytes_outside += m.size_bytes;
            }
        }
        for u in &m.users {
            holder_origin
                .entry((u.node.as_str(), u.pid))
                .or_insert_with(|| origin.clone());
        }
    }
    let mut by_origin: Vec<Value> = origins
        .iter()
        .map(|(origin, o)| {
            json!({
                "origin": origin,
                "origin_inside": policy.is_inside(origin),
                "models": o.models.len(),
                "copies": o.copies,
                "copies_inside": o.inside,
                "copies_outside": o.outside,
                "bytes_inside": o.bytes_inside,
                "bytes_outside": o.bytes_outside,
            })
        })
        .collect();
    by_origin.sort_by(|a, b| b["copies"].as_u64().cmp(&a["copies"].as_u64()));
    let copies_inside: u64 = origins.values().map(|o| o.inside).sum();
    let copies_outside: u64 = origins.values().map(|o| o.outside).sum();

    // 2. Compute.
    let mut by_jurisdiction: BTreeMap<String, f64> = BTreeMap::new();
    let mut by_model_origin: BTreeMap<String, f64> = BTreeMap::new();
    let mut by_namespace: BTreeMap<&str, f64> = BTreeMap::new();
    let mut gpu_total = 0.0;
    for g in &inputs.gpu {
        *by_namespace.entry(g.pod_namespace.as_str()).or_default() += g.gpu_seconds;
        let country = node_country
            .get(g.node.as_str())
            .cloned()
            .unwrap_or_default();
        *by_jurisdiction.entry(country).or_default() += g.gpu_seconds;
        let origin = holder_origin
            .get(&(g.node.as_str(), g.pid))
            .cloned()
            .unwrap_or_else(|| "unattributed".to_owned());
        *by_model_origin.entry(origin).or_default() += g.gpu_seconds;
        gpu_total += g.gpu_seconds;
    }
    let hours = |s: f64| round4(s / 3600.0);
    let gpu_inside: f64 = by_jurisdiction
        .iter()
        .filter(|(c, _)| policy.is_inside(c))
        .map(|(_, s)| s)
        .sum();
    let mut jurisdictions: Vec<Value> = by_jurisdiction
        .iter()
        .map(|(c, s)| json!({"country": c, "inside": policy.is_inside(c), "gpu_hours": hours(*s)}))
        .collect();
    jurisdictions.sort_by(|a, b| {
        b["gpu_hours"]
            .as_f64()
            .partial_cmp(&a["gpu_hours"].as_f64())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut model_origins: Vec<Value> = by_model_origin
        .iter()
        .map(|(o, s)| json!({"origin": o, "gpu_hours": hours(*s), "share": share(*s, gpu_total)}))
        .collect();
    model_origins.sort_by(|a, b| {
        b["gpu_hours"]
            .as_f64()
            .partial_cmp(&a["gpu_hours"].as_f64())
            .unwrap_or(std::cmp::Ordering::Equal)
    });

    // GPU-hours per Kubernetes namespace; "" is every process outside a pod.
    let mut namespaces: Vec<Value> = by_namespace
        .iter()
        .map(|(ns, s)| json!({"namespace": ns, "gpu_hours": hours(*s), "share": share(*s, gpu_total)}))
        .collect();
    namespaces.sort_by(|a, b| {
        b["gpu_hours"]
            .as_f64()
            .partial_cmp(&a["gpu_hours"].as_f64())
            .unwrap_or(std::cmp::Ordering::Equal)
    });

    // 3. Data: what nodes inside the jurisdiction sent, as the policy counts each verdict.
    let mut sent_total = 0u64;
    let mut sent_outside = 0u64;
    let mut sent_unplaced = 0u64;
    let mut sent_review = 0u64;
    let mut sent_inside_foreign_operated = 0u64;
    let (mut contested_destinations, mut sent_contested) = (BTreeSet::new(), 0u64);
    let (mut moved_total, mut moved_conntrack, mut unmeasured_flows) = (0u64, 0u64, 0u64);
    let mut per_country: BTreeMap<(String, &'static str), (u64, u64, u64, u64)> = BTreeMap::new();
    for r in &inputs.egress_by_node {
        let from_inside = node_country
            .get(r.node.as_str())
            .is_some_and(|c| policy.is_inside(c));
        if !from_inside {
            continue;
        }
        sent_total += r.bytes_sent;
        moved_total += r.bytes_sent + r.bytes_received;
        moved_conntrack += r.conntrack_bytes;
        unmeasured_flows += r.unmeasured_flows;
        if r.contested {
            if !r.remote_address.is_empty() {
                contested_destinations.insert((r.remote_address.as_str(), r.remote_port));
            }
            sent_contested += r.bytes_sent;
        }
        let foreign_operated =
            !r.operator_country.is_empty() && !policy.is_inside(&r.operator_country);
        let (country, counted) = match policy.count(r) {
            Counted::Unresolved => {
                sent_unplaced += r.bytes_sent;
                (String::new(), "unplaced")
            }
            Counted::Review(c) => {
                sent_review += r.bytes_sent;
                (c, "review")
            }
            Counted::Outside(c) => {
                sent_outside += r.bytes_sent;
                (c, "outside")
            }
            Counted::Inside => {
                if foreign_operated {
                    sent_inside_foreign_operated += r.bytes_sent;
                }
                (r.country.clone(), "inside")
            }
        };
        let e = per_country.entry((country, counted)).or_default();
        e.0 += r.bytes_sent;
        e.1 += r.bytes_received;
        e.2 += r.connections;
        if foreign_operated {
            e.3 += r.bytes_sent;
        }
    }
    for r in &inputs.contested {
        let from_inside = node_country
            .get(r.node.as_str())
            .is_some_and(|c| policy.is_inside(c));
        if from_inside && r.contested && !r.remote_address.is_empty() {
            contested_destinations.insert((r.remote_address.as_str(), r.remote_port));
        }
    }
    let mut countries: Vec<Value> = per_country
        .iter()
        .map(
            |((country, counted), (sent, received, connections, foreign_operated))| {
                json!({
                    "country": country,
                    "inside": *counted == "inside",
                    "counted": counted,
                    "bytes_sent": sent,
                    "bytes_received": received,
                    "connections": connections,
                    "bytes_sent_foreign_operated": foreign_operated,
                })
            },
        )
        .collect();
    countries.sort_by(|a, b| b["bytes_sent"].as_u64().cmp(&a["bytes_sent"].as_u64()));
    let moved_exact = moved_total.saturating_sub(moved_conntrack);
    let asns: Vec<Value> = inputs
        .egress_by_asn
        .iter()
        .take(TOP_ASNS)
        .map(|r| {
            json!({
                "asn": r.asn,
                "org": r.org,
                "country": r.country,
                "inside": policy.is_inside(&r.country),
                "bytes_sent": r.bytes_sent,
                "bytes_received": r.bytes_received,
            })
        })
        .collect();

    // 4. Completeness.
    let silence_ms = i64::try_from(policy.thresholds.silence_secs.max(1))
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000);
    let end = until_unix_ms.min(now_unix_ms);
    let reporting = inputs
        .nodes
        .iter()
        .filter(|n| n.last_seen_unix_ms >= since_unix_ms)
        .count();
    let mut silent: Vec<Value> = inputs
        .nodes
        .iter()
        .filter(|n| n.last_seen_unix_ms < end.saturating_sub(silence_ms))
        .map(|n| json!({"node": n.node, "last_seen": rfc3339(n.last_seen_unix_ms)}))
        .collect();
    silent.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
    let incomplete: Vec<Value> = inputs
        .nodes
        .iter()
        .filter(|n| n.missing > 0)
        .map(|n| {
            json!({
                "node": n.node,
                "missing": n.missing,
                "dropped": n.dropped,
                "last_seq": n.last_seq,
                "epoch": n.epoch,
                "ranges": inputs
                    .missing_ranges
                    .get(&n.node)
                    .map(|r| r.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>())
                    .unwrap_or_default(),
            })
        })
        .collect();

    let training = training_part(policy, inputs);

    json!({
        "jurisdiction": policy.jurisdiction,
        "inside_countries": policy.inside,
        "since": rfc3339(since_unix_ms),
        "until": rfc3339(until_unix_ms),
        "since_unix_ms": since_unix_ms,
        "until_unix_ms": until_unix_ms,
        "generated_at": rfc3339(now_unix_ms),
        "truncated": inputs.truncated,
        "weights": {
            "models": all_models.len(),
            "copies": copies_inside + copies_outside,
            "copies_inside": copies_inside,
            "copies_outside": copies_outside,
            "share_outside": share(copies_outside as f64, (copies_inside + copies_outside) as f64),
            "by_origin": by_origin,
        },
        "compute": {
            "gpu_hours": hours(gpu_total),
            "gpu_hours_inside": hours(gpu_inside),
            "gpu_hours_outside": hours(gpu_total - gpu_inside),
            "by_jurisdiction": jurisdictions,
            "by_model_origin": model_origins,
            "by_namespace": namespaces,
        },
        "data": {
            "bytes_sent": sent_total,
            "bytes_sent_outside": sent_outside,
            "bytes_sent_unplaced": sent_unplaced,
            "bytes_sent_physically_impossible": sent_review,
            "bytes_sent_inside_foreign_operated": sent_inside_foreign_operated,
            "share_leaving": share(sent_outside as f64, sent_total as f64),
            "contested": {
                "destinations": contested_destinations.len(),
                "bytes_sent": sent_contested,
                "counted_as": policy.verdicts.to_json()["contested"],
            },
            "measurement": {
                "bytes": moved_total,
                "bytes_exact": moved_exact,
                "bytes_conntrack": moved_conntrack,
                "share_exact": share(moved_exact as f64, moved_total as f64),
                "share_conntrack": share(moved_conntrack as f64, moved_total as f64),
                "flows_unmeasured": unmeasured_flows,
            },
            "by_country": countries,
            "by_asn_all_nodes": asns,
        },
        "training": training,
        "completeness": {
            "nodes": inputs.nodes.len(),
            "nodes_reporting": reporting,
            "silent_secs": silence_ms / 1000,
            "silent_nodes": silent,
            "reports": inputs.nodes.iter().map(|n| n.reports).sum::<u64>(),
            "missing_reports": inputs.nodes.iter().map(|n| n.missing).sum::<u64>(),
            "dropped_reports": inputs.nodes.iter().map(|n| n.dropped).sum::<u64>(),
            "nodes_with_missing_reports": incomplete,
        },
    })
}

/// Base origin of a run with no base-weight input (trained from scratch, or its base unseen).
pub const NO_BASE: &str = "none";

/// Where AI is trained and on whose models: training runs active in the range, by whether
/// their node is inside and by the origin of their first base-weight input's publisher;
/// the models (distinct outputs) runs inside produced, by base origin; and every dataset a run
/// outside read. A run's GPU-hours are its whole run so far (agents report them cumulated),
/// not clipped to the range.
fn training_part(policy: &Policy, inputs: &Inputs) -> Value {
    let place: BTreeMap<&str, (&str, &str)> = inputs
        .nodes
        .iter()
        .map(|n| (n.node.as_str(), (n.site.as_str(), n.country.as_str())))
        .collect();
    #[derive(Default)]
    struct ByOrigin {
        runs: u64,
        inside_s: f64,
        outside_s: f64,
        models_inside: BTreeSet<String>,
    }
    let mut by_origin: BTreeMap<String, ByOrigin> = BTreeMap::new();
    let mut datasets_outside = Vec::new();
    let (mut inside_s, mut outside_s, mut runs_inside) = (0.0f64, 0.0f64, 0u64);
    for s in &inputs.training {
        let Some(run) = &s.run else { continue };
        let (site, declared) = place
            .get(s.node.as_str())
            .copied()
            .unwrap_or(("", s.country.as_str()));
        let country = policy.node_country(site, declared);
        let inside = policy.is_inside(&country);
        let origin = run
            .inputs
            .iter()
            .find(|i| i.kind == "base-weights" && !i.model.is_empty())
            .map_or_else(
                || NO_BASE.to_owned(),
                |i| {
                    policy
                        .publisher_country(&i.model)
                        .unwrap_or_else(|| UNKNOWN_ORIGIN.to_owned())
                },
            );
        let o = by_origin.entry(origin).or_default();
        o.runs += 1;
        let secs = if run.gpu_seconds.is_finite() {
            run.gpu_seconds.max(0.0)
        } else {
            0.0
        };
        if inside {
            runs_inside += 1;
            inside_s += secs;
            o.inside_s += secs;
            for out in &run.outputs {
                let id = if out.sha256.is_empty() {
                    format!("{}:{}", s.node, out.path)
                } else {
                    out.sha256.clone()
                };
                o.models_inside.insert(id);
            }
        } else {
            outside_s += secs;
            o.outside_s += secs;
            for i in run.inputs.iter().filter(|i| i.kind == "dataset") {
                datasets_outside.push(json!({
                    "node": s.node,
                    "country": country,
                    "run_id": run.run_id,
                    "path": i.path,
                    "format": i.format,
                    "dataset": i.model,
                    "size": i.size_bytes,
                    "sha256": i.sha256,
                    "class": policy.dataset_class(&DatasetFacts {
                        path: &i.path,
                        sha256: &i.sha256,
                        repo: &i.model,
                    }).0.as_str(),
                }));
            }
        }
    }
    let hours = |s: f64| round4(s / 3600.0);
    let origins: Vec<Value> = by_origin
        .iter()
        .map(|(origin, o)| {
            json!({
                "base_origin": origin,
                "base_origin_inside": policy.is_inside(origin),
                "runs": o.runs,
                "gpu_hours_inside": hours(o.inside_s),
                "gpu_hours_outside": hours(o.outside_s),
                "models_produced_inside": o.models_inside.len(),
            })
        })
        .collect();
    json!({
        "runs": inputs.training.len(),
        "runs_inside": runs_inside,
        "gpu_hours": hours(inside_s + outside_s),
        "gpu_hours_inside": hours(inside_s),
        "gpu_hours_outside": hours(outside_s),
        "by_base_origin": origins,
        "models_produced_inside": by_origin.values().map(|o| o.models_inside.len()).sum::<usize>(),
        "datasets_used_outside": datasets_outside,
    })
}

/// The policy a scorecard uses when the collector has none: only a jurisdiction (two
/// letters), with the default thresholds and publishers.
pub fn policy_for(jurisdiction: &str) -> Option<Policy> {
    let ok = jurisdiction.len() == 2 && jurisdiction.bytes().all(|b| b.is_ascii_uppercase());
    if !ok {
        return None;
    }
    Policy::parse(&format!("jurisdiction = \"{jurisdiction}\"\n"), "request").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_gives_the_known_answers_by_node_side_and_base_origin() {
        let policy = Policy::parse(
            "jurisdiction = \"MA\"\n[[dataset]]\nmatch = \"name:darija*\"\nclass = \"restricted\"\n",
            "test",
        )
        .unwrap();
        let node = |name: &str, country: &str| pb::NodeSummary {
            node: name.into(),
            country: country.into(),
            ..Default::default()
        };
        let base = |model: &str| pb::TrainingInput {
            kind: "base-weights".into(),
            model: model.into(),
            ..Default::default()
        };
        let dataset = |path: &str| pb::TrainingInput {
            kind: "dataset".into(),
            path: path.into(),
            format: "parquet".into(),
            size_bytes: 7,
            ..Default::default()
        };
        let out = |sha: &str| pb::TrainingOutput {
            path: format!("/o/{sha}.safetensors"),
            sha256: sha.into(),
            ..Default::default()
        };
        let run = |node: &str, id: &str, secs: f64, inputs, outputs| pb::TrainingRunSummary {
            node: node.into(),
            run: Some(pb::TrainingRun {
                run_id: id.into(),
                gpu_seconds: secs,
                inputs,
                outputs,
                ..Default::default()
            }),
            ..Default::default()
        };
        let inputs = Inputs {
            nodes: vec![node("rabat-1", "MA"), node("paris-1", "FR")],
            training: vec![
                // Inside, on a French base: 2 h, two checkpoints (one written twice).
                run(
                    "rabat-1",
                    "r1",
                    7200.0,
                    vec![base("mistralai/Mistral-7B-v0.1"), dataset("/d/ma.parquet")],
                    vec![out("a"), out("b"), out("a")],
                ),
                // Inside, from scratch: 1 h, one checkpoint.
                run("rabat-1", "r2", 3600.0, vec![], vec![out("c")]),
                // Outside, on an American base, reading a dataset: 0.5 h.
                run(
                    "paris-1",
                    "r3",
                    1800.0,
                    vec![
                        base("meta-llama/Llama-3.1-8B"),
                        dataset("/d/darija.parquet"),
                    ],
                    vec![out("d")],
                ),
            ],
            ..Default::default()
        };
        let card = build(&policy, &inputs, 0, 1, 1);
        let t = &card["training"];
        assert_eq!(t["runs"], 3);
        assert_eq!(t["runs_inside"], 2);
        assert_eq!(t["gpu_hours"], 3.5);
        assert_eq!(t["gpu_hours_inside"], 3.0);
        assert_eq!(t["gpu_hours_outside"], 0.5);
        assert_eq!(t["models_produced_inside"], 3);
        let origin = |o: &str| {
            t["by_base_origin"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["base_origin"] == o)
                .unwrap_or_else(|| panic!("{o} missing: {t:#}"))
                .clone()
        };
        let fr = origin("FR");
        assert_eq!(
            (
                &fr["runs"],
                &fr["gpu_hours_inside"],
                &fr["models_produced_inside"]
            ),
            (&json!(1), &json!(2.0), &json!(2))
        );
        let us = origin("US");
        assert_eq!(
            (&us["gpu_hours_outside"], &us["gpu_hours_inside"]),
            (&json!(0.5), &json!(0.0))
        );
        assert_eq!(origin(NO_BASE)["models_produced_inside"], 1);
        let outside = t["datasets_used_outside"].as_array().unwrap();
        assert_eq!(outside.len(), 1, "{t:#}");
        assert_eq!(outside[0]["path"], "/d/darija.parquet");
        assert_eq!(outside[0]["country"], "FR");
        assert_eq!(outside[0]["class"], "restricted");
    }

    #[test]
    fn no_gpu_hours_at_all_is_zero_not_minus_zero() {
        let none: f64 = std::iter::empty::<f64>().sum();
        assert_eq!(round4(none).to_string(), "0");
        assert_eq!(json!(round4(none)).to_string(), "0.0");
    }

    fn answer(country: &str, kind: &str, impossible: bool) -> pb::GeoAnswer {
        pb::GeoAnswer {
            source: format!("{kind}:test"),
            country: country.into(),
            kind: kind.into(),
            impossible,
            distance_km: 0,
        }
    }

    fn row(address: &str, sent: u64, answers: Vec<pb::GeoAnswer>) -> pb::EgressRow {
        pb::EgressRow {
            node: "rabat-1".into(),
            country: answers
                .first()
                .map(|a| a.country.clone())
                .unwrap_or_default(),
            contested: answers.len() > 1,
            answers,
            remote_address: address.into(),
            remote_port: 443,
            bytes_sent: sent,
            connections: 1,
            ..pb::EgressRow::default()
        }
    }

    #[test]
    fn data_is_counted_by_the_policy_with_review_foreign_operated_contested_and_measurement() {
        let policy = Policy::parse("jurisdiction = \"MA\"\n", "test").unwrap();
        let mut operated = row("192.0.2.3", 300, vec![answer("MA", "registry", false)]);
        operated.operator_country = "US".into();
        let mut udp = row("192.0.2.4", 400, vec![answer("MA", "registry", false)]);
        udp.conntrack_bytes = 400;
        let mut quiet = row("192.0.2.5", 0, vec![answer("MA", "registry", false)]);
        quiet.unmeasured_flows = 2;
        let inputs = Inputs {
            nodes: vec![pb::NodeSummary {
                node: "rabat-1".into(),
                site: "rabat".into(),
                country: "MA".into(),
                ..Default::default()
            }],
            egress_by_node: vec![
                row(
                    "192.0.2.1",
                    100,
                    vec![
                        answer("MA", "geofeed", false),
                        answer("US", "registry", false),
                    ],
                ),
                row("192.0.2.2", 200, vec![answer("FR", "geofeed", true)]),
                operated,
                udp,
                quiet,
            ],
            ..Inputs::default()
        };
        let card = build(&policy, &inputs, 0, 1000, 1000);
        let d = &card["data"];
        assert_eq!(d["bytes_sent"], 1000);
        assert_eq!(
            d["bytes_sent_outside"], 100,
            "strict: the contested one is outside"
        );
        assert_eq!(d["bytes_sent_physically_impossible"], 200);
        assert_eq!(d["bytes_sent_inside_foreign_operated"], 300);
        assert_eq!(d["contested"]["destinations"], 1);
        assert_eq!(d["contested"]["bytes_sent"], 100);
        let m = &d["measurement"];
        assert_eq!(m["bytes"], 1000);
        assert_eq!(m["bytes_conntrack"], 400);
        assert_eq!(m["bytes_exact"], 600);
        assert_eq!(m["share_conntrack"], 0.4);
        assert_eq!(m["flows_unmeasured"], 2);
        let review = d["by_country"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["counted"] == "review")
            .unwrap();
        assert_eq!(
            (review["country"].as_str(), review["bytes_sent"].as_u64()),
            (Some("FR"), Some(200))
        );
        let us = d["by_country"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["country"] == "US")
            .unwrap();
        assert_eq!(us["counted"], "outside");
    }

    #[test]
    fn gpu_hours_are_counted_by_kubernetes_namespace_largest_first() {
        let policy = Policy::parse("jurisdiction = \"MA\"\n", "test").unwrap();
        let usage = |pid, ns: &str, secs| GpuUsageRow {
            node: "gpu-1".into(),
            pid,
            process: "vllm".into(),
            gpu_seconds: secs,
            pod_namespace: ns.into(),
        };
        let inputs = Inputs {
            gpu: vec![
                usage(1, "inference", 3600.0),
                usage(2, "inference", 3600.0),
                usage(3, "batch", 1800.0),
                usage(4, "", 3600.0),
            ],
            ..Inputs::default()
        };
        let card = build(&policy, &inputs, 0, 1000, 1000);
        let ns = card["compute"]["by_namespace"].as_array().unwrap();
        let got: Vec<(&str, f64)> = ns
            .iter()
            .map(|n| {
                (
                    n["namespace"].as_str().unwrap(),
                    n["gpu_hours"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, [("inference", 2.0), ("", 1.0), ("batch", 0.5)]);
        assert_eq!(ns[0]["share"], 0.5714);
    }
}
