//! The agent's cost while a training run writes a large checkpoint every 30 s (issue 19),
//! against its own budget (`[budget] max_cpu_percent`, `max_rss_bytes`, defaults 5 % and
//! 128 MiB) and against the same agent with no training run, both in the same run.
//!
//! ```sh
//! cargo build --release -p sov-e2e --bins --example bench_training
//! ./target/release/examples/bench_training --dir /var/tmp --checkpoints 4 \
//!     --checkpoint-mb 1024 --period-secs 30
//! ```
//!
//! One run: a collector in this process; two real agent processes (`e2e-agent`, release) with
//! the same configuration (default intervals: reports every 10 s, weights scan every 60 s,
//! fingerprints at 100 MB/s or `--hash-rate-mb`, training samples every second; weights only
//! under their own root,
//! not through other processes or containers, so that the second agent sees no training run):
//!
//! - **training**: its root holds the base the trainer maps;
//! - **idle**: its root holds a byte-identical copy of the base that no process uses.
//!
//! Once both have fingerprinted their base (`--warmup-secs`), a trainer (python3) maps the base
//! (`--base-mb`, a real safetensors file), reads a Parquet dataset (`--dataset-mb`) once per
//! checkpoint, and writes `--checkpoints` safetensors checkpoints of `--checkpoint-mb` each, one
//! every `--period-secs`, every byte written (no hole), each write spread over `--spread-secs`.
//! The measurement runs from the trainer's start until the collector lists every checkpoint
//! fingerprinted (sha256) as an output of the run, so each checkpoint's whole cost (seen,
//! listed, read and hashed) is inside it. Every `--interval-secs` the benchmark reads both
//! agents' CPU time (utime + stime) and `VmRSS`.
//!
//! Reported per agent: CPU ms per report cycle (CPU over reports stored), mean CPU % of one
//! core over the window, the highest over one interval and how many intervals were above
//! `max_cpu_percent` (the agent's budget watchdog compares each interval's share with it and,
//! above, slows fingerprinting to 10 MiB/s until it is back under), median and peak RSS; the
//! load average at start and end.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sov_collector::auth::Role;
use sov_e2e::training::{Trainer, TrainerPlan, parquet};
use sov_e2e::{InProcessCollector, KillOnDrop, Pki, agent_config, bin_path, write_agent_toml};
use sov_proto::pb;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn arg_str(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// utime + stime of `pid`, seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

/// VmRSS of `pid`, bytes.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// A safetensors file of one F32 tensor of `values` values, every byte written.
fn write_safetensors(path: &Path, values: u64, fill: u8) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")))?;
    let mut header = format!(
        r#"{{"__metadata__":{{"format":"pt"}},"w":{{"dtype":"F32","shape":[{values}],"data_offsets":[0,{}]}}}}"#,
        4 * values
    )
    .into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    let chunk = vec![fill; 8 << 20];
    let mut left = 4 * values;
    while left > 0 {
        let n = left.min(chunk.len() as u64);
        out.write_all(&chunk[..n as usize])?;
        left -= n;
    }
    out.into_inner()?.sync_all()?;
    Ok(())
}

async fn reports(pki: &Pki, url: &str, name: &str) -> u64 {
    sov_e2e::node(pki, url, name)
        .await
        .map_or(0, |n| n.last_seq)
}

/// The training agent's run of `pid` as the collector lists it.
async fn run_of(
    q: &mut pb::query_client::QueryClient<tonic::transport::Channel>,
    pid: u32,
) -> Option<pb::TrainingRun> {
    q.list_training(pb::ListTrainingRequest::default())
        .await
        .ok()?
        .into_inner()
        .runs
        .into_iter()
        .filter_map(|s| s.run)
        .find(|r| r.pid == pid)
}

