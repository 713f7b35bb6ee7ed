//! Bounded resources under abuse, against a collector running as a child process (so its
//! memory and descriptors are its own, read from /proc): 10,000 connections that never send
//! (or as many as the open-file limit allows), a client sending one byte a second, a flood
//! of tiny reports from one node, a report with a million flows and one just over the flow
//! limit. Throughout, a well-behaved node's connection keeps being served; at the end every
//! flooded report is stored exactly once, the collector's open descriptors never exceeded
//! `max_connections` plus its own, and its peak resident memory stayed under
//! [`PEAK_RSS_LIMIT_BYTES`].

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use sov_collector::auth::Role;
use sov_e2e::{CollectorProcess, Pki, eventually, free_port, outbound_flow, push_client, report};
use sov_proto::pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

/// The collector's peak resident memory (VmHWM) must stay under this through the whole test.
const PEAK_RSS_LIMIT_BYTES: u64 = 256 * 1024 * 1024;
/// Connections that never send, at most.
const IDLE_CONNECTIONS: usize = 10_000;
/// Tiny reports pushed by the flooding node.
const FLOOD_REPORTS: u64 = 3_000;
/// Descriptors the collector holds besides client connections (database, listeners, logs).
const OWN_FDS: usize = 64;

/// One report from the well-behaved node, which must be acknowledged as new.
async fn still_served(
    client: &mut sov_proto::pb::ingest_client::IngestClient<tonic::transport::Channel>,
    seq: &mut u64,
    what: &str,
) {
    *seq += 1;
    let ack = client
        .push(report("steady", 1, *seq))
        .await
        .unwrap_or_else(|s| panic!("steady refused during {what}: {s:?}"))
        .into_inner();
    assert_eq!((ack.seq, ack.duplicate), (*seq, false), "{what}");
}

