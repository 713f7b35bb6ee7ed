//! Nobody on a node can blind the monitor: each attack a hostile user of a node could mount
//! with files and processes, tried against real agents, a real collector, real files.
//!
//! - a pickle that declares more elements than 2^63-1: the node keeps reporting (the agent
//!   clamps the count and names the clamp), the file is listed;
//! - 24 safetensors files with the largest metadata the parser keeps, beside a restricted
//!   model, on a collector with a small report limit: every file arrives (bounded per file,
//!   packed into several reports, the first refusal trimmed and sent again), the restricted
//!   model's breach opens, no report is lost;
//! - a 1 TB sparse safetensors file and four large files being hashed: a restricted model copied
//!   in afterwards is found and fingerprinted before them, and the agent's reads stay within
//!   its hash rate;
//! - the collector's restricted-model hints put a large restricted file before small ones; a
//!   file being hashed is one entry with its progress;
//! - a `sov-agent scan` hashing a file is not listed as a user of it;
//! - two damaged records in the spool's segment files cost exactly two seqs;
//! - a second agent on the same spool directory refuses to start, naming the first one's pid.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use sov_agent::collect::weights::inventory::{WeightsHandle, WeightsScanner};
use sov_agent::collect::weights::schedule::Hint;
use sov_agent::config::{AgentConfig, WeightsConfig};
use sov_collector::auth::Role;
use sov_e2e::{
    AgentProcess, InProcessCollector, KillOnDrop, Pki, Progress, agent_config, agent_stall,
    await_last_seq, eventually, node, sha256sum, while_progressing,
};
use sov_proto::pb;
use tokio_util::sync::CancellationToken;

const POLICY: &str = r#"
jurisdiction = "MA"

[[site]]
name = "rabat"
country = "MA"

[[site]]
name = "paris"
country = "FR"

[[model]]
match = "acme/*"
class = "restricted"

[thresholds]
quiet_secs = 3600
"#;

/// A safetensors header (8-byte length + JSON, padded to 8) for one U8 tensor of `data_len`
/// bytes, with `metadata`.
fn safetensors_header(data_len: u64, metadata: &[(String, String)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    }
    header.insert(
        "weight".into(),
        serde_json::json!({"dtype": "U8", "shape": [data_len], "data_offsets": [0, data_len]}),
    );
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !(json.len() + 8).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out
}

/// A complete small safetensors file whose data bytes depend on `seed`.
fn safetensors_file(path: &Path, seed: u8, data_len: usize, metadata: &[(String, String)]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut bytes = safetensors_header(data_len as u64, metadata);
    bytes.extend((0..data_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    std::fs::write(path, bytes).unwrap();
}

/// The header and data length of a one-tensor safetensors file of exactly `total` bytes.
fn header_filling(total: u64) -> (Vec<u8>, u64) {
    let mut data_len = total - 128;
    loop {
        let header = safetensors_header(data_len, &[]);
        let fits = total - header.len() as u64;
        if fits == data_len {
            return (header, data_len);
        }
        data_len = fits;
    }
}

/// A safetensors file of `total` bytes whose data is allocated but never written
/// (`fallocate`): reading it costs what reading a real file costs, it is not sparse.
fn allocated_safetensors(path: &Path, total: u64) {
    let (header, data_len) = header_filling(total);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, &header).unwrap();
    let status = Command::new("fallocate")
        .args(["-o", &header.len().to_string(), "-l", &data_len.to_string()])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "fallocate {}", path.display());
}

/// A Hugging Face cache entry `models--{org}--{name}` with one safetensors blob; returns the
/// snapshot path.
fn hf_model(hub: &Path, org: &str, name: &str, seed: u8, data_len: usize) -> PathBuf {
    let mut bytes = safetensors_header(data_len as u64, &[]);
    bytes.extend((0..data_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    sov_e2e::hf_cache_model(hub, org, name, &format!("{seed:0>64}"), &bytes)
}

fn weights_cfg(roots: Vec<PathBuf>, rate_mb: u64) -> WeightsConfig {
    WeightsConfig {
        roots: Some(roots),
        scan_interval_secs: 1,
        hash_rate_mb_per_sec: rate_mb,
        ..Default::default()
    }
}

fn start_agent(agent: sov_agent::Agent) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        agent.run(s).await.unwrap();
    });
    (stop, task)
}

async fn query(pki: &Pki, url: &str) -> pb::query_client::QueryClient<tonic::transport::Channel> {
    let tls = pki.client_tls(Role::Regulator, "analyst");
    pb::query_client::QueryClient::new(tls.connect(url).await.unwrap())
}

