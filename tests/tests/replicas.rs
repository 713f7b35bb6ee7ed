//! Several collector replicas on one PostgreSQL: agents list several URLs and fail over; one
//! replica is killed mid-run; every report is stored exactly once.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use sov_agent::Agent;
use sov_collector::store::postgres::PostgresStore;
use sov_e2e::{CollectorProcess, Pki, agent_config, eventually, free_port, node};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_postgres_store_every_report_once_when_one_is_killed() {
    let base = sov_e2e::postgres_url();
    let schema = format!("sov_e2e_replicas_{}", std::process::id());
    // Creating the schema also proves PostgreSQL is there.
    let admin = match PostgresStore::connect_with_schema(&base, &schema).await {
        Ok(s) => s,
        Err(e) => {
            assert!(
                !sov_e2e::postgres_required(),
                "PostgreSQL required but not reachable at {base}: {e}"
            );
            eprintln!(
                "SKIP: PostgreSQL not reachable at {base} ({e}); set SOV_REQUIRE_POSTGRES=1 to fail instead"
            );
            return;
        }
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-csearch_path%3D{schema}");

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
