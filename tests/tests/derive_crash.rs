//! Derivation is exactly once across crashes: the collector is killed (SIGKILL) while it
//! derives acknowledged reports, 20 times, and what it derived in the end equals the sum of
//! the reports committed, each counted once. With two replicas on one PostgreSQL schema, both
//! derive (each its share of the partitions of nodes), each report once, and the survivor
//! takes over the share of one killed mid-derivation.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use prost::Message;
use sov_collector::auth::Role;
use sov_collector::store::Store;
use sov_collector::store::postgres::PostgresStore;
use sov_e2e::{CollectorProcess, Pki, eventually, free_port, push_client, report_with_flows};
use sov_proto::pb;

/// Times the collector is killed in the middle of derivation.
const KILLS: usize = 20;
/// Reports pushed (and acknowledged) before each kill.
const REPORTS_PER_ROUND: u64 = 30;
/// Flows per report.
const FLOWS: u64 = 50;

fn count(db: &Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Nodes pushing at once (each has one report in flight at a time, as the collector allows).
const NODES: u64 = 10;

/// Report `seq` of `node`: `FLOWS` outbound flows to distinct addresses, byte counts that
/// differ per report and flow (so that a report derived twice, or not at all, changes the
/// sums).
fn report(node: u64, seq: u64) -> pb::Report {
    let flows = (0..FLOWS)
        .map(|i| {
            let mut f = sov_e2e::outbound_flow(
                &format!("203.0.{}.{}", seq % 200, i + 1),
                1_000 * seq + 100 * node + i,
            );
            f.bytes_received = seq + 7 * i + node;
            f
        })
        .collect();
    report_with_flows(&format!("crash-node-{node}"), seq, flows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_collector_mid_derivation_derives_every_committed_report_exactly_once() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let db = work
        .path()
        .join("collector-data")
        .join(sov_collector::store::sqlite::DB_FILE);
    let tls: Vec<_> = (0..NODES)
        .map(|n| pki.client_tls(Role::Agent, &format!("crash-node-{n}")))
        .collect();
    let (mut seq, mut acked_sent, mut acked_received) = (0u64, 0u64, 0u64);
    let mut killed_with_work_left = 0;
    let mut derived_between_kills = 0;
    for round in 0..KILLS {
        let mut collector = CollectorProcess::start(&pki, work.path(), port);
        let mut clients = Vec::new();
        for t in &tls {
            clients.push(push_client(t, &collector.url()).await.unwrap());
        }
        let before = count(&db, "SELECT COUNT(*) FROM derive_queue");
        // A burst from every node at once (group-committed), so that derivation has work
        // left when the acknowledgements are in.
        let first = seq + 1;
        seq += REPORTS_PER_ROUND / NODES;
        let sums = futures::future::join_all(clients.into_iter().enumerate().map(
            |(n, mut client)| async move {
                let (mut sent, mut received) = (0u64, 0u64);
                for s in first..=seq {
                    let r = report(n as u64, s);
                    let ack = client.push(r.clone()).await.unwrap().into_inner();
                    assert!(!ack.duplicate, "report {n}/{s} was new");
                    sent += r.flows.iter().map(|f| f.bytes_sent).sum::<u64>();
                    received += r.flows.iter().map(|f| f.bytes_received).sum::<u64>();
                }
                (sent, received)
            },
        ))
        .await;
        for (sent, received) in sums {
            acked_sent += sent;
            acked_received += received;
        }
        if derived_between_kills == 0 && round + 1 == KILLS {
            // No round caught the deriver at work before its kill (on a slow, busy machine
            // each start can take the whole burst): this last one waits for its first batch,
            // so that a kill between two batches is among the twenty.
            eventually(
                Duration::from_secs(60),
                "the deriver's first batch",
                || async {
                    (count(&db, "SELECT COUNT(*) FROM derive_queue")
                        < before + i64::try_from(REPORTS_PER_ROUND).unwrap())
                    .then_some(())
                },
            )
            .await;
        }
        // Kill it while reports wait: the deriver is at work on them.
        let waiting = count(&db, "SELECT COUNT(*) FROM derive_queue");
        collector.kill9();
        if waiting > 0 {
            killed_with_work_left += 1;
        }
        if waiting < before + i64::try_from(REPORTS_PER_ROUND).unwrap() {
            derived_between_kills += 1;
        }
    }
    // Restarted once more, it derives what is left.
    let collector = CollectorProcess::start(&pki, work.path(), port);
    eventually(
        Duration::from_secs(120),
        "the derive queue to empty",
        || async { (count(&db, "SELECT COUNT(*) FROM derive_queue") == 0).then_some(()) },
    )
    .await;

    // The committed reports, read back from their bodies.
    let c = rusqlite::Connection::open(&db).unwrap();
    let mut st = c.prepare("SELECT body FROM reports").unwrap();
    let (mut committed, mut committed_sent, mut committed_received) = (0u64, 0u64, 0u64);
    for body in st.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap() {
        let r = pb::Report::decode(body.unwrap().as_slice()).unwrap();
        committed += 1;
        committed_sent += r.flows.iter().map(|f| f.bytes_sent).sum::<u64>();
        committed_received += r.flows.iter().map(|f| f.bytes_received).sum::<u64>();
    }
    assert_eq!(
        committed,
        seq * NODES,
        "every acknowledged report is committed"
    );
    assert_eq!(
        (committed_sent, committed_received),
        (acked_sent, acked_received)
    );
    let derived_sent = count(&db, "SELECT SUM(bytes_sent) FROM flows_minute");
    let derived_received = count(&db, "SELECT SUM(bytes_received) FROM flows_minute");
    let derived_connections = count(&db, "SELECT SUM(connections) FROM flows_minute");
    assert_eq!(
        (
            u64::try_from(derived_sent).unwrap(),
            u64::try_from(derived_received).unwrap()
        ),
        (committed_sent, committed_received),
        "derived totals equal the sum of the committed reports"
    );
    assert_eq!(
        u64::try_from(derived_connections).unwrap(),
        committed * FLOWS,
        "each flow counted once"
    );
    assert_eq!(
        count(&db, "SELECT SUM(flow_count) FROM foreign_flows"),
        i64::try_from(committed * FLOWS).unwrap()
    );
    // The kills fell in the middle of derivation: reports waited when it died, and it had
    // derived some of them before.
    assert!(
        killed_with_work_left >= KILLS / 2,
        "only {killed_with_work_left} of {KILLS} kills found reports waiting"
    );
    assert!(
        derived_between_kills >= 1,
        "the deriver never made progress between kills"
    );
    drop(collector);
}

/// A graceful stop (SIGTERM, or an embedding program's shutdown future) returns only once
/// every background loop has ended: the deriver's batch under way is committed, and nothing
/// holds the store any more (a caller may then close it, move its file or drop its schema).
/// Stopped while ten nodes' reports wait to be derived, with the HTTPS API and `/metrics` on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_stop_mid_derivation_returns_once_every_loop_has_let_go_of_the_store() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = sov_collector::config::CollectorConfig::new(
        addr,
        work.path().join("collector-data"),
        pki.server_files(),
    );
    config.http.listen = Some("127.0.0.1:0".parse().unwrap());
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    let store = sov_collector::store::open(&config.store.url, &config.data_dir)
        .await
        .unwrap();
    let held = std::sync::Arc::downgrade(&store);
    let stop = tokio_util::sync::CancellationToken::new();
    let cancelled = stop.clone().cancelled_owned();
    let running =
        tokio::spawn(
            async move { sov_collector::app::run(&config, store, listener, cancelled).await },
        );
    let url = format!("https://{addr}");
    let tls: Vec<_> = (0..NODES)
        .map(|n| pki.client_tls(Role::Agent, &format!("crash-node-{n}")))
        .collect();
    let pushes = futures::future::join_all(tls.iter().enumerate().map(|(n, t)| {
        let url = url.clone();
        async move {
            let mut client = push_client(t, &url).await.unwrap();
            for s in 1..=REPORTS_PER_ROUND {
                client.push(report(n as u64, s)).await.unwrap();
            }
        }
    }));
    pushes.await;
    // Every report acknowledged; some still wait for the deriver.
    let db = work
        .path()
        .join("collector-data")
        .join(sov_collector::store::sqlite::DB_FILE);
    let waiting = count(&db, "SELECT COUNT(*) FROM derive_queue");
    eprintln!("stopping with {waiting} reports waiting to be derived");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("a graceful stop returns (bounded)")
        .unwrap()
        .unwrap();
    assert!(
        held.upgrade().is_none(),
        "the store is still held by a loop after the collector's run returned"
    );
    // What it derived before it stopped is whole: the flows of every report that left the
    // queue, each once.
    let c = rusqlite::Connection::open(&db).unwrap();
    let mut st = c
        .prepare(
            "SELECT body FROM reports r WHERE NOT EXISTS (SELECT 1 FROM derive_queue q
             WHERE q.node = r.node AND q.epoch = r.epoch AND q.seq = r.seq)",
        )
        .unwrap();
    let mut derived_reports_sent = 0u64;
    for body in st.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap() {
        let r = pb::Report::decode(body.unwrap().as_slice()).unwrap();
        derived_reports_sent += r.flows.iter().map(|f| f.bytes_sent).sum::<u64>();
    }
    let minute_sent = count(&db, "SELECT COALESCE(SUM(bytes_sent), 0) FROM flows_minute");
    assert_eq!(u64::try_from(minute_sent).unwrap(), derived_reports_sent);
}

