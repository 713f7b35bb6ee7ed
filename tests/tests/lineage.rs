//! Lineage end to end: a real agent finds real files a test wrote (a PEFT adapter directory, a
//! GGUF file declaring its base), the collector stores what they declare, and `sovctl models`
//! shows each base with its publisher's origin.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sov_collector::auth::Role;
use sov_e2e::{InProcessCollector, Pki, agent_config, eventually, sovctl};
use sov_proto::pb;

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A real safetensors file (the safetensors crate) with one F32 tensor.
fn safetensors_bytes() -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let data = vec![1u8; 4 * 64 * 16];
    let meta: HashMap<String, String> = [("format".to_owned(), "pt".to_owned())].into();
    safetensors::serialize(
        [(
            "lora_A.weight",
            TensorView::new(Dtype::F32, vec![64, 16], &data).unwrap(),
        )],
        Some(meta),
    )
    .unwrap()
}

/// A GGUF v3 file with string metadata and one F32 tensor [16, 16].
fn gguf_with(strings: &[(&str, &str)]) -> Vec<u8> {
    let s = |out: &mut Vec<u8>, v: &str| {
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&1u64.to_le_bytes());
    out.extend_from_slice(&(strings.len() as u64).to_le_bytes());
    for (k, v) in strings {
        s(&mut out, k);
        out.extend_from_slice(&8u32.to_le_bytes());
        s(&mut out, v);
    }
    s(&mut out, "blk.0.weight");
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&16u64.to_le_bytes());
    out.extend_from_slice(&16u64.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(std::iter::repeat_n(7u8, 16 * 16 * 4));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sovctl_models_shows_the_base_an_adapter_and_a_gguf_file_declare_with_its_origin() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path().join("models");
    let adapter = root.join("darija-lora");
    write(
        &adapter.join("adapter_config.json"),
        br#"{"base_model_name_or_path": "mistralai/Mistral-7B-v0.1", "peft_type": "LORA", "r": 16}"#,
    );
    write(
        &adapter.join("adapter_model.safetensors"),
        &safetensors_bytes(),
    );
    write(
        &root.join("gguf/tuned.Q4_K_M.gguf"),
        &gguf_with(&[
            ("general.name", "Atlas Tuned 8B"),
            ("general.base_model.count", "1"),
            ("general.base_model.0.name", "Llama 3.1 8B"),
            (
                "general.base_model.0.repo_url",
                "https://hub.example/meta-llama/Llama-3.1-8B",
            ),
        ]),
    );

    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |_| {}).await;
    let url = collector.url();
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(
        &pki,
        "node-l",
        vec![url.clone()],
        &spool.path().join("spool"),
    );
    cfg.weights = sov_e2e::weights_of_roots_only(vec![root.clone()]);
    let agent = sov_agent::Agent::open(cfg).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));

    let tls = pki.client_tls(Role::Regulator, "alice");
    let channel = tls.connect(&url).await.unwrap();
    let q = pb::query_client::QueryClient::new(channel);
    eventually(
        Duration::from_secs(40),
        "both files hashed at the collector",
        || {
            let mut q = q.clone();
            async move {
                let m = sovctl::fetch_models(&mut q, "").await.ok()?;
                let hashed = |name: &str| m.iter().any(|x| x.model == name && !x.sha256.is_empty());
                (hashed("darija-lora") && hashed("Atlas Tuned 8B")).then_some(())
            }
        },
    )
    .await;

    let reg = pki.client(Role::Regulator, "alice");
    let out =
        tokio::task::block_in_place(|| sovctl(&pki, &reg, &url, &["--output", "json", "models"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let models: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let find = |name: &str| {
        models
            .iter()
            .find(|m| m["model"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {models:#?}"))
    };
    let lora = find("darija-lora");
    assert_eq!(lora["adapter_type"], "LORA");
    let base = &lora["base_models"][0];
    assert_eq!(base["name"], "mistralai/Mistral-7B-v0.1");
    assert_eq!(base["source"], "adapter-config");
    assert_eq!(base["origin"], "FR", "{lora:#}");

    let tuned = find("Atlas Tuned 8B");
    assert_eq!(tuned["adapter_type"], "");
    let base = &tuned["base_models"][0];
    assert_eq!(base["name"], "meta-llama/Llama-3.1-8B");
    assert_eq!(
        base["repo_url"],
        "https://hub.example/meta-llama/Llama-3.1-8B"
    );
    assert_eq!(base["source"], "gguf-metadata");
    assert_eq!(base["origin"], "US");

    // The table shows the base and its origin in one column.
    let out =
        tokio::task::block_in_place(|| sovctl(&pki, &reg, &url, &["--output", "csv", "models"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().next().unwrap().ends_with(",base_models"),
        "{text}"
    );
    assert!(text.contains("mistralai/Mistral-7B-v0.1 (FR)"), "{text}");

    stop.cancel();
    task.await.unwrap().unwrap();
    collector.stop().await;
}
