//! Embedded SQLite store: WAL mode, `synchronous = FULL` (a commit survives power loss, not
//! only a crash of the process), one writer connection and [`READERS`] reader connections.
//! Blocking calls run on tokio's blocking pool.
//!
//! This file holds the connections, the schema migrations (`collector/migrations/sqlite/`,
//! one `.sql` file per version) and the [`Store`](super::Store) impl; each concern has its
//! own file: `ingest.rs` (group commit and every row a report makes), `queries.rs` (what
//! regulators read), `breaches.rs` (breaches and the two hash-chained logs), `outbox.rs`
//! (alert outbox and leases), `tokens.rs`, `retention.rs`. Rows are read through
//! [`super::rows`], shared with PostgreSQL.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sov_evidence::audit::{AuditEntry, AuditRecord};
use sov_evidence::chain::{LogRecord, canonical_json};

use super::rows;
use super::{
    BreachChange, BreachFilter, Derivation, DeriveStatus, GpuSummary, GpuUsageRow, IncomingReport,
    IngestOutcome, NewEnrollToken, NodePeer, NodeRow, OutboxItem, OutboxRow, PruneStats, Retention,
    Settle, SinkStats, StoreError, TokenRecord, TokenSpend, Underived, format_name, to_i64,
};
use crate::breach::{Breach, BreachState, EVENT_OPEN, EVENT_RESOLVED, EVENT_UPDATED, Observation};
use sync::Syncer;

mod breaches;
mod containers;
mod ingest;
pub use ingest::{WRITER, WriterStats, derive_yields};
mod outbox;
mod queries;
mod retention;
mod sync;
mod tokens;
mod training;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "sovereign.db";

/// Prepared statements the writer keeps (the ingest path uses about 20).
const STATEMENT_CACHE: usize = 64;

/// Schema version this code writes (`PRAGMA user_version`): the number of migrations.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Migration `i` takes a database from version `i` to `i + 1`. Append only; never edit one
/// that has shipped.
const MIGRATIONS: [&str; 24] = [
    include_str!("../../../migrations/sqlite/0001_reports.sql"),
    include_str!("../../../migrations/sqlite/0002_host_and_gpu_samples.sql"),
    include_str!("../../../migrations/sqlite/0003_weight_files.sql"),
    include_str!("../../../migrations/sqlite/0004_flows.sql"),
    include_str!("../../../migrations/sqlite/0005_breaches_and_breach_log.sql"),
    include_str!("../../../migrations/sqlite/0006_alert_outbox_leases_and_peers.sql"),
    include_str!("../../../migrations/sqlite/0007_audit_log_and_api_tokens.sql"),
    include_str!("../../../migrations/sqlite/0008_enroll_tokens.sql"),
    include_str!("../../../migrations/sqlite/0009_minute_aggregates.sql"),
    include_str!("../../../migrations/sqlite/0010_verdict_answers_and_measurement.sql"),
    include_str!("../../../migrations/sqlite/0011_containers.sql"),
    include_str!("../../../migrations/sqlite/0012_enroll_token_replaces.sql"),
    include_str!("../../../migrations/sqlite/0013_training_runs.sql"),
    include_str!("../../../migrations/sqlite/0014_derive_queue.sql"),
    include_str!("../../../migrations/sqlite/0015_chain_checkpoints_and_inventory_generations.sql"),
    include_str!("../../../migrations/sqlite/0016_hourly_rollups.sql"),
    include_str!("../../../migrations/sqlite/0017_foreign_flows_per_report.sql"),
    include_str!("../../../migrations/sqlite/0018_daily_rollups.sql"),
    include_str!("../../../migrations/sqlite/0019_fleet_rollups.sql"),
    include_str!("../../../migrations/sqlite/0020_rest_of_day_rows.sql"),
    include_str!("../../../migrations/sqlite/0021_contested_covering_index.sql"),
    include_str!("../../../migrations/sqlite/0022_late_flow_rows_without_triggers.sql"),
    include_str!("../../../migrations/sqlite/0023_contested_rollups.sql"),
    include_str!("../../../migrations/sqlite/0024_contested_late_rows_without_triggers.sql"),
];

