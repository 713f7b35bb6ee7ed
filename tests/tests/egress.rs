//! Outbound traffic per process, with bytes, geolocated at the collector: real TCP traffic to a
//! server inside a network namespace that the test creates (veth pair, addresses of the test's
//! own choosing), placed in a foreign country by a CIDR override. Falls back to loopback with
//! `include_loopback` when namespaces cannot be created, and says so.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::time::Duration;

use sov_collector::config::GeoOverride;
use sov_e2e::netns::{Netns, send, sink};
use sov_e2e::{InProcessCollector, Pki, agent_config, eventually};
use tokio_util::sync::CancellationToken;

fn within_one_percent(got: u64, want: u64) -> bool {
    let diff = got.abs_diff(want) as f64;
    diff <= want as f64 * 0.01
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_sent_to_a_foreign_server_reach_the_collector_with_pid_process_and_country() {
    let netns = match Netns::create(0, 1) {
        Ok(ns) => Some(ns),
        Err(e) => {
            sov_e2e::skipped(
                "egress::bytes_sent_to_a_foreign_server_reach_the_collector_with_pid_process_and_country (network namespace part)",
                &format!(
                    "cannot create a network namespace ({e}): ran on loopback with include_loopback = true"
                ),
            );
            None
        }
    };
    let (v4, v6, v4_cidr, v6_cidr) = match &netns {
        Some(ns) => (
            ns.v4_peers[0].clone(),
            ns.v6_peer.clone(),
            format!("{}/32", ns.v4_peers[0]),
            format!("{}/128", ns.v6_peer),
        ),
        None => (
            "127.0.0.2".to_owned(),
            "::1".to_owned(),
            "127.0.0.2/32".to_owned(),
            "::1/128".to_owned(),
        ),
    };
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.geo.overrides = vec![
            GeoOverride {
                cidr: v4_cidr.clone(),
                country: "FR".into(),
                asn: Some(64_500),
                org: Some("Test Transit".into()),
                operator_country: None,
            },
            GeoOverride {
                cidr: v6_cidr.clone(),
                country: "DE".into(),
                asn: None,
                org: None,
                operator_country: None,
            },
        ];
    })
    .await;
    let url = collector.url();
    let spool = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(
        &pki,
        "node-e",
        vec![url.clone()],
        &spool.path().join("spool"),
    );
    cfg.net.interval_secs = 1;
    cfg.net.include_loopback = netns.is_none();
    let agent = sov_agent::Agent::open(cfg).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    // Let the agent take its baseline sample before the traffic starts.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let ns_name = netns.as_ref().map(|n| n.name.clone());
    let (_srv4, port4) = sink(ns_name.as_deref(), &v4, 256 * 1024);
    let (_srv6, port6) = sink(ns_name.as_deref(), &v6, 0);
    let sent4 = 5 * 1024 * 1024;
    let sent6 = 3 * 1024 * 1024;
    let short = 1024 * 1024;
    let a4: SocketAddr = format!("{v4}:{port4}").parse().unwrap();
    let a6: SocketAddr = format!("[{v6}]:{port6}").parse().unwrap();
    let replies = tokio::task::spawn_blocking(move || {
        let hold = Duration::from_millis(2500);
        let r = send(a4, sent4, hold);
        let _ = send(a6, sent6, hold);
        // A short-lived connection: opened, 1 MiB sent, closed within one interval.
        let _ = send(a4, short, Duration::ZERO);
        r
    })
    .await
    .unwrap();
    assert_eq!(replies, 256 * 1024);

    let want4 = (sent4 + short) as u64;
    let rows = eventually(
        Duration::from_secs(30),
        "the French and German bytes at the collector",
        || {
            let (pki, url) = (&pki, &url);
            async move {
                let rows = sov_e2e::egress_rows(pki, url, "process").await;
                let fr: u64 = rows
                    .iter()
                    .filter(|r| r.country == "FR")
                    .map(|r| r.bytes_sent)
                    .sum();
                let de: u64 = rows
                    .iter()
                    .filter(|r| r.country == "DE")
                    .map(|r| r.bytes_sent)
                    .sum();
                (within_one_percent(fr, want4) && within_one_percent(de, sent6 as u64))
                    .then_some(rows)
            }
        },
    )
    .await;
    // The long transfer is attributed to this process; the short-lived connection closed
    // before any sample saw its owner, so its bytes count with the owner unknown (pid 0)
    // unless the sampler happened to catch it alive.
    let me = std::process::id();
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let mine = rows
        .iter()
        .find(|r| r.country == "FR" && r.pid == me)
        .expect("a French row owned by this process");
    assert_eq!(
        (mine.node.as_str(), mine.process.as_str()),
        ("node-e", comm.trim()),
        "{rows:?}"
    );
    assert!(mine.bytes_sent >= sent4 as u64, "{mine:?}");
    assert!(mine.bytes_received >= 256 * 1024, "{mine:?}");
    assert!(mine.min_rtt_us > 0, "{mine:?}");
    let fr_connections: u64 = rows
        .iter()
        .filter(|r| r.country == "FR")
        .map(|r| r.connections)
        .sum();
    assert!(
        fr_connections >= 2,
        "the short-lived connection is counted: {rows:?}"
    );
    let de = rows
        .iter()
        .find(|r| r.country == "DE" && r.pid == me)
        .expect("a German row owned by this process");
    assert!(within_one_percent(de.bytes_sent, sent6 as u64), "{de:?}");

    // Grouped by country and by ASN, the same bytes; the verdict names its source.
    let by_country = sov_e2e::egress_rows(&pki, &url, "country").await;
    let fr_total = by_country.iter().find(|r| r.country == "FR").unwrap();
    assert!(within_one_percent(fr_total.bytes_sent, want4));
    let by_asn = sov_e2e::egress_rows(&pki, &url, "asn").await;
    assert!(
        by_asn
            .iter()
            .any(|r| r.asn == 64_500 && r.org == "Test Transit"),
        "{by_asn:?}"
    );
    let dest = sov_e2e::egress_rows(&pki, &url, "destination").await;
    let d = dest.iter().find(|r| r.remote_address == v4).unwrap();
    assert!(d.geo_source.starts_with("override"), "{d:?}");

    stop.cancel();
    task.await.unwrap().unwrap();
    collector.stop().await;
}