/// One agent's figures over the window.
#[derive(Debug, Default)]
struct Figures {
    cpu_ms_per_cycle: f64,
    cycles: u64,
    cpu_percent: f64,
    cpu_percent_max_interval: f64,
    intervals: usize,
    intervals_over: usize,
    rss_median: u64,
    rss_peak: u64,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    let checkpoints = u32::try_from(arg(&args, "--checkpoints", 4))?.max(1);
    let checkpoint_mb = arg(&args, "--checkpoint-mb", 1024).max(1);
    let period = arg(&args, "--period-secs", 30).max(1);
    let spread = arg(&args, "--spread-secs", 2);
    let base_mb = arg(&args, "--base-mb", 256).max(1);
    let dataset_mb = arg(&args, "--dataset-mb", 64).max(2);
    let interval = arg(&args, "--interval-secs", 10).max(1);
    let warmup = Duration::from_secs(arg(&args, "--warmup-secs", 30));
    let hash_rate = arg(&args, "--hash-rate-mb", 100);
    let dir = arg_str(&args, "--dir").map_or_else(std::env::temp_dir, Into::into);
    if !Path::new(&bin_path("e2e-agent")).exists() {
        eprintln!(
            "{} is missing: cargo build --release -p sov-e2e --bins --example bench_training",
            bin_path("e2e-agent")
        );
        std::process::exit(2);
    }

    let work = tempfile::tempdir_in(&dir)?;
    let w = work.path();
    // The base (and its copy for the idle agent), the dataset.
    let base_values = base_mb * (1 << 20) / 4;
    let base = w.join("train/models/base-7b/model.safetensors");
    let copy = w.join("idle/models/base-7b/model.safetensors");
    write_safetensors(&base, base_values, 0x3c)?;
    write_safetensors(&copy, base_values, 0x3c)?;
    let dataset = w.join("data/corpus-train.parquet");
    std::fs::create_dir_all(w.join("data"))?;
    std::fs::write(&dataset, parquet((dataset_mb << 20) as usize / 8))?;
    let out = w.join("train/runs/ft");

    let pki = Pki::new();
    let collector = InProcessCollector::start(&pki, &w.join("collector"), |_| {}).await;
    let url = collector.url();
    let spawn_agent = |name: &str, root: &Path| -> anyhow::Result<KillOnDrop> {
        let mut cfg = agent_config(&pki, name, vec![url.clone()], &w.join(name));
        cfg.interval_secs = interval;
        cfg.weights.roots = Some(vec![root.to_owned()]);
        cfg.weights.scan_interval_secs = 60;
        cfg.weights.hash_rate_mb_per_sec = hash_rate;
        let path = w.join(format!("{name}.toml"));
        write_agent_toml(&cfg, &path);
        let text = std::fs::read_to_string(&path)?.replace(
            "[weights]\n",
            "[weights]\nprocess_files = false\ncontainer_roots = false\n",
        );
        std::fs::write(&path, text)?;
        Ok(KillOnDrop(
            Command::new(bin_path("e2e-agent"))
                .args(["run", "--config", &path.to_string_lossy()])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()?,
        ))
    };
    let training = spawn_agent("bench-training", &w.join("train"))?;
    let idle = spawn_agent("bench-idle", &w.join("idle"))?;
    let pids = [training.0.id(), idle.0.id()];
    let names = ["bench-training", "bench-idle"];
    eprintln!(
        "agents started; warm-up {} s (each fingerprints its {base_mb} MiB base)",
        warmup.as_secs()
    );
    tokio::time::sleep(warmup).await;

