//! `restricted-derivative` (critical): a model derived from a base the policy restricts — a
//! base its files declare (PEFT adapter, GGUF `general.base_model.*`, ...) or one a training
//! run was observed mapping while writing it — resides on, or is loaded by a process on, a node
//! outside the jurisdiction. Subject `sha256:<hex>` (or `model:<key>`), one breach per node and
//! model; the evidence names the restricted bases and how the lineage is known. Resolves after
//! `quiet_secs` once no copy or user of it is outside.

use std::collections::BTreeSet;

use serde_json::json;

use super::{Context, Rule, model_subject, policy_quiet_ms};
use crate::breach::{Observation, Severity};
use crate::policy::ModelClass;

/// Rule name.
pub const RESTRICTED_DERIVATIVE: &str = "restricted-derivative";

/// The rule.
pub const RULE: Rule = Rule {
    name: RESTRICTED_DERIVATIVE,
    observe,
    quiet_ms: policy_quiet_ms,
};

fn observe(ctx: &Context<'_>) -> Vec<Observation> {
    let mut out = Vec::new();
    for m in &ctx.facts.models {
        // A restricted model itself is weights-offshore's business.
        if ctx.class(m) == ModelClass::Restricted {
            continue;
        }
        let bases: Vec<_> = m
            .base_models
            .iter()
            .filter(|b| ctx.restricted_name(&b.name, &b.organization, ""))
            .map(|b| json!({"name": b.name, "source": b.source, "origin": b.origin}))
            .collect();
        if bases.is_empty() {
            continue;
        }
        let nodes: BTreeSet<&str> = m
            .copies
            .iter()
            .map(|c| c.node.as_str())
            .chain(m.users.iter().map(|u| u.node.as_str()))
            .filter(|n| ctx.node(n).is_some() && !ctx.node_inside(n))
            .collect();
        for node in nodes {
            let paths: Vec<&str> = m
                .copies
                .iter()
                .filter(|c| c.node == node)
                .map(|c| c.path.as_str())
                .collect();
            let processes: Vec<_> = m
                .users
                .iter()
                .filter(|u| u.node == node)
                .map(|u| json!({"pid": u.pid, "process": u.process, "gpus": u.gpus}))
                .collect();
            out.push(Observation {
                rule: RESTRICTED_DERIVATIVE.to_owned(),
                node: node.to_owned(),
                subject: model_subject(m),
                severity: Severity::Critical,
                evidence: json!({
                    "model": m.model,
                    "sha256": m.sha256,
                    "adapter_type": m.adapter_type,
                    "derived_from_run": m.derived_from_run,
                    "restricted_bases": bases,
                    "node_country": ctx.node_country(node),
                    "paths": paths,
                    "processes": processes,
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
    use sov_proto::pb;

    fn derived(name: &str, sha: &str, node: &str, base: &str) -> pb::ModelSummary {
        let mut m = model(name, sha, 10, node, "/m/x");
        m.adapter_type = "LORA".into();
        m.base_models = vec![pb::ModelBase {
            name: base.into(),
            source: "adapter-config".into(),
            ..Default::default()
        }];
        m
    }

    #[test]
    fn a_derivative_of_a_restricted_base_outside_is_observed_where_it_resides_or_runs() {
        let p = policy("[[model]]\nmatch = \"acme/*\"\nclass = \"restricted\"\n");
        let mut lora = derived("team/lora", "aa", "out", "acme/secret");
        lora.users = vec![user("out2", 5, "/m/x")];
        let f = Facts {
            nodes: vec![
                node("in", "rabat", "MA"),
                node("out", "berlin", "DE"),
                node("out2", "paris", "FR"),
            ],
            models: vec![
                lora,
                derived("team/inside", "bb", "in", "acme/secret"),
                derived("team/free", "cc", "out", "other/open"),
            ],
            ..Facts::default()
        };
        let obs = run(&RULE, &p, &f);
        let got: Vec<(&str, &str)> = obs
            .iter()
            .map(|o| (o.node.as_str(), o.subject.as_str()))
            .collect();
        assert_eq!(got, vec![("out", "sha256:aa"), ("out2", "sha256:aa")]);
        assert_eq!(
            obs[0].evidence["restricted_bases"][0]["name"],
            "acme/secret"
        );
        assert_eq!(obs[1].evidence["processes"][0]["pid"], 5);
    }

    #[test]
    fn a_restricted_model_itself_is_left_to_weights_offshore() {
        let p = policy("[[model]]\nmatch = \"acme/*\"\nclass = \"restricted\"\n");
        let f = Facts {
            nodes: vec![node("out", "berlin", "DE")],
            models: vec![derived("acme/other", "aa", "out", "acme/secret")],
            ..Facts::default()
        };
        assert!(run(&RULE, &p, &f).is_empty());
    }
}
