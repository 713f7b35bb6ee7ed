//! `impossible-verdict` (warning): a node inside sent bytes over the last `window_secs` to
//! destinations that every database places in one country but that the speed of light rules
//! out (the country lies farther from the node's site than the flow's minimum round-trip time
//! allows). Under `[verdicts] impossible = "review"` (the default) such destinations are not
//! foreign; this rule surfaces them for review instead: typically an anycast address or a
//! local point of presence of a foreign network. Subject `review:country:XX`, one breach per
//! node and claimed country. Evidence: the claimed country, and under `counters` the bytes and
//! the largest destinations with every source's answer, the RTT, the distance and the limit.
//! Resolves after `quiet_secs` without an observation.

use std::collections::BTreeMap;

use serde_json::json;
use sov_proto::pb;

use super::{Context, Rule, policy_quiet_ms, top_destinations};
use crate::breach::{EVIDENCE_COUNTERS, Observation, Severity};
use crate::policy::Counted;

/// Rule name.
pub const IMPOSSIBLE_VERDICT: &str = "impossible-verdict";

/// The rule.
pub const RULE: Rule = Rule {
    name: IMPOSSIBLE_VERDICT,
    observe,
    quiet_ms: policy_quiet_ms,
};

fn observe(ctx: &Context<'_>) -> Vec<Observation> {
    let t = &ctx.policy.thresholds;
    let mut per: BTreeMap<(&str, String), Vec<&pb::EgressRow>> = BTreeMap::new();
    for r in &ctx.facts.flows {
        let Counted::Review(country) = ctx.policy.count(r) else {
            continue;
        };
        if !ctx.node_inside(&r.node) || ctx.allowed(r) || r.bytes_sent == 0 {
            continue;
        }
        per.entry((r.node.as_str(), country)).or_default().push(r);
    }
    per.into_iter()
        .map(|((node, country), rows)| {
            let bytes: u64 = rows.iter().map(|r| r.bytes_sent).sum();
            Observation {
                rule: IMPOSSIBLE_VERDICT.to_owned(),
                node: node.to_owned(),
                subject: format!("review:country:{country}"),
                severity: Severity::Warning,
                evidence: json!({
                    "claimed_country": country,
                    "window_secs": t.window_secs,
                    "counted_as": "not foreign (verdicts.impossible = \"review\")",
                    EVIDENCE_COUNTERS: {
                        "bytes_sent": bytes,
                        "destinations": top_destinations(&rows),
                    },
                }),
                at_unix_ms: ctx.now_unix_ms,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{flow, node, policy, run};
    use super::*;
    use crate::policy::rules::{FOREIGN_EGRESS, Facts, foreign_egress};

    fn impossible(mut r: pb::EgressRow) -> pb::EgressRow {
        r.answers = vec![pb::GeoAnswer {
            source: "geofeed:test@2026-11-01".into(),
            country: r.country.clone(),
            kind: "geofeed".into(),
            impossible: true,
            distance_km: 1107,
        }];
        r.physics = "impossible".into();
        r.min_rtt_us = 60;
        r.distance_km = 1107;
        r.limit_km = 59;
        r
    }

    #[test]
    fn a_physically_impossible_destination_is_for_review_not_a_foreign_egress_breach() {
        let f = Facts {
            nodes: vec![node("a", "rabat", "MA")],
            flows: vec![impossible(flow("a", 7, "FR", "198.18.0.2", 50_000_000))],
            ..Facts::default()
        };
        let p = policy("");
        assert!(run(&foreign_egress::RULE, &p, &f).is_empty());
        let obs = run(&RULE, &p, &f);
        assert_eq!(obs.len(), 1, "{obs:?}");
        assert_eq!(obs[0].subject, "review:country:FR");
        let d = &obs[0].evidence[EVIDENCE_COUNTERS]["destinations"][0];
        assert_eq!(d["physics"], "impossible");
        assert_eq!(d["min_rtt_us"], 60);
        assert_eq!(d["distance_km"], 1107);
        assert_eq!(d["answers"][0]["country"], "FR");
        // Counted as foreign when the policy says so.
        let p = policy("[verdicts]\nimpossible = \"foreign\"\n");
        let obs = run(&foreign_egress::RULE, &p, &f);
        assert_eq!(obs.len(), 1);
        assert_eq!(obs[0].rule, FOREIGN_EGRESS);
        assert!(run(&RULE, &p, &f).is_empty());
    }
}