    let tls = pki.client_tls(Role::Regulator, "bench");
    let mut q = pb::query_client::QueryClient::new(tls.connect(&url).await?);
    let load_start = load_average();
    let cpu0 = pids.map(cpu_secs);
    let mut r0 = [0u64; 2];
    for (i, n) in names.iter().enumerate() {
        r0[i] = reports(&pki, &url, n).await;
    }
    let began = Instant::now();
    let plan = TrainerPlan {
        values: checkpoint_mb * (1 << 20) / 4,
        count: checkpoints,
        period_secs: period as f64,
        spread_secs: spread as f64,
    };
    let (b, d, o) = (base.clone(), dataset.clone(), out.clone());
    let mut trainer = tokio::task::spawn_blocking(move || Trainer::start(&b, &d, &o, plan)).await?;
    let trainer_pid = trainer.pid();
    // The trainer's lines (one per checkpoint written), read on a thread of their own.
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while let Some(l) = trainer.next_line() {
            if line_tx.send(l).is_err() {
                break;
            }
        }
        drop(trainer);
    });

    // Sample both agents every interval until every checkpoint is fingerprinted at the
    // collector (bounded: the checkpoints' time plus 5 minutes).
    let limit = Duration::from_secs(period * u64::from(checkpoints) + 300);
    let mut rss: [Vec<u64>; 2] = [vec![], vec![]];
    let mut pct: [Vec<f64>; 2] = [vec![], vec![]];
    let mut prev = (Instant::now(), cpu0);
    let mut written = Vec::new();
    let mut hashed_at = None;
    let mut tick = 0u32;
    let mut last_run = None;
    while began.elapsed() < limit {
        tick += 1;
        tokio::time::sleep_until((began + Duration::from_secs(interval) * tick).into()).await;
        let now = (Instant::now(), pids.map(cpu_secs));
        let dt = now.0.duration_since(prev.0).as_secs_f64();
        for i in 0..2 {
            rss[i].push(rss_bytes(pids[i]));
            pct[i].push((now.1[i] - prev.1[i]) * 100.0 / dt);
        }
        prev = now;
        while let Ok(l) = line_rx.try_recv() {
            if let Some(secs) = l.strip_prefix("wrote ") {
                written.push(secs.to_owned());
            }
        }
        let run = run_of(&mut q, trainer_pid).await;
        let hashed = run.as_ref().map_or(0, |r| {
            r.outputs
                .iter()
                .filter(|o| o.sha256.len() == 64 && o.size_bytes >= checkpoint_mb << 20)
                .count()
        });
        eprintln!(
            "{:>4.0} s: {} checkpoints written, {hashed} fingerprinted at the collector; training agent {:.1} MiB, idle {:.1} MiB (load {})",
            began.elapsed().as_secs_f64(),
            written.len(),
            rss[0].last().copied().unwrap_or(0) as f64 / 1048576.0,
            rss[1].last().copied().unwrap_or(0) as f64 / 1048576.0,
            load_average()
        );
        last_run = run;
        if hashed >= checkpoints as usize {
            hashed_at = Some(began.elapsed());
            break;
        }
    }
    let wall = began.elapsed().as_secs_f64();
    let cpu1 = pids.map(cpu_secs);
    // Let the last report land before counting cycles.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut figures: [Figures; 2] = Default::default();
    for i in 0..2 {
        let cycles = reports(&pki, &url, names[i])
            .await
            .saturating_sub(r0[i])
            .max(1);
        let cpu = cpu1[i] - cpu0[i];
        figures[i] = Figures {
            cpu_ms_per_cycle: cpu * 1000.0 / cycles as f64,
            cycles,
            cpu_percent: cpu * 100.0 / wall,
            cpu_percent_max_interval: pct[i].iter().copied().fold(0.0, f64::max),
            intervals: pct[i].len(),
            intervals_over: pct[i]
                .iter()
                .filter(|p| **p > f64::from(sov_agent::budget::DEFAULT_MAX_CPU_PERCENT))
                .count(),
            rss_median: median(rss[i].clone()),
            rss_peak: rss[i].iter().copied().max().unwrap_or(0),
        };
    }
    let load_end = load_average();
    let max_cpu = sov_agent::budget::DEFAULT_MAX_CPU_PERCENT;
    let max_rss = sov_agent::budget::DEFAULT_MAX_RSS_BYTES;

    let run = last_run;
    let (inputs, outputs) = run.as_ref().map_or((String::new(), 0), |r| {
        (
            r.inputs
                .iter()
                .map(|i| {
                    format!(
                        "{} {} ({} bytes{})",
                        i.kind,
                        i.path,
                        i.size_bytes,
                        if i.sha256.is_empty() { "" } else { ", sha256" }
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            r.outputs.len(),
        )
    });
    println!(
        "training run: {checkpoints} checkpoints of {checkpoint_mb} MiB every {period} s (written in {} s), base {base_mb} MiB mapped, dataset {dataset_mb} MiB read per checkpoint; agents fingerprint at {hash_rate} MB/s",
        written.join(" / ")
    );
    println!("the run at the collector: {outputs} outputs; inputs: {inputs}");
    match hashed_at {
        Some(t) => println!(
            "window: {wall:.0} s, until every checkpoint was fingerprinted at the collector ({:.0} s)",
            t.as_secs_f64()
        ),
        None => println!(
            "window: {wall:.0} s; NOT every checkpoint was fingerprinted at the collector in time"
        ),
    }
    println!("load average: {load_start} at the start, {load_end} at the end");
    println!(
        "{:<16} | {:>9} {:>6} | {:>6} {:>9} {:>7} | {:>9} {:>9} | budget ({max_cpu} %, {} MiB)",
        "agent",
        "ms/cycle",
        "cycles",
        "CPU %",
        "max CPU %",
        "over",
        "RSS MiB",
        "peak MiB",
        max_rss >> 20
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    for (name, f) in ["training run", "no training run"].iter().zip(&figures) {
        let cpu_ok = f.cpu_percent_max_interval <= f64::from(max_cpu);
        let rss_ok = f.rss_peak <= max_rss;
        println!(
            "{:<16} | {:>9.2} {:>6} | {:>6.2} {:>9.2} {:>7} | {:>9.1} {:>9.1} | CPU {} RSS {}",
            name,
            f.cpu_ms_per_cycle,
            f.cycles,
            f.cpu_percent,
            f.cpu_percent_max_interval,
            format!("{}/{}", f.intervals_over, f.intervals),
            mib(f.rss_median),
            mib(f.rss_peak),
            if cpu_ok { "met" } else { "MISSED" },
            if rss_ok { "met" } else { "MISSED" },
        );
    }
    let j = |f: &Figures| {
        format!(
            "{{\"cpu_ms_per_cycle\":{:.3},\"cycles\":{},\"cpu_percent\":{:.3},\"cpu_percent_max_interval\":{:.3},\"intervals\":{},\"intervals_over_budget\":{},\"rss_median_bytes\":{},\"rss_peak_bytes\":{}}}",
            f.cpu_ms_per_cycle,
            f.cycles,
            f.cpu_percent,
            f.cpu_percent_max_interval,
            f.intervals,
            f.intervals_over,
            f.rss_median,
            f.rss_peak
        )
    };
    println!(
        "{{\"bench\":\"training\",\"checkpoints\":{checkpoints},\"checkpoint_mb\":{checkpoint_mb},\"period_secs\":{period},\"base_mb\":{base_mb},\"dataset_mb\":{dataset_mb},\"hash_rate_mb_per_sec\":{hash_rate},\"interval_secs\":{interval},\"window_secs\":{wall:.1},\"all_fingerprinted\":{},\"load_start\":\"{load_start}\",\"load_end\":\"{load_end}\",\"budget_cpu_percent\":{max_cpu},\"budget_rss_bytes\":{max_rss},\"training\":{},\"idle\":{}}}",
        hashed_at.is_some(),
        j(&figures[0]),
        j(&figures[1])
    );
    drop(line_rx);
    // The trainer sleeps after its last checkpoint; its reader thread owns it.
    Command::new("kill")
        .args(["-9", &trainer_pid.to_string()])
        .status()?;
    drop((training, idle));
    collector.stop().await;
    drop(work);
    Ok(())
}
