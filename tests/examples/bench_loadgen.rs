//! Load generator: N simulated agents over mutual TLS on loopback, each with its own
//! certificate and one connection, pushing reports back to back (the next push starts when the
//! previous ack arrives, as the agent does). Measured in one run, side by side, against:
//!
//! 1. `bare`: a tonic server with the same mutual TLS whose `Ingest.Push` only returns an Ack
//!    (the ceiling: TLS, HTTP/2, protobuf and the clients themselves);
//! 2. `sqlite`: the real collector (`sov_collector::app::run`) on SQLite;
//! 3. `postgres`: the real collector on PostgreSQL, in a fresh schema dropped at the end
//!    (skipped with a note when PostgreSQL is unreachable).
//!
//! ```text
//! cargo run --release -p sov-e2e --example bench_loadgen -- [--agents 200] [--secs 15] [--flows 50]
//! cargo build --release -p sov-e2e --bins --examples   # once, for the idle mode's collector
//! cargo run --release -p sov-e2e --example bench_loadgen -- --idle-connections 10000
//! ```
//!
//! Each report carries `--flows` flows to a few hundred public-looking addresses, a host sample
//! and the processes that own the flows. Rates, latencies and CPU are taken over `--secs`
//! seconds after a 2 s warm-up. The collectors run in this process, so RSS is this process's
//! VmRSS before the target starts vs at the end of its window (clients included).
//!
//! `--idle-connections N` instead starts the real collector as a child process (`e2e-collector`,
//! SQLite), opens N mutual-TLS connections to it (each its own certificate, a handshake and one
//! push), leaves them idle and reports the collector's RSS growth per connection. N is capped
//! at the soft open-files limit minus 100.
//!
//! On the two stores it also samples the derivation lag (now − "derived up to": reports are
//! acknowledged once stored and derived afterwards in batches) every 200 ms of the window, and
//! times how long the backlog takes to drain once the load stops. Then `derive-only`: N
//! reports of the same shape (`--derive-reports`, 10,000) appended straight into a fresh store,
//! derived by the collector's deriver with no TLS in the way (reports derived per second).
//!
//! `--replicas N` adds `pg-x1` and `pg-xN`: the collector as 1, then N child processes
//! (`e2e-collector serve`, build it first) on one fresh PostgreSQL schema, the agents spread
//! over them, each process's CPU per report measured apart from PostgreSQL's and the clients';
//! the derive-only part then also runs N derivers on one schema (`pg-xN`).
//!
//! Reports are dated as an agent dates them: from the minute the target starts, 10 s apart per
//! push, so their flows land in minutes the collector's hourly rollup has not passed.
//! `--late-reports` dates them in November 2023 instead (as before 2026-12-07): every flow
//! row is then a late row of an hour already rolled up (the rollup runs as the collector
//! starts), and goes through the hour, day, fleet and rest-of-day rows as it is derived; the
//! JSON's `late_flow_rows` counts them (docs/PERFORMANCE.md §8j).
//!
//! Prints a table, one JSON line, then the targets with met/MISSED. Linux only (`/proc`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use prost::Message;
use sov_agent::transport::ClientTls;
use sov_collector::auth::Role;
use sov_collector::config::CollectorConfig;
use sov_collector::store::postgres::PostgresStore;
use sov_collector::store::{SqliteStore, Store};
use sov_e2e::{InProcessCollector, KillOnDrop, Pki, list_nodes, push_client};
use sov_proto::pb;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// Epoch of every simulated agent.
const EPOCH: u64 = 1_700_000_000_000;
/// Per-core values in the host sample.
const CORES: usize = 16;
/// Processes owning the flows.
const PROCESSES: usize = 5;
/// Distinct remote addresses the flows are spread over.
const REMOTES: usize = 300;
/// Warm-up before the measured window.
const WARMUP: Duration = Duration::from_secs(2);
/// Targets from the issue.
const TARGET_RATIO: f64 = 0.5;
const TARGET_RATE: f64 = 5_000.0;
const TARGET_CONNECTIONS: f64 = 10_000.0;
const TARGET_RSS_MIB: f64 = 1024.0;

#[derive(Debug, Clone, Copy)]
struct Args {
    agents: usize,
    secs: u64,
    flows: usize,
    idle: Option<usize>,
    derive_reports: usize,
    replicas: usize,
}

const USAGE: &str = "usage: bench_loadgen [--agents N (200)] [--secs S (15); 0: derive-only] [--flows F (50)] \
                     [--derive-reports N (10000)] [--batch-reports N ([derive] batch_reports, as shipped)] \
                     [--derive-nice N ([derive] nice, as shipped)] \
                     [--derive-connections N ([derive] connections, as shipped; PostgreSQL)] \
                     [--max-in-flight N (as shipped)] \
                     [--late-reports (date reports in 2023: every flow row late)] \
                     [--replicas N (0: none; else 1 then N collector processes on one PostgreSQL schema)] \
                     [--idle-connections N (idle mode only)]";

/// Target of the derive-only rate (committed 50-flow reports derived per second).
const TARGET_DERIVE_RATE: f64 = 5_000.0;
/// Target of the derivation lag's p99 under load, seconds.
const TARGET_LAG_S: f64 = 5.0;

