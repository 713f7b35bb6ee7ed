//! Breach latency: from the first foreign byte on the wire to the webhook receiving the
//! `foreign-egress` alert, over many trials. Target: p99 ≤ the flow interval + 1 s.
//!
//! ```sh
//! cargo run --release -p sov-e2e --example bench_breach_latency -- --trials 40 --interval-secs 1
//! ```
//!
//! One collector (policy: 1,000 bytes abroad per window is a breach) and one agent (reports and
//! flow samples every `--interval-secs`) in this process; a webhook receiver on loopback that
//! stamps each request on arrival. Each trial connects to a fresh address in a network
//! namespace (each placed in its own country by an override, so each trial opens a new breach)
//! and sends 4 KiB, keeping the connection open. The clock starts just before `connect`.
//! Falls back to loopback addresses (`include_loopback`) where namespaces cannot be made.
//!
//! `--load-agents N` (default 0) adds load on the same collector while the trials run: N
//! simulated agents over mutual TLS, each pushing reports of `--load-flows` flows (default 50)
//! back to back as `bench_loadgen` does (to addresses placed in the jurisdiction, so they open
//! no breach of their own), so that the breach's report waits behind theirs for storing and
//! derivation (`[derive] max_lag_secs`). `--store postgres` runs the collector on PostgreSQL
//! (`SOV_TEST_POSTGRES_URL`, a fresh schema) instead of SQLite; `--max-lag-secs S` sets the
//! collector's `[derive] max_lag_secs`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sov_collector::auth::Role;
use sov_collector::config::{GeoOverride, WebhookSinkConfig};
use sov_e2e::netns::{Netns, sink};
use sov_e2e::receivers::http_receiver;
use sov_e2e::{
    InProcessCollector, Pki, agent_config, outbound_flow, postgres_url, push_client,
    report_with_flows,
};
use tokio_util::sync::CancellationToken;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Two-letter codes for the trials' destinations (none is the jurisdiction, MA).
fn countries(n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for a in b'A'..=b'Z' {
        for b in b'A'..=b'Z' {
            let c = format!("{}{}", a as char, b as char);
            if c != "MA" {
                out.push(c);
            }
            if out.len() == n {
                return out;
            }
        }
    }
    out
}