/// `GET /metrics` from the collector's Prometheus endpoint.
async fn metrics(port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

fn status_field(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"));
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn soft_fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_collector_stays_bounded_and_keeps_serving_under_idle_connections_slow_clients_floods_and_huge_reports()
 {
    let limit = soft_fd_limit();
    // The test holds the idle connections itself; the collector inherits the same limit.
    let idle = IDLE_CONNECTIONS.min(limit.saturating_sub(300));
    let max_connections = 2_000.min(limit / 4);
    if idle < IDLE_CONNECTIONS {
        eprintln!(
            "open-file limit {limit}: {idle} idle connections instead of {IDLE_CONNECTIONS} (raise it with ulimit -n)"
        );
    }
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics_port = free_port();
    let collector = CollectorProcess::start_with(&pki, work.path(), port, |c| {
        c.max_connections = max_connections;
        c.tls_handshake_timeout_secs = 2;
        c.metrics.listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap());
    });
    let pid = collector.pid();
    let url = collector.url();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // The well-behaved node, connected before the abuse starts.
    let steady_tls = pki.client_tls(Role::Agent, "steady");
    let mut steady = eventually(Duration::from_secs(20), "steady connects", || async {
        push_client(&steady_tls, &url).await.ok()
    })
    .await;
    let mut steady_seq = 0u64;
    still_served(&mut steady, &mut steady_seq, "start").await;

    // ---- connections that never send ----
    let mut held = Vec::with_capacity(idle);
    let mut peak_fds = 0;
    for batch in 0..idle.div_ceil(500) {
        let n = 500.min(idle - batch * 500);
        let tries = (0..n).map(|_| {
            tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(addr),
            )
        });
        for r in futures::future::join_all(tries).await {
            if let Ok(Ok(s)) = r {
                held.push(s);
            }
        }
        peak_fds = peak_fds.max(open_fds(pid));
    }
    eprintln!("{} of {idle} idle connections opened", held.len());
    assert!(
        held.len() >= idle / 2,
        "only {} connections opened",
        held.len()
    );
    peak_fds = peak_fds.max(open_fds(pid));
    assert!(
        peak_fds <= max_connections + OWN_FDS,
        "the collector held {peak_fds} descriptors with max_connections = {max_connections}"
    );
    still_served(&mut steady, &mut steady_seq, "idle connections").await;
    // A new node gets in (the idle ones are cut by the handshake timeout; the ones over the
    // limit were closed at once).
    let newcomer_tls = pki.client_tls(Role::Agent, "newcomer");
    eventually(
        Duration::from_secs(60),
        "a new node connects and pushes",
        || async {
            let mut c = push_client(&newcomer_tls, &url).await.ok()?;
            c.push(report("newcomer", 1, 1)).await.ok()
        },
    )
    .await;
    // The collector let go of every connection it accepted (some of ours may never have
    // been accepted at all: the kernel drops the last handshake ACK when the listen queue
    // is full, and such a connection looks established on our side only).
    drop(held);
    eventually(Duration::from_secs(30), "descriptors released", || async {
        (open_fds(pid) <= OWN_FDS).then_some(())
    })
    .await;

    // ---- one byte a second ----
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The start of a TLS ClientHello record, never finished.
    let hello = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let mut sent = 0;
    let mut cut = false;
    for byte in hello.iter().cycle().take(30) {
        if slow.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        sent += 1;
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await
        {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "a client sending a byte a second was never cut ({sent} bytes)"
    );
    still_served(&mut steady, &mut steady_seq, "a slow client").await;

    // ---- a flood of tiny reports from one node, the steady node served meanwhile ----
    let flood_tls = pki.client_tls(Role::Agent, "flood");
    let flood_client = push_client(&flood_tls, &url).await.unwrap();
    let flood = tokio::spawn(async move {
        let seqs: Vec<u64> = (1..=FLOOD_REPORTS).collect();
        for chunk in seqs.chunks(32) {
            let pushes = chunk.iter().map(|&seq| {
                let mut c = flood_client.clone();
                async move { (seq, c.push(report("flood", 1, seq)).await) }
            });
            // Over `limits.max_reports_in_flight_per_node` (1), a report is refused at once
            // with UNAVAILABLE; sent again (as an agent does), it is stored.
            for (seq, r) in futures::future::join_all(pushes).await {
                if let Err(st) = r {
                    assert_eq!(
                        st.code(),
                        Code::Unavailable,
                        "a flooded report refused: {st:?}"
                    );
                    flood_client
                        .clone()
                        .push(report("flood", 1, seq))
                        .await
                        .expect("a flooded report refused when sent again");
                }
            }
        }
    });
    for _ in 0..20 {
        still_served(&mut steady, &mut steady_seq, "the flood").await;
    }
    flood.await.unwrap();
    let node = sov_e2e::node(&pki, &url, "flood").await.unwrap();
    assert_eq!(
        (node.reports, node.last_seq),
        (FLOOD_REPORTS, FLOOD_REPORTS),
        "{node:?}"
    );
    assert_eq!(node.missing, 0, "{node:?}");

    // ---- a million flows, and one flow over the limit ----
    let mut huge = sov_e2e::report_with_flows(
        "steady",
        9_999,
        (0..1_000_000)
            .map(|i| outbound_flow(&format!("203.0.{}.{}", (i / 256) % 256, i % 256), 1))
            .collect(),
    );
    huge.epoch = 1;
    let mut c = push_client(&steady_tls, &url).await.unwrap();
    let s = c.push(huge).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    drop(c);
    let flows = sov_collector::ingest::MAX_FLOWS_PER_REPORT + 1;
    let mut over = sov_e2e::report_with_flows(
        "steady",
        9_998,
        (0..flows)
            .map(|_| pb::Flow {
                bytes_sent: 1,
                ..outbound_flow("203.0.113.9", 1)
            })
            .collect(),
    );
    over.epoch = 1;
    let mut c = push_client(&steady_tls, &url).await.unwrap();
    let s = c.push(over).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("flows"), "{}", s.message());
    still_served(&mut steady, &mut steady_seq, "huge reports").await;

    // Nothing refused was stored; the steady node's reports are all there.
    let node = sov_e2e::node(&pki, &url, "steady").await.unwrap();
    assert_eq!(node.last_seq, steady_seq, "{node:?}");
    assert_eq!(node.reports, steady_seq, "{node:?}");

    // The abuse is visible to the operator.
    let text = metrics(metrics_port).await;
    let value = |line: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{line} not in /metrics:\n{text}"))
    };
    assert!(value("sov_collector_grpc_connections_refused_total ") > 0);
    assert!(value("sov_collector_tls_handshake_failures_total{reason=\"timeout\"} ") > 0);
    assert!(value("sov_collector_grpc_connections_open ") <= 8, "{text}");

    let peak = status_field(pid, "VmHWM:");
    eprintln!(
        "collector peak RSS {} MiB, peak descriptors {peak_fds}",
        peak / (1024 * 1024)
    );
    assert!(
        peak < PEAK_RSS_LIMIT_BYTES,
        "collector peak RSS {} MiB over {} MiB",
        peak / (1024 * 1024),
        PEAK_RSS_LIMIT_BYTES / (1024 * 1024)
    );
}
