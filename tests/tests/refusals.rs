//! Ingest refuses what it must, each with the right status, and keeps serving everyone else.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use sov_agent::transport::ClientTls;
use sov_collector::auth::Role;
use sov_e2e::{InProcessCollector, Pki, push_client, report};
use tonic::Code;

/// The well-behaved agent still gets its report stored and acknowledged.
async fn still_serving(pki: &Pki, url: &str, seq: u64) {
    let mut ok = push_client(&pki.client_tls(Role::Agent, "node-a"), url)
        .await
        .unwrap();
    let ack = ok
        .push(report("node-a", 1, seq))
        .await
        .expect("a good report after a refusal")
        .into_inner();
    assert_eq!((ack.seq, ack.duplicate), (seq, false));
}

#[tokio::test]
async fn every_bad_ingest_is_refused_with_its_status_and_the_collector_keeps_serving() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let collector =
        InProcessCollector::start(&pki, data.path(), |c| c.max_report_bytes = 64 * 1024).await;
    let url = collector.url();
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };

    still_serving(&pki, &url, next()).await;

    // A certificate for node-a sending node-b's report.
    let mut a = push_client(&pki.client_tls(Role::Agent, "node-a"), &url)
        .await
        .unwrap();
    let s = a.push(report("node-b", 1, 1)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("node-b") && s.message().contains("node-a"),
        "{}",
        s.message()
    );
    still_serving(&pki, &url, next()).await;

    // No client certificate at all.
    let ca_only = ClientTls::ca_only(&std::fs::read_to_string(&pki.ca).unwrap());
    match push_client(&ca_only, &url).await {
        Ok(mut c) => {
            let s = c.push(report("node-a", 1, 99)).await.unwrap_err();
            assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
        }
        Err(e) => panic!(
            "a client without a certificate should reach the service and get UNAUTHENTICATED, got {e}"
        ),
    }
    still_serving(&pki, &url, next()).await;

    // A certificate from another CA: the TLS handshake fails, nothing is stored.
    let other = Pki::new();
    let foreign = other.client(Role::Agent, "node-a");
    let foreign_tls = ClientTls::load(&pki.ca, &foreign.cert, &foreign.key, None).unwrap();
    let refused = match push_client(&foreign_tls, &url).await {
        Err(_) => true,
        Ok(mut c) => c.push(report("node-a", 1, 98)).await.is_err(),
    };
    assert!(refused, "a certificate from another CA was accepted");
    still_serving(&pki, &url, next()).await;

    // A regulator calling Ingest.
    let mut reg = push_client(&pki.client_tls(Role::Regulator, "alice"), &url)
        .await
        .unwrap();
    let s = reg.push(report("alice", 1, 1)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("regulator"), "{}", s.message());
    still_serving(&pki, &url, next()).await;

    // A report over the size limit.
    let mut big = report("node-a", 1, 97);
    big.node_info
        .as_mut()
        .unwrap()
        .labels
        .insert("pad".into(), "x".repeat(100 * 1024));
    let s = a.push(big).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("too large"), "{}", s.message());
    still_serving(&pki, &url, next()).await;

    // A report with an empty node.
    let s = a.push(report("", 1, 96)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("node"), "{}", s.message());
    still_serving(&pki, &url, next()).await;

    // An agent may not read.
    let channel = pki
        .client_tls(Role::Agent, "node-a")
        .connect(&url)
        .await
        .unwrap();
    let mut q = sov_proto::pb::query_client::QueryClient::new(channel);
    let s = q
        .list_nodes(sov_proto::pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // Only the good reports were stored.
    let nodes = sov_e2e::list_nodes(&pki, &url).await.unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].node, "node-a");
    assert_eq!(nodes[0].reports, seq);
    assert_eq!(nodes[0].last_seq, seq);
    collector.stop().await;
}
