//! Side-by-side footprint: the real agent process (its whole report cycle: host, GPUs via NVML,
//! processes, spool fsync, mTLS push) against Prometheus node_exporter scraped on loopback at
//! the same interval, in one run on the same machine. Prints steady RSS and CPU time per cycle.
//!
//! ```sh
//! apt-get install prometheus-node-exporter     # once
//! cargo run --release -p sov-e2e --example bench_footprint -- --cycles 30 --interval-secs 2
//! # a busy node: the same three processes at 0, 1,000 and 3,000 extra processes, with 200
//! # processes holding a TCP connection and 20 extra network namespaces all along
//! cargo run --release -p sov-e2e --example bench_footprint -- --interval-secs 1 --cycles 60 \
//!     --processes 0,1000,3000 --connections 200 --namespaces 20
//! # the containers work merged: 100 pods of 100 connections each, 300 processes mapping the
//! # same 20 weight files (1 MiB safetensors outside every root)
//! cargo run --release -p sov-e2e --example bench_footprint -- --interval-secs 1 --cycles 30 \
//!     --namespaces 100 --ns-connections 100 --mappers 300 --files 20
//! ```
//!
//! The agents run `e2e-agent` of this build (the same `cli::main` as `sov-agent`); to measure the
//! shipped agent, built with its own profile, name it: `cargo build --profile agent -p sov-agent`
//! then `CARGO_BIN_EXE_e2e-agent=target/agent/sov-agent` in the environment (a node keeps the
//! pages of the binary it runs resident, so the profile shows in RSS: docs/PERFORMANCE.md §3b).
//!
//! CPU comes from `/proc/<pid>/stat` (utime + stime) over the measured cycles, RSS from
//! `/proc/<pid>/status` (`VmRSS`) sampled every cycle (median after the warm-up).
//!
//! The load, made by this benchmark and killed when it ends: `--connections M` processes (this
//! executable again, `--hold ADDR`) each holding one loopback TCP connection to a listener of
//! the benchmark; `--namespaces K` processes each in a network namespace of its own
//! (`unshare --net`, root; with `--ns-connections C`, each also holds C TCP connections over
//! its namespace's loopback, both ends, as a pod would); `--mappers P` python3 processes each
//! mapping the same `--files F` generated safetensors files; then, size by size, `sleep` processes up to each `--processes` size
//! (extra processes beyond those). Each size gets its own warm-up and measured cycles, with the
//! load average printed beside it. `--short-every-ms N` adds a short TCP connection every N ms
//! to a non-loopback address of this machine (each closes before a sample sees it: the whole
//! agent's owner glances run all along, as on a node with short outbound connections).

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

/// `--processes 0,1000,3000`: the sizes, in order (default: one size, 0).
fn sizes(args: &[String]) -> Vec<usize> {
    args.iter()
        .position(|a| a == "--processes")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![0])
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn process_count() -> usize {
    std::fs::read_dir("/proc").map_or(0, |d| {
        d.flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .count()
    })
}

/// `--hold-many C` (inside a fresh network namespace): bring loopback up, open C connections
/// to a listener of its own, move a few bytes over each, and keep them all.
fn hold_many(c: usize) -> ! {
    let _ = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let mut held = Vec::with_capacity(2 * c);
    if let Ok(l) = std::net::TcpListener::bind("127.0.0.1:0")
        && let Ok(addr) = l.local_addr()
    {
        for _ in 0..c {
            let (Ok(mut a), Ok((mut b, _))) = (TcpStream::connect(addr), l.accept()) else {
                break;
            };
            let mut buf = [0u8; 1024];
            let _ = a.write_all(&[b'x'; 1024]);
            let _ = b.read_exact(&mut buf);
            let _ = b.write_all(&[b'y'; 1024]);
            let _ = a.read_exact(&mut buf);
            held.push(a);
            held.push(b);
        }
        held.push(TcpStream::connect(addr).unwrap_or_else(|_| std::process::exit(1)));
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Map every file named in argv, then wait (killed by the benchmark).
const MAP: &str = "import mmap, sys, time\n\
maps = []\n\
for p in sys.argv[1:]:\n    \
f = open(p, 'rb'); maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)); f.close()\n\
time.sleep(7200)\n";

/// A safetensors file of one F32 tensor of `elements` elements.
fn safetensors(elements: usize, seed: u8) -> Vec<u8> {
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{elements}],"data_offsets":[0,{}]}}}}"#,
        elements * 4
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend((0..elements * 4).map(|i| (i as u8).wrapping_mul(seed)));
    out
}

