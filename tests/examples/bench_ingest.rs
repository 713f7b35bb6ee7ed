//! Ingest and agent-footprint benchmark, on loopback with real mutual TLS and real SQLite
//! (WAL, `synchronous = FULL`: every acknowledged report has been fsynced).
//!
//! ```text
//! cargo build --release -p sov-e2e --bins --examples
//! cargo run --release -p sov-e2e --example bench_ingest -- [--nodes 8] [--reports 500] [--agent-secs 20]
//! ```
//!
//! 1. Ingest: an in-process collector; `--nodes` concurrent connections, each with its own agent
//!    certificate, each pushing `--reports` realistic reports one after another (the next push
//!    starts when the previous ack arrives, as the agent does). Then the same with one
//!    connection, which shows the cost of one commit. Every node is checked through
//!    `ListNodes` afterwards: reports == last_seq == `--reports`, missing == 0.
//! 2. Agent footprint: the real agent binary (`e2e-agent`, same main as `sov-agent`) as a child
//!    process reporting every second to an in-process collector for `--agent-secs`; its
//!    VmRSS/VmHWM and utime+stime are read from `/proc/<pid>/`.
//!
//! Prints a table, then one JSON line (the last line of stdout). Linux only (`/proc`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use prost::Message;
use sov_collector::auth::Role;
use sov_e2e::{InProcessCollector, KillOnDrop, Pki, agent_config, list_nodes, push_client};
use sov_proto::pb;

/// Epoch of every benchmark node (any fixed non-zero value).
const EPOCH: u64 = 1_700_000_000_000;
/// Per-core values in the host sample.
const CORES: usize = 64;
/// Processes in each report.
const PROCESSES: usize = 20;
/// Peer baseline from the design notes (DESIGN.md): node_exporter 1.5 (Debian).
const NODE_EXPORTER_RSS_MB: f64 = 20.0;
const NODE_EXPORTER_CPU_MS_PER_SCRAPE: f64 = 12.5;

#[derive(Debug, Clone, Copy)]
struct Args {
    nodes: usize,
    reports: u64,
    agent_secs: u64,
}

const USAGE: &str =
    "usage: bench_ingest [--nodes N (8)] [--reports M (500)] [--agent-secs S (20, 0 skips)]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        nodes: 8,
        reports: 500,
        agent_secs: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = || format!("{flag}: {value:?} is not a number\n{USAGE}");
        match flag.as_str() {
            "--nodes" => args.nodes = value.parse().with_context(bad)?,
            "--reports" => args.reports = value.parse().with_context(bad)?,
            "--agent-secs" => args.agent_secs = value.parse().with_context(bad)?,
            _ => bail!("unknown flag {flag:?}\n{USAGE}"),
        }
    }
    ensure!(
        args.nodes > 0 && args.reports > 0,
        "--nodes and --reports must be > 0"
    );
    Ok(args)
}

