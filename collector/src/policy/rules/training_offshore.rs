//! `training-offshore` (critical): a training run on a node outside the jurisdiction maps or
//! reads base weights that the policy restricts (`[[model]]`: by model name, publisher or
//! sha256), or reads a dataset file the policy restricts (`[[dataset]]`: by dataset id, path,
//! file name or sha256). Subject `run:<run_id>`, one breach per node and run; the evidence names
//! the restricted inputs (each with its `kind` and the rule that restricts it) and every dataset
//! the run reads with its class.
//!
//! Lifecycle: observed at each evaluation while the run is listed in the window
//! (`thresholds.window_secs`, by its last activity or its agent's last report of it) and not
//! ended; an agent reports a run ended once its process exits. The breach resolves after
//! `quiet_secs` without an observation: the process exited, its agent stopped reporting it for a
//! window, or it no longer reads anything restricted (the policy changed).

use serde_json::json;

use super::{Context, Rule, policy_quiet_ms};
use crate::breach::{Observation, Severity};
use crate::policy::{DatasetFacts, ModelClass, ModelFacts};

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
        let mut restricted = Vec::new();
        let mut datasets = Vec::new();
        for i in &run.inputs {
            match i.kind.as_str() {
                "base-weights" => {
                    let (class, rule) = ctx.policy.model_class(&ModelFacts {
                        model: &i.model,
                        sha256: &i.sha256,
                        ..Default::default()
                    });
                    if class == ModelClass::Restricted {
                        restricted.push(json!({
                            "kind": i.kind, "model": i.model, "sha256": i.sha256,
                            "path": i.path, "rule": rule.map(|r| format!("model[{r}]")),
                        }));
                    }
                }
                "dataset" => {
                    let (class, rule) = ctx.policy.dataset_class(&DatasetFacts {
                        path: &i.path,
                        sha256: &i.sha256,
                        repo: &i.model,
                    });
                    let rule = rule.map(|r| format!("dataset[{r}]"));
                    if class == ModelClass::Restricted {
                        restricted.push(json!({
                            "kind": i.kind, "dataset": i.model, "sha256": i.sha256,
                            "path": i.path, "format": i.format, "rule": rule,
                        }));
                    }
                    datasets.push(json!({
                        "path": i.path, "format": i.format, "dataset": i.model,
                        "sha256": i.sha256, "size_bytes": i.size_bytes, "class": class.as_str(),
                    }));
                }
                _ => {}
            }
        }
        if restricted.is_empty() {
            continue;
        }
        out.push(Observation {
            rule: TRAINING_OFFSHORE.to_owned(),
            node: s.node.clone(),
            subject: format!("run:{}", run.run_id),
            severity: Severity::Critical,
            evidence: json!({
                "node_country": ctx.node_country(&s.node),
                "pid": run.pid,
                "process": run.process,
                "container": super::workload_json(run.container.as_ref()),
                "restricted_inputs": restricted,
                "datasets": datasets,
                // A run writes checkpoints all along: their count is volatile (no log record,
                // no alert for each).
                "counters": {"gpu_seconds": run.gpu_seconds, "outputs": run.outputs.len()},
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
    fn a_run_outside_reading_a_restricted_dataset_is_observed_whatever_its_base() {
        let p = policy(
            "[[dataset]]\nmatch = \"name:darija-*\"\nclass = \"restricted\"\n[[dataset]]\nmatch = \"/d/*\"\nclass = \"public\"\n",
        );
        let mut t = training("out", "r1", "other/open");
        if let Some(r) = t.run.as_mut() {
            r.inputs[1].path = "/d/darija-train.parquet".into();
        }
        let f = Facts {
            nodes: vec![node("out", "berlin", "DE")],
            training: vec![t, training("out", "r2", "other/open")],
            ..Facts::default()
        };
        let obs = run(&RULE, &p, &f);
        assert_eq!(obs.len(), 1, "{obs:?}");
        assert_eq!(obs[0].subject, "run:r1");
        let r = &obs[0].evidence["restricted_inputs"][0];
        assert_eq!(
            (r["kind"].as_str(), r["path"].as_str(), r["rule"].as_str()),
            (
                Some("dataset"),
                Some("/d/darija-train.parquet"),
                Some("dataset[0]")
            )
        );
        assert_eq!(obs[0].evidence["datasets"][0]["class"], "restricted");
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
