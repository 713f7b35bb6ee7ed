//! The regulators' API: what one audited query costs. Every answered query appends (and
//! commits) one audit record first, so a query is at least one durable write.
//!
//! ```sh
//! cargo run --release -p sov-e2e --example bench_api -- --nodes 200 --queries 300
//! ```
//!
//! One collector on embedded SQLite in this process, `--nodes` nodes with one report each;
//! then, one after the other: `--queries` audit appends straight to the store; `--queries`
//! gRPC `ListNodes` (100 nodes a page) on one channel; `--queries` HTTPS
//! `GET /api/v1/nodes?limit=100` with a token, each on a new TLS connection (handshake
//! included); and one scorecard over all of it. Prints p50, p99 and the rate of each.

use std::time::{Duration, Instant};

use sov_collector::auth::Role;
use sov_e2e::{InProcessCollector, Pki, free_port, https_get, push_client, report};
use sov_proto::pb;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn summary(what: &str, mut samples: Vec<Duration>, total: Duration) {
    samples.sort();
    let pct = |p: f64| {
        let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    println!(
        "{what:<40} n={:<5} p50={:>7.2} ms  p99={:>7.2} ms  rate={:>7.1}/s",
        samples.len(),
        pct(0.50),
        pct(0.99),
        samples.len() as f64 / total.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let nodes = arg("--nodes", 200);
    let queries = arg("--queries", 300).max(1);
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.http.listen = Some(format!("127.0.0.1:{port}").parse().expect("addr"));
    })
    .await;
    let url = collector.url();
    for i in 0..nodes {
        let name = format!("node-{i:04}");
        let mut c = push_client(&pki.client_tls(Role::Agent, &name), &url)
            .await
            .expect("push client");
        c.push(report(&name, 1, 1)).await.expect("push");
    }
    let store = sov_collector::store::open("", data.path())
        .await
        .expect("store");
    let now = sov_common::clock::now_unix_ms();
    let (token, rec) =
        sov_collector::token::generate(Role::Regulator, "bench", now, 3_600_000).expect("token");
    store.insert_token(rec).await.expect("insert token");

    // 1. Audit appends alone (one committed, fsynced transaction each).
    let mut samples = Vec::new();
    let start = Instant::now();
    for i in 0..queries {
        let t = Instant::now();
        store
            .append_audit(sov_evidence::audit::AuditEntry {
                at_unix_ms: now,
                who: "bench".into(),
                role: "regulator".into(),
                via: "grpc".into(),
                call: "ListNodes".into(),
                params: serde_json::json!({"i": i}),
                rows: 100,
                outcome: "ok".into(),
            })
            .await
            .expect("append");
        samples.push(t.elapsed());
    }
    summary("audit append (store only)", samples, start.elapsed());

    // 2. gRPC ListNodes, one channel.
    let channel = pki
        .client_tls(Role::Regulator, "analyst")
        .connect(&url)
        .await
        .expect("connect");
    let mut client = pb::query_client::QueryClient::new(channel);
    let mut samples = Vec::new();
    let start = Instant::now();
    for _ in 0..queries {
        let t = Instant::now();
        let r = client
            .list_nodes(pb::ListNodesRequest {
                limit: 100,
                after: String::new(),
            })
            .await
            .expect("list nodes");
        assert_eq!(r.into_inner().nodes.len() as u64, nodes.min(100));
        samples.push(t.elapsed());
    }
    summary(
        "gRPC ListNodes limit=100 (audited)",
        samples,
        start.elapsed(),
    );

    // 3. HTTPS with a token, a new TLS connection each.
    let addr = collector.config.http.listen.expect("http");
    let mut samples = Vec::new();
    let start = Instant::now();
    for _ in 0..queries {
        let t = Instant::now();
        let r = https_get(&pki, addr, None, Some(&token), "/api/v1/nodes?limit=100")
            .await
            .expect("https");
        assert_eq!(r.status, 200, "{}", r.body);
        samples.push(t.elapsed());
    }
    summary(
        "HTTPS /api/v1/nodes limit=100 (new conn)",
        samples,
        start.elapsed(),
    );

    // 4. One scorecard.
    let t = Instant::now();
    let r = https_get(
        &pki,
        addr,
        None,
        Some(&token),
        "/api/v1/scorecard?since=1h&jurisdiction=MA",
    )
    .await
    .expect("scorecard");
    assert_eq!(r.status, 200, "{}", r.body);
    summary("HTTPS scorecard (1 h)", vec![t.elapsed()], t.elapsed());
    let audit = store.audit_log(0, u32::MAX).await.expect("audit").len();
    println!("audit records: {audit}");
    collector.stop().await;
}
