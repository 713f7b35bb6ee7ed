//! `training-offshore` (critical): a training run on a node outside the jurisdiction maps or
//! reads base weights that the policy restricts (by model name, publisher or sha256). Subject
//! `run:<run_id>`, one breach per node and run; the evidence names the restricted inputs and
//! the datasets the run reads. Resolves after `quiet_secs` once the run is no longer active
//! in the window (or no longer reads restricted weights).
//!
//! Datasets are named in the evidence but not yet classified: the policy has no dataset
//! classes, so a run outside on an unrestricted base reading a national dataset is not a breach
//! of this rule (the scorecard lists every dataset runs outside read).

use serde_json::json;

use super::{Context, Rule, policy_quiet_ms};
use crate::breach::{Observation, Severity};

/// Rule name.
pub const TRAINING_OFFSHORE: &str = "training-offshore";

/// The rule.
pub const RULE: Rule = Rule {
    name: TRAINING_OFFSHORE,
    observe,
    quiet_ms: policy_quiet_ms,
};

fn observe(ctx: &Context<'_>) -> Vec<Observation> {
    let mut out = Vec::new();
    for s in &ctx.facts.training {
        let Some(run) = &s.run else { continue };
        if run.ended || ctx.node(&s.node).is_none() || ctx.node_inside(&s.node) {
            continue;
        }
        let restricted: Vec<_> = run
            .inputs
            .iter()
            .filter(|i| i.kind == "base-weights")
            .filter(|i| ctx.restricted_name(&i.model, "", &i.sha256))
            .map(|i| json!({"model": i.model, "sha256": i.sha256, "path": i.path}))
            .collect();
        if restricted.is_empty() {
            continue;
        }
        let datasets: Vec<_> = run
            .inputs
            .iter()
            .filter(|i| i.kind == "dataset")
            .map(|i| json!({"path": i.path, "format": i.format, "dataset": i.model}))
            .collect();
        out.push(Observation {
            rule: TRAINING_OFFSHORE.to_owned(),
            node: s.node.clone(),
            subject: format!("run:{}", run.run_id),
            severity: Severity::Critical,
            evidence: json!({
                "node_country": ctx.node_country(&s.node),
                "pid": run.pid,
                "process": run.process,
                "restricted_inputs": restricted,
                "datasets": datasets,
                "outputs": run.outputs.len(),
                "counters": {"gpu_seconds": run.gpu_seconds},
            }),
            at_unix_ms: ctx.now_unix_ms,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{node, policy, run};
    use super::*;
    use crate::policy::rules::Facts;
    use sov_proto::pb;

    fn training(node: &str, id: &str, base: &str) -> pb::TrainingRunSummary {
        pb::TrainingRunSummary {
            node: node.into(),
            run: Some(pb::TrainingRun {
                run_id: id.into(),
                pid: 9,
                process: "python3".into(),
                inputs: vec![
                    pb::TrainingInput {
                        kind: "base-weights".into(),
                        model: base.into(),
                        ..Default::default()
                    },
                    pb::TrainingInput {
                        kind: "dataset".into(),
                        path: "/d/x.parquet".into(),
                        format: "parquet".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_run_outside_on_a_restricted_base_is_observed_and_one_inside_is_not() {
        let p = policy("[[model]]\nmatch = \"acme/*\"\nclass = \"restricted\"\n");
        let f = Facts {
            nodes: vec![node("in", "rabat", "MA"), node("out", "berlin", "DE")],
            training: vec![
                training("out", "r1", "acme/secret"),
                training("in", "r2", "acme/secret"),
                training("out", "r3", "other/open"),
            ],
            ..Facts::default()
        };
        let obs = run(&RULE, &p, &f);
        assert_eq!(obs.len(), 1, "{obs:?}");
        assert_eq!(
            (obs[0].node.as_str(), obs[0].subject.as_str()),
            ("out", "run:r1")
        );
        assert_eq!(
            obs[0].evidence["restricted_inputs"][0]["model"],
            "acme/secret"
        );
        assert_eq!(obs[0].evidence["datasets"][0]["format"], "parquet");
        assert_eq!(obs[0].evidence["node_country"], "DE");
    }

    #[test]
    fn an_ended_run_is_not_observed() {
        let p = policy("[[model]]\nmatch = \"acme/*\"\nclass = \"restricted\"\n");
        let mut t = training("out", "r1", "acme/secret");
        if let Some(r) = t.run.as_mut() {
            r.ended = true;
        }
        let f = Facts {
            nodes: vec![node("out", "berlin", "DE")],
            training: vec![t],
            ..Facts::default()
        };
        assert!(run(&RULE, &p, &f).is_empty());
    }
}
