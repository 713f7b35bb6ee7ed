//! The AI bill of materials (`sovctl bom`, `GET /api/v1/bom`) validates against the official
//! CycloneDX 1.6 JSON schema, the one shipped by the `cyclonedx-python-lib` package (its strict
//! validator, with the SPDX and JSF schemas it references). `.ci/run` installs the package and
//! sets `SOV_REQUIRE_CYCLONEDX=1`; elsewhere the test skips loudly without it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

use serde_json::Value;
use sov_collector::auth::Role;
use sov_e2e::{
    InProcessCollector, Pki, free_port, https_get, llama_weight_file, present_or_skip, push_client,
    report, sovctl,
};
use sov_proto::pb;

/// Validate with the package's strict CycloneDX 1.6 validator: prints nothing when valid,
/// else the first error's message and where it is.
const VALIDATE: &str = r#"
import sys
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
err = JsonStrictValidator(SchemaVersion.V1_6).validate_str(open(sys.argv[1]).read())
if err is not None:
    d = err.data
    print(getattr(d, "message", d), "at", list(getattr(d, "absolute_path", [])))
    sys.exit(1)
"#;

/// Whether the validator can run here.
fn validator() -> bool {
    Command::new("python3")
        .args([
            "-c",
            "import cyclonedx.validation.json, jsonschema, referencing",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Validate `bom`; the validator's message when it is not valid.
fn validate(bom: &Value) -> Result<(), String> {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bom.to_string()).unwrap();
    let out = Command::new("python3")
        .args(["-c", VALIDATE, file.path().to_str().unwrap()])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

async fn seed(pki: &Pki, url: &str) {
    let mut r = report("gpu-node-1", 1, 1);
    r.observed_unix_ms = sov_common::clock::now_unix_ms() - 60_000;
    r.weight_inventory_full = true;
    let mut llama = llama_weight_file();
    llama.parameter_count = 8_030_261_248;
    if let Some(id) = llama.identity.as_mut() {
        id.revision = "0e9e39f249a16976918f6564b8830bc894c89659".into();
        id.base_models = vec![pb::BaseModel {
            name: "mistralai/Mistral-7B-v0.1".into(),
            organization: "mistralai".into(),
            source: "config-json".into(),
            ..Default::default()
        }];
    }
    r.weight_files = vec![
        llama,
        // Not hashed yet, no identity: still a component, without a hash.
        pb::WeightFile {
            path: "/srv/models/unknown.gguf".into(),
            format: pb::WeightFormat::Gguf as i32,
            size_bytes: 4_000_000,
            ..Default::default()
        },
    ];
    let mut c = push_client(&pki.client_tls(Role::Agent, "gpu-node-1"), url)
        .await
        .unwrap();
    c.push(r).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ai_bom_of_the_api_and_of_sovctl_validates_against_the_cyclonedx_1_6_schema() {
    if !present_or_skip(
        validator(),
        "SOV_REQUIRE_CYCLONEDX",
        "bom (CycloneDX 1.6 schema)",
        "python3 cannot import cyclonedx-python-lib: pip install 'cyclonedx-python-lib[json-validation]'",
    ) {
        return;
    }
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.http.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    })
    .await;
    seed(&pki, &collector.url()).await;
    let addr = collector.config.http.listen.unwrap();
    let reg = pki.client(Role::Regulator, "analyst");

    let reply = https_get(&pki, addr, Some(&reg), None, "/api/v1/bom")
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let bom = reply.json();
    validate(&bom)
        .unwrap_or_else(|e| panic!("the API's BOM is not valid CycloneDX 1.6: {e}\n{bom:#}"));
    let components = bom["components"].as_array().unwrap();
    assert_eq!(components.len(), 2, "{bom:#}");
    let llama = components
        .iter()
        .find(|c| c["name"] == "meta-llama/Llama-3.1-8B")
        .unwrap();
    assert_eq!(llama["type"], "machine-learning-model");
    assert_eq!(llama["hashes"][0]["content"], "c".repeat(64));
    let props = llama["properties"].to_string();
    for want in [
        "gpu-node-1",
        "rabat-1",
        "\"MA\"",
        "vllm",
        "8030261248",
        "hf-cache",
    ] {
        assert!(props.contains(want), "{want} missing from {props}");
    }

    // The declared base is the component's pedigree, with its publisher's origin.
    let ancestor = &llama["pedigree"]["ancestors"][0];
    assert_eq!(ancestor["name"], "mistralai/Mistral-7B-v0.1");
    let aprops = ancestor["properties"].to_string();
    assert!(
        aprops.contains("\"FR\"") && aprops.contains("config-json"),
        "{aprops}"
    );

    // A BOM that breaks the schema is refused by the same validator: the check can fail.
    let mut broken = bom.clone();
    broken["components"][0]["type"] = "model".into();
    assert!(validate(&broken).is_err());

    // sovctl bom prints the same inventory, valid too.
    let out = sovctl(&pki, &reg, &collector.url(), &["bom"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    validate(&printed).unwrap_or_else(|e| panic!("sovctl's BOM is not valid: {e}"));
    assert_eq!(printed["components"].as_array().unwrap().len(), 2);
    collector.stop().await;
}
