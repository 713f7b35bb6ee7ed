//! `foreign-egress` (critical): a node inside the jurisdiction sent more than
//! `thresholds.foreign_egress_bytes` over the last `window_secs` to one country outside it.
//! Subject `country:XX`, one breach per node and country.
//!
//! The country a destination counts in is the policy's reading of its verdict
//! (`policy::verdicts`: contested answers, physically impossible ones). Destinations covered
//! by an `[[allow]]` entry (CIDR, ASN or country, not expired) do not count; destinations no
//! database places are `unresolved-destination`'s, ruled-out ones `impossible-verdict`'s. Evidence: the
//! country and window, and under `counters` the bytes and the largest destinations with the
//! process, pid, address, port, ASN and organisation. Resolves after `quiet_secs` without an
//! observation.

use std::collections::BTreeMap;

use serde_json::json;
use sov_proto::pb;

use super::{Context, Rule, policy_quiet_ms, top_destinations};
use crate::breach::{EVIDENCE_COUNTERS, Observation, Severity};
use crate::policy::Counted;

/// Rule name.
pub const FOREIGN_EGRESS: &str = "foreign-egress";

/// The rule.
pub const RULE: Rule = Rule {
    name: FOREIGN_EGRESS,
    observe,
    quiet_ms: policy_quiet_ms,
};

fn observe(ctx: &Context<'_>) -> Vec<Observation> {
    let t = &ctx.policy.thresholds;
    let mut per: BTreeMap<(&str, String), Vec<&pb::EgressRow>> = BTreeMap::new();
    for r in &ctx.facts.flows {
        let Counted::Outside(country) = ctx.policy.count(r) else {
            continue;
        };
        if !ctx.node_inside(&r.node) || ctx.allowed(r) {
            continue;
        }
        per.entry((r.node.as_str(), country)).or_default().push(r);
    }
    per.into_iter()
        .filter_map(|((node, country), rows)| {
            let bytes: u64 = rows.iter().map(|r| r.bytes_sent).sum();
            (bytes > t.foreign_egress_bytes).then(|| Observation {
                rule: FOREIGN_EGRESS.to_owned(),
                node: node.to_owned(),
                subject: format!("country:{country}"),
                severity: Severity::Critical,
                evidence: json!({
                    "country": country,
                    "window_secs": t.window_secs,
                    "threshold_bytes": t.foreign_egress_bytes,
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

    fn facts(flows: Vec<pb::EgressRow>) -> Facts {
        Facts {
            nodes: vec![
                node("a", "rabat", "MA"),
                node("b", "rabat", "MA"),
                node("out", "paris", "FR"),
            ],
            flows,
            ..Facts::default()
        }
    }

    #[test]
    fn foreign_bytes_over_the_threshold_open_one_breach_per_node_and_country() {
        let p = policy("");
        let f = facts(vec![
            flow("a", 7, "FR", "203.0.113.7", 600),
            flow("a", 8, "FR", "203.0.113.8", 500),
            flow("a", 7, "MA", "192.0.2.1", 90_000),
            flow("b", 9, "FR", "203.0.113.7", 10),
            flow("a", 7, "", "10.0.0.1", 20_000),
        ]);
        let obs = run(&RULE, &p, &f);
        assert_eq!(obs.len(), 1, "{obs:?}");
        assert_eq!(obs[0].node, "a");
        assert_eq!(obs[0].subject, "country:FR");
        assert_eq!(obs[0].severity, Severity::Critical);
        let c = &obs[0].evidence[EVIDENCE_COUNTERS];
        assert_eq!(c["bytes_sent"], 1100);
        assert_eq!(c["destinations"][0]["address"], "203.0.113.7");
        assert_eq!(c["destinations"][0]["pid"], 7);
        assert_eq!(c["destinations"][1]["address"], "203.0.113.8");
    }

    #[test]
    fn allowed_destinations_and_nodes_outside_do_not_count() {
        let p = policy(
            "[[site]]\nname = \"paris\"\ncountry = \"FR\"\n[[allow]]\ncidr = \"198.51.100.0/24\"\nreason = \"backup provider\"\n[[allow]]\ncountry = \"ES\"\nreason = \"sister site\"\n",
        );
        let f = facts(vec![
            flow("a", 1, "DE", "198.51.100.9", 50_000),
            flow("a", 1, "ES", "192.0.2.9", 50_000),
            flow("out", 1, "US", "192.0.2.10", 50_000),
        ]);
        assert!(run(&RULE, &p, &f).is_empty());
    }

    #[test]
    fn evidence_names_the_pod_namespace_and_image_and_a_namespace_may_be_allowed() {
        let in_pod = |pid, ns: &str, pod: &str, image: &str| {
            let mut r = flow("a", pid, "FR", "203.0.113.7", 5_000);
            r.pod_namespace = ns.into();
            r.pod_name = pod.into();
            r.container_name = "server".into();
            r.container_id = format!("{pod}-id");
            r.image = image.into();
            r
        };
        let f = facts(vec![
            in_pod(7, "inference", "web-0", "docker.io/vllm/vllm-openai:v0.6.3"),
            in_pod(8, "backup", "sync-0", "registry.example/mirror/sync:2"),
        ]);
        let obs = run(&RULE, &policy(""), &f);
        assert_eq!(obs.len(), 1, "{obs:?}");
        let d = &obs[0].evidence[EVIDENCE_COUNTERS]["destinations"];
        let web = d
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["pid"] == 7)
            .unwrap();
        assert_eq!(
            (
                &web["namespace"],
                &web["pod"],
                &web["container"],
                &web["image"]
            ),
            (
                &json!("inference"),
                &json!("web-0"),
                &json!("server"),
                &json!("docker.io/vllm/vllm-openai:v0.6.3")
            )
        );
        assert_eq!(web["container_id"], "web-0-id");
        // Allowed for the backup namespace: only the inference pod's 5,000 bytes count.
        let p = policy(
            "[[allow]]\nnamespace = \"backup\"\ncountry = \"FR\"\nreason = \"off-site backup\"\n",
        );
        let obs = run(&RULE, &p, &f);
        assert_eq!(obs[0].evidence[EVIDENCE_COUNTERS]["bytes_sent"], 5_000);
        // Allowed by image for every destination: the mirror's traffic too.
        let p = policy(
            "[[allow]]\nimage = \"registry.example/mirror/*\"\nreason = \"model mirror\"\n[[allow]]\nnamespace = \"inference\"\ncidr = \"203.0.113.0/24\"\nreason = \"CDN\"\n",
        );
        assert!(run(&RULE, &p, &f).is_empty());
    }

    #[test]
    fn countries_the_policy_puts_inside_are_not_foreign() {
        let p = policy("inside = [\"TN\"]\n");
        let f = facts(vec![flow("a", 1, "TN", "192.0.2.9", 50_000)]);
        assert!(run(&RULE, &p, &f).is_empty());
    }
}
