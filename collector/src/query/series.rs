//! Time series for the console's charts (`GET /api/v1/series`): the range cut into equal
//! buckets, and for each bucket what the scorecard says of it — bytes that nodes inside the
//! jurisdiction sent to each destination country (inside, outside, unplaced), GPU-hours on
//! nodes inside and outside, and the reports each node sent (observed in the bucket).
//!
//! Each bucket is the scorecard's own arithmetic ([`super::scorecard::build`]) over the
//! bucket's GPU usage and egress, so a chart and the scorecard of the same range always
//! agree: the buckets sum to the range's totals. Nodes and models are read once for the
//! range; GPU usage, egress and report counts once per bucket (at most [`MAX_BUCKETS`]).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sov_evidence::view::rfc3339;

use super::scorecard::{self, Inputs, MAX_ROWS};
use crate::policy::Policy;
use crate::store::{EgressQuery, Store, StoreError};

/// Buckets when the caller names none.
pub const DEFAULT_BUCKETS: u32 = 24;
/// Most buckets one request may ask for.
pub const MAX_BUCKETS: u32 = 96;
/// One minute, the grain of the egress kept (and of bucket boundaries).
const MINUTE_MS: i64 = 60_000;

/// The series of `[since, until)` in `buckets` buckets, under `policy`.
pub async fn series(
    store: &dyn Store,
    policy: &Policy,
    since_unix_ms: i64,
    until_unix_ms: i64,
    buckets: u32,
) -> Result<Value, StoreError> {
    let buckets = buckets.clamp(1, MAX_BUCKETS);
    // Egress is kept per minute (stamped at the minute's start, a range starting mid-minute
    // includes it): bucket boundaries fall on whole minutes, or a minute at a boundary would be
    // counted in both buckets beside it.
    let aligned_since = since_unix_ms - since_unix_ms.rem_euclid(MINUTE_MS);
    let span = (until_unix_ms - aligned_since).max(1);
    let raw_step = (span + i64::from(buckets) - 1) / i64::from(buckets);
    let step = (raw_step + MINUTE_MS - 1) / MINUTE_MS * MINUTE_MS;
    let base = scorecard::read_inputs(store, since_unix_ms, until_unix_ms).await?;
    let mut starts = Vec::new();
    let mut by_country: BTreeMap<String, (bool, Vec<u64>)> = BTreeMap::new();
    let mut unplaced = Vec::new();
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    let mut reports: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut truncated = base.truncated;
    for i in 0..i64::from(buckets) {
        let start = if i == 0 {
            since_unix_ms
        } else {
            aligned_since + i * step
        };
        let end = (aligned_since + (i + 1) * step).min(until_unix_ms);
        if start >= end {
            break;
        }
        let (egress, left_out) = store
            .egress(EgressQuery {
                since_unix_ms: start,
                until_unix_ms: end,
                by: "node".to_owned(),
                limit: MAX_ROWS,
                ..Default::default()
            })
            .await?;
        let gpu = store.gpu_usage(start, end, MAX_ROWS).await?;
        for (node, count) in store.reports_by_node(start, end, MAX_ROWS).await? {
            let e = reports.entry(node).or_default();
            e.resize(starts.len(), 0);
            e.push(count);
        }
        truncated |= left_out > 0 || gpu.len() >= MAX_ROWS as usize;
        let inputs = Inputs {
            nodes: base.nodes.clone(),
            models: base.models.clone(),
            gpu,
            egress_by_node: egress,
            ..Inputs::default()
        };
        let card = scorecard::build(policy, &inputs, start, end, end);
        let n = starts.len();
        starts.push(json!({"start": rfc3339(start), "start_unix_ms": start, "end_unix_ms": end}));
        unplaced.push(card["data"]["bytes_sent_unplaced"].as_u64().unwrap_or(0));
        for c in card["data"]["by_country"].as_array().into_iter().flatten() {
            let country = c["country"].as_str().unwrap_or("");
            if country.is_empty() {
                continue;
            }
            let e = by_country
                .entry(country.to_owned())
                .or_insert_with(|| (c["inside"].as_bool().unwrap_or(false), Vec::new()));
            e.1.resize(n, 0);
            e.1.push(c["bytes_sent"].as_u64().unwrap_or(0));
        }
        inside.push(card["compute"]["gpu_hours_inside"].as_f64().unwrap_or(0.0));
        outside.push(card["compute"]["gpu_hours_outside"].as_f64().unwrap_or(0.0));
    }
    let n = starts.len();
    let mut countries: Vec<Value> = by_country
        .into_iter()
        .map(|(country, (is_inside, mut values))| {
            values.resize(n, 0);
            let total: u64 = values.iter().sum();
            json!({"country": country, "inside": is_inside, "total": total, "bytes_sent": values})
        })
        .collect();
    countries.sort_by(|a, b| b["total"].as_u64().cmp(&a["total"].as_u64()));
    let mut per_node: Vec<Value> = reports
        .into_iter()
        .map(|(node, mut values)| {
            values.resize(n, 0);
            let total: u64 = values.iter().sum();
            json!({"node": node, "total": total, "reports": values})
        })
        .collect();
    per_node.sort_by(|a, b| b["total"].as_u64().cmp(&a["total"].as_u64()));
    Ok(json!({
        "jurisdiction": policy.jurisdiction,
        "since": rfc3339(since_unix_ms),
        "until": rfc3339(until_unix_ms),
        "since_unix_ms": since_unix_ms,
        "until_unix_ms": until_unix_ms,
        "step_ms": step,
        "buckets": starts,
        "bytes_sent_by_country": countries,
        "bytes_sent_unplaced": unplaced,
        "gpu_hours": {"inside": inside, "outside": outside},
        "reports_by_node": per_node,
        "truncated": truncated,
    }))
}
