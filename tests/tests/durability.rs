//! Nothing acknowledged is lost, nothing is stored twice, and every missing report is
//! accounted for: agents and collectors are killed, restarted and starved of space.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use sov_agent::Agent;
use sov_e2e::{
    CollectorProcess, InProcessCollector, Pki, agent_config, eventually, free_port, node,
};
use tokio_util::sync::CancellationToken;

/// Running in-process agents.
struct Agents {
    agents: Vec<Agent>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Agents {
    fn start(
        pki: &Pki,
        names: &[&str],
        urls: &[String],
        tweak: impl Fn(&mut sov_agent::AgentConfig),
    ) -> Self {
        let stop = CancellationToken::new();
        let mut agents = Vec::new();
        let mut tasks = Vec::new();
        let mut dirs = Vec::new();
        for name in names {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = agent_config(pki, name, urls.to_vec(), &dir.path().join("spool"));
            tweak(&mut cfg);
            let agent = Agent::open(cfg).unwrap();
            agents.push(agent.clone());
            let s = stop.clone();
            tasks.push(tokio::spawn(async move { agent.run(s).await.unwrap() }));
            dirs.push(dir);
        }
        Self {
            agents,
            stop,
            tasks,
            _dirs: dirs,
        }
    }

    /// Highest sequence number each agent has built.
    fn built(&self) -> Vec<u64> {
        self.agents
            .iter()
            .map(|a| a.spool_stats().next_seq - 1)
            .collect()
    }

    async fn stop(self) -> Vec<Agent> {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        self.agents
    }
}

/// Wait until the collector has stored at least `at_least[i]` as last_seq for each node.
async fn wait_delivered(pki: &Pki, url: &str, names: &[&str], at_least: &[u64], timeout: Duration) {
    for (name, min) in names.iter().zip(at_least) {
        eventually(
            timeout,
            &format!("{name} delivered through seq {min}"),
            || async {
                node(pki, url, name)
                    .await
                    .filter(|n| n.last_seq >= *min)
                    .map(|_| ())
            },
        )
        .await;
    }
}

/// Every node: no hole, no conflict, everything up to `delivered` stored exactly once.
async fn assert_complete(pki: &Pki, url: &str, names: &[&str], delivered: &[u64]) {
    for (name, min) in names.iter().zip(delivered) {
        let n = node(pki, url, name)
            .await
            .unwrap_or_else(|| panic!("{name} unknown"));
        assert_eq!(n.reports, n.last_seq, "{name}: {n:?}");
        assert_eq!(n.missing, 0, "{name}: {n:?}");
        assert_eq!(n.conflicts, 0, "{name}: {n:?}");
        assert_eq!(n.epochs, 1, "{name}: {n:?}");
        assert!(
            n.last_seq >= *min,
            "{name}: last_seq {} < {min}",
            n.last_seq
        );
    }
}

fn count_rows(db_dir: &std::path::Path, node: &str) -> u64 {
    let conn =
        rusqlite::Connection::open(db_dir.join(sov_collector::store::sqlite::DB_FILE)).unwrap();
    conn.query_row(
        "SELECT COUNT(*) FROM reports WHERE node = ?1",
        [node],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_agents_report_to_one_collector_and_every_report_is_stored_once() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |_| {}).await;
    let names = ["node-a", "node-b", "node-c"];
    let agents = Agents::start(&pki, &names, &[collector.url()], |_| {});
    wait_delivered(
        &pki,
        &collector.url(),
        &names,
        &[3, 3, 3],
        Duration::from_secs(30),
    )
    .await;
    let agents = agents.stop().await;
    let built: Vec<u64> = agents
        .iter()
        .map(|a| a.spool_stats().next_seq - 1)
        .collect();
    for (i, name) in names.iter().enumerate() {
        let n = node(&pki, &collector.url(), name).await.unwrap();
        assert_eq!(
            (n.reports, n.missing, n.conflicts),
            (n.last_seq, 0, 0),
            "{n:?}"
        );
        // Stored exactly once: one row per sequence number, none beyond what was built.
        assert_eq!(count_rows(data.path(), name), n.last_seq);
        assert!(
            n.last_seq <= built[i] && n.last_seq + 1 >= built[i],
            "{name}: stored {} built {}",
            n.last_seq,
            built[i]
        );
        assert_eq!((n.site.as_str(), n.country.as_str()), ("rabat-1", "MA"));
        assert!(n.memory_total_bytes > 0, "host sample stored: {n:?}");
    }
    collector.stop().await;
}

/// Kill the collector (SIGKILL) `rounds` times while three agents push, restart it each
/// time, then check that every node's reports 1..=last are stored exactly once.
async fn kill_loop(rounds: u64, pause_ms: impl Fn(u64) -> u64) {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut collector = CollectorProcess::start(&pki, work.path(), port);
    let url = collector.url();
    let names = ["node-a", "node-b", "node-c"];
    let agents = Agents::start(&pki, &names, std::slice::from_ref(&url), |_| {});
    for round in 0..rounds {
        wait_delivered(&pki, &url, &names, &agents.built(), Duration::from_secs(30)).await;
        // Mid-ingest: reports are in flight at any moment after this pause.
        tokio::time::sleep(Duration::from_millis(pause_ms(round))).await;
        collector.kill9();
        // Reports keep being built while it is down.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        collector = CollectorProcess::start(&pki, work.path(), port);
    }
    let target = agents.built();
    wait_delivered(&pki, &url, &names, &target, Duration::from_secs(30)).await;
    agents.stop().await;
    assert_complete(&pki, &url, &names, &target).await;
    for name in names {
        let n = node(&pki, &url, name).await.unwrap();
        assert_eq!(
            count_rows(&work.path().join("collector-data"), name),
            n.last_seq
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_killed_and_restarted_three_times_loses_no_report() {
    kill_loop(3, |round| 700 + 300 * round).await;
}

/// The collector aborted 20 times during ingest (`SOV_KILL_ROUNDS` changes the count), at
/// pauses that vary so the kill lands at different points of a commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_aborted_twenty_times_during_ingest_loses_no_acknowledged_report_and_stores_none_twice()
 {
    let rounds = std::env::var("SOV_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    kill_loop(rounds, |round| 50 + (round * 137) % 900).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_down_longer_than_the_spool_holds_leaves_exactly_the_dropped_range_missing() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    // Reports of ~12 KiB in a 64 KiB spool: at most five fit.
    let agents = Agents::start(&pki, &["node-a"], std::slice::from_ref(&url), |c| {
        c.max_spool_bytes = 64 * 1024;
        c.node.labels.insert("pad".into(), "x".repeat(12 * 1024));
    });
    eventually(
        Duration::from_secs(40),
        "the spool to overflow twice",
        || async { (agents.agents[0].spool_stats().dropped_total >= 3).then_some(()) },
    )
    .await;
    let collector =
        InProcessCollector::start_on(&format!("127.0.0.1:{port}"), &pki, data.path(), |_| {}).await;
    let target = agents.built();
    wait_delivered(&pki, &url, &["node-a"], &target, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(10), "the spool to drain", || async {
        (agents.agents[0].spool_stats().reports == 0).then_some(())
    })
    .await;
    let agents = agents.stop().await;
    let stats = agents[0].spool_stats();
    let n = node(&pki, &url, "node-a").await.unwrap();
    assert!(stats.dropped_total >= 3);
    assert_eq!(
        n.missing, stats.dropped_total,
        "collector {n:?}, agent {stats:?}"
    );
    assert_eq!(
        n.dropped, n.missing,
        "every missing report is a declared drop: {n:?}"
    );
    assert_eq!(n.reports + n.missing, n.last_seq);
    assert_eq!(n.conflicts, 0);
    collector.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_with_sigkill_resumes_its_sequence_without_duplicate_or_hole() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let collector = InProcessCollector::start(&pki, data.path(), |_| {}).await;
    let url = collector.url();
    let work = tempfile::tempdir().unwrap();
    let cfg = agent_config(
        &pki,
        "node-k",
        vec![url.clone()],
        &work.path().join("spool"),
    );
    let cfg_path = work.path().join("agent.toml");
    sov_e2e::write_agent_toml(&cfg, &cfg_path);
    let mut last = 0;
    for round in 0..3 {
        let mut agent = sov_e2e::AgentProcess::start(
            &cfg_path,
            &work.path().join(format!("agent-{round}.log")),
        );
        wait_delivered(
            &pki,
            &url,
            &["node-k"],
            &[last + 2],
            Duration::from_secs(30),
        )
        .await;
        // Kill at a different point of the interval each round.
        tokio::time::sleep(Duration::from_millis(300 * round)).await;
        agent.kill9();
        last = node(&pki, &url, "node-k").await.unwrap().last_seq;
    }
    let n = node(&pki, &url, "node-k").await.unwrap();
    assert!(n.last_seq >= 6, "{n:?}");
    assert_eq!(
        (n.reports, n.missing, n.conflicts, n.epochs),
        (n.last_seq, 0, 0, 1),
        "{n:?}"
    );
    // The spool on disk agrees: its next sequence number follows what the collector holds.
    let spool =
        sov_agent::spool::Spool::open(work.path().join("spool"), cfg.max_spool_bytes).unwrap();
    let s = spool.stats();
    // (A report committed just before the kill may still wait in the spool for its ack.)
    let built = s.next_seq - 1;
    assert!(
        built - s.reports <= n.last_seq && n.last_seq <= built,
        "spool {s:?} vs collector {n:?}"
    );
    collector.stop().await;
}