/// `--short-every-ms N`: a thread that connects every `every` to a listener on this machine's
/// first non-loopback IPv4 address (the one a route to a documentation address leaves from),
/// sends 1 KiB and closes; the listener's thread accepts, reads and closes. Returns the address
/// and the thread.
fn short_connections(
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    made: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<(std::net::SocketAddr, std::thread::JoinHandle<()>)> {
    use std::sync::atomic::Ordering;
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    probe.connect("192.0.2.254:9")?;
    let ip = probe.local_addr()?.ip();
    anyhow::ensure!(
        !ip.is_loopback() && !ip.is_unspecified(),
        "no non-loopback address for --short-every-ms ({ip})"
    );
    let listener = std::net::TcpListener::bind((ip, 0))?;
    let to = listener.local_addr()?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        }
    });
    let t = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(mut c) = TcpStream::connect(to) {
                let _ = c.write_all(&[b'x'; 1024]);
                made.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(every);
        }
    });
    Ok((to, t))
}

/// `--hold ADDR`: connect and keep the connection until the benchmark closes it.
fn hold(addr: &str) -> ! {
    if let Ok(mut s) = TcpStream::connect(addr) {
        let mut b = [0u8; 64];
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    }
    std::process::exit(0)
}

fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
}

/// One size's figures.
struct Row {
    extra: usize,
    processes: usize,
    load: String,
    agent: (u64, f64, u64),
    full: (u64, f64, u64),
    ne: (u64, f64, u64),
    cache: String,
}

struct Bench<'a> {
    pki: &'a Pki,
    url: String,
    interval: Duration,
    pids: (u32, u32, u32),
    ne_port: u16,
    metrics_port: u16,
    warmup: u32,
}

impl Bench<'_> {
    /// Warm up, then measure `cycles` intervals.
    async fn measure(&self, extra: usize, cycles: u32) -> anyhow::Result<Row> {
        let (agent_pid, full_pid, ne_pid) = self.pids;
        let ne_port = self.ne_port;
        let mut agent_rss = Vec::new();
        let mut full_rss = Vec::new();
        let mut ne_rss = Vec::new();
        let mut start = None;
        let total = self.warmup + cycles;
        let began = Instant::now();
        for i in 0..total {
            tokio::time::sleep_until((began + self.interval * (i + 1)).into()).await;
            tokio::task::spawn_blocking(move || scrape(ne_port)).await?;
            if i + 1 == self.warmup {
                start = Some((
                    cpu_secs(agent_pid),
                    cpu_secs(ne_pid),
                    reports(self.pki, &self.url, "bench-node").await,
                    cpu_secs(full_pid),
                    reports(self.pki, &self.url, "bench-full").await,
                ));
            }
            if i + 1 > self.warmup {
                agent_rss.push(rss_bytes(agent_pid));
                full_rss.push(rss_bytes(full_pid));
                ne_rss.push(rss_bytes(ne_pid));
            }
        }
        // Let the last report land.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (a0, n0, r0, f0, fr0) = start.ok_or_else(|| anyhow::anyhow!("no warm-up"))?;
        let agent_cycles = reports(self.pki, &self.url, "bench-node")
            .await
            .saturating_sub(r0)
            .max(1);
        let full_cycles = reports(self.pki, &self.url, "bench-full")
            .await
            .saturating_sub(fr0)
            .max(1);
        let per = |cpu: f64, n: u64| cpu * 1000.0 / n as f64;
        let scrapes = u64::from(cycles);
        let port = self.metrics_port;
        let metrics = tokio::task::spawn_blocking(move || metrics_text(port)).await?;
        let cache = metrics
            .lines()
            .filter(|l| l.starts_with("sov_agent_cache_"))
            .collect::<Vec<_>>()
            .join("\n");
        Ok(Row {
            extra,
            processes: process_count(),
            load: load_average(),
            agent: (
                median(agent_rss),
                per(cpu_secs(agent_pid) - a0, agent_cycles),
                agent_cycles,
            ),
            full: (
                median(full_rss),
                per(cpu_secs(full_pid) - f0, full_cycles),
                full_cycles,
            ),
            ne: (median(ne_rss), per(cpu_secs(ne_pid) - n0, scrapes), scrapes),
            cache,
        })
    }
}