fn parse_args() -> Result<Args> {
    let mut args = Args {
        agents: 200,
        secs: 15,
        flows: 50,
        idle: None,
        derive_reports: 10_000,
        replicas: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if flag == "--late-reports" {
            LATE_REPORTS.store(true, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = || format!("{flag}: {value:?} is not a number\n{USAGE}");
        match flag.as_str() {
            "--agents" => args.agents = value.parse().with_context(bad)?,
            "--secs" => args.secs = value.parse().with_context(bad)?,
            "--flows" => args.flows = value.parse().with_context(bad)?,
            "--idle-connections" => args.idle = Some(value.parse().with_context(bad)?),
            "--derive-reports" => args.derive_reports = value.parse().with_context(bad)?,
            "--replicas" => args.replicas = value.parse().with_context(bad)?,
            "--batch-reports" => BATCH_REPORTS.store(
                value.parse().with_context(bad)?,
                std::sync::atomic::Ordering::Relaxed,
            ),
            "--derive-connections" => DERIVE_CONNECTIONS.store(
                value.parse().with_context(bad)?,
                std::sync::atomic::Ordering::Relaxed,
            ),
            "--derive-nice" => DERIVE_NICE.store(
                value.parse().with_context(bad)?,
                std::sync::atomic::Ordering::Relaxed,
            ),
            "--max-in-flight" => IN_FLIGHT.store(
                value.parse().with_context(bad)?,
                std::sync::atomic::Ordering::Relaxed,
            ),
            _ => bail!("unknown flag {flag:?}\n{USAGE}"),
        }
    }
    ensure!(args.agents > 0, "--agents must be > 0");
    ensure!(
        args.secs > 0 || (args.derive_reports > 0 && args.idle.is_none()),
        "--secs 0 (no load window: the derive-only figure alone) needs --derive-reports > 0"
    );
    ensure!(args.idle != Some(0), "--idle-connections must be > 0");
    Ok(args)
}

/// A public-looking IPv4 address (a few IPv6 ones too), deterministic in `i`.
fn remote_address(i: usize) -> String {
    const FIRST: [u8; 24] = [
        3, 8, 13, 18, 23, 31, 34, 41, 45, 52, 62, 77, 81, 91, 102, 104, 129, 142, 151, 157, 185,
        193, 197, 212,
    ];
    let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    if i % 25 == 7 {
        return format!("2a03:2880:{:x}:{:x}::{:x}", (h >> 8) & 0xffff, i, h & 0xff);
    }
    format!(
        "{}.{}.{}.{}",
        FIRST[i % FIRST.len()],
        (h >> 16) & 0xff,
        (h >> 24) & 0xff,
        1 + ((h >> 32) % 254)
    )
}

/// The report template of one agent: node facts, a host sample, the flows' processes and
/// `flows` flows (as in bench_ingest, built before the clock starts; each push clones it).
fn template_report(node: &str, agent: usize, flows: usize) -> pb::Report {
    let node_info = pb::NodeInfo {
        node: node.to_owned(),
        hostname: format!("{node}.dc1.example.ma"),
        site: "rabat-1".to_owned(),
        country: "MA".to_owned(),
        labels: [("rack", "r12"), ("tier", "gpu")]
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
    let host = pb::HostSample {
        cpu_percent: 41.7,
        cpu_percent_per_core: (0..CORES).map(|i| (i as f32 * 7.3) % 100.0).collect(),
        load_1: 7.31,
        load_5: 5.02,
        load_15: 2.87,
        memory_total_bytes: 270_000_000_000,
        memory_used_bytes: 120_000_000_000,
        memory_available_bytes: 150_000_000_000,
        swap_total_bytes: 8_589_930_496,
        swap_used_bytes: 0,
        uptime_secs: 1_000_000,
        process_count: 412,
    };
    let pid = |i: usize| 20_000 + i as u32 * 17;
    let processes = (0..PROCESSES)
        .map(|i| pb::ProcessInfo {
            pid: pid(i),
            parent_pid: 1,
            name: format!("python3-w{i}"),
            exe: "/opt/conda/envs/serve/bin/python3.11".to_owned(),
            cmdline: vec![
                "python3".to_owned(),
                "-m".to_owned(),
                "vllm.entrypoints.openai.api_server".to_owned(),
            ],
            user: "svc-inference".to_owned(),
            start_time_unix_ms: 1_699_500_000_000,
            cpu_percent: 12.5,
            rss_bytes: 4_294_967_296,
            reasons: vec![pb::ProcessReason::TopCpu as i32],
            ..Default::default()
        })
        .collect();
    let flows = (0..flows)
        .map(|i| pb::Flow {
            protocol: pb::Protocol::Tcp as i32,
            local_address: "10.20.0.5".to_owned(),
            local_port: 40_000 + i as u32,
            remote_address: remote_address(agent * 7 + i * 13),
            remote_port: if i % 3 == 0 { 443 } else { 8443 },
            pid: pid(i % PROCESSES),
            owner_unknown: false,
            bytes_sent: 10_000 + i as u64 * 1_000,
            bytes_received: 50_000 + i as u64 * 3_000,
            bytes_known: true,
            direction: pb::Direction::Outbound as i32,
            min_rtt_us: 900 + i as u32,
            smoothed_rtt_us: 1_500 + i as u32,
            connections: 1 + (i % 4) as u32,
            start_unix_ms: 0,
            end_unix_ms: 0,
            ..Default::default()
        })
        .collect();
    pb::Report {
        epoch: EPOCH,
        node_info: Some(node_info),
        host: Some(host),
        processes,
        flows,
        interval_ms: 10_000,
        ..Default::default()
    }
}

/// `--late-reports`: reports dated from November 2023.
static LATE_REPORTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// When the reports of a target are dated from: the start of the current minute (the
/// collector's rollup, run as it starts, stops two minutes before now), or November 2023 with
/// `--late-reports`.
fn first_report_ms() -> i64 {
    if LATE_REPORTS.load(std::sync::atomic::Ordering::Relaxed) {
        return 1_700_000_000_000;
    }
    let now = sov_common::clock::now_unix_ms();
    now - now.rem_euclid(60_000)
}

/// Push number `seq` of an agent whose reports are dated from `first_ms`
/// ([`first_report_ms`]): the template with this interval's counters, 10 s per push.
fn next_report(template: &pb::Report, first_ms: i64, seq: u64) -> pb::Report {
    let mut r = template.clone();
    let t = first_ms + i64::try_from(seq).unwrap_or(0) * 10_000;
    r.seq = seq;
    r.observed_unix_ms = t;
    if let Some(h) = r.host.as_mut() {
        h.uptime_secs += seq * 10;
    }
    for f in &mut r.flows {
        f.bytes_sent += seq;
        f.bytes_received += seq * 3;
        f.start_unix_ms = t - 10_000;
        f.end_unix_ms = t;
    }
    r
}

// ---------------------------------------------------------------------------------------------
// /proc readings

/// Clock ticks per second for /proc/<pid>/stat (USER_HZ).
fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100) as f64
}

/// (comm, utime + stime in ticks) from /proc/<pid>/stat.
fn proc_cpu(pid: &str) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        comm,
        f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    ))
}

/// CPU ticks of this process.
fn self_ticks() -> u64 {
    pid_ticks(std::process::id())
}

/// CPU ticks of process `pid` (0 when gone).
fn pid_ticks(pid: u32) -> u64 {
    proc_cpu(&pid.to_string()).map_or(0, |(_, t)| t)
}

/// CPU ticks of every live `postgres` process (server and backends). A backend that exits
/// between two readings takes its ticks with it, so the later sum can be smaller: differences
/// saturate at 0 (a wrapped one printed 1.8e16 ms once, PERFORMANCE.md §8q).
fn postgres_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| proc_cpu(&e.file_name().to_string_lossy()))
        .filter(|(comm, _)| comm == "postgres")
        .map(|(_, t)| t)
        .sum()
}

/// (busy, total) ticks of the whole machine from /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// (VmRSS, VmHWM) of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
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

fn self_rss_kib() -> u64 {
    rss_kib(std::process::id()).map_or(0, |(r, _)| r)
}

/// Soft limit on open files of this process.
fn open_files_soft_limit() -> Option<usize> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted latencies.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// Targets

/// The ceiling: same mutual TLS and HTTP/2 settings, a handler that only acks.
#[derive(Debug, Clone, Copy)]
struct BareIngest;

#[tonic::async_trait]
impl pb::ingest_server::Ingest for BareIngest {
    async fn push(
        &self,
        req: tonic::Request<pb::Report>,
    ) -> Result<tonic::Response<pb::Ack>, tonic::Status> {
        let r = req.into_inner();
        Ok(tonic::Response::new(pb::Ack {
            epoch: r.epoch,
            seq: r.seq,
            duplicate: false,
            max_report_bytes: 0,
            ..Default::default()
        }))
    }
}

/// A running target.
enum Running {
    Bare {
        addr: SocketAddr,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    },
    Sqlite(Box<InProcessCollector>),
    Postgres {
        addr: SocketAddr,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    },
    /// `--replicas`: collector processes (`e2e-collector serve`) on one PostgreSQL schema.
    Replicas(Vec<sov_e2e::CollectorProcess>),
}

