//! The collector's Prometheus endpoint counts what ingest did, as a scraper sees it over HTTP.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::time::Duration;

use sov_collector::auth::Role;
use sov_e2e::{InProcessCollector, Pki, eventually, free_port, push_client, report};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

/// One HTTP/1.1 request on a fresh connection: (status line, headers, body).
async fn http_get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

fn assert_line(body: &str, line: &str) {
    assert!(
        body.lines().any(|l| l == line),
        "no line {line:?} in /metrics:\n{body}"
    );
}

#[tokio::test]
async fn metrics_count_stored_duplicate_and_refused_reports() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.metrics.listen = Some(metrics_addr);
        c.max_report_bytes = 64 * 1024;
    })
    .await;
    let url = collector.url();

    let mut a = push_client(&pki.client_tls(Role::Agent, "node-a"), &url)
        .await
        .unwrap();
    for seq in 1..=3 {
        let ack = a.push(report("node-a", 1, seq)).await.unwrap().into_inner();
        assert!(!ack.duplicate);
    }
    // Re-sent: acknowledged again as a duplicate.
    let ack = a.push(report("node-a", 1, 2)).await.unwrap().into_inner();
    assert!(ack.duplicate);
    // node-a's certificate sending node-b's report.
    let s = a.push(report("node-b", 1, 1)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // Over max_report_bytes: refused by tonic before the handler, still counted.
    let mut big = report("node-a", 1, 4);
    big.node_info.as_mut().unwrap().hostname = "x".repeat(128 * 1024);
    let s = a.push(big).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");

    let (status, headers, body) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}");
    assert!(
        headers
            .lines()
            .any(|h| h
                .eq_ignore_ascii_case("content-type: text/plain; version=0.0.4; charset=utf-8")),
        "{headers}"
    );
    assert_line(
        &body,
        "sov_collector_reports_ingested_total{outcome=\"stored\"} 3",
    );
    assert_line(
        &body,
        "sov_collector_reports_ingested_total{outcome=\"duplicate\"} 1",
    );
    assert_line(
        &body,
        "sov_collector_reports_ingested_total{outcome=\"conflict\"} 0",
    );
    assert_line(
        &body,
        "sov_collector_ingest_errors_total{code=\"permission_denied\"} 1",
    );
    assert_line(
        &body,
        "sov_collector_ingest_errors_total{code=\"resource_exhausted\"} 1",
    );
    assert_line(
        &body,
        "sov_collector_ingest_errors_total{code=\"unauthenticated\"} 0",
    );
    assert_line(&body, "sov_collector_store_ingests_total 4");
    assert_line(&body, "sov_collector_nodes 1");
    assert_line(
        &body,
        "sov_collector_nodes_silent{threshold_secs=\"300\"} 0",
    );
    assert!(
        body.contains("# TYPE process_resident_memory_bytes gauge\n"),
        "{body}"
    );
    // Counters and gauges only: nothing about what the node holds or where it sends data.
    assert!(!body.contains("node-a"), "{body}");

    let (status, _, _) = http_get(metrics_addr, "/other").await;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");

    collector.stop().await;
    // The endpoint stops with the collector.
    eventually(
        Duration::from_secs(5),
        "the metrics listener to close",
        || async {
            tokio::net::TcpStream::connect(metrics_addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
}

/// The value of the sample line `name` (no labels) in an exposition.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_its_own_health_on_its_metrics_address() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |_| {}).await;
    let spool = tempfile::tempdir().unwrap();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cfg = sov_e2e::agent_config(&pki, "metered", vec![collector.url()], spool.path());
    cfg.metrics.listen = Some(metrics_addr);
    cfg.net.enabled = false;
    let agent = sov_agent::Agent::open(cfg).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));

    let body = eventually(Duration::from_secs(30), "two reports acked", || async {
        let (status, _, body) = tokio::time::timeout(
            Duration::from_secs(5),
            http_get_opt(metrics_addr, "/metrics"),
        )
        .await
        .ok()??;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        (sample(&body, "sov_agent_reports_acked_total")? >= 2.0).then_some(body)
    })
    .await;
    assert!(
        sample(&body, "sov_agent_cycles_total").unwrap() >= 2.0,
        "{body}"
    );
    assert!(
        sample(&body, "sov_agent_cycle_seconds").unwrap() > 0.0,
        "{body}"
    );
    assert_line(&body, "sov_agent_dropped_reports_total 0");
    assert!(sample(&body, "sov_agent_spool_bytes").is_some(), "{body}");
    assert!(
        sample(&body, "process_resident_memory_bytes").unwrap() > 1e6,
        "{body}"
    );
    let expiry = sample(&body, "sov_agent_certificate_expiry_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry > now + 300.0 * 86_400.0,
        "a one-year certificate: {expiry}"
    );
    // Nothing the agent observes on the node is exposed.
    assert!(!body.contains("pid"), "{body}");

    stop.cancel();
    task.await.unwrap().unwrap();
    collector.stop().await;
}

/// [`http_get`], `None` while nothing listens yet.
async fn http_get_opt(addr: SocketAddr, path: &str) -> Option<(String, String, String)> {
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(http_get(addr, path).await)
}
