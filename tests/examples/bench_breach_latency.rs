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

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sov_collector::config::{GeoOverride, WebhookSinkConfig};
use sov_e2e::netns::{Netns, sink};
use sov_e2e::receivers::http_receiver;
use sov_e2e::{InProcessCollector, Pki, agent_config};
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
    let overrides: Vec<GeoOverride> = codes
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
    let collector = InProcessCollector::start(&pki, &dir.path().join("data"), move |c| {
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
    stop.cancel();
    task.await??;
    collector.stop().await;

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
