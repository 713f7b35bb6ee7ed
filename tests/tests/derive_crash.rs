//! Derivation is exactly once across crashes: the collector is killed (SIGKILL) while it
//! derives acknowledged reports, 20 times, and what it derived in the end equals the sum of
//! the reports committed, each counted once.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::Duration;

use prost::Message;
use sov_collector::auth::Role;
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
    for _ in 0..KILLS {
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
