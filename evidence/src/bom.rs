//! The observed model inventory as an AI bill of materials: CycloneDX 1.6 JSON, the format
//! supply-chain tools already read (`sovctl bom`, `GET /api/v1/bom`).
//!
//! Each model is a `machine-learning-model` component: its name (repository id, GGUF name,
//! ...), the publisher, the revision as version, its SHA-256 as a hash, its format, size,
//! parameter count and where its identity came from (provenance) as properties, and every
//! observation as evidence: one occurrence per copy (`node:path`) and properties for every
//! copy (node, site, country, path, storage, server, mount point, first and last seen) and
//! every user (node, pid, process, GPUs). The base models it declares are its `pedigree`
//! `ancestors` (with where the claim came from and the publisher's origin). Property names are
//! under `sovereign:`.
//!
//! The document is checked against the official CycloneDX 1.6 JSON schema in
//! `tests/tests/bom.rs` (the schema shipped by the `cyclonedx-python-lib` package).

use ring::digest;
use serde_json::{Value, json};
use sov_proto::pb;

use crate::view::rfc3339;

/// The CycloneDX version written.
pub const SPEC_VERSION: &str = "1.6";
/// Prefix of every property name.
pub const PROPERTY_PREFIX: &str = "sovereign:";

fn prop(name: &str, value: impl ToString) -> Value {
    json!({"name": format!("{PROPERTY_PREFIX}{name}"), "value": value.to_string()})
}

/// `urn:uuid:` of a version 4 form made from `seed` (the same inventory at the same time gives
/// the same serial number).
fn serial_number(seed: &[u8]) -> String {
    let d = digest::digest(&digest::SHA256, seed);
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A reference unique within the document for one model entry.
fn bom_ref(m: &pb::ModelSummary, index: usize) -> String {
    if m.sha256.len() == 64 {
        format!("model:sha256:{}", m.sha256)
    } else {
        format!("model:{index}:{}", m.model)
    }
}

/// One model as a CycloneDX component.
pub fn component(m: &pb::ModelSummary, index: usize) -> Value {
    let mut c = json!({
        "type": "machine-learning-model",
        "bom-ref": bom_ref(m, index),
        "name": if m.model.is_empty() { "unidentified model" } else { m.model.as_str() },
    });
    if !m.publisher.is_empty() {
        c["publisher"] = json!(m.publisher);
    }
    if !m.revision.is_empty() {
        c["version"] = json!(m.revision);
    }
    if m.sha256.len() == 64 && m.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        c["hashes"] = json!([{"alg": "SHA-256", "content": m.sha256}]);
    }
    if !m.base_models.is_empty() {
        // The declared bases as the component's pedigree: each an ancestor component, with
        // where the claim came from and its publisher's origin as properties.
        let ancestors: Vec<Value> = m
            .base_models
            .iter()
            .map(|b| {
                let mut a = json!({"type": "machine-learning-model", "name": b.name});
                if !b.organization.is_empty() {
                    a["publisher"] = json!(b.organization);
                }
                let mut props = vec![prop("lineage_source", &b.source)];
                if !b.origin.is_empty() {
                    props.push(prop("origin", &b.origin));
                }
                if !b.repo_url.is_empty() {
                    props.push(prop("repo_url", &b.repo_url));
                }
                a["properties"] = json!(props);
                a
            })
            .collect();
        c["pedigree"] = json!({"ancestors": ancestors});
    }
    let mut props = vec![
        prop("format", &m.format),
        prop("size_bytes", m.size_bytes),
        prop("identity_source", &m.identity_source),
    ];
    if m.parameter_count > 0 {
        props.push(prop("parameters", m.parameter_count));
    }
    if !m.repo_path.is_empty() {
        props.push(prop("repo_path", &m.repo_path));
    }
    for (i, k) in m.copies.iter().enumerate() {
        let p = |f: &str, v: &dyn ToString| prop(&format!("copy:{i}:{f}"), v.to_string());
        props.push(p("node", &k.node));
        props.push(p("site", &k.site));
        props.push(p(
            "country",
            &if k.country.is_empty() {
                "unplaced".to_owned()
            } else {
                k.country.clone()
            },
        ));
        props.push(p("path", &k.path));
        props.push(p("storage", &k.storage));
        if !k.server.is_empty() {
            props.push(p("server", &k.server));
        }
        if !k.mount_point.is_empty() {
            props.push(p("mount_point", &k.mount_point));
        }
        props.push(p("first_seen", &rfc3339(k.first_seen_unix_ms)));
        props.push(p("last_seen", &rfc3339(k.last_seen_unix_ms)));
    }
    for (i, u) in m.users.iter().enumerate() {
        let p = |f: &str, v: &dyn ToString| prop(&format!("user:{i}:{f}"), v.to_string());
        props.push(p("node", &u.node));
        props.push(p("pid", &u.pid));
        props.push(p("process", &u.process));
        if !u.gpus.is_empty() {
            props.push(p("gpus", &u.gpus.join(" ")));
        }
        if !u.path.is_empty() {
            props.push(p("path", &u.path));
        }
    }
    c["properties"] = Value::Array(props);
    if !m.copies.is_empty() {
        c["evidence"] = json!({
            "occurrences": m.copies.iter().map(|k| json!({
                "location": format!("{}:{}", k.node, k.path),
            })).collect::<Vec<_>>(),
        });
    }
    if !m.format.is_empty() {
        c["modelCard"] = json!({
            "properties": [prop("format", &m.format)],
        });
    }
    c
}

