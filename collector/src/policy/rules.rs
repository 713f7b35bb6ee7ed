//! The built-in breach rules, evaluated every [`EVAL_EVERY`] by the server's evaluation loop
//! (started when the collector configuration names a `policy` file).
//!
//! - [`AGENT_SILENT`] (warning): a node whose last report is older than
//!   `thresholds.silence_secs`; subject `"silence"`. A silent node is observed on every
//!   evaluation, so its breach's last-seen time keeps moving; once the node reports again it
//!   is no longer observed and the breach resolves after [`silent_quiet_ms`] (two evaluation
//!   periods), not after `quiet_secs`.
//! - [`FOREIGN_EGRESS`] (critical): a node that sent more than
//!   `thresholds.foreign_egress_bytes` over the last `window_secs` to one country outside the
//!   jurisdiction; subject `"country:XX"`. Destinations covered by an `[[allow]]` entry do not
//!   count: a country allowed as a whole is skipped, and otherwise the country's traffic only
//!   counts when its not-allowed destinations (summed over every node, since the store's
//!   per-destination grouping carries no node) also exceed the threshold. Resolves after
//!   `quiet_secs` without an observation.
//! - [`UNRESOLVED_DESTINATION`] (warning): a node that sent more than
//!   `thresholds.unresolved_bytes` over the window to destinations no database could place
//!   (country ""); subject `"unresolved"`. Resolves after `quiet_secs`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde_json::{Value, json};
use sov_proto::pb;

use super::Policy;
use crate::breach::{Observation, Severity};
use crate::store::{EgressQuery, Store, StoreError};

/// How often the rules are evaluated.
pub const EVAL_EVERY: Duration = Duration::from_secs(2);
/// Rule name: a node stopped reporting.
pub const AGENT_SILENT: &str = "agent-silent";
/// Rule name: too many bytes to a country outside the jurisdiction.
pub const FOREIGN_EGRESS: &str = "foreign-egress";
/// Rule name: too many bytes to destinations with no known country.
pub const UNRESOLVED_DESTINATION: &str = "unresolved-destination";
/// Most destinations listed in a foreign-egress breach's evidence.
pub const MAX_EVIDENCE_DESTINATIONS: usize = 5;
/// Most egress rows read per evaluation.
const EGRESS_ROWS: u32 = 10_000;
/// Most nodes read per page.
const NODE_PAGE: u32 = 1000;

/// An agent-silent breach resolves when it has not been observed for this long (two
/// evaluation periods): the node reported again.
pub fn silent_quiet_ms() -> i64 {
    i64::try_from(EVAL_EVERY.as_millis() * 2).unwrap_or(i64::MAX)
}

