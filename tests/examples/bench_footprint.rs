//! Side-by-side footprint: the real agent process (its whole report cycle: host, GPUs via NVML,
//! processes, spool fsync, mTLS push) against Prometheus node_exporter scraped on loopback at
//! the same interval, in one run on the same machine. Prints steady RSS and CPU time per cycle.
//!
//! ```sh
//! apt-get install prometheus-node-exporter     # once
//! cargo run --release -p sov-e2e --example bench_footprint -- --cycles 30 --interval-secs 2
//! ```
//!
//! CPU comes from `/proc/<pid>/stat` (utime + stime) over the measured cycles, RSS from
//! `/proc/<pid>/status` (`VmRSS`) sampled every cycle (median after the warm-up).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sov_e2e::{InProcessCollector, KillOnDrop, Pki, agent_config, bin_path, write_agent_toml};

const WARMUP_CYCLES: u32 = 3;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

fn scrape(port: u16) -> usize {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut body = Vec::new();
    let _ = s.read_to_end(&mut body);
    body.len()
}

async fn reports(pki: &Pki, url: &str, name: &str) -> u64 {
    sov_e2e::node(pki, url, name)
        .await
        .map_or(0, |n| n.last_seq)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn node_exporter_path() -> Option<String> {
    [
        "/usr/bin/prometheus-node-exporter",
        "/usr/local/bin/node_exporter",
        "/usr/bin/node_exporter",
    ]
    .iter()
    .find(|p| Path::new(p).exists())
    .map(|p| (*p).to_owned())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let cycles = u32::try_from(arg(&args, "--cycles", 30))?.max(1);
    let interval = Duration::from_secs(arg(&args, "--interval-secs", 2).max(1));
    let Some(ne_bin) = node_exporter_path() else {
        eprintln!("node_exporter not found: apt-get install prometheus-node-exporter");
        std::process::exit(2);
    };

    let pki = Pki::new();
    let work = tempfile::tempdir()?;
    let collector = InProcessCollector::start(&pki, &work.path().join("collector"), |_| {}).await;
    // Two agents in the same run: the telemetry cycle (host, GPUs, processes: what
    // node_exporter + dcgm-exporter cover) and the whole agent (also weight files and flows).
    let spawn_agent = |name: &str, full: bool| -> anyhow::Result<KillOnDrop> {
        let mut cfg = agent_config(&pki, name, vec![collector.url()], &work.path().join(name));
        cfg.interval_secs = interval.as_secs();
        let path = work.path().join(format!("{name}.toml"));
        write_agent_toml(&cfg, &path);
        if !full {
            let text = std::fs::read_to_string(&path)?
                .replace("[weights]\n", "[weights]\nenabled = false\n")
                + "\n[net]\nenabled = false\n";
            std::fs::write(&path, text)?;
        }
        Ok(KillOnDrop(
            Command::new(bin_path("e2e-agent"))
                .args(["run", "--config", &path.to_string_lossy()])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    };
    let agent = spawn_agent("bench-node", false)?;
    let full = spawn_agent("bench-full", true)?;
    let ne_port = sov_e2e::free_port();
    let ne = KillOnDrop(
        Command::new(&ne_bin)
            .arg(format!("--web.listen-address=127.0.0.1:{ne_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let (agent_pid, full_pid, ne_pid) = (agent.0.id(), full.0.id(), ne.0.id());

    let mut agent_rss = Vec::new();
    let mut full_rss = Vec::new();
    let mut ne_rss = Vec::new();
    let mut scraped = 0usize;
    let mut start = None;
    let total = WARMUP_CYCLES + cycles;
    let began = Instant::now();
    for i in 0..total {
        tokio::time::sleep_until((began + interval * (i + 1)).into()).await;
        scraped = tokio::task::spawn_blocking(move || scrape(ne_port)).await?;
        if i + 1 == WARMUP_CYCLES {
            start = Some((
                Instant::now(),
                cpu_secs(agent_pid),
                cpu_secs(ne_pid),
                reports(&pki, &collector.url(), "bench-node").await,
                cpu_secs(full_pid),
                reports(&pki, &collector.url(), "bench-full").await,
            ));
        }
        if i + 1 > WARMUP_CYCLES {
            agent_rss.push(rss_bytes(agent_pid));
            full_rss.push(rss_bytes(full_pid));
            ne_rss.push(rss_bytes(ne_pid));
        }
    }
    // Let the last report land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (t0, a0, n0, r0, f0, fr0) = start.ok_or_else(|| anyhow::anyhow!("no warm-up"))?;
    let elapsed = t0.elapsed().as_secs_f64();
    let agent_cpu = cpu_secs(agent_pid) - a0;
    let ne_cpu = cpu_secs(ne_pid) - n0;
    let agent_cycles = reports(&pki, &collector.url(), "bench-node")
        .await
        .saturating_sub(r0)
        .max(1);
    let full_cpu = cpu_secs(full_pid) - f0;
    let full_cycles = reports(&pki, &collector.url(), "bench-full")
        .await
        .saturating_sub(fr0)
        .max(1);
    let f_rss = median(full_rss);
    let f_ms = full_cpu * 1000.0 / full_cycles as f64;
    let scrapes = u64::from(cycles);
    let a_rss = median(agent_rss);
    let n_rss = median(ne_rss);
    let a_ms = agent_cpu * 1000.0 / agent_cycles as f64;
    let n_ms = ne_cpu * 1000.0 / scrapes as f64;

    println!(
        "footprint over {elapsed:.0} s, interval {} s, after {WARMUP_CYCLES} warm-up cycles",
        interval.as_secs()
    );
    let row = |name: &str, rss: u64, ms: f64, cycles: u64| {
        println!(
            "{name:<34} {:>14.1} {ms:>16.2} {cycles:>8}",
            rss as f64 / 1048576.0
        );
    };
    println!(
        "{:<34} {:>14} {:>16} {:>8}",
        "process", "steady RSS MiB", "CPU ms / cycle", "cycles"
    );
    row(
        "sov-agent (host, GPU, processes)",
        a_rss,
        a_ms,
        agent_cycles,
    );
    row("sov-agent (+ weights + flows)", f_rss, f_ms, full_cycles);
    row("node_exporter", n_rss, n_ms, scrapes);
    println!("(last node_exporter scrape: {scraped} bytes)");
    println!(
        "{{\"bench\":\"footprint\",\"interval_secs\":{},\"agent_rss_bytes\":{a_rss},\"agent_cpu_ms_per_cycle\":{a_ms:.3},\"agent_cycles\":{agent_cycles},\"full_agent_rss_bytes\":{f_rss},\"full_agent_cpu_ms_per_cycle\":{f_ms:.3},\"node_exporter_rss_bytes\":{n_rss},\"node_exporter_cpu_ms_per_scrape\":{n_ms:.3},\"scrapes\":{scrapes}}}",
        interval.as_secs()
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "target RSS below node_exporter: {} (whole agent: {})",
        verdict(a_rss < n_rss),
        verdict(f_rss < n_rss)
    );
    println!(
        "target CPU per cycle below node_exporter's per scrape: {} (whole agent: {})",
        verdict(a_ms < n_ms),
        verdict(f_ms < n_ms)
    );
    drop(full);
    drop(agent);
    drop(ne);
    collector.stop().await;
    Ok(())
}
