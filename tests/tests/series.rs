//! The console's time series (`GET /api/v1/series`) agree with the scorecard of the same range:
//! the buckets' bytes per country, GPU-hours inside and outside and reports per node add up to
//! the range's totals, each in the bucket of its observation.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use sov_collector::auth::Role;
use sov_collector::config::GeoOverride;
use sov_e2e::{InProcessCollector, Pki, free_port, https_get, outbound_flow, push_client, report};
use sov_proto::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_buckets_add_up_to_the_scorecard_of_the_range() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let collector = InProcessCollector::start(&pki, data.path(), |c| {
        c.geo.overrides = vec![GeoOverride {
            cidr: "192.0.2.0/24".into(),
            country: "US".into(),
            ..Default::default()
        }];
        c.http.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    })
    .await;
    let now = sov_common::clock::now_unix_ms();
    let mut c = push_client(&pki.client_tls(Role::Agent, "n1"), &collector.url())
        .await
        .unwrap();
    // Reports 2, 5, 8 and 11 hours ago: 1, 2, 3, 4 MB to the US and 600 GPU-seconds each.
    for seq in 1..=4u64 {
        let at = now - 3_600_000 * (14 - 3 * seq as i64);
        let mut flow = outbound_flow("192.0.2.7", 1_000_000 * seq);
        flow.end_unix_ms = at;
        flow.start_unix_ms = at - 1000;
        let mut r = report("n1", 1, seq);
        r.observed_unix_ms = at;
        r.gpus = vec![pb::GpuSample {
            uuid: "GPU-0".into(),
            processes: vec![pb::GpuProcess {
                pid: 100,
                gpu_seconds: 600.0,
                ..Default::default()
            }],
            ..Default::default()
        }];
        r.flows = vec![flow];
        c.push(r).await.unwrap();
    }
    let addr = collector.config.http.listen.unwrap();
    let reg = pki.client(Role::Regulator, "analyst");
    let since = now - 24 * 3_600_000;
    let q = format!("since={since}&until={now}&jurisdiction=MA");
    let series = https_get(
        &pki,
        addr,
        Some(&reg),
        None,
        &format!("/api/v1/series?{q}&buckets=12"),
    )
    .await
    .unwrap()
    .json();
    let card = https_get(
        &pki,
        addr,
        Some(&reg),
        None,
        &format!("/api/v1/scorecard?{q}"),
    )
    .await
    .unwrap()
    .json();
    assert_eq!(series["buckets"].as_array().unwrap().len(), 12, "{series}");
    // Two hours, on whole minutes (the range's start is taken back to its minute).
    let step = series["step_ms"].as_i64().unwrap();
    assert!(
        (2 * 3_600_000..=2 * 3_600_000 + 60_000).contains(&step),
        "{step}"
    );
    assert_eq!(step % 60_000, 0);

    let us = series["bytes_sent_by_country"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["country"] == "US")
        .unwrap();
    let per_bucket: Vec<u64> = us["bytes_sent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        per_bucket.iter().filter(|b| **b > 0).count(),
        4,
        "{per_bucket:?}"
    );
    assert_eq!(per_bucket.iter().sum::<u64>(), 10_000_000);
    assert_eq!(us["inside"], false);
    assert_eq!(card["data"]["bytes_sent_outside"], 10_000_000, "{card}");

    let inside: f64 = series["gpu_hours"]["inside"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    let expected = card["compute"]["gpu_hours_inside"].as_f64().unwrap();
    assert!(expected > 0.0, "{card}");
    assert!((inside - expected).abs() < 1e-3, "{inside} vs {expected}");

    let reports = &series["reports_by_node"][0];
    assert_eq!(reports["node"], "n1");
    assert_eq!(reports["total"], 4, "{series}");
    collector.stop().await;
}
