//! The training sampler reads a candidate's descriptors again only when its mark (I/O counters,
//! virtual size, descriptor count) moved: nothing a trainer does between two samples may be
//! lost to that. A real agent watches a real Python process that maps a base safetensors file
//! and, while the sampler passes it over (its `training_descriptors` hits grow), opens a dataset
//! and a checkpoint in place of two descriptors it closes (the count does not move; the reads
//! and writes do), then writes a second checkpoint only through a mapping, opened in place of
//! the first one (no `write` call: the new mapping moves the virtual size). Each step is waited
//! for in the agent's own reports at the collector, with `recheck_secs` far beyond the test so
//! that only the marks can have caught them.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sov_agent::collect::cache::TRAINING_SAMPLE;
use sov_agent::config::TrainingConfig;
use sov_collector::auth::Role;
use sov_e2e::{InProcessCollector, KillOnDrop, Pki, agent_config, eventually, sovctl};

const REV: &str = "0123456789abcdef0123456789abcdef01234567";

/// A valid safetensors file of one F32 tensor of `n` values, as Python writes it below.
const TRAINER: &str = r#"
import json, mmap, os, signal, struct, sys
base, data, spare, ckpt1, ckpt2 = sys.argv[1:6]
n = 16384
header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
header += b' ' * (-len(header) % 8)
blob = struct.pack('<Q', len(header)) + header + bytes([7]) * (4 * n)
f = open(base, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
a = open(spare, 'rb'); b = open(spare, 'rb')
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
print('ready', flush=True)
signal.sigwait([signal.SIGUSR1])
# 1. A dataset and a checkpoint in place of two closed descriptors: read and written.
a.close(); d = open(data, 'rb'); d.read()
b.close(); c = open(ckpt1, 'wb'); c.write(blob); c.flush()
signal.sigwait([signal.SIGUSR1])
# 2. A checkpoint written only through a mapping, in place of the first one (Python's mmap
# holds a duplicate of the descriptor: the count is back where it was in microseconds).
fd = os.open(ckpt2, os.O_RDWR | os.O_CREAT, 0o644); os.ftruncate(fd, len(blob))
mm = mmap.mmap(fd, len(blob)); os.close(fd); c.close()
mm[:] = blob
signal.sigwait([signal.SIGUSR1])
"#;

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A real safetensors file: one F32 tensor of `n` values.
fn safetensors_bytes(n: usize) -> Vec<u8> {
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{}]}}}}"#,
        4 * n
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(3u8, 4 * n));
    out
}

fn usr1(pid: u32) {
    let ok = Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Waits until the sampler has passed over a quiet candidate `times` more times.
async fn passed_over(times: u64) {
    let (before, _, _) = TRAINING_SAMPLE.read();
    eventually(
        Duration::from_secs(60),
        "the sampler passing over the quiet trainer",
        || async move { (TRAINING_SAMPLE.read().0 >= before + times).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_opened_in_place_of_closed_ones_and_written_by_mapping_are_not_missed() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path().join("hub");
    let base = root
        .join("models--mistralai--Mistral-7B-v0.1/snapshots")
        .join(REV)
        .join("model.safetensors");
    write(&base, &safetensors_bytes(8192));
    let data = tree.path().join("data/darija-train.jsonl");
    write(&data, &b"{\"text\": \"salam\"}\n".repeat(512));
    let spare = tree.path().join("notes.txt");
    write(&spare, b"not a weight file");
    let ckpt1 = tree.path().join("runs/a/checkpoint-1.safetensors");
    let ckpt2 = tree.path().join("runs/b/checkpoint-2.safetensors");
    std::fs::create_dir_all(ckpt1.parent().unwrap()).unwrap();
    std::fs::create_dir_all(ckpt2.parent().unwrap()).unwrap();

    let mut child = Command::new("python3")
        .arg("-c")
        .arg(TRAINER)
        .args([&base, &data, &spare, &ckpt1, &ckpt2])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let trainer = KillOnDrop(child);
    let pid = trainer.0.id();

    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let collector = InProcessCollector::start(&pki, dir.path(), |_| {}).await;
    let url = collector.url();
    let mut cfg = agent_config(&pki, "gpu-m", vec![url.clone()], &dir.path().join("spool"));
    cfg.weights = sov_e2e::weights_of_roots_only(vec![root.clone()]);
    cfg.training = TrainingConfig {
        sample_interval_ms: 100,
        dataset_min_bytes: 1024,
        recheck_secs: 3600,
        ..Default::default()
    };
    let agent = sov_agent::Agent::open(cfg).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));

    let reg = pki.client(Role::Regulator, "alice");
    let run_now = || {
        let out = tokio::task::block_in_place(|| {
            sovctl(
                &pki,
                &reg,
                &url,
                &["--output", "json", "training", "--since", "1h"],
            )
        });
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .unwrap()
            .into_iter()
            .find(|r| r["pid"] == pid)
    };
    let has_output = |run: &Value, path: &Path| {
        run["outputs"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o["path"] == path.to_str().unwrap()))
    };

    // The trainer, a weight user, is a candidate: read once, then passed over while quiet.
    passed_over(3).await;
    assert!(run_now().is_none(), "no run before it writes");

    usr1(pid);
    let run = eventually(
        Duration::from_secs(60),
        "a run with the dataset read and the checkpoint written in place of closed files",
        || {
            let found = run_now().filter(|r| has_output(r, &ckpt1));
            async move { found }
        },
    )
    .await;
    let inputs = run["inputs"].as_array().unwrap();
    assert!(
        inputs
            .iter()
            .any(|i| i["kind"] == "base-weights" && i["path"] == base.to_str().unwrap()),
        "{run:#}"
    );
    assert!(
        inputs
            .iter()
            .any(|i| i["kind"] == "dataset" && i["path"] == data.to_str().unwrap()),
        "{run:#}"
    );

    // Quiet again (a writer now): passed over, then the checkpoint written by mapping.
    passed_over(3).await;
    usr1(pid);
    let run = eventually(
        Duration::from_secs(60),
        "the checkpoint written only through a mapping",
        || {
            let found = run_now().filter(|r| has_output(r, &ckpt2));
            async move { found }
        },
    )
    .await;
    assert_eq!(run["ended"], false, "{run:#}");

    stop.cancel();
    let _ = task.await;
    drop(trainer);
}