impl Running {
    fn url(&self) -> String {
        match self {
            Self::Bare { addr, .. } | Self::Postgres { addr, .. } => format!("https://{addr}"),
            Self::Sqlite(c) => c.url(),
            Self::Replicas(procs) => procs.first().map(|p| p.url()).unwrap_or_default(),
        }
    }

    /// The URL agent `i` pushes to (replicas: agents are spread over them in turn).
    fn url_for(&self, i: usize) -> String {
        match self {
            Self::Replicas(procs) if !procs.is_empty() => procs[i % procs.len()].url(),
            _ => self.url(),
        }
    }

    /// Collector processes apart from this one (their CPU is measured apart).
    fn pids(&self) -> Vec<u32> {
        match self {
            Self::Replicas(procs) => procs.iter().map(|p| p.pid()).collect(),
            _ => Vec::new(),
        }
    }

    async fn stop(self) -> Result<()> {
        match self {
            Self::Bare { stop, task, .. } => {
                stop.cancel();
                task.await.context("bare server panicked")??;
            }
            Self::Sqlite(c) => c.stop().await,
            Self::Postgres { stop, task, .. } => {
                stop.cancel();
                task.await.context("collector panicked")?;
            }
            Self::Replicas(procs) => drop(procs),
        }
        Ok(())
    }
}

async fn wait_listening(addr: SocketAddr) -> Result<()> {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "{addr} does not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn start_bare(pki: &Pki) -> Result<Running> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            std::fs::read(&pki.collector.cert)?,
            std::fs::read(&pki.collector.key)?,
        ))
        .client_ca_root(Certificate::from_pem(std::fs::read(&pki.ca)?))
        .client_auth_optional(true)
        .timeout(sov_collector::server::TLS_HANDSHAKE_TIMEOUT);
    let addr = SocketAddr::from(([127, 0, 0, 1], sov_e2e::free_port()));
    let stop = CancellationToken::new();
    let server = Server::builder()
        .tls_config(tls)?
        .tcp_nodelay(true)
        .max_concurrent_streams(sov_collector::server::MAX_STREAMS_PER_CONNECTION)
        .timeout(sov_collector::server::REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(pb::ingest_server::IngestServer::new(BareIngest));
    let s = stop.clone();
    let task = tokio::spawn(server.serve_with_shutdown(addr, s.cancelled_owned()));
    wait_listening(addr).await?;
    Ok(Running::Bare { addr, stop, task })
}

/// The real collector on PostgreSQL: what `sov-collector serve` does with a `postgres://`
/// store URL (`store::open`, then `app::run`), in this process.
async fn start_postgres(pki: &Pki, data: &Path, url: &str, agents: usize) -> Result<Running> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut cfg = CollectorConfig::new(addr, data.to_owned(), pki.server_files());
    cfg.store.url = url.to_owned();
    one_address_for_all(&mut cfg, agents);
    let store = sov_collector::store::open(&cfg.store.url, &cfg.data_dir)
        .await
        .context("open PostgreSQL store")?;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        sov_collector::app::run(&cfg, store, listener, s.cancelled_owned())
            .await
            .expect("collector run");
    });
    Ok(Running::Postgres { addr, stop, task })
}

/// `n` collector processes (`e2e-collector serve`, built beside this example) on the
/// PostgreSQL store `url`, each with its own data directory under `data`.
async fn start_replicas(
    pki: Arc<Pki>,
    data: PathBuf,
    url: String,
    n: usize,
    agents: usize,
) -> Result<Running> {
    collector_binary()?;
    let procs = tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|i| {
                let dir = data.join(format!("replica-{i}"));
                std::fs::create_dir_all(&dir).expect("replica dir");
                sov_e2e::CollectorProcess::start_with(&pki, &dir, sov_e2e::free_port(), |c| {
                    c.store.url = url.clone();
                    one_address_for_all(c, agents);
                })
            })
            .collect::<Vec<_>>()
    })
    .await
    .context("start replicas")?;
    Ok(Running::Replicas(procs))
}

/// Every agent of this benchmark connects from 127.0.0.1, where a fleet comes from one
/// address per node: the per-address connection limit (`[limits]`, 64 by default) is raised
/// to the agents' number; every other limit stays as shipped.
fn one_address_for_all(cfg: &mut CollectorConfig, agents: usize) {
    cfg.limits.max_connections_per_address =
        cfg.limits.max_connections_per_address.max(agents + 16);
    let in_flight = IN_FLIGHT.load(std::sync::atomic::Ordering::Relaxed);
    if in_flight > 0 {
        cfg.limits.max_reports_in_flight = in_flight;
    }
    let batch = BATCH_REPORTS.load(std::sync::atomic::Ordering::Relaxed);
    if batch > 0 {
        cfg.derive.batch_reports = batch;
    }
    let nice = DERIVE_NICE.load(std::sync::atomic::Ordering::Relaxed);
    if nice >= 0 {
        cfg.derive.nice = nice;
    }
    cfg.derive.connections = derive_connections();
}

/// `--derive-connections N`: the collectors' `[derive] connections` and the derive-only
/// part's derivers per collector on PostgreSQL (0: as shipped, `DEFAULT_CONNECTIONS`).
static DERIVE_CONNECTIONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn derive_connections() -> u32 {
    match DERIVE_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => sov_collector::derive::DEFAULT_CONNECTIONS,
        n => n,
    }
}

/// `--derive-nice N`: the collectors' `[derive] nice` and the derive-only part's (-1: as
/// shipped, `DEFAULT_NICE`), to measure what the derive threads' lower priority gives the
/// acknowledgements and costs derivation.
static DERIVE_NICE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// `--max-in-flight N`: the collector's `[limits] max_reports_in_flight` (0: as shipped).
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `--batch-reports`: reports per derive transaction, the collectors' `[derive] batch_reports`
/// and the derive-only part's (0: the deriver's default, `DEFAULT_BATCH_REPORTS`), to measure
/// what a larger batch saves and what it costs the acknowledgements.
static BATCH_REPORTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

// ---------------------------------------------------------------------------------------------
// One measured run

#[derive(Debug, Clone)]
struct RunResult {
    target: &'static str,
    connect_s: f64,
    window_s: f64,
    reports: u64,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_ms_per_report: f64,
    postgres_cpu_ms_per_report: f64,
    machine_busy_percent: f64,
    rss_before_kib: u64,
    rss_end_kib: u64,
    kib_per_connection: f64,
    stored_checked: Option<u64>,
    /// `--replicas`: CPU ms per report (all reports of the window) of each collector process.
    replica_cpu_ms_per_report: Vec<f64>,
    /// Flow-minute rows this process derived late (their minutes already rolled up into
    /// hours: `--late-reports`, or a deriver more than two minutes behind).
    late_flow_rows: u64,
    /// Derivation lag (now − derived up to) sampled every [`LAG_EVERY`] in the window, s:
    /// p50, p99, at the end of the window; and how long the backlog took to drain after it.
    lag: Option<Lag>,
}

#[derive(Debug, Clone, Copy)]
struct Lag {
    p50_s: f64,
    p99_s: f64,
    end_s: f64,
    pending_end: u64,
    drain_s: f64,
}

/// SQLite's writer counters (`WriterStats`), in field order.
fn writer_stats() -> [u64; 6] {
    use std::sync::atomic::Ordering::Relaxed;
    let w = &sov_collector::store::sqlite::WRITER;
    [
        w.append_batches.load(Relaxed),
        w.appended.load(Relaxed),
        w.append_ns.load(Relaxed),
        w.empty_takes.load(Relaxed),
        w.derive_commits.load(Relaxed),
        w.derive_ns.load(Relaxed),
    ]
}

