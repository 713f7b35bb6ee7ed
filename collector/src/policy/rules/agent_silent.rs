//! `agent-silent` (warning): a node whose last report is older than
//! `thresholds.silence_secs` — a blind spot is a breach. Subject `silence`.
//!
//! A silent node is observed at every evaluation; once it reports again it is no longer
//! observed and the breach resolves after [`silent_quiet_ms`] (two evaluation periods), not
//! after `quiet_secs`: the node is back, there is nothing to wait for.

use serde_json::json;

use super::{Context, EVAL_EVERY, Rule, secs_to_ms};
use crate::breach::{EVIDENCE_COUNTERS, Observation, Severity};
use crate::policy::Policy;

/// Rule name.
pub const AGENT_SILENT: &str = "agent-silent";

/// The rule.
pub const RULE: Rule = Rule {
    name: AGENT_SILENT,
    observe,
    quiet_ms: silent_quiet_ms,
};

/// An agent-silent breach resolves when it has not been observed for this long (two
/// evaluation periods): the node reported again.
pub fn silent_quiet_ms(_policy: &Policy) -> i64 {
    i64::try_from(EVAL_EVERY.as_millis() * 2).unwrap_or(i64::MAX)
}

fn observe(ctx: &Context<'_>) -> Vec<Observation> {
    let limit_ms = secs_to_ms(ctx.policy.thresholds.silence_secs);
    ctx.facts
        .nodes
        .iter()
        .filter(|n| ctx.now_unix_ms.saturating_sub(n.last_seen_unix_ms) > limit_ms)
        .map(|n| Observation {
            rule: AGENT_SILENT.to_owned(),
            node: n.node.clone(),
            subject: "silence".to_owned(),
            severity: Severity::Warning,
            evidence: json!({
                "last_seen": sov_evidence::view::rfc3339(n.last_seen_unix_ms),
                "silence_secs": ctx.policy.thresholds.silence_secs,
                EVIDENCE_COUNTERS: {
                    "silent_secs": ctx.now_unix_ms.saturating_sub(n.last_seen_unix_ms) / 1000,
                },
            }),
            at_unix_ms: ctx.now_unix_ms,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{NOW, node, policy, run};
    use super::*;
    use crate::policy::rules::Facts;

    #[test]
    fn only_nodes_silent_longer_than_the_threshold_are_observed() {
        let p = policy("");
        let mut fresh = node("fresh", "s", "MA");
        fresh.last_seen_unix_ms = NOW - 29_000;
        let mut silent = node("silent", "s", "MA");
        silent.last_seen_unix_ms = NOW - 31_000;
        let facts = Facts {
            nodes: vec![fresh, silent],
            ..Facts::default()
        };
        let obs = run(&RULE, &p, &facts);
        assert_eq!(obs.len(), 1);
        assert_eq!(obs[0].node, "silent");
        assert_eq!(obs[0].rule, AGENT_SILENT);
        assert_eq!(obs[0].severity, Severity::Warning);
        assert_eq!(obs[0].evidence[EVIDENCE_COUNTERS]["silent_secs"], 31);
        assert!(silent_quiet_ms(&p) >= 2 * i64::try_from(EVAL_EVERY.as_millis()).unwrap_or(0));
    }
}
