//! A network partition between an agent and its collector, made with a network namespace:
//! the agent runs as a child process inside the namespace, the collector outside, joined by
//! a veth pair whose link the test takes down (nothing passes, no connection is reset) and
//! brings back. Afterwards every report the agent built is stored exactly once, nothing is
//! missing, and the reports built during the partition arrived.
//!
//! `SOV_PARTITION_SECS` sets how long the link stays down (default 20; run it with 300 for the
//! "minutes" variant). Without the right to create namespaces the test says so and passes,
//! unless `SOV_REQUIRE_NETNS=1`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use sov_collector::auth::Role;
use sov_e2e::netns::Netns;
use sov_e2e::{CollectorProcess, Pki, agent_config, bin_path, eventually, free_port, spawn};
use sov_proto::pb;

async fn summary(pki: &Pki, url: &str, name: &str) -> Option<pb::NodeSummary> {
    let channel = pki
        .client_tls(Role::Regulator, "partition-reader")
        .with_server_name("localhost".into())
        .connect(url)
        .await
        .ok()?;
    let mut q = pb::query_client::QueryClient::new(channel);
    q.list_nodes(pb::ListNodesRequest::default())
        .await
        .ok()?
        .into_inner()
        .nodes
        .into_iter()
        .find(|n| n.node == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_cut_off_from_its_collector_delivers_everything_once_when_the_link_returns() {
    let ns = match Netns::create(3, 1) {
        Ok(ns) => ns,
        Err(e) if std::env::var("SOV_REQUIRE_NETNS").as_deref() != Ok("1") => {
            sov_e2e::skipped(
                "partition::an_agent_cut_off_from_its_collector_delivers_everything_once_when_the_link_returns",
                &format!(
                    "cannot create a network namespace ({e}); set SOV_REQUIRE_NETNS=1 to fail instead"
                ),
            );
            return;
        }
        Err(e) => panic!("cannot create a network namespace: {e}"),
    };
    let partition = Duration::from_secs(
        std::env::var("SOV_PARTITION_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("{}:{port}", ns.host_v4());
    let collector = CollectorProcess::start_with(&pki, work.path(), port, |c| {
        c.listen = listen.parse().unwrap();
    });
    let url = collector.url();
    let cfg = agent_config(
        &pki,
        "node-p",
        vec![url.clone()],
        &work.path().join("spool"),
    );
    let cfg_path = work.path().join("agent.toml");
    sov_e2e::write_agent_toml(&cfg, &cfg_path);
    let agent_bin = bin_path("e2e-agent");
    let mut agent = spawn(
        "ip",
        &[
            "netns",
            "exec",
            &ns.name,
            &agent_bin,
            "run",
            "--config",
            cfg_path.to_str().unwrap(),
        ],
        &work.path().join("agent.log"),
    );

    let before = eventually(Duration::from_secs(60), "first reports", || async {
        summary(&pki, &url, "node-p")
            .await
            .filter(|n| n.last_seq >= 3)
    })
    .await;
    ns.set_link(false).unwrap();
    tokio::time::sleep(partition).await;
    let during = summary(&pki, &url, "node-p").await.unwrap();
    ns.set_link(true).unwrap();
    // The agent builds a report a second: those of the partition must all arrive.
    let want = during.last_seq + partition.as_secs() / 2;
    let after = eventually(
        Duration::from_secs(120),
        "the partition's reports",
        || async {
            summary(&pki, &url, "node-p")
                .await
                .filter(|n| n.last_seq >= want)
        },
    )
    .await;
    agent.kill9();
    let last = summary(&pki, &url, "node-p").await.unwrap();
    eprintln!(
        "before {} during {} after {} final {}",
        before.last_seq, during.last_seq, after.last_seq, last.last_seq
    );
    assert_eq!(last.reports, last.last_seq, "{last:?}");
    assert_eq!(last.missing, 0, "{last:?}");
    assert_eq!(last.conflicts, 0, "{last:?}");
    assert_eq!(last.epochs, 1, "{last:?}");
}
