//! Alert receivers that hang (read the request, never answer) and then answer 500 for a long
//! time, then recover: every alert in the breach log reaches the receiver, acknowledged (2xx)
//! exactly once each and in log order; none is lost and none is acknowledged twice.
//! `SOV_RECEIVER_FAULT_SECS` sets how long each fault lasts (default 15; 120 for minutes).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use sov_collector::auth::Role;
use sov_collector::config::{GeoOverride, WebhookSinkConfig};
use sov_e2e::receivers::{HANG, flaky_http_receiver};
use sov_e2e::{InProcessCollector, Pki, eventually, outbound_flow, push_client, report_with_flows};

fn breach_log_len(data: &std::path::Path) -> u64 {
    let conn =
        rusqlite::Connection::open(data.join(sov_collector::store::sqlite::DB_FILE)).unwrap();
    conn.query_row("SELECT COUNT(*) FROM breach_log", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_that_hangs_then_fails_then_recovers_gets_every_alert_acknowledged_once_in_order()
 {
    let fault = Duration::from_secs(
        std::env::var("SOV_RECEIVER_FAULT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(15),
    );
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "jurisdiction = \"MA\"\n\n[thresholds]\nforeign_egress_bytes = 1000\nwindow_secs = 60\nsilence_secs = 3600\nquiet_secs = 600\n",
    )
    .unwrap();
    let mode = Arc::new(AtomicU16::new(HANG));
    let (url, mut received) = flaky_http_receiver(mode.clone()).await;
    let p = policy.clone();
    let collector = InProcessCollector::start(&pki, &data, move |c| {
        c.policy = Some(p);
        c.geo.overrides = vec![GeoOverride {
            cidr: "203.0.113.0/24".to_owned(),
            country: "FR".to_owned(),
            asn: None,
            org: None,
            operator_country: None,
        }];
        c.alert.retry_max_secs = Some(2);
        c.alert.webhook = vec![WebhookSinkConfig {
            url,
            ..Default::default()
        }];
    })
    .await;
    let grpc = collector.url();
    // Breaches open while the receiver hangs, and more while it answers 500.
    let push_breaches = |from: u32, to: u32| {
        let (pki, grpc) = (&pki, grpc.clone());
        async move {
            for i in from..to {
                let node = format!("node-{i}");
                let mut c = push_client(&pki.client_tls(Role::Agent, &node), &grpc)
                    .await
                    .unwrap();
                c.push(report_with_flows(
                    &node,
                    1,
                    vec![outbound_flow("203.0.113.7", 50_000)],
                ))
                .await
                .unwrap();
            }
        }
    };
    push_breaches(0, 4).await;
    tokio::time::sleep(fault).await;
    mode.store(500, Ordering::SeqCst);
    push_breaches(4, 8).await;
    tokio::time::sleep(fault).await;
    mode.store(200, Ordering::SeqCst);

    // Every breach log record acknowledged once.
    let mut all = Vec::new();
    let acked = eventually(Duration::from_secs(120), "every alert acknowledged", || {
        while let Ok(r) = received.try_recv() {
            all.push(r);
        }
        let acked: Vec<u64> = all
            .iter()
            .filter(|(status, _)| *status == 200)
            .map(|(_, r)| r.json()["seq"].as_u64().unwrap())
            .collect();
        let want = breach_log_len(&data);
        let done = want >= 8 && acked.len() as u64 >= want;
        async move { done.then_some(acked) }
    })
    .await;
    // A little longer: nothing more may arrive.
    tokio::time::sleep(Duration::from_secs(4)).await;
    while let Ok(r) = received.try_recv() {
        all.push(r);
    }
    let late: Vec<_> = all.iter().filter(|(s, _)| *s == 200).collect();
    assert_eq!(late.len(), acked.len(), "an alert was acknowledged twice");
    let want = breach_log_len(&data);
    assert_eq!(
        acked,
        (1..=want).collect::<Vec<_>>(),
        "every breach log record, once, in order"
    );
    let hung = all.iter().filter(|(s, _)| *s == HANG).count();
    let failed = all.iter().filter(|(s, _)| *s == 500).count();
    eprintln!(
        "{hung} tries left hanging, {failed} answered 500, {} acknowledged",
        acked.len()
    );
    assert!(
        hung >= 1 && failed >= 1,
        "the faults were not exercised: {hung} hung, {failed} failed"
    );
    collector.stop().await;
}