/// `sov_collector_derived_reports_total` on the collector's `/metrics` at `addr`.
async fn derived_total(addr: SocketAddr) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("sov_collector_derived_reports_total "))
        .unwrap_or_else(|| panic!("no derived counter in /metrics:\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

/// Backend processes holding derive partitions of `schema` (advisory locks, see the
/// collector's `store/postgres/partitions.rs`), each with how many it holds.
async fn partition_holders(db: &tokio_postgres::Client) -> Vec<i64> {
    db.query(
        "SELECT COUNT(*) FROM pg_locks
         WHERE locktype = 'advisory' AND objsubid = 2 AND granted
           AND classid = hashtext(current_schema())::OID
           AND objid::INT8 BETWEEN 1396965376 AND 1396965376 + 63
         GROUP BY pid ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Push reports `first..=last` of every node in `nodes` to the collector at `url` (node by
/// node in parallel); the bytes sent and received they carry.
async fn push_rounds(pki: &Pki, url: &str, nodes: &[u64], first: u64, last: u64) -> (u64, u64) {
    let sums = futures::future::join_all(nodes.iter().map(|&n| async move {
        let mut client = push_client(
            &pki.client_tls(Role::Agent, &format!("crash-node-{n}")),
            url,
        )
        .await
        .unwrap();
        let (mut sent, mut received) = (0u64, 0u64);
        for s in first..=last {
            let r = report(n, s);
            let ack = client.push(r.clone()).await.unwrap().into_inner();
            assert!(!ack.duplicate, "report {n}/{s} was new");
            sent += r.flows.iter().map(|f| f.bytes_sent).sum::<u64>();
            received += r.flows.iter().map(|f| f.bytes_received).sum::<u64>();
        }
        (sent, received)
    }))
    .await;
    sums.into_iter()
        .fold((0, 0), |(a, b), (s, r)| (a + s, b + r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_postgres_replicas_derive_in_parallel_each_report_once_and_the_survivor_takes_over() {
    const NODES_HERE: u64 = 20;
    const ROUND: u64 = 5;
    let base = sov_e2e::postgres_url();
    let schema = format!("sov_e2e_derive_replicas_{}", std::process::id());
    let admin = match PostgresStore::connect_with_schema(&base, &schema).await {
        Ok(s) => s,
        Err(e) => {
            assert!(
                !sov_e2e::postgres_required(),
                "PostgreSQL required but not reachable at {base}: {e}"
            );
            sov_e2e::skipped(
                "derive_crash (replicas)",
                &format!(
                    "PostgreSQL not reachable at {base} ({e}); set SOV_REQUIRE_POSTGRES=1 to fail instead"
                ),
            );
            return;
        }
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-csearch_path%3D{schema}");
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);

    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let metrics: Vec<SocketAddr> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let mut replicas: Vec<CollectorProcess> = (0..2)
        .map(|i| {
            let dir = work.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            CollectorProcess::start_with(&pki, &dir, free_port(), |c| {
                c.store.url = url.clone();
                c.metrics.listen = Some(metrics[i]);
            })
        })
        .collect();
    let urls: Vec<String> = replicas.iter().map(CollectorProcess::url).collect();
    // The derivers (two replicas of `[derive] connections` each) share the partitions out
    // equally.
    let per_replica = sov_collector::derive::DEFAULT_CONNECTIONS as usize;
    let shares = |derivers: usize| vec![64 / derivers as i64; derivers];
    eventually(
        Duration::from_secs(60),
        "each deriver of the two replicas to hold its share of the derive partitions",
        || async { (partition_holders(&db).await == shares(2 * per_replica)).then_some(()) },
    )
    .await;

    // Round 1: every node pushes to one of the replicas; both derive, each report once.
    let nodes: Vec<u64> = (0..NODES_HERE).collect();
    let (even, odd): (Vec<u64>, Vec<u64>) = nodes.iter().partition(|n| *n % 2 == 0);
    let ((s0, r0), (s1, r1)) = tokio::join!(
        push_rounds(&pki, &urls[0], &even, 1, ROUND),
        push_rounds(&pki, &urls[1], &odd, 1, ROUND)
    );
    let (mut acked_sent, mut acked_received) = (s0 + s1, r0 + r1);
    eventually(
        Duration::from_secs(120),
        "the derive queue to empty",
        || async { (admin.derive_status().await.unwrap().pending == 0).then_some(()) },
    )
    .await;
    let (a, b) = (
        derived_total(metrics[0]).await,
        derived_total(metrics[1]).await,
    );
    assert!(a > 0 && b > 0, "both replicas derive: {a} and {b}");
    assert_eq!(a + b, NODES_HERE * ROUND, "each report derived once");

    // Round 2: a burst to replica 0, killed while reports wait; then every node pushes to
    // replica 1, which takes over the dead one's partitions and derives what was left.
    let (s, r) = push_rounds(&pki, &urls[0], &nodes, ROUND + 1, 2 * ROUND).await;
    let waiting = admin.derive_status().await.unwrap().pending;
    replicas[0].kill9();
    acked_sent += s;
    acked_received += r;
    let (s, r) = push_rounds(&pki, &urls[1], &nodes, 2 * ROUND + 1, 3 * ROUND).await;
    acked_sent += s;
    acked_received += r;
    eventually(
        Duration::from_secs(120),
        "the survivor to derive everything",
        || async { (admin.derive_status().await.unwrap().pending == 0).then_some(()) },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the survivor's derivers to hold every partition between them",
        || async { (partition_holders(&db).await == shares(per_replica)).then_some(()) },
    )
    .await;
    assert!(
        derived_total(metrics[1]).await > b,
        "the survivor derived after the kill ({waiting} reports waited when it came)"
    );

    // Derived totals equal the sums of the committed reports, each counted once.
    let (mut committed, mut committed_sent, mut committed_received) = (0u64, 0u64, 0u64);
    for row in db.query("SELECT body FROM reports", &[]).await.unwrap() {
        let r = pb::Report::decode(row.get::<_, &[u8]>(0)).unwrap();
        committed += 1;
        committed_sent += r.flows.iter().map(|f| f.bytes_sent).sum::<u64>();
        committed_received += r.flows.iter().map(|f| f.bytes_received).sum::<u64>();
    }
    assert_eq!(
        committed,
        NODES_HERE * 3 * ROUND,
        "every acknowledged report is committed"
    );
    assert_eq!(
        (committed_sent, committed_received),
        (acked_sent, acked_received)
    );
    let row = db
        .query_one(
            "SELECT SUM(bytes_sent)::INT8, SUM(bytes_received)::INT8, SUM(connections)::INT8
             FROM flows_minute",
            &[],
        )
        .await
        .unwrap();
    let derived: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        derived,
        (
            i64::try_from(committed_sent).unwrap(),
            i64::try_from(committed_received).unwrap(),
            i64::try_from(committed * FLOWS).unwrap()
        ),
        "derived totals equal the sum of the committed reports"
    );
    drop(replicas);
    admin.drop_schema().await.unwrap();
}
