//! Breach rules end to end: a policy file, reports with flows abroad, and `ListBreaches`
//! (what `sovctl breaches` prints) showing one open foreign-egress breach per node and
//! country, none for an allowed destination.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use sov_collector::auth::Role;
use sov_collector::config::GeoOverride;
use sov_e2e::{InProcessCollector, Pki, eventually, outbound_flow, push_client, report_with_flows};
use sov_proto::pb;

async fn breaches(pki: &Pki, url: &str) -> Vec<pb::BreachSummary> {
    let tls = pki.client_tls(Role::Regulator, "test-regulator");
    let channel = tls.connect(url).await.unwrap();
    let mut client = pb::query_client::QueryClient::new(channel);
    client
        .list_breaches(pb::ListBreachesRequest {
            state: "open".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .breaches
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_egress_opens_one_breach_and_allowed_destinations_none() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "jurisdiction = \"MA\"\n\n[thresholds]\nforeign_egress_bytes = 1000\nwindow_secs = 60\nsilence_secs = 3600\nquiet_secs = 600\n\n[[allow]]\ncidr = \"198.51.100.0/24\"\nreason = \"backup provider\"\n",
    )
    .unwrap();
    let p = policy.clone();
    let c = InProcessCollector::start(&pki, &dir.path().join("data"), move |c| {
        c.policy = Some(p);
        c.geo.overrides = vec![
            GeoOverride {
                cidr: "203.0.113.0/24".to_owned(),
                country: "FR".to_owned(),
                asn: None,
                org: None,
                operator_country: None,
            },
            GeoOverride {
                cidr: "198.51.100.0/24".to_owned(),
                country: "DE".to_owned(),
                asn: None,
                org: None,
                operator_country: None,
            },
        ];
    })
    .await;
    let url = c.url();
    let mut a = push_client(&pki.client_tls(Role::Agent, "node-a"), &url)
        .await
        .unwrap();
    let mut b = push_client(&pki.client_tls(Role::Agent, "node-b"), &url)
        .await
        .unwrap();
    a.push(report_with_flows(
        "node-a",
        1,
        vec![outbound_flow("203.0.113.7", 50_000)],
    ))
    .await
    .unwrap();
    b.push(report_with_flows(
        "node-b",
        1,
        vec![outbound_flow("198.51.100.9", 50_000)],
    ))
    .await
    .unwrap();

    let first = eventually(Duration::from_secs(20), "a foreign-egress breach", || {
        let (pki, url) = (&pki, url.clone());
        async move {
            let open = breaches(pki, &url).await;
            (!open.is_empty()).then_some(open)
        }
    })
    .await;
    assert_eq!(first.len(), 1, "{first:?}");
    let br = &first[0];
    assert_eq!(br.rule, "foreign-egress");
    assert_eq!(br.node, "node-a");
    assert_eq!(br.subject, "country:FR");
    assert_eq!(br.severity, "critical");
    assert_eq!(br.state, "open");
    let json = sov_evidence::view::breach_json(br);
    assert!(json["resolved_at"].is_null());
    assert!(json["opened_at"].as_str().unwrap().contains('T'));
    assert_eq!(
        json["evidence"]["counters"]["destinations"][0]["address"],
        "203.0.113.7"
    );

    // More bytes to the same country: the same breach, observed again.
    a.push(report_with_flows(
        "node-a",
        2,
        vec![outbound_flow("203.0.113.7", 80_000)],
    ))
    .await
    .unwrap();
    let again = eventually(Duration::from_secs(20), "the breach observed again", || {
        let (pki, url, count) = (&pki, url.clone(), br.count);
        async move {
            let open = breaches(pki, &url).await;
            (open.len() == 1 && open[0].count > count).then_some(open)
        }
    })
    .await;
    assert_eq!(again[0].breach_id, br.breach_id);
    assert!(again.iter().all(|x| x.node != "node-b"), "{again:?}");
    c.stop().await;
}