fn metrics_text(port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(addr) = args
        .iter()
        .position(|a| a == "--hold")
        .and_then(|i| args.get(i + 1))
    {
        hold(addr);
    }
    if let Some(c) = args
        .iter()
        .position(|a| a == "--hold-many")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
    {
        hold_many(c);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    let cycles = u32::try_from(arg(&args, "--cycles", 30))?.max(1);
    let interval = Duration::from_secs(arg(&args, "--interval-secs", 2).max(1));
    let connections = usize::try_from(arg(&args, "--connections", 0))?;
    let namespaces = usize::try_from(arg(&args, "--namespaces", 0))?;
    let sizes = sizes(&args);
    // Cycles before each size's measurement (a size's new processes are read once, by every
    // collector, in its first cycles; the weights scan reads them within 60 s).
    let warmup = u32::try_from(arg(&args, "--warmup-cycles", u64::from(WARMUP_CYCLES)))?.max(1);
    let Some(ne_bin) = node_exporter_path() else {
        eprintln!("node_exporter not found: apt-get install prometheus-node-exporter");
        std::process::exit(2);
    };

    // The load that stays for every size: connections and namespaces.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let me = std::env::current_exe()?;
    let mut load: Vec<KillOnDrop> = Vec::new();
    let mut accepted = Vec::with_capacity(connections);
    for _ in 0..connections {
        load.push(KillOnDrop(
            quiet(Command::new(&me).args(["--hold", &addr])).spawn()?,
        ));
        accepted.push(listener.accept()?.0);
    }
    let ns_connections = usize::try_from(arg(&args, "--ns-connections", 0))?;
    for _ in 0..namespaces {
        let cmd = if ns_connections > 0 {
            // unshare execs the holder: the same pid, killed with it.
            quiet(
                Command::new("unshare")
                    .arg("--net")
                    .arg(&me)
                    .args(["--hold-many", &ns_connections.to_string()]),
            )
            .spawn()?
        } else {
            quiet(Command::new("unshare").args(["--net", "sleep", "7200"])).spawn()?
        };
        load.push(KillOnDrop(cmd));
    }
    // Short connections to a non-loopback address of this machine, one every N ms: each closes
    // before any sample sees it, so the whole agent's owner glances run all along.
    let short_every = arg(&args, "--short-every-ms", 0);
    let short_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let short_made = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let short = if short_every > 0 {
        Some(short_connections(
            Duration::from_millis(short_every),
            short_stop.clone(),
            short_made.clone(),
        )?)
    } else {
        None
    };
    let mappers = usize::try_from(arg(&args, "--mappers", 0))?;
    let files = usize::try_from(arg(&args, "--files", 20))?;
    let weights_dir = tempfile::tempdir()?;
    if mappers > 0 {
        let paths: Vec<String> = (0..files)
            .map(|i| {
                let p = weights_dir.path().join(format!("shard-{i:05}.safetensors"));
                std::fs::write(&p, safetensors(262_144 + i, (i % 250) as u8 + 1))?;
                Ok(p.to_string_lossy().into_owned())
            })
            .collect::<anyhow::Result<_>>()?;
        for _ in 0..mappers {
            load.push(KillOnDrop(
                quiet(Command::new("python3").args(["-c", MAP]).args(&paths)).spawn()?,
            ));
        }
    }

    let pki = Pki::new();
    let work = tempfile::tempdir()?;
    let collector = InProcessCollector::start(&pki, &work.path().join("collector"), |_| {}).await;
    let metrics_port = sov_e2e::free_port();
    // Two agents in the same run: the telemetry cycle (host, GPUs, processes: what
    // node_exporter + dcgm-exporter cover) and the whole agent (also weight files and flows).
    let spawn_agent = |name: &str, full: bool| -> anyhow::Result<KillOnDrop> {
        let mut cfg = agent_config(&pki, name, vec![collector.url()], &work.path().join(name));
        cfg.interval_secs = interval.as_secs();
        let path = work.path().join(format!("{name}.toml"));
        write_agent_toml(&cfg, &path);
        let text = std::fs::read_to_string(&path)?;
        let text = if full {
            format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n")
        } else {
            text.replace("[weights]\n", "[weights]\nenabled = false\n")
                + "\n[net]\nenabled = false\n"
        };
        std::fs::write(&path, text)?;
        // SOV_BENCH_FULL_WRAP="heaptrack -o /tmp/x": the whole agent run under that command
        // (a memory profile; its figures are then the wrapper's, not for the table).
        let wrap: Vec<String> = std::env::var("SOV_BENCH_FULL_WRAP")
            .ok()
            .filter(|_| full)
            .map(|w| w.split_ascii_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin_path("e2e-agent"));
                c
            }
            None => Command::new(bin_path("e2e-agent")),
        };
        cmd.args(["run", "--config", &path.to_string_lossy()])
            .env("RUST_LOG", "warn");
        Ok(KillOnDrop(quiet(&mut cmd).spawn()?))
    };
    let agent = spawn_agent("bench-node", false)?;
    let full = spawn_agent("bench-full", true)?;
    let ne_port = sov_e2e::free_port();
    let ne = KillOnDrop(
        quiet(Command::new(&ne_bin).arg(format!("--web.listen-address=127.0.0.1:{ne_port}")))
            .spawn()?,
    );
    let bench = Bench {
        pki: &pki,
        url: collector.url(),
        interval,
        pids: (agent.0.id(), full.0.id(), ne.0.id()),
        ne_port,
        metrics_port,
        warmup,
    };

    let mut rows = Vec::new();
    let mut extra: Vec<KillOnDrop> = Vec::new();
    for &size in &sizes {
        while extra.len() < size {
            extra.push(KillOnDrop(
                quiet(Command::new("sleep").arg("7200")).spawn()?,
            ));
        }
        let row = bench.measure(size, cycles).await?;
        eprintln!(
            "{size} extra processes: agent {:.2} ms, whole agent {:.2} ms, node_exporter {:.2} ms (load {})",
            row.agent.1, row.full.1, row.ne.1, row.load
        );
        rows.push(row);
    }

    println!(
        "footprint, interval {} s, {warmup} warm-up + {cycles} measured cycles per size; \
         {connections} processes holding a TCP connection, {namespaces} extra network namespaces \
         ({ns_connections} connections each), {mappers} processes mapping {files} weight files",
        interval.as_secs()
    );
    if let Some((to, _)) = &short {
        println!(
            "short connections to {to}: one every {short_every} ms, {} made",
            short_made.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    println!(
        "{:>6} {:>6} {:<16} | {:>9} {:>8} | {:>9} {:>8} | {:>9} {:>8} | target (whole agent)",
        "extra",
        "procs",
        "load 1/5/15",
        "agent MiB",
        "ms/cyc",
        "whole MiB",
        "ms/cyc",
        "n_e MiB",
        "ms/scr"
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for r in &rows {
        println!(
            "{:>6} {:>6} {:<16} | {:>9.1} {:>8.2} | {:>9.1} {:>8.2} | {:>9.1} {:>8.2} | RSS {} CPU {}",
            r.extra,
            r.processes,
            r.load,
            mib(r.agent.0),
            r.agent.1,
            mib(r.full.0),
            r.full.1,
            mib(r.ne.0),
            r.ne.1,
            verdict(r.full.0 < r.ne.0),
            verdict(r.full.1 < r.ne.1),
        );
    }
    for r in &rows {
        println!(
            "{{\"bench\":\"footprint\",\"interval_secs\":{},\"extra_processes\":{},\"processes\":{},\"connections\":{connections},\"namespaces\":{namespaces},\"ns_connections\":{ns_connections},\"mappers\":{mappers},\"files\":{files},\"load\":\"{}\",\"agent_rss_bytes\":{},\"agent_cpu_ms_per_cycle\":{:.3},\"agent_cycles\":{},\"full_agent_rss_bytes\":{},\"full_agent_cpu_ms_per_cycle\":{:.3},\"full_agent_cycles\":{},\"node_exporter_rss_bytes\":{},\"node_exporter_cpu_ms_per_scrape\":{:.3},\"scrapes\":{}}}",
            interval.as_secs(),
            r.extra,
            r.processes,
            r.load,
            r.agent.0,
            r.agent.1,
            r.agent.2,
            r.full.0,
            r.full.1,
            r.full.2,
            r.ne.0,
            r.ne.1,
            r.ne.2
        );
    }
    if let Some(r) = rows.last()
        && !r.cache.is_empty()
    {
        println!(
            "whole agent's caches at {} extra processes:\n{}",
            r.extra, r.cache
        );
    }
    short_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some((_, t)) = short {
        let _ = t.join();
    }
    drop(extra);
    drop(full);
    drop(agent);
    drop(ne);
    drop(accepted);
    drop(load);
    collector.stop().await;
    Ok(())
}
