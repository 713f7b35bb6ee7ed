//! `weights-exfiltration` (critical): a process that holds restricted weights open or mapped
//! sent outside the jurisdiction more than `thresholds.exfiltration_fraction` of the size of
//! the restricted weights it holds (all its restricted files summed, so a model in shards is
//! judged whole), over the window. Subject `process:<name>/<pid>`.
//!
//! "Outside" is any destination whose country is not inside, unresolved destinations
//! included (weights that leave for a place nobody can name have still left); destinations
//! covered by an `[[allow]]` entry do not count. A node outside the jurisdiction is judged
//! too: its restricted weights leaving for a third country are still leaving. Resolves after
//! `quiet_secs` without an observation.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sov_proto::pb;

use super::{Context, Rule, policy_quiet_ms, top_destinations};
use crate::breach::{EVIDENCE_COUNTERS, Observation, Severity};

/// Rule name.
pub const WEIGHTS_EXFILTRATION: &str = "weights-exfiltration";

/// The rule.
pub const RULE: Rule = Rule {
    name: WEIGHTS_EXFILTRATION,
    observe,
    quiet_ms: policy_quiet_ms,
};

/// What one process holds.
#[derive(Default)]
struct Held {
    process: String,
    container: Value,
    bytes: u64,
    models: BTreeMap<String, Value>,
}

fn observe(ctx: &Context<'_>) -> Vec<Observation> {
    let fraction = ctx.policy.thresholds.exfiltration_fraction;
    let mut held: BTreeMap<(&str, u32), Held> = BTreeMap::new();
    for m in ctx.restricted() {
        let mut seen = std::collections::BTreeSet::new();
        for u in &m.users {
            if u.pid == 0 || !seen.insert((u.node.as_str(), u.pid)) {
                continue;
            }
            let h = held.entry((u.node.as_str(), u.pid)).or_default();
            h.process.clone_from(&u.process);
            if u.container.is_some() {
                h.container = super::workload_json(u.container.as_ref());
            }
            h.bytes = h.bytes.saturating_add(m.size_bytes);
            h.models.insert(
                m.sha256.clone(),
                json!({"model": m.model, "sha256": m.sha256, "size_bytes": m.size_bytes}),
            );
        }
    }
    let mut out = Vec::new();
    for ((node, pid), h) in held {
        if h.bytes == 0 {
            continue;
        }
        let rows: Vec<&pb::EgressRow> = ctx
            .facts
            .flows
            .iter()
            .filter(|r| {
                r.node == node
                    && r.pid == pid
                    && matches!(
                        ctx.policy.count(r),
                        crate::policy::Counted::Outside(_) | crate::policy::Counted::Unresolved
                    )
                    && !ctx.allowed(r)
            })
            .collect();
        let sent: u64 = rows.iter().map(|r| r.bytes_sent).sum();
        #[allow(clippy::cast_precision_loss)] // byte counts far below 2^52 in practice
        let over = sent as f64 > fraction * h.bytes as f64;
        if !over {
            continue;
        }
        out.push(Observation {
            rule: WEIGHTS_EXFILTRATION.to_owned(),
            node: node.to_owned(),
            subject: format!("process:{}/{pid}", h.process),
            severity: Severity::Critical,
            evidence: json!({
                "process": h.process,
                "pid": pid,
                "container": h.container,
                "restricted_bytes_held": h.bytes,
                "fraction": fraction,
                "window_secs": ctx.window_secs(),
                "models": h.models.into_values().collect::<Vec<_>>(),
                EVIDENCE_COUNTERS: {
                    "bytes_sent": sent,
                    "destinations": top_destinations(&rows),
                },
            }),
            at_unix_ms: ctx.now_unix_ms,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{flow, model, node, policy, run, user};
    use super::*;
    use crate::policy::rules::Facts;

    fn facts(flows: Vec<pb::EgressRow>) -> Facts {
        let mut shard1 = model("acme/secret", "aa", 600, "a", "/m/1");
        let mut shard2 = model("acme/secret", "bb", 400, "a", "/m/2");
        shard1.users = vec![user("a", 7, "/m/1")];
        shard2.users = vec![user("a", 7, "/m/2")];
        let mut public = model("other/open", "cc", 10, "a", "/m/3");
        public.users = vec![user("a", 9, "/m/3")];
        Facts {
            nodes: vec![node("a", "rabat", "MA")],
            models: vec![shard1, shard2, public],
            flows,
            ..Facts::default()
        }
    }

    fn policy_() -> crate::policy::Policy {
        policy(
            "[[model]]\nmatch = \"acme/*\"\nclass = \"restricted\"\n[[allow]]\ncidr = \"198.51.100.0/24\"\nreason = \"escrow\"\n",
        )
    }

    #[test]
    fn a_holder_sending_more_than_the_fraction_of_its_weights_abroad_is_observed() {
        // Holds 1000 restricted bytes in two shards; the fraction is 0.5.
        let obs = run(
            &RULE,
            &policy_(),
            &facts(vec![
                flow("a", 7, "FR", "203.0.113.1", 300),
                flow("a", 7, "", "10.1.1.1", 250),
                flow("a", 7, "MA", "192.0.2.1", 10_000),
                flow("a", 9, "FR", "203.0.113.1", 10_000),
            ]),
        );
        assert_eq!(obs.len(), 1, "{obs:?}");
        assert_eq!(obs[0].subject, "process:proc7/7");
        assert_eq!(obs[0].severity, Severity::Critical);
        assert_eq!(obs[0].evidence["restricted_bytes_held"], 1000);
        assert_eq!(obs[0].evidence[EVIDENCE_COUNTERS]["bytes_sent"], 550);
        assert_eq!(obs[0].evidence["models"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn traffic_inside_allowed_or_under_the_fraction_is_not_exfiltration() {
        let obs = run(
            &RULE,
            &policy_(),
            &facts(vec![
                flow("a", 7, "FR", "203.0.113.1", 499),
                flow("a", 7, "DE", "198.51.100.7", 10_000),
                flow("a", 7, "MA", "192.0.2.1", 10_000),
            ]),
        );
        assert!(obs.is_empty(), "{obs:?}");
    }
}