/// How often the derivation lag is sampled during the window.
const LAG_EVERY: Duration = Duration::from_millis(200);

/// Now − derived up to, seconds, and the reports waiting.
async fn lag_now(store: &dyn Store) -> Result<(f64, u64)> {
    let s = store.derive_status().await?;
    let now = sov_common::clock::now_unix_ms();
    Ok(((now - s.derived_up_to(now)).max(0) as f64 / 1e3, s.pending))
}

struct Agent {
    name: String,
    tls: ClientTls,
    template: pb::Report,
}

async fn measure(
    target: &'static str,
    pki: &Arc<Pki>,
    agents: &[Arc<Agent>],
    secs: u64,
    start: impl std::future::Future<Output = Result<Running>>,
    probe: Option<Arc<dyn Store>>,
) -> Result<RunResult> {
    let rss_before = self_rss_kib();
    let late0 = sov_collector::store::late_rows_written();
    let yields0 = sov_collector::store::sqlite::derive_yields();
    let writer0 = writer_stats();
    let server = start.await?;
    let url = server.url();

    let t_connect = Instant::now();
    let mut clients = Vec::with_capacity(agents.len());
    for (i, a) in agents.iter().enumerate() {
        let c = push_client(&a.tls, &server.url_for(i))
            .await
            .map_err(|e| anyhow::anyhow!("{target}: connect {}: {e}", a.name))?;
        clients.push(c);
    }
    let connect_s = t_connect.elapsed().as_secs_f64();

    let first_ms = first_report_ms();
    let t0 = Instant::now() + Duration::from_millis(100);
    let warm_end = t0 + WARMUP;
    let end = warm_end + Duration::from_secs(secs);
    let mut tasks = Vec::with_capacity(agents.len());
    for (a, mut client) in agents.iter().cloned().zip(clients) {
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(t0.into()).await;
            let mut lat = Vec::new();
            let mut seq = 0u64;
            while Instant::now() < end {
                seq += 1;
                let report = next_report(&a.template, first_ms, seq);
                let t = Instant::now();
                let ack = client
                    .push(report)
                    .await
                    .with_context(|| format!("{target}: {} push seq {seq}", a.name))?
                    .into_inner();
                let done = Instant::now();
                ensure!(
                    ack.seq == seq && ack.epoch == EPOCH && !ack.duplicate,
                    "{target}: {}: bad ack for seq {seq}: {ack:?}",
                    a.name
                );
                if t >= warm_end && done <= end {
                    lat.push(done - t);
                }
            }
            anyhow::Ok((lat, seq))
        }));
    }
    tokio::time::sleep_until(warm_end.into()).await;
    let pids = server.pids();
    let children0: Vec<u64> = pids.iter().map(|&p| pid_ticks(p)).collect();
    let (cpu0, pg0, m0) = (self_ticks(), postgres_ticks(), machine_ticks());
    let w0 = Instant::now();
    let mut lags = Vec::new();
    if let Some(p) = &probe {
        while Instant::now() + LAG_EVERY < end {
            lags.push(lag_now(p.as_ref()).await?.0);
            tokio::time::sleep(LAG_EVERY).await;
        }
    }
    tokio::time::sleep_until(end.into()).await;
    let (cpu1, pg1, m1) = (self_ticks(), postgres_ticks(), machine_ticks());
    let children1: Vec<u64> = pids.iter().map(|&p| pid_ticks(p)).collect();
    let window = w0.elapsed();
    let rss_end = self_rss_kib();
    let lag_end = match &probe {
        Some(p) => Some(lag_now(p.as_ref()).await?),
        None => None,
    };
    // From the end of the window, how long until no report waits (timed while the clients
    // finish their last pushes and the stored reports are checked, which can take seconds).
    let drained = probe.clone().map(|p| {
        tokio::spawn(async move {
            let t = Instant::now();
            loop {
                if p.derive_status().await?.pending == 0 {
                    return anyhow::Ok(t.elapsed().as_secs_f64());
                }
                ensure!(
                    t.elapsed() < Duration::from_secs(600),
                    "derivation did not drain in 600 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    });

    let mut lat = Vec::new();
    let mut acked = 0u64;
    for t in tasks {
        let (l, n) = t.await.context("push task panicked")??;
        lat.extend(l);
        acked += n;
    }
    // Every acked report must be stored once (not checked for the bare server).
    let stored_checked = if target == "bare" {
        None
    } else {
        let nodes = list_nodes(pki, &url)
            .await
            .map_err(|e| anyhow::anyhow!("ListNodes: {e}"))?;
        let stored: u64 = nodes.iter().map(|n| n.reports).sum();
        let missing: u64 = nodes.iter().map(|n| n.missing).sum();
        ensure!(
            nodes.len() == agents.len() && stored == acked && missing == 0,
            "VERIFY FAILED ({target}): {} nodes, {stored} reports stored, {missing} missing; \
             {acked} acked by {} agents",
            nodes.len(),
            agents.len()
        );
        Some(stored)
    };
    // The backlog left at the end of the window, drained with no more load.
    let lag = match (drained, lag_end) {
        (Some(drained), Some((end_s, pending_end))) => {
            let drain_s = drained
                .await
                .context("drain watcher panicked")?
                .with_context(|| format!("{target}: drain"))?;
            lags.sort_by(f64::total_cmp);
            let pct = |q: f64| {
                lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
                    .copied()
                    .unwrap_or(0.0)
            };
            Some(Lag {
                p50_s: pct(0.5),
                p99_s: pct(0.99),
                end_s,
                pending_end,
                drain_s,
            })
        }
        _ => None,
    };
    server.stop().await?;
    let late_flow_rows = sov_collector::store::late_rows_written() - late0;
    let yields = sov_collector::store::sqlite::derive_yields() - yields0;
    if target == "sqlite" {
        let w: Vec<u64> = writer_stats()
            .iter()
            .zip(writer0)
            .map(|(b, a)| b - a)
            .collect();
        println!(
            "{target}: writer from start to drained: {} append transactions of {:.1} reports on              average, {:.2} s held by appends ({} takes found nothing to store); {} derive              transactions ({yields} of them committed early to let waiting appends go first),              {:.2} s held by derivation",
            w[0],
            w[1] as f64 / w[0].max(1) as f64,
            w[2] as f64 / 1e9,
            w[3],
            w[4],
            w[5] as f64 / 1e9
        );
    }

    lat.sort_unstable();
    let reports = lat.len() as u64;
    let tck = clk_tck();
    let per_rep = |ticks: u64| ticks as f64 * 1000.0 / tck / reports.max(1) as f64;
    let (busy, total) = (m1.0 - m0.0, m1.1 - m0.1);
    let replica_cpu: Vec<f64> = children0
        .iter()
        .zip(&children1)
        .map(|(a, b)| per_rep(b.saturating_sub(*a)))
        .collect();
    Ok(RunResult {
        target,
        connect_s,
        window_s: window.as_secs_f64(),
        reports,
        per_sec: reports as f64 / window.as_secs_f64(),
        p50_ms: ms(percentile(&lat, 50.0)),
        p99_ms: ms(percentile(&lat, 99.0)),
        max_ms: ms(percentile(&lat, 100.0)),
        cpu_ms_per_report: per_rep(cpu1 - cpu0),
        postgres_cpu_ms_per_report: per_rep(pg1.saturating_sub(pg0)),
        machine_busy_percent: 100.0 * busy as f64 / total.max(1) as f64,
        rss_before_kib: rss_before,
        rss_end_kib: rss_end,
        kib_per_connection: (rss_end as f64 - rss_before as f64) / agents.len() as f64,
        stored_checked,
        lag,
        replica_cpu_ms_per_report: replica_cpu,
        late_flow_rows,
    })
}

fn run_json(r: &RunResult) -> serde_json::Value {
    serde_json::json!({
        "target": r.target,
        "connect_s": r.connect_s,
        "window_s": r.window_s,
        "reports": r.reports,
        "reports_per_s": r.per_sec,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "max_ms": r.max_ms,
        "process_cpu_ms_per_report": r.cpu_ms_per_report,
        "postgres_cpu_ms_per_report": r.postgres_cpu_ms_per_report,
        "machine_busy_percent": r.machine_busy_percent,
        "rss_before_kib": r.rss_before_kib,
        "rss_end_kib": r.rss_end_kib,
        "rss_growth_kib_per_connection": r.kib_per_connection,
        "late_flow_rows": r.late_flow_rows,
        "stored_verified": r.stored_checked,
        "derive_lag_p50_s": r.lag.map(|l| l.p50_s),
        "derive_lag_p99_s": r.lag.map(|l| l.p99_s),
        "derive_lag_end_s": r.lag.map(|l| l.end_s),
        "derive_pending_end": r.lag.map(|l| l.pending_end),
        "derive_drain_s": r.lag.map(|l| l.drain_s),
        "replica_cpu_ms_per_report": r.replica_cpu_ms_per_report,
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Derive-only: `n` reports of the agents' shape appended straight into `stores[0]` (no TLS,
/// no gRPC), then derived by the collector's own deriver (`derive::Deriver`, default batch),
/// one per store (several PostgreSQL handles on one schema: `per_collector` derivers of each
/// collector (`[derive] connections`) and replicas' derivers, each with its share of the
/// partitions, settled before the clock starts), until none waits. Returns
/// reports derived per second, the seconds it took, and the CPU ms per report of this process
/// and of every `postgres` process during the derivation (the machine may be shared: CPU per
/// report holds when the rate is set by others' load).
/// The append phase of a derive-only run: the acknowledgement's store work alone (group-
/// committed appends of 1,024 reports at a time, no TLS), rate and CPU per report.
#[derive(Debug, Clone, Copy)]
struct AppendOnly {
    reports_per_s: f64,
    cpu_ms_per_report: f64,
    postgres_cpu_ms_per_report: f64,
}

/// Every derive-only run's appends, in the order of the derive-only results.
static APPENDS: std::sync::Mutex<Vec<AppendOnly>> = std::sync::Mutex::new(Vec::new());

async fn derive_only(
    stores: Vec<Arc<dyn Store>>,
    settle: Option<Vec<PostgresStore>>,
    agents: &[Arc<Agent>],
    n: usize,
    per_collector: usize,
) -> Result<(f64, f64, f64, f64)> {
    use sov_collector::derive::{
        DEFAULT_BATCH_REPORTS, DEFAULT_NICE, DeriveThreads, Deriver, Enricher, Freshness,
    };
    let store = stores[0].clone();
    let first_ms = first_report_ms();
    let reports: Vec<pb::Report> = (0..n)
        .map(|i| {
            next_report(
                &agents[i % agents.len()].template,
                first_ms,
                (i / agents.len()) as u64 + 1,
            )
        })
        .collect();
    // The appends alone (the acknowledgement's store work, no TLS): group-committed batches.
    let (append_cpu0, append_pg0, append_t) = (self_ticks(), postgres_ticks(), Instant::now());
    for chunk in reports.chunks(1024) {
        let outcomes = futures::future::join_all(chunk.iter().map(|r| {
            let body = r.encode_to_vec();
            let incoming = sov_collector::derive::incoming(
                r.clone(),
                sov_common::clock::now_unix_ms(),
                body,
                None,
            );
            store.ingest(incoming)
        }))
        .await;
        for o in outcomes {
            o?;
        }
    }
    let append_secs = append_t.elapsed().as_secs_f64();
    let ms_per_report = |ticks: u64| ticks as f64 * 1e3 / clk_tck() / n as f64;
    let append = AppendOnly {
        reports_per_s: n as f64 / append_secs,
        cpu_ms_per_report: ms_per_report(self_ticks() - append_cpu0),
        postgres_cpu_ms_per_report: ms_per_report(postgres_ticks().saturating_sub(append_pg0)),
    };
    println!(
        "  appends: {n} reports in {append_secs:.2} s = {:.0}/s; CPU ms per report: this process \
         {:.3}, PostgreSQL {:.3}",
        append.reports_per_s, append.cpu_ms_per_report, append.postgres_cpu_ms_per_report
    );
    APPENDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(append);
    ensure!(
        store.derive_status().await?.pending == n as u64,
        "derive-only: {n} reports should wait"
    );
    // Several derivers: wait until they share the partitions out (each balances every second).
    if let Some(handles) = settle.filter(|h| h.len() > 1) {
        let t = Instant::now();
        loop {
            let mut held = Vec::new();
            for h in &handles {
                held.push(h.derive_partitions_held().await?);
            }
            if held.iter().sum::<usize>() == 64 && held.iter().all(|&h| h > 0) {
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(30),
                "derive-only: the derivers did not share the partitions out: {held:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let geo = sov_collector::geo::Geo::from_config(&Default::default())?;
    let nice = match DERIVE_NICE.load(std::sync::atomic::Ordering::Relaxed) {
        n if n < 0 => DEFAULT_NICE,
        n => n,
    };
    // Each deriver its own threads, as each of a collector's derivers has.
    let threads = || {
        DeriveThreads::start(
            std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            nice,
        )
    };
    let derivers: Vec<Deriver> = stores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let slot = i % per_collector.max(1);
            Ok(Deriver {
                store: s.clone(),
                enricher: Enricher::new(geo.clone(), None),
                metrics: Arc::new(sov_collector::metrics::Metrics::new()),
                freshness: Freshness::new(Duration::ZERO),
                appended: Arc::default(),
                slot,
                urgent: Arc::default(),
                urgent_derived: Arc::default(),
                derived: Arc::default(),
                batch_reports: match BATCH_REPORTS.load(std::sync::atomic::Ordering::Relaxed) {
                    0 => DEFAULT_BATCH_REPORTS,
                    n => n,
                },
                threads: threads()?,
            })
        })
        .collect::<Result<_>>()?;
    let (cpu0, pg0) = (self_ticks(), postgres_ticks());
    let t = Instant::now();
    let runs = futures::future::join_all(derivers.into_iter().map(|deriver| async move {
        let mut derived = 0u64;
        loop {
            let (queued, d) = deriver.derive_batch().await?;
            derived += d;
            if queued == 0 {
                if deriver.store.derive_status().await?.pending == 0 {
                    return anyhow::Ok(derived);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }))
    .await;
    let secs = t.elapsed().as_secs_f64();
    let mut derived = 0u64;
    for r in runs {
        derived += r?;
    }
    let per_report = |ticks: u64| ticks as f64 * 1e3 / clk_tck() / n as f64;
    let (cpu, pg) = (
        per_report(self_ticks() - cpu0),
        per_report(postgres_ticks().saturating_sub(pg0)),
    );
    ensure!(derived == n as u64, "derive-only: {derived} of {n} derived");
    Ok((n as f64 / secs, secs, cpu, pg))
}

async fn load_mode(args: Args) -> Result<()> {
    let pki = Arc::new(Pki::new());
    let t = Instant::now();
    let mut agents = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let name = format!("lg-agent-{i:05}");
        let tls = pki.client_tls(Role::Agent, &name);
        let template = template_report(&name, i, args.flows);
        agents.push(Arc::new(Agent {
            name,
            tls,
            template,
        }));
    }
    let size = next_report(&agents[0].template, first_report_ms(), 1).encoded_len();
    println!(
        "{} agent certificates issued and loaded in {:.1} s; report: {size} bytes encoded \
         ({} flows over {REMOTES} remote addresses, {CORES} per-core values, {PROCESSES} processes)",
        args.agents,
        t.elapsed().as_secs_f64(),
        args.flows
    );
    println!(
        "each target: connect {} agents, {} s warm-up, {} s window",
        args.agents,
        WARMUP.as_secs(),
        args.secs
    );

    let mut results = Vec::new();
    let data = tempfile::tempdir().context("tempdir")?;
    let base = sov_e2e::postgres_url();
    let mut pg_note = None;
    // `--secs 0`: the derive-only figure alone.
    if args.secs > 0 {
        println!("bare: tonic + mutual TLS, ack only ...");
        results.push(measure("bare", &pki, &agents, args.secs, start_bare(&pki), None).await?);

        println!("sqlite: real collector, SQLite (WAL, synchronous = FULL) ...");
        let p = pki.clone();
        let n = agents.len();
        let dir = data.path().join("sqlite");
        // A second handle on the collector's database, to watch the derive queue.
        let probe: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir)?);
        results.push(
            measure(
                "sqlite",
                &pki,
                &agents,
                args.secs,
                async move {
                    Ok(Running::Sqlite(Box::new(
                        InProcessCollector::start(&p, &dir, |c| one_address_for_all(c, n)).await,
                    )))
                },
                Some(probe),
            )
            .await?,
        );

        let schema = format!("sov_loadgen_{}", std::process::id());
        match PostgresStore::connect_with_schema(&base, &schema).await {
            Err(e) => {
                let note = format!("SKIPPED: PostgreSQL not reachable at {base}: {e}");
                println!("postgres: {note}");
                pg_note = Some(note);
            }
            Ok(admin) => {
                let sep = if base.contains('?') { '&' } else { '?' };
                let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
                println!("postgres: real collector, PostgreSQL schema {schema} ...");
                let dir = data.path().join("pg");
                let probe: Arc<dyn Store> = Arc::new(admin.clone());
                let run = measure(
                    "postgres",
                    &pki,
                    &agents,
                    args.secs,
                    start_postgres(&pki, &dir, &url, agents.len()),
                    Some(probe),
                )
                .await;
                admin.drop_schema().await.context("drop schema")?;
                results.push(run?);
            }
        }
        // `--replicas N`: one collector process, then N, on a fresh schema each.
        let mut counts = vec![1, args.replicas];
        counts.dedup();
        for n in counts
            .into_iter()
            .filter(|_| args.replicas > 0 && pg_note.is_none())
        {
            let schema = format!("sov_loadgen_r{n}_{}", std::process::id());
            let admin = PostgresStore::connect_with_schema(&base, &schema)
                .await
                .context("create replicas schema")?;
            let sep = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
            let target: &'static str = Box::leak(format!("pg-x{n}").into_boxed_str());
            println!("{target}: {n} collector processes on PostgreSQL schema {schema} ...");
            let probe: Arc<dyn Store> = Arc::new(admin.clone());
            let run = measure(
                target,
                &pki,
                &agents,
                args.secs,
                start_replicas(pki.clone(), data.path().join(target), url, n, agents.len()),
                Some(probe),
            )
            .await;
            admin.drop_schema().await.context("drop schema")?;
            results.push(run?);
        }
    }

    // Derive-only, with no TLS in the way.
    let mut derive_rates: Vec<(&'static str, f64, f64, f64, f64)> = Vec::new();
    let mut sqlite_bytes_per_report: Option<f64> = None;
    if args.derive_reports > 0 {
        println!(
            "derive-only: {} committed reports appended straight into a fresh store, then derived ...",
            args.derive_reports
        );
        let dir = data.path().join("derive-only");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir)?);
        let (rate, secs, cpu, pg) =
            derive_only(vec![store], None, &agents, args.derive_reports, 1).await?;
        derive_rates.push(("sqlite", rate, secs, cpu, pg));
        // What the store holds per report once derived (body, completeness, derived rows),
        // with the WAL folded into the database file.
        let db = dir.join(sov_collector::store::sqlite::DB_FILE);
        let c = rusqlite::Connection::open(&db)?;
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        let bytes = std::fs::metadata(&db)?.len() as f64 / args.derive_reports as f64;
        sqlite_bytes_per_report = Some(bytes);
        println!(
            "sqlite: {bytes:.0} bytes stored per derived report ({:.0} MB per node-day at a 10 s interval)",
            bytes * 8_640.0 / 1e6
        );
        let mut counts = vec![1, args.replicas.max(1)];
        counts.dedup();
        for k in counts {
            let schema = format!("sov_derive_only_{k}_{}", std::process::id());
            let Ok(pg) = PostgresStore::connect_with_schema(&base, &schema).await else {
                break;
            };
            let mut collectors = vec![pg.clone()];
            for _ in 1..k {
                collectors.push(PostgresStore::connect_with_schema(&base, &schema).await?);
            }
            // Each collector's derivers (`[derive] connections`): handles with a deriver
            // connection of their own.
            let per_collector = derive_connections().max(1) as usize;
            let handles: Vec<PostgresStore> = collectors
                .iter()
                .flat_map(|c| {
                    std::iter::once(c.clone())
                        .chain((1..per_collector).map(|_| c.another_deriver()))
                })
                .collect();
            let stores: Vec<Arc<dyn Store>> = handles
                .iter()
                .map(|h| Arc::new(h.clone()) as Arc<dyn Store>)
                .collect();
            let run = derive_only(
                stores,
                Some(handles),
                &agents,
                args.derive_reports,
                per_collector,
            )
            .await;
            pg.drop_schema().await.context("drop schema")?;
            let (rate, secs, cpu, pg) = run?;
            let target: &'static str = if k == 1 {
                "postgres"
            } else {
                Box::leak(format!("pg-x{k}").into_boxed_str())
            };
            derive_rates.push((target, rate, secs, cpu, pg));
        }
    }

    println!();
    println!(
        "{:<9} {:>8} {:>9} {:>7} {:>7} {:>7} {:>9} {:>9} {:>7} {:>9} {:>9} {:>8}",
        "target",
        "reports",
        "reports/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CPU ms/r",
        "PG CPU/r",
        "busy %",
        "RSS0 MiB",
        "RSS1 MiB",
        "KiB/conn"
    );
    for r in &results {
        println!(
            "{:<9} {:>8} {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>9.3} {:>9.3} {:>7.1} {:>9.1} {:>9.1} {:>8.1}",
            r.target,
            r.reports,
            r.per_sec,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.cpu_ms_per_report,
            r.postgres_cpu_ms_per_report,
            r.machine_busy_percent,
            r.rss_before_kib as f64 / 1024.0,
            r.rss_end_kib as f64 / 1024.0,
            r.kib_per_connection
        );
    }
    if let Some(note) = &pg_note {
        println!("postgres  {note}");
    }
    println!(
        "(CPU ms/r: this whole process, clients and server together, per report in the window; \
         PG CPU/r: every postgres process; busy %: the whole machine; RSS: this process before \
         the target started and at the end of its window; KiB/conn = growth / {} agents)",
        args.agents
    );
    let bare = results
        .iter()
        .find(|r| r.target == "bare")
        .map(|r| r.per_sec);
    for r in &results {
        if r.target != "bare" && r.replica_cpu_ms_per_report.is_empty() {
            let b = results[0].cpu_ms_per_report;
            println!(
                "{}: {:.3} CPU ms per report above the bare server in this process (validation, \
                 geolocation, store){}",
                r.target,
                r.cpu_ms_per_report - b,
                if r.target == "postgres" {
                    format!(", plus {:.3} in PostgreSQL", r.postgres_cpu_ms_per_report)
                } else {
                    String::new()
                }
            );
        }
    }

    for r in results
        .iter()
        .filter(|r| !r.replica_cpu_ms_per_report.is_empty())
    {
        let each: Vec<String> = r
            .replica_cpu_ms_per_report
            .iter()
            .map(|c| format!("{c:.3}"))
            .collect();
        println!(
            "{}: collector CPU per report {:.3} ms in all (each replica: {} ms), PostgreSQL {:.3} ms, \
             clients (this process) {:.3} ms",
            r.target,
            r.replica_cpu_ms_per_report.iter().sum::<f64>(),
            each.join(" + "),
            r.postgres_cpu_ms_per_report,
            r.cpu_ms_per_report
        );
    }
    for r in &results {
        if let Some(l) = r.lag {
            println!(
                "{}: derivation lag in the window p50 {:.2} s, p99 {:.2} s; at its end {:.2} s \
                 with {} reports waiting, drained {:.2} s after the load stopped",
                r.target, l.p50_s, l.p99_s, l.end_s, l.pending_end, l.drain_s
            );
        }
    }
    if derive_rates.len() > 1 {
        println!(
            "(PostgreSQL derive-only: {} derivers per collector, `[derive] connections`)",
            derive_connections()
        );
    }
    for (target, rate, secs, cpu, pg) in &derive_rates {
        println!(
            "{target}: derive-only {rate:.0} reports/s ({} reports of {} flows in {secs:.2} s); \
             CPU per report {cpu:.3} ms in this process, {pg:.3} ms in postgres processes",
            args.derive_reports, args.flows
        );
    }

    println!();
    println!("targets:");
    let mut targets = Vec::new();
    for r in results.iter().filter(|r| r.target != "bare") {
        let ratio = r.per_sec / bare.unwrap_or(f64::NAN);
        println!(
            "  {:<8} >= 50 % of the bare server's rate: {:.1} % -> {}",
            r.target,
            ratio * 100.0,
            verdict(ratio >= TARGET_RATIO)
        );
        println!(
            "  {:<8} >= 5,000 reports/s of {} flows: {:.0}/s -> {}{}",
            r.target,
            args.flows,
            r.per_sec,
            verdict(r.per_sec >= TARGET_RATE && args.flows >= 50),
            if args.flows < 50 {
                " (run with --flows 50 or more to judge)"
            } else {
                ""
            }
        );
        if let Some(l) = r.lag {
            println!(
                "  {:<8} derivation lag p99 <= 5 s at that rate: {:.2} s -> {}",
                r.target,
                l.p99_s,
                verdict(l.p99_s <= TARGET_LAG_S)
            );
        }
        let derive_rate = derive_rates
            .iter()
            .find(|(t, ..)| *t == r.target)
            .map(|(_, rate, ..)| *rate);
        if let Some(rate) = derive_rate {
            println!(
                "  {:<8} derive-only >= 5,000 reports/s: {rate:.0}/s -> {}",
                r.target,
                verdict(rate >= TARGET_DERIVE_RATE && args.flows >= 50)
            );
        }
        targets.push(serde_json::json!({
            "target": r.target,
            "ratio_to_bare": ratio,
            "half_of_bare": ratio >= TARGET_RATIO,
            "rate_5000": r.per_sec >= TARGET_RATE && args.flows >= 50,
            "derive_lag_p99_5s": r.lag.map(|l| l.p99_s <= TARGET_LAG_S),
            "derive_only_reports_per_s": derive_rate,
            "derive_only_5000": derive_rate.map(|d| d >= TARGET_DERIVE_RATE && args.flows >= 50),
        }));
    }
    if results.is_empty() {
        for (target, rate, ..) in &derive_rates {
            println!(
                "  {target:<8} derive-only >= 5,000 reports/s: {rate:.0}/s -> {}",
                verdict(*rate >= TARGET_DERIVE_RATE && args.flows >= 50)
            );
        }
    }
    if let Some(note) = &pg_note {
        println!("  postgres {note}");
    }
    println!(
        "  10,000 idle connections under 1 GB collector RSS: not measured in this mode \
         (run with --idle-connections 10000)"
    );

    let json = serde_json::json!({
        "bench": "bench_loadgen",
        "cpu_model": cpu_model(),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "agents": args.agents,
        "flows": args.flows,
        "report_bytes": size,
        "warmup_s": WARMUP.as_secs(),
        "secs": args.secs,
        "results": results.iter().map(run_json).collect::<Vec<_>>(),
        "derive_only": derive_rates.iter().map(|(t, rate, secs, cpu, pg)| serde_json::json!({
            "target": t, "reports": args.derive_reports, "reports_per_s": rate, "secs": secs,
            "cpu_ms_per_report": cpu, "postgres_cpu_ms_per_report": pg,
        })).collect::<Vec<_>>(),
        "append_only": derive_rates.iter().zip(APPENDS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter()).map(|((t, ..), a)| serde_json::json!({
            "target": t, "reports": args.derive_reports, "reports_per_s": a.reports_per_s,
            "cpu_ms_per_report": a.cpu_ms_per_report, "postgres_cpu_ms_per_report": a.postgres_cpu_ms_per_report,
        })).collect::<Vec<_>>(),
        "derive_connections": derive_connections(),
        "sqlite_bytes_per_report": sqlite_bytes_per_report,
        "postgres_note": pg_note,
        "targets": targets,
    });
    println!();
    println!("{json}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Idle connections

/// The `e2e-collector` binary beside this example's directory.
fn collector_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("CARGO_BIN_EXE_e2e-collector") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current exe")?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("no target dir above the example")?;
    let path = dir.join("e2e-collector");
    ensure!(
        path.exists(),
        "{} is not built; run `cargo build --release -p sov-e2e --bins --examples` first",
        path.display()
    );
    Ok(path)
}

async fn idle_mode(args: Args, asked: usize) -> Result<()> {
    let soft = open_files_soft_limit().context("no open-files limit in /proc/self/limits")?;
    let cap = soft.saturating_sub(100);
    let n = asked.min(cap);
    println!(
        "open files: soft limit {soft} (per process; the collector child inherits it); \
         connections capped at {cap}: {n} of {asked} asked"
    );
    let bin = collector_binary()?;
    let pki = Arc::new(Pki::new());
    let work = tempfile::tempdir().context("tempdir")?;
    let port = sov_e2e::free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let cfg = CollectorConfig::new(addr, work.path().join("data"), pki.server_files());
    let cfg_path = work.path().join("collector.toml");
    sov_e2e::write_collector_toml(&cfg, &cfg_path);
    let cfg_arg = cfg_path.to_string_lossy().into_owned();
    let mut child: KillOnDrop = sov_e2e::spawn(
        &bin.to_string_lossy(),
        &["serve", "--config", &cfg_arg],
        &work.path().join("collector.log"),
    );
    let pid = child.0.id();
    wait_listening(addr).await?;
    let url = format!("https://{addr}");

    // Certificates first (not part of any measurement).
    let t = Instant::now();
    let names: Vec<String> = (0..n).map(|i| format!("idle-{i:05}")).collect();
    let tls: Vec<ClientTls> = names
        .iter()
        .map(|name| pki.client_tls(Role::Agent, name))
        .collect();
    println!(
        "{n} agent certificates issued and loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // One push from a first connection so the store, geolocation and caches exist.
    let warm_tls = pki.client_tls(Role::Agent, "idle-warm");
    let mut warm = push_client(&warm_tls, &url)
        .await
        .map_err(|e| anyhow::anyhow!("connect: {e}"))?;
    warm.push(next_report(
        &template_report("idle-warm", 0, args.flows),
        first_report_ms(),
        1,
    ))
    .await
    .context("warm push")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (c_rss0, _) = rss_kib(pid)?;
    let s_rss0 = self_rss_kib();
    let c_cpu0 = proc_cpu(&pid.to_string()).map_or(0, |(_, t)| t);

    let t = Instant::now();
    let mut open = Vec::with_capacity(n);
    const BATCH: usize = 64;
    let mut items: Vec<(usize, ClientTls)> = tls.into_iter().enumerate().collect();
    while !items.is_empty() {
        let chunk: Vec<(usize, ClientTls)> = items.drain(..items.len().min(BATCH)).collect();
        let mut set = Vec::with_capacity(chunk.len());
        for (i, tls) in chunk {
            let url = url.clone();
            let name = names[i].clone();
            let flows = args.flows;
            set.push(tokio::spawn(async move {
                let mut c = push_client(&tls, &url)
                    .await
                    .map_err(|e| anyhow::anyhow!("connect {name}: {e}"))?;
                let ack = c
                    .push(next_report(
                        &template_report(&name, i, flows),
                        first_report_ms(),
                        1,
                    ))
                    .await
                    .with_context(|| format!("{name} push"))?
                    .into_inner();
                ensure!(ack.seq == 1 && !ack.duplicate, "{name}: bad ack {ack:?}");
                anyhow::Ok(c)
            }));
        }
        for s in set {
            open.push(s.await.context("connect task panicked")??);
        }
    }
    let open_s = t.elapsed().as_secs_f64();
    let c_cpu1 = proc_cpu(&pid.to_string()).map_or(0, |(_, t)| t);
    // Let the server settle (buffers released after the first exchange) before reading RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (c_rss1, c_hwm) = rss_kib(pid)?;
    let s_rss1 = self_rss_kib();
    // The connections are still usable: one more push on the last one.
    if let Some(c) = open.last_mut() {
        let i = n - 1;
        c.push(next_report(
            &template_report(&names[i], i, args.flows),
            first_report_ms(),
            2,
        ))
        .await
        .context("push on an idle connection")?;
    }
    let nodes = list_nodes(&pki, &url)
        .await
        .map_err(|e| anyhow::anyhow!("ListNodes: {e}"))?;
    ensure!(
        nodes.len() == n + 1,
        "VERIFY FAILED: collector knows {} nodes, expected {}",
        nodes.len(),
        n + 1
    );
    drop(open);
    child.kill9();

    let per_conn = (c_rss1 as f64 - c_rss0 as f64) / n as f64;
    let client_per_conn = (s_rss1 as f64 - s_rss0 as f64) / n as f64;
    let at_10k_mib = (c_rss0 as f64 + per_conn * TARGET_CONNECTIONS) / 1024.0;
    let handshake_cpu_ms = (c_cpu1 - c_cpu0) as f64 * 1000.0 / clk_tck() / n as f64;
    println!();
    println!("{:<44} {:>12}", "idle mutual-TLS connections", n);
    println!(
        "{:<44} {:>12.1}",
        "opened in s (handshake + one push each)", open_s
    );
    println!(
        "{:<44} {:>12.2}",
        "collector CPU ms per connection + push", handshake_cpu_ms
    );
    println!(
        "{:<44} {:>12.1}",
        "collector VmRSS before, MiB",
        c_rss0 as f64 / 1024.0
    );
    println!(
        "{:<44} {:>12.1}",
        "collector VmRSS with all open, MiB",
        c_rss1 as f64 / 1024.0
    );
    println!(
        "{:<44} {:>12.1}",
        "collector VmHWM, MiB",
        c_hwm as f64 / 1024.0
    );
    println!(
        "{:<44} {:>12.1}",
        "collector RSS growth KiB/connection", per_conn
    );
    println!(
        "{:<44} {:>12.1}",
        "client side (this process) KiB/connection", client_per_conn
    );
    println!(
        "{:<44} {:>12.1}",
        "collector RSS at 10,000 (extrapolated), MiB", at_10k_mib
    );
    let measured_10k = n as f64 >= TARGET_CONNECTIONS;
    let ok = if measured_10k {
        (c_rss1 as f64 / 1024.0) < TARGET_RSS_MIB
    } else {
        at_10k_mib < TARGET_RSS_MIB
    };
    println!();
    println!("targets:");
    println!(
        "  10,000 concurrent agent connections under 1 GB collector RSS: {} ({})",
        verdict(ok),
        if measured_10k {
            format!("measured {:.1} MiB with {n}", c_rss1 as f64 / 1024.0)
        } else {
            format!("extrapolated from {n}: {at_10k_mib:.1} MiB")
        }
    );
    let json = serde_json::json!({
        "bench": "bench_loadgen_idle",
        "cpu_model": cpu_model(),
        "open_files_soft_limit": soft,
        "asked": asked,
        "connections": n,
        "flows": args.flows,
        "open_s": open_s,
        "collector_cpu_ms_per_connection": handshake_cpu_ms,
        "collector_rss_before_kib": c_rss0,
        "collector_rss_open_kib": c_rss1,
        "collector_hwm_kib": c_hwm,
        "collector_kib_per_connection": per_conn,
        "client_kib_per_connection": client_per_conn,
        "collector_rss_at_10000_mib": at_10k_mib,
        "measured_10000": measured_10k,
        "target_met": ok,
    });
    println!();
    println!("{json}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    println!(
        "machine: {} x {}",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    match args.idle {
        Some(n) => idle_mode(args, n).await,
        None => load_mode(args).await,
    }
}