/// Reader connections: a read takes whichever is free. With one, every read waited for the
/// one before it: at 10,000 nodes a regulator's `egress --by process` over a week reads for
/// seconds, and each API token lookup, rule evaluation and other regulator's question queued
/// behind it; and a scorecard's reads could not run side by side. WAL readers do not block
/// each other or the writer; each holds its own page cache (2 MB by default).
pub const READERS: usize = 4;

/// The reader connections, lent one read at a time ([`Readers::with`]).
#[derive(Debug)]
struct Readers {
    free: Mutex<Vec<Connection>>,
    returned: std::sync::Condvar,
}

impl Readers {
    /// Run `f` with a free reader connection, waiting for one when all are lent.
    fn with<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        let conn = {
            let mut free = lock(&self.free);
            loop {
                if let Some(c) = free.pop() {
                    break c;
                }
                free = self
                    .returned
                    .wait(free)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        // Given back even when `f` panics (a read leaves nothing open once its statements
        // drop), so that a panic does not shrink the pool.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&conn)));
        lock(&self.free).push(conn);
        self.returned.notify_one();
        match out {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Readers>,
    /// Reports waiting for the writer (group commit, see [`Store::ingest`]).
    pending: Arc<Mutex<super::Pending>>,
    /// Answers committed appends once the write-ahead log is synced ([`sync`]).
    syncer: Arc<Syncer>,
}

/// Run `sql` through the connection's prepared statement cache (the ingest path runs the same
/// few statements for every report and flow: parsing them each time cost more than running
/// them).
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { context, source }
}

fn lock<T>(c: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock rolls back any open transaction when the guard's
    // statement objects drop, so the connection is still consistent.
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Range(format!("{what} {v} is negative")))
}

/// Apply every migration after `from`, each with its version bump in one transaction.
fn migrate(conn: &mut Connection, from: i64) -> Result<(), StoreError> {
    for (i, step) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(from).unwrap_or(0))
    {
        let tx = conn.transaction().map_err(sql("begin migration"))?;
        tx.execute_batch(step).map_err(sql("migrate schema"))?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(sql("write schema version"))?;
        tx.commit().map_err(sql("commit migration"))?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    Ok(())
}

impl SqliteStore {
    /// Open (creating if needed) `data_dir/sovereign.db`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Open {
            path: data_dir.display().to_string(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
            return Err(StoreError::EmptyDatabase {
                path: path.display().to_string(),
            });
        }
        let writer = Connection::open(&path).map_err(sql("open database"))?;
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000;",
            )
            .map_err(sql("set pragmas"))?;
        let version: i64 = writer
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql("read schema version"))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let mut writer = writer;
        migrate(&mut writer, version)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let reader = Connection::open(&path).map_err(sql("open reader"))?;
            reader
                .execute_batch("PRAGMA busy_timeout = 10000; PRAGMA query_only = ON;")
                .map_err(sql("set reader pragmas"))?;
            readers.push(reader);
        }
        writer.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        writer
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}; PRAGMA cache_size = -{WRITER_CACHE_KIB};"
            ))
            .map_err(sql("set checkpoint threshold"))?;
        let writer = Arc::new(Mutex::new(writer));
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        let syncer = Arc::new(Syncer::start(wal.into())?);
        spawn_checkpointer(path, Arc::downgrade(&writer));
        Ok(Self {
            writer,
            reader: Arc::new(Readers {
                free: Mutex::new(readers),
                returned: std::sync::Condvar::new(),
            }),
            pending: Arc::default(),
            syncer,
        })
    }
}