/// The inventory `models` as a CycloneDX 1.6 BOM made at `now_unix_ms` by `tool` `version`.
pub fn cyclonedx(
    models: &[pb::ModelSummary],
    now_unix_ms: i64,
    tool: &str,
    version: &str,
) -> Value {
    let components: Vec<Value> = models
        .iter()
        .enumerate()
        .map(|(i, m)| component(m, i))
        .collect();
    let seed = format!("{now_unix_ms}{}", Value::Array(components.clone()));
    let mut copies = 0usize;
    let mut countries: Vec<&str> = Vec::new();
    for m in models {
        copies += m.copies.len();
        countries.extend(m.copies.iter().map(|c| c.country.as_str()));
    }
    countries.sort_unstable();
    countries.dedup();
    json!({
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": serial_number(seed.as_bytes()),
        "version": 1,
        "metadata": {
            "timestamp": rfc3339(now_unix_ms),
            "tools": {"components": [{
                "type": "application",
                "name": tool,
                "version": version,
            }]},
            "properties": [
                prop("inventory", "model weight files observed on the nodes by sov-agent, as stored by the collector"),
                prop("models", models.len()),
                prop("copies", copies),
                prop("countries", countries.join(" ")),
            ],
        },
        "components": components,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn model() -> pb::ModelSummary {
        pb::ModelSummary {
            model: "meta-llama/Llama-3.1-8B".into(),
            identity_source: "hf-cache".into(),
            format: "safetensors".into(),
            sha256: "c".repeat(64),
            size_bytes: 16,
            parameter_count: 8,
            revision: "abc".into(),
            publisher: "meta-llama".into(),
            copies: vec![pb::ModelCopy {
                node: "n1".into(),
                site: "s".into(),
                country: "".into(),
                path: "/m/x.safetensors".into(),
                storage: "nfs4".into(),
                server: "10.0.0.1".into(),
                ..Default::default()
            }],
            users: vec![pb::ModelUser {
                node: "n1".into(),
                pid: 42,
                process: "vllm".into(),
                gpus: vec!["GPU-0".into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn each_model_is_a_machine_learning_model_with_its_hash_copies_and_users() {
        let bom = cyclonedx(&[model()], 1_700_000_000_000, "sovctl", "0.1.0");
        assert_eq!(bom["specVersion"], "1.6");
        let c = &bom["components"][0];
        assert_eq!(c["type"], "machine-learning-model");
        assert_eq!(c["hashes"][0]["alg"], "SHA-256");
        assert_eq!(c["publisher"], "meta-llama");
        let props = c["properties"].to_string();
        for want in [
            "sovereign:copy:0:server",
            "10.0.0.1",
            "sovereign:user:0:process",
            "vllm",
            "GPU-0",
            "sovereign:parameters",
        ] {
            assert!(props.contains(want), "{want} missing: {props}");
        }
        assert!(
            props.contains("unplaced"),
            "an empty country is said: {props}"
        );
        assert_eq!(
            c["evidence"]["occurrences"][0]["location"],
            "n1:/m/x.safetensors"
        );
        let serial = bom["serialNumber"].as_str().unwrap();
        assert_eq!(serial.len(), "urn:uuid:".len() + 36);
        assert_eq!(&serial[23..24], "4");
    }
}
