//! Where each model's weights reside: real files in real layouts (a Hugging Face cache with
//! symlinked snapshots, Ollama stores of both layouts, a plain directory, a hostile file),
//! found once each, identified, fingerprinted (checked against sha256sum), their users seen,
//! and the whole inventory answered by the collector through `sovctl models`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use sov_agent::collect::weights::inventory::{WeightsHandle, WeightsScanner};
use sov_agent::config::WeightsConfig;
use sov_e2e::{InProcessCollector, KillOnDrop, Pki, agent_config, eventually, sha256sum};
use sov_proto::pb;

const REV: &str = "0123456789abcdef0123456789abcdef01234567";

fn safetensors_bytes(seed: u8) -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let a: Vec<u8> = (0..4096u32).map(|i| (i as u8).wrapping_add(seed)).collect();
    let b: Vec<u8> = vec![seed; 512];
    let tensors = vec![
        (
            "embed.weight",
            TensorView::new(Dtype::F32, vec![32, 32], &a).unwrap(),
        ),
        (
            "norm.weight",
            TensorView::new(Dtype::F16, vec![256], &b).unwrap(),
        ),
    ];
    let meta: HashMap<String, String> = [("format".to_owned(), "pt".to_owned())].into();
    safetensors::serialize(tensors, Some(meta)).unwrap()
}

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A small valid GGUF v3 file: `general.name`, `general.organization`, one F32 tensor [16, 16].
fn gguf_bytes(name: &str) -> Vec<u8> {
    gguf_with(&[("general.name", name), ("general.organization", "Acme")])
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn field_bytes(out: &mut Vec<u8>, tag: u8, data: &[u8]) {
    out.push(tag);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// An ONNX ModelProto: ir_version 8, opset 16, one initializer [64, 32] with raw data.
fn onnx_bytes() -> Vec<u8> {
    let mut tensor = Vec::new();
    for d in [64u64, 32] {
        tensor.push(0x08);
        varint(&mut tensor, d);
    }
    tensor.push(0x10);
    varint(&mut tensor, 1);
    field_bytes(&mut tensor, 0x42, b"w");
    field_bytes(&mut tensor, 0x4a, &vec![1u8; 64 * 32 * 4]);
    let mut graph = Vec::new();
    field_bytes(&mut graph, 0x2a, &tensor);
    let mut opset = Vec::new();
    opset.push(0x10);
    varint(&mut opset, 16);
    let mut model = vec![0x08];
    varint(&mut model, 8);
    field_bytes(&mut model, 0x12, b"sov-test");
    field_bytes(&mut model, 0x3a, &graph);
    field_bytes(&mut model, 0x42, &opset);
    model
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// The tree under `root`; returns the roots to configure.
fn build_tree(root: &Path) -> Vec<PathBuf> {
    // Hugging Face cache: two shards as blobs, reached through snapshot symlinks.
    let hub = root.join("hf/hub");
    let repo = hub.join("models--acme--tiny-llm");
    let (s1, s2) = (safetensors_bytes(1), safetensors_bytes(2));
    let blob1 = format!("{:0>64}", "b1");
    let blob2 = format!("{:0>64}", "b2");
    write(&repo.join("blobs").join(&blob1), &s1);
    write(&repo.join("blobs").join(&blob2), &s2);
    write(&repo.join("refs/main"), REV.as_bytes());
    let snap = repo.join("snapshots").join(REV);
    std::fs::create_dir_all(&snap).unwrap();
    std::os::unix::fs::symlink(
        format!("../../blobs/{blob1}"),
        snap.join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        format!("../../blobs/{blob2}"),
        snap.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    write(&snap.join("config.json"), &[b'{'; 2048]);

    // Ollama, classic layout.
    let ollama = root.join("ollama/models");
    let g1 = gguf_bytes("TinyLlama");
    let d1 = sha256_of(&g1);
    write(&ollama.join(format!("blobs/sha256-{d1}")), &g1);
    let manifest = format!(
        r#"{{"schemaVersion":2,"layers":[{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{d1}","size":{}}}]}}"#,
        g1.len()
    );
    write(
        &ollama.join("manifests/registry.ollama.ai/library/tinyllama/1b"),
        manifest.as_bytes(),
    );

    // Ollama, newer layout.
    let ollama2 = root.join("ollama2/models");
    let g2 = gguf_bytes("Phi");
    let d2 = sha256_of(&g2);
    write(&ollama2.join(format!("blobs/sha256-{d2}")), &g2);
    let manifest2 = format!(
        r#"{{"schemaVersion":2,"layers":[{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{d2}","size":{}}}]}}"#,
        g2.len()
    );
    write(
        &ollama2.join("manifests-v2/registry.ollama.ai/library/phi/mini"),
        manifest2.as_bytes(),
    );

    // A plain directory: ONNX, a hard link to a HF blob, a text file, a hostile GGUF.
    let plain = root.join("plain");
    write(&plain.join("vad/model.onnx"), &onnx_bytes());
    std::fs::hard_link(
        repo.join("blobs").join(&blob1),
        plain.join("copy-of-shard1.safetensors"),
    )
    .unwrap();
    write(&plain.join("notes/readme.txt"), &[b'x'; 4096]);
    let mut hostile = b"GGUF".to_vec();
    hostile.extend_from_slice(&3u32.to_le_bytes());
    hostile.extend_from_slice(&u64::MAX.to_le_bytes());
    hostile.extend_from_slice(&(1u64 << 62).to_le_bytes());
    hostile.extend(std::iter::repeat_n(0xffu8, 4096));
    write(&plain.join("evil/model.gguf"), &hostile);
    vec![hub, ollama, ollama2, plain]
}

/// sha256 of bytes, computed by coreutils (Ollama names blobs by it).
fn sha256_of(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn config(roots: Vec<PathBuf>) -> WeightsConfig {
    WeightsConfig {
        roots: Some(roots),
        hash_rate_mb_per_sec: 0,
        scan_interval_secs: 1,
        ..Default::default()
    }
}

fn by_model(files: &[pb::WeightFile]) -> HashMap<String, Vec<&pb::WeightFile>> {
    let mut m: HashMap<String, Vec<&pb::WeightFile>> = HashMap::new();
    for f in files {
        m.entry(f.identity.clone().unwrap_or_default().model)
            .or_default()
            .push(f);
    }
    m
}

/// A python process that maps `path` read-only and waits; killed on drop.
fn map_in_child(path: &Path) -> KillOnDrop {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg("import mmap,sys,time; f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ); print('ready',flush=True); time.sleep(60)")
        .arg(path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    KillOnDrop(child)
}

#[test]
fn every_weight_file_is_found_once_identified_fingerprinted_and_its_users_seen() {
    let dir = tempfile::tempdir().unwrap();
    let roots = build_tree(dir.path());
    let state = tempfile::tempdir().unwrap();
    let handle = WeightsHandle::default();
    let mut scanner = WeightsScanner::new(config(roots), state.path(), handle.clone());
    scanner.scan();
    scanner.refresh_users();
    scanner.hash_pending(&AtomicBool::new(false), &mut |_, _, _| {});
    let files = handle.files();

    // One entry per physical file: 2 HF shards (the hard link is an alias), 2 GGUF, 1 ONNX.
    let inodes: std::collections::HashSet<(u64, u64)> =
        files.iter().map(|f| (f.device, f.inode)).collect();
    assert_eq!(
        files.len(),
        5,
        "{:#?}",
        files.iter().map(|f| &f.path).collect::<Vec<_>>()
    );
    assert_eq!(inodes.len(), 5);
    let models = by_model(&files);

    let hf = &models["acme/tiny-llm"];
    assert_eq!(hf.len(), 2);
    for f in hf {
        let id = f.identity.clone().unwrap();
        assert_eq!(
            (id.revision.as_str(), id.source.as_str()),
            (REV, "hf-cache")
        );
        assert_eq!(id.refs, vec!["main".to_owned()]);
        assert!(id.repo_path.starts_with("model-0000"), "{id:?}");
        assert_eq!(f.format, pb::WeightFormat::Safetensors as i32);
        assert_eq!(f.tensor_count, 2);
        assert_eq!(f.parameter_count, 32 * 32 + 256);
        assert_eq!(f.shard_count, 2);
        assert!(
            f.path.contains("/snapshots/"),
            "reported through its snapshot path: {}",
            f.path
        );
    }
    assert!(
        hf.iter().any(|f| f
            .aliases
            .iter()
            .any(|a| a.ends_with("copy-of-shard1.safetensors"))),
        "the hard link is an alias of the shard, not a second copy"
    );
    let tiny = &models["tinyllama:1b"][0];
    assert_eq!(tiny.identity.clone().unwrap().source, "ollama-manifest");
    assert_eq!(tiny.format, pb::WeightFormat::Gguf as i32);
    assert_eq!(tiny.parameter_count, 256);
    assert_eq!(
        models["phi:mini"][0].identity.clone().unwrap().source,
        "ollama-manifest"
    );
    let onnx = files
        .iter()
        .find(|f| f.format == pb::WeightFormat::Onnx as i32)
        .unwrap();
    assert_eq!(onnx.parameter_count, 64 * 32);
    assert_eq!(onnx.identity.clone().unwrap().source, "directory");

    // Fingerprints agree with sha256sum; storage is located.
    for f in &files {
        assert_eq!(f.sha256, sha256sum(Path::new(&f.path)), "{}", f.path);
        assert!(!f.storage.clone().unwrap().fs_type.is_empty(), "{}", f.path);
    }
    // The hostile file is refused, by path, without a crash.
    let errors = handle.errors();
    assert!(
        errors.iter().any(|(p, _)| p.ends_with("evil/model.gguf")),
        "{errors:?}"
    );

    // A process mapping a shard is reported as its user, with its pid; gone when it exits.
    let target = PathBuf::from(&hf[0].path);
    let target_ino = std::fs::metadata(&target).unwrap().ino();
    let mut child = map_in_child(&target);
    let pid = child.0.id();
    scanner.refresh_users();
    let files = handle.files();
    let used = files.iter().find(|f| f.inode == target_ino).unwrap();
    let user = used
        .users
        .iter()
        .find(|u| u.pid == pid)
        .expect("the mapping process is a user");
    assert!(user.mapped && user.open, "{user:?}");
    assert!(user.process.starts_with("python"), "{user:?}");
    assert_eq!(handle.user_pids(), vec![pid]);
    child.kill9();
    scanner.refresh_users();
    assert!(handle.user_pids().is_empty());

    // A rescan with nothing changed changes nothing.
    let before = handle.files();
    scanner.scan();
    assert_eq!(handle.files(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_answers_where_each_models_copies_are() {
    let tree = tempfile::tempdir().unwrap();
    let roots = build_tree(tree.path());
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |_| {}).await;
    let url = collector.url();
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(
        &pki,
        "node-w",
        vec![url.clone()],
        &spool.path().join("spool"),
    );
    cfg.weights = config(roots.clone());
    let agent = sov_agent::Agent::open(cfg).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));

    let tls = pki.client_tls(sov_collector::auth::Role::Regulator, "alice");
    let channel = tls.connect(&url).await.unwrap();
    let mut q = pb::query_client::QueryClient::new(channel);
    let models = eventually(
        Duration::from_secs(40),
        "five hashed weight files at the collector",
        || {
            let mut q = q.clone();
            async move {
                let m = sovctl::fetch_models(&mut q, "").await.ok()?;
                (m.len() == 5 && m.iter().all(|m| !m.sha256.is_empty())).then_some(m)
            }
        },
    )
    .await;
    let tiny = models.iter().find(|m| m.model == "tinyllama:1b").unwrap();
    assert_eq!(tiny.copies.len(), 1);
    let copy = &tiny.copies[0];
    assert_eq!(
        (
            copy.node.as_str(),
            copy.site.as_str(),
            copy.country.as_str()
        ),
        ("node-w", "rabat-1", "MA")
    );
    assert!(
        copy.path.contains("ollama/models/blobs/sha256-"),
        "{copy:?}"
    );
    assert_eq!(copy.storage, "local");
    // Lookup by sha256 finds exactly that model.
    let by_sha = sovctl::fetch_models(&mut q, &tiny.sha256).await.unwrap();
    assert_eq!(by_sha.len(), 1);
    assert_eq!(by_sha[0].model, "tinyllama:1b");

    // Removing a file reaches the collector within a scan interval.
    let onnx = roots[3].join("vad/model.onnx");
    std::fs::remove_file(&onnx).unwrap();
    eventually(
        Duration::from_secs(30),
        "the removed ONNX file gone from the collector",
        || {
            let mut q = q.clone();
            async move {
                let m = sovctl::fetch_models(&mut q, "").await.ok()?;
                (m.len() == 4).then_some(())
            }
        },
    )
    .await;
    stop.cancel();
    task.await.unwrap().unwrap();
    collector.stop().await;
}

/// A GGUF v3 file with `strings` as its string metadata and one F32 tensor [16, 16].
fn gguf_with(strings: &[(&str, &str)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&1u64.to_le_bytes()); // tensors
    out.extend_from_slice(&(strings.len() as u64).to_le_bytes());
    for (k, v) in strings {
        gguf_string(&mut out, k);
        out.extend_from_slice(&8u32.to_le_bytes()); // string
        gguf_string(&mut out, v);
    }
    gguf_string(&mut out, "blk.0.weight");
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&16u64.to_le_bytes());
    out.extend_from_slice(&16u64.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // F32
    out.extend_from_slice(&0u64.to_le_bytes()); // offset
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(std::iter::repeat_n(7u8, 16 * 16 * 4));
    out
}

#[test]
fn an_incomplete_file_is_listed_with_its_identity_and_split_shards_are_one_model() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    // A download in progress: the header is whole, half the tensor data is there.
    let whole = gguf_bytes("Partial Llama");
    write(
        &root.join("partial/llama-q4.gguf"),
        &whole[..whole.len() - 100],
    );
    // llama.cpp splits: general.name in the first split only.
    let split = root.join("big");
    write(
        &split.join("Big-Q4_K_M-00001-of-00003.gguf"),
        &gguf_with(&[
            ("general.name", "Acme Big 70B"),
            ("general.organization", "Acme"),
        ]),
    );
    for i in 2..=3 {
        write(
            &split.join(format!("Big-Q4_K_M-0000{i}-of-00003.gguf")),
            &gguf_with(&[]),
        );
    }
    // Sharded safetensors beside their index.
    let st = root.join("acme-7b");
    write(
        &st.join("model-00001-of-00002.safetensors"),
        &safetensors_bytes(1),
    );
    write(
        &st.join("model-00002-of-00002.safetensors"),
        &safetensors_bytes(2),
    );
    write(
        &st.join("model.safetensors.index.json"),
        br#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
    );

    let state = tempfile::tempdir().unwrap();
    let handle = WeightsHandle::default();
    let mut scanner = WeightsScanner::new(config(vec![root.clone()]), state.path(), handle.clone());
    scanner.scan();
    scanner.hash_pending(&AtomicBool::new(false), &mut |_, _, _| {});
    let files = handle.files();
    assert!(handle.errors().is_empty(), "{:?}", handle.errors());

    let partial = files
        .iter()
        .find(|f| f.path.ends_with("partial/llama-q4.gguf"))
        .expect("an incomplete file is listed, not dropped");
    assert!(partial.incomplete, "{partial:#?}");
    assert_eq!(partial.declared_size_bytes, whole.len() as u64);
    assert_eq!(partial.size_bytes, whole.len() as u64 - 100);
    let id = partial.identity.clone().unwrap();
    assert_eq!(
        (id.model.as_str(), id.source.as_str()),
        ("Partial Llama", "gguf-metadata")
    );
    assert!(
        partial.sha256.is_empty(),
        "not fingerprinted while incomplete"
    );

    let shards: Vec<&pb::WeightFile> = files.iter().filter(|f| f.path.contains("/big/")).collect();
    assert_eq!(shards.len(), 3);
    let set = &shards[0].shard_set;
    assert!(set.ends_with("big/Big-Q4_K_M"), "{set}");
    let mut indexes: Vec<u32> = shards.iter().map(|f| f.shard_index).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, vec![1, 2, 3]);
    for f in &shards {
        assert_eq!(&f.shard_set, set, "one set");
        assert_eq!(f.shard_count, 3);
        assert!(!f.incomplete);
        let id = f.identity.clone().unwrap();
        assert_eq!(
            (id.model.as_str(), id.publisher.as_str()),
            ("Acme Big 70B", "Acme"),
            "every split carries the model's name: {}",
            f.path
        );
    }
    let st_shards: Vec<&pb::WeightFile> = files
        .iter()
        .filter(|f| f.path.contains("/acme-7b/"))
        .collect();
    assert_eq!(st_shards.len(), 2, "the index file is not a weight file");
    assert_eq!(st_shards[0].shard_set, st_shards[1].shard_set);
    assert!(
        st_shards
            .iter()
            .all(|f| f.shard_count == 2 && f.identity.clone().unwrap().model == "acme-7b")
    );
}

#[test]
fn adapters_and_gguf_files_carry_the_bases_they_declare_and_splits_share_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    let adapter = root.join("croissant-lora");
    write(
        &adapter.join("adapter_config.json"),
        br#"{"base_model_name_or_path": "mistralai/Mistral-7B-v0.1", "peft_type": "LORA", "r": 16}"#,
    );
    write(
        &adapter.join("adapter_model.safetensors"),
        &safetensors_bytes(3),
    );
    let split = root.join("tuned");
    write(
        &split.join("Tuned-Q4_K_M-00001-of-00002.gguf"),
        &gguf_with(&[
            ("general.name", "Tuned 7B"),
            ("general.base_model.count", "1"),
            ("general.base_model.0.name", "Mistral 7B v0.1"),
            (
                "general.base_model.0.repo_url",
                "https://hub.example/mistralai/Mistral-7B-v0.1",
            ),
        ]),
    );
    write(
        &split.join("Tuned-Q4_K_M-00002-of-00002.gguf"),
        &gguf_with(&[]),
    );

    let state = tempfile::tempdir().unwrap();
    let handle = WeightsHandle::default();
    let mut scanner = WeightsScanner::new(config(vec![root.clone()]), state.path(), handle.clone());
    scanner.scan();
    let files = handle.files();
    assert!(handle.errors().is_empty(), "{:?}", handle.errors());

    let lora = files
        .iter()
        .find(|f| f.path.ends_with("croissant-lora/adapter_model.safetensors"))
        .unwrap();
    let id = lora.identity.clone().unwrap();
    assert_eq!(id.adapter_type, "LORA");
    assert_eq!(id.base_models.len(), 1, "{id:?}");
    let b = &id.base_models[0];
    assert_eq!(
        (b.name.as_str(), b.organization.as_str(), b.source.as_str()),
        ("mistralai/Mistral-7B-v0.1", "mistralai", "adapter-config")
    );

    let splits: Vec<&pb::WeightFile> = files
        .iter()
        .filter(|f| f.path.contains("/tuned/"))
        .collect();
    assert_eq!(splits.len(), 2);
    for f in splits {
        let id = f.identity.clone().unwrap();
        assert_eq!(id.adapter_type, "", "a full model is no adapter");
        let bases: Vec<(&str, &str, &str)> = id
            .base_models
            .iter()
            .map(|b| (b.name.as_str(), b.repo_url.as_str(), b.source.as_str()))
            .collect();
        assert_eq!(
            bases,
            vec![(
                "mistralai/Mistral-7B-v0.1",
                "https://hub.example/mistralai/Mistral-7B-v0.1",
                "gguf-metadata"
            )],
            "every split carries the base the first declares: {}",
            f.path
        );
    }
}