/// The writer's page cache, KiB (SQLite's default is 2,000 KiB). The writer's inserts land
/// across the whole of `flows_minute` (its key leads with the node: one leaf per node and
/// minute being written), `reports` and `derive_queue`: with 200 nodes that working set did
/// not fit in the default cache, so a derive batch read pages back with `pread` and spilled
/// dirty pages to the WAL in the middle of its transaction (PERFORMANCE.md §8m: a quarter of
/// the writer's time). Only the writer keeps its cache from one transaction to the next (any
/// other connection's is reset when the writer commits), so only the writer gets a larger one.
const WRITER_CACHE_KIB: u32 = 65_536;
/// WAL pages after which the writer checkpoints by itself, in its commit (SQLite's default is
/// 1,000): only when the background checkpointer falls behind.
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 16_384;
/// How often the background checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Copy the WAL into the database file from a connection of its own, on a thread of its own,
/// while the store lives (`writer` can be upgraded): a passive checkpoint does not block the
/// writer, so appends and derive batches no longer pay for checkpoints in their commits
/// (measured: 7 % of the CPU of derive-only on SQLite was the writer's auto-checkpoint).
fn spawn_checkpointer(path: std::path::PathBuf, writer: std::sync::Weak<Mutex<Connection>>) {
    let started = std::thread::Builder::new()
        .name("sqlite-checkpoint".to_owned())
        .spawn(move || {
            let conn = match Connection::open(&path) {
                Ok(c) => c,
                Err(err) => {
                    tracing::warn!(error = %err, "checkpointer cannot open the database; the writer checkpoints");
                    return;
                }
            };
            if let Err(err) = conn.busy_timeout(std::time::Duration::from_secs(10)) {
                tracing::warn!(error = %err, "checkpointer: busy timeout not set");
            }
            loop {
                std::thread::sleep(CHECKPOINT_EVERY);
                if writer.strong_count() == 0 {
                    return;
                }
                if let Err(err) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::debug!(error = %err, "passive checkpoint failed; retried");
                }
            }
        });
    if let Err(err) = started {
        tracing::warn!(error = %err, "checkpointer thread not started; the writer checkpoints");
    }
}

impl SqliteStore {
    /// Run `f` with the writer connection on the blocking pool.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&writer)))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Run `f` with a reader connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || reader.with(f))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

crate::store::store_by_concern!(SqliteStore);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::Store;
    use crate::store::suite::{Backend, Fixture, report, store_suite, telemetry};

    /// A fresh database in a temporary directory.
    struct SqliteFixture {
        dir: tempfile::TempDir,
        store: SqliteStore,
    }

    #[async_trait::async_trait(?Send)]
    impl Backend for SqliteFixture {
        fn store(&self) -> &dyn Store {
            &self.store
        }

        async fn count(&self, sql: &str) -> i64 {
            count(self.dir.path(), sql)
        }
    }

    #[async_trait::async_trait(?Send)]
    impl Fixture for SqliteFixture {
        async fn create() -> Option<Self> {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path()).unwrap();
            Some(Self { dir, store })
        }

