//! Training runs end to end, with real processes and real files the test writes: a trainer
//! process maps a base safetensors file (in a Hugging Face cache layout), reads a Parquet
//! dataset, and writes a new safetensors checkpoint every second or so; a real agent reports
//! the run, the collector stores it, and `sovctl training` shows the run with that base and
//! dataset as inputs and the checkpoints as outputs, while `sovctl models` shows each
//! checkpoint derived from that run.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sov_agent::config::TrainingConfig;
use sov_collector::auth::Role;
use sov_e2e::training::parquet;
use sov_e2e::{InProcessCollector, KillOnDrop, Pki, agent_config, eventually, sovctl};

const REV: &str = "0123456789abcdef0123456789abcdef01234567";

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A real safetensors file (the safetensors crate): one F32 tensor of `n` values.
fn safetensors_bytes(n: usize) -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let data = vec![3u8; 4 * n];
    let meta: HashMap<String, String> = [("format".to_owned(), "pt".to_owned())].into();
    safetensors::serialize(
        [("w", TensorView::new(Dtype::F32, vec![n], &data).unwrap())],
        Some(meta),
    )
    .unwrap()
}

/// The trainer: maps the base, holds the dataset open and reads it, then writes
/// `checkpoint-N.safetensors` (a valid safetensors file of 64 Ki F32 values) into `out`, each
/// in 8 chunks over about a second as a real checkpoint write takes time, one after another.
const TRAINER: &str = r#"
import json, mmap, os, struct, sys, time
base, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
f = open(base, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
d = open(data, 'rb'); d.read()
print('ready', flush=True)
n = 65536
header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
header += b' ' * (-len(header) % 8)
i = 0
while True:
    i += 1
    with open(os.path.join(out, 'checkpoint-%d.safetensors' % i), 'wb') as c:
        c.write(struct.pack('<Q', len(header)) + header)
        for k in range(8):
            c.write(bytes([i % 256]) * (n // 2))
            c.flush()
            time.sleep(0.15)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sovctl_training_shows_a_run_with_its_base_dataset_and_checkpoints_derived_from_it() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path().join("hub");
    let base = root
        .join("models--mistralai--Mistral-7B-v0.1/snapshots")
        .join(REV)
        .join("model.safetensors");
    write(&base, &safetensors_bytes(8192));
    let dataset = tree.path().join("data/darija-train.parquet");
    let rows = 160_000;
    write(&dataset, &parquet(rows));
    let out = tree.path().join("runs/darija-ft");
    std::fs::create_dir_all(&out).unwrap();

    let mut child = Command::new("python3")
        .arg("-c")
        .arg(TRAINER)
        .arg(&base)
        .arg(&dataset)
        .arg(&out)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let trainer = KillOnDrop(child);
    let trainer_pid = trainer.0.id();

    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |_| {}).await;
    let url = collector.url();
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(
        &pki,
        "gpu-t",
        vec![url.clone()],
        &spool.path().join("spool"),
    );
    cfg.weights = sov_e2e::weights_of_roots_only(vec![root.clone()]);
    cfg.training = TrainingConfig {
        sample_interval_ms: 100,
        ..Default::default()
    };
    let agent = sov_agent::Agent::open(cfg).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));

    let reg = pki.client(Role::Regulator, "alice");
    let runs_now = || {
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
        serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
    };
    let run = eventually(
        Duration::from_secs(60),
        "a run with two hashed checkpoints at the collector",
        || {
            let runs = runs_now();
            async move {
                let run = runs.into_iter().find(|r| r["pid"] == trainer_pid)?;
                let hashed = run["outputs"]
                    .as_array()?
                    .iter()
                    .filter(|o| o["sha256"].as_str().is_some_and(|s| s.len() == 64))
                    .count();
                (hashed >= 2).then_some(run)
            }
        },
    )
    .await;
    let runs = runs_now();
    assert_eq!(
        runs.iter().filter(|r| r["pid"] == trainer_pid).count(),
        1,
        "one run: {runs:#?}"
    );
    assert_eq!(run["node"], "gpu-t");
    assert_eq!(run["country"], "MA");
    assert_eq!(run["process"], "python3");
    assert_eq!(run["ended"], false);
    let inputs = run["inputs"].as_array().unwrap();
    let base_in = inputs
        .iter()
        .find(|i| i["kind"] == "base-weights")
        .unwrap_or_else(|| panic!("no base input: {run:#}"));
    assert_eq!(base_in["model"], "mistralai/Mistral-7B-v0.1");
    assert_eq!(base_in["mapped"], true);
    assert_eq!(base_in["path"], base.to_str().unwrap());
    let data_in = inputs
        .iter()
        .find(|i| i["kind"] == "dataset")
        .unwrap_or_else(|| panic!("no dataset input: {run:#}"));
    assert_eq!(data_in["format"], "parquet");
    assert_eq!(data_in["path"], dataset.to_str().unwrap());
    assert_eq!(data_in["size"], parquet(rows).len() as u64);
    let outputs = run["outputs"].as_array().unwrap();
    assert!(
        outputs.iter().all(|o| o["path"]
            .as_str()
            .unwrap()
            .starts_with(out.to_str().unwrap())),
        "{run:#}"
    );

    // The table names the base and the dataset in one line.
    let table =
        tokio::task::block_in_place(|| sovctl(&pki, &reg, &url, &["training", "--since", "1h"]));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("mistralai/Mistral-7B-v0.1") && text.contains("parquet:"),
        "{text}"
    );

    // Each checkpoint, a model of its own, is derived from that run, its observed base the
    // run's base.
    let models = tokio::task::block_in_place(|| {
        sovctl(
            &pki,
            &reg,
            &url,
            &["--output", "json", "models", "darija-ft"],
        )
    });
    assert!(models.status.success());
    let models: Vec<Value> = serde_json::from_slice(&models.stdout).unwrap();
    let derived: Vec<&Value> = models
        .iter()
        .filter(|m| m["derived_from_run"] == format!("gpu-t:{}", run["run_id"].as_str().unwrap()))
        .collect();
    assert!(derived.len() >= 2, "{models:#?}");
    for m in derived {
        let bases = m["base_models"].as_array().unwrap();
        assert!(
            bases
                .iter()
                .any(|b| b["name"] == "mistralai/Mistral-7B-v0.1"
                    && b["source"] == "training-run"
                    && b["origin"] == "FR"),
            "{m:#}"
        );
    }

    drop(trainer);
    stop.cancel();
    task.await.unwrap().unwrap();
    collector.stop().await;
}

#[test]
fn the_parquet_writer_writes_the_format_s_magic_and_footer() {
    let p = parquet(3);
    assert_eq!(&p[..4], b"PAR1");
    assert_eq!(&p[p.len() - 4..], b"PAR1");
    let footer = u32::from_le_bytes(p[p.len() - 8..p.len() - 4].try_into().unwrap()) as usize;
    assert!(footer > 0 && footer < p.len() - 12);
}
