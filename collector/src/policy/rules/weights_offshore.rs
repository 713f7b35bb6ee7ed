//! `weights-offshore` (critical): a copy of a restricted model resides outside the
//! jurisdiction — on a node whose country is outside, or on network storage whose server
//! geolocates outside. Subject `sha256:<hex>` (or `model:<key>` before the file is hashed),
//! one breach per node and model; the evidence lists every path of it on that node and why
//! each is outside. Resolves after `quiet_secs` once no such copy is reported.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Context, Rule, model_subject, policy_quiet_ms};
use crate::breach::{Observation, Severity};

/// Rule name.
pub const WEIGHTS_OFFSHORE: &str = "weights-offshore";

/// The rule.
pub const RULE: Rule = Rule {
    name: WEIGHTS_OFFSHORE,
    observe,
    quiet_ms: policy_quiet_ms,
};

fn observe(ctx: &Context<'_>) -> Vec<Observation> {
    let mut out = Vec::new();
    for m in ctx.restricted() {
        // node -> the copies outside, each with why.
        let mut per: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for c in &m.copies {
            let node_country = ctx.node_country(&c.node);
            let node_country = if node_country.is_empty() {
                c.country.clone()
            } else {
                node_country
            };
            let server = ctx.facts.servers.get(&c.server);
            let server_outside =
                server.is_some_and(|s| !s.country.is_empty() && !ctx.policy.is_inside(&s.country));
            let node_outside = !ctx.policy.is_inside(&node_country);
            if !node_outside && !server_outside {
                continue;
            }
            per.entry(c.node.as_str()).or_default().push(json!({
                "path": c.path,
                "storage": c.storage,
                "server": c.server,
                "server_country": server.map(|s| s.country.as_str()).unwrap_or(""),
                "node_country": node_country,
                "outside": if node_outside { "node" } else { "storage" },
                "container": super::workload_json(c.container.as_ref()),
                "container_path": c.container_path,
            }));
        }
        for (node, mut copies) in per {
            copies.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
            out.push(Observation {
                rule: WEIGHTS_OFFSHORE.to_owned(),
                node: node.to_owned(),
                subject: model_subject(m),
                severity: Severity::Critical,
                evidence: json!({
                    "model": m.model,
                    "sha256": m.sha256,
                    "publisher": m.publisher,
                    "size_bytes": m.size_bytes,
                    "copies": copies,
                }),
                at_unix_ms: ctx.now_unix_ms,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{model, node, policy, run};
    use super::*;
    use crate::policy::rules::{Facts, Placement};

    const RESTRICT: &str = "[[site]]\nname = \"paris\"\ncountry = \"FR\"\n[[model]]\nmatch = \"acme/*\"\nclass = \"restricted\"\n";

    #[test]
    fn a_restricted_copy_on_a_node_outside_is_observed_and_a_public_one_is_not() {
        let p = policy(RESTRICT);
        let f = Facts {
            nodes: vec![node("in", "rabat", "MA"), node("out", "paris", "MA")],
            models: vec![
                model("acme/secret", "aa", 10, "out", "/models/a.safetensors"),
                model("acme/secret-2", "bb", 10, "in", "/models/b.safetensors"),
                model("other/open", "cc", 10, "out", "/models/c.safetensors"),
            ],
            ..Facts::default()
        };
        let obs = run(&RULE, &p, &f);
        assert_eq!(obs.len(), 1, "{obs:?}");
        assert_eq!(
            obs[0].node, "out",
            "the policy's site country wins over the declared one"
        );
        assert_eq!(obs[0].subject, "sha256:aa");
        assert_eq!(obs[0].severity, Severity::Critical);
        assert_eq!(obs[0].evidence["copies"][0]["outside"], "node");
        assert_eq!(obs[0].evidence["copies"][0]["node_country"], "FR");
    }

    #[test]
    fn a_restricted_copy_on_storage_served_from_abroad_is_observed() {
        let p = policy(RESTRICT);
        let mut m = model("acme/secret", "aa", 10, "in", "/mnt/nfs/a.safetensors");
        m.copies[0].storage = "nfs4".to_owned();
        m.copies[0].server = "198.51.100.4:/export".to_owned();
        let mut servers = BTreeMap::new();
        servers.insert(
            "198.51.100.4:/export".to_owned(),
            Placement {
                address: "198.51.100.4".to_owned(),
                country: "DE".to_owned(),
                source: "override:198.51.100.0/24".to_owned(),
            },
        );
        let f = Facts {
            nodes: vec![node("in", "rabat", "MA")],
            models: vec![m],
            servers,
            ..Facts::default()
        };
        let obs = run(&RULE, &p, &f);
        assert_eq!(obs.len(), 1, "{obs:?}");
        assert_eq!(obs[0].evidence["copies"][0]["outside"], "storage");
        assert_eq!(obs[0].evidence["copies"][0]["server_country"], "DE");
    }

    #[test]
    fn a_copy_in_an_image_of_a_restricted_image_rule_names_its_pod_and_image() {
        // The model is unclassified by name; the image rule restricts it where it is.
        let p = policy(
            "[[site]]\nname = \"paris\"\ncountry = \"FR\"\n[[model]]\nmatch = \"image:registry.example/llm/*\"\nclass = \"restricted\"\n",
        );
        let mut m = model(
            "anything",
            "aa",
            10,
            "out",
            "/var/lib/containerd/x/model.safetensors",
        );
        m.copies[0].container = Some(sov_proto::pb::ContainerRef {
            id: "abc".into(),
            image: "registry.example/llm/vllm:1".into(),
            pod_name: "web-0".into(),
            pod_namespace: "inference".into(),
            container_name: "server".into(),
            ..Default::default()
        });
        m.copies[0].container_path = "/models/model.safetensors".into();
        let f = Facts {
            nodes: vec![node("out", "paris", "MA")],
            models: vec![
                m,
                model("anything", "bb", 10, "out", "/models/b.safetensors"),
            ],
            ..Facts::default()
        };
        let obs = run(&RULE, &p, &f);
        assert_eq!(obs.len(), 1, "only the copy in the image: {obs:?}");
        let c = &obs[0].evidence["copies"][0];
        assert_eq!(c["container"]["pod"], "web-0");
        assert_eq!(c["container"]["namespace"], "inference");
        assert_eq!(c["container"]["image"], "registry.example/llm/vllm:1");
        assert_eq!(c["container_path"], "/models/model.safetensors");
    }
}
