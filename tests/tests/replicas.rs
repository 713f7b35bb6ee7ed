//! Several collector replicas on one PostgreSQL: agents list several URLs and fail over; one
//! replica is killed mid-run; every report is stored exactly once. With a policy and a webhook
//! on both, each breach is opened once and each alert delivered once, also after the replica
//! holding the rules lease is killed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use sov_agent::Agent;
use sov_collector::auth::Role;
use sov_collector::config::{GeoOverride, WebhookSinkConfig};
use sov_collector::store::postgres::PostgresStore;
use sov_e2e::receivers::http_receiver;
use sov_e2e::{
    CollectorProcess, Pki, agent_config, eventually, free_port, node, outbound_flow, push_client,
    report_with_flows,
};
use sov_proto::pb;
use tokio_util::sync::CancellationToken;

/// A fresh PostgreSQL schema named after `tag` and this process, and the store URL that uses
/// it; `None` (after saying so) when PostgreSQL is not there and not required.
async fn schema(tag: &str) -> Option<(PostgresStore, String)> {
    let base = sov_e2e::postgres_url();
    let schema = format!("sov_e2e_{tag}_{}", std::process::id());
    // Creating the schema also proves PostgreSQL is there.
    let admin = match PostgresStore::connect_with_schema(&base, &schema).await {
        Ok(s) => s,
        Err(e) => {
            assert!(
                !sov_e2e::postgres_required(),
                "PostgreSQL required but not reachable at {base}: {e}"
            );
            sov_e2e::skipped(
                &format!("replicas ({tag})"),
                &format!(
                    "PostgreSQL not reachable at {base} ({e}); set SOV_REQUIRE_POSTGRES=1 to fail instead"
                ),
            );
            return None;
        }
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    Some((
        admin,
        format!("{base}{sep}options=-csearch_path%3D{schema}"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_postgres_store_every_report_once_when_one_is_killed() {
    let Some((admin, url)) = schema("replicas").await else {
        return;
    };

    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let dir_a = work.path().join("a");
    let dir_b = work.path().join("b");
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let mut a = CollectorProcess::start_with(&pki, &dir_a, pa, |c| c.store.url = url.clone());
    let b = CollectorProcess::start_with(&pki, &dir_b, pb, |c| c.store.url = url.clone());
    let (ua, ub) = (a.url(), b.url());

    // Two agents prefer A, one prefers B; all fail over to the other.
    let stop = CancellationToken::new();
    let mut agents = Vec::new();
    let mut tasks = Vec::new();
    let mut dirs = Vec::new();
    for (name, urls) in [
        ("rep-1", vec![ua.clone(), ub.clone()]),
        ("rep-2", vec![ua.clone(), ub.clone()]),
        ("rep-3", vec![ub.clone(), ua.clone()]),
    ] {
        let d = tempfile::tempdir().unwrap();
        let agent = Agent::open(agent_config(&pki, name, urls, &d.path().join("spool"))).unwrap();
        agents.push(agent.clone());
        let s = stop.clone();
        tasks.push(tokio::spawn(async move { agent.run(s).await.unwrap() }));
        dirs.push(d);
    }
    let names = ["rep-1", "rep-2", "rep-3"];
    for n in names {
        eventually(
            Duration::from_secs(30),
            &format!("{n} reporting"),
            || async {
                node(&pki, &ub, n)
                    .await
                    .filter(|x| x.last_seq >= 2)
                    .map(|_| ())
            },
        )
        .await;
    }
    a.kill9();
    // Keep reporting through B only, then stop and check what B (and so PostgreSQL) holds.
    let built: Vec<u64> = agents
        .iter()
        .map(|x| x.spool_stats().next_seq - 1 + 3)
        .collect();
    for (n, want) in names.iter().zip(&built) {
        eventually(
            Duration::from_secs(40),
            &format!("{n} delivered through {want} via B"),
            || async {
                node(&pki, &ub, n)
                    .await
                    .filter(|x| x.last_seq >= *want)
                    .map(|_| ())
            },
        )
        .await;
    }
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    for n in names {
        let x = node(&pki, &ub, n).await.unwrap();
        assert_eq!(
            (x.reports, x.missing, x.conflicts, x.epochs),
            (x.last_seq, 0, 0, 1),
            "{x:?}"
        );
    }
    drop(b);
    admin.drop_schema().await.unwrap();
}

/// Wait until `got` holds at least `n` webhook bodies from `rx`.
async fn wait_alerts(
    rx: &mut tokio::sync::mpsc::Receiver<sov_e2e::receivers::HttpRequest>,
    got: &mut Vec<serde_json::Value>,
    n: usize,
    what: &str,
) {
    eventually(Duration::from_secs(60), what, || {
        while let Ok(r) = rx.try_recv() {
            got.push(r.json());
        }
        let done = got.len() >= n;
        async move { done.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_open_each_breach_once_and_deliver_each_alert_once_when_one_is_killed() {
    let Some((admin, url)) = schema("replica_breaches").await else {
        return;
    };
    let (hook, mut received) = http_receiver(200).await;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        "jurisdiction = \"MA\"\n[thresholds]\nforeign_egress_bytes = 1000\nwindow_secs = 600\nsilence_secs = 3600\nquiet_secs = 3600\n",
    )
    .unwrap();
    let tweak = |c: &mut sov_collector::config::CollectorConfig| {
        c.store.url = url.clone();
        c.policy = Some(policy.clone());
        c.geo.overrides = vec![GeoOverride {
            cidr: "203.0.113.0/24".to_owned(),
            country: "FR".to_owned(),
            asn: None,
            org: None,
            operator_country: None,
        }];
        c.alert.webhook = vec![WebhookSinkConfig {
            url: hook.clone(),
            ..Default::default()
        }];
        c.alert.retry_max_secs = Some(2);
    };
    let (pa, pb_) = (free_port(), free_port());
    let (dir_a, dir_b) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let mut replicas = vec![
        CollectorProcess::start_with(&pki, &dir_a, pa, tweak),
        CollectorProcess::start_with(&pki, &dir_b, pb_, tweak),
    ];
    let push = |node: &'static str, seq: u64, to: String| {
        let tls = pki.client_tls(Role::Agent, node);
        async move {
            let mut c = push_client(&tls, &to).await.unwrap();
            c.push(report_with_flows(
                node,
                seq,
                vec![outbound_flow("203.0.113.9", 50_000)],
            ))
            .await
            .unwrap();
        }
    };
    // Four nodes abroad, two through each replica, each pushed twice (the second push is a
    // new observation of the same breach, on the other replica for half of them).
    let urls = [replicas[0].url(), replicas[1].url()];
    for (i, n) in ["ra-1", "ra-2", "ra-3", "ra-4"].into_iter().enumerate() {
        push(n, 1, urls[i % 2].clone()).await;
        push(n, 2, urls[(i / 2) % 2].clone()).await;
    }
    let mut bodies: Vec<serde_json::Value> = Vec::new();
    wait_alerts(&mut received, &mut bodies, 4, "four open alerts").await;

    // Kill the replica that evaluates the rules; the other takes the leases over.
    let rows = admin.lease_holders().await.unwrap();
    let holder = rows
        .iter()
        .find(|(name, _)| name == "rules")
        .map(|(_, h)| h.clone())
        .unwrap();
    let victim = replicas
        .iter()
        .position(|r| holder.contains(&format!("/{}/", r.pid())))
        .unwrap_or(0);
    replicas[victim].kill9();
    let survivor = replicas[1 - victim].url();
    push("ra-5", 1, survivor.clone()).await;
    push("ra-1", 3, survivor.clone()).await;
    wait_alerts(
        &mut received,
        &mut bodies,
        5,
        "the fifth open alert, from the surviving replica",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    while let Ok(r) = received.try_recv() {
        bodies.push(r.json());
    }

    let tls = pki.client_tls(Role::Regulator, "analyst");
    let mut q = pb::query_client::QueryClient::new(tls.connect(&survivor).await.unwrap());
    let all = q
        .list_breaches(pb::ListBreachesRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .breaches;
    assert_eq!(all.len(), 5, "one breach per node: {all:?}");
    let mut nodes: Vec<&str> = all.iter().map(|b| b.node.as_str()).collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["ra-1", "ra-2", "ra-3", "ra-4", "ra-5"]);
    assert!(
        all.iter()
            .all(|b| b.rule == "foreign-egress" && b.state == "open")
    );
    let ra1 = all.iter().find(|b| b.node == "ra-1").unwrap();
    assert!(ra1.count >= 2, "observed again, not reopened: {ra1:?}");
    let mut seqs: Vec<u64> = bodies.iter().map(|b| b["seq"].as_u64().unwrap()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2, 3, 4, 5], "each open alert once: {bodies:?}");
    assert!(bodies.iter().all(|b| b["state"] == "open"));
    drop(replicas);
    admin.drop_schema().await.unwrap();
}