/// Every copy the collector lists: (path, sha256, parameter_count).
async fn copies(
    q: &mut pb::query_client::QueryClient<tonic::transport::Channel>,
) -> Vec<(String, String, u64)> {
    let Ok(models) = sovctl::fetch_models(q, "").await else {
        return vec![];
    };
    models
        .iter()
        .flat_map(|m| {
            m.copies
                .iter()
                .map(|c| (c.path.clone(), m.sha256.clone(), m.parameter_count))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------

/// A bare pickled state dict (as `torch.save` writes `data.pkl`) with two storages whose
/// declared element counts are each 2^63-1: together more than any signed 64-bit column holds.
fn hostile_pickle() -> Vec<u8> {
    const LONG1_I64_MAX: &[u8] = b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f";
    let mut p: Vec<u8> = Vec::new();
    p.extend_from_slice(b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(");
    for (name, key, dtype) in [
        ("fc.weight", "94001", "FloatStorage"),
        ("fc.bias", "94002", "HalfStorage"),
    ] {
        p.push(b'X');
        p.extend((name.len() as u32).to_le_bytes());
        p.extend(name.as_bytes());
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage");
        p.extend_from_slice(format!("ctorch\n{dtype}\n").as_bytes());
        p.push(b'X');
        p.extend((key.len() as u32).to_le_bytes());
        p.extend(key.as_bytes());
        p.extend_from_slice(b"X\x03\x00\x00\x00cpu");
        p.extend_from_slice(LONG1_I64_MAX);
        p.extend_from_slice(b"tQK\x00K\x01\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR");
    }
    p.extend_from_slice(b"u.");
    // Raw bytes after the pickle, as a checkpoint has; and enough of them to be a candidate.
    p.extend(std::iter::repeat_n(0u8, 4096));
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pickle_declaring_more_elements_than_a_signed_64_bit_count_does_not_stop_the_node() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("models");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("evil.bin"), hostile_pickle()).unwrap();
    safetensors_file(&root.join("good.safetensors"), 1, 4096, &[]);
    let collector = InProcessCollector::start(&pki, &work.path().join("data"), |_| {}).await;
    let url = collector.url();
    let mut cfg = agent_config(
        &pki,
        "node-p",
        vec![url.clone()],
        &work.path().join("spool"),
    );
    cfg.weights = weights_cfg(vec![root.clone()], 0);
    let stall = agent_stall(&cfg);
    let (stop, task) = start_agent(sov_agent::Agent::open(cfg).unwrap());

    let mut q = query(&pki, &url).await;
    let evil = root.join("evil.bin").display().to_string();
    let listed = while_progressing(stall, "the hostile pickle listed at the collector", || {
        let mut q = q.clone();
        let evil = evil.clone();
        let url = url.clone();
        let pki = &pki;
        async move {
            let c = copies(&mut q).await;
            match c.iter().find(|(p, _, _)| *p == evil) {
                Some(found) => Progress::Done(found.clone()),
                None => Progress::At(node(pki, &url, "node-p").await.map(|n| n.last_seq)),
            }
        }
    })
    .await;
    assert_eq!(
        listed.2,
        i64::MAX as u64,
        "the declared count, clamped to what the wire carries"
    );
    // The node keeps reporting: more reports after the file was stored, none missing.
    let at = node(&pki, &url, "node-p").await.unwrap().last_seq;
    let n = await_last_seq(&pki, &url, "node-p", at + 3, stall).await;
    assert_eq!(n.missing, 0, "{n:?}");
    assert_eq!(n.reports, n.last_seq, "{n:?}");
    let c = copies(&mut q).await;
    assert!(
        c.iter().any(|(p, _, _)| p.ends_with("good.safetensors")),
        "{c:?}"
    );
    stop.cancel();
    task.await.unwrap();
    collector.stop().await;
}

// ---------------------------------------------------------------------------------------------

/// The largest metadata the parsers keep: 256 entries, 256-byte keys, 4096-byte values.
fn maximal_metadata(seed: usize) -> Vec<(String, String)> {
    (0..256)
        .map(|i| {
            (
                format!("{seed:03}-{i:03}-{}", "k".repeat(248)),
                format!("{seed}-{i}-{}", "v".repeat(4090)),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_with_maximal_metadata_cannot_push_a_restricted_model_out_of_the_reports() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("models");
    for i in 0..24 {
        safetensors_file(
            &root.join(format!("big/{i:02}.safetensors")),
            i as u8,
            2048,
            &maximal_metadata(i),
        );
    }
    let restricted = hf_model(&root.join("hub"), "acme", "secret", 99, 8192);
    let policy = work.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let p = policy.clone();
    // A small report limit: the 25 files, even bounded to 64 KiB each, need several reports.
    let collector = InProcessCollector::start(&pki, &work.path().join("data"), move |c| {
        c.policy = Some(p);
        c.max_report_bytes = 160 * 1024;
    })
    .await;
    let url = collector.url();
    let mut cfg = agent_config(
        &pki,
        "node-paris",
        vec![url.clone()],
        &work.path().join("spool"),
    );
    cfg.node.site = "paris".into();
    cfg.weights = weights_cfg(vec![root.clone()], 0);
    let stall = agent_stall(&cfg);
    let agent = sov_agent::Agent::open(cfg).unwrap();
    let (stop, task) = start_agent(agent.clone());

    let q = query(&pki, &url).await;
    let want: BTreeSet<String> = (0..24)
        .map(|i| {
            root.join(format!("big/{i:02}.safetensors"))
                .display()
                .to_string()
        })
        .chain([restricted.display().to_string()])
        .collect();
    while_progressing(stall, "all 25 files at the collector", || {
        let mut q = q.clone();
        let want = &want;
        async move {
            let have: BTreeSet<String> = copies(&mut q).await.into_iter().map(|c| c.0).collect();
            if want.is_subset(&have) {
                Progress::Done(())
            } else {
                Progress::At(want.intersection(&have).count())
            }
        }
    })
    .await;
    // The restricted model is where the policy says it must not be: its breach opens.
    let breach = while_progressing(stall, "weights-offshore for acme/secret", || {
        let mut q = q.clone();
        async move {
            let all = q
                .list_breaches(pb::ListBreachesRequest {
                    limit: 100,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().breaches)
                .unwrap_or_default();
            match all
                .into_iter()
                .find(|b| b.rule == "weights-offshore" && b.node == "node-paris")
            {
                Some(b) => Progress::Done(b),
                None => Progress::At(()),
            }
        }
    })
    .await;
    assert_eq!(breach.state, "open", "{breach:?}");
    // The first report was refused as too large and sent again trimmed; the files it left out
    // went out in later reports; nothing was lost.
    let metrics = agent.render_metrics();
    let trimmed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sov_agent_reports_trimmed_total "))
        .unwrap();
    assert_ne!(
        trimmed, "0",
        "the oversized first report was trimmed:\n{metrics}"
    );
    let n = node(&pki, &url, "node-paris").await.unwrap();
    assert_eq!((n.missing, n.conflicts), (0, 0), "{n:?}");
    assert!(n.reports >= 3, "the inventory took several reports: {n:?}");
    stop.cancel();
    task.await.unwrap();
    collector.stop().await;
}

// ---------------------------------------------------------------------------------------------

/// Bytes this process has read (`rchar` of `/proc/<pid>/io`).
fn rchar(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sparse_terabyte_and_large_files_do_not_delay_a_restricted_model_copied_in_later() {
    const RATE_MB: u64 = 10;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("models");
    // 1 TB that occupies a few KB: its holes read as zeros.
    let sparse = root.join("huge.safetensors");
    let (header, data_len) = header_filling(1 << 40);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(&sparse, &header).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&sparse)
        .unwrap();
    f.set_len(header.len() as u64 + data_len).unwrap();
    drop(f);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&sparse).unwrap()) * 512
            < 1 << 20,
        "sparse"
    );
    // Four large files, 1 GiB together: 100 s at the hash rate.
    let big: Vec<PathBuf> = (0..4)
        .map(|i| root.join(format!("big-{i}.safetensors")))
        .collect();
    for b in &big {
        allocated_safetensors(b, 256 << 20);
    }
    let collector = InProcessCollector::start(&pki, &work.path().join("data"), |_| {}).await;
    let url = collector.url();
    let mut cfg = agent_config(
        &pki,
        "node-s",
        vec![url.clone()],
        &work.path().join("spool"),
    );
    cfg.weights = weights_cfg(vec![root.clone()], RATE_MB);
    let stall = agent_stall(&cfg);
    let cfg_path = work.path().join("agent.toml");
    sov_e2e::write_agent_toml(&cfg, &cfg_path);
    let log = work.path().join("agent.log");
    let mut agent = AgentProcess::start(&cfg_path, &log);
    let q = query(&pki, &url).await;

    // The agent found the five files and is hashing.
    while_progressing(stall, "the five files listed", || {
        let mut q = q.clone();
        async move {
            let c = copies(&mut q).await;
            if c.len() >= 5 {
                Progress::Done(())
            } else {
                Progress::At(c.len())
            }
        }
    })
    .await;
    let (read_from, since) = (rchar(agent.pid()), Instant::now());

    // A restricted model is copied in now.
    let restricted = hf_model(&root.join("hub"), "acme", "secret", 7, 64 * 1024);
    let want_sha = sha256sum(&restricted);
    let path = restricted.display().to_string();
    let seen = while_progressing(stall, "the restricted copy fingerprinted", || {
        let mut q = q.clone();
        let path = path.clone();
        async move {
            let c = copies(&mut q).await;
            match c.iter().find(|(p, s, _)| *p == path && !s.is_empty()) {
                Some(_) => Progress::Done(c),
                None => Progress::At(c.iter().filter(|(_, s, _)| !s.is_empty()).count()),
            }
        }
    })
    .await;
    let elapsed = since.elapsed();
    let read = rchar(agent.pid()) - read_from;
    let sha_of = |p: &Path| {
        seen.iter()
            .find(|(c, _, _)| *c == p.display().to_string())
            .map(|c| c.1.clone())
            .unwrap_or_default()
    };
    assert_eq!(sha_of(&restricted), want_sha);
    assert!(sha_of(&sparse).is_empty(), "the sparse file is last");
    let big_done = big.iter().filter(|b| !sha_of(b).is_empty()).count();
    assert!(
        big_done <= 1,
        "the restricted copy waited behind {big_done} large files"
    );
    // The budget held: what the agent read stays within its hash rate (one second of burst,
    // and 1 MiB a second plus 32 MiB for everything else it reads, /proc included).
    let secs = elapsed.as_secs() + 2;
    let allowed = RATE_MB * 1_000_000 * secs + (1 << 20) * secs + (32 << 20);
    assert!(
        read <= allowed,
        "read {read} bytes in {elapsed:?} at {RATE_MB} MB/s (allowed {allowed})"
    );
    assert!(agent.is_running(), "see {}", log.display());
    agent.kill9();
    collector.stop().await;
}

// ---------------------------------------------------------------------------------------------

#[test]
fn restricted_hints_put_a_large_restricted_file_first_and_a_half_hashed_file_is_one_entry_with_progress()
 {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path().join("models");
    for i in 0..3 {
        safetensors_file(&root.join(format!("small-{i}.safetensors")), i, 4096, &[]);
    }
    let restricted = hf_model(&root.join("hub"), "acme", "secret", 9, 0);
    // Make the restricted blob large (allocated, not sparse): 96 MiB.
    let blob = std::fs::canonicalize(&restricted).unwrap();
    std::fs::remove_file(&blob).unwrap();
    allocated_safetensors(&blob, 96 << 20);
    let state = tempfile::tempdir().unwrap();
    let handle = WeightsHandle::default();
    // 16 MB/s: a 5-second slice is 80 MB, less than the restricted file.
    let mut scanner = WeightsScanner::new(
        weights_cfg(vec![root.clone()], 16),
        state.path(),
        handle.clone(),
    );
    scanner.scan();
    handle.set_hints(Hint::from_ack(&[pb::RestrictedModelHint {
        r#match: "acme/*".into(),
    }]));
    let cancel = AtomicBool::new(false);
    let mut order: Vec<String> = Vec::new();
    // One turn that ends before the restricted file is done.
    let left = scanner.hash_until(
        Some(Instant::now() + Duration::from_secs(3)),
        &cancel,
        &mut |path, _, _| {
            if order.last().is_none_or(|p| p != path) {
                order.push(path.to_owned());
            }
        },
    );
    assert!(left, "work left after the turn");
    assert_eq!(
        order,
        [restricted.display().to_string()],
        "the restricted file went first, before three small ones"
    );
    let files = handle.files();
    let entries: Vec<&pb::WeightFile> = files
        .iter()
        .filter(|f| f.path == restricted.display().to_string())
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "one entry per file, whatever its progress"
    );
    let pct = entries[0]
        .hashing_percent
        .expect("progress shown while hashing");
    assert!(pct < 100, "{pct}");
    assert!(entries[0].sha256.is_empty());
    assert!(
        files
            .iter()
            .filter(|f| f.path.contains("small-"))
            .all(|f| f.sha256.is_empty())
    );
    // The next turns finish it (from where it stopped) and the small ones.
    scanner.hash_until(None, &cancel, &mut |_, _, _| {});
    let files = handle.files();
    let done = files
        .iter()
        .find(|f| f.path == restricted.display().to_string())
        .unwrap();
    assert_eq!(done.sha256, sha256sum(&blob));
    assert_eq!(done.hashing_percent, None);
    // Only this test's files: the scanner also finds, through the processes that hold them,
    // files of the other tests running in this process (process-side discovery), which may be
    // deleted before they are hashed.
    let unhashed: Vec<_> = files
        .iter()
        .filter(|f| f.path.starts_with(&root.display().to_string()) && f.sha256.is_empty())
        .collect();
    assert!(unhashed.is_empty(), "not fingerprinted: {unhashed:#?}");
}

// ---------------------------------------------------------------------------------------------

/// Pids listed as users of `path` at the collector.
async fn users_of(
    q: &mut pb::query_client::QueryClient<tonic::transport::Channel>,
    sha_or_empty: &str,
) -> Vec<(u32, String)> {
    let Ok(models) = sovctl::fetch_models(q, sha_or_empty).await else {
        return vec![];
    };
    models
        .iter()
        .flat_map(|m| m.users.iter().map(|u| (u.pid, u.process.clone())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scan_hashing_a_file_is_never_listed_as_its_user() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("models");
    let file = root.join("model.safetensors");
    allocated_safetensors(&file, 64 << 20);
    let collector = InProcessCollector::start(&pki, &work.path().join("data"), |_| {}).await;
    let url = collector.url();
    let mut cfg = agent_config(
        &pki,
        "node-u",
        vec![url.clone()],
        &work.path().join("spool"),
    );
    cfg.weights = weights_cfg(vec![root.clone()], 0);
    let stall = agent_stall(&cfg);
    let cfg_path = work.path().join("agent.toml");
    sov_e2e::write_agent_toml(&cfg, &cfg_path);
    let _agent = AgentProcess::start(&cfg_path, &work.path().join("agent.log"));

    // `scan` (same executable as the agent) hashing the file slowly, with its own state dir.
    let mut scan_cfg: AgentConfig = cfg.clone();
    scan_cfg.weights = weights_cfg(vec![root.clone()], 2);
    scan_cfg.weights.state_dir = Some(work.path().join("scan-state"));
    let scan_path = work.path().join("scan.toml");
    sov_e2e::write_agent_toml(&scan_cfg, &scan_path);
    let text = std::fs::read_to_string(&scan_path).unwrap()
        + &format!("state_dir = {:?}\n", work.path().join("scan-state"));
    std::fs::write(&scan_path, text).unwrap();
    let scan = KillOnDrop(
        Command::new(sov_e2e::bin_path("e2e-agent"))
            .args(["scan", "--config"])
            .arg(&scan_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // A process that is a real user, as a control: it holds the file open.
    let mut holder = KillOnDrop(
        Command::new("sh")
            .args(["-c", "exec 3<\"$1\"; echo ready; exec sleep 600", "sh"])
            .arg(&file)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(holder.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let scan_pid = scan.0.id();
    let holds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == file))
        })
    };
    eventually(stall, "scan holding the file open", || async {
        holds(scan_pid).then_some(())
    })
    .await;

    let q = query(&pki, &url).await;
    let holder_pid = holder.0.id();
    let users = while_progressing(stall, "the holder listed as a user", || {
        let mut q = q.clone();
        async move {
            let u = users_of(&mut q, "").await;
            if u.iter().any(|(p, _)| *p == holder_pid) {
                Progress::Done(u)
            } else {
                Progress::At(u.len())
            }
        }
    })
    .await;
    assert!(
        holds(scan_pid),
        "scan still hashing when the users were taken"
    );
    assert!(
        users.iter().all(|(p, _)| *p != scan_pid),
        "sov-agent scan (pid {scan_pid}) listed as a user: {users:?}"
    );
    collector.stop().await;
}

// ---------------------------------------------------------------------------------------------

/// (seq, offset of the payload) of every record of a spool segment file.
fn records(path: &Path) -> Vec<(u64, usize)> {
    let data = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 16 <= data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        let seq = u64::from_le_bytes(data[pos + 8..pos + 16].try_into().unwrap());
        out.push((seq, pos + 16));
        pos += 16 + len;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_damaged_spool_records_cost_exactly_two_seqs() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let port = sov_e2e::free_port();
    let url = format!("https://127.0.0.1:{port}");
    // The smallest spool (64 KiB, in 8 KiB segments) and reports of a few KiB, so that the
    // damage lands in different segment files and nothing is dropped for space.
    let mut cfg = agent_config(
        &pki,
        "node-d",
        vec![url.clone()],
        &work.path().join("spool"),
    );
    cfg.max_spool_bytes = sov_agent::config::MIN_SPOOL_BYTES;
    cfg.node.labels.insert("pad".into(), "x".repeat(1000));
    let stall = agent_stall(&cfg);
    let cfg_path = work.path().join("agent.toml");
    sov_e2e::write_agent_toml(&cfg, &cfg_path);
    // No collector yet: the agent spools.
    let log = work.path().join("agent.log");
    let mut agent = AgentProcess::start(&cfg_path, &log);
    let spool = work.path().join("spool");
    let segments = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&spool)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.retain(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"));
        v.sort();
        v
    };
    let spooled = || segments().iter().map(|s| records(s).len()).sum::<usize>();
    while_progressing(stall, "six reports spooled in two segments", || {
        let exited = agent.exit_status();
        let log = &log;
        async move {
            assert!(
                exited.is_none(),
                "the agent exited ({exited:?}); see {}",
                log.display()
            );
            if spooled() >= 6 && segments().len() >= 2 {
                Progress::Done(())
            } else {
                Progress::At(spooled())
            }
        }
    })
    .await;
    agent.kill9();
    let state = std::fs::read_to_string(spool.join("state.json")).unwrap();
    assert!(
        state.contains("\"pending_gaps\": []"),
        "nothing dropped for space: {state}"
    );
    // Damage one record in the first segment and one in the last.
    let segs = segments();
    let (first, last) = (records(&segs[0]), records(segs.last().unwrap()));
    let damaged = [first[first.len() / 2], last[0]];
    for (path, (seq, offset)) in [(&segs[0], damaged[0]), (segs.last().unwrap(), damaged[1])] {
        let mut data = std::fs::read(path).unwrap();
        data[offset + 10] ^= 0x5a;
        std::fs::write(path, data).unwrap();
        eprintln!("damaged seq {seq} in {}", path.display());
    }
    let spooled_last = last.last().unwrap().0;

    let collector = InProcessCollector::start_on(
        &format!("127.0.0.1:{port}"),
        &pki,
        &work.path().join("data"),
        |_| {},
    )
    .await;
    let mut agent = AgentProcess::start(&cfg_path, &work.path().join("agent-2.log"));
    let n = await_last_seq(&pki, &url, "node-d", spooled_last + 3, stall).await;
    assert_eq!(
        n.missing, 2,
        "exactly the two damaged seqs are missing: {n:?}"
    );
    assert_eq!(n.dropped, 2, "and both were declared by gap records: {n:?}");
    assert_eq!(n.reports + 2, n.last_seq, "{n:?}");
    assert_eq!(n.conflicts, 0, "{n:?}");
    agent.kill9();
    collector.stop().await;
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_spool_refuses_to_start_naming_the_first() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let collector = InProcessCollector::start(&pki, &work.path().join("data"), |_| {}).await;
    let url = collector.url();
    let cfg = agent_config(
        &pki,
        "node-l",
        vec![url.clone()],
        &work.path().join("spool"),
    );
    let stall = agent_stall(&cfg);
    let cfg_path = work.path().join("agent.toml");
    sov_e2e::write_agent_toml(&cfg, &cfg_path);
    let mut first = AgentProcess::start(&cfg_path, &work.path().join("first.log"));
    await_last_seq(&pki, &url, "node-l", 2, stall).await;
    let second_log = work.path().join("second.log");
    let mut second = AgentProcess::start(&cfg_path, &second_log);
    let status = while_progressing(stall, "the second agent to exit", || {
        let exited = second.exit_status();
        async move {
            match exited {
                Some(s) => Progress::Done(s),
                None => Progress::At(()),
            }
        }
    })
    .await;
    assert!(!status.success(), "{status:?}");
    let text = std::fs::read_to_string(&second_log).unwrap();
    assert!(
        text.contains("in use by another agent") && text.contains(&format!("pid {}", first.pid())),
        "{text}"
    );
    // The first one is unaffected: its sequence goes on without a hole or a conflict.
    let at = node(&pki, &url, "node-l").await.unwrap().last_seq;
    let n = await_last_seq(&pki, &url, "node-l", at + 2, stall).await;
    assert_eq!((n.missing, n.conflicts, n.epochs), (0, 0, 1), "{n:?}");
    assert!(first.is_running());
    first.kill9();
    collector.stop().await;
}

// ---------------------------------------------------------------------------------------------

/// "Removals that follow inventory chunks": a full inventory that spans several reports removes
/// what none of its chunks names. A file is deleted while the agent is down, so no change report
/// can say so (the restarted agent never knew it): only its first full inventory can: 400 files
/// with 16 KiB of metadata each (the most a file carries), more than the agent packs into one
/// report (4 MiB), so one generation in several chunks. The file leaves `sovctl models` once every chunk of that
/// generation is in; no file still on disk is marked removed at any time meanwhile. (Chunks out
/// of order, sent again, lost, and a late older generation: the store suite's
/// `a_chunked_inventory_removes_what_no_chunk_names_once_every_chunk_is_held`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_deleted_between_two_chunked_inventories_leaves_sovctl_models_and_no_other_does() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("models");
    let paths: Vec<PathBuf> = (0..400)
        .map(|i| root.join(format!("big/{i:03}.safetensors")))
        .collect();
    for (i, p) in paths.iter().enumerate() {
        safetensors_file(p, i as u8, 2048, &maximal_metadata(i)[..4]);
    }
    let collector = InProcessCollector::start(&pki, &work.path().join("data"), |_| {}).await;
    let url = collector.url();
    let mut cfg = agent_config(
        &pki,
        "node-chunks",
        vec![url.clone()],
        &work.path().join("spool"),
    );
    cfg.weights = weights_cfg(vec![root.clone()], 0);
    let stall = agent_stall(&cfg);
    let q = query(&pki, &url).await;
    let listed = |q: &pb::query_client::QueryClient<tonic::transport::Channel>| {
        let mut q = q.clone();
        async move {
            copies(&mut q)
                .await
                .into_iter()
                .map(|c| c.0)
                .collect::<BTreeSet<String>>()
        }
    };
    let all: BTreeSet<String> = paths.iter().map(|p| p.display().to_string()).collect();

    let (stop, task) = start_agent(sov_agent::Agent::open(cfg.clone()).unwrap());
    while_progressing(stall, "all 400 files at the collector", || async {
        let have = listed(&q).await;
        if all.is_subset(&have) {
            Progress::Done(())
        } else {
            Progress::At(all.intersection(&have).count())
        }
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    let before = node(&pki, &url, "node-chunks").await.unwrap();

    // Deleted while the agent is down; the restarted agent's first inventory is full.
    let gone = paths[5].display().to_string();
    std::fs::remove_file(&paths[5]).unwrap();
    let still: BTreeSet<String> = all.iter().filter(|p| **p != gone).cloned().collect();
    let (stop, task) = start_agent(sov_agent::Agent::open(cfg).unwrap());
    let after = while_progressing(stall, "the deleted file to leave the models", || async {
        let have = listed(&q).await;
        assert!(
            still.is_subset(&have),
            "a file still on disk was marked removed: {:?}",
            still.difference(&have).collect::<Vec<_>>()
        );
        let n = node(&pki, &url, "node-chunks").await.unwrap();
        if !have.contains(&gone) {
            Progress::Done(n)
        } else {
            assert!(
                n.reports < before.reports + 40,
                "40 reports after the restart and the file is still listed: {n:?}"
            );
            Progress::At(n.reports)
        }
    })
    .await;
    assert!(
        after.reports >= before.reports + 2,
        "the inventory took several reports: {before:?} then {after:?}"
    );
    assert_eq!((after.missing, after.conflicts), (0, 0), "{after:?}");
    // As a regulator sees it, through the real command line.
    let regulator = pki.client(Role::Regulator, "analyst");
    let out = sov_e2e::sovctl(&pki, &regulator, &url, &["models", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(!json.contains(&gone), "{gone} still listed: {json}");
    for p in &still {
        assert!(json.contains(p.as_str()), "{p} missing: {json}");
    }
    stop.cancel();
    task.await.unwrap();
    collector.stop().await;
}

// ---------------------------------------------------------------------------------------------

/// A process that holds `hold` open and makes `n` uploads of `bytes` to `to`, each over about
/// 0.9 s on a connection of its own that it then closes (a quick upload, shorter than the
/// agent's sampling interval); prints "ready" once the file is open and "done" at the end.
fn quick_uploader(hold: &Path, to: std::net::SocketAddr, n: usize, bytes: usize) -> KillOnDrop {
    let script = r#"
import socket, sys, time
f = open(sys.argv[1], 'rb')
n, size = int(sys.argv[2]), int(sys.argv[3])
host, port = sys.argv[4].rsplit(':', 1)
print('ready', flush=True)
sys.stdin.readline()
for i in range(n):
    s = socket.create_connection((host, int(port)))
    for j in range(6):
        s.sendall(b'x' * (size // 6))
        time.sleep(0.15)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    s.close()
    time.sleep(0.2)
print('done', flush=True)
time.sleep(600)
"#;
    let child = Command::new("python3")
        .args(["-c", script])
        .arg(hold)
        .args([n.to_string(), bytes.to_string(), to.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// Finding 11: "a quick upload escapes attribution". Short-lived connections (each opened and
/// closed between two samples of the agent) were listed with process "" and pid 0, so
/// `weights-exfiltration` could not see a quick upload by the process holding the weights. A
/// real python process holds a restricted model open and makes twelve uploads of 300 KB to a
/// host in a network namespace placed in France (loopback where namespaces cannot be made),
/// each on its own connection closed within a second, with the agent sampling every 3 s: the
/// destroy events carry their bytes and the owner glances their owner. The collector charges
/// the bytes to that pid and opens `weights-exfiltration` for it; the first upload (before the
/// first unseen close turned the glances on), and on a loaded machine one more, stay without
/// owner, counted as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_uploads_by_the_process_holding_restricted_weights_keep_their_owner_and_open_exfiltration()
 {
    const UPLOADS: usize = 12;
    const BYTES: usize = 300_000;
    let netns = match sov_e2e::netns::Netns::create(17, 1) {
        Ok(ns) => Some(ns),
        Err(e) => {
            sov_e2e::skipped(
                "hostile_node quick uploads (network namespace part)",
                &format!("cannot create a network namespace ({e}): ran on a loopback address"),
            );
            None
        }
    };
    let peer = netns
        .as_ref()
        .map_or_else(|| "127.0.0.2".to_owned(), |n| n.v4_peers[0].clone());
    let (_sink, port) = sov_e2e::netns::sink(netns.as_ref().map(|n| n.name.as_str()), &peer, 0);
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let model = hf_model(&work.path().join("models/hub"), "acme", "secret", 7, 8192);
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        POLICY.replace(
            "quiet_secs = 3600",
            "quiet_secs = 3600\nwindow_secs = 600\nexfiltration_fraction = 0.5",
        ),
    )
    .unwrap();
    let (p, peer_) = (policy.clone(), peer.clone());
    let collector = InProcessCollector::start(&pki, &work.path().join("data"), move |c| {
        c.policy = Some(p);
        c.geo.overrides = vec![sov_collector::config::GeoOverride {
            cidr: format!("{peer_}/32"),
            country: "FR".into(),
            asn: Some(64_500),
            org: Some("Test Transit".into()),
            operator_country: None,
        }];
    })
    .await;
    let url = collector.url();
    let mut cfg = agent_config(
        &pki,
        "node-rabat",
        vec![url.clone()],
        &work.path().join("spool"),
    );
    cfg.node.site = "rabat".into();
    cfg.node.country = "MA".into();
    // Samples every 3 s (a report asks for a fresh one: reports every 3 s too).
    cfg.interval_secs = 3;
    cfg.net.interval_secs = 3;
    cfg.net.include_loopback = netns.is_none();
    cfg.weights = weights_cfg(vec![work.path().join("models/hub")], 0);
    let stall = agent_stall(&cfg);
    let mut uploader = quick_uploader(
        &model,
        format!("{peer}:{port}").parse().unwrap(),
        UPLOADS,
        BYTES,
    );
    let pid = uploader.0.id();
    let mut out = BufReader::new(uploader.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let agent = sov_agent::Agent::open(cfg).unwrap();
    let (stop, task) = start_agent(agent.clone());
    let q = query(&pki, &url).await;
    // The agent knows the process as a user of the restricted model before the uploads.
    while_progressing(
        stall,
        "the uploader listed as a user of acme/secret",
        || {
            let mut q = q.clone();
            async move {
                let models = sovctl::fetch_models(&mut q, "").await.unwrap_or_default();
                let users: usize = models
                    .iter()
                    .flat_map(|m| m.users.iter())
                    .filter(|u| u.pid == pid)
                    .count();
                if users > 0 {
                    Progress::Done(())
                } else {
                    Progress::At(models.len())
                }
            }
        },
    )
    .await;
    std::io::Write::write_all(uploader.0.stdin.as_mut().unwrap(), b"go\n").unwrap();
    let done = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert_eq!(done.trim(), "done");

    // Every upload's bytes reach the collector; those charged to the uploader's pid are all
    // but at most two uploads' (the first closes before the glances start; one more when a
    // loaded machine delays a glance).
    let total = (UPLOADS * BYTES) as u64;
    let rows = while_progressing(stall, "the uploads' bytes at the collector", || {
        let (pki, url) = (&pki, url.clone());
        async move {
            let rows = sov_e2e::egress_rows(pki, &url, "process").await;
            let sent: u64 = rows
                .iter()
                .filter(|r| r.node == "node-rabat")
                .map(|r| r.bytes_sent)
                .sum();
            if sent >= total {
                Progress::Done(rows)
            } else {
                Progress::At(sent)
            }
        }
    })
    .await;
    let charged: u64 = rows
        .iter()
        .filter(|r| r.node == "node-rabat" && r.pid == pid)
        .map(|r| r.bytes_sent)
        .sum();
    let unknown: u64 = rows
        .iter()
        .filter(|r| r.node == "node-rabat" && r.pid == 0)
        .map(|r| r.bytes_sent)
        .sum();
    assert!(
        charged >= total - 2 * BYTES as u64 - 4096,
        "bytes charged to pid {pid}: {charged} of {total} (without owner: {unknown}); rows: {rows:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r.pid == pid && r.process.starts_with("python")),
        "{rows:?}"
    );
    // The breach the quick uploads used to escape.
    let breach = while_progressing(stall, "weights-exfiltration for the uploader", || {
        let mut q = q.clone();
        async move {
            let all = q
                .list_breaches(pb::ListBreachesRequest {
                    limit: 100,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().breaches)
                .unwrap_or_default();
            match all
                .into_iter()
                .find(|b| b.rule == "weights-exfiltration" && b.node == "node-rabat")
            {
                Some(b) => Progress::Done(b),
                None => Progress::At(()),
            }
        }
    })
    .await;
    assert!(
        breach.subject.contains(&pid.to_string()),
        "the breach names the uploader: {breach:?}"
    );
    // Connections that closed unseen are counted, and those that stayed without owner (the
    // test's own quick queries to the collector, each shorter than a glance) apart.
    let metrics = agent.render_metrics();
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (short, unknown) = (
        counter("sov_agent_short_connections_total"),
        counter("sov_agent_short_connections_unknown_owner_total"),
    );
    assert!(
        short >= 1 && unknown < short,
        "short {short}, without owner {unknown}:\n{metrics}"
    );
    stop.cancel();
    task.await.unwrap();
    collector.stop().await;
}
