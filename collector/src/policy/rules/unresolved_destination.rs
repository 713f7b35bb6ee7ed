//! `unresolved-destination` (warning): a node sent more than `thresholds.unresolved_bytes`
//! over the window to destinations that no geolocation database places (country ""). Subject
//! `unresolved`. Destinations covered by an `[[allow]]` CIDR or ASN do not count. Resolves
//! after `quiet_secs` without an observation.

use std::collections::BTreeMap;

use serde_json::json;
use sov_proto::pb;

use super::{Context, Rule, policy_quiet_ms, top_destinations};
use crate::breach::{EVIDENCE_COUNTERS, Observation, Severity};

/// Rule name.
pub const UNRESOLVED_DESTINATION: &str = "unresolved-destination";

/// The rule.
pub const RULE: Rule = Rule {
    name: UNRESOLVED_DESTINATION,
    observe,
    quiet_ms: policy_quiet_ms,
};

fn observe(ctx: &Context<'_>) -> Vec<Observation> {
    let t = &ctx.policy.thresholds;
    let mut per: BTreeMap<&str, Vec<&pb::EgressRow>> = BTreeMap::new();
    for r in ctx
        .facts
        .flows
        .iter()
        .filter(|r| ctx.policy.count(r) == crate::policy::Counted::Unresolved)
    {
        if !ctx.allowed(r) {
            per.entry(r.node.as_str()).or_default().push(r);
        }
    }
    per.into_iter()
        .filter_map(|(node, rows)| {
            let bytes: u64 = rows.iter().map(|r| r.bytes_sent).sum();
            (bytes > t.unresolved_bytes).then(|| Observation {
                rule: UNRESOLVED_DESTINATION.to_owned(),
                node: node.to_owned(),
                subject: "unresolved".to_owned(),
                severity: Severity::Warning,
                evidence: json!({
                    "window_secs": t.window_secs,
                    "threshold_bytes": t.unresolved_bytes,
                    EVIDENCE_COUNTERS: {
                        "bytes_sent": bytes,
                        "destinations": top_destinations(&rows),
                    },
                }),
                at_unix_ms: ctx.now_unix_ms,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{flow, node, policy, run};
    use super::*;
    use crate::policy::rules::Facts;

    #[test]
    fn unplaced_bytes_over_the_threshold_are_observed_per_node() {
        let p = policy("[[allow]]\ncidr = \"10.9.0.0/16\"\nreason = \"lab\"\n");
        let f = Facts {
            nodes: vec![node("a", "s", "MA"), node("b", "s", "MA")],
            flows: vec![
                flow("a", 1, "", "10.0.0.1", 800),
                flow("a", 2, "", "10.0.0.2", 800),
                flow("b", 1, "", "10.9.0.1", 50_000),
                flow("b", 1, "FR", "203.0.113.1", 50_000),
            ],
            ..Facts::default()
        };
        let obs = run(&RULE, &p, &f);
        assert_eq!(obs.len(), 1, "{obs:?}");
        assert_eq!(obs[0].node, "a");
        assert_eq!(obs[0].subject, "unresolved");
        assert_eq!(obs[0].evidence[EVIDENCE_COUNTERS]["bytes_sent"], 1600);
    }
}