/// A report shaped like a busy node's: full node facts, 64 per-core values, 20 processes.
fn realistic_report(node: &str, seq: u64) -> pb::Report {
    let node_info = pb::NodeInfo {
        node: node.to_owned(),
        hostname: format!("{node}.dc1.example.ma"),
        site: "rabat-1".to_owned(),
        country: "MA".to_owned(),
        labels: [
            ("rack", "r12"),
            ("tier", "gpu"),
            ("owner", "research-platform"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        agent_version: sov_agent::run::AGENT_VERSION.to_owned(),
        boot_time_unix_ms: 1_699_000_000_000,
        os: "Linux 12 Debian GNU/Linux".to_owned(),
        kernel: "6.1.0-18-amd64".to_owned(),
        cpu_count: CORES as u32,
        cpu_brand: "AMD EPYC 9354 32-Core Processor".to_owned(),
    };
    let per_core: Vec<f32> = (0..CORES)
        .map(|i| ((i as f32 * 7.3 + seq as f32) % 100.0) + 0.25)
        .collect();
    let host = pb::HostSample {
        cpu_percent: 41.7,
        cpu_percent_per_core: per_core,
        load_1: 27.31,
        load_5: 25.02,
        load_15: 22.87,
        memory_total_bytes: 1_081_975_545_856,
        memory_used_bytes: 612_345_678_912,
        memory_available_bytes: 469_629_866_944,
        swap_total_bytes: 8_589_930_496,
        swap_used_bytes: 12_582_912,
        uptime_secs: 1_000_000 + seq * 10,
        process_count: 1_234,
    };
    let processes = (0..PROCESSES)
        .map(|i| {
            let pid = 10_000 + i as u32 * 37;
            pb::ProcessInfo {
                pid,
                parent_pid: 1,
                name: format!("python3-w{i}"),
                exe: "/opt/conda/envs/serve/bin/python3.11".to_owned(),
                cmdline: vec![
                    "python3".to_owned(),
                    "-m".to_owned(),
                    "vllm.entrypoints.openai.api_server".to_owned(),
                    "--model".to_owned(),
                    format!("/models/org/model-{i}"),
                    "--tensor-parallel-size".to_owned(),
                    "8".to_owned(),
                ],
                user: "svc-inference".to_owned(),
                start_time_unix_ms: 1_699_500_000_000 + i64::from(pid),
                cgroup: format!(
                    "/system.slice/docker-{:064x}.scope",
                    u128::from(pid) * 0x9e37_79b9_7f4a_7c15
                ),
                container_id: format!("{:064x}", u128::from(pid) * 0x9e37_79b9_7f4a_7c15),
                cpu_percent: 97.5 + i as f32,
                rss_bytes: 4_294_967_296 + u64::from(pid) * 4096,
                reasons: vec![
                    pb::ProcessReason::TopCpu as i32,
                    pb::ProcessReason::Gpu as i32,
                ],
                ..Default::default()
            }
        })
        .collect();
    pb::Report {
        epoch: EPOCH,
        seq,
        observed_unix_ms: 1_700_000_000_000 + i64::try_from(seq).unwrap_or(0) * 10_000,
        node_info: Some(node_info),
        host: Some(host),
        processes,
        interval_ms: 10_000,
        agent: Some(pb::AgentStats {
            spool_bytes: 4096,
            spool_reports: 1,
            dropped_reports: 0,
            rss_bytes: 12_000_000,
            cpu_percent: 0.1,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
struct IngestResult {
    nodes: usize,
    reports_per_node: u64,
    total: u64,
    wall: Duration,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
    /// Pushes slower than [`SLOW_MS`].
    slow: usize,
    /// CPU time of this whole process (pushing clients and collector) per stored report.
    cpu_ms_per_report: f64,
}

/// A push slower than this counts as slow.
const SLOW_MS: f64 = 20.0;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted latencies.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One ingest run against a fresh collector and a fresh database.
async fn ingest_run(
    pki: &Arc<Pki>,
    label: &str,
    nodes: usize,
    reports: u64,
) -> Result<IngestResult> {
    let data = tempfile::tempdir().context("tempdir")?;
    let collector = InProcessCollector::start(pki, data.path(), |_| {}).await;
    let url = collector.url();
    let names: Vec<String> = (0..nodes).map(|i| format!("{label}-node-{i:03}")).collect();

    // Connect everyone first, then start pushing together.
    let mut clients = Vec::with_capacity(nodes);
    for name in &names {
        let tls = pki.client_tls(Role::Agent, name);
        let client = push_client(&tls, &url)
            .await
            .map_err(|e| anyhow::anyhow!("connect {name}: {e}"))?;
        clients.push(client);
    }
    let start_line = Arc::new(tokio::sync::Barrier::new(nodes + 1));
    let mut tasks = Vec::with_capacity(nodes);
    for (name, mut client) in names.iter().cloned().zip(clients) {
        let barrier = start_line.clone();
        tasks.push(tokio::spawn(async move {
            // Build every report before the clock starts: the measured time is TLS, HTTP/2,
            // decode, validation, the SQLite commit and the ack.
            let batch: Vec<pb::Report> = (1..=reports)
                .map(|seq| realistic_report(&name, seq))
                .collect();
            let mut lat = Vec::with_capacity(batch.len());
            barrier.wait().await;
            for report in batch {
                let seq = report.seq;
                let t = Instant::now();
                let ack = client
                    .push(report)
                    .await
                    .with_context(|| format!("{name} push seq {seq}"))?
                    .into_inner();
                lat.push(t.elapsed());
                ensure!(
                    ack.seq == seq && ack.epoch == EPOCH && !ack.duplicate,
                    "{name}: bad ack for seq {seq}: {ack:?}"
                );
            }
            anyhow::Ok(lat)
        }));
    }
    start_line.wait().await;
    let cpu0 = cpu_ticks(std::process::id())?;
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(nodes * reports as usize);
    for t in tasks {
        lat.extend(t.await.context("push task panicked")??);
    }
    let wall = t0.elapsed();
    let cpu1 = cpu_ticks(std::process::id())?;

    // Every report must be stored exactly once and counted.
    let summaries = list_nodes(pki, &url)
        .await
        .map_err(|e| anyhow::anyhow!("ListNodes: {e}"))?;
    for name in &names {
        let Some(n) = summaries.iter().find(|n| &n.node == name) else {
            bail!("VERIFY FAILED: collector does not know node {name}");
        };
        ensure!(
            n.reports == reports && n.last_seq == reports && n.missing == 0 && n.conflicts == 0,
            "VERIFY FAILED for {name}: reports={} last_seq={} missing={} conflicts={} (expected {reports}, {reports}, 0, 0)",
            n.reports,
            n.last_seq,
            n.missing,
            n.conflicts
        );
    }
    collector.stop().await;

    lat.sort_unstable();
    let total = lat.len() as u64;
    let sum: Duration = lat.iter().sum();
    let tck = clk_tck() as f64;
    Ok(IngestResult {
        nodes,
        reports_per_node: reports,
        total,
        wall,
        per_sec: total as f64 / wall.as_secs_f64(),
        p50_ms: ms(percentile(&lat, 50.0)),
        p99_ms: ms(percentile(&lat, 99.0)),
        max_ms: ms(percentile(&lat, 100.0)),
        mean_ms: ms(sum) / total as f64,
        slow: lat.iter().filter(|d| ms(**d) > SLOW_MS).count(),
        cpu_ms_per_report: (cpu1 - cpu0) as f64 * 1000.0 / tck / total as f64,
    })
}

#[derive(Debug, Clone)]
struct AgentResult {
    secs: f64,
    reports: u64,
    cpu_ms: f64,
    cpu_ms_per_report: f64,
    cpu_percent: f64,
    /// The same window from /proc/<pid>/task/*/schedstat (nanoseconds, live threads only).
    sched_cpu_ms_per_report: f64,
    /// CPU (schedstat) from exec until the first report was stored.
    startup_cpu_ms: f64,
    rss_max_mb: f64,
    rss_final_mb: f64,
    hwm_mb: f64,
    clk_tck: u64,
}

/// Clock ticks per second for /proc/<pid>/stat (USER_HZ); 100 on every mainstream Linux.
fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// utime + stime of `pid` in clock ticks (all threads, including exited ones).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14 and stime field 15.
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Sum of the on-CPU nanoseconds of `pid`'s live threads (first field of each
/// /proc/<pid>/task/<tid>/schedstat); finer than clock ticks but blind to exited threads.
fn sched_ns(pid: u32) -> Result<u64> {
    let mut total = 0u64;
    let dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between listing and reading.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            total += ns;
        }
    }
    Ok(total)
}

/// (VmRSS, VmHWM) of `pid` in kB.
fn rss_kb(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The `e2e-agent` binary beside this example's directory (target/<profile>/e2e-agent).
fn agent_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("CARGO_BIN_EXE_e2e-agent") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current exe")?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("no target dir above the example")?;
    let path = dir.join("e2e-agent");
    ensure!(
        path.exists(),
        "{} is not built; run `cargo build --release -p sov-e2e --bins --examples` first",
        path.display()
    );
    Ok(path)
}

async fn last_seq(pki: &Pki, url: &str, name: &str) -> u64 {
    sov_e2e::node(pki, url, name)
        .await
        .map(|n| n.last_seq)
        .unwrap_or(0)
}

async fn agent_footprint(pki: &Arc<Pki>, secs: u64) -> Result<AgentResult> {
    let bin = agent_binary()?;
    let work = tempfile::tempdir().context("tempdir")?;
    let collector = InProcessCollector::start(pki, &work.path().join("collector"), |_| {}).await;
    let url = collector.url();
    let name = "bench-agent";
    let mut cfg = agent_config(pki, name, vec![url.clone()], &work.path().join("spool"));
    cfg.interval_secs = 1;
    let cfg_path = work.path().join("agent.toml");
    sov_e2e::write_agent_toml(&cfg, &cfg_path);
    let log = work.path().join("agent.log");
    let cfg_arg = cfg_path.to_string_lossy().into_owned();
    let mut child: KillOnDrop =
        sov_e2e::spawn(&bin.to_string_lossy(), &["run", "--config", &cfg_arg], &log);
    let pid = child.0.id();
    let tck = clk_tck() as f64;
    let mut rss_max = 0u64;
    let sample = |rss_max: &mut u64| -> Result<(u64, u64)> {
        let (rss, hwm) = rss_kb(pid)?;
        *rss_max = (*rss_max).max(rss);
        Ok((rss, hwm))
    };

    // Warm-up: until the first report is stored (TLS loaded, connected, spool created).
    let spawned = Instant::now();
    while last_seq(pki, &url, name).await < 1 {
        if let Some(status) = child.0.try_wait().context("wait agent")? {
            bail!(
                "agent exited with {status}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        ensure!(
            spawned.elapsed() < Duration::from_secs(30),
            "agent delivered nothing in 30 s; see its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        sample(&mut rss_max)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu0 = cpu_ticks(pid)?;
    let ns0 = sched_ns(pid)?;
    let seq0 = last_seq(pki, &url, name).await;
    let t0 = Instant::now();
    let window = Duration::from_secs(secs);
    while t0.elapsed() < window {
        sample(&mut rss_max)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu1 = cpu_ticks(pid)?;
    let ns1 = sched_ns(pid)?;
    let elapsed = t0.elapsed();
    let (rss_final, hwm) = sample(&mut rss_max)?;
    // Give the last built report a moment to be acked before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seq1 = last_seq(pki, &url, name).await;
    child.kill9();
    collector.stop().await;

    let reports = seq1.saturating_sub(seq0);
    ensure!(reports > 0, "agent delivered no report during the window");
    let cpu_ms = (cpu1 - cpu0) as f64 * 1000.0 / tck;
    Ok(AgentResult {
        secs: elapsed.as_secs_f64(),
        reports,
        cpu_ms,
        cpu_ms_per_report: cpu_ms / reports as f64,
        cpu_percent: cpu_ms / 10.0 / elapsed.as_secs_f64(),
        sched_cpu_ms_per_report: ns1.saturating_sub(ns0) as f64 / 1e6 / reports as f64,
        startup_cpu_ms: ns0 as f64 / 1e6,
        rss_max_mb: rss_max as f64 / 1024.0,
        rss_final_mb: rss_final as f64 / 1024.0,
        hwm_mb: hwm as f64 / 1024.0,
        clk_tck: tck as u64,
    })
}

fn ingest_json(r: &IngestResult) -> serde_json::Value {
    serde_json::json!({
        "nodes": r.nodes,
        "reports_per_node": r.reports_per_node,
        "total": r.total,
        "wall_s": r.wall.as_secs_f64(),
        "reports_per_s": r.per_sec,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "max_ms": r.max_ms,
        "mean_ms": r.mean_ms,
        "slow_pushes_over_20ms": r.slow,
        "process_cpu_ms_per_report": r.cpu_ms_per_report,
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let sample = realistic_report("bench-node-000", 1);
    let size = sample.encoded_len();
    println!(
        "machine: {} x {cpus}; database and spools under {}",
        cpu_model(),
        std::env::temp_dir().display()
    );
    println!(
        "report: {size} bytes encoded ({CORES} per-core values, {} processes)",
        sample.processes.len()
    );

    let pki = Arc::new(Pki::new());
    println!(
        "ingest: {} connections x {} reports ...",
        args.nodes, args.reports
    );
    let multi = ingest_run(&pki, "multi", args.nodes, args.reports).await?;
    println!("ingest: 1 connection x {} reports ...", args.reports);
    let single = ingest_run(&pki, "single", 1, args.reports).await?;
    println!(
        "verified: every node has reports == last_seq == {} and missing == 0",
        args.reports
    );

    let agent = if args.agent_secs > 0 {
        println!(
            "agent: real e2e-agent process, interval 1 s, {} s window ...",
            args.agent_secs
        );
        Some(agent_footprint(&pki, args.agent_secs).await?)
    } else {
        None
    };

    println!();
    println!(
        "{:<16} {:>7} {:>7} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>10}",
        "ingest",
        "reports",
        "wall s",
        "reports/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "mean ms",
        ">20 ms",
        "CPU ms/rep"
    );
    for (label, r) in [
        (
            format!(
                "{} connection{}",
                multi.nodes,
                if multi.nodes == 1 { "" } else { "s" }
            ),
            &multi,
        ),
        ("1 connection".to_owned(), &single),
    ] {
        println!(
            "{label:<16} {:>7} {:>7.2} {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7} {:>10.3}",
            r.total,
            r.wall.as_secs_f64(),
            r.per_sec,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.mean_ms,
            r.slow,
            r.cpu_ms_per_report
        );
    }
    let nodes_at_10s = multi.per_sec * 10.0;
    println!(
        "(CPU ms/rep: this whole process, pushing clients and collector together, per report)"
    );
    println!(
        "=> at one report per node every 10 s, this rate is about {nodes_at_10s:.0} nodes per collector"
    );
    if let Some(a) = &agent {
        println!();
        println!(
            "{:<22} {:>12} {:>12} {:>12}",
            "agent footprint", "sov-agent", "node_exporter", "ratio"
        );
        println!(
            "{:<22} {:>12.1} {:>12.1} {:>12.2}",
            "RSS max MB",
            a.rss_max_mb,
            NODE_EXPORTER_RSS_MB,
            a.rss_max_mb / NODE_EXPORTER_RSS_MB
        );
        println!(
            "{:<22} {:>12.2} {:>12.1} {:>12.2}",
            "CPU ms per report",
            a.cpu_ms_per_report,
            NODE_EXPORTER_CPU_MS_PER_SCRAPE,
            a.cpu_ms_per_report / NODE_EXPORTER_CPU_MS_PER_SCRAPE
        );
        println!(
            "RSS final {:.1} MB, VmHWM {:.1} MB; {} reports in {:.1} s; CPU {:.0} ms = {:.2} % of one core (clock tick {} Hz, so +/-{:.0} ms); schedstat: {:.2} CPU ms per report; CPU from start to first stored report (schedstat): {:.1} ms",
            a.rss_final_mb,
            a.hwm_mb,
            a.reports,
            a.secs,
            a.cpu_ms,
            a.cpu_percent,
            a.clk_tck,
            1000.0 / a.clk_tck as f64,
            a.sched_cpu_ms_per_report,
            a.startup_cpu_ms
        );
    }

    let json = serde_json::json!({
        "bench": "bench_ingest",
        "cpu_model": cpu_model(),
        "cpus": cpus,
        "report_bytes": size,
        "ingest_multi": ingest_json(&multi),
        "ingest_single": ingest_json(&single),
        "nodes_at_10s_interval": nodes_at_10s.floor(),
        "agent": agent.as_ref().map(|a| serde_json::json!({
            "window_s": a.secs,
            "reports": a.reports,
            "cpu_ms": a.cpu_ms,
            "cpu_ms_per_report": a.cpu_ms_per_report,
            "cpu_percent": a.cpu_percent,
            "schedstat_cpu_ms_per_report": a.sched_cpu_ms_per_report,
            "startup_cpu_ms": a.startup_cpu_ms,
            "rss_max_mb": a.rss_max_mb,
            "rss_final_mb": a.rss_final_mb,
            "vm_hwm_mb": a.hwm_mb,
            "node_exporter_rss_mb": NODE_EXPORTER_RSS_MB,
            "node_exporter_cpu_ms_per_scrape": NODE_EXPORTER_CPU_MS_PER_SCRAPE,
        })),
    });
    println!();
    println!("{json}");
    Ok(())
}
