//! `compute-offshore` (critical): a restricted model is loaded — open or memory-mapped, on a
//! GPU or on CPUs — by a process on a node outside the jurisdiction. Subject `sha256:<hex>`
//! (or `model:<key>`), one breach per node and model; the evidence lists the processes and
//! their GPUs. Resolves after `quiet_secs` once no process on that node holds it.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Context, Rule, model_subject, policy_quiet_ms};
use crate::breach::{Observation, Severity};

/// Rule name.
pub const COMPUTE_OFFSHORE: &str = "compute-offshore";

/// The rule.
pub const RULE: Rule = Rule {
    name: COMPUTE_OFFSHORE,
    observe,
    quiet_ms: policy_quiet_ms,
};

fn observe(ctx: &Context<'_>) -> Vec<Observation> {
    let mut out = Vec::new();
    for m in ctx.restricted() {
        let mut per: BTreeMap<&str, BTreeMap<u32, Value>> = BTreeMap::new();
        for u in &m.users {
            if ctx.node_inside(&u.node) || ctx.node(&u.node).is_none() {
                continue;
            }
            per.entry(u.node.as_str()).or_default().insert(
                u.pid,
                json!({"pid": u.pid, "process": u.process, "gpus": u.gpus,
                       "container": super::workload_json(u.container.as_ref())}),
            );
        }
        for (node, processes) in per {
            let on_gpu = processes
                .values()
                .any(|p| p["gpus"].as_array().is_some_and(|g| !g.is_empty()));
            out.push(Observation {
                rule: COMPUTE_OFFSHORE.to_owned(),
                node: node.to_owned(),
                subject: model_subject(m),
                severity: Severity::Critical,
                evidence: json!({
                    "model": m.model,
                    "sha256": m.sha256,
                    "node_country": ctx.node_country(node),
                    "on_gpu": on_gpu,
                    "processes": processes.into_values().collect::<Vec<_>>(),
                }),
                at_unix_ms: ctx.now_unix_ms,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{model, node, policy, run, user};
    use super::*;
    use crate::policy::rules::Facts;

    #[test]
    fn a_restricted_model_loaded_on_a_node_outside_is_observed_with_its_processes() {
        let p = policy("[[model]]\nmatch = \"acme/*\"\nclass = \"restricted\"\n");
        let mut secret = model("acme/secret", "aa", 10, "out", "/m/a");
        let mut on_gpu = user("out", 42, "/m/a");
        on_gpu.gpus = vec!["GPU-1".to_owned()];
        secret.users = vec![on_gpu, user("in", 7, "/m/a")];
        let mut public = model("other/open", "bb", 10, "out", "/m/b");
        public.users = vec![user("out", 43, "/m/b")];
        let f = Facts {
            nodes: vec![node("in", "rabat", "MA"), node("out", "berlin", "DE")],
            models: vec![secret, public],
            ..Facts::default()
        };
        let obs = run(&RULE, &p, &f);
        assert_eq!(obs.len(), 1, "{obs:?}");
        assert_eq!(obs[0].node, "out");
        assert_eq!(obs[0].subject, "sha256:aa");
        assert_eq!(obs[0].evidence["on_gpu"], true);
        assert_eq!(obs[0].evidence["processes"][0]["pid"], 42);
        assert_eq!(obs[0].evidence["node_country"], "DE");
    }

    #[test]
    fn a_model_held_by_no_process_is_not_compute() {
        let p = policy("[[model]]\nmatch = \"acme/*\"\nclass = \"restricted\"\n");
        let f = Facts {
            nodes: vec![node("out", "berlin", "DE")],
            models: vec![model("acme/secret", "aa", 10, "out", "/m/a")],
            ..Facts::default()
        };
        assert!(run(&RULE, &p, &f).is_empty());
    }
}