        async fn destroy(self) {}
    }

    store_suite!(SqliteFixture);

    /// Count stored reports of one node and epoch.
    fn count_reports(data_dir: &Path, node: &str, epoch: u64) -> Result<u64, StoreError> {
        let conn = Connection::open(data_dir.join(DB_FILE)).map_err(sql("open database"))?;
        let n: Option<i64> = conn
            .query_row(
                "SELECT COUNT(*) FROM reports WHERE node = ?1 AND epoch = ?2",
                params![node, to_i64(epoch, "epoch")?],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("count reports"))?;
        to_u64(n.unwrap_or(0), "count")
    }

    fn count(dir: &Path, sql: &str) -> i64 {
        Connection::open(dir.join(DB_FILE))
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn stored_reports_survive_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path()).unwrap();
            store.ingest(report("a", 1, 1)).await.unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(
            store.ingest(report("a", 1, 1)).await.unwrap(),
            IngestOutcome::Duplicate
        );
        assert_eq!(store.list_nodes("", 10).await.unwrap()[0].reports, 1);
        assert_eq!(count_reports(dir.path(), "a", 1).unwrap(), 1);
    }

    #[tokio::test]
    async fn a_version_1_database_is_migrated_without_losing_its_reports() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            let tx = c.transaction().unwrap();
            tx.execute_batch(MIGRATIONS[0]).unwrap();
            tx.execute_batch("PRAGMA user_version = 1").unwrap();
            tx.execute(
                "INSERT INTO reports (node, epoch, seq, observed_ms, received_ms, body) VALUES ('a', 1, 1, 1000, 1005, x'01')",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(count(dir.path(), "PRAGMA user_version"), SCHEMA_VERSION);
        assert_eq!(
            store.ingest(report("a", 1, 1)).await.unwrap(),
            IngestOutcome::Duplicate
        );
        let mut r = report("a", 1, 2);
        r.telemetry = telemetry();
        assert_eq!(
            store.ingest(r.clone()).await.unwrap(),
            IngestOutcome::Stored
        );
        let queued = store.underived(10).await.unwrap();
        assert_eq!(queued.len(), 1, "only the new report waits for derivation");
        let batch = vec![crate::store::Derivation {
            queue_id: queued[0].queue_id,
            report: r,
        }];
        assert_eq!(store.derive(batch).await.unwrap(), 1);
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM gpu_samples"), 2);
    }

    #[tokio::test]
    async fn an_edited_log_record_is_refused_by_the_database_and_named_by_the_chain() {
        use crate::store::suite::{observation, whole_log};
        use sov_evidence::chain::verify_chain;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        for (at, bytes) in [(1000, 1), (2000, 2), (3000, 3)] {
            store
                .observe_breach(observation(
                    "r",
                    "n",
                    "s",
                    at,
                    serde_json::json!({"bytes": bytes}),
                ))
                .await
                .unwrap();
        }
        assert_eq!(verify_chain(whole_log(&store).await.into_iter()), Ok(3));
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let edit = "UPDATE breach_log SET body = replace(body, '\"bytes\":2', '\"bytes\":0') WHERE seq = 2";
        let refused = c.execute(edit, []).unwrap_err().to_string();
        assert!(refused.contains("append-only"), "{refused}");
        assert!(
            c.execute("DELETE FROM breach_log WHERE seq = 3", [])
                .is_err()
        );
        // Someone with the file can drop the trigger; the chain still tells.
        c.execute_batch("DROP TRIGGER breach_log_no_update")
            .unwrap();
        assert_eq!(c.execute(edit, []).unwrap(), 1);
        let log = whole_log(&store).await;
        assert_eq!(log[1].body["evidence"]["bytes"], 0);
        let err = verify_chain(log.into_iter()).unwrap_err();
        assert_eq!(err.seq, 2, "{err}");
    }

    /// Acknowledgements before derivation: an append that arrives while a derive transaction
    /// holds the single writer is stored and answered before the transaction goes on past the
    /// node it was writing (the transaction commits there and lets it go first), and every
    /// report of the batch is still derived exactly once. No timing: the yield is asked for by
    /// the test's own `yield_to_appends`, as the store asks once its slice has passed.
    #[tokio::test]
    async fn an_append_arriving_during_a_derive_transaction_goes_first_and_each_report_is_derived_once()
     {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let full = |node: &str, seq: u64| {
            let mut r = report(node, 1, seq);
            r.telemetry = telemetry();
            r
        };
        for node in ["a", "b", "c"] {
            for seq in 1..=2 {
                store.ingest(full(node, seq)).await.unwrap();
            }
        }
        let batch: Vec<crate::store::Derivation> = store
            .underived(100)
            .await
            .unwrap()
            .into_iter()
            .map(|u| crate::store::Derivation {
                queue_id: u.queue_id,
                report: full(&u.node, u.seq),
            })
            .collect();
        assert_eq!(batch.len(), 6);
        let yields = ingest::derive_yields();
        let (writer, pending, syncer) = (
            store.writer.clone(),
            store.pending.clone(),
            store.syncer.clone(),
        );
        let path = dir.path().to_owned();
        let derive_batch = batch.clone();
        let (derived, asked, answer) = tokio::task::spawn_blocking(move || {
            let mut asked = 0;
            let mut answer = None;
            let mut drainer = None;
            let derived =
                ingest::derive_blocking(&writer, &pending, &syncer, &derive_batch, |_held| {
                    asked += 1;
                    if asked == 1 {
                        // Node a is written, not committed: a report arrives, as ingest queues
                        // it (its drainer waits for the writer this transaction holds).
                        let (rx, start) = lock(&pending).push(report("d", 1, 1));
                        assert!(start);
                        let (w, p, s) = (writer.clone(), pending.clone(), syncer.clone());
                        drainer = Some(std::thread::spawn(move || ingest::drain(&w, &p, &s)));
                        answer = Some(rx);
                        return true;
                    }
                    // Before node b's rows are committed: the append was committed (its
                    // answer follows the log's sync), and node a's derivation is committed,
                    // node c's not yet.
                    let reader = Connection::open(path.join(DB_FILE)).unwrap();
                    let queued: Vec<String> = reader
                        .prepare("SELECT node FROM derive_queue ORDER BY id")
                        .unwrap()
                        .query_map([], |r| r.get(0))
                        .unwrap()
                        .map(Result::unwrap)
                        .collect();
                    assert_eq!(queued, ["b", "b", "c", "c", "d"]);
                    false
                })
                .unwrap();
            drainer.unwrap().join().unwrap();
            (derived, asked, answer.unwrap())
        })
        .await
        .unwrap();
        assert!(matches!(answer.await, Ok(Ok(IngestOutcome::Stored))));
        assert_eq!(derived, 6);
        assert_eq!(asked, 2, "asked after nodes a and b, not after the last");
        assert!(ingest::derive_yields() > yields);
        // Each report derived once: two GPU samples per report; the new one waits its turn.
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM gpu_samples"), 12);
        let status = store.derive_status().await.unwrap();
        assert_eq!(status.pending, 1);
        assert_eq!(
            store.derive(batch).await.unwrap(),
            0,
            "nothing derived twice"
        );
        assert_eq!(count(dir.path(), "SELECT COUNT(*) FROM gpu_samples"), 12);
        // The drainer stopped: the next report starts another and is stored.
        assert_eq!(
            store.ingest(report("d", 1, 2)).await.unwrap(),
            IngestOutcome::Stored
        );
    }

    /// An append is acknowledged once the write-ahead log is synced past its commit; SQLite's
    /// writer does not wait for that sync (derivation uses it meanwhile); and appends that
    /// queue during a sync are committed as it ends, together, not one by one during it.
    #[tokio::test]
    async fn appends_are_answered_after_the_logs_sync_and_those_queued_during_it_commit_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (entered, syncing) = std::sync::mpsc::channel::<()>();
        let store = SqliteStore {
            syncer: Arc::new(
                Syncer::with(move || {
                    let _ = entered.send(());
                    // Held until the test lets go (then every later sync goes through).
                    let _ = held.recv();
                    Ok(())
                })
                .unwrap(),
            ),
            ..SqliteStore::open(dir.path()).unwrap()
        };
        let (writer, pending, syncer) = (
            store.writer.clone(),
            store.pending.clone(),
            store.syncer.clone(),
        );
        let (mut a, mut b, mut c, drainer) = tokio::task::spawn_blocking(move || {
            let (a, _) = lock(&pending).push(report("a", 1, 1));
            ingest::drain(&writer, &pending, &syncer);
            // Committed and handed to the syncer, whose sync is now held.
            syncing.recv().unwrap();
            let (b, _) = lock(&pending).push(report("b", 1, 1));
            let (c, _) = lock(&pending).push(report("c", 1, 1));
            let drainer = std::thread::spawn(move || ingest::drain(&writer, &pending, &syncer));
            (a, b, c, drainer)
        })
        .await
        .unwrap();
        // The writer is free while the log syncs: another write commits.
        assert!(
            store
                .take_lease("rules", "me", 1_000, 10_000)
                .await
                .unwrap()
        );
        assert!(
            a.try_recv().is_err() && b.try_recv().is_err() && c.try_recv().is_err(),
            "answered before the log was synced"
        );
        assert!(
            store.list_nodes("", 10).await.unwrap().len() == 1,
            "appends queued during the sync were committed during it"
        );
        drop(release);
        tokio::task::spawn_blocking(move || drainer.join().unwrap())
            .await
            .unwrap();
        for answer in [a, b, c] {
            assert!(matches!(answer.await, Ok(Ok(IngestOutcome::Stored))));
        }
        assert_eq!(store.list_nodes("", 10).await.unwrap().len(), 3);
        // Through the store's own path too, once the log syncs freely.
        assert_eq!(
            store.ingest(report("a", 1, 2)).await.unwrap(),
            IngestOutcome::Stored
        );
    }

    #[test]
    fn a_database_from_a_newer_collector_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(c);
        let err = SqliteStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_stores_log_is_verified_across_pages_and_a_break_is_named() {
        use crate::breach::{Observation, Severity};
        use crate::store::{VERIFY_PAGE, verify_store_log};
        use sov_evidence::chain::{GENESIS_HASH, LogVerdict};
        let obs = |subject: &str, at: i64, evidence: serde_json::Value| Observation {
            rule: "restricted-model-outside".into(),
            node: "gpu-1".into(),
            subject: subject.into(),
            severity: Severity::Critical,
            evidence,
            at_unix_ms: at,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let empty = verify_store_log(&store).await.unwrap();
        assert_eq!(
            empty.message(),
            format!("log verified: 0 records, last hash {GENESIS_HASH}")
        );
        // More records than one page.
        let n = i64::from(VERIFY_PAGE) + 5;
        for i in 0..n {
            store
                .observe_breach(obs("m", 1000 + i, serde_json::json!(i)))
                .await
                .unwrap();
        }
        let last = store
            .breach_log(u64::try_from(n - 1).unwrap(), 1)
            .await
            .unwrap();
        let verdict = verify_store_log(&store).await.unwrap();
        assert_eq!(
            verdict,
            LogVerdict::Verified {
                records: u64::try_from(n).unwrap(),
                last_hash: last[0].hash.clone()
            }
        );
        assert_eq!(
            verdict.message(),
            format!("log verified: {n} records, last hash {}", last[0].hash)
        );
        let c = rusqlite::Connection::open(dir.path().join(crate::store::sqlite::DB_FILE)).unwrap();
        c.execute_batch(
            "DROP TRIGGER breach_log_no_delete; DELETE FROM breach_log WHERE seq = 1002;",
        )
        .unwrap();
        let verdict = verify_store_log(&store).await.unwrap();
        assert_eq!(
            verdict.message(),
            "log broken at record 1002: record missing (the next stored record is 1003)"
        );
    }

    /// Hold `n` reader connections inside reads (each waits until its sender is dropped or
    /// sends); returns once all `n` are inside.
    async fn hold_readers(
        store: &SqliteStore,
        n: usize,
    ) -> Vec<(
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
    )> {
        let (inside, mut entered) = tokio::sync::mpsc::unbounded_channel();
        let mut held = Vec::new();
        for _ in 0..n {
            let (release, wait) = std::sync::mpsc::channel::<()>();
            let inside = inside.clone();
            let s = store.clone();
            let read = tokio::spawn(async move {
                s.read(move |_conn| {
                    inside.send(()).unwrap();
                    let _ = wait.recv();
                    Ok(())
                })
                .await
            });
            held.push((release, read));
        }
        for _ in 0..n {
            entered.recv().await.unwrap();
        }
        held
    }

    /// `f`'s output, failing the test if it takes a minute (a reader never came free).
    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .unwrap_or_else(|_| panic!("{what}: no reader came free in 60 s"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_read_does_not_hold_up_the_others_and_a_read_waits_only_when_all_are_lent() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.ingest(report("a", 1, 1)).await.unwrap();
        // A long read, then all readers but one inside long reads: token lookups and
        // questions still answer (with one reader connection they waited for it to end).
        let mut held = hold_readers(&store, 1).await;
        let nodes = within("list nodes", store.list_nodes("", 10)).await;
        assert_eq!(nodes.unwrap().len(), 1);
        let token = within("token lookup", store.token_by_hash("x")).await;
        assert!(token.unwrap().is_none());
        held.extend(hold_readers(&store, READERS - 2).await);
        let nodes = within("list nodes", store.list_nodes("", 10)).await;
        assert_eq!(nodes.unwrap().len(), 1);
        // Every reader lent: a read waits for one to come back, then answers.
        held.extend(hold_readers(&store, 1).await);
        let s = store.clone();
        let waiting = tokio::spawn(async move { s.list_nodes("", 10).await });
        let (release, first) = held.remove(0);
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        let nodes = within("a read waiting for a reader", waiting).await;
        assert_eq!(nodes.unwrap().unwrap().len(), 1);
        for (release, read) in held {
            drop(release);
            read.await.unwrap().unwrap();
        }
        // A read that panics gives its connection back: as many panics as readers, then
        // a read still answers.
        for _ in 0..READERS {
            let panicked = store
                .read(|_conn| -> Result<(), StoreError> { panic!("a read panics") })
                .await;
            assert!(matches!(panicked, Err(StoreError::Task(_))), "{panicked:?}");
        }
        let nodes = within("a read after panics", store.list_nodes("", 10)).await;
        assert_eq!(nodes.unwrap().len(), 1);
    }
}