/// Load on the collector at `url`: `agents` agents pushing `flows`-flow reports back to back
/// until `stop`; the reports acknowledged, counted in `acked`.
async fn load(
    pki: &Pki,
    url: String,
    agents: usize,
    flows: usize,
    stop: CancellationToken,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let first_ms = sov_common::clock::now_unix_ms();
    let mut tasks = Vec::with_capacity(agents);
    for i in 0..agents {
        let name = format!("load-{i:04}");
        let tls = pki.client_tls(Role::Agent, &name);
        let mut client = push_client(&tls, &url)
            .await
            .map_err(|e| anyhow::anyhow!("load agent {name}: {e}"))?;
        let (stop, acked) = (stop.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.is_cancelled() {
                seq += 1;
                // Dated as an agent dates them: one report interval (10 s) apart.
                let at = first_ms + i64::try_from(seq).unwrap_or(0) * 10_000;
                let flows = (0..flows)
                    .map(|f| {
                        let mut flow =
                            outbound_flow(&format!("{LOAD_PREFIX}.{}", f % 250 + 1), 900);
                        flow.pid = 42 + (f % 5) as u32;
                        flow.remote_port = 443 + (f / 250) as u32;
                        flow.start_unix_ms = at;
                        flow.end_unix_ms = at;
                        flow
                    })
                    .collect();
                let mut report = report_with_flows(&name, seq, flows);
                report.observed_unix_ms = at;
                client.push(report).await?;
                acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    Ok(tasks)
}

/// The load's destinations: placed in the jurisdiction by an override.
const LOAD_PREFIX: &str = "203.0.113";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let trials = arg("--trials", 40).clamp(1, 200) as usize;
    let interval = arg("--interval-secs", 1).clamp(1, 60);
    let load_agents = arg("--load-agents", 0).min(2_000) as usize;
    let load_flows = arg("--load-flows", 50).min(1_000) as usize;
    let on_postgres = std::env::args().any(|a| a == "postgres");
    // `[derive] max_lag_secs` of the collector (as shipped unless given).
    let max_lag_secs = std::env::args()
        .any(|a| a == "--max-lag-secs")
        .then(|| arg("--max-lag-secs", 5));
    let netns = match Netns::create(7, trials as u8) {
        Ok(ns) => Some(ns),
        Err(e) => {
            eprintln!("network namespace refused ({e}): using loopback addresses");
            None
        }
    };
    let addrs: Vec<String> = match &netns {
        Some(ns) => ns.v4_peers.clone(),
        None => (0..trials).map(|i| format!("127.0.1.{}", i + 2)).collect(),
    };
    let (_sink, port) = sink(netns.as_ref().map(|n| n.name.as_str()), "0.0.0.0", 0);
    let codes = countries(trials);
    let by_country: HashMap<String, String> =
        codes.iter().cloned().zip(addrs.iter().cloned()).collect();

    let (hook, mut received) = http_receiver(200).await;
    let pki = Pki::new();
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "jurisdiction = \"MA\"\n[thresholds]\nforeign_egress_bytes = 1000\nwindow_secs = 60\nsilence_secs = 3600\nquiet_secs = 3600\n",
    )?;
    let mut overrides: Vec<GeoOverride> = codes
        .iter()
        .zip(&addrs)
        .map(|(c, a)| GeoOverride {
            cidr: format!("{a}/32"),
            country: c.clone(),
            asn: None,
            org: None,
            operator_country: None,
        })
        .collect();
    overrides.push(GeoOverride {
        cidr: format!("{LOAD_PREFIX}.0/24"),
        country: "MA".to_owned(),
        asn: None,
        org: None,
        operator_country: None,
    });
    let schema = format!("sov_breach_latency_{}", std::process::id());
    let store_url = on_postgres.then(|| {
        let base = postgres_url();
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options=-csearch_path%3D{schema}")
    });
    if let Some(url) = &store_url {
        let (client, conn) =
            tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await?;
        eprintln!("store: PostgreSQL schema {schema} ({url})");
    }
    let collector_store = store_url.clone();
    let collector = InProcessCollector::start(&pki, &dir.path().join("data"), move |c| {
        if let Some(url) = collector_store {
            c.store.url = url;
        }
        if let Some(secs) = max_lag_secs {
            c.derive.max_lag_secs = secs;
        }
        // The load's agents all come from loopback, as in `bench_loadgen`.
        c.limits.max_connections_per_address =
            c.limits.max_connections_per_address.max(load_agents + 16);
        c.policy = Some(policy);
        c.geo.overrides = overrides;
        c.alert.webhook = vec![WebhookSinkConfig {
            url: hook,
            ..Default::default()
        }];
    })
    .await;
    let mut cfg = agent_config(
        &pki,
        "bench-node",
        vec![collector.url()],
        &dir.path().join("spool"),
    );
    cfg.interval_secs = interval;
    cfg.net.interval_secs = interval;
    cfg.net.include_loopback = netns.is_none();
    let agent = sov_agent::Agent::open(cfg)?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(2 * interval)).await;

    let load_stop = CancellationToken::new();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load_tasks = load(
        &pki,
        collector.url(),
        load_agents,
        load_flows,
        load_stop.clone(),
        acked.clone(),
    )
    .await?;
    let load_started = Instant::now();
    if load_agents > 0 {
        // The load reaches its steady state (and the lag its bound) before the first trial.
        tokio::time::sleep(Duration::from_secs(10)).await;
    }

    let mut latencies = Vec::with_capacity(trials);
    let mut held = Vec::new();
    for (i, code) in codes.iter().enumerate() {
        // Start at a random point of the sampling period, as real traffic does.
        let jitter = (i as u64 * 7_919) % (interval * 1000);
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        let to: SocketAddr = format!("{}:{port}", by_country[code]).parse()?;
        let start = Instant::now();
        let conn = tokio::task::spawn_blocking(move || -> std::io::Result<TcpStream> {
            use std::io::Write;
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.write_all(&[b'x'; 4096])?;
            Ok(s)
        })
        .await??;
        held.push(conn);
        let subject = format!("country:{code}");
        let deadline = start + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(req)) = tokio::time::timeout(left, received.recv()).await else {
                anyhow::bail!("trial {i}: no alert for {subject} within 30 s");
            };
            let body = req.json();
            if body["subject"] == subject.as_str() && body["state"] == "open" {
                latencies.push(start.elapsed().as_secs_f64());
                break;
            }
        }
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    let load_acked = acked.load(std::sync::atomic::Ordering::Relaxed);
    load_stop.cancel();
    for t in load_tasks {
        t.await??;
    }
    stop.cancel();
    task.await??;
    collector.stop().await;
    if on_postgres {
        let (client, conn) =
            tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        // `stop` returned once the collector's loops had ended (no transaction of its own is
        // left); a drop that fails anyway (another session's lock) is tried again (bounded),
        // and a schema left behind is named.
        let mut dropped = false;
        for _ in 0..10 {
            match client
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
            {
                Ok(()) => {
                    dropped = true;
                    break;
                }
                Err(e) => {
                    eprintln!("dropping schema {schema}: {e}; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        if !dropped {
            eprintln!("schema {schema} left behind: drop it by hand");
        }
    }
    if load_agents > 0 {
        println!(
            "load: {load_agents} agents of {load_flows} flows, {load_acked} reports acknowledged in {load_secs:.1} s ({:.0}/s), on {}",
            load_acked as f64 / load_secs,
            if on_postgres { "PostgreSQL" } else { "SQLite" }
        );
    }

    latencies.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0));
    let target = interval as f64 + 1.0;
    println!(
        "breach latency over {} trials (flow and report interval {interval} s, {}):",
        latencies.len(),
        if netns.is_some() {
            "namespace hosts"
        } else {
            "loopback"
        }
    );
    println!(
        "  min {:.3} s  p50 {p50:.3} s  p99 {p99:.3} s  max {:.3} s",
        latencies[0],
        latencies[latencies.len() - 1]
    );
    println!(
        "  target p99 <= {target:.1} s: {}",
        if p99 <= target { "met" } else { "MISSED" }
    );
    Ok(())
}