/// Agent-silent observations for nodes `(node, last_seen_unix_ms)` at `now_unix_ms`.
pub fn silent_nodes(
    policy: &Policy,
    nodes: &[(String, i64)],
    now_unix_ms: i64,
) -> Vec<Observation> {
    let limit_ms =
        i64::try_from(policy.thresholds.silence_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    nodes
        .iter()
        .filter(|(_, seen)| now_unix_ms.saturating_sub(*seen) > limit_ms)
        .map(|(node, seen)| Observation {
            rule: AGENT_SILENT.to_owned(),
            node: node.clone(),
            subject: "silence".to_owned(),
            severity: Severity::Warning,
            evidence: json!({
                "last_seen": seen,
                "silent_secs": now_unix_ms.saturating_sub(*seen) / 1000,
            }),
            at_unix_ms: now_unix_ms,
        })
        .collect()
}

/// Whether a destination row is covered by an `[[allow]]` entry.
fn row_allowed(policy: &Policy, r: &pb::EgressRow, now_unix_ms: i64) -> bool {
    let ip: IpAddr = r
        .remote_address
        .parse()
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let asn = (r.asn != 0).then_some(r.asn);
    policy.allowed(ip, asn, &r.country, now_unix_ms).is_some()
}

/// Foreign-egress and unresolved-destination observations from the window's egress rows
/// grouped by process (`by_process`: node, country, bytes) and by destination
/// (`by_destination`: country, address, port, ASN, bytes).
pub fn egress_observations(
    policy: &Policy,
    by_process: &[pb::EgressRow],
    by_destination: &[pb::EgressRow],
    now_unix_ms: i64,
) -> Vec<Observation> {
    let t = &policy.thresholds;
    // (node, country) -> bytes sent.
    let mut per_node: BTreeMap<(String, String), u64> = BTreeMap::new();
    for r in by_process {
        *per_node
            .entry((r.node.clone(), r.country.clone()))
            .or_default() += r.bytes_sent;
    }
    // country -> (not-allowed bytes over every node, not-allowed destinations).
    let mut per_country: BTreeMap<String, (u64, Vec<&pb::EgressRow>)> = BTreeMap::new();
    for r in by_destination {
        if r.country.is_empty()
            || policy.is_inside(&r.country)
            || row_allowed(policy, r, now_unix_ms)
        {
            continue;
        }
        let e = per_country.entry(r.country.clone()).or_default();
        e.0 += r.bytes_sent;
        e.1.push(r);
    }
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let mut out = Vec::new();
    for ((node, country), bytes) in per_node {
        if country.is_empty() {
            if bytes > t.unresolved_bytes {
                out.push(Observation {
                    rule: UNRESOLVED_DESTINATION.to_owned(),
                    node,
                    subject: "unresolved".to_owned(),
                    severity: Severity::Warning,
                    evidence: json!({"bytes_sent": bytes, "window_secs": t.window_secs}),
                    at_unix_ms: now_unix_ms,
                });
            }
            continue;
        }
        if bytes <= t.foreign_egress_bytes
            || policy.is_inside(&country)
            || policy
                .allowed(unspecified, None, &country, now_unix_ms)
                .is_some()
        {
            continue;
        }
        let Some((foreign, dests)) = per_country.get(&country) else {
            continue;
        };
        if *foreign <= t.foreign_egress_bytes {
            continue;
        }
        let destinations: Vec<Value> = dests
            .iter()
            .take(MAX_EVIDENCE_DESTINATIONS)
            .map(|d| {
                json!({
                    "address": d.remote_address,
                    "port": d.remote_port,
                    "asn": d.asn,
                    "org": d.org,
                    "bytes": d.bytes_sent,
                })
            })
            .collect();
        out.push(Observation {
            rule: FOREIGN_EGRESS.to_owned(),
            node,
            subject: format!("country:{country}"),
            severity: Severity::Critical,
            evidence: json!({
                "country": country,
                "bytes_sent": bytes,
                "window_secs": t.window_secs,
                "destinations": destinations,
            }),
            at_unix_ms: now_unix_ms,
        });
    }
    out
}

/// Evaluate every rule once at `now_unix_ms`: observe what is violated, then resolve what
/// has been quiet. Returns how many observations were made.
pub async fn evaluate(
    policy: &Policy,
    store: &dyn Store,
    now_unix_ms: i64,
) -> Result<usize, StoreError> {
    let t = &policy.thresholds;
    let mut nodes = Vec::new();
    let mut after = String::new();
    loop {
        let page = store.list_nodes(&after, NODE_PAGE).await?;
        let full = page.len() == NODE_PAGE as usize;
        for n in page {
            after.clone_from(&n.node);
            nodes.push((n.node, n.last_seen_unix_ms));
        }
        if !full {
            break;
        }
    }
    let mut observations = silent_nodes(policy, &nodes, now_unix_ms);
    let window_ms = i64::try_from(t.window_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let query = |by: &str| EgressQuery {
        since_unix_ms: now_unix_ms.saturating_sub(window_ms),
        until_unix_ms: now_unix_ms.saturating_add(1),
        by: by.to_owned(),
        limit: EGRESS_ROWS,
    };
    let (by_process, _) = store.egress(query("process")).await?;
    let (by_destination, _) = store.egress(query("destination")).await?;
    observations.extend(egress_observations(
        policy,
        &by_process,
        &by_destination,
        now_unix_ms,
    ));
    let made = observations.len();
    for obs in observations {
        store.observe_breach(obs).await?;
    }
    let quiet_ms = i64::try_from(t.quiet_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    store
        .resolve_quiet_breaches(AGENT_SILENT, now_unix_ms - silent_quiet_ms(), now_unix_ms)
        .await?;
    for rule in [FOREIGN_EGRESS, UNRESOLVED_DESTINATION] {
        store
            .resolve_quiet_breaches(rule, now_unix_ms.saturating_sub(quiet_ms), now_unix_ms)
            .await?;
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn policy(extra: &str) -> Policy {
        Policy::parse_at(
            &format!(
                "jurisdiction = \"MA\"\n[thresholds]\nforeign_egress_bytes = 1000\nwindow_secs = 60\nsilence_secs = 30\nquiet_secs = 0\n{extra}"
            ),
            "test",
            NOW,
        )
        .unwrap()
    }

    fn row(node: &str, country: &str, addr: &str, bytes: u64) -> pb::EgressRow {
        pb::EgressRow {
            node: node.to_owned(),
            country: country.to_owned(),
            remote_address: addr.to_owned(),
            remote_port: 443,
            bytes_sent: bytes,
            ..Default::default()
        }
    }

    #[test]
    fn only_nodes_silent_longer_than_the_threshold_are_observed() {
        let p = policy("");
        let nodes = vec![
            ("fresh".to_owned(), NOW - 29_000),
            ("silent".to_owned(), NOW - 31_000),
        ];
        let obs = silent_nodes(&p, &nodes, NOW);
        assert_eq!(obs.len(), 1);
        assert_eq!(obs[0].node, "silent");
        assert_eq!(obs[0].rule, AGENT_SILENT);
        assert_eq!(obs[0].evidence["silent_secs"], 31);
        assert!(silent_nodes(&p, &nodes, NOW - 10_000).is_empty());
        assert!(silent_quiet_ms() >= 2 * i64::try_from(EVAL_EVERY.as_millis()).unwrap());
    }

    #[test]
    fn foreign_bytes_over_the_threshold_open_one_breach_per_node_and_country() {
        let p = policy("");
        let procs = vec![
            row("a", "FR", "", 5000),
            row("a", "MA", "", 90_000),
            row("b", "FR", "", 10),
            row("a", "", "", 20_000_000),
        ];
        let dests = vec![row("", "FR", "203.0.113.7", 5010)];
        let obs = egress_observations(&p, &procs, &dests, NOW);
        let foreign: Vec<_> = obs.iter().filter(|o| o.rule == FOREIGN_EGRESS).collect();
        assert_eq!(foreign.len(), 1);
        assert_eq!(foreign[0].node, "a");
        assert_eq!(foreign[0].subject, "country:FR");
        assert_eq!(foreign[0].severity, Severity::Critical);
        assert_eq!(
            foreign[0].evidence["destinations"][0]["address"],
            "203.0.113.7"
        );
        let unresolved: Vec<_> = obs
            .iter()
            .filter(|o| o.rule == UNRESOLVED_DESTINATION)
            .collect();
        assert_eq!(unresolved.len(), 1);
        assert_eq!(unresolved[0].subject, "unresolved");
    }

    #[test]
    fn allowed_destinations_do_not_count() {
        let p = policy("[[allow]]\ncidr = \"198.51.100.0/24\"\nreason = \"backup provider\"\n");
        let procs = vec![row("a", "DE", "", 50_000)];
        let dests = vec![row("", "DE", "198.51.100.9", 50_000)];
        assert!(egress_observations(&p, &procs, &dests, NOW).is_empty());
    }
}
